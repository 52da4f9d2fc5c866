"""
Measurement: every decoding method side by side, in one process, on the same prompts, after warm-up.

For each method: tokens/s (generated tokens / wall time of generate, prefill included, device synchronised),
speedup (tokens/s over `ar`'s from the same run), tokens per forward, per-depth acceptance AR_d and cumulative CAR_d
(decode.Stats; definitions in DESIGN.md "Metrics"), exact match against plain greedy `ar`, mean per-token NLL of the
output under the original model (the main model without heads or adapters; one no-cache forward of prompt + output),
task accuracy where the prompts carry numeric answers (data/synthmath.py's scorer), and time to first token (a
prefill-only call, timed apart). Every prompt is decoded alone (batch 1), ar included.
Lossy methods (static@K, confadapt@TAU) are labelled LOSSY. A table for people; with --json, one JSON object last.

What is not here: the decoding itself (decode.py), loading (load.py), training (train.py).

    python bench.py --init_from smollm2 --heads checkpoints/smollm2_heads.safetensors --methods ar,mtp@1,mtp@3
    python bench.py --init_from out/synthmath_mask --prompts data/synthmath/test_prompts.jsonl --sweep --taus 0.6,0.9
    python bench.py --tiny --methods ar,mtp@2,static@3,verified@3      # a random model, no weights: a smoke test

The programmatic entry point is `run(model, tok, methods, prompts, ...) -> dict`; the CLI wraps it.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

import decode

LOSSY = {"static", "confadapt"}
METHOD_OPTIONS = {"ar": (), "mtp": ("schedule", "draft_vocab"), "static": ("mask_ids",),   # generate() options
                  "confadapt": ("mask_ids", "k_max"), "verified": ("mask_ids",)}       # each method reads
QUESTIONS = [  # short held-out chat questions (not in data/'s chat prompts)
    "Explain why the sky is blue.", "Write a haiku about autumn.", "What are three benefits of exercise?",
    "How does a refrigerator keep food cold?", "Give me a tip for learning a new language.",
    "What is the difference between weather and climate?", "Describe a cat to someone who has never seen one.",
    "Why do we have seasons?", "Suggest a name for a small bakery.", "What is photosynthesis?",
    "How do I boil an egg?", "Write one sentence about the ocean.", "What causes rainbows?",
    "List three fruits that are high in vitamin C.", "Why is sleep important?", "What does a compiler do?",
]


# ----------------------------------------------------------------------------------------------------------------
# one run: every method on the same prompts

def timed(device, fn):
    """fn() and its wall time in seconds, the device synchronised before and after."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


@torch.no_grad()
def output_nll(model, prompts, outs):
    """Mean per-token NLL of the outputs under `model`, one forward of prompt + output each, no cache."""
    total, count, device = 0.0, 0, model.embed.weight.device
    for ids, out in zip(prompts, outs):
        if not out or max(out) >= model.cfg.vocab_size:      # a mask id the original model does not know
            continue
        logits = model(torch.tensor([ids + out], device=device))[0, len(ids) - 1:-1].float()
        target = torch.tensor(out, device=device)[:, None]
        total -= torch.log_softmax(logits, -1).gather(-1, target).sum().item()
        count += len(out)
    return total / count if count else None


def numeric(answer):
    """Accuracy needs a number to compare with; chat data's "answer" is a reference text instead."""
    try:
        return answer is not None and math.isfinite(float(str(answer).replace(",", "")))
    except ValueError:
        return False


def scorer():
    """data/synthmath.py's `score(text, gold)`, or None where data/ is not there."""
    try:
        from data.synthmath import score
        return score
    except ImportError:
        return None


