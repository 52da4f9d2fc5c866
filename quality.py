"""
How good a decoding's output is, beside how fast: its mean per-token NLL under the original model
(`output_nll`, judged by the model `nll_judge` picks), and task accuracy with its Wilson interval
where prompts carry numeric answers (`numeric`, `wilson`). bench.py reports them per method.
"""

import math
import sys
from pathlib import Path

import torch

import load
from files import read_json


@torch.no_grad()
def output_nll(model, prompts, outs):
    """Mean per-token NLL of the outputs under `model`, one forward of prompt + output each, no
    cache."""
    total, count, device = 0.0, 0, model.embed.weight.device
    for ids, out in zip(prompts, outs):
        logits = model(torch.tensor([ids + out], device=device))[0, len(ids) - 1:-1].float()
        target = torch.tensor(out, device=device)[:, None]
        total -= torch.log_softmax(logits, -1).gather(-1, target).sum().item()
        count += len(out)
    return total / count if count else None


def nll_judge(source, model, device, dtype):
    """The model whose NLL judges the outputs of `model` (loaded from `source`): `model` itself
    where its next-token predictions are the original's (heads and gated adapters leave them
    alone), else `source` without its ungated adapter, or the model a fully fine-tuned mask-token
    checkpoint started from; None where that one is missing (with a warning: the metric is then
    nll_self)."""
    if not model.cfg.mask_token_ids or model.cfg.lora_gated:
        return model
    config = Path(source) / "config.json"    # read, not loaded: a checkpoint's own config says it
    meta = read_json(config) if config.is_file() else {}
    if meta.get("model", {}).get("mask_token_ids"):   # ungated: training moved its predictions
        start = meta.get("train_args", {}).get("init_from")
        if start and (start == load.BUNDLED or Path(start).exists()):
            return load.load(start, device, dtype)[0]
        print(f"warning: {source} was fine-tuned from {start!r}, which is not here: output NLL "
              f"will be measured under the fine-tuned model itself and labelled nll_self",
              file=sys.stderr)
        return None
    return load.load(source, device, dtype)[0]    # the base, without the attached adapter


def wilson(successes, n, z=1.96):
    """The Wilson score interval (95% for z=1.96) of a proportion: unlike p +- z sqrt(p(1-p)/n) it
    stays inside [0, 1] and is not empty at 0/n or n/n, where accuracies near 100% live."""
    if n == 0:
        return None
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def numeric(answer):
    """Accuracy needs a number to compare with; chat data's "answer" is a reference text instead."""
    try:
        return answer is not None and math.isfinite(float(str(answer).replace(",", "")))
    except ValueError:
        return False
