"""
Measurement: every decoding method side by side, in one process, on the same prompts, after warm-up.

For each method: tokens/s (generated tokens / wall time of generate, prefill included, device
synchronised), speedup (tokens/s over `ar`'s from the same run), tokens per forward, per-depth
acceptance AR_d and cumulative CAR_d (decode.Stats, which defines them), the
accepted-length histogram (steps that accepted n drafts, chains and trees), exact match against
plain greedy `ar`, mean per-token NLL of the output under the original model (the main model without
heads or adapters; one no-cache forward of prompt + output), task accuracy where the prompts carry
numeric answers (data/synthmath.py's scorer), and time to first token (a prefill-only call, timed
apart). Every prompt is decoded alone (batch 1), ar included; --batch_sizes instead decodes batches
of each size (the prompts repeated to fill them) with the methods that batch (ar, mtp), and reports
tokens/s and speedup against batch size (`run_batches`). Lossy methods (static@K, confadapt@TAU) are
labelled LOSSY. `hf` is another implementation: transformers' own `generate` (greedy) on the same
weights, for comparison. A table for people; with --json, one JSON object last.

What is not here: the decoding itself (decode.py, engine.py, draft_*.py), the model setup
(load.load_for), the quality metrics (quality.py: output NLL and its judge, Wilson intervals), the
tables and plots (report.py),
training (train.py).

    # smollm2, its shipped heads and held-out prompts
    python bench.py --methods ar,mtp@1,mtp@3,hf --num_prompts 4
    python bench.py --methods ar,static@2,verified@4,hf --prompts data/smollm2_heldout.jsonl \
        --num_prompts 4
    python bench.py --init_from out/synthmath_mask --prompts data/synthmath/test_prompts.jsonl \
        --sweep --taus 0.6,0.9
    python bench.py --init_from out/papera/gated --methods ar \
        --prompts data/papera_synthmath/test_prompts.jsonl \
        # ConfAdapt at every tau and k_max (confadapt@TAU:K)
        --sweep --taus 0.8,0.9 --k_maxes 4,8,16
    # speed against batch
    python bench.py --methods ar,mtp@3,mtp@auto --batch_sizes 1,4,16,64 --out results/batch
    # a random model, no weights: a smoke test
    python bench.py --tiny --methods ar,mtp@2,static@3,verified@3

The programmatic entry points are `run(model, tokenizer, methods, prompts, ...) -> dict` and
`run_batches(...)`; the CLI wraps them.
"""

import argparse
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

import decode
import load
import model as nano
from chars import CharTokenizer
from cli import Parser, add_model_args, existing_file, fail, number
from engine import MAX_DRAFTS, Sampling

from data.dataset import check_tokenizer, load_meta
from data.synthmath import score
from hf_compare import hf_generate, hf_model
from prompts import encode_prompt, read_prompts
from quality import nll_judge, numeric, output_nll, wilson
from report import batch_table, sweep_method, table, write_batches, write_sweep

HF = "hf"   # the method name of transformers' generate
QUESTIONS = [  # short held-out chat questions (not in data/'s chat prompts)
    "Explain why the sky is blue.", "Write a haiku about autumn.",
    "What are three benefits of exercise?",
    "How does a refrigerator keep food cold?", "Give me a tip for learning a new language.",
    "What is the difference between weather and climate?",
    "Describe a cat to someone who has never seen one.",
    "Why do we have seasons?", "Suggest a name for a small bakery.", "What is photosynthesis?",
    "How do I boil an egg?", "Write one sentence about the ocean.", "What causes rainbows?",
    "List three fruits that are high in vitamin C.", "Why is sleep important?",
    "What does a compiler do?",
]
BUILTIN = "builtin"   # --prompts: QUESTIONS
# shipped: the default prompts of smollm2
HELDOUT = Path(__file__).parent / "data" / "smollm2_heldout.jsonl"


# --------------------------------------------------------------------------------------------------
# one run: every method on the same prompts

