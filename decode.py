"""
Generation: one `generate` loop over a strategy per method, and the decode.py command line.

- `Method`: a method name parsed once (`ar`, `ar@Q`, `mtp@D`, `mtp@autoD`, `tree@DxK`,
  `tree@b1-b2-...`, `tree@autoN`, `static@K`, `confadapt@TAU[:K]`, `verified@K`); `make_strategy`
  builds its strategy.
- `Autoregressive`: plain decoding of a batch, the reference every other method is compared with.
- `generate`: prefill, then steps until every row stops; fills `Stats` (one histogram of accepted
  lengths, every rate derived from it) and a `trace` of how each token was produced.
- The methods: draft_heads.py (mtp), draft_tree.py (tree), draft_mask.py (static, confadapt,
  verified); their machinery: engine.py. Nothing here trains or measures speed (bench.py does).

CLI: python decode.py --init_from smollm2 --prompt "What is the capital of France?" [--method mtp@3]
"""

import sys
import time
from argparse import ArgumentTypeError
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cli import Parser, add_model_args, fail, number, render
from draft_heads import HeadDrafts
from draft_mask import K_MAX, MaskDrafts
from draft_tree import AutoTreeDrafts, TreeDrafts, tree_shape
from engine import MAX_DRAFTS, MAX_QUERY, Graph, Pending, Sampling, Step, Strategy
from load import SHIPPED, load_for

LOSSY = {"static", "confadapt"}    # methods that emit predictions nothing checks
LONG_PREFILL = 2048   # a prompt this long says it is being read (8k tokens: ~2 minutes on a CPU)


@dataclass(frozen=True)
class Method:
    """A decoding method, parsed once from its name."""
    kind: str                   # ar, mtp, tree, static, confadapt, verified
    # ar: Q; mtp: D; static, verified: K; confadapt: K (None: the model's)
    k: int | None = None
    tau: float | None = None    # confadapt's threshold
    branches: tuple = ()        # tree: branch factors per depth
    budget: int | None = None   # tree@autoN: the node budget N
    auto: bool = False          # mtp@autoD: each step's depth chosen in 0..D (DepthRule)

    @property
    def lossy(self):
        return self.kind in LOSSY

    @property
    def batches(self):
        return self.kind in ("ar", "mtp")

    @property
    def uses_heads(self):
        return self.kind in ("mtp", "tree")

    @property
    def uses_mask_tokens(self):
        return self.kind in ("static", "confadapt", "verified")

    def __str__(self):
        if self.kind == "tree":
            if self.budget:
                return f"tree@auto{self.budget}"
            return "tree@" + "-".join(map(str, self.branches))
        if self.kind == "confadapt":
            return f"confadapt@{self.tau:g}" + (f":{self.k}" if self.k else "")
        if self.kind == "ar" and self.k == 1:
            return "ar"
        return f"{self.kind}@{'auto' if self.auto else ''}{self.k}"

    @classmethod
    def parse(cls, name):
        """A ValueError names the allowed values. ar@Q is plain decoding padded to Q tokens per
        forward (the bf16 reference of a method whose forwards carry Q tokens: mtp@D's is ar@(D+1),
        verified@K's ar@(2K-1), a tree's ar@(1 + its nodes)). A bare name takes its default (mtp:
        mtp@3)."""
        if isinstance(name, cls):
            return name
        kind, at, arg = name.partition("@")
        defaults = {"ar": "1", "mtp": "3", "tree": "3x4", "static": "3", "confadapt": "0.9",
                    "verified": "4"}
        if kind not in defaults:
            raise ValueError(f"unknown method {name!r}: expected ar, ar@Q, mtp@D, mtp@autoD, "
                             f"tree@DxK, tree@b1-b2-..., tree@autoN, static@K, confadapt@TAU or "
                             f"verified@K")
        arg = arg if at else defaults[kind]
        if kind == "tree":
            shape = tree_shape(name, arg)
            if isinstance(shape, int):
                return cls("tree", budget=shape)
            return cls("tree", branches=shape)
        if kind == "confadapt":
            tau, _, k = arg.partition(":")
            if k and not (_digits(k) and 2 <= int(k) <= MAX_DRAFTS):
                raise ValueError(f"method {name!r}: K (k_max) must be an integer from 2 to "
                                 f"{MAX_DRAFTS}")
            try:
                value = float(tau) if tau.isascii() else None
            except ValueError:
                value = None
            if value is None or not 0 < value <= 1:
                raise ValueError(f"method {name!r}: TAU must be a number in (0, 1]")
            return cls("confadapt", int(k) if k else None, tau=value)
        auto = kind == "mtp" and arg.startswith("auto")
        arg = (arg[len("auto"):] or defaults["mtp"]) if auto else arg
        letter, low, high = {"ar": ("Q", 1, MAX_QUERY), "mtp": ("D", 1, MAX_DRAFTS),
                             "static": ("K", 2, MAX_DRAFTS), "verified": ("K", 2, MAX_DRAFTS)}[kind]
        if not (_digits(arg) and low <= int(arg) <= high):
            raise ValueError(f"method {name!r}: {letter} must be an integer from {low} to {high}")
        return cls(kind, int(arg), auto=auto)


