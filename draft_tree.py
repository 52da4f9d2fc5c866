"""
Paper B's trees (Medusa, EAGLE-2): the MTP heads draft a tree, the main model verifies it in one
forward.

- `tree_shape`: the tree syntax, `tree@DxK` (top K at depth 1, halving deeper), `tree@b1-b2-...`
  (the branch factors per depth) or `tree@autoN` (N nodes chosen by draft probability).
- `TreeDrafts`: a fixed tree. `AutoTreeDrafts`: a tree of N nodes rebuilt every step.
- Lossless and greedy only: the output is identical to `ar` (sampling from a tree needs multi-draft
  rejection sampling, which is not built: use mtp@D to sample). One prompt at a time.
"""

import itertools

import torch

from draft_heads import HeadStrategy
from engine import MAX_DRAFTS, MAX_QUERY, Graph, Pending, Sampling, drafted

AUTO_DEPTH, AUTO_TOPK = 4, 4   # tree@autoN: depths drafted, tokens each frontier node proposes
# nodes proposed per step: N's maximum
AUTO_PROPOSED = AUTO_TOPK + (AUTO_DEPTH - 1) * AUTO_TOPK ** 2


def tree_shape(name, arg):
    """tree@DxK: depth D, K candidates at depth 1, halving at each depth below (at least 1): 3x4 is
    4-2-1 and 4x4 is 4-2-1-1. tree@b1-b2-...: the branch factors as given. The tree (1 + its nodes)
    must fit one query of MAX_QUERY. Returns the branch factors, or for tree@autoN the node budget
    N."""
    if arg.startswith("auto"):
        budget = int(arg[4:]) if arg[4:].isascii() and arg[4:].isdigit() else 0
        if not AUTO_DEPTH <= budget <= min(AUTO_PROPOSED, MAX_QUERY - 1):
            raise ValueError(f"method {name!r}: tree@autoN takes a node budget N from "
                             f"{AUTO_DEPTH} to {min(AUTO_PROPOSED, MAX_QUERY - 1)}")
        return budget
    if "," in arg:
        raise ValueError(f"method {name!r}: branch factors are separated by '-': "
                         f"tree@{arg.replace(',', '-')}")
    depth, x, k = arg.partition("x")
    parts = [depth, k] if x else arg.split("-")
    if all(p.isascii() and p.isdigit() for p in parts):
        if x:
            branches = [max(1, int(k) >> d) for d in range(int(depth))]
        else:
            branches = [int(b) for b in parts]
    else:
        branches = []
    if not branches or min(branches) < 1 or len(branches) > MAX_DRAFTS or (x and int(k) < 1):
        raise ValueError(f"method {name!r}: expected tree@DxK (depth D from 1 to {MAX_DRAFTS}, "
                         f"K >= 1) or tree@b1-b2-... (a branch factor >= 1 per depth, up to "
                         f"{MAX_DRAFTS} depths)")
    nodes = sum(itertools.accumulate(branches, lambda n, b: n * b))
    if 1 + nodes > MAX_QUERY:
        raise ValueError(f"method {name!r}: a tree of {nodes} nodes does not fit one forward of "
                         f"MAX_QUERY={MAX_QUERY} tokens (at most {MAX_QUERY - 1} nodes)")
    return tuple(branches)


