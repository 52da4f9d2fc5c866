"""
Tree drafts (draft_tree.TreeDrafts) on tiny random models, CPU: greedy output identical to `ar` over seeds, shapes, depths
and both architectures; a tree of ones is exactly the chain; the drafted tree equals the heads' top candidates
recomputed without caches (depths 1 and 2, where drafting is exact); after every step the main cache and hidden
states hold the accepted path at slot = position; trees accept off-chain candidates and beat the chain in tokens per
forward; dynamic trees (tree@autoN) likewise; sampling refused; method names; the accepted-length histogram in
Stats and bench.
"""

import pytest
import torch

import bench
import decode
import draft_tree
import engine
import report
from decode import Method, Stats, generate, make_strategy
from draft_tree import TreeDrafts
from helpers import MODELS, assert_exercised, case, prompt, strategy_steps, tiny, top


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models run on one thread


# ----------------------------------------------------------------------------------------------------------------
# lossless: tree greedy == plain greedy

@pytest.mark.parametrize("method, opts", [
    ("tree@1x3", {}), ("tree@3x4", {}), ("tree@4-2-2-1", {}), ("tree@2-5", {}),
    ("tree@3x3", {"schedule": [1, 0, 1]}),                    # heads in another order, one of them looped
    ("tree@2x4", {"draft_ids": torch.arange(40)}),            # candidates from a sub-vocabulary
    ("tree@auto4", {}), ("tree@auto16", {}), ("tree@auto52", {}),   # dynamic trees, up to every proposed node
    ("tree@auto12", {"draft_ids": torch.arange(40)}),
])
def test_tree_greedy_equals_ar(method, opts):
    stats = Stats()
    for seed, residual in MODELS:
        m, cases = case(seed, residual)
        for p, ref in cases:
            assert generate(m, [p], 24, method=method, stats=stats, **opts) == ref, (seed, len(p), method)
    assert_exercised(stats, depths=1 if method == "tree@1x3" else 2)


def test_tree_greedy_equals_ar_gpt2():
    stats = Stats()
    for seed, residual in MODELS:
        m, cases = case(seed, residual, arch="gpt2")
        for p, ref in cases:
            for method in ("tree@3x4", "tree@auto16"):
                assert generate(m, [p], 24, method=method, stats=stats) == ref, (seed, method)
    assert_exercised(stats, depths=1)


def test_tree_of_ones_is_the_chain():
    """tree@Dx1 drafts exactly what mtp@D drafts (the window, the node's own scratch slot), so it accepts the same."""
    for seed, residual in MODELS[1:]:
        m, cases = case(seed, residual)
        for p, _ in cases:
            chain, tree = Stats(), Stats()
            generate(m, [p], 24, method="mtp@3", stats=chain)
            generate(m, [p], 24, method="tree@3x1", stats=tree)
            assert tree.accepted_lengths == chain.accepted_lengths and tree.proposed == chain.proposed, seed


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tree_full_context(arch):
    """Prompt + max_new_tokens == max_seq_len: the tree's positions must not reach past the position table."""
    for seed, n in ((1, 1), (2, 9), (3, 17)):
        m = tiny(seed, arch=arch, heads=2, residual=0.01, max_seq_len=32)
        p = prompt(seed, n)
        for method in ("tree@4-2-2-1", "tree@auto16"):
            assert generate(m, [p], 32 - n, method=method) == generate(m, [p], 32 - n), (seed, method)


def test_tree_stop_token():
    for seed in (1, 2):
        m = tiny(seed, heads=2, residual=0.01)
        p = prompt(seed, 5)
        full = generate(m, [p], 30)[0]
        for stop in list(dict.fromkeys(full))[:6]:
            assert generate(m, [p], 30, method="tree@3x4", stop_ids=[stop]) == \
                generate(m, [p], 30, stop_ids=[stop]), (seed, stop)


# ----------------------------------------------------------------------------------------------------------------
# the mechanism: drafting, the cache after a step, off-chain acceptance

@torch.no_grad()
def test_tree_drafts_equal_recompute():
    """The drafted tree holds the heads' top candidates computed from scratch (no caches) wherever drafting is exact:
    levels 1 and 2, and level 3 below the chain's level-1 node (whose window states read that node's token).
    tree@2-3-2: node 0 the root, level 1 nodes 1-2, level 2 nodes 3-8 (3 per parent), level 3 nodes 9-20."""
    m = tiny(2, heads=2)   # heads that read the previous depth's state (a bigram-like model's read only the token)
    checked = 0
    for s in strategy_steps(m, "tree@2-3-2", prompt(2, 7), 12):
        s.draft()
        L = int(s.newest)
        t, nodes = s.tokens[:, :L + 1], s.nodes.tolist()
        pos = m.default_pos(t[:, :L])
        h1 = m.head_forward(0, m.hidden(t[:, :L]), t[:, 1:L + 1], pos)
        assert nodes[1:3] == top(m, h1, 2), L
        for i, x in enumerate(nodes[1:3]):                   # depth 2 reads t[i+2]: x is t[L+1]
            h2 = m.head_forward(1, h1, torch.cat([t[:, 2:L + 1], torch.tensor([[x]])], 1), pos)
            assert nodes[3 + 3 * i:6 + 3 * i] == top(m, h2, 3), (L, i)
            if i == 0:                                       # depth 3 reads t[i+3]: x, then y is t[L+2]
                for j, y in enumerate(nodes[3:6]):
                    h3 = m.head_forward(1, h2, torch.cat([t[:, 3:L + 1], torch.tensor([[x, y]])], 1), pos)
                    assert nodes[9 + 2 * j:11 + 2 * j] == top(m, h3, 2), (L, j)
                    checked += 1
    assert checked == 36


