"""
Generation: one `generate` loop, decoding methods as small strategies, every step of fixed shape.

- `ar`            plain autoregressive decoding, batched, one token per forward; `ar@Q` pads each step to Q tokens.
- `mtp@D`         Paper B: the MTP heads draft D tokens, the main model verifies them in one forward. Lossless:
                  greedy output is identical to `ar`, sampled output follows the same distribution. `mtp@autoD`
                  picks each step's depth in 0..D (`DepthRule`).
- `tree@DxK`      the MTP heads draft a tree (top K at depth 1, halving deeper; or `tree@b1,b2,...`; or
                  `tree@autoN`, N nodes chosen by draft probability), the main model verifies it in one forward.
                  Lossless, greedy only.
- `static@K`      Paper A: K-1 mask tokens after the text, emit all K predictions per forward. LOSSY.
- `confadapt@TAU` Paper A: as static, but emit only the leading predictions whose top-1 probability >= TAU
                  (at least one), k = the model's k_max (`confadapt@TAU:K`: k = K). LOSSY.
- `verified@K`    mask-token drafts checked by the model's own next-token predictions in the next forward.
                  Lossless with respect to the mask-token model's own one-token-at-a-time decoding.

The engine. Every strategy keeps a static KV cache (model.py): a token's keys live in slot = its position and a query
sees slots up to its own position, so rejected drafts, mask tokens and padding need no rollback: they are overwritten
later. That makes every decoding step the same shape: a strategy feeds its forward `query_len` tokens at a time,
padding with tokens beyond the position that nothing sees, and keeps its state (tokens, positions, hidden states) in
device buffers. On CUDA each step is captured once into a CUDA graph and replayed (`Graph`), so a step costs one
replay and one host read-back instead of ~1,200 kernel launches; `compile=True` also runs the model through
torch.compile. Prefill runs eagerly. On the CPU the same step code runs eagerly.

bf16: a token's logits from a 1-token forward and from a 4-token forward round differently, so a verify forward
(D+1 tokens) would drift from plain greedy (1 token). Rows are bitwise identical when the query length is the same,
so `ar@Q`, padded to a method's query length Q, is that method's bit-exact reference (`Strategy.query_len`,
bench.py's exact-match column).

`ar` and `mtp@D` decode a batch of prompts as one batch (each row at its own positions, accepting its own number of
drafts per step); trees and the mask-token methods decode one prompt at a time. Nothing here trains or measures speed
(bench.py does); each call can fill a `Stats` with forwards and per-depth acceptance, and a `trace` with how each
token was produced.

CLI: python decode.py --init_from smollm2 --prompt "What is the capital of France?" [--method mtp@3] [--show]
"""

import argparse
import itertools
import math
import sys
import time
import weakref
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# A step feeds at most this many tokens; caches hold this many slots beyond the last position a step may write, so
# every strategy built for the same max_len has the same cache length (bit-identical attention in bf16).
MAX_QUERY = 64
from load import BUNDLED, DEFAULT_HEADS, DEFAULT_MASK, attach_heads, attach_mask_adapter, load, read_json


# ----------------------------------------------------------------------------------------------------------------
# sampling and verification

@dataclass
class Sampling:
    temperature: float = 0.0      # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self):
        return self.temperature <= 0

    def probs(self, logits):
        """The distribution we sample from: softmax(logits / T) after top-k and top-p truncation. (..., V)
        Only for sampling: greedy callers take the argmax."""
        logits = logits.float() / self.temperature
        if self.top_k is not None:
            kth = torch.topk(logits, min(self.top_k, logits.size(-1)), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p is not None:
            sorted_p, order = torch.sort(probs, dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > self.top_p     # keep the smallest prefix reaching top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def pick(self, logits, generator=None):
        """One token per row of logits (..., V) -> (...)."""
        if self.greedy:
            return logits.argmax(-1)
        p = self.probs(logits)
        return torch.multinomial(p.reshape(-1, p.size(-1)), 1, generator=generator).view(p.shape[:-1])


def verify(drafts, draft_probs, target_logits, sampling, generator=None):
    """Speculative verification of one sequence (Leviathan et al., Chen et al.).
    drafts (D,) proposed tokens; draft_probs (D, V) the distributions they were drawn from (None when greedy);
    target_logits (D+1, V) the main model's logits at the position before each draft and after the last.
    Returns (number of drafts accepted, the token the main model adds after them)."""
    if sampling.greedy:   # accept while the draft equals the main model's argmax; identical to plain greedy
        target = target_logits.argmax(-1)
        n = int((drafts == target[:-1]).long().cumprod(0).sum())
        return n, int(target[n])
    p = sampling.probs(target_logits)                                   # (D+1, V)
    for i, x in enumerate(drafts.tolist()):
        u = torch.rand((), generator=generator, device=p.device)
        if u * draft_probs[i, x] <= p[i, x]:                             # accept with min(1, p/q)
            continue
        residual = (p[i] - draft_probs[i]).clamp_min(0)                 # else resample from norm(max(0, p - q))
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[-1], 1, generator=generator))


@dataclass
class Stats:
    """Counters filled by generate. Tokens and forwards count everything (prefill included); tokens per forward
    leaves out the prefill forwards and the tokens they yield, as DESIGN.md "Metrics" defines it, so `ar` has
    exactly one. A batched forward counts once per row still decoding. Acceptance counts only steps that checked at
    least one draft."""
    tokens: int = 0
    forwards: int = 0
    prefills: int = 0                                  # prompts decoded (one prefill forward each)
    prefill_tokens: int = 0                            # tokens those prefills yielded (k for static@K)
    steps: int = 0                                     # verification steps (speculative methods)
    proposed: list = field(default_factory=list)       # proposed[d]: drafts at depth d+1 that were checked
    accepted: list = field(default_factory=list)       # accepted[d]: drafts at depth d+1 that were accepted
    reached: list = field(default_factory=list)        # reached[d]: steps where depths 1..d+1 were all accepted
    accepted_lengths: list = field(default_factory=list)   # accepted_lengths[n]: steps that accepted n drafts

    def record(self, n_drafts, n_accepted):
        for counts in (self.proposed, self.accepted, self.reached):
            counts.extend([0] * (n_drafts - len(counts)))
        if n_drafts == 0:      # a forward with nothing to verify (verified@K after a rejection) is not a step
            return
        self.steps += 1
        self.accepted_lengths.extend([0] * (n_drafts + 1 - len(self.accepted_lengths)))
        self.accepted_lengths[n_accepted] += 1
        for d in range(min(n_accepted + 1, n_drafts)):  # depth d is checked only if every earlier depth passed
            self.proposed[d] += 1
        for d in range(n_accepted):
            self.accepted[d] += 1
            self.reached[d] += 1

    @property
    def tokens_per_forward(self):
        return (self.tokens - self.prefill_tokens) / max(self.forwards - self.prefills, 1)

    @property
    def acceptance_rate(self):
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]

    @property
    def cum_acceptance_rate(self):
        return [r / self.steps if self.steps else 0.0 for r in self.reached]


# ----------------------------------------------------------------------------------------------------------------
# the engine: fixed-shape steps, replayed from CUDA graphs

class Graph:
    """`fn()` reads and writes only tensors allocated before the first call (static buffers, caches) and returns
    tensors. Eagerly, it simply runs. On CUDA its first call captures it into a CUDA graph (after warm-up runs, which
    compile and autotune), every call replays it; the returned tensors are the graph's own buffers, rewritten by the
    next replay. `fn` must be idempotent: warm-up runs it more than once on the same state."""

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
    """(forward, head_forward) of `model` through torch.compile, built once per model so that every strategy shares
    the kernels: a verify forward and `ar` padded to the same length then run the same code (bit-identical bf16)."""
    if model not in _compiled:
        _compiled[model] = (torch.compile(model.forward, fullgraph=True, dynamic=False),
                            torch.compile(model.head_forward, fullgraph=True, dynamic=False))
    return _compiled[model]