class TreeDrafts(HeadStrategy):
    """A fixed tree, branches (b_1, ..., b_D): the root (node 0) is t[L]; level d holds the top-b_d
    tokens after each node of level d-1, node by node, best first. So the first node of every level
    is the chain mtp@D drafts (a tree of ones is that chain), and every step has the same N nodes:
    one query of 1 + N tokens. bf16: unlike a chain's, a tree's output is not bit-identical to
    ar@(1+N), since attention sums an ancestor's values from its scratch slot, in another order;
    rare near-ties can then differ."""

    def __init__(self, model, max_len, branches, schedule=None, draft_ids=None, sampling=Sampling(),
                 generator=None, graphs=None, compile=False):
        if not sampling.greedy:
            raise ValueError("tree drafts decode greedily only (temperature 0): sampling from a "
                             "tree is not built; use mtp@D to sample")
        depths = len(branches)
        # nodes per level, the root's included
        sizes = [1]
        for b in branches:
            sizes.append(sizes[-1] * b)
        super().__init__(model, 1, max_len, sum(sizes), depths, schedule, draft_ids, sampling,
                         generator, graphs, compile, "tree")
        self.branches = list(branches)
        # level d: nodes first[d]..first[d+1]-1
        self.first = [0] + list(itertools.accumulate(sizes))
        parents, levels = [0], [0]
        for d, b in enumerate(branches, 1):
            for node in range(self.first[d - 1], self.first[d]):
                parents += [node] * b
                levels += [d] * b
        # up[i][k]: node i's ancestor at level k, i past it
        up = [[0] * (depths + 1)]
        for i in range(1, len(parents)):
            up.append(up[parents[i]][:levels[i]] + [i] * (depths + 1 - levels[i]))
        self.parents, self.levels, self.up = (torch.tensor(x, device=self.device)
                                              for x in (parents, levels, up))
        self.ancestors = torch.tensor([[j in row[:levels[i] + 1] for j in range(len(up))]
                                       for i, row in enumerate(up)], device=self.device)  # or self
        self.nodes = torch.zeros(self.query_len, dtype=torch.long, device=self.device)  # the tokens
        self.slot_ids = torch.arange(self.cache_len, device=self.device)
        # node i's scratch slot, beyond the sequence
        self.scratch = self.cache_len - MAX_QUERY + torch.arange(self.query_len, device=self.device)
        self.path_offsets = torch.arange(depths + 1, device=self.device)
        self.greedy_step = Graph(self._greedy_step, self.graphs)
        self.runs_ahead = self.device.type == "cuda"

    def draft(self):
        """1) Draft: per depth d, one head call over the window (positions L-1-2D..L-2, recomputed
        each step as HeadDrafts does, from the chain's tokens) and every node of level d-1, at
        position L-1. Writes the tree's tokens to self.nodes and its first path (the chain) to
        t[L+1..]."""
        L = self.newest
        win = (L - 1 - self.window).clamp_min(0) + self.window_offsets       # (W,) up to L-2
        self.nodes[:1] = self.tokens[0, L]
        h_win, h_nodes = self.head_state[:, win], self.head_state[:, L - 1]  # (1, W, C), (1, 1, C)
        for d, b in enumerate(self.branches, 1):
            lo, hi, end = self.first[d - 1], self.first[d], self.first[d + 1]  # levels d-1, d
            h_win, logits, states = self.depth(d, win, h_win, h_nodes, self.nodes[lo:hi])
            top = logits.topk(b, -1).indices.flatten()                       # children, in order
            self.nodes[hi:end] = top if self.draft_ids is None else self.draft_ids[top]
            self.tokens[0, L + d] = self.nodes[hi:hi + 1]
            h_nodes = states.repeat_interleave(b, 1)                         # each child's parent

    def depth(self, d, win, h_win, h_nodes, tokens):
        """Depth d's head over the window (states h_win) and the given nodes (their parents' states
        h_nodes and their tokens). A node's query sees the depth's cache up to slot L-2 and its own
        key, written to a scratch slot. Exact at depths 1 and 2; from depth 3 on an off-chain node
        sees the chain's states at L-2, L-3, ...: an approximation of drafting only, which
        verification keeps lossless. Returns the window's new states, the nodes' draft logits and
        their states."""
        L, n = self.newest, len(tokens)
        slots = torch.cat([win, self.scratch[:n]])
        # the last prefix slot a query sees
        sees = torch.cat([win, (L - 2).expand(n)])
        visible = (self.slot_ids <= sees[:, None]) | (self.slot_ids == slots[:, None])
        pos = torch.cat([win, (L - 1).expand(n)])
        idx = torch.cat([self.tokens[0, win + d], tokens])
        h = self.head_forward(self.schedule[d - 1], torch.cat([h_win, h_nodes], 1), idx[None],
                              self.positions(pos)[None], self.depth_caches[d - 1], visible[None],
                              slots[None])
        states = h[:, self.window:]
        return h[:, :self.window], self.model.logits(states[0], self.draft_head), states

    def _greedy_step(self):
        self.draft()
        # 2) Verify: one forward of [t[L], nodes...] at positions L + level, the root in slot L and
        # the nodes in their scratch slots; each query sees the prefix (slots < L), its ancestors
        # and itself.
        L = self.newest
        slots = torch.cat([L, self.scratch[1:]])
        visible = (self.slot_ids < L).expand(self.query_len, -1).index_copy(1, slots,
                                                                            self.ancestors)
        logits, h = self.forward(self.nodes[None], self.positions(L + self.levels)[None],
                                 self.caches,
                                 visible[None], return_head_state=True, slots=slots[None])
        # 3) Accept: siblings carry distinct tokens, so the nodes equal to their parent's argmax
        # form one path from the root; the main model's argmax at its last node is the bonus token.
        target = logits[0].argmax(-1)                                 # the token after each node
        wrong = (self.nodes != target[self.parents]) & (self.levels > 0)   # the root is known
        accepted = ~(self.ancestors & wrong).any(1)                   # right from the root down
        # the accepted path's deepest node
        last = (accepted * self.levels).argmax(0, keepdim=True)
        # root, levels 1..n, then `last`
        n, path = self.levels[last], self.up[last][0]
        # 4) Move the path's tokens, keys, values and head states to slots L+1..L+n: slot = position
        # again for the next step (copies past n land beyond the new position).
        dst = L + self.path_offsets
        self.tokens[0, dst[1:]] = self.nodes[path[1:]]
        self.tokens[0, L + n + 1] = target[last]
        for cache in self.caches:
            cache.k[:, dst] = cache.k[:, slots[path]]
            cache.v[:, dst] = cache.v[:, slots[path]]
        self.head_state[:, dst] = h[:, path]
        return torch.cat([n, self.tokens[0, L + 1 + self.path_offsets]])   # n, t[L+1..L+D+1]

    def step(self, live):
        """One graphed draft-and-verify step of the one row."""
        out = self.greedy_step()                          # n, t[L+1..L+D+1]
        self.newest += out[0] + 1
        return Pending(out, lambda rows: [drafted(rows[1:rows[0] + 2], self.depths)])


