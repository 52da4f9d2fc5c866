"""How degenerate the models' greedy text is: the share of greedy outputs (128 characters after 50
held-out prompts) whose last 64 characters repeat with a period of at most 16.

    python results/paperb_scratch/loops.py chat_beta0 chat_beta1 ... > loops.txt

A run is a folder out/paperb/TEXT_NAME; its prompts are data/paperb_texts/TEXT_prompts.jsonl.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import decode  # noqa: E402
from load import load  # noqa: E402
from prompts import read_prompts  # noqa: E402


def period(s, longest=16):
    """The shortest period k <= longest of s, or 0."""
    return next((k for k in range(1, longest + 1) if s[k:] == s[:-k]), 0)


def greedy_tails(run, prompts_file, n):
    """The last 64 characters of the greedy outputs (128 new characters) of the model in folder
    `run` after the first n prompts of prompts_file."""
    prompts = read_prompts(prompts_file)[:n]
    model, tokenizer = load(run)
    outs = decode.generate(model, [tokenizer.encode(p["prompt"]) for p in prompts], 128)
    return [tokenizer.decode(o)[-64:] for o in outs]


def main(runs):
    for run in runs:
        text = run.split("_")[0]
        tails = greedy_tails(f"out/paperb/{run}", f"data/paperb_texts/{text}_prompts.jsonl", 50)
        print(f"{run}: {sum(period(t) > 0 for t in tails)}/50 end in a loop; "
              f"first: {tails[0][-40:]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