@torch.no_grad()
def test_auto_tree_drafts_and_structure():
    """tree@autoN: with N = every proposed node, levels 1 and 2 are the heads' top AUTO_TOPK candidates recomputed
    from scratch; with a smaller N, the chosen nodes form a tree whose parents, levels, ancestors and per-level
    ancestors (`up`) agree with each other."""
    m = tiny(2, heads=2)
    k, checked = draft_tree.AUTO_TOPK, 0
    for s in strategy_steps(m, f"tree@auto{draft_tree.AUTO_PROPOSED}", prompt(2, 7), 6):
        s.draft()
        L = int(s.newest)
        t, nodes, parents, levels = (s.tokens[:, :L + 1], s.nodes.tolist(), s.parents.tolist(), s.levels.tolist())
        pos = m.default_pos(t[:, :L])
        h1 = m.head_forward(0, m.hidden(t[:, :L]), t[:, 1:L + 1], pos)
        first = [i for i in range(len(nodes)) if levels[i] == 1]
        assert [nodes[i] for i in first] == top(m, h1, k), L
        for i in first:
            h2 = m.head_forward(1, h1, torch.cat([t[:, 2:L + 1], torch.tensor([[nodes[i]]])], 1), pos)
            assert [nodes[j] for j in range(len(nodes)) if parents[j] == i] == top(m, h2, k), (L, i)
            checked += 1
    assert checked == 6 * k
    for s in strategy_steps(m, "tree@auto10", prompt(3, 5), 6):
        s.draft()
        parents, levels, up = s.parents.tolist(), s.levels.tolist(), s.up.tolist()
        assert parents[0] == levels[0] == 0 and max(levels) >= 2
        for i in range(1, len(parents)):
            assert parents[i] < i and levels[i] == levels[parents[i]] + 1
            assert up[i][levels[i]] == i and up[i][0] == 0
            assert all(parents[up[i][d]] == up[i][d - 1] for d in range(1, levels[i] + 1))
            assert s.ancestors[i].nonzero().flatten().tolist() == sorted(up[i][:levels[i] + 1])


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tree_cache_equals_recompute(arch):
    """After every step, slots 0..L-1 of the main cache and the hidden states equal one forward over the text: the
    accepted path's keys moved from scratch slots to their positions, whichever branch it took."""
    m = tiny(3, arch=arch, heads=2, residual=0.01)
    steps = 0
    for s in strategy_steps(m, "tree@3x4", prompt(3, 6), 10):
        L = int(s.newest)
        caches, _ = m.make_caches(1, s.cache_len)
        h = m.hidden(s.tokens[:, :L], None, caches)
        torch.testing.assert_close(s.head_state[:, :L], h, atol=1e-5, rtol=1e-5)
        for ours, fresh in zip(s.caches, caches):
            torch.testing.assert_close(ours.k[:, :L], fresh.k[:, :L], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours.v[:, :L], fresh.v[:, :L], atol=1e-5, rtol=1e-5)
        steps += 1
    assert steps == 10


def test_tree_accepts_off_chain_and_beats_the_chain(monkeypatch):
    """On bigram-like models the heads' second choices are often right where the first is wrong: some steps accept
    a path that leaves the chain (its first token is not the top-1 candidate), and the tree makes more tokens per
    forward than the chain of the same depth."""
    off_chain, step = [0], TreeDrafts.step

    def recording_step(self, live):
        self.draft()                                   # idempotent: the step drafts the same tree again
        top1 = int(self.nodes[1])                      # the chain's depth-1 draft
        (row,) = step(self, live).result()
        off_chain[0] += row.accepted > 0 and row.tokens[0] != top1
        return engine.Ready([row])
    monkeypatch.setattr(TreeDrafts, "step", recording_step)
    chain, tree, auto = Stats(), Stats(), Stats()
    for seed, residual in MODELS[1:]:
        m, cases = case(seed, residual)
        for p, ref in cases:
            generate(m, [p], 24, method="mtp@3", stats=chain)
            generate(m, [p], 24, method="tree@auto16", stats=auto)
            assert generate(m, [p], 24, method="tree@3x4", stats=tree) == ref
    assert off_chain[0] > 0
    assert tree.tokens_per_forward > chain.tokens_per_forward + 0.2, (tree.tokens_per_forward, chain.tokens_per_forward)
    assert auto.tokens_per_forward > chain.tokens_per_forward + 0.2, (auto.tokens_per_forward, chain.tokens_per_forward)