class Strategy:
    """What every method shares: the static buffers, the model's (possibly compiled) functions, graph or eager.
    A `batched` strategy decodes B prompts as B rows (generate's batched loop); the others take one prompt at a time."""
    batched = False
    speculative = False

    def __init__(self, model, batch_size, max_len, query_len, sampling, generator, graphs, compile):
        if query_len > MAX_QUERY:
            raise ValueError(f"a step of {query_len} tokens exceeds MAX_QUERY={MAX_QUERY}")
        self.model, self.sampling, self.generator = model, sampling, generator
        self.max_len, self.query_len = max_len, query_len
        self.device = model.embed.weight.device
        self.cache_len = max_len + 2 * MAX_QUERY
        # tokens past the model's context are never emitted; their positions are clamped to keep GPT-2's table happy
        self.last_pos = model.cfg.max_seq_len - 1
        self.tokens = torch.zeros(batch_size, self.cache_len, dtype=torch.long, device=self.device)
        self.forward, self.head_forward = compiled(model) if compile else (model.forward, model.head_forward)
        self.graphs = self.device.type == "cuda" if graphs is None else graphs

    def positions(self, pos):
        return pos.clamp_max(self.last_pos)

    def prefill_rows(self, prompts, caches):
        """B prompts right-padded into one eager forward over `caches`; the pads lie beyond each row's last position,
        so nothing sees them. Writes each row's first new token after its prompt.
        Returns (the states head 1 starts from (B, T, C), positions (B, T), prompt lengths (B,), first new tokens
        (B,))."""
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        for b, p in enumerate(prompts):
            self.tokens[b, :len(p)] = torch.tensor(p, device=self.device)
        n = int(lens.max())
        pos = self.model.default_pos(self.tokens[:, :n])
        x, taps = self.model.hidden(self.tokens[:, :n], pos, caches, keep_taps=True)
        rows = torch.arange(len(prompts), device=self.device)
        nxt = self.sampling.pick(self.model.logits(x[rows, lens - 1]), self.generator)
        self.tokens[rows, lens] = nxt
        return self.model.head_input(x, taps), pos, lens, nxt


class Autoregressive(Strategy):
    """Plain decoding of a batch, one token per forward; the reference every other method is compared with.
    Each step feeds every row's newest token followed by query_len-1 pads (bf16 reference for a method that feeds
    query_len tokens; 1 is the fastest plain decoding)."""
    batched = True

    def __init__(self, model, max_len, sampling=Sampling(), generator=None, batch_size=1, query_len=1, graphs=None,
                 compile=False):
        super().__init__(model, batch_size, max_len, query_len, sampling, generator, graphs, compile)
        self.rows = torch.arange(batch_size, device=self.device)
        self.offsets = torch.arange(query_len, device=self.device)
        self.newest = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # each row's newest token
        self.caches, _ = model.make_caches(batch_size, self.cache_len)
        # greedy: the pick joins the graph; sampling draws from its generator outside it
        self.next = Graph(self._next_token if sampling.greedy else self._next_logits, self.graphs)

    def _next_logits(self):
        pos = self.newest[:, None] + self.offsets                  # (B, query_len): the newest token, then pads
        return self.forward(self.tokens.gather(1, pos), self.positions(pos), self.caches)[:, 0]

    def _next_token(self):
        nxt = self._next_logits().argmax(-1)
        self.tokens[self.rows, self.newest + 1] = nxt
        return nxt

    def prefill(self, prompts):
        """prompts: B lists of ids; returns the first new token of each row (B,)."""
        _, _, lens, nxt = self.prefill_rows(prompts, self.caches)
        self.newest.copy_(lens)
        return nxt

    def step(self, live):
        """Every row's next token, stopped rows included (live: which rows still decode, unused here), and per row
        (drafts checked, accepted): none."""
        if self.sampling.greedy:
            nxt = self.next()
        else:
            nxt = self.sampling.pick(self.next(), self.generator)
            self.tokens[self.rows, self.newest + 1] = nxt
        self.newest += 1              # in place, outside the graph: the graph reads it and must stay idempotent
        return [[t] for t in nxt.tolist()], [(0, 0)] * len(nxt)    # the step's one host read-back


COST_REPEATS = 5       # timed replays per depth when HeadDrafts measures its step costs
ACCEPT_PRIOR = 0.7     # a depth's acceptance before any evidence: optimistic, so drafting gets tried
PRIOR_WEIGHT = 4.0     # ... worth this many observed drafts
ACCEPT_DECAY = 0.95    # per step: older evidence fades, so the estimate follows the text (about 20 steps' memory)


class DepthRule:
    """How many tokens to draft this step, so that speculation never costs more than it saves.

    A step of depth k (k drafts, then one verify forward of k+1 tokens per row) yields on average
    E(k) = 1 + a1 + a1 a2 + ... + a1 ... ak tokens per row, a_d the acceptance of depth d given depths 1..d-1 were
    accepted, and takes costs[k] times as long as a plain one-token step (costs[0] = 1). The rule drafts
    k = argmax E(k) / costs[k] over 0..D (the smallest k on ties): k = 0 is plain decoding. As the batch grows, the
    verify forward stops being almost free (costs[k] rises towards k+1) and the rule drafts less, or not at all.
    a_d: decayed counts of accepted / checked drafts of rows still decoding, with a prior. costs: measured per
    strategy (one batch size, one device) by HeadDrafts.measure_costs, or given."""

    def __init__(self, depths, costs=None):
        if costs is not None and (len(costs) != depths + 1 or min(costs) <= 0):
            raise ValueError(f"costs: expected {depths + 1} positive step costs (depths 0..{depths}), got {costs}")
        self.costs = costs
        self.accepted = [ACCEPT_PRIOR * PRIOR_WEIGHT] * depths
        self.checked = [PRIOR_WEIGHT] * depths

    @property
    def acceptance(self):
        return [a / c for a, c in zip(self.accepted, self.checked)]

    def expected_tokens(self):
        """E(k) for k = 0..D."""
        out, reach = [1.0], 1.0
        for a in self.acceptance:
            reach *= a
            out.append(out[-1] + reach)
        return out

    def choose(self):
        gains = [e / c for e, c in zip(self.expected_tokens(), self.costs)]
        return gains.index(max(gains))

    def observe(self, depth, ns):
        """A step of `depth` in which rows still decoding accepted ns drafts each: depth d was checked in the rows
        that accepted d-1 or more, and accepted in those that accepted d or more."""
        for d in range(1, depth + 1):
            checked = sum(n >= d - 1 for n in ns)
            if checked:
                self.checked[d - 1] = ACCEPT_DECAY * self.checked[d - 1] + checked
                self.accepted[d - 1] = ACCEPT_DECAY * self.accepted[d - 1] + sum(n >= d for n in ns)


class HeadStrategy(Strategy):
    """What the head-drafting methods (mtp, tree) share: the schedule of MTP modules over draft depths (a looped
    schedule reuses the last head), the draft vocabulary, the states head 1 starts from by position (the main
    model's hidden states, fused with lower blocks' where the heads file says so), one KV cache per draft depth, and
    the prefill that fills them for B rows."""

    def __init__(self, model, batch_size, max_len, query_len, depths, schedule, draft_ids, sampling, generator,
                 graphs, compile, method):
        if len(model.heads) == 0:
            raise ValueError(f"method {method} needs a model with MTP heads (train.py --mode heads, or --heads FILE)")
        super().__init__(model, batch_size, max_len, query_len, sampling, generator, graphs, compile)
        self.schedule = schedule or [min(d, len(model.heads) - 1) for d in range(depths)]  # loop the last head
        if len(self.schedule) != depths or max(self.schedule) >= len(model.heads):
            raise ValueError(f"head schedule {self.schedule} does not fit {depths} depths and {len(model.heads)} heads")
        self.depths, self.window = depths, 2 * depths
        # the output rows of the draft vocabulary, gathered once (a reduced vocabulary makes each draft cheaper)
        self.draft_ids = draft_ids
        self.draft_head = None if draft_ids is None else model.lm_head.weight[draft_ids]
        self.newest = torch.zeros(batch_size, dtype=torch.long, device=self.device)        # each row's L
        self.hidden = torch.zeros(batch_size, self.cache_len, model.cfg.n_embd, device=self.device,
                                  dtype=model.embed.weight.dtype)
        self.caches, self.depth_caches = model.make_caches(batch_size, self.cache_len, n_depths=depths)
        self.window_offsets = torch.arange(self.window, device=self.device)

    def prefill(self, prompts):
        """prompts: B lists of ids; the main model and then every depth over each row's prompt. Returns the first new
        token of each row (B,)."""
        h, pos, lens, nxt = self.prefill_rows(prompts, self.caches)
        n = h.size(1)
        self.hidden[:, :n] = h
        self.newest.copy_(lens)
        for d in range(1, self.depths + 1):   # the heads' caches over the prompts; the last positions are redone later
            h = self.model.head_forward(self.schedule[d - 1], h, self.tokens[:, d:n + d], pos, self.depth_caches[d - 1])
        return nxt