def _digits(text):
    return text.isascii() and text.isdigit()


def confadapt_k_max(method, k_max):
    """ConfAdapt's k (masks per forward + 1): K of confadapt@TAU:K, else the model's k_max. A sweep
    over K shows what the masks each forward carries cost in speed."""
    return method.k or k_max


@dataclass
class Stats:
    """Counters filled by generate. Tokens and forwards count everything (prefill included); tokens
    per forward leaves out the prefill forwards and the tokens they yield, so `ar` has exactly one.
    A batched forward counts once per row still decoding. Acceptance counts only steps that checked
    a draft."""
    tokens: int = 0
    forwards: int = 0
    prefills: int = 0                                  # prompts decoded (one prefill forward each)
    # tokens those prefills yielded (k for static@K)
    prefill_tokens: int = 0
    # (drafts checked, drafts accepted) -> steps: gpt-fast's accept_counts, every rate below comes
    # from it
    accept_counts: dict = field(default_factory=dict)

    def record(self, checked, accepted):
        # a forward with nothing to verify (verified@K after a rejection) is not a step
        if checked:
            key = checked, accepted
            self.accept_counts[key] = self.accept_counts.get(key, 0) + 1

    def _count(self, where):
        return sum(n for (checked, accepted), n in self.accept_counts.items()
                   if where(checked, accepted))

    @property
    def depths(self):
        return max((checked for checked, _ in self.accept_counts), default=0)

    @property
    def steps(self):
        return sum(self.accept_counts.values())

    @property
    def accepted_lengths(self):
        """accepted_lengths[n]: steps that accepted n drafts."""
        if not self.accept_counts:
            return []
        return [self._count(lambda c, a: a == n) for n in range(self.depths + 1)]

    @property
    def proposed(self):
        """proposed[d]: drafts at depth d+1 checked (every earlier depth was accepted)."""
        return [self._count(lambda c, a: d < min(a + 1, c)) for d in range(self.depths)]

    @property
    def accepted(self):
        """accepted[d]: drafts at depth d+1 accepted, the steps where depths 1..d+1 all were."""
        return [self._count(lambda c, a: d < a) for d in range(self.depths)]

    @property
    def tokens_per_forward(self):
        return (self.tokens - self.prefill_tokens) / max(self.forwards - self.prefills, 1)

    @property
    def acceptance_rate(self):
        """AR_d: drafts accepted at depth d / drafts checked there (all earlier depths accepted)."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]

    @property
    def cum_acceptance_rate(self):
        """CAR_d: steps in which depths 1..d were all accepted / steps."""
        steps = self.steps
        return [a / steps if steps else 0.0 for a in self.accepted]


class Autoregressive(Strategy):
    """Plain decoding of a batch, one token per forward. Each step feeds every row's newest token
    and query_len-1 pads (the bf16 reference of a method that feeds query_len tokens; 1 is the
    fastest)."""
    batches = True

    def __init__(self, model, max_len, sampling=Sampling(), generator=None, batch_size=1,
                 query_len=1, graphs=None, compile=False):
        super().__init__(model, batch_size, max_len, query_len, sampling, generator, graphs,
                         compile)
        self.offsets = torch.arange(query_len, device=self.device)
        self.caches, _ = model.make_caches(batch_size, self.cache_len)
        # greedy: the pick joins the graph; sampling draws from its generator outside it, on the
        # device too, so neither needs the host between steps
        self.next = Graph(self._next_token if sampling.greedy else self._next_logits, self.graphs)
        self.runs_ahead = self.device.type == "cuda"

    def _next_logits(self):
        # (B, query_len): the newest token, then pads
        pos = self.newest[:, None] + self.offsets
        return self.forward(self.tokens.gather(1, pos), self.positions(pos), self.caches)[:, 0]

    def _next_token(self):
        nxt = self._next_logits().argmax(-1)
        self.tokens[self.rows, self.newest + 1] = nxt
        return nxt

    def step(self, live):
        """Every row's next token, stopped rows included."""
        if self.sampling.greedy:
            nxt = self.next()
        else:
            nxt = self.sampling.pick(self.next(), self.generator)
            self.tokens[self.rows, self.newest + 1] = nxt
        # in place, outside the graph: it reads newest and must stay idempotent
        self.newest += 1
        return Pending(nxt, lambda rows: [Step([t], 0, 0, [0]) for t in rows])