def test_tree_step_is_idempotent(monkeypatch):
    """A CUDA graph's capture runs the step function several times on the same state (engine.Graph): running it
    three times per step must change nothing, prompts of one token (the window clamped at 0) included."""
    runs = {}
    for repeats in (1, 3):
        monkeypatch.setattr(engine.Graph, "__call__", lambda self: [self.fn() for _ in range(repeats)][-1])
        m = tiny(2, heads=2, residual=0.01)
        stats = Stats()
        runs[repeats] = [generate(m, [prompt(s, n)], 24, method=method, stats=stats)
                         for s, n in ((0, 1), (1, 9)) for method in ("tree@3x4", "tree@auto16")]
        runs[repeats].append(stats.accepted_lengths)
    assert runs[3] == runs[1]
    assert runs[1][:4] == [generate(m, [prompt(s, n)], 24) for s, n in ((0, 1), (1, 9)) for _ in range(2)]


# ----------------------------------------------------------------------------------------------------------------
# names, errors, stats, bench

def test_tree_names():
    assert Method.parse("tree@3x4") == Method("tree", branches=(4, 2, 1))
    assert Method.parse("tree@4x4") == Method("tree", branches=(4, 2, 1, 1))
    assert Method.parse("tree@4-2-2-1") == Method("tree", branches=(4, 2, 2, 1))
    assert Method.parse("tree@1x63") == Method("tree", branches=(63,))
    assert Method.parse("tree").kind == "tree"
    assert Method.parse("tree@auto16") == Method("tree", budget=16)
    for bad in ("tree@3x", "tree@x4", "tree@0x4", "tree@3x0", "tree@4-0", "tree@a", "tree@17x1", "tree@3x4x2"):
        with pytest.raises(ValueError, match="expected tree@DxK"):
            Method.parse(bad)
    for bad in ("tree@auto", "tree@auto3", f"tree@auto{draft_tree.AUTO_PROPOSED + 1}", "tree@autox", "tree@auto-5"):
        with pytest.raises(ValueError, match="node budget"):
            Method.parse(bad)
    for big in ("tree@3x8", "tree@1x64", "tree@8-8"):   # 104, 64 and 72 nodes: more than one forward holds
        with pytest.raises(ValueError, match="MAX_QUERY"):
            Method.parse(big)
    m = tiny(0, heads=2)
    assert make_strategy(m, "tree@3x4", 40).query_len == 1 + 4 + 8 + 8
    assert make_strategy(m, "tree@auto16", 40).query_len == 1 + 16


def test_tree_refuses_sampling(capsys):
    m = tiny(0, heads=2)
    with pytest.raises(ValueError, match="greedily only"):
        generate(m, [[1, 2]], 4, temperature=1.0, method="tree@2x2")
    with pytest.raises(ValueError, match="heads"):
        generate(tiny(0), [[1, 2]], 4, method="tree@2x2")
    with pytest.raises(SystemExit) as e:                 # the CLI says so before loading anything
        decode.main(["--method", "tree@2x2", "--temperature", "0.7"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "greedily only" in err[0]


def test_accepted_lengths_histogram():
    """Stats.accepted_lengths[n] counts the steps that accepted n drafts: chains and trees alike."""
    m = tiny(2, heads=2, residual=0.01)
    for method in ("mtp@3", "tree@3x4"):
        stats = Stats()
        out = generate(m, [prompt(0, 5)], 30, method=method, stats=stats)[0]
        hist = stats.accepted_lengths
        assert len(hist) == 4 and sum(hist) == stats.steps
        assert sum(n * c for n, c in enumerate(hist)) == sum(stats.accepted) == len(out) - 1 - stats.steps
        assert stats.accepted == [sum(hist[d + 1:]) for d in range(3)]


def test_bench_reports_trees():
    m, tokenizer, options = bench.tiny_setup("cpu", torch.float32, seed=0)
    res = bench.run(m, tokenizer, ["ar", "mtp@2", "tree@2x3"], ["What is 2+2?", "Hello there"], 12, options=options,
                    warmup=0)
    methods = res["methods"]
    assert methods["tree@2x3"]["exact_match"] == 1.0
    for name, depth in (("mtp@2", 2), ("tree@2x3", 2)):
        hist = methods[name]["accepted_lengths"]
        assert len(hist) == depth + 1 and sum(hist) > 0
    assert methods["ar"]["accepted_lengths"] == []
    assert bench.method_list("ar,tree@4-2-2-1,mtp@3,tree@3x4") == ["ar", "tree@4-2-2-1", "mtp@3", "tree@3x4"]
    footer = [line for line in report.table(res).splitlines() if line.startswith("accepted drafts per step")]
    assert len(footer) == 1 and "tree@2x3" in footer[0] and "mtp@2" in footer[0] and " ar " not in footer[0]