class HeadDrafts(HeadStrategy):
    """Paper B: the MTP heads draft `depths` tokens, the main model verifies them in one forward; B rows at once.

    Positions of one row, with L the row's newest token (known for certain, not yet in the main cache):

        tokens    ... t[L-1]  t[L]  | t[L+1] ... t[L+D]      drafts, written by depths 1..D
        depth 0   ... h0[L-1]       |                        main states (model.head_input), final up to L-1
        depth d   position i reads h[d-1][i] and t[i+d], predicts t[i+d+1]; its state at L-1 drafts t[L+d]

    Depth d runs MTP module schedule[d-1] (a looped schedule reuses the last head). A depth's state at position i is
    final once t[i+d] is; after a step accepting n of D drafts, at most n+d positions of depth d are not, so every
    depth recomputes a fixed window of the last 2D positions before L (recomputing final ones changes nothing),
    which keeps the step one shape. Then one forward of t[L..L+D] verifies: it accepts the longest run of drafts
    that equal the main model's argmax and adds the main model's own next token.

    Every row has its own L (`newest`, (B,)): windows and verified tokens are gathered per row, each row accepts its
    own n and advances by n+1. The caches write each row at its own positions, so rows never wait for each other.
    A row that has finished keeps computing (fixed shapes) but stops advancing at max_len; generate drops its tokens.

    adaptive=True (mtp@autoD): each step drafts `DepthRule`'s choice of 0..D tokens (0: a plain one-token forward),
    one CUDA graph per depth. A step of depth k < D leaves depths k+1..D behind; the 2D window catches up what fits
    and older positions of those depths keep stale states. That only lowers their drafts' acceptance: verification
    keeps the output exact (in float32; in bf16 the mixed query lengths round as no single ar@Q does)."""
    batched = True
    speculative = True

    def __init__(self, model, max_len, depths, schedule=None, draft_ids=None, adaptive=False, costs=None,
                 sampling=Sampling(), generator=None, batch_size=1, graphs=None, compile=False):
        super().__init__(model, batch_size, max_len, depths + 1, depths, schedule, draft_ids, sampling, generator,
                         graphs, compile, "mtp")
        self.rows = torch.arange(batch_size, device=self.device)[:, None]                  # (B, 1)
        self.advanced = torch.zeros_like(self.newest)                                      # each row's L after a step
        self.step_offsets = torch.arange(depths + 1, device=self.device)
        # one graph per depth in use; costs: a DepthRule table given (None: measured at the first step)
        self.rule = DepthRule(depths, costs) if adaptive else None
        self.greedy_steps = {k: Graph(partial(self._greedy_step, k), self.graphs and sampling.greedy)
                             for k in (range(depths + 1) if adaptive else [depths])}

    def draft(self, depth):
        """Depths 1..depth in turn, each on its window; writes t[L+1..L+depth] of every row.
        Returns (drafts (B, depth), their distributions (B, depth, V) or None when greedy or depth 0)."""
        L = self.newest[:, None]                                  # (B, 1)
        start = (L - self.window).clamp_min(0)
        pos = start + self.window_offsets                         # (B, W)
        at = (L - 1 - start)[..., None].expand(-1, -1, self.hidden.size(-1))   # (B, 1, C): the window row of L-1
        h, probs = self.hidden.gather(1, pos[..., None].expand(-1, -1, self.hidden.size(-1))), []   # (B, W, C)
        for d in range(1, depth + 1):
            h = self.head_forward(self.schedule[d - 1], h, self.tokens.gather(1, pos + d), self.positions(pos),
                                  self.depth_caches[d - 1])
            logits = self.model.logits(h.gather(1, at), self.draft_head)[:, 0]    # (B, V'): predicts t[L+d]
            if self.sampling.greedy:
                tok = logits.argmax(-1, keepdim=True)
            else:
                q = self.sampling.probs(logits)
                tok = torch.multinomial(q, 1, generator=self.generator)
                if self.draft_ids is not None:   # back to a full-vocabulary distribution
                    q = q.new_zeros(q.size(0), self.model.cfg.vocab_size).index_copy_(1, self.draft_ids, q)
                probs.append(q)
            self.tokens.scatter_(1, L + d, tok if self.draft_ids is None else self.draft_ids[tok])
        return self.tokens.gather(1, L + 1 + self.step_offsets[:depth]), torch.stack(probs, 1) if probs else None

    def check(self, depth):
        """The verify forward over t[L..L+depth] of every row; stores the states head 1 starts from (rows past the
        accepted ones are rewritten before anything reads them). Returns the main model's logits (B, depth+1, V)."""
        pos = self.newest[:, None] + self.step_offsets[:depth + 1]   # (B, depth+1)
        logits, h = self.forward(self.tokens.gather(1, pos), self.positions(pos), self.caches, return_hidden=True)
        self.hidden[self.rows, pos] = h
        return logits

    def accept(self, n, nxt):
        """Each row's accepted count n (B,) and its next token nxt (B,): writes t[L+n+1] and the row's L after the
        step (a finished row stops at max_len, so its buffers never overflow)."""
        self.tokens[self.rows[:, 0], self.newest + n + 1] = nxt
        torch.clamp_max(self.newest + n + 1, self.max_len, out=self.advanced)

    def _greedy_step(self, depth):
        drafts, _ = self.draft(depth)
        target = self.check(depth).argmax(-1)                     # (B, depth+1)
        n = (drafts == target[:, :-1]).long().cumprod(1).sum(1)   # (B,)
        self.accept(n, target.gather(1, n[:, None])[:, 0])
        return torch.cat([n[:, None], self.tokens.gather(1, self.newest[:, None] + 1 + self.step_offsets[:depth + 1])],
                         1)

    def step(self, live):
        """One draft-and-verify step of every row, finished rows included; live[b]: row b is still decoding (the
        depth rule learns from those rows only). Returns (per row the new tokens, per row (drafts checked, drafts
        accepted))."""
        if self.rule is not None and self.rule.costs is None:
            self.rule.costs = self.measure_costs()
        depth = self.depths if self.rule is None else self.rule.choose()
        if self.sampling.greedy:
            out = self.greedy_steps[depth]().tolist()            # (B, 1 + depth+1): n, t[L+1..]; one read-back
            ns, new = [r[0] for r in out], [r[1:r[0] + 2] for r in out]
        else:
            drafts, q = self.draft(depth)
            logits = self.check(depth)
            ns, nxt = zip(*(verify(drafts[b], None if q is None else q[b], logits[b], self.sampling, self.generator)
                            for b in range(len(drafts))))   # q is None at depth 0
            self.accept(torch.tensor(ns, device=self.device), torch.tensor(nxt, device=self.device))
            new = [row[:n] + [t] for row, n, t in zip(drafts.tolist(), ns, nxt)]
        self.newest.copy_(self.advanced)   # outside the graph: the graph reads newest and must stay idempotent
        if self.rule is not None:
            self.rule.observe(depth, [n for n, alive in zip(ns, live) if alive])
        return new, [(depth, n) for n in ns]

    def measure_costs(self):
        """Wall time of a greedy step of every depth, its read-back included, over that of depth 0; each step run
        COST_REPEATS times after its warm-up (graph capture). The steps are idempotent, so timing them changes no
        decoding state."""
        seconds = []
        for step in self.greedy_steps.values():
            step().tolist()
            t0 = time.perf_counter()
            for _ in range(COST_REPEATS):
                step().tolist()   # waits for the device, as a real step does
            seconds.append(time.perf_counter() - t0)
        return [s / seconds[0] for s in seconds]


