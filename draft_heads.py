"""
Paper B's chains: the MTP heads draft D tokens, the main model verifies them in one forward.

- `HeadStrategy`: what head drafting shares (with draft_tree.py): the schedule of MTP modules over
  draft depths, the draft vocabulary, the head state by position, one KV cache per depth, the
  prefill.
- `HeadDrafts` (mtp@D): a batch of B rows, each at its own positions accepting its own drafts.
  Lossless: greedy output is identical to `ar`, sampled output follows the same distribution.
- `DepthRule` (mtp@autoD): each step drafts the depth in 0..D that maximises tokens per unit of
  time.
"""

import time
from functools import partial

import torch

from engine import Graph, Pending, Ready, Sampling, Strategy, drafted, verify
from model import looped_head

COST_REPEATS = 5       # timed replays per depth when HeadDrafts measures its step costs
# a depth's acceptance before any evidence: optimistic, so drafting gets tried
ACCEPT_PRIOR = 0.7
PRIOR_WEIGHT = 4.0     # ... worth this many observed drafts
# per step: older evidence fades, so the estimate follows the text (~20 steps)
ACCEPT_DECAY = 0.95


class DepthRule:
    """How many tokens to draft this step, so that speculation never costs more than it saves.

    A step of depth k (k drafts, then one verify forward of k+1 tokens per row) yields on average
    E(k) = 1 + a1 + a1 a2 + ... + a1 ... ak tokens per row (a_d: depth d's acceptance given depths
    1..d-1 were accepted) and takes costs[k] times as long as a one-token step (costs[0] = 1). The
    rule drafts k = argmax E(k) / costs[k] over 0..D (the smallest k on ties; 0 is plain decoding).
    As the batch grows, costs[k] rises towards k+1 and the rule drafts less. a_d: decayed counts of
    accepted / checked drafts of rows still decoding, with a prior. costs: measured by
    HeadDrafts.measure_costs, or given."""

    def __init__(self, depths, costs=None):
        if costs is not None and (len(costs) != depths + 1 or min(costs) <= 0):
            raise ValueError(f"costs: expected {depths + 1} positive step costs (depths "
                             f"0..{depths}), got {costs}")
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
        """A step of `depth` in which rows still decoding accepted ns drafts each: depth d was
        checked in the rows that accepted d-1 or more, and accepted in those that accepted d or
        more."""
        for d in range(1, depth + 1):
            checked = sum(n >= d - 1 for n in ns)
            if checked:
                self.checked[d - 1] = ACCEPT_DECAY * self.checked[d - 1] + checked
                self.accepted[d - 1] = ACCEPT_DECAY * self.accepted[d - 1] + sum(n >= d for n in ns)


class HeadStrategy(Strategy):
    """What the head-drafting methods (mtp, tree) share: the schedule of MTP modules over draft
    depths (a looped schedule reuses the last head), the draft vocabulary, the head state by
    position (the main model's hidden state, fused with lower blocks' where the heads file says so),
    one KV cache per draft depth, and the prefill that fills them for B rows."""

    def __init__(self, model, batch_size, max_len, query_len, depths, schedule, draft_ids, sampling,
                 generator, graphs, compile, method):
        if len(model.heads) == 0:
            raise ValueError(f"method {method} needs a model with MTP heads (train.py --mode "
                             f"heads, or --heads FILE)")
        super().__init__(model, batch_size, max_len, query_len, sampling, generator, graphs,
                         compile)
        self.schedule = schedule or [looped_head(d, len(model.heads)) for d in range(1, depths + 1)]
        if len(self.schedule) != depths or max(self.schedule) >= len(model.heads):
            raise ValueError(f"head schedule {self.schedule} does not fit {depths} depths and "
                             f"{len(model.heads)} heads")
        self.depths, self.window = depths, 2 * depths
        # the output rows of the draft vocabulary, gathered once (a smaller vocabulary drafts
        # faster)
        self.draft_ids = draft_ids
        self.draft_head = None if draft_ids is None else model.lm_head.weight[draft_ids]
        self.head_state = torch.zeros(batch_size, self.cache_len, model.cfg.n_embd,
                                      device=self.device, dtype=model.embed.weight.dtype)
        self.caches, self.depth_caches = model.make_caches(batch_size, self.cache_len,
                                                           n_depths=depths)
        self.window_offsets = torch.arange(self.window, device=self.device)

    def prefill_forward(self, n):
        """The main model and then every depth over each row's first n positions. The heads' last
        positions read tokens not written yet: every step redoes them (HeadDrafts.draft)."""
        pos = self.model.default_pos(self.tokens[:, :n])
        x, taps = self.model.hidden(self.tokens[:, :n], pos, self.caches, keep_taps=True)
        h = self.model.head_state(x, taps)
        self.head_state[:, :n] = h
        for d in range(1, self.depths + 1):
            h = self.model.head_forward(self.schedule[d - 1], h, self.tokens[:, d:n + d], pos,
                                        self.depth_caches[d - 1])
        return self.model.logits(x[self.rows, self.lens - 1])