def strategies_for(model, parsed, max_len, temperature, seed, options, batch_size=1, compile=False):
    """One strategy per method (name -> Method), built once: its buffers, CUDA graphs and compiled
    kernels serve every prompt (or batch) it decodes; each samples from its own seeded generator."""
    device = model.embed.weight.device
    return {m: decode.make_strategy(model, method, max_len, Sampling(temperature),
                                    torch.Generator(device).manual_seed(seed),
                                    batch_size=batch_size, compile=compile, **options)
            for m, method in parsed.items()}


PAPER_B_REFERENCE = "mtp@1"   # Paper B reports its speedups over one-head MTP


def add_speedups(results):
    """Every row's speedup: its tok/s over ar's in the same position (results: name -> rows), and
    over mtp@1's where mtp@1 ran too."""
    for key, reference in (("speedup", "ar"), ("speedup_mtp1", PAPER_B_REFERENCE)):
        if reference in results:
            for rows in results.values():
                for r, ref in zip(rows, results[reference]):
                    r[key] = r["tok_s"] / ref["tok_s"]


def timed(device, fn):
    """fn() and its wall time in seconds, the device synchronised before and after."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def run(model, tokenizer, methods, prompts, max_new_tokens=128, original=None, options=None,
        temperature=0.0, seed=0,
        warmup=1, hf=None, nll_self=False, progress=False, compile=False):
    """Decode `prompts` (texts, used verbatim, or {"prompt": text, "answer": gold} dicts) with every
    method, one prompt at a time (speculative methods decode batch 1, so ar does too), methods
    interleaved. `original`: the model whose NLL judges the outputs (default `model`; nll_self=True
    says it is a fine-tuned model judging itself, and the metric is then named nll_self); `options`:
    decode.generate's method options (mask_ids, draft_ids, k_max); `hf`: a transformers model of the
    same weights for method "hf"; progress: a bar per method on stderr; compile: torch.compile the
    model's forward (CUDA graphs are used on CUDA in any case). exact_match compares a method with
    plain greedy decoding run apart (its "reference"): `ar` itself in float32, and in lower
    precision `ar` padded to the method's query length, the bit-exact reference (decode.py). Returns
    {"methods": {name: metrics}, ...}, JSON-ready."""
    options, original = options or {}, original or model
    device = model.embed.weight.device
    prompts = [p if isinstance(p, dict) else {"prompt": p} for p in prompts]
    ids = [encode_prompt(tokenizer, p["prompt"]) for p in prompts]
    stop_ids = list(tokenizer.stop_ids)
    answers = [p.get("answer") if numeric(p.get("answer")) else None for p in prompts]

    methods = list(dict.fromkeys(methods))
    parsed = {m: decode.Method.parse(m) for m in methods if m != HF}
    max_len = max(map(len, ids)) + max_new_tokens
    strategies = strategies_for(model, parsed, max_len, temperature, seed, options, compile=compile)

    def generate(method, prompt, n, stats=None):
        if method == HF:
            return hf_generate(hf, prompt, n, stop_ids)
        return decode.generate(model, [prompt], n, stop_ids=stop_ids, method=strategies[method],
                               stats=stats)[0]

    # warm-up (graph capture, compilation), untimed; with graphs, then a prefill of every prompt,
    # which captures the graph of every padded prompt length the timed runs meet
    for method in methods:
        for p in ids[:max(warmup, 1)]:
            generate(method, p, max_new_tokens if warmup else 1)
        if method != HF and strategies[method].graphs:
            for p in ids:
                generate(method, p, 1)
    # timed prompt by prompt, every method in turn: clock ramps and first-time costs fall on no
    # method alone
    stats, outs = {m: decode.Stats() for m in methods}, {m: [] for m in methods}
    wall, ttft = dict.fromkeys(methods, 0.0), dict.fromkeys(methods, 0.0)
    bars = {m: tqdm(total=len(ids), desc=f"{m:<15}", position=i, file=sys.stderr,
                    disable=None if progress else True)   # None: only on a terminal
            for i, m in enumerate(methods)}
    for p in ids:
        for m in methods:
            out, dt = timed(device, lambda: generate(m, p, max_new_tokens, stats[m]))
            outs[m].append(out)
            wall[m] += dt
        for m in methods:   # time to first token: a prefill-only call
            ttft[m] += timed(device, lambda: generate(m, p, 1))[1]
            bars[m].update()
    for bar in bars.values():
        bar.close()
    references, greedy = greedy_references(model, {m: strategies.get(m) for m in methods}, outs,
                                           [[p] for p in ids], max_new_tokens, stop_ids,
                                           temperature, max_len=max_len, compile=compile, **options)
    nll_key = "nll_self" if nll_self else "nll"
    results = {}
    for method in methods:
        stat, tokens = stats[method], sum(map(len, outs[method]))
        texts = [tokenizer.decode([t for t in out if t not in stop_ids]) for out in outs[method]]
        scored = [score(t, a) for t, a in zip(texts, answers) if a is not None]
        ours = method != HF
        results[method] = {
            "implementation": "nanoMTP" if ours else "transformers",
            "lossy": ours and parsed[method].lossy,
            "tokens": tokens,
            "wall_s": wall[method],
            "tok_s": tokens / wall[method],
            "speedup": None,
            "speedup_mtp1": None,
            "tokens_per_forward": stat.tokens_per_forward if ours else None,
            "exact_match": sum(o == r for o, r in zip(outs[method], greedy[method])) / len(ids),
            "reference": references[method],
            "acceptance_rate": stat.acceptance_rate,
            "cum_acceptance_rate": stat.cum_acceptance_rate,
            "accepted_lengths": stat.accepted_lengths,
            nll_key: output_nll(original, ids, outs[method]),
            "accuracy": sum(scored) / len(scored) if scored else None,
            "accuracy_ci95": wilson(sum(scored), len(scored)),
            "scored": len(scored),
            "k_max": decode.confadapt_k_max(parsed[method], options.get("k_max", decode.K_MAX))
            if ours and parsed[method].kind == "confadapt" else None,
            "ttft_ms": 1000 * ttft[method] / len(ids),
            "ms_per_forward": 1000 * wall[method] / stat.forwards if ours else None,
            "query_len": strategies[method].query_len if ours else None,
            "sample": texts[0][:200],
        }
    add_speedups({m: [r] for m, r in results.items()})
    # on a GPU only: eagerly, a forward's time is its launches, which the row would not isolate
    bare = (bare_forward_ms(model, {1} | {s.query_len for s in strategies.values()}, max_len,
                            compile) if device.type == "cuda" else {})
    return {"device": str(device), "dtype": str(model.embed.weight.dtype).replace("torch.", ""),
            "num_prompts": len(ids), "max_new_tokens": max_new_tokens, "temperature": temperature,
            "nll_key": nll_key, "methods": results, "bare_forward_ms": bare, "notes": []}


def bare_forward_ms(model, query_lens, max_len, compile=False, replays=100):
    """The floor under every method's time on a GPU: the model's own forward over Q tokens (for
    each Q in query_lens), ar@Q's step replayed from its graph back to back with nothing read back.
    {Q: ms per forward}."""
    out = {}
    for q in sorted(query_lens):
        strategy = decode.make_strategy(model, f"ar@{q}", max_len, compile=compile)
        strategy.prefill([[0]])
        for _ in range(10):                      # warm-up: capture, compilation, the first replays
            strategy.next()
        seconds = timed("cuda", lambda: [strategy.next() for _ in range(replays)])[1]
        out[q] = 1000 * seconds / replays
    return out


def greedy_references(model, strategies, outs, batches, max_new_tokens, stop_ids, temperature,
                      **build):
    """For every method (name -> its strategy, None for hf): the name of its plain greedy reference
    (reference_method), and that reference's outputs on the same prompts, decoded batch by batch as
    the methods were, or taken from the timed outputs where the reference itself was timed greedily.
    build: make_strategy's options. Returns ({method: reference name}, {method: reference outputs}).
    """
    references = {m: reference_method(m, s, model) for m, s in strategies.items()}
    decoded = {}
    for ref in set(references.values()):
        if ref in outs and temperature == 0:
            decoded[ref] = outs[ref]
        else:
            strategy = decode.make_strategy(model, ref, **build)
            decoded[ref] = [out for batch in batches
                            for out in decode.generate(model, batch, max_new_tokens,
                                                       stop_ids=stop_ids, method=strategy)]
    return references, {m: decoded[ref] for m, ref in references.items()}


def reference_method(method, strategy, model):
    """The plain greedy decoding a method's output is compared with: `ar` in float32; otherwise
    `ar@Q`, padded to the method's query length Q, whose forwards round exactly as the method's
    verification forwards do."""
    if strategy is None or model.embed.weight.dtype == torch.float32:
        return "ar"
    return f"ar@{strategy.query_len}" if strategy.query_len > 1 else "ar"


# --------------------------------------------------------------------------------------------------
# speed against batch size

def run_batches(model, tokenizer, methods, prompts, batch_sizes, max_new_tokens=128, options=None,
                temperature=0.0,
                seed=0, compile=False, progress=False):
    """tokens/s of every method at every batch size: the prompts (texts or {"prompt": ...} dicts,
    used verbatim) repeated in order to fill each batch, decoded as one batch (decode.generate with
    B prompts), after one untimed warm-up call of the same batch (graph capture, compilation,
    mtp@auto's cost measurement), methods interleaved. Per method and size: tok/s (generated tokens
    of all rows / wall time, prefill included), speedup over `ar` at the same size, tokens per
    forward (rows still decoding only), exact match per row against plain greedy (as run() defines
    it, run at the same batch size) and, for mtp@auto, the step costs its DepthRule measured.
    Returns {"batch_sizes": [...], "methods": {name: [one dict per size]}, ...}, JSON-ready."""
    options = options or {}
    device = model.embed.weight.device
    ids = [encode_prompt(tokenizer, p["prompt"] if isinstance(p, dict) else p) for p in prompts]
    stop_ids = list(tokenizer.stop_ids)
    max_len = max(map(len, ids)) + max_new_tokens
    parsed = {m: decode.Method.parse(m) for m in methods}
    results = {m: [] for m in methods}
    for B in tqdm(batch_sizes, desc="batch "
                  "sizes", file=sys.stderr, disable=None if progress else True):
        batch = (ids * math.ceil(B / len(ids)))[:B]
        strategies = strategies_for(model, parsed, max_len, temperature, seed, options, B, compile)
        generate = partial(decode.generate, model, batch, max_new_tokens, stop_ids=stop_ids)
        for m in methods:                                   # warm-up, untimed
            generate(method=strategies[m])
        outs, stats, wall = {}, {m: decode.Stats() for m in methods}, {}
        for m in methods:
            outs[m], wall[m] = timed(device, lambda: generate(method=strategies[m], stats=stats[m]))
        references, greedy = greedy_references(model, strategies, outs, [batch], max_new_tokens,
                                               stop_ids, temperature, max_len=max_len, batch_size=B,
                                               compile=compile, **options)
        rules = {m: getattr(strategies[m], "rule", None) for m in methods}   # mtp@auto's DepthRule
        # their caches and graphs before the next, larger size
        strategies = None
        for m in methods:
            tokens = sum(map(len, outs[m]))
            results[m].append({
                "batch_size": B, "tokens": tokens, "wall_s": wall[m], "tok_s": tokens / wall[m],
                "speedup": None,
                "tokens_per_forward": stats[m].tokens_per_forward,
                "acceptance_rate": stats[m].acceptance_rate,
                "exact_match": sum(o == r for o, r in zip(outs[m], greedy[m])) / B,
                "reference": references[m],
                "step_costs": rules[m].costs if rules[m] else None})
    add_speedups(results)
    notes = [f"{m}: mixes query lengths from step to step, so in {model.embed.weight.dtype} no "
             f"single ar@Q is its bit-exact reference (exact in float32)" for m in methods
             if parsed[m].auto and model.embed.weight.dtype != torch.float32]
    return {"device": str(device), "dtype": str(model.embed.weight.dtype).replace("torch.", ""),
            "batch_sizes": list(batch_sizes), "num_prompts": len(ids),
            "max_new_tokens": max_new_tokens,
            "temperature": temperature, "methods": results, "notes": notes}


# --------------------------------------------------------------------------------------------------
# CLI

def tiny_setup(device, dtype, seed):
    """A random 2-layer Llama with 3 MTP heads and a mask token, character tokenizer: runs every
    method, no weights."""
    torch.manual_seed(seed)
    tokenizer = CharTokenizer()
    mask_id = tokenizer.add_special("<mtp>")
    cfg = nano.Config(arch="llama", vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4,
                      n_kv_head=2, n_embd=64,
                      head_dim=16, intermediate_size=128, max_seq_len=512)
    m = nano.Transformer(cfg)
    # larger weights than the default init, so the text is not one token repeated
    with torch.no_grad():
        for w in m.parameters():
            w.normal_(1.0 if w.dim() == 1 else 0.0, 0.2)
    m.add_heads(3, init="last_block")
    m = m.to(device, dtype).eval()
    return m, tokenizer, {"mask_ids": [mask_id]}


def prompts_arg(text):
    return text if text == BUILTIN else existing_file(text)


def check_prompts_tokenizer(path, tokenizer):
    """A prompts file that data/prepare.py wrote sits beside its meta.json: the model must share
    that tokenizer."""
    folder = Path(path).parent
    if (folder / "meta.json").is_file():
        check_tokenizer(load_meta(str(folder)), tokenizer, str(folder))


def method_list(text):
    names = [m for m in (m.strip() for m in text.split(",")) if m]
    if not names:
        raise argparse.ArgumentTypeError("no methods given (e.g. ar,mtp@3)")
    for i, m in enumerate(names):
        old = [m]   # the old tree@4,2,2,1 reads as a list here: name its new form
        while m.startswith("tree@") and names[i + len(old):][:1] and names[i + len(old)].isdigit():
            old.append(names[i + len(old)])
        if m != HF:
            decode.method_arg(",".join(old))
    return list(dict.fromkeys(names))


def size_list(text):
    return list(dict.fromkeys(number(int, 1)(b) for b in text.split(",")))


def tau_list(text):
    return [number(float, 0, 1, low_open=True)(t) for t in text.split(",")]


def k_max_list(text):
    return list(dict.fromkeys(number(int, 2, MAX_DRAFTS)(k) for k in text.split(",")))


def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", type=method_list, default="ar,mtp", help=f"comma-separated: ar, "
                   f"ar@Q, mtp@D, mtp@autoD, tree@DxK, tree@b1-b2-..., tree@autoN, static@K, "
                   f"confadapt@TAU[:K], verified@K (D and K up to {MAX_DRAFTS}, TAU in (0, 1]), hf "
                   f"(transformers)")
    add_model_args(p, max_new_tokens=128)
    p.add_argument("--prompts", type=prompts_arg, default=None, help='JSONL file, one '
                   '{"prompt": text, "answer": gold?} a line, the prompt used verbatim, or '
                   '"builtin": 16 short chat questions in the model\'s chat template (default: '
                   "data/smollm2_heldout.jsonl for smollm2, else builtin)")
    p.add_argument("--num_prompts", type=number(int, 1), default=8, help="how many prompts to use")
    p.add_argument("--warmup", type=number(int, 0), default=1, help="prompts decoded untimed "
                   "before timing")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object, "
                   "last line")
    p.add_argument("--sweep", action="store_true", help="also run confadapt@TAU for every --taus "
                   "value; write a markdown table (and a PNG where matplotlib exists) to --out")
    p.add_argument("--taus", type=tau_list, default="0.5,0.6,0.7,0.8,0.9,0.95", help="ConfAdapt "
                   "thresholds, comma-separated, each in (0, 1], for --sweep")
    p.add_argument("--k_maxes", type=k_max_list, default=None, help="with --sweep: run the tau "
                   "sweep once per k_max (ConfAdapt's masks per forward + 1), comma-separated, "
                   "e.g. 4,8,16 (default: the model's)")
    p.add_argument("--batch_sizes", type=size_list, default=None, help="comma-separated, e.g. "
                   "1,4,16,64: instead of one prompt at a time, decode batches of each size (the "
                   "prompts repeated to fill them) and report tokens/s against batch size; writes "
                   "a table (and a PNG where matplotlib exists) to --out")
    p.add_argument("--out", default="out/bench", help="folder for --sweep's and --batch_sizes' "
                   "tables and plots")
    p.add_argument("--tiny", action="store_true", help="a tiny random model with heads and a mask "
                   "token, no weights: checks that everything runs")
    args = p.parse_args(argv)
    if args.k_maxes and not args.sweep:
        fail("--k_maxes: only with --sweep")
    taus = args.taus if args.sweep else []
    sweep = [sweep_method(t, k) for k in args.k_maxes or [None] for t in taus]
    methods = list(dict.fromkeys(args.methods + sweep))
    ours = [decode.Method.parse(m) for m in methods if m != HF]
    dtype = decode.check_model_args(args, ours)
    if args.batch_sizes:
        parsed = dict(zip([m for m in methods if m != HF], ours))
        single = [m for m in methods if m == HF or not parsed[m].batches]
        if single or args.sweep:
            fail(f"--batch_sizes: only methods that decode batches (ar, ar@Q, mtp@D, mtp@autoD) "
                 f"are measured against batch size, not {', '.join(single) or '--sweep'}")
    shipped = args.init_from == load.BUNDLED and not args.tiny
    prompts_file = args.prompts or (HELDOUT if shipped else BUILTIN)
    try:
        rows = None if prompts_file == BUILTIN else read_prompts(prompts_file)
        if args.tiny:
            model, tokenizer, options = tiny_setup(args.device, dtype, args.seed)
        else:
            model, tokenizer, options = decode.load_args(args, ours, dtype)
        if rows:
            check_prompts_tokenizer(prompts_file, tokenizer)
        else:
            rows = QUESTIONS
        hf, notes = None, []
        if HF in methods:
            hf, why = hf_model(model, args.init_from)
            if hf is None:
                print(f"hf: skipped: {why}", file=sys.stderr)
                notes.append(f"hf skipped: {why}")
                methods.remove(HF)
        if not methods:
            raise ValueError("nothing left to measure")
        if args.batch_sizes:
            res = run_batches(model, tokenizer, methods, rows[:args.num_prompts], args.batch_sizes,
                              args.max_new_tokens, options, args.temperature, args.seed,
                              args.compile, progress=True)
        else:
            judge = model if args.tiny else nll_judge(args.init_from, model, args.device, dtype)
            res = run(model, tokenizer, methods, rows[:args.num_prompts], args.max_new_tokens,
                      judge, options, args.temperature, args.seed, args.warmup, hf,
                      nll_self=judge is None, progress=True, compile=args.compile)
    except (ValueError, OSError) as e:
        fail(e)
    if args.batch_sizes:
        res["notes"] += write_batches(res, args.out)
        print(batch_table(res))
        if args.json:
            print(json.dumps(res))
        return res
    res["notes"] += notes
    if taus:
        res["notes"] += write_sweep(res, taus, args.k_maxes, args.out)
    print(table(res))
    if args.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