class TreeDrafts(HeadStrategy):
    """Tree drafts for `mtp` (Medusa, EAGLE-2): each depth proposes its top candidates after every candidate of the
    depth before, and one main forward verifies the whole tree. Greedy only: the output is identical to `ar`
    (sampling from a tree needs multi-draft rejection sampling, which is not built: use mtp@D to sample).

    The tree, branches (b_1, ..., b_D): the root (node 0) is t[L]; level d holds the top-b_d tokens after each node
    of level d-1, node by node, best first. So the first node of every level is the chain mtp@D drafts (a tree of
    ones is that chain), and every step has the same N nodes: one query of 1 + N tokens.

    Drafting, per depth d, one call of its head over two kinds of query: the window (positions L-1-2D..L-2,
    recomputed each step as HeadDrafts does, from the chain's tokens) and every node of level d-1, at position
    L-1. A node's input is its parent's state of depth d-1 and its own token (the root: h0[L-1] and t[L]); its query
    sees the depth's cache up to slot L-2 and its own key, written to a scratch slot beyond the sequence; its top
    b_d tokens become its children. Exact at depths 1 and 2. From depth 3 on, an off-chain node sees the chain's
    states at L-2, L-3, ... (computed from the chain's tokens, not its own ancestors'): an approximation of drafting
    only, which verification keeps lossless.

    Verification: one forward of [t[L], nodes...] at positions L + level, the root in slot L and the nodes in their
    scratch slots; each query sees the prefix (slots < L), its ancestors and itself. Siblings carry distinct tokens,
    so the nodes that equal their parent's argmax form one path from the root: it is accepted, and the main model's
    argmax at its last node is the bonus token. The path's keys, values and hidden states then move to slots
    L+1..L+n, so that the next step starts from slot = position again. All of it is one graphed step.
    bf16: unlike a chain's, a tree's output is not bit-identical to ar@(1+N), since attention sums an ancestor's
    values from its scratch slot, in another order than from its positional slot; rare near-ties can then differ."""
    speculative = True

    def __init__(self, model, max_len, branches, schedule=None, draft_ids=None, sampling=Sampling(), generator=None,
                 graphs=None, compile=False):
        if not sampling.greedy:
            raise ValueError("tree drafts decode greedily only (temperature 0): sampling from a tree is not built; "
                             "use mtp@D to sample")
        depths = len(branches)
        sizes = [1]                                                # nodes per level, the root's included
        for b in branches:
            sizes.append(sizes[-1] * b)
        super().__init__(model, 1, max_len, sum(sizes), depths, schedule, draft_ids, sampling, generator, graphs,
                         compile, "tree")
        self.branches = list(branches)
        self.first = [0] + list(itertools.accumulate(sizes))      # level d is nodes first[d] .. first[d+1]-1
        parents, levels = [0], [0]
        for d, b in enumerate(branches, 1):
            for node in range(self.first[d - 1], self.first[d]):
                parents += [node] * b
                levels += [d] * b
        up = [[0] * (depths + 1)]                                  # up[i][k]: node i's ancestor at level k, i past it
        for i in range(1, len(parents)):
            up.append(up[parents[i]][:levels[i]] + [i] * (depths + 1 - levels[i]))
        self.parents, self.levels, self.up = (torch.tensor(x, device=self.device) for x in (parents, levels, up))
        self.ancestors = torch.tensor([[j in row[:levels[i] + 1] for j in range(len(up))] for i, row in enumerate(up)],
                                      device=self.device)                   # (1+N, 1+N): ancestor or self
        self.nodes = torch.zeros(self.query_len, dtype=torch.long, device=self.device)   # the tree's tokens
        self.slot_ids = torch.arange(self.cache_len, device=self.device)
        self.scratch = self.cache_len - MAX_QUERY + torch.arange(self.query_len, device=self.device)  # node i's slot
        self.path_offsets = torch.arange(depths + 1, device=self.device)
        self.greedy_step = Graph(self._greedy_step, self.graphs)

    def prefill(self, prompt):
        return super().prefill([prompt]).tolist()

    def draft(self):
        """Depths 1..D, one head call each over the window and the nodes of the level before; writes the tree's
        tokens to self.nodes and its first path (the chain, which the window reads at later depths) to t[L+1..]."""
        L = self.newest
        win = (L - 1 - self.window).clamp_min(0) + self.window_offsets          # (W,) positions, up to L-2
        self.nodes[:1] = self.tokens[0, L]
        h_win, h_nodes = self.hidden[:, win], self.hidden[:, L - 1]             # (1, W, C), the root's (1, 1, C)
        for d, b in enumerate(self.branches, 1):
            lo, hi, end = self.first[d - 1], self.first[d], self.first[d + 1]  # level d-1: lo..hi-1; d: hi..end-1
            h_win, logits, states = self.depth(d, win, h_win, h_nodes, self.nodes[lo:hi])
            top = logits.topk(b, -1).indices.flatten()                          # children, in order
            self.nodes[hi:end] = top if self.draft_ids is None else self.draft_ids[top]
            self.tokens[0, L + d] = self.nodes[hi:hi + 1]
            h_nodes = states.repeat_interleave(b, 1)                            # each child's parent state

    def depth(self, d, win, h_win, h_nodes, tokens):
        """Depth d's head over the window (states h_win) and the given nodes (their parents' states h_nodes and
        their tokens), each node a query at position L-1 in its own scratch slot. Returns the window's new states,
        the nodes' draft logits and their states."""
        L, n = self.newest, len(tokens)
        slots = torch.cat([win, self.scratch[:n]])
        sees = torch.cat([win, (L - 2).expand(n)])                              # the last prefix slot each query sees
        mask = (self.slot_ids <= sees[:, None]) | (self.slot_ids == slots[:, None])
        pos = torch.cat([win, (L - 1).expand(n)])
        idx = torch.cat([self.tokens[0, win + d], tokens])
        h = self.head_forward(self.schedule[d - 1], torch.cat([h_win, h_nodes], 1), idx[None],
                              self.positions(pos)[None], self.depth_caches[d - 1], mask[None], slots[None])
        states = h[:, self.window:]
        return h[:, :self.window], self.model.logits(states[0], self.draft_head), states

    def _greedy_step(self):
        self.draft()
        L = self.newest
        slots = torch.cat([L, self.scratch[1:]])
        mask = (self.slot_ids < L).expand(self.query_len, -1).index_copy(1, slots, self.ancestors)
        logits, h = self.forward(self.nodes[None], self.positions(L + self.levels)[None], self.caches, mask[None],
                                 return_hidden=True, slots=slots[None])
        target = logits[0].argmax(-1)                                  # the main model's token after each node
        wrong = (self.nodes != target[self.parents]) & (self.levels > 0)  # the root (level 0) is known
        accepted = ~(self.ancestors & wrong).any(1)                    # right from the root down to the node
        last = (accepted * self.levels).argmax(0, keepdim=True)        # the accepted path's end: its deepest node
        n, path = self.levels[last], self.up[last][0]                  # path: root, levels 1..n, then `last` again
        dst = L + self.path_offsets
        self.tokens[0, dst[1:]] = self.nodes[path[1:]]
        self.tokens[0, L + n + 1] = target[last]
        for cache in self.caches:   # slot = position for the path; copies past n land beyond the new position
            cache.k[:, dst] = cache.k[:, slots[path]]
            cache.v[:, dst] = cache.v[:, slots[path]]
        self.hidden[:, dst] = h[:, path]
        return torch.cat([n, self.tokens[0, L + 1 + self.path_offsets]])   # n, t[L+1..L+D+1]

    def step(self):
        out = self.greedy_step().tolist()                              # the step's one host read-back
        n = out[0]
        self.newest += n + 1
        return out[1:n + 2], (self.depths, n)


