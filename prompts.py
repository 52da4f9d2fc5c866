"""
Prompts files and prompt encoding, shared by bench.py (measurement) and train.py (validation
answers).

- `read_prompts`: the rows of a JSONL prompts file, each {"prompt": text, "answer": anything}.
- `encode_prompt`: a prompt's token ids, in the chat template unless it already is.
"""

import json

from tokenizer import CHATML_START


def encode_prompt(tokenizer, text):
    """A prompt that data/prepare.py wrote is already in the chat template (its control tokens are
    read as such); a plain message (data/chat_prompts.jsonl, the built-in questions) is put into the
    template here, as user text."""
    if text.startswith(CHATML_START):
        return tokenizer.encode(text, specials=True)
    return tokenizer.encode_chat(text) if tokenizer.has_chat else tokenizer.encode(text)


def read_prompts(path):
    """The rows of a prompts file, each {"prompt": text, "answer": anything}; a malformed line is a
    ValueError that names file:line."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON object ({e.msg})")
                if not isinstance(row, dict) or "prompt" not in row:
                    raise ValueError(f'{path}:{n}: expected an object with a "prompt" field')
                if not isinstance(row["prompt"], str) or not row["prompt"]:
                    raise ValueError(f'{path}:{n}: "prompt" must be a non-empty string')
                rows.append(row)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})")
    if not rows:
        raise ValueError(f"{path}: holds no prompts")
    return rows
