"""
Per-depth acceptance of greedy mtp@D on held-out prompts, counted prompt by prompt, with 95%
bootstrap intervals over prompts: for each run, and for the paired difference of each run from the
first (the same resampled prompts for both).

    python results/paperb_scratch/bootstrap.py --prompts data/paperb_texts/chat_prompts.jsonl \\
        --runs beta0=out/paperb/chat_beta0,beta1=out/paperb/chat_beta1 \
        --out results/paperb_scratch/chat.json

Decoding is bench.py's (decode.generate, batch 1; float32 on the CPU unless --device/--dtype say
otherwise, e.g. cuda bfloat16: acceptance counts need no bit-exactness). A prompt is a chat message
put into the tokenizer's chat template (prompts.encode_prompt), or with --raw plain text encoded as
it is (source code to continue). A rate is pooled over
prompts (accepted drafts / checked drafts, as decode.Stats), so a resample weighs each prompt by its
steps. A difference is called significant when its 95% interval leaves out 0.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import decode  # noqa: E402
from load import load  # noqa: E402
from prompts import encode_prompt, read_prompts  # noqa: E402


def counts(path, prompts, method, max_new_tokens, device, dtype, raw):
    """(prompts, 2 D + 2) counts: checked drafts per depth, accepted drafts per depth, tokens and
    forwards (without the prefill forward and its token, as decode.Stats.tokens_per_forward)."""
    model, tokenizer = load(path, device, getattr(torch, dtype))
    depth = decode.Method.parse(method).k
    ids = [tokenizer.encode(row["prompt"]) if raw else encode_prompt(tokenizer, row["prompt"])
           for row in prompts]
    rows = []
    for _, s in decoded(model, ids, method, max_new_tokens, tokenizer.stop_ids):
        checked, accepted = (s.proposed + [0] * depth)[:depth], (s.accepted + [0] * depth)[:depth]
        rows.append(checked + accepted + [s.tokens - s.prefill_tokens, s.forwards - s.prefills])
    return np.array(rows, dtype=np.float64)


def decoded(model, ids, method, max_new_tokens, stop_ids, **options):
    """Each prompt (token ids) decoded alone with `method`, as bench.py decodes: batch 1, one
    strategy for all prompts, so its buffers and CUDA graphs are built once. options: make_strategy's
    (mask_ids, k_max, ...). Yields (output tokens, the prompt's decode.Stats)."""
    strategy = decode.make_strategy(model, method, max(map(len, ids)) + max_new_tokens, **options)
    for p in ids:
        s = decode.Stats()
        out = decode.generate(model, [p], max_new_tokens, stop_ids=stop_ids, method=strategy,
                              stats=s)[0]
        yield out, s


def rates(c, depth):
    """Per-depth acceptance AR_d and tokens per forward from summed counts (..., 2 D + 2)."""
    ar = c[..., depth:2 * depth] / np.maximum(c[..., :depth], 1)
    return np.concatenate([ar, (c[..., -2] / np.maximum(c[..., -1], 1))[..., None]], -1)


def ci95(samples):
    """Percentile interval of bootstrap samples (resamples, K): K [low, high] pairs."""
    return np.percentile(samples, [2.5, 97.5], axis=0).T.tolist()


def compare(counts_by_run, rate, labels, resamples):
    """Each run's rate(summed per-prompt counts) with its 95% bootstrap interval over prompts, and
    each run's paired difference from the first run (the same resampled prompts for both), printed
    as a table. Returns {"rate": {run: ...}, "diff": {"run-first": ...}}, JSON-ready."""
    n = len(next(iter(counts_by_run.values())))
    pick = np.random.default_rng(0).integers(0, n, (resamples, n))
    boot = {name: rate(v[pick].sum(1)) for name, v in counts_by_run.items()}   # (resamples, K)
    point = {name: rate(v.sum(0)) for name, v in counts_by_run.items()}
    result = {"rate": {}, "diff": {}}
    print(f"{'':<14}" + "".join(f"{label:>23}" for label in labels))
    for name in counts_by_run:
        result["rate"][name] = {"value": point[name].tolist(), "ci95": ci95(boot[name])}
        print(f"{name:<14}" + "".join(f"{v:>8.3f} [{lo:.3f}, {hi:.3f}]"
                                      for v, (lo, hi) in zip(point[name], ci95(boot[name]))))
    first = next(iter(counts_by_run))
    for name in list(counts_by_run)[1:]:
        diff, bounds = point[name] - point[first], ci95(boot[name] - boot[first])
        significant = [lo > 0 or hi < 0 for lo, hi in bounds]
        result["diff"][f"{name}-{first}"] = {"value": diff.tolist(), "ci95": bounds,
                                             "significant": significant}
        print(f"{name + '-' + first:<14}" + "".join(
            f"{v:>+7.3f}{'*' if s else ' '}[{lo:+.3f},{hi:+.3f}]"
            for v, (lo, hi), s in zip(diff, bounds, significant)))
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", required=True, help='JSONL of {"prompt": text}: held-out prefixes')
    p.add_argument("--runs", required=True, help="NAME=CHECKPOINT,...; differences from the first")
    p.add_argument("--method", default="mtp@4")
    p.add_argument("--num_prompts", type=int, default=200)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--raw", action="store_true", help="prompts are plain text, not chat messages")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", required=True, help="JSON file of the results")
    args = p.parse_args()
    prompts = read_prompts(args.prompts)[:args.num_prompts]
    runs = dict(r.split("=", 1) for r in args.runs.split(","))
    depth = decode.Method.parse(args.method).k
    c = {name: counts(path, prompts, args.method, args.max_new_tokens, args.device, args.dtype,
                      args.raw) for name, path in runs.items()}
    labels = [f"AR{d}" for d in range(1, depth + 1)] + ["tok/fwd"]
    result = {"prompts": args.prompts, "n_prompts": len(prompts), "method": args.method,
              "max_new_tokens": args.max_new_tokens, "raw": args.raw, "device": args.device,
              "dtype": args.dtype, "labels": labels, "runs": runs,
              **compare(c, lambda x: rates(x, depth), labels, args.resamples)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
