"""Where a decoding step's time goes on a GPU: the kernels inside one `ar` and one `mtp@3` step (by
CUDA time), a graph replay alone, a replay with its host read-back, the strategy's whole step, and a
bare forward of the same weights (the probe's layout: static cache, one graph). Random weights of
the bundled model's shape: timing does not depend on the values.

    python results/engine/profile_step.py [--compile] [--steps 200]
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from decode import DECODE_ATTENTION, generate, make_strategy  # noqa: E402
from engine import Graph  # noqa: E402
from model import Config, Transformer  # noqa: E402


def timed(fn, n):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def kernels(fn, top=12):
    """The CUDA kernels fn launches, by total time: (count, ms, table)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events) / 1e3
    count = sum(e.count for e in events)
    rows = sorted(events, key=lambda e: -e.self_device_time_total)[:top]
    table = [(e.key[:70], e.count, round(e.self_device_time_total / 1e3, 3)) for e in rows]
    return count, round(total, 3), table


def bare(model, S=1024):
    """The probe's forward on the model's weights: (tokens, positions) -> logits."""
    cfg, dt = model.cfg, model.embed.weight.dtype
    H, Hk, hd, d = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_embd
    kc = torch.zeros(cfg.n_layer, 1, Hk, S, hd, device="cuda", dtype=dt)
    vc = torch.zeros_like(kc)
    causal = torch.ones(S, S, dtype=torch.bool, device="cuda").tril()
    cos = torch.randn(S, hd, device="cuda", dtype=dt)
    sin = torch.randn(S, hd, device="cuda", dtype=dt)

    def rms(x, w):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(dt) * w

    def rot(x, c, s):
        x1, x2 = x.chunk(2, -1)
        return x * c + torch.cat([-x2, x1], -1) * s

    def forward(tok, pos):
        T = tok.shape[1]
        x = F.embedding(tok, model.embed.weight)
        c, s, m = cos[pos], sin[pos], causal[pos][None, None]
        for i, b in enumerate(model.blocks):
            a = b.attn
            h = rms(x, b.attn_norm.weight)
            q = (h @ a.q_proj.weight.T).view(1, T, H, hd).transpose(1, 2)
            k = (h @ a.k_proj.weight.T).view(1, T, Hk, hd).transpose(1, 2)
            v = (h @ a.v_proj.weight.T).view(1, T, Hk, hd).transpose(1, 2)
            q, k = rot(q, c, s), rot(k, c, s)
            kc[i].index_copy_(2, pos, k)
            vc[i].index_copy_(2, pos, v)
            o = F.scaled_dot_product_attention(q, kc[i], vc[i], attn_mask=m, enable_gqa=True)
            x = x + o.transpose(1, 2).reshape(1, T, d) @ a.o_proj.weight.T
            h = rms(x, b.mlp_norm.weight)
            mlp = b.mlp
            x = x + (F.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
        return rms(x, model.norm.weight) @ model.embed.weight.T
    return forward


def attention_variants(S=320, steps=100):
    """ms per SDPA call of one layer's decode attention (9 query heads in 3 groups, head_dim 64,
    S cache slots) for the ways the mask and the groups can be handed over."""
    out = {}
    for T in (1, 4):
        q = torch.randn(1, 3, 3 * T, 64, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 3, S, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        vis = torch.rand(1, 1, 3 * T, S, device="cuda") < 0.9
        add = torch.zeros(vis.shape, device="cuda", dtype=torch.bfloat16).masked_fill(~vis, float("-inf"))
        q9 = torch.randn(1, 9, T, 64, device="cuda", dtype=torch.bfloat16)
        vis9 = vis[:, :, :T]
        cases = {"folded_bool": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=vis),
                 "folded_float": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=add),
                 "gqa_bool": lambda: F.scaled_dot_product_attention(q9, k, v, attn_mask=vis9, enable_gqa=True)}
        for name, fn in cases.items():
            for backends, tag in ((DECODE_ATTENTION, "ours"), (None, "all")):
                def many():
                    for _ in range(steps):
                        fn()
                try:
                    if backends is None:
                        many()
                        ms = kernels(many)[1]
                    else:
                        with sdpa_kernel(backends):
                            many()
                            ms = kernels(many)[1]
                    # GPU time per call in microseconds (launch overhead left out)
                    out[f"T{T}_{name}_{tag}"] = round(ms * 1e3 / steps, 2)
                except RuntimeError as e:
                    out[f"T{T}_{name}_{tag}"] = str(e)[:80]
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    torch.manual_seed(0)
    model = Transformer(Config(n_mtp_heads=3)).cuda().to(torch.bfloat16).eval()
    res = {"device": torch.cuda.get_device_name(), "compile": args.compile}
    prompt = torch.randint(0, 49152, (60,)).tolist()
    with torch.no_grad(), sdpa_kernel(DECODE_ATTENTION):
        for method in ("ar", "mtp@3"):
            s = make_strategy(model, method, 60 + 2 * args.steps, compile=args.compile)
            s.prefill([prompt])
            graph = s.next if method == "ar" else s.greedy_steps[3]
            eager = graph.fn
            graph()                                    # capture
            r = {"eager_kernels": kernels(eager)}
            r["replay_ms"] = timed(lambda: graph(), args.steps)
            r["replay_readback_ms"] = timed(lambda: graph().tolist(), args.steps)
            s.prefill([prompt])
            # the step and its read-back, waited for (the code before Pending returned lists)
            r["step_ms"] = timed(lambda: getattr(s.step([True]), "result", list)(), args.steps)
            s.prefill([prompt])
            new = 128
            ms = timed(lambda: generate(model, [prompt], new, method=s), 3)
            r["generate_tok_s"] = new / ms * 1e3
            t0 = time.perf_counter()
            s.prefill([prompt])
            torch.cuda.synchronize()
            r["prefill_ms"] = (time.perf_counter() - t0) * 1e3
            r["prefill_kernels"] = kernels(lambda: s.prefill([prompt]), top=6)
            res[method] = r
        fwd = bare(model)
        if args.compile:
            fwd = torch.compile(fwd, fullgraph=True)
        tok = torch.zeros(1, 1, dtype=torch.long, device="cuda")
        pos = torch.full((1,), 300, device="cuda")
        g = Graph(lambda: fwd(tok, pos), True)
        g()
        res["bare"] = {"eager_kernels": kernels(lambda: fwd(tok, pos)),
                       "replay_ms": timed(g, args.steps)}
    res["attention_us"] = attention_variants()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