def make_strategy(model, method, max_len, sampling=Sampling(), generator=None, schedule=None,
                  draft_ids=None, mask_ids=None, k_max=None, batch_size=1, graphs=None,
                  compile=False):
    """A strategy for `method` (a Method, or its name) with buffers for prompt + new tokens of up to
    max_len positions. Pass it to generate as `method` to keep its CUDA graphs (and compiled
    kernels) across calls. graphs: CUDA graphs (default: on CUDA); compile: torch.compile the
    forward too."""
    method = Method.parse(method)
    engine = dict(sampling=sampling, generator=generator, graphs=graphs, compile=compile)
    if method.kind == "ar":
        return Autoregressive(model, max_len, batch_size=batch_size, query_len=method.k, **engine)
    if method.kind == "mtp":
        return HeadDrafts(model, max_len, method.k, schedule, draft_ids, adaptive=method.auto,
                          batch_size=batch_size, **engine)
    if method.kind == "tree":
        if method.budget:
            return AutoTreeDrafts(model, max_len, method.budget, schedule, draft_ids, **engine)
        return TreeDrafts(model, max_len, method.branches, schedule, draft_ids, **engine)
    if not mask_ids:
        raise ValueError(f"method {method} needs a mask-token model (train.py --mode mask_tokens) "
                         f"and its mask token ids")
    if method.kind == "confadapt":
        k = confadapt_k_max(method, k_max or K_MAX)
        return MaskDrafts(model, max_len, mask_ids, k, tau=method.tau, **engine)
    return MaskDrafts(model, max_len, mask_ids, method.k, verified=method.kind == "verified",
                      **engine)


