"""
The stdlib text of the frozen-model MTP / MTP-D comparison: the Python standard library's .py
sources (text SmolLM2 did not write), as one file for `data/prepare.py text --tokenizer smollm2`,
and a prompts JSONL of raw source excerpts from held-out files, one per file: every HOLDOUT-th file
of the sorted paths is held out. Non-ASCII is dropped and tabs become spaces, as in the
from-scratch half (results/paperb_scratch/make_texts.py).

    python results/paperb_frozen/make_texts.py --out data/paperb_frozen_texts
"""

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "paperb_scratch"))

from make_texts import STDLIB_CHARS, stdlib_sources  # noqa: E402

PREFIX_CHARS = 256         # prompt length: some context, short against seq_len 512
MIN_CHARS = 768            # a held-out file shorter than a prefix and a continuation is skipped
HOLDOUT = 10               # one file in HOLDOUT is held out: ~150 long enough for a prompt


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/paperb_frozen_texts", help="folder of text and prompts")
    p.add_argument("--n_prompts", type=int, default=100, help="held-out prompts")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    texts = stdlib_sources()
    train = [t for i, t in enumerate(texts) if i % HOLDOUT]
    with open(f"{args.out}/stdlib.txt", "w") as f:
        f.write("\n\n".join(train)[:STDLIB_CHARS])
    # a prompt starts at a random line of a held-out file (the first lines are mostly licence and
    # imports); raw text, not a chat message: bootstrap.py --raw encodes it without the template
    rng = random.Random(0)
    held = [t for t in texts[::HOLDOUT] if len(t) >= MIN_CHARS]
    rng.shuffle(held)
    with open(f"{args.out}/stdlib_prompts.jsonl", "w") as f:
        for t in held[:args.n_prompts]:
            starts = [0] + [i + 1 for i, c in enumerate(t[:-MIN_CHARS]) if c == "\n"]
            t = t[rng.choice(starts):]
            f.write(json.dumps({"prompt": t[:PREFIX_CHARS],
                                "answer": t[PREFIX_CHARS:MIN_CHARS]}) + "\n")
    print(f"{len(train)} training files, {len(held[:args.n_prompts])} prompts from "
          f"{len(texts[::HOLDOUT])} held-out files")


if __name__ == "__main__":
    main()
