"""Tests of data/: the synthetic math generator and scorer, the readers, the written folders and the reader API
(self-generated chat data: test_selfgen.py). CPU only, a few seconds."""

import json
import os
import random
import re

import numpy as np
import pytest
import torch

from chars import CharTokenizer
from data import prepare
from data.dataset import TokenData, check_tokenizer, load_meta
from data.readers import read_examples, read_text
from data.synthmath import extract_answer, make_problem, make_splits, score
from prompts import read_prompts
from tokenizer import load_tokenizer


def files_of(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                out[os.path.relpath(os.path.join(root, n), folder)] = f.read()
    return out


def run(*argv):
    prepare.main([str(a) for a in argv])


# ----------------------------------------------------------------------------------------------------------------
# synthetic math

def test_synthmath_deterministic_and_disjoint():
    a = make_splits(3, {"val": 50, "test": 50, "train": 500})
    b = make_splits(3, {"val": 50, "test": 50, "train": 500})
    assert a == b
    assert make_splits(4, {"val": 50})["val"] != a["val"]
    qs = {k: {p.question for p in v} for k, v in a.items()}
    assert all(len(qs[k]) == len(a[k]) for k in a)
    assert not (qs["val"] & qs["test"]) and not (qs["train"] & (qs["val"] | qs["test"]))
    # held-out splits do not move when the training set grows
    assert make_splits(3, {"val": 50, "test": 50, "train": 900})["test"] == a["test"]


LINE = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)$")


@pytest.mark.parametrize("knobs", [{}, {"min_steps": 1, "max_steps": 6, "max_number": 20, "max_factor": 3},
                                   {"min_steps": 4, "max_steps": 4, "max_number": 1000, "max_factor": 9}])
def test_synthmath_solutions_evaluate_to_the_answer(knobs):
    rng = random.Random(0)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
    max_number = knobs.get("max_number", 100)
    for _ in range(1000):
        pr = make_problem(rng, **knobs)
        *lines, last = pr.solution.split("\n")
        assert len(lines) == pr.steps and knobs.get("min_steps", 1) <= pr.steps <= knobs.get("max_steps", 3)
        prev = None
        for line in lines:
            a, op, b, c = LINE.match(line).groups()
            assert ops[op](int(a), int(b)) == int(c), line   # exact integer results, division included
            assert 1 <= int(c) <= max_number
            assert prev is None or int(a) == prev            # each step works on the previous result
            prev = int(c)
        assert last == f"#### {pr.answer}" and prev == pr.answer
        assert score(pr.solution, pr.answer) and pr.question.endswith("?")