def run(model, tok, methods, prompts, max_new_tokens=128, original=None, options=None, temperature=0.0, seed=0,
        warmup=1):
    """Decode `prompts` (texts, used verbatim, or {"prompt": text, "answer": gold} dicts) with every method, one
    prompt at a time (speculative methods decode batch 1, so ar does too), methods interleaved. `original`: the model
    whose NLL judges the outputs (default `model`); `options`: decode.generate keyword arguments (mask_ids,
    draft_vocab, schedule, k_max), each method getting those it reads.
    Returns {"methods": {name: metrics}, ...}, JSON-ready."""
    options, original = options or {}, original or model
    device = model.embed.weight.device
    prompts = [p if isinstance(p, dict) else {"prompt": p} for p in prompts]
    ids = [tok.encode(p["prompt"], specials=True) for p in prompts]   # prompts come from the chat template
    stop_ids = list(tok.stop_ids)
    answers = [p.get("answer") if numeric(p.get("answer")) else None for p in prompts]
    score, notes = scorer(), []
    if any(a is not None for a in answers) and score is None:
        notes.append("accuracy skipped: data.synthmath.score is not importable")

    def generate(method, prompt, n, stats=None, generator=None, temp=temperature):
        kind = decode.parse_method(method)[0]
        kw = {k: v for k, v in options.items() if k in METHOD_OPTIONS[kind]}
        return decode.generate(model, [prompt], n, temp, stop_ids=stop_ids, generator=generator, method=method,
                               stats=stats, **kw)[0]

    # plain greedy ar: the reference for exact match (taken from the timed ar run when that is greedy)
    methods, reference = list(dict.fromkeys(methods)), None
    if temperature > 0 or "ar" not in methods:
        reference = [generate("ar", p, max_new_tokens, temp=0.0) for p in ids]
    for method in methods:                                  # warm-up; a method that cannot run fails here, early
        for p in ids[:max(warmup, 1)]:
            generate(method, p, max_new_tokens if warmup else 1, generator=torch.Generator(device).manual_seed(seed))
    # timed prompt by prompt, every method in turn: clock ramps and first-time costs fall on no method alone
    gens = {m: torch.Generator(device).manual_seed(seed) for m in methods}
    stats, outs = {m: decode.Stats() for m in methods}, {m: [] for m in methods}
    wall, ttft = dict.fromkeys(methods, 0.0), dict.fromkeys(methods, 0.0)
    for p in ids:
        for m in methods:
            out, dt = timed(device, lambda: generate(m, p, max_new_tokens, stats[m], gens[m]))
            outs[m].append(out)
            wall[m] += dt
        for m in methods:   # time to first token: a prefill-only call
            ttft[m] += timed(device, lambda: generate(m, p, 1, generator=gens[m]))[1]
    if reference is None:
        reference = outs["ar"]
    results = {}
    for method in methods:
        kind, stat = decode.parse_method(method)[0], stats[method]
        texts = [tok.decode([t for t in out if t not in stop_ids]) for out in outs[method]]
        scored = [score(t, a) for t, a in zip(texts, answers) if a is not None] if score else []
        results[method] = {
            "lossy": kind in LOSSY,
            "tokens": stat.tokens,
            "wall_s": wall[method],
            "tok_s": stat.tokens / wall[method],
            "speedup": None,
            "tokens_per_forward": stat.tokens_per_forward,
            "exact_match": sum(o == r for o, r in zip(outs[method], reference)) / len(ids),
            "acceptance_rate": stat.acceptance_rate,
            "cum_acceptance_rate": stat.cum_acceptance_rate,
            "nll": output_nll(original, ids, outs[method]),
            "accuracy": sum(scored) / len(scored) if scored else None,
            "ttft_ms": 1000 * ttft[method] / len(ids),
            "sample": texts[0][:200],
        }
    if "ar" in results:
        for r in results.values():
            r["speedup"] = r["tok_s"] / results["ar"]["tok_s"]
    return {"device": str(device), "dtype": str(model.embed.weight.dtype).replace("torch.", ""),
            "num_prompts": len(ids), "max_new_tokens": max_new_tokens, "temperature": temperature,
            "methods": results, "notes": notes}