AUTO_DEPTH, AUTO_TOPK = 4, 4   # tree@autoN: depths drafted, tokens each frontier node proposes (and frontier size)
AUTO_PROPOSED = AUTO_TOPK + (AUTO_DEPTH - 1) * AUTO_TOPK ** 2   # nodes proposed per step, the most N can be


class AutoTreeDrafts(TreeDrafts):
    """tree@autoN (EAGLE-2): a tree of N nodes whose shape follows the heads' confidence, rebuilt every step.

    A node's score is the sum of the draft log-probabilities along its path. Per depth d (AUTO_DEPTH of them), the
    head runs on a frontier (the root, then the AUTO_TOPK best-scored nodes of the level before) and every frontier
    node proposes its AUTO_TOPK best tokens. Of all the nodes proposed, the N best-scored make the tree: a child never
    scores above its parent (ties go to the parent, proposed first), so every chosen node's ancestors are chosen.
    The tree's structure (parents, levels, ancestors) is computed in the step, so its shape stays fixed: verification
    is TreeDrafts'."""

    def __init__(self, model, max_len, budget, schedule=None, draft_ids=None, **engine):
        # a placeholder of the right depth and node count: draft() rewrites the structure every step
        super().__init__(model, max_len, [1] * (AUTO_DEPTH - 1) + [budget - AUTO_DEPTH + 1], schedule, draft_ids,
                         **engine)
        self.budget, self.root = budget, AUTO_PROPOSED       # the root's id among the proposed nodes: after them
        self.proposed_levels = torch.tensor([1] * AUTO_TOPK + [d for d in range(2, AUTO_DEPTH + 1)
                                                               for _ in range(AUTO_TOPK ** 2)], device=self.device)

    def draft(self):
        """Proposes, depth by depth, then chooses the N best-scored nodes; writes their tokens and the tree's
        structure, and the best path (which the window reads at later depths) to t[L+1..]."""
        L, k = self.newest, AUTO_TOPK
        win = (L - 1 - self.window).clamp_min(0) + self.window_offsets
        self.nodes[:1] = self.tokens[0, L]
        h_win, h_front = self.hidden[:, win], self.hidden[:, L - 1]
        front, score, ids = self.nodes[:1], torch.zeros(1, device=self.device), torch.full_like(self.newest, self.root)
        proposed = []                                                    # per depth: (tokens, scores, parents)
        for d in range(1, self.depths + 1):
            h_win, logits, states = self.depth(d, win, h_win, h_front, front)
            top = torch.log_softmax(logits.float(), -1).topk(k, -1)    # (f, k)
            tokens = top.indices.flatten()
            tokens = tokens if self.draft_ids is None else self.draft_ids[tokens]
            scores = (score[:, None] + top.values).flatten()
            proposed.append((tokens, scores, ids.repeat_interleave(k)))
            best = scores.topk(k).indices                                # the next frontier, best first
            self.tokens[0, L + d] = tokens[best[:1]]
            front, score, ids = tokens[best], scores[best], (d > 1) * (k + (d - 2) * k * k) + best
            h_front = states[:, best // k]
        tokens, scores, parents = (torch.cat(x) for x in zip(*proposed))
        chosen = scores.sort(descending=True, stable=True).indices[:self.budget].sort().values  # parents first
        index = torch.zeros(self.root + 1, dtype=torch.long, device=self.device)   # proposal id -> tree node
        index[chosen] = torch.arange(1, self.budget + 1, device=self.device)
        self.nodes[1:] = tokens[chosen]
        self.parents[1:] = index[parents[chosen]]
        self.levels[1:] = self.proposed_levels[chosen]
        chain = [torch.arange(self.query_len, device=self.device)]       # each node, its parent, its grandparent, ...
        for _ in range(self.depths):
            chain.append(self.parents[chain[-1]])
        chain = torch.stack(chain, 1)                                    # (1+N, D+1)
        self.ancestors.copy_((chain[:, :, None] == chain[:, :1].T[None]).any(1))
        up = self.levels[:, None] - self.path_offsets                    # steps up to the ancestor at each level
        self.up.copy_(torch.where(up >= 0, chain.gather(1, up.clamp_min(0)), chain[:, :1]))


class MaskDrafts(Strategy):
    """Paper A: k-1 mask tokens after the text make one forward predict k tokens.

    Each step feeds the tokens not yet in the cache (`fed`), then the masks, padded to 2k-1 tokens; the masks' cache
    slots are overwritten by real tokens in the next step. tau=None emits all k predictions (static-k), a float emits
    the leading ones whose top-1 probability is at least tau (ConfAdapt, at least one); both are lossy. checked=True
    treats the mask predictions as drafts instead, verified by the model's own next-token predictions in the next
    forward (the fed tokens come before the masks, so those predictions never see a mask)."""

    def __init__(self, model, max_len, mask_ids, k, tau=None, checked=False, sampling=Sampling(), generator=None,
                 graphs=None, compile=False):
        if k < 2:
            raise ValueError(f"mask-token decoding needs k >= 2, got {k}")
        super().__init__(model, 1, max_len, 2 * k - 1, sampling, generator, graphs, compile)
        self.mask_ids = list(mask_ids) if len(mask_ids) > 1 else list(mask_ids) * (k - 1)  # shared or distinct
        if len(self.mask_ids) < k - 1:
            raise ValueError(f"{len(mask_ids)} distinct mask tokens cannot make k={k}")
        self.mask_ids = self.mask_ids[:k - 1]
        self.k, self.tau, self.checked = k, tau, checked
        self.speculative = checked
        self.caches, _ = model.make_caches(1, self.cache_len)
        self.inputs = torch.zeros(2, self.query_len, dtype=torch.long, device=self.device)  # ids, positions
        self.step_logits = Graph(self._step_logits, self.graphs)

    def _step_logits(self):
        return self.forward(self.inputs[:1], self.positions(self.inputs[1:]), self.caches)[0]

    def logits(self, ids):
        """Logits (len(ids), V) of a forward of ids at positions newest.., padded to query_len where it fits."""
        n = len(ids)
        if n > self.query_len:                                    # prefill: eager, its own length
            pos = torch.arange(self.newest, self.newest + n, device=self.device)[None]
            return self.model(torch.tensor([ids], device=self.device), self.positions(pos), self.caches)[0]
        pad = self.query_len - n
        self.inputs.copy_(torch.tensor([ids + self.mask_ids[:1] * pad,
                                        list(range(self.newest, self.newest + self.query_len))]))
        return self.step_logits()[:n]

    def prefill(self, prompt):
        # verified@K prefills the prompt alone, as plain decoding does, so its cache rows match ar's bit for bit
        self.newest, self.fed, self.drafts, self.q = 0, list(prompt), [], None
        return self.step(with_masks=not self.checked)[0]

    def step(self, with_masks=True):
        fed, m = self.fed, len(self.drafts)
        masks = self.mask_ids if with_masks else []
        logits = self.logits(fed + masks)
        # row i < len(fed): the next token after fed[i]; the last 1 + len(masks) rows: the tokens after the fed text
        ahead = logits[len(fed) - 1:]
        if not self.checked:
            self.newest += len(fed)
            self.fed = self.emit(ahead)
            return self.fed, (len(masks), len(self.fed) - 1)    # "accepted" = predictions kept beyond the first
        n, nxt = verify(torch.tensor(self.drafts, device=self.device), self.q, logits[len(fed) - 1 - m:len(fed)],
                        self.sampling, self.generator)
        self.newest += len(fed) - m + n        # the fed tokens up to the last accepted draft are now in the cache
        out = self.drafts[:n] + [nxt]
        self.drafts, self.q = [], None
        if n == m and masks:                   # the masks followed an accepted text: their predictions are drafts
            self.q = None if self.sampling.greedy else self.sampling.probs(ahead[1:])
            picks = self.sampling.pick(ahead[1:], self.generator) if self.q is None else \
                torch.multinomial(self.q, 1, generator=self.generator)[:, 0]
            self.drafts = picks.tolist()
        self.fed = [nxt] + self.drafts
        return out, (m, n)

    def emit(self, logits):
        """Static-k keeps all k predictions; ConfAdapt the leading run with top-1 probability >= tau (at least 1)."""
        tokens = self.sampling.pick(logits, self.generator)
        if self.tau is None:
            return tokens.tolist()
        confident = torch.softmax(logits.float(), -1).amax(-1) >= self.tau
        return tokens[:max(1, int(confident.long().cumprod(0).sum()))].tolist()


# ----------------------------------------------------------------------------------------------------------------
# the one generate

MAX_DRAFTS = 16   # mtp@D's D, tree@'s depth and static/verified@K's K: far beyond what drafts usefully reach
K_MAX = 16        # ConfAdapt's k (Paper A's k_max) where the mask-token model does not name its own
LOSSY = {"static", "confadapt"}    # methods that emit predictions nothing checks
BATCHED = {"ar", "mtp"}            # methods that decode several prompts as one batch


def parse_method(name):
    """'ar' | 'ar@Q' | 'mtp' | 'mtp@D' | 'mtp@auto[D]' | 'tree@DxK' | 'tree@b1,b2,...' | 'tree@autoN' | 'static@K' |
    'confadapt@TAU[:K]' | 'verified@K' -> (kind, value); a ValueError names the allowed values. ar@Q is plain decoding
    padded to Q tokens per forward (the bf16 reference of a method whose forwards carry Q tokens: mtp@D's is
    ar@(D+1), verified@K's ar@(2K-1), a tree's ar@(1 + its nodes)). mtp@autoD (D: 3 if left out) chooses the depth
    of every step from 0 to D (`DepthRule`); its value is D. A tree's value is its branch factors per depth, or
    tree@autoN's node budget. confadapt@TAU:K overrides k_max (confadapt_k_max)."""
    kind, _, arg = name.partition("@")
    defaults = {"ar": 1, "mtp": 3, "tree": (4, 2, 1), "static": 3, "confadapt": 0.9, "verified": 4}
    if kind == "mtp" and arg.startswith("auto"):
        arg = arg[len("auto"):] or str(defaults["mtp"])
    if kind not in defaults:
        raise ValueError(f"unknown method {name!r}: expected ar, ar@Q, mtp@D, tree@DxK, tree@b1,b2,..., tree@autoN, "
                         f"static@K, confadapt@TAU or verified@K")
    if not arg:
        return kind, defaults[kind]
    if kind == "tree":
        return kind, tree_branches(name, arg)
    allowed = {"ar": ("Q", 1, MAX_QUERY), "mtp": ("D", 1, MAX_DRAFTS), "static": ("K", 2, MAX_DRAFTS),
               "verified": ("K", 2, MAX_DRAFTS)}
    if kind == "confadapt":
        arg, _, k = arg.partition(":")
        if k and not (k.isdigit() and 2 <= int(k) <= MAX_DRAFTS):
            raise ValueError(f"method {name!r}: K (k_max) must be an integer from 2 to {MAX_DRAFTS}")
    try:
        value = float(arg) if kind == "confadapt" else int(arg)
    except ValueError:
        value = None
    if kind == "confadapt":
        if value is None or not 0 < value <= 1:
            raise ValueError(f"method {name!r}: TAU must be a number in (0, 1]")
    elif value is None or not allowed[kind][1] <= value <= allowed[kind][2]:
        letter, low, high = allowed[kind]
        raise ValueError(f"method {name!r}: {letter} must be an integer from {low} to {high}")
    return kind, value


def tree_branches(name, arg):
    """tree@DxK: depth D, K candidates at depth 1, halving at each depth below (at least 1): 3x4 is 4,2,1 and 4x4 is
    4,2,1,1. tree@b1,b2,...: the branch factors as given. The tree (1 + its nodes) must fit one query of MAX_QUERY.
    Returns the branch factors, or for tree@autoN (a dynamic tree, AutoTreeDrafts) the node budget N."""
    if arg.startswith("auto"):
        budget = int(arg[4:]) if arg[4:].isdigit() else 0
        if not AUTO_DEPTH <= budget <= min(AUTO_PROPOSED, MAX_QUERY - 1):
            raise ValueError(f"method {name!r}: tree@autoN takes a node budget N from {AUTO_DEPTH} to "
                             f"{min(AUTO_PROPOSED, MAX_QUERY - 1)}")
        return budget
    depth, x, k = arg.partition("x")
    try:
        branches = [max(1, int(k) >> d) for d in range(int(depth))] if x else [int(b) for b in arg.split(",")]
    except ValueError:
        branches = []
    if not branches or min(branches) < 1 or len(branches) > MAX_DRAFTS or (x and int(k) < 1):
        raise ValueError(f"method {name!r}: expected tree@DxK (depth D from 1 to {MAX_DRAFTS}, K >= 1) or tree@b1,b2,"
                         f"... (a branch factor >= 1 per depth, up to {MAX_DRAFTS} depths)")
    nodes = sum(itertools.accumulate(branches, lambda n, b: n * b))
    if 1 + nodes > MAX_QUERY:
        raise ValueError(f"method {name!r}: a tree of {nodes} nodes does not fit one forward of MAX_QUERY={MAX_QUERY} "
                         f"tokens (at most {MAX_QUERY - 1} nodes)")
    return tuple(branches)


def confadapt_k_max(method, k_max):
    """ConfAdapt's k (masks per forward + 1): K of confadapt@TAU:K, else the model's k_max. A sweep over K shows
    what the masks each forward carries cost in speed."""
    k = method.partition("@")[2].partition(":")[2]
    return int(k) if k else k_max


def make_strategy(model, method, max_len, sampling=Sampling(), generator=None, schedule=None, draft_ids=None,
                  mask_ids=None, k_max=K_MAX, batch_size=1, graphs=None, compile=False):
    """A strategy for `method` with buffers for prompt + new tokens of up to max_len positions. Build one and pass it
    to generate as `method` to keep its CUDA graphs (and compiled kernels) across calls. graphs: CUDA graphs (default:
    on CUDA); compile: torch.compile the model's forward too."""
    kind, value = parse_method(method)
    engine = dict(sampling=sampling, generator=generator, graphs=graphs, compile=compile)
    if kind == "ar":
        return Autoregressive(model, max_len, batch_size=batch_size, query_len=value, **engine)
    if kind == "mtp":
        return HeadDrafts(model, max_len, value, schedule, draft_ids, adaptive="@auto" in method,
                          batch_size=batch_size, **engine)
    if kind == "tree":
        tree = AutoTreeDrafts if isinstance(value, int) else TreeDrafts
        return tree(model, max_len, value, schedule, draft_ids, **engine)
    if not mask_ids:
        raise ValueError(f"method {method} needs a mask-token model (train.py --mode mask) and its mask token ids")
    if kind == "confadapt":
        return MaskDrafts(model, max_len, mask_ids, confadapt_k_max(method, k_max), tau=value, **engine)
    return MaskDrafts(model, max_len, mask_ids, value, checked=kind == "verified", **engine)


def provenance(strategy, n):
    """How each of the n tokens of one prefill or step was produced: 0 by the main model, d >= 1 an accepted draft
    at depth d (mtp, verified: the drafts come first, the main model's token last) or kept mask prediction d
    (static, confadapt: the main model's next-token prediction first, then the masks')."""
    return list(range(1, n)) + [0] if strategy.speculative else list(range(n))


# cuDNN attention builds a plan for every new (query length, key length) pair, 40-400 ms each on an H100; decoding meets
# new lengths with every prompt, so generate keeps to the kernels that need none.
DECODE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@torch.no_grad()
@sdpa_kernel(DECODE_ATTENTION)
def generate(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None, stop_ids=(), generator=None,
             method="ar", stats=None, trace=None, **method_options):
    """Generate up to max_new_tokens after each prompt (lists of token ids); returns the new tokens of each prompt,
    ending with the stop token where one was produced. `ar` and `mtp` decode the prompts as one batch; trees and the
    mask-token methods decode them one at a time. `method` is a name (method_options go to make_strategy) or a strategy built by
    make_strategy (its sampling and generator are used). `trace`, a list, gets per prompt one label per output
    token: 0 = from the main model, d >= 1 = an accepted draft of depth d or a kept mask prediction d."""
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("empty prompt: generation needs at least one token to condition on")
    if longest + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
                         f"context of {model.cfg.max_seq_len} tokens")
    strategy = method
    if isinstance(method, str):
        batch = len(prompts) if parse_method(method)[0] in BATCHED else 1
        strategy = make_strategy(model, method, longest + max_new_tokens, Sampling(temperature, top_k, top_p),
                                 generator, batch_size=batch, **method_options)
    if longest + max_new_tokens > strategy.max_len:
        raise ValueError(f"a prompt of {longest} tokens plus {max_new_tokens} new ones exceeds the {strategy.max_len} "
                         "positions this strategy was built for")
    if strategy.batched:
        if len(prompts) != strategy.tokens.size(0):
            raise ValueError(f"{len(prompts)} prompts for a strategy built for batch size {strategy.tokens.size(0)}")
        runs = [_decode(strategy, prompts, max_new_tokens, set(stop_ids))]
    else:
        runs = [_decode(strategy, [p], max_new_tokens, set(stop_ids)) for p in prompts]
    outs = [out for run in runs for out in run.outs]
    if trace is not None:
        trace.extend(labels for run in runs for labels in run.labels)
    if stats is not None:
        for run in runs:
            stats.tokens += sum(map(len, run.outs))
            stats.forwards += run.forwards + len(run.outs)
            stats.prefills += len(run.outs)
            stats.prefill_tokens += sum(min(run.first, len(out)) for out in run.outs)
            for n_drafts, n_accepted in run.accepted:
                stats.record(n_drafts, n_accepted)
    return outs


