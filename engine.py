"""
The fixed-shape step machinery every decoding method stands on.

- `Sampling` and `verify`: the distribution a method samples from, and speculative verification.
- `Strategy`: the base of every method: static buffers, one KV cache written at positions, the
  prefill, the one interface (`prefill(prompts)`: one `Step` per row; `step(live)`: a `Pending` of
  them).
- `Graph`: a step captured once into a CUDA graph and replayed; `compiled`: torch.compile, once per
  model.

Every strategy keeps a static KV cache (layers.KVCache): a token's keys live in slot = its position
and a query sees slots up to its own position, so rejected drafts, mask tokens and padding need
no rollback: they are overwritten later. A strategy feeds its forward `query_len` tokens at a time,
padding with tokens beyond the position that nothing sees, so every step has one shape; with
graphs it pads prompts to one of PREFILL_LENGTHS, so prefills have few. On CUDA a step costs one
graph replay instead of ~1,500 kernel launches, and its one read-back to the host (`Pending`) is a
copy the host waits for only when it needs the tokens: a strategy whose steps need nothing from the
host (`runs_ahead`) has its next step queued first, so the GPU never waits for Python. On the CPU
everything runs eagerly.

bf16: a token's logits from a 1-token forward and from a 4-token forward round differently. Rows are
bitwise identical when the query length is the same, so `ar@Q`, padded to a method's query length Q,
is that method's bit-exact reference (`Strategy.query_len`, bench.py's exact-match column).

What is not here: the methods themselves (decode.py, draft_heads.py, draft_tree.py, draft_mask.py).
"""

import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch

# A step feeds at most this many tokens; caches hold this many slots beyond the last position a step
# may write, so every strategy built for the same max_len has the same cache length (bit-identical
# in bf16).
MAX_QUERY = 64
MAX_DRAFTS = 16   # mtp@D's D, a tree's depth, static/verified@K's K: far beyond what drafts reach
# With graphs, prompts are padded to the first of these that fits (capped at the strategy's
# max_len), each length replayed from its own graph; a longer prompt runs eagerly at its own length.
PREFILL_LENGTHS = (16, 32, 64, 128, 256, 512)


@dataclass
class Sampling:
    temperature: float = 0.0      # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self):
        return self.temperature <= 0

    def probs(self, logits):
        """The distribution we sample from: softmax(logits / T) after top-k and top-p truncation.
        (..., V). Only for sampling: greedy callers take the argmax."""
        logits = logits.float() / self.temperature
        if self.top_k is not None:
            kth = torch.topk(logits, min(self.top_k, logits.size(-1)), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p is not None:
            sorted_p, order = torch.sort(probs, dim=-1, descending=True)
            # the smallest prefix reaching top_p
            drop = sorted_p.cumsum(-1) - sorted_p > self.top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def pick(self, logits, generator=None):
        """One token per row of logits (..., V) -> (...)."""
        if self.greedy:
            return logits.argmax(-1)
        p = self.probs(logits)
        return torch.multinomial(p.reshape(-1, p.size(-1)), 1,
                                 generator=generator).view(p.shape[:-1])


def verify(drafts, draft_probs, target_logits, sampling, generator=None):
    """Speculative verification of one sequence (Leviathan et al., Chen et al.). drafts (D,)
    proposed tokens; draft_probs (D, V) the distributions they were drawn from (None when greedy);
    target_logits (D+1, V) the main model's logits at the position before each draft and after the
    last. Returns (number of drafts accepted, the token the main model adds after them)."""
    # accept while the draft equals the main model's argmax: plain greedy's output
    if sampling.greedy:
        target = target_logits.argmax(-1)
        n = int((drafts == target[:-1]).long().cumprod(0).sum())
        return n, int(target[n])
    p = sampling.probs(target_logits)                                   # (D+1, V)
    for i, x in enumerate(drafts.tolist()):
        u = torch.rand((), generator=generator, device=p.device)
        if u * draft_probs[i, x] <= p[i, x]:                            # accept with min(1, p/q)
            continue
        # else resample norm(max(0, p - q))
        residual = (p[i] - draft_probs[i]).clamp_min(0)
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[-1], 1, generator=generator))


class Step(NamedTuple):
    """What one prefill or one step gave one row."""
    tokens: list      # the new tokens
    checked: int      # drafts verified (static/confadapt: mask predictions offered)
    accepted: int     # of those, accepted (static/confadapt: kept)
    # per token: 0 the main model, d >= 1 an accepted draft or kept prediction of depth d
    labels: list


class Pending:
    """One step's result on its way to the host. On CUDA the device tensor is copied to pinned
    memory without waiting, so the host can queue more work meanwhile; `result()` waits for that
    copy alone and builds the step's `Step`s from its rows (`build`: a list of rows -> Steps)."""

    def __init__(self, tensor, build):
        self.build, self.host, self.copied = build, tensor, None
        if tensor.is_cuda:
            # a copy, not the tensor: a graph's output is rewritten by its next replay
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()

    def result(self):
        if self.copied is not None:
            self.copied.synchronize()
        return self.build(self.host.tolist())


class Ready(NamedTuple):
    """A step the host has finished itself (its tokens were needed there): `Pending`'s interface."""
    steps: list

    def result(self):
        return self.steps