@pytest.mark.parametrize("text, want", [
    ("#### 42", "42"),
    ("48 / 2 = 24\n24 + 18 = 42\n#### 42", "42"),
    ("The answer is 42.", "42"),
    ("The answer is: $1,234.", "1234"),
    ("42", "42"),
    ("so she has 1,234 stamps", "1234"),
    ("#### -7", "-7"),
    ("The answer is -3 apples.", "-3"),
    ("5-3 = 2", "2"),
    ("#### 19\nQuestion: Tom has 3 pens. How many?\nAnswer:\n3 * 4 = 12\n#### 12", "19"),   # keeps going
    ("#### 2.50", "2.5"),
    ("#### 7.0", "7"),
    ("I do not know.", None),
    ("", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_score():
    assert score("13 + 5 = 18\n#### 18<|endoftext|>", 18)
    assert score("#### 1,234", "1234")
    assert not score("#### 17", "18") and not score("no idea", "18")


# ----------------------------------------------------------------------------------------------------------------
# files: determinism, overwrite, the reader API

def test_prepare_synthmath_byte_identical_and_overwrite(tmp_path):
    args = ["synthmath", "--n_train", 300, "--n_val", 20, "--n_test", 30, "--seed", 1]
    run(*args, "--out", tmp_path / "a")
    run(*args, "--out", tmp_path / "b")
    a, b = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert a == b and "train.bin" in a and "test_prompts.jsonl" in a
    with pytest.raises(FileExistsError, match="--overwrite"):
        run(*args, "--out", tmp_path / "a")
    run(*args, "--out", tmp_path / "a", "--overwrite")
    assert files_of(tmp_path / "a") == b
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a prepared data folder"):
        run(*args, "--out", tmp_path / "mine", "--overwrite")

    meta = load_meta(tmp_path / "a")
    assert meta["splits"]["test"]["examples"] == 30 and meta["dtype"] == "uint16" and meta["task"] == "math"
    prompts = read_prompts(tmp_path / "a" / "test_prompts.jsonl")
    assert len(prompts) == 30 and prompts[0]["prompt"].startswith("Question: ")
    assert prompts[0]["prompt"].endswith("\nAnswer:\n") and prompts[0]["answer"].isdigit()
    tokenizer = load_tokenizer(tmp_path / "a" / "tokenizer")
    check_tokenizer(meta, tokenizer, tmp_path / "a")
    # the token files hold exactly prompt + solution + eos, the loss mask covers solution + eos
    data = TokenData(tmp_path / "a")
    toks, loss_weight, index = data.tokens("test"), data.loss_weight("test"), data.index("test")
    s, n_prompt, n = index[0]
    assert tokenizer.decode(toks[s:s + n_prompt]) == prompts[0]["prompt"]
    answer = tokenizer.decode(toks[s + n_prompt:s + n - 1])
    assert toks[s + n - 1] == tokenizer.eos_id and score(answer, prompts[0]["answer"]) and answer.startswith(
        tuple("0123456789"))
    assert loss_weight[s:s + n_prompt].sum() == 0 and loss_weight[s + n_prompt:s + n].all()
    assert index[-1, 0] + index[-1, 2] == len(toks)


def test_get_batch_shapes_alignment_determinism(tmp_path):
    run("synthmath", "--n_train", 200, "--n_val", 10, "--n_test", 10, "--out", tmp_path / "d")
    data = TokenData(tmp_path / "d")
    toks, loss_weight = np.asarray(data.tokens("train")), np.asarray(data.loss_weight("train"))
    for align in (False, True):
        g = torch.Generator().manual_seed(0)
        idx, m = data.get_batch("train", 8, 64, generator=g, align=align)
        assert idx.shape == m.shape == (8, 65) and idx.dtype == torch.int64 and m.dtype == torch.float32
        for row in range(8):   # find the window again: the loss mask is the answer mask of the same tokens
            s = toks.tobytes().find(idx[row].numpy().astype(toks.dtype).tobytes()) // toks.itemsize
            assert (toks[s:s + 65] == idx[row].numpy()).all() and (loss_weight[s:s + 65] == m[row].numpy()).all()
        if align:
            assert (m[:, 1] == 0).all()   # an example's first target is a prompt token
        g2 = torch.Generator().manual_seed(0)
        idx2, m2 = data.get_batch("train", 8, 64, generator=g2, align=align)
        assert torch.equal(idx, idx2) and torch.equal(m, m2)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        data.get_batch("val", 1, 10 ** 6)


def test_check_tokenizer_mismatch(tmp_path):
    run("synthmath", "--n_train", 50, "--n_val", 5, "--n_test", 5, "--out", tmp_path / "d")
    meta = load_meta(tmp_path / "d")
    other = CharTokenizer(["<|endoftext|>", "\n", *(chr(c) for c in range(126, 31, -1))])  # same size, other ids
    with pytest.raises(ValueError, match=r"meta.json: the data was tokenized with 'chars'.*prepare the data again"):
        check_tokenizer(meta, other, tmp_path / "d")
    # appending a special token (Paper A's mask) keeps the data valid, and survives save/load
    grown = CharTokenizer()
    assert grown.add_special("<|mask|>") == 97 and grown.encode("1<|mask|>", specials=True) == [19, 97]
    grown.save(tmp_path / "tokenizer")
    check_tokenizer(meta, CharTokenizer.load(tmp_path / "tokenizer"), tmp_path / "d")
    # a larger vocabulary that is not explained by specials is refused
    bigger = CharTokenizer([*CharTokenizer().tokens, "\t"])
    with pytest.raises(ValueError, match="tokenized with"):
        check_tokenizer(meta, bigger, tmp_path / "d")


# ----------------------------------------------------------------------------------------------------------------
# readers

def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_gsm8k_and_metamathqa(tmp_path):
    g = write_lines(tmp_path / "g.jsonl", [
        json.dumps({"question": "Natalia sold 48 clips. How many?", "answer": "48/2 = <<48/2=24>>24\n#### 1,024"}),
        "",
        json.dumps({"question": "Q2?", "answer": "2+2=<<2+2=4>>4\n#### 4"})])
    ex, skipped = read_examples(g, "gsm8k")
    assert skipped == 0 and [e.gold for e in ex] == ["1024", "4"]
    assert ex[0].answer == "48/2 = 24\n#### 1,024" and ex[0].prompt.startswith("Natalia")
    m = write_lines(tmp_path / "m.jsonl", [
        json.dumps({"query": "What is 2+3?", "response": "2+3=5.\nThe answer is: 5"}),
        json.dumps({"query": "x?", "response": "no final line"})])
    ex, _ = read_examples(m, "metamathqa")
    assert [e.gold for e in ex] == ["5", None]


@pytest.mark.parametrize("bad, problem", [
    ('{"question": "Q?", "answer": "#### 3"', "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"question": "Q?"}', "missing field 'answer'"),
    ('{"question": 3, "answer": "#### 3"}', "field 'question' is not a non-empty string"),
    ('{"question": "Q?", "answer": "3"}', "GSM8K answer has no '#### <answer>' line"),
])
def test_read_jsonl_malformed_lines(tmp_path, bad, problem):
    good = json.dumps({"question": "Q?", "answer": "#### 3"})
    f = write_lines(tmp_path / "bad.jsonl", [good, good, bad, good])
    with pytest.raises(ValueError, match=re.escape(f"{f}:3: {problem}")):
        read_examples(f, "gsm8k")
    ex, skipped = read_examples(f, "gsm8k", skip_bad=True)
    assert len(ex) == 3 and skipped == 1


def test_read_field_formats_and_text(tmp_path):
    f = write_lines(tmp_path / "f.jsonl", [json.dumps({"q": f"question {i}", "a": f"answer {i}", "t": f"doc {i}"})
                                           for i in range(5)])
    ex, _ = read_examples(f, "field", prompt_field="q", answer_field="a")
    assert ex[2].prompt == "question 2" and ex[2].answer == "answer 2" and ex[2].gold is None
    ex, _ = read_examples(f, "field", field="t")
    assert ex[4].prompt == "" and ex[4].answer == "doc 4"
    with pytest.raises(ValueError, match="needs either --field"):
        read_examples(f, "field", field="t", prompt_field="q")
    (tmp_path / "t.txt").write_text("hello world\n")
    assert read_text(tmp_path / "t.txt")[0].answer == "hello world\n"
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(ValueError, match="e.txt: the file is empty"):
        read_text(tmp_path / "e.txt")
    (tmp_path / "b.txt").write_bytes(b"ok\xff\xfe")
    with pytest.raises(ValueError, match="b.txt: not UTF-8"):
        read_text(tmp_path / "b.txt")


def test_prepare_jsonl_and_text(tmp_path):
    f = write_lines(tmp_path / "qa.jsonl", [json.dumps({"q": f"What is {i} + 1?", "a": f"It is {i + 1}."})
                                            for i in range(40)] + [json.dumps({"q": "What is 0 + 1?", "a": "dup"})])
    run("jsonl", "--file", f, "--format", "field", "--prompt_field", "q", "--answer_field", "a",
        "--tokenizer", "chars", "--n_val", 5, "--n_test", 5, "--out", tmp_path / "qa")
    meta = load_meta(tmp_path / "qa")
    assert {k: v["examples"] for k, v in meta["splits"].items()} == {"val": 5, "test": 5, "train": 30}
    prompts = {s: {p["prompt"] for p in read_prompts(tmp_path / "qa" / f"{s}_prompts.jsonl")}
               for s in ("val", "test", "train")}
    assert not (prompts["val"] & prompts["test"]) and not (prompts["train"] & (prompts["val"] | prompts["test"]))
    assert all(p.startswith("Question: What is") for p in prompts["test"])

    empty = write_lines(tmp_path / "empty.jsonl", ["{oops", ""])
    with pytest.raises(ValueError, match="no examples read"):
        run("jsonl", "--file", empty, "--format", "gsm8k", "--tokenizer", "chars", "--skip_bad", "--out",
            tmp_path / "e")
    assert not os.path.exists(tmp_path / "e")

    (tmp_path / "t.txt").write_text("abcdefghij" * 100)
    run("text", "--file", tmp_path / "t.txt", "--val_frac", 0.1, "--out", tmp_path / "t")
    data = TokenData(tmp_path / "t")
    assert len(data.tokens("train")) == 901 and len(data.tokens("val")) == 100 and data.loss_weight("train") is None
    _, m = data.get_batch("val", 2, 16, generator=torch.Generator().manual_seed(0))
    assert m.shape == (2, 17) and bool((m == 1).all())
    (tmp_path / "u.txt").write_text("caf\u00e9")
    with pytest.raises(ValueError, match=r"u.txt: CharTokenizer: character 'é'"):
        run("text", "--file", tmp_path / "u.txt", "--out", tmp_path / "u")


def test_prepare_refuses_a_question_holding_a_special_token(tmp_path):
    """Its prompts-file text would turn it into a control token when bench reads it back (specials=True)."""
    f = write_lines(tmp_path / "qa.jsonl", [json.dumps({"q": f"What is {i}?", "a": "x"}) for i in range(9)]
                    + [json.dumps({"q": "Say <|endoftext|> now", "a": "no"})])
    with pytest.raises(ValueError, match=r"qa.jsonl: example 'Say <\|endoftext\|> now': the text holds the "
                                         r"special token '<\|endoftext\|>', which the prompts file could not"):
        run("jsonl", "--file", f, "--format", "field", "--prompt_field", "q", "--answer_field", "a",
            "--tokenizer", "chars", "--n_val", 1, "--n_test", 1, "--out", tmp_path / "qa")
    assert not os.path.exists(tmp_path / "qa")


def test_old_or_damaged_folders_and_prompts_name_the_file(tmp_path):
    run("synthmath", "--n_train", 20, "--n_val", 2, "--n_test", 2, "--out", tmp_path / "d")
    meta_file = tmp_path / "d" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "format": "nanomtp-data-1"}))
    with pytest.raises(ValueError, match=r"meta.json: data format 'nanomtp-data-1', this code reads "
                                         r"'nanomtp-data-2'; prepare the folder again"):
        load_meta(tmp_path / "d")
    with open(tmp_path / "d" / "test_prompts.jsonl", "a") as f:
        f.write("{oops\n")
    with pytest.raises(ValueError, match=r"test_prompts.jsonl:3: not valid JSON"):
        read_prompts(tmp_path / "d" / "test_prompts.jsonl")
