"""
Paper A's conversions compared problem by problem: accuracy and tokens per forward of one decoding
method for each converted model, with 95% bootstrap intervals over problems, and each model's paired
difference from the first (the same resampled problems for both). The Wilson intervals of
papera_table.md are per model; a paired interval says whether two models differ.

    python results/papera_cpu/paired.py --method confadapt@0.95 \\
        --runs gated=out/papera_cpu/gated,soft=out/papera_cpu/ablation_soft \\
        --out results/papera_cpu/paired_0.95.json

Decoding is bench.py's (decode.generate, batch 1, float32 on the CPU), scoring data/synthmath.py's;
each model decodes with its own mask tokens and k_max (load.load_for). Tokens per forward is pooled
over problems (generated tokens / forwards, the prefill left out, as decode.Stats), accuracy is the
share of problems solved.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "paperb_scratch"))

from bootstrap import compare, decoded  # noqa: E402
from data.synthmath import score  # noqa: E402
from load import load_for  # noqa: E402
from prompts import encode_prompt, read_prompts  # noqa: E402


def counts(path, rows, method, max_new_tokens):
    """(problems, 4) counts: 1, solved (0 or 1), generated tokens and forwards, prefill left out."""
    model, tokenizer, options = load_for(path)
    ids = [encode_prompt(tokenizer, row["prompt"]) for row in rows]
    out = []
    for row, (tokens, s) in zip(rows, decoded(model, ids, method, max_new_tokens,
                                              tokenizer.stop_ids, **options)):
        text = tokenizer.decode([t for t in tokens if t not in tokenizer.stop_ids])
        out.append([1, score(text, row["answer"]), s.tokens - s.prefill_tokens,
                    s.forwards - s.prefills])
    return np.array(out, dtype=np.float64)


def rates(c):
    """Accuracy and tokens per forward from summed counts (..., 4)."""
    return np.stack([c[..., 1] / c[..., 0], c[..., 2] / np.maximum(c[..., 3], 1)], -1)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", default="data/papera_synthmath/test_prompts.jsonl",
                   help='JSONL of {"prompt": text, "answer": number}')
    p.add_argument("--runs", required=True, help="NAME=CHECKPOINT,...; differences from the first")
    p.add_argument("--method", default="confadapt@0.95")
    p.add_argument("--num_prompts", type=int, default=512)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--out", required=True, help="JSON file of the results")
    args = p.parse_args()
    rows = read_prompts(args.prompts)[:args.num_prompts]
    runs = dict(r.split("=", 1) for r in args.runs.split(","))
    c = {name: counts(path, rows, args.method, args.max_new_tokens) for name, path in runs.items()}
    labels = ["accuracy", "tok/fwd"]
    result = {"prompts": args.prompts, "n_prompts": len(rows), "method": args.method,
              "max_new_tokens": args.max_new_tokens, "labels": labels, "runs": runs,
              **compare(c, rates, labels, args.resamples)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