def drafted(tokens, checked):
    """A verification step's record: the accepted drafts first, the main model's own token last."""
    return Step(tokens, checked, len(tokens) - 1, list(range(1, len(tokens))) + [0])


def predicted(tokens, offered):
    """A mask-token step's record: the main model's next-token prediction first, then the masks'."""
    return Step(tokens, offered, len(tokens) - 1, list(range(len(tokens))))


class Graph:
    """`fn()` reads and writes only tensors allocated before the first call (static buffers, caches)
    and returns tensors. Eagerly, it simply runs. On CUDA its first call captures it into a CUDA
    graph (after warm-up runs, which compile and autotune), every call replays it; the returned
    tensors are the graph's own buffers, rewritten by the next replay. `fn` must be idempotent:
    warm-up runs it several times."""

    def __init__(self, fn, enabled):
        self.fn, self.enabled, self.graph, self.out = fn, enabled, None, None

    def __call__(self):
        if not self.enabled:
            return self.fn()
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.fn()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.fn()
        self.graph.replay()
        return self.out


_compiled = weakref.WeakKeyDictionary()


def compiled(model):
    """(forward, head_forward) of `model` through torch.compile, built once per model so that every
    strategy shares the kernels: a verify forward and `ar` padded to the same length then run the
    same code (bit-identical bf16)."""
    if model not in _compiled:
        _compiled[model] = (torch.compile(model.forward, fullgraph=True, dynamic=False),
                            torch.compile(model.head_forward, fullgraph=True, dynamic=False))
    return _compiled[model]


class Strategy:
    """What every method shares: the static buffers, the model's (possibly compiled) functions,
    graph or eager, the prefill, and the one interface: `prefill(prompts)` returns one `Step` per
    row, `step(live)` a `Pending` (or `Ready`) whose result() is one `Step` per row. `batches`:
    whether it decodes B prompts as B rows; the others take one prompt at a time. `runs_ahead`: its
    next step needs nothing from this one's result on the host, so generate queues it before
    waiting for this one (on CUDA; on the CPU nothing overlaps, and a stop token would waste the
    step queued)."""
    batches = False

    def __init__(self, model, batch_size, max_len, query_len, sampling, generator, graphs, compile):
        if query_len > MAX_QUERY:
            raise ValueError(f"a step of {query_len} tokens exceeds MAX_QUERY={MAX_QUERY}")
        self.model, self.sampling, self.generator = model, sampling, generator
        self.max_len, self.query_len = max_len, query_len
        self.device = model.embed.weight.device
        self.cache_len = max_len + 2 * MAX_QUERY
        # tokens past the model's context are never emitted; their positions are clamped for GPT-2's
        # table
        self.last_pos = model.cfg.max_seq_len - 1
        self.tokens = torch.zeros(batch_size, self.cache_len, dtype=torch.long, device=self.device)
        # each row's newest
        self.newest = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.rows = torch.arange(batch_size, device=self.device)
        self.lens = torch.zeros(batch_size, dtype=torch.long, device=self.device)   # prompts'
        self.forward, self.head_forward = (compiled(model) if compile
                                           else (model.forward, model.head_forward))
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        self.runs_ahead = False
        # padding bounds the graphs to capture; run eagerly, a prompt is cheapest at its own length
        self.prefill_lengths = PREFILL_LENGTHS if self.graphs else ()
        self.prefills = {}    # padded prompt length -> its Graph

    @property
    def batch_size(self):
        return self.tokens.size(0)

    def positions(self, pos):
        return pos.clamp_max(self.last_pos)

    def prefill(self, prompts):
        """B prompts right-padded to one length (with graphs, one of PREFILL_LENGTHS) in one forward
        over the main model's caches (`self.caches`, which each strategy builds), replayed from a
        graph per length; the pads lie beyond each row's last position, so nothing sees them.
        Writes each row's prompt and, after it, the first new token, its newest. Returns one Step
        per row: that token."""
        assert len(prompts) == self.batch_size, (len(prompts), self.batch_size)
        lens = [len(p) for p in prompts]
        n = min(next((n for n in self.prefill_lengths if n >= max(lens)), max(lens)), self.max_len)
        padded = torch.zeros(len(prompts), n, dtype=torch.long)
        for b, p in enumerate(prompts):
            padded[b, :len(p)] = torch.tensor(p)
        self.tokens[:, :n] = padded.to(self.device)
        self.lens.copy_(torch.tensor(lens))
        if n not in self.prefills:
            graphed = self.graphs and n <= PREFILL_LENGTHS[-1]
            self.prefills[n] = Graph(lambda: self.prefill_forward(n), graphed)
        nxt = self.sampling.pick(self.prefills[n](), self.generator)
        self.tokens[self.rows, self.lens] = nxt
        self.newest.copy_(self.lens)
        return [Step([t], 0, 0, [0]) for t in nxt.tolist()]

    def prefill_forward(self, n):
        """The forward of every row's first n positions over the caches; returns the logits after
        each prompt (B, V). Head strategies extend it to the heads' caches."""
        pos = self.model.default_pos(self.tokens[:, :n])
        x = self.model.hidden(self.tokens[:, :n], pos, self.caches)
        return self.model.logits(x[self.rows, self.lens - 1])