# cuDNN attention builds a plan for every new (query length, key length) pair, 40-400 ms each on an
# H100; decoding meets new lengths with every prompt, so generate keeps to the kernels that need
# none.
DECODE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@torch.no_grad()
@sdpa_kernel(DECODE_ATTENTION)
def generate(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None, stop_ids=(),
             generator=None, method="ar", stats=None, trace=None, **method_options):
    """Generate up to max_new_tokens after each prompt (lists of token ids); returns the new tokens
    of each prompt, ending with the stop token where one was produced. Methods that batch decode the
    prompts as one batch, the others one at a time. `method`: a Method or its name (method_options
    go to make_strategy), or a strategy built by make_strategy (its sampling and generator are
    used). `trace`, a list, gets per prompt one label per output token (engine.Step's labels)."""
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("empty prompt: generation needs at least one token to condition on")
    if longest + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} "
                         f"exceeds the model's context of {model.cfg.max_seq_len} tokens")
    strategy = method
    if not isinstance(method, Strategy):
        method = Method.parse(method)
        sampling = Sampling(temperature, top_k, top_p)
        batch_size = len(prompts) if method.batches else 1
        strategy = make_strategy(model, method, longest + max_new_tokens, sampling, generator,
                                 batch_size=batch_size, **method_options)
    if longest + max_new_tokens > strategy.max_len:
        raise ValueError(f"a prompt of {longest} tokens plus {max_new_tokens} new ones exceeds the "
                         f"{strategy.max_len} positions this strategy was built for")
    if strategy.batches and len(prompts) != strategy.batch_size:
        raise ValueError(f"{len(prompts)} prompts for a strategy built for batch size "
                         f"{strategy.batch_size}")
    groups = [prompts] if strategy.batches else [[p] for p in prompts]
    runs = [_decode(strategy, group, max_new_tokens, set(stop_ids)) for group in groups]
    if trace is not None:
        trace.extend(labels for run in runs for labels in run.labels)
    if stats is not None:
        for run in runs:
            stats.tokens += sum(map(len, run.outs))
            stats.forwards += run.forwards + len(run.outs)
            stats.prefills += len(run.outs)
            stats.prefill_tokens += sum(min(f, len(out)) for f, out in zip(run.first, run.outs))
            for checked, accepted in run.accepted:
                stats.record(checked, accepted)
    return [out for run in runs for out in run.outs]


@dataclass
class Run:
    """What one prefill and its steps produced: per row the output and its labels; the forwards that
    rows still decoding took part in (a batched forward counts once per such row), per row the
    tokens its prefill yielded, and (drafts checked, drafts accepted) of every row's every step."""
    outs: list
    labels: list
    first: list
    forwards: int = 0
    accepted: list = field(default_factory=list)


def _decode(strategy, prompts, max_new_tokens, stop_ids):
    # 1) One prefill of every row
    first = strategy.prefill(prompts)
    run = Run([list(s.tokens) for s in first], [list(s.labels) for s in first],
              [len(s.tokens) for s in first])
    live = [not _finished(out, out, max_new_tokens, stop_ids) for out in run.outs]
    # 2) Steps until every row has stopped, at a stop token or at max_new_tokens; a row that stopped
    # is no longer counted, and its tokens from later steps are dropped. A strategy that runs ahead
    # has its next step queued before this one's tokens reach the host, unless every row is sure to
    # be full after this one (a step adds at least one token).
    pending = strategy.step(live) if any(live) else None
    while pending is not None:
        ahead = None
        if strategy.runs_ahead and any(alive and len(out) + 1 < max_new_tokens
                                       for alive, out in zip(live, run.outs)):
            ahead = strategy.step(live)       # `live` of one step before: it reads no host state
        run.forwards += sum(live)
        for b, s in enumerate(pending.result()):
            if live[b]:
                run.outs[b] += s.tokens
                run.labels[b] += s.labels
                run.accepted.append((s.checked, s.accepted))
                live[b] = not _finished(run.outs[b], s.tokens, max_new_tokens, stop_ids)
        if not any(live):
            break                             # a step queued ahead is dropped
        pending = ahead if ahead is not None else strategy.step(live)
    # 3) Cut every row at its stop token or max_new_tokens
    run.outs = [_truncate(out, max_new_tokens, stop_ids) for out in run.outs]
    run.labels = [labels[:len(out)] for labels, out in zip(run.labels, run.outs)]
    return run


def _finished(out, new, max_new_tokens, stop_ids):
    """Whether a row ends with its `new` tokens (the last of `out`): full, or they carry a stop
    token."""
    return len(out) >= max_new_tokens or any(t in stop_ids for t in new)


def _truncate(out, max_new_tokens, stop_ids):
    for i, t in enumerate(out[:max_new_tokens]):
        if t in stop_ids:
            return out[:i + 1]
    return out[:max_new_tokens]


# --------------------------------------------------------------------------------------------------
# CLI: option checks that run before anything loads, then one prompt decoded

def method_arg(text):
    """An argparse type: a Method."""
    try:
        return Method.parse(text)
    except ValueError as e:
        raise ArgumentTypeError(str(e))


