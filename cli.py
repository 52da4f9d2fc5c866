"""
The one argument kit every command line shares (decode.py, bench.py, train.py, data/prepare.py).

- `Parser`: argparse with each default in --help and every usage error as one line.
- `fail`: an expected error (bad option, missing or malformed file): `error: ...` on stderr, exit 2.
- Argument types: `number`, `device_arg`, `existing_file`, `file_list`.
- `add_model_args`: the options decode.py and bench.py share; `render`: output marked by provenance.
"""

import argparse
import math
import sys
from pathlib import Path

import torch

from load import BUNDLED, DRAFT_VOCAB


def fail(message):
    """An expected error: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """argparse with the defaults in --help (unless the help text explains it, or it is None or a
    flag) and every usage error as one line."""

    def add_argument(self, *names, **kwargs):
        default, text = kwargs.get("default"), kwargs.get("help")
        if text and "default" not in text and all(default is not x for x in (None, False,
                                                                            argparse.SUPPRESS)):
            kwargs["help"] = text + " (default: %(default)s)"
        return super().add_argument(*names, **kwargs)

    def error(self, message):
        fail(message)


def number(kind, low, high=None, low_open=False):
    """An argparse type: a `kind` (int or float) in [low, high], or in (low, high] with low_open."""
    def check(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected "
                                             f"{'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}")
        above = value > low if low_open else value >= low
        if not (above and (high is None or value <= high)):   # NaN fails every comparison
            allowed = (f"in {'(' if low_open else '['}{low}, {high}]" if high is not None else
                       f"{'above' if low_open else 'at least'} {low}")
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        if not math.isfinite(value):        # inf passes a bound that is only below
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        return value
    return check


def device_arg(text):
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (expected cpu, cuda or cuda:N)")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r} (expected cpu, cuda or "
                                         f"cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine (use "
                                         f"--device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} "
                                         f"CUDA device(s)")
    return text


def existing_file(text):
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a directory, not a file")
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return Path(text)


def file_list(text):
    return [existing_file(f) for f in text.split(",")]


def source_arg(text):
    if not text:
        raise argparse.ArgumentTypeError("expected smollm2, a folder or a .gguf file, got nothing")
    return text


def add_model_args(p, max_new_tokens):
    """The options decode.py and bench.py share: what to load, where, and how long to decode."""
    p.add_argument("--init_from", type=source_arg, default=BUNDLED, help="smollm2, a Hugging Face "
                   "folder (GPT-2, Llama, Qwen2/2.5, Qwen3), a .gguf file (llama, qwen2, qwen3), "
                   "or a nanoMTP checkpoint folder")
    p.add_argument("--heads", type=file_list, default=None, help="MTP heads files for method mtp, "
                   "comma-separated, in training order (default: those shipped for --init_from)")
    p.add_argument("--adapter", type=existing_file, default=None, help="mask-token adapter file "
                   "for static, confadapt and verified (default: the one shipped for --init_from)")
    p.add_argument("--draft_vocab", type=number(int, 0), default=None, help="mtp drafts from the "
                   "N most frequent tokens the heads file lists; 0 = the full vocabulary (default: "
                   f"{DRAFT_VOCAB}, or all listed)")
    p.add_argument("--max_new_tokens", type=number(int, 1), default=max_new_tokens,
                   help="tokens to generate at most")
    p.add_argument("--temperature", type=number(float, 0), default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")
    p.add_argument("--device", type=device_arg,
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights and activations (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model's forward "
                   "before its CUDA graphs are captured (cuda only; about a minute of compilation "
                   "per step shape)")


# ANSI foreground: green, yellow, magenta, cyan, blue: 1..5+
COLOURS = ["32", "33", "35", "36", "34"]


def render(tokenizer, out, labels, lossy, colour):
    """The output with each token marked by how it was produced, and a one-line legend."""
    what = "kept mask prediction" if lossy else "accepted draft at depth"
    pieces, done = [], ""
    for i, d in enumerate(labels):
        text = tokenizer.decode(out[:i + 1])
        # a character split across tokens: shown next
        if text.endswith("\ufffd") and i + 1 < len(out):
            continue
        text, done = text[len(done):], text
        if d == 0:
            pieces.append(text)
        elif colour:
            pieces.append(f"\033[{COLOURS[min(d, len(COLOURS)) - 1]}m{text}\033[0m")
        else:
            pieces.append(f"[{d}:{text}]")
    if colour:
        key = " ".join(f"\033[{c}m{d}\033[0m" for d, c in zip(["1", "2", "3", "4", "5+"], COLOURS))
        legend = f"legend: plain = main model; colour = {what} {key}"
    else:
        legend = f"legend: plain = main model; [d:text] = {what} d"
    return "".join(pieces), legend