@dataclass
class Run:
    """What one prefill and its steps produced: per row the output, its labels (see generate's trace); the forwards
    that rows still decoding took part in (a batched forward counts once per such row), the tokens the prefill
    yields per row, and (drafts checked, drafts accepted) of every row's every step."""
    outs: list
    labels: list
    forwards: int = 0
    first: int = 1
    accepted: list = field(default_factory=list)


def _decode(strategy, prompts, max_new_tokens, stop_ids):
    """One prefill of `prompts` (one row each), then steps until every row has stopped: at a stop token, or at
    max_new_tokens. A row that stopped is no longer counted; its tokens from later steps are dropped."""
    first = strategy.prefill(prompts if strategy.batched else prompts[0])
    outs = [[t] for t in first.tolist()] if strategy.batched else [first]
    run = Run(outs, [list(range(len(out))) for out in outs], first=len(outs[0]))   # prefill: the model, then masks
    live = [not _finished(out, out, max_new_tokens, stop_ids) for out in outs]
    while any(live):
        news, accepted = strategy.step(live) if strategy.batched else strategy.step()
        news = news if strategy.batched else [news]
        accepted = accepted if strategy.batched else [accepted]
        run.forwards += sum(live)
        for b, new in enumerate(news):
            if live[b]:
                outs[b] += new
                run.labels[b] += provenance(strategy, len(new))
                run.accepted.append(accepted[b])
                live[b] = not _finished(outs[b], new, max_new_tokens, stop_ids)
    run.outs = [_truncate(out, max_new_tokens, stop_ids) for out in outs]
    run.labels = [labels[:len(out)] for labels, out in zip(run.labels, run.outs)]
    return run