class AutoTreeDrafts(TreeDrafts):
    """tree@autoN (EAGLE-2): a tree of N nodes whose shape follows the heads' confidence, rebuilt
    every step. A node's score is the sum of the draft log-probabilities along its path. The
    structure (parents, levels, ancestors) is computed in the step, so its shape stays fixed:
    verification is TreeDrafts'."""

    def __init__(self, model, max_len, budget, schedule=None, draft_ids=None, **engine):
        # a placeholder of the right depth and node count: draft() rewrites the structure every step
        super().__init__(model, max_len, [1] * (AUTO_DEPTH - 1) + [budget - AUTO_DEPTH + 1],
                         schedule, draft_ids, **engine)
        # the root's id among the proposed: after them
        self.budget, self.root = budget, AUTO_PROPOSED
        self.proposed_levels = torch.tensor([1] * AUTO_TOPK + [d for d in range(2, AUTO_DEPTH + 1)
                                                               for _ in range(AUTO_TOPK ** 2)],
                                            device=self.device)

    def draft(self):
        L, k = self.newest, AUTO_TOPK
        win = (L - 1 - self.window).clamp_min(0) + self.window_offsets
        self.nodes[:1] = self.tokens[0, L]
        h_win, h_front = self.head_state[:, win], self.head_state[:, L - 1]
        front, score = self.nodes[:1], torch.zeros(1, device=self.device)
        ids = torch.full_like(self.newest, self.root)
        # 1) Propose: per depth, the head runs on a frontier (the root, then the AUTO_TOPK
        # best-scored nodes of the level before) and every frontier node proposes its AUTO_TOPK best
        # tokens.
        # per depth: tokens, scores, parents
        proposed = []
        for d in range(1, self.depths + 1):
            h_win, logits, states = self.depth(d, win, h_win, h_front, front)
            top = torch.log_softmax(logits.float(), -1).topk(k, -1)  # (f, k)
            tokens = top.indices.flatten()
            tokens = tokens if self.draft_ids is None else self.draft_ids[tokens]
            scores = (score[:, None] + top.values).flatten()
            proposed.append((tokens, scores, ids.repeat_interleave(k)))
            # the next frontier, best first
            best = scores.topk(k).indices
            # the best path, for the window
            self.tokens[0, L + d] = tokens[best[:1]]
            front, score, ids = tokens[best], scores[best], (d > 1) * (k + (d - 2) * k * k) + best
            h_front = states[:, best // k]
        # 2) Choose the N best-scored: a child never scores above its parent (ties go to the parent,
        # proposed first), so every chosen node's ancestors are chosen.
        tokens, scores, parents = (torch.cat(x) for x in zip(*proposed))
        chosen = scores.sort(descending=True, stable=True).indices[:self.budget].sort().values
        # proposal -> node
        index = torch.zeros(self.root + 1, dtype=torch.long, device=self.device)
        index[chosen] = torch.arange(1, self.budget + 1, device=self.device)
        self.nodes[1:] = tokens[chosen]
        self.parents[1:] = index[parents[chosen]]
        self.levels[1:] = self.proposed_levels[chosen]
        # 3) The tree's structure: each node, its parent, its grandparent, ...
        chain = [torch.arange(self.query_len, device=self.device)]
        for _ in range(self.depths):
            chain.append(self.parents[chain[-1]])
        chain = torch.stack(chain, 1)                                  # (1+N, D+1)
        self.ancestors.copy_((chain[:, :, None] == chain[:, :1].T[None]).any(1))
        # steps up to each level's ancestor
        up = self.levels[:, None] - self.path_offsets
        self.up.copy_(torch.where(up >= 0, chain.gather(1, up.clamp_min(0)), chain[:, :1]))