def check_model_args(args, methods):
    """Checks that need several options (methods: Methods); returns the torch dtype."""
    if args.compile and not args.device.startswith("cuda"):
        fail("--compile: only with --device cuda (the CPU path runs eagerly)")
    if args.temperature > 0 and any(m.kind == "tree" for m in methods):
        fail("--temperature: tree drafts decode greedily only (temperature 0); use mtp@D to sample")
    heads = any(m.uses_heads for m in methods)
    unused = [(args.heads, "--heads", heads), (args.draft_vocab, "--draft_vocab", heads),
              (args.adapter, "--adapter", any(m.uses_mask_tokens for m in methods))]
    for value, option, used in unused:
        if value is not None and not used:
            fail(f"{option}: no method here uses it (methods: {', '.join(map(str, methods))})")
    return getattr(torch,
                   args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))


def load_args(args, methods, dtype):
    """load.load_for with what `methods` use: MTP heads, a mask-token adapter (given or shipped)."""
    heads = adapter = None
    if any(m.uses_heads for m in methods):
        heads = SHIPPED if args.heads is None else args.heads
    if any(m.uses_mask_tokens for m in methods):
        adapter = SHIPPED if args.adapter is None else args.adapter
    return load_for(args.init_from, heads, adapter, args.device, dtype, args.draft_vocab)


def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", default="What is the capital of France?", help="the user's message")
    p.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat "
                   "template")
    p.add_argument("--method", type=method_arg, default="ar", help="ar, mtp@D, mtp@autoD, "
                   "tree@DxK, tree@b1-b2-... or tree@autoN (greedy only), static@K, confadapt@TAU "
                   f"or verified@K (D and K up to {MAX_DRAFTS}, TAU in (0, 1])")
    add_model_args(p, max_new_tokens=64)
    p.add_argument("--top_k", type=number(int, 1), default=None, help="sample among the k most "
                   "likely")
    p.add_argument("--top_p", type=number(float, 0, 1, low_open=True), default=None, help="nucleus "
                   "sampling: keep the smallest set of tokens whose probability reaches p")
    p.add_argument("--show", action="store_true", help="mark each token by how it was produced: "
                   "the main model, an accepted draft of depth d, or a kept mask prediction")
    args = p.parse_args(argv)
    method = args.method
    dtype = check_model_args(args, [method])
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        fail("--top_k and --top_p shape sampling: they need --temperature > 0")
    try:
        model, tokenizer, options = load_args(args, [method], dtype)
        # a from-scratch model's tokenizer has no template
        chat = not args.raw and tokenizer.has_chat
        ids = tokenizer.encode_chat(args.prompt) if chat else tokenizer.encode(args.prompt)
        generator = torch.Generator(args.device).manual_seed(args.seed)
        stats, trace = Stats(), []
        if len(ids) >= LONG_PREFILL:        # one forward over the whole prompt, silent otherwise
            print(f"prefill: {len(ids):,} prompt tokens in one forward on {args.device} ...",
                  file=sys.stderr)
        t0 = time.perf_counter()
        out = generate(model, [ids], args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                       tokenizer.stop_ids, generator, method, stats, trace, compile=args.compile,
                       **options)[0]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    except (ValueError, OSError) as e:
        fail(e)
    shown = [(t, d) for t, d in zip(out, trace[0]) if t not in tokenizer.stop_ids]
    tokens, labels = [t for t, _ in shown], [d for _, d in shown]
    if args.show:
        print("\n".join(render(tokenizer, tokens, labels, method.lossy, sys.stdout.isatty())))
    else:
        print(tokenizer.decode(tokens))
    print(f"--- {method}: {len(out)} tokens in {dt:.2f} s, {len(out) / dt:.1f} tokens/s, "
          f"{stats.tokens_per_forward:.2f} tokens per forward ({args.device}, "
          f"{model.embed.weight.dtype})")
    if method.lossy:
        print(f"LOSSY: {method} emits mask-token predictions that nothing checks; the text may "
              f"differ from the model's own greedy output")


if __name__ == "__main__":
    main()
