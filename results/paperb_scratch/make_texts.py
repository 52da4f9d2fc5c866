"""
The two texts of the from-scratch MTP / MTP-D comparison, as ASCII files for `data/prepare.py text
--tokenizer chars`, and for each a prompts JSONL of held-out text prefixes for bench.py.

  chat:   the answers of the self-generated chat corpus (data/chat): train and val answers to the
          text file (val last: prepare.py's --val_frac cut is val answers), test answers as prompts;
  stdlib: the Python standard library's .py sources; every HOLDOUT-th file (sorted paths) is held
          out for prompts.

    python results/paperb_scratch/make_texts.py --chat data/chat --out data/paperb_texts
"""

import argparse
import json
import os
import random
import sysconfig

PREFIX_CHARS = 192         # prompt length: context for the model, short against seq_len 256
MIN_CHARS = 448            # a held-out text shorter than a prefix and a continuation is skipped
HOLDOUT = 20               # stdlib: one file in HOLDOUT is held out
STDLIB_CHARS = 24_000_000  # cap of the stdlib training text: more than the runs can read


def ascii_text(s):
    """What the chars tokenizer holds: newline and printable ASCII (a tab becomes 4 spaces, the
    rest is dropped)."""
    s = s.replace("\t", "    ").replace("\r", "")
    return "".join(c for c in s if c == "\n" or 32 <= ord(c) < 127)


def stdlib_sources():
    """The ASCII text of every .py file of this Python's standard library, in sorted path order."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names
                   if n.endswith(".py") and "site-packages" not in d)
    texts = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(ascii_text(f.read()))
    return texts


def answers(path):
    with open(path, encoding="utf-8") as f:
        return [ascii_text(json.loads(line)["answer"]).strip() for line in f if line.strip()]


def write_prompts(path, texts, n, seed, anywhere=False):
    """A prompt is the start of a text, or with anywhere of a random line of it (a source file's
    first lines are mostly its licence and imports)."""
    rng = random.Random(seed)
    texts = [t for t in texts if len(t) >= MIN_CHARS]
    rng.shuffle(texts)
    with open(path, "w") as f:
        for t in texts[:n]:
            if anywhere:
                starts = [0] + [i + 1 for i, c in enumerate(t[:-MIN_CHARS]) if c == "\n"]
                t = t[rng.choice(starts):]
            row = {"prompt": t[:PREFIX_CHARS], "answer": t[PREFIX_CHARS:MIN_CHARS]}
            f.write(json.dumps(row) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chat", default="data/chat", help="prepared chat folder (its *_prompts.jsonl)")
    p.add_argument("--out", default="data/paperb_texts", help="folder of the texts and prompts")
    p.add_argument("--n_prompts", type=int, default=200, help="held-out prompts per text")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)

    chat = answers(f"{args.chat}/train_prompts.jsonl") + answers(f"{args.chat}/val_prompts.jsonl")
    with open(f"{args.out}/chat.txt", "w") as f:
        f.write("\n\n".join(chat))
    test = answers(f"{args.chat}/test_prompts.jsonl")
    write_prompts(f"{args.out}/chat_prompts.jsonl", test, args.n_prompts, 0)

    texts = stdlib_sources()
    train = [t for i, t in enumerate(texts) if i % HOLDOUT]
    with open(f"{args.out}/stdlib.txt", "w") as f:
        f.write("\n\n".join(train)[:STDLIB_CHARS])
    write_prompts(f"{args.out}/stdlib_prompts.jsonl", texts[::HOLDOUT], args.n_prompts, 0,
                  anywhere=True)


if __name__ == "__main__":
    main()
