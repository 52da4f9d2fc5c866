"""
Small helpers every module shares: reading JSON, JSONL and GGUF files with errors that name the
file, and wording counts and lists in messages.
"""

import json
from pathlib import Path

from tqdm import tqdm


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from e


def read_jsonl(path, parse=None, skip_bad=False, progress=False):
    """The JSON objects of a JSONL file, each passed through parse(where, row) where given; blank
    lines are ignored. A bad line (or one parse refuses with ValueError) raises a ValueError that
    names file:line; with skip_bad it is skipped and counted. Returns (rows, n_skipped)."""
    rows, skipped = [], 0
    # bytes, so that a bad encoding is reported with its line number too
    with open(path, "rb") as f:
        lines = tqdm(f, desc=f"reading {path}", unit=" lines", leave=False, disable=not progress)
        for lineno, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise ValueError(f"{where}: not UTF-8 ({e.reason})") from None
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
                rows.append(parse(where, row) if parse else row)
            except ValueError:
                if not skip_bad:
                    raise
                skipped += 1
    return rows, skipped


def text_field(where, row, key):
    """row[key], refused unless it is a non-empty string; where is the file:line of the row."""
    if key not in row:
        raise ValueError(f"{where}: missing field {key!r} (has {sorted(row)})")
    if not isinstance(row[key], str) or not row[key].strip():
        raise ValueError(f"{where}: field {key!r} is not a non-empty string")
    return row[key]


def names(items, limit=8):
    """A short readable list for error messages."""
    items = sorted(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def plural(n, word):
    """'1 head', '2 heads', '2 processes', '1,024 tokens': a count for messages."""
    return f"{n:,} {word}{'' if n == 1 else 'es' if word.endswith('s') else 's'}"


def open_gguf(path):
    """A GGUF file's reader (tokenizer.py and load.py read the same file)."""
    try:
        import gguf   # only GGUF sources need the package
        return gguf.GGUFReader(path)
    except Exception as e:   # the reader fails on damaged files with whatever numpy raises first
        raise ValueError(f"{path}: not a readable GGUF file, truncated or corrupt "
                         f"({type(e).__name__}: {e})") from e


REQUIRED = object()    # gguf_value without a default: a missing key is an error


def gguf_value(reader, key, path, default=REQUIRED):
    field = reader.fields.get(key)
    if field is None:
        if default is REQUIRED:
            raise ValueError(f"{path}: GGUF key {key} is missing")
        return default
    return field.contents()