def _finished(out, new, max_new_tokens, stop_ids):
    """Whether a row ends with its `new` tokens (the last of `out`): it is full, or they carry a stop token."""
    return len(out) >= max_new_tokens or any(t in stop_ids for t in new)


def _truncate(out, max_new_tokens, stop_ids):
    for i, t in enumerate(out[:max_new_tokens]):
        if t in stop_ids:
            return out[:i + 1]
    return out[:max_new_tokens]


# ----------------------------------------------------------------------------------------------------------------
# CLI: the decoding setup bench.py shares, option checks that run before anything loads, one prompt decoded

DRAFT_VOCAB = 8192   # mtp drafts from this many of the heads' most frequent tokens unless told otherwise
LONG_PREFILL = 2048   # a prompt this long says it is being read (8k tokens: ~2 minutes on a CPU)


def setup(source, methods, device="cpu", dtype=torch.float32, heads=None, mask=None, draft_vocab=None):
    """The model `methods` decode with, carrying only what they use: MTP heads for mtp, a mask-token adapter for
    static/confadapt/verified (a gated adapter costs every forward its low-rank products even where it changes
    nothing). heads: a list of heads files (None: those shipped for `source`); mask: an adapter file (None: the
    shipped one); draft_vocab: how many of the heads' frequency-ordered token ids mtp drafts from (None: DRAFT_VOCAB,
    or all the file carries if fewer; 0: the full vocabulary).
    Returns (model, original, tokenizer, generate options). `original` judges output NLL: the model itself where its
    next-token predictions are the original's (heads, gated adapters leave them alone), the model a mask-token model
    was fine-tuned from, or None where that one is missing (a warning says so)."""
    kinds = {parse_method(m)[0] for m in methods}
    model, tokenizer = load(source)
    original, options = model, {"mask_ids": list(model.cfg.mask_token_ids)}
    if model.cfg.mask_token_ids:      # a mask-token checkpoint written by train.py
        train_args = read_json(Path(source) / "config.json").get("train_args", {})
        options["k_max"] = train_args.get("k_max", K_MAX)
        if not model.cfg.lora_gated:   # its training moved the next-token predictions too
            original = _init_from(source, train_args.get("init_from"))
    if kinds & {"mtp", "tree"}:
        files = heads if heads is not None else [f for f in DEFAULT_HEADS.get(str(source), []) if f.is_file()]
        ids = None
        for f in files:
            carried = attach_heads(model, f)
            ids = ids if carried is None else carried   # the last file that carries token frequencies
        if not model.heads:
            raise ValueError(f"method mtp needs MTP heads: {source} has none; pass --heads FILE (train.py --mode "
                             f"heads)")
        options["draft_ids"] = _draft_ids(ids, draft_vocab)
    if kinds & {"static", "confadapt", "verified"}:
        file = mask if mask is not None else DEFAULT_MASK.get(str(source))
        if mask is not None or (file is not None and file.is_file()):   # a shipped file may be absent
            meta = attach_mask_adapter(model, tokenizer, file)
            options.update(mask_ids=list(model.cfg.mask_token_ids), k_max=meta.get("k_max", K_MAX))
            if not model.cfg.lora_gated:     # ungated adapters change next-token predictions too
                original = load(source)[0]
        if not options["mask_ids"]:
            raise ValueError(f"methods static, confadapt and verified need mask tokens: {source} has none; pass "
                             f"--mask FILE (train.py --mode mask)")
    if options.get("draft_ids") is not None:
        options["draft_ids"] = options["draft_ids"].to(device)
    else:
        options.pop("draft_ids", None)
    if original is not None and original is not model:
        original = original.to(device=device, dtype=dtype).eval()
    return model.to(device=device, dtype=dtype).eval(), original, tokenizer, options


def _init_from(source, start):
    """The model a fully fine-tuned mask-token checkpoint started from, or None (with a warning) where it is gone."""
    if start and (start == BUNDLED or Path(start).exists()):
        return load(start)[0]
    print(f"warning: {source} was fine-tuned from {start!r}, which is not here: output NLL will be measured under "
          f"the fine-tuned model itself and labelled nll_self", file=sys.stderr)
    return None


