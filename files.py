"""
Small helpers every module shares: reading a JSON file, and wording counts and lists in messages.
"""

import json
from pathlib import Path


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from e


def names(items, limit=8):
    """A short readable list for error messages."""
    items = sorted(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def plural(n, word):
    """'1 head', '2 heads', '2 processes', '1,024 tokens': a count for messages."""
    return f"{n:,} {word}{'' if n == 1 else 'es' if word.endswith('s') else 's'}"
