"""
Readers for data files users bring: MetaMathQA JSONL, GSM8K JSONL, generic JSONL (one text field, or a prompt field
and an answer field) and plain text.

What is here: functions that turn a file into a list of `Example`s, with a bad line named by file and line number.
What is not: chat formatting, tokenization, splitting (data/prepare.py).
"""

import re
from dataclasses import dataclass

from files import read_jsonl, text_field


@dataclass(frozen=True)
class Example:
    prompt: str          # the question / instruction as written in the file ("" for plain documents)
    answer: str          # the text the model learns to produce (the whole document for plain text)
    gold: str | None     # the final answer to score against, where the format has one


GSM8K_CALC = re.compile(r"<<[^<>]*>>")   # GSM8K's calculator annotations: "48/2 = <<48/2=24>>24"
METAMATH_ANSWER = re.compile(r"The answer is:?\s*(.+?)\s*$", re.DOTALL)


def _gsm8k_gold(where, answer):
    if "####" not in answer:
        raise ValueError(f"{where}: GSM8K answer has no '#### <answer>' line")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def read_examples(path, fmt, field=None, prompt_field=None, answer_field=None, skip_bad=False):
    """Read a JSONL file. fmt: "metamathqa" (query, response), "gsm8k" (question, answer with '#### N'), or "field"
    (either `field` alone: plain documents, or `prompt_field` + `answer_field`). Blank lines are ignored.
    A malformed line raises ValueError naming file and line; with skip_bad it is skipped and counted.
    Returns (examples, n_skipped)."""
    if fmt == "metamathqa":
        keys = ("query", "response")
    elif fmt == "gsm8k":
        keys = ("question", "answer")
    elif fmt == "field":
        if field and not (prompt_field or answer_field):
            keys = (None, field)
        elif prompt_field and answer_field and not field:
            keys = (prompt_field, answer_field)
        else:
            raise ValueError("jsonl format 'field' needs either --field, or both --prompt_field and --answer_field")
    else:
        raise ValueError(f"unknown jsonl format {fmt!r} (expected metamathqa, gsm8k or field)")

    def example(where, row):
        prompt, answer = ("" if k is None else text_field(where, row, k) for k in keys)
        gold = None
        if fmt == "gsm8k":
            gold = _gsm8k_gold(where, answer)
            answer = GSM8K_CALC.sub("", answer)   # the annotations are for a calculator, not for the model
        elif fmt == "metamathqa":
            m = METAMATH_ANSWER.search(answer)
            gold = m.group(1).rstrip(".") if m else None
        return Example(prompt.strip(), answer.strip(), gold)

    return read_jsonl(path, example, skip_bad, progress=True)


def read_text(path):
    """A plain UTF-8 text file as one document."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    return [Example("", text, None)]