# ----------------------------------------------------------------------------------------------------------------
# reporting

def fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(res):
    acc = any(r["accuracy"] is not None for r in res["methods"].values())
    head = f"{'method':<15} {'tok/s':>8} {'speedup':>8} {'tok/fwd':>8} {'exact':>6} {'nll':>6}" + \
           (f" {'acc':>6}" if acc else "") + f"   {'accept (per depth)':<24} {'ttft ms':>8} {'wall s':>7}"
    lines = [head]
    for name, r in res["methods"].items():
        rates = r["acceptance_rate"]
        accept = " ".join(f"{a:.2f}" for a in rates[:5]) + (" ..." if len(rates) > 5 else "") or "-"
        lines.append(f"{name:<15} {r['tok_s']:>8.1f} {fmt(r['speedup'], '.2f') + 'x':>8} "
                     f"{r['tokens_per_forward']:>8.2f} {r['exact_match']:>6.2f} {fmt(r['nll'], '.3f'):>6}" +
                     (f" {fmt(r['accuracy'], '.3f'):>6}" if acc else "") +
                     f"   {accept:<24} {r['ttft_ms']:>8.1f} {r['wall_s']:>7.2f}" + ("  LOSSY" if r["lossy"] else ""))
    lines.append(f"{res['num_prompts']} prompts, max_new_tokens={res['max_new_tokens']}, "
                 f"temperature={res['temperature']}, {res['device']} {res['dtype']}; tok/fwd excludes prefill; "
                 f"exact = output identical to plain greedy ar")
    return "\n".join(lines + res["notes"])