class HeadDrafts(HeadStrategy):
    """Paper B: the MTP heads draft `depths` tokens, the main model verifies them in one forward; B
    rows. adaptive=True (mtp@autoD): each step drafts `DepthRule`'s choice of 0..D tokens, one CUDA
    graph per depth; depths a short step leaves behind keep stale states, which only lowers their
    acceptance (verification keeps the output exact in float32; in bf16 mixed query lengths round as
    no ar@Q does)."""
    batches = True

    def __init__(self, model, max_len, depths, schedule=None, draft_ids=None, adaptive=False,
                 costs=None, sampling=Sampling(), generator=None, batch_size=1, graphs=None,
                 compile=False):
        super().__init__(model, batch_size, max_len, depths + 1, depths, schedule, draft_ids,
                         sampling, generator, graphs, compile, "mtp")
        # each row's next L
        self.advanced = torch.zeros_like(self.newest)
        self.step_offsets = torch.arange(depths + 1, device=self.device)
        # one graph per depth in use; costs: a DepthRule table given (None: measured at the first
        # step)
        self.rule = DepthRule(depths, costs) if adaptive else None
        self.runs_ahead = self.device.type == "cuda" and sampling.greedy and not adaptive
        self.greedy_steps = {k: Graph(partial(self._greedy_step, k),
                                      self.graphs and sampling.greedy)
                             for k in (range(depths + 1) if adaptive else [depths])}

    def draft(self, depth):
        """1) Draft: depths 1..depth in turn, each on its window; writes t[L+1..L+depth] of every
        row.

        Positions of one row, L its newest token (known for certain, not yet in the main cache):

            tokens    ... t[L-1]  t[L]  | t[L+1] ... t[L+D]      drafts, written by depths 1..D
            depth 0   ... h0[L-1]       |                        head state, final up to L-1
            depth d   position i reads h[d-1][i] and t[i+d], predicts t[i+d+1]; its state at L-1
                      drafts t[L+d]

        A depth's state at i is final once t[i+d] is; after a step accepting n of D drafts, at most
        n+d positions of depth d are not, so every depth recomputes the last 2D positions before L
        (recomputing final ones changes nothing), which keeps the step one shape. Returns (drafts
        (B, depth), their distributions (B, depth, V) or None when greedy or depth 0)."""
        L = self.newest[:, None]                                  # (B, 1)
        start = (L - self.window).clamp_min(0)
        pos = start + self.window_offsets                         # (B, W)
        C = self.head_state.size(-1)
        at = (L - 1 - start)[..., None].expand(-1, -1, C)         # (B, 1, C): the window row of L-1
        h = self.head_state.gather(1, pos[..., None].expand(-1, -1, C))   # (B, W, C)
        probs = []
        for d in range(1, depth + 1):
            h = self.head_forward(self.schedule[d - 1], h, self.tokens.gather(1, pos + d),
                                  self.positions(pos), self.depth_caches[d - 1])
            logits = self.model.logits(h.gather(1, at), self.draft_head)[:, 0]   # (B, V'): t[L+d]
            if self.sampling.greedy:
                tok = logits.argmax(-1, keepdim=True)
            else:
                q = self.sampling.probs(logits)
                tok = torch.multinomial(q, 1, generator=self.generator)
                if self.draft_ids is not None:   # back to a full-vocabulary distribution
                    full = q.new_zeros(q.size(0), self.model.cfg.vocab_size)
                    q = full.index_copy_(1, self.draft_ids, q)
                probs.append(q)
            self.tokens.scatter_(1, L + d, tok if self.draft_ids is None else self.draft_ids[tok])
        drafts = self.tokens.gather(1, L + 1 + self.step_offsets[:depth])
        return drafts, torch.stack(probs, 1) if probs else None

    def check(self, depth):
        """2) Verify: one forward over t[L..L+depth] of every row; stores its head state (rows
        past the accepted ones are rewritten before anything reads them). Returns the logits
        (B, depth+1, V)."""
        pos = self.newest[:, None] + self.step_offsets[:depth + 1]   # (B, depth+1)
        logits, h = self.forward(self.tokens.gather(1, pos), self.positions(pos), self.caches,
                                 return_head_state=True)
        self.head_state[self.rows[:, None], pos] = h
        return logits

    def accept(self, n, nxt):
        """3) Accept: each row's accepted count n (B,) and next token nxt (B,): writes t[L+n+1]
        and the row's L after the step (a finished row stops at max_len: its buffers never
        overflow)."""
        self.tokens[self.rows, self.newest + n + 1] = nxt
        torch.clamp_max(self.newest + n + 1, self.max_len, out=self.advanced)

    def _greedy_step(self, depth):
        drafts, _ = self.draft(depth)
        target = self.check(depth).argmax(-1)                     # (B, depth+1)
        n = (drafts == target[:, :-1]).long().cumprod(1).sum(1)   # (B,) the longest run of matches
        self.accept(n, target.gather(1, n[:, None])[:, 0])
        new = self.tokens.gather(1, self.newest[:, None] + 1 + self.step_offsets[:depth + 1])
        return torch.cat([n[:, None], new], 1)

    def step(self, live):
        """One draft-and-verify step of every row, finished rows included (fixed shapes; generate
        drops their tokens); live[b]: row b still decodes (the depth rule learns from those rows
        only)."""
        if self.rule is not None and self.rule.costs is None:
            self.rule.costs = self.measure_costs()
        depth = self.depths if self.rule is None else self.rule.choose()
        if self.sampling.greedy:
            out = self.greedy_steps[depth]()            # (B, 1 + depth+1): n, t[L+1..]
            # outside the graph: it reads newest and must stay idempotent
            self.newest.copy_(self.advanced)
            pending = Pending(out, lambda rows: [drafted(r[1:r[0] + 2], depth) for r in rows])
            if self.rule is None:
                return pending
            steps = pending.result()                    # the rule's next choice needs them
        else:
            drafts, q = self.draft(depth)
            logits = self.check(depth)
            ns, nxt = zip(*(verify(drafts[b], None if q is None else q[b], logits[b], self.sampling,
                                   # q: None at depth 0
                                   self.generator) for b in range(len(drafts))))
            self.accept(torch.tensor(ns, device=self.device), torch.tensor(nxt, device=self.device))
            self.newest.copy_(self.advanced)
            steps = [drafted(row[:n] + [t], depth) for row, n, t in zip(drafts.tolist(), ns, nxt)]
        if self.rule is not None:
            self.rule.observe(depth, [s.accepted for s, alive in zip(steps, live) if alive])
        return Ready(steps)

    def measure_costs(self):
        """Wall time of a greedy step of every depth, its read-back included, over that of depth 0;
        each step run COST_REPEATS times after its warm-up (graph capture). The steps are
        idempotent, so timing them changes no decoding state."""
        seconds = []
        for step in self.greedy_steps.values():
            step().tolist()
            t0 = time.perf_counter()
            for _ in range(COST_REPEATS):
                step().tolist()   # waits for the device, as a real step does
            seconds.append(time.perf_counter() - t0)
        return [s / seconds[0] for s in seconds]
