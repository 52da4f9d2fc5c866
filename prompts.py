"""
Prompts files and prompt encoding, shared by bench.py (measurement) and train.py (validation
answers).

- `read_prompts`: the rows of a JSONL prompts file, each {"prompt": text, "answer": anything}.
- `encode_prompt`: a prompt's token ids, in the chat template unless it already is.
"""

from chat import CHATML_START
from files import read_jsonl, text_field


def encode_prompt(tokenizer, text):
    """A prompt that data/prepare.py wrote is already in the chat template (its control tokens are
    read as such); a plain message (data/chat_prompts.jsonl, the built-in questions) is put into the
    template here, as user text."""
    if text.startswith(CHATML_START):
        return tokenizer.encode(text, specials=True)
    return tokenizer.encode_chat(text) if tokenizer.has_chat else tokenizer.encode(text)


def _checked_prompt(where, row):
    text_field(where, row, "prompt")
    return row


def read_prompts(path):
    """The rows of a prompts file, each {"prompt": text, "answer": anything}; a malformed line is a
    ValueError that names file:line."""
    rows, _ = read_jsonl(path, _checked_prompt)
    if not rows:
        raise ValueError(f"{path}: holds no prompts")
    return rows