def write_sweep(res, taus, out):
    """Markdown table of the ConfAdapt tau sweep and, where matplotlib exists, quality against tokens per forward."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [("ar", res["methods"]["ar"])] if "ar" in res["methods"] else []
    rows += [(f"{t:g}", res["methods"][f"confadapt@{t:g}"]) for t in taus]
    md = ["| tau | tok/fwd | tok/s | speedup | exact match | accuracy | nll |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    md += [f"| {t} | {r['tokens_per_forward']:.2f} | {r['tok_s']:.1f} | {fmt(r['speedup'], '.2f')} | "
           f"{r['exact_match']:.2f} | {fmt(r['accuracy'], '.3f')} | {fmt(r['nll'], '.3f')} |" for t, r in rows]
    (out / "sweep.md").write_text("\n".join(md) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [f"wrote {out / 'sweep.md'} (no matplotlib: no plot)"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key in zip(axes, ("exact_match", "accuracy", "nll")):
        pts = [(r["tokens_per_forward"], r[key], t) for t, r in rows if r[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        for x, y, t in pts:
            ax.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("tokens per forward"), ax.set_ylabel(key), ax.grid(alpha=0.3)
    fig.suptitle("ConfAdapt: quality against tokens per forward (LOSSY)")
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    return [f"wrote {out / 'sweep.md'} and {out / 'sweep.png'}"]


# ----------------------------------------------------------------------------------------------------------------
# CLI

def load_models(args):
    """-> (model, original model or None, tokenizer, generate options). Through load.load_for_decoding (heads,
    mask-token adapters, draft vocabulary) where load.py has it, else plain load.load (no heads, no options)."""
    dtype = getattr(torch, args.dtype)
    if args.tiny:
        return tiny_setup(args.device, dtype, args.seed)
    import load
    if hasattr(load, "load_for_decoding"):
        # attach only what the methods use: a gated adapter costs every forward its (zeroed) low-rank products
        kinds = {decode.parse_method(m)[0] for m in args.methods.split(",")}
        heads = args.heads or (None if "mtp" in kinds else "none")
        mask = args.mask or (None if kinds & {"static", "confadapt", "verified"} else "none")
        return load.load_for_decoding(args.init_from, args.device, dtype, heads=heads, mask=mask)
    if args.heads or args.mask:
        raise SystemExit("--heads and --mask need load.load_for_decoding, which this load.py does not have yet")
    model, tok = load.load(args.init_from, args.device, dtype)
    return model, None, tok, {}


def tiny_setup(device, dtype, seed):
    """A random 2-layer Llama with 3 MTP heads and a mask token, character tokenizer: runs every method, no weights."""
    from tokenizer import CharTokenizer
    import model as nano
    torch.manual_seed(seed)
    tok = CharTokenizer()
    mask_id = tok.add_special("<mtp>")
    cfg = nano.Config(arch="llama", vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      head_dim=16, intermediate_size=128, max_seq_len=512)
    m = nano.Transformer(cfg)
    with torch.no_grad():       # larger weights than the default init, so the text is not one token repeated
        for w in m.parameters():
            w.normal_(1.0 if w.dim() == 1 else 0.0, 0.2)
    m.add_heads(3, init="last_block")
    return m.to(device, dtype).eval(), None, tok, {"mask_ids": [mask_id]}


def read_prompts(args, tok):
    if args.prompts:
        with open(args.prompts) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return rows[:args.num_prompts]
    chat = tok.chat_prompt if tok.has_chat else None   # a from-scratch model's tokenizer has no chat template
    return [chat(q) if chat else q for q in QUESTIONS[:args.num_prompts]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--init_from", default="smollm2", help="smollm2, a Hugging Face folder, a .gguf file or a "
                   "nanoMTP checkpoint folder")
    p.add_argument("--methods", default="ar,mtp", help="comma list: ar, mtp@D, static@K, confadapt@TAU, verified@K")
    p.add_argument("--heads", default=None, help="MTP heads file to attach (methods mtp@D)")
    p.add_argument("--mask", default=None, help="mask-token adapter file (methods static, confadapt, verified)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--max_new_tokens", type=int, default=128, help="tokens to generate per prompt at most")
    p.add_argument("--prompts", default=None, help='JSONL file, one {"prompt": text, "answer": gold?} a line, the '
                   "prompt used verbatim (default: built-in chat questions in the chat template)")
    p.add_argument("--num_prompts", type=int, default=8, help="how many prompts to use")
    p.add_argument("--warmup", type=int, default=1, help="prompts decoded untimed before timing each method")
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (exact match needs greedy to mean "
                   "much; it is always measured against greedy ar)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling (and the --tiny model)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object, last line")
    p.add_argument("--sweep", action="store_true", help="also run confadapt@TAU for every --taus value; write a "
                   "markdown table (and a PNG where matplotlib exists) to --out")
    p.add_argument("--taus", default="0.5,0.6,0.7,0.8,0.9,0.95", help="ConfAdapt thresholds for --sweep")
    p.add_argument("--out", default="out/bench", help="folder for --sweep's table and plot")
    p.add_argument("--draft_vocab", type=int, default=None, help="restrict MTP drafts to the N most frequent tokens "
                   "(needs a heads file that carries a frequency-ordered vocabulary)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model with heads and a mask token, no "
                   "weights: checks that everything runs")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    model, original, tok, options = load_models(args)
    if args.draft_vocab:
        if "draft_vocab" not in options:
            raise SystemExit("--draft_vocab: the heads file carries no frequency-ordered vocabulary")
        options["draft_vocab"] = options["draft_vocab"][:args.draft_vocab]
    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    taus = [float(t) for t in args.taus.split(",")] if args.sweep else []
    methods += [f"confadapt@{t:g}" for t in taus if f"confadapt@{t:g}" not in methods]
    for m in methods:
        decode.parse_method(m)      # fail on a bad name before any work
    res = run(model, tok, methods, read_prompts(args, tok), args.max_new_tokens, original, options,
              args.temperature, args.seed, args.warmup)
    if taus:
        res["notes"] += write_sweep(res, taus, args.out)
    print(table(res))
    if args.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