def _draft_ids(ids, draft_vocab):
    """The token ids mtp drafts from (None: all), checked against what the heads files carry."""
    if draft_vocab == 0 or (ids is None and draft_vocab is None):
        return None
    if ids is None:
        raise ValueError(f"--draft_vocab {draft_vocab}: the heads files carry no token frequencies (0 = the full "
                         f"vocabulary)")
    if draft_vocab is None:
        return ids[:DRAFT_VOCAB]
    if draft_vocab > len(ids):
        raise ValueError(f"--draft_vocab {draft_vocab}: the heads files carry only {len(ids)} token ids (allowed: 0 "
                         f"for the full vocabulary, or 1 to {len(ids)})")
    return ids[:draft_vocab]


def fail(message):
    """An expected error (bad option, missing or malformed file): one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class DefaultsHelp(argparse.HelpFormatter):
    """--help shows each default, unless the help text already explains it or there is none (a flag, None)."""

    def _get_help_string(self, action):   # the hook argparse.ArgumentDefaultsHelpFormatter uses too
        shown = all(action.default is not x for x in (None, False, argparse.SUPPRESS)) and "default" not in action.help
        return action.help + (" (default: %(default)s)" if shown else "")


class Parser(argparse.ArgumentParser):
    """argparse with the defaults in --help and every usage error as one line."""

    def __init__(self, description):
        super().__init__(description=description, formatter_class=DefaultsHelp)

    def error(self, message):
        fail(message)


def number(kind, low, high=None, low_open=False):
    """An argparse type: a `kind` (int or float) in [low, high], or in (low, high] with low_open."""
    def check(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        above = value > low if low_open else value >= low
        if not (above and (high is None or value <= high)):   # NaN fails every comparison
            allowed = (f"in {'(' if low_open else '['}{low}, {high}]" if high is not None else
                       f"{'above' if low_open else 'at least'} {low}")
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        if not math.isfinite(value):        # inf passes a bound that is only below
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        return value
    return check


def method_arg(text):
    try:
        parse_method(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    return text


def device_arg(text):
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (expected cpu, cuda or cuda:N)")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r} (expected cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def existing_file(text):
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return Path(text)


def file_list(text):
    return [existing_file(f) for f in text.split(",")]


def add_model_args(p, max_new_tokens):
    """The options decode.py and bench.py share: what to load, where, and how long to decode."""
    p.add_argument("--init_from", default=BUNDLED, help="smollm2, a Hugging Face folder (GPT-2, Llama, Qwen2/2.5, "
                   "Qwen3), a .gguf file (llama, qwen2, qwen3), or a nanoMTP checkpoint folder")
    p.add_argument("--heads", type=file_list, default=None, help="MTP heads files for method mtp, comma-separated, "
                   "in training order (default: those shipped for --init_from)")
    p.add_argument("--mask", type=existing_file, default=None, help="mask-token adapter file for static, confadapt "
                   "and verified (default: the one shipped for --init_from)")
    p.add_argument("--draft_vocab", type=number(int, 0), default=None, help="mtp drafts from the N most frequent "
                   f"tokens the heads file lists; 0 = the full vocabulary (default: {DRAFT_VOCAB}, or all listed)")
    p.add_argument("--max_new_tokens", type=number(int, 1), default=max_new_tokens, help="tokens to generate at most")
    p.add_argument("--temperature", type=number(float, 0), default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights and activations (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model's forward before its CUDA graphs "
                   "are captured (cuda only; about a minute of compilation per step shape)")


def check_model_args(args, methods):
    """Checks that need several options; returns the torch dtype."""
    kinds = {parse_method(m)[0] for m in methods}
    if args.compile and not args.device.startswith("cuda"):
        fail("--compile: only with --device cuda (the CPU path runs eagerly)")
    if args.temperature > 0 and "tree" in kinds:
        fail("--temperature: tree drafts decode greedily only (temperature 0); use mtp@D to sample")
    heads = bool(kinds & {"mtp", "tree"})
    unused = [(args.heads, "--heads", heads), (args.draft_vocab, "--draft_vocab", heads),
              (args.mask, "--mask", bool(kinds & {"static", "confadapt", "verified"}))]
    for value, option, used in unused:
        if value is not None and not used:
            fail(f"{option}: no method here uses it (methods: {', '.join(methods)})")
    return getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))


COLOURS = ["32", "33", "35", "36", "34"]   # ANSI foreground: green, yellow, magenta, cyan, blue for depth 1..5+


def render(tokenizer, out, labels, lossy, colour):
    """The output with each token marked by how it was produced, and a one-line legend."""
    what = "kept mask prediction" if lossy else "accepted draft at depth"
    pieces, done = [], ""
    for i, d in enumerate(labels):
        text = tokenizer.decode(out[:i + 1])
        if text.endswith("\ufffd") and i + 1 < len(out):   # a character split across tokens: shown with the next
            continue
        text, done = text[len(done):], text
        if d == 0:
            pieces.append(text)
        elif colour:
            pieces.append(f"\033[{COLOURS[min(d, len(COLOURS)) - 1]}m{text}\033[0m")
        else:
            pieces.append(f"[{d}:{text}]")
    if colour:
        key = " ".join(f"\033[{c}m{d}\033[0m" for d, c in zip(["1", "2", "3", "4", "5+"], COLOURS))
        legend = f"legend: plain = main model; colour = {what} {key}"
    else:
        legend = f"legend: plain = main model; [d:text] = {what} d"
    return "".join(pieces), legend


def main(argv=None):
    p = Parser(__doc__.split("\n\n")[0])
    p.add_argument("--prompt", default="What is the capital of France?", help="the user's message")
    p.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    p.add_argument("--method", type=method_arg, default="ar", help="ar, mtp@D, mtp@autoD, tree@DxK, tree@b1,b2,... "
                   f"or tree@autoN (greedy only), static@K, confadapt@TAU or verified@K (D and K up to {MAX_DRAFTS}, "
                   "TAU in (0, 1])")
    add_model_args(p, max_new_tokens=64)
    p.add_argument("--top_k", type=number(int, 1), default=None, help="sample among the k most likely tokens")
    p.add_argument("--top_p", type=number(float, 0, 1, low_open=True), default=None, help="nucleus sampling: keep "
                   "the smallest set of tokens whose probability reaches p")
    p.add_argument("--show", action="store_true", help="mark each token by how it was produced: the main model, an "
                   "accepted draft of depth d, or a kept mask prediction")
    args = p.parse_args(argv)
    dtype = check_model_args(args, [args.method])
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        fail("--top_k and --top_p shape sampling: they need --temperature > 0")
    kind = parse_method(args.method)[0]
    try:
        model, _, tokenizer, options = setup(args.init_from, [args.method], args.device, dtype, args.heads, args.mask,
                                             args.draft_vocab)
        chat = not args.raw and tokenizer.has_chat        # a from-scratch model's tokenizer has no chat template
        ids = tokenizer.encode_chat(args.prompt) if chat else tokenizer.encode(args.prompt)
        generator = torch.Generator(args.device).manual_seed(args.seed)
        stats, trace = Stats(), []
        if len(ids) >= LONG_PREFILL:        # one forward over the whole prompt, silent otherwise
            print(f"prefill: {len(ids):,} prompt tokens in one forward on {args.device} ...",
                  file=sys.stderr)
        t0 = time.perf_counter()
        out = generate(model, [ids], args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                       tokenizer.stop_ids, generator, args.method, stats, trace, compile=args.compile, **options)[0]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    except (ValueError, OSError) as e:
        fail(e)
    shown = [(t, d) for t, d in zip(out, trace[0]) if t not in tokenizer.stop_ids]
    tokens, labels = [t for t, _ in shown], [d for _, d in shown]
    if args.show:
        print("\n".join(render(tokenizer, tokens, labels, kind in LOSSY, sys.stdout.isatty())))
    else:
        print(tokenizer.decode(tokens))
    print(f"--- {args.method}: {len(out)} tokens in {dt:.2f} s, {len(out) / dt:.1f} tokens/s, "
          f"{stats.tokens_per_forward:.2f} tokens per forward ({args.device}, {model.embed.weight.dtype})")
    if kind in LOSSY:
        print(f"LOSSY: {args.method} emits mask-token predictions that nothing checks; the text may differ from the "
              f"model's own greedy output")


if __name__ == "__main__":
    main()
