"""
Decoding tests on tiny random models, CPU, no weights: every lossless method reproduces plain greedy decoding token
for token, speculative sampling keeps the target distribution (statistically, with tests shown to have power), the
static KV cache agrees with recomputation, ConfAdapt's emission rule, error messages, the per-token provenance trace.
(bench.py: tests/test_bench.py; the command lines: tests/test_cli.py.)

Random models draft badly, so some models here are made "bigram-like" (tiny residual branches, heads reading only the
next token's embedding) so their heads agree with the main model most of the time: the tests assert, through Stats,
that drafts were both accepted and rejected, at several depths.
"""

from types import SimpleNamespace

import pytest
import torch

import decode   # the repository is on sys.path through conftest.py
import draft_heads
import draft_mask
import engine
from decode import Method, Stats, generate, make_strategy
from engine import Sampling
from helpers import MODELS, V, assert_exercised, case, head_start, prompt, tiny, with_mask_oracle

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models run on one thread


# ----------------------------------------------------------------------------------------------------------------
# lossless: speculative greedy == plain greedy

@pytest.mark.parametrize("method, opts", [
    ("mtp@1", {}), ("mtp@2", {}), ("mtp@4", {}),
    ("mtp@3", {"schedule": [0, 0, 0]}),                       # one head looped to three depths
    ("mtp@4", {"schedule": [1, 0, 1, 0]}),
    ("mtp@3", {"draft_ids": torch.arange(40)}),             # drafts restricted to a sub-vocabulary
])
def test_mtp_greedy_equals_ar(method, opts):
    stats = Stats()
    for seed, residual in MODELS:
        m, cases = case(seed, residual)
        for p, ref in cases:
            assert generate(m, [p], 24, method=method, stats=stats, **opts) == ref, (seed, len(p), method)
    assert_exercised(stats, depths=min(2, Method.parse(method).k))


def test_mtp_greedy_equals_ar_gpt2():
    stats = Stats()
    for seed, residual in MODELS:
        m, cases = case(seed, residual, arch="gpt2")
        for p, ref in cases:
            assert generate(m, [p], 24, method="mtp@3", stats=stats) == ref, seed
    assert_exercised(stats, depths=1)


@pytest.mark.parametrize("k, mask_ids", [(2, [V - 1]), (4, [V - 1]), (4, [V - 1, V - 2, V - 3])])
def test_verified_greedy_equals_ar(k, mask_ids):
    stats = Stats()
    for seed, residual in MODELS:
        for p, ref in case(seed, residual)[1]:
            m = tiny(seed, heads=2, residual=residual)      # the same model as case's, free to change
            assert generate(m, [p], 24, method=f"verified@{k}", mask_ids=mask_ids) == ref   # the model as is
            with_mask_oracle(m, mask_ids, p + ref[0])                                       # good drafts
            assert generate(m, [p], 24, method=f"verified@{k}", mask_ids=mask_ids, stats=stats) == ref, (seed, k)
    assert_exercised(stats, depths=k - 1)


def test_stop_token_inside_accepted_run(monkeypatch):
    """A stop id that the drafts carry past: the output ends at it, as ar's does."""
    chunks = []
    step = draft_heads.HeadDrafts.step

    def recording_step(self, live):
        rows = step(self, live).result()
        chunks.append(rows[0].tokens)   # batch 1: the one row
        return engine.Ready(rows)
    monkeypatch.setattr(draft_heads.HeadDrafts, "step", recording_step)
    inside = 0
    for seed in (1, 5):
        m = tiny(seed, heads=2, residual=0.01)
        p = prompt(seed, 5)
        full = generate(m, [p], 30, method="ar")[0]
        for stop in list(dict.fromkeys(full))[:8]:   # distinct tokens, in order of first appearance
            chunks.clear()
            ref = generate(m, [p], 30, method="ar", stop_ids=[stop])
            assert ref[0][-1] == stop and ref[0] == full[:full.index(stop) + 1]
            assert generate(m, [p], 30, method="mtp@4", stop_ids=[stop]) == ref
            inside += any(stop in c[:-1] for c in chunks)
    assert inside > 0, "no stop token landed inside an accepted run: the test lost its point"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_full_context(arch):
    """Prompt + max_new_tokens == max_seq_len: drafts and masks must not reach past the position table."""
    for seed, n in ((1, 1), (2, 9), (3, 17)):
        m = tiny(seed, arch=arch, heads=2, residual=0.01, max_seq_len=32)
        p = prompt(seed, n)
        ref = generate(m, [p], 32 - n)
        for method in ("mtp@4", "verified@4"):
            assert generate(m, [p], 32 - n, method=method, mask_ids=[V - 1]) == ref, (method, seed)
        for method in ("static@5", "confadapt@0.01"):   # top-1 >= 1/V > 0.01: all kept
            assert len(generate(m, [p], 32 - n, method=method, mask_ids=[V - 1])[0]) == 32 - n


def test_batched_ar_equals_single():
    for seed, arch in ((0, "llama"), (1, "gpt2")):
        m = tiny(seed, arch=arch)
        prompts = [prompt(seed + i, n) for i, n in enumerate((1, 9, 4, 17))]
        single = [generate(m, [p], 20)[0] for p in prompts]
        assert generate(m, prompts, 20) == single
        stop = single[0][3]                      # a stop id that ends some rows early
        single = [generate(m, [p], 20, stop_ids=[stop])[0] for p in prompts]
        assert generate(m, prompts, 20, stop_ids=[stop]) == single


# ----------------------------------------------------------------------------------------------------------------
# exact speculative sampling

def tv(counts, probs):
    return 0.5 * (counts / counts.sum() - probs).abs().sum().item()


def always_accept(drafts, draft_probs, target_logits, sampling, generator=None):
    return len(drafts), int(torch.multinomial(sampling.probs(target_logits[-1]), 1, generator=generator))


def resample_from_target(drafts, draft_probs, target_logits, sampling, generator=None):
    """A plausible bug: on rejection, sample from p instead of norm(max(0, p - q))."""
    p = sampling.probs(target_logits)
    for i, x in enumerate(drafts.tolist()):
        if torch.rand((), generator=generator) * draft_probs[i, x] > p[i, x]:
            return i, int(torch.multinomial(p[i], 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[-1], 1, generator=generator))


def first_two(verify, p_logits, q, n, seed=0):
    """Empirical joint of the first two emitted tokens from drafts of depth len(q), n trials. The target
    distribution of the second token does not depend on the first (a valid, if simple, model)."""
    g = torch.Generator().manual_seed(seed)
    V, s = q.size(-1), Sampling(temperature=1.0)
    drafts = torch.stack([torch.multinomial(qd, n, replacement=True, generator=g) for qd in q], 1)   # (n, D)
    second = torch.multinomial(s.probs(p_logits[1]), n, replacement=True, generator=g).tolist()
    counts = torch.zeros(V, V)
    for i in range(n):
        k, nxt = verify(drafts[i], q, p_logits, s, g)
        out = drafts[i, :k].tolist() + [nxt, second[i]]  # after a rejection: the next step's first token
        counts[out[0], out[1]] += 1
    return counts


def test_verify_sampling_distribution():
    g = torch.Generator().manual_seed(0)
    V = 6
    p_logits = 1.5 * torch.randn(3, V, generator=g)
    q = torch.softmax(1.5 * torch.randn(2, V, generator=g), -1)
    p = torch.softmax(p_logits, -1)
    assert 0.5 * (p[0] - q[0]).abs().sum() > 0.2         # drafts far from the target: bugs will show

    # depth 1: the first token (sampling noise at these sizes: TV ~0.005-0.01)
    assert tv(first_two(engine.verify, p_logits[1:], q[1:], 8000).sum(1), p[1]) < 0.02
    assert tv(first_two(always_accept, p_logits[1:], q[1:], 1000).sum(1), p[1]) > 0.2            # power
    assert tv(first_two(resample_from_target, p_logits[1:], q[1:], 2000).sum(1), p[1]) > 0.04     # power
    # depth 2: joint of the first two tokens (36 cells: noise ~0.02)
    joint = torch.outer(p[0], p[1]).flatten()
    assert tv(first_two(engine.verify, p_logits, q, 8000).flatten(), joint) < 0.035
    assert tv(first_two(always_accept, p_logits, q, 1000).flatten(), joint) > 0.3


def test_verify_greedy():
    target = torch.tensor([[0.0, 5, 1], [3, 0, 1], [0, 0, 9], [2, 1, 0]])   # argmax 1, 0, 2, 0
    for drafts, want in (([1, 0, 2], (3, 0)), ([1, 2, 2], (1, 0)), ([0, 0, 2], (0, 1))):
        assert engine.verify(torch.tensor(drafts), None, target, Sampling()) == want


def e2e_tv(monkeypatch, verify, n):
    """TV between mtp@2's sampled 2-token outputs and the exact distribution of plain sampling."""
    monkeypatch.setattr(draft_heads, "verify", verify)
    m = tiny(7, vocab=5, heads=2, std=0.5, n_layer=1, n_embd=16, head_dim=8, n_head=2, n_kv_head=1,
             intermediate_size=32, max_seq_len=16)
    p = [1, 3, 2]
    with torch.no_grad():   # exact: P(x1) P(x2 | x1) from one batched forward over the 5 continuations
        idx = torch.tensor([p + [x] for x in range(5)])
        probs = torch.softmax(m(idx).float(), -1)
        exact = (probs[0, 2][:, None] * probs[:, 3]).flatten()
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(25)
    for _ in range(n):
        a, b = generate(m, [p], 2, temperature=1.0, generator=g, method="mtp@2")[0]
        counts[5 * a + b] += 1
    return tv(counts, exact)


def test_mtp_sampling_end_to_end(monkeypatch):
    assert e2e_tv(monkeypatch, engine.verify, 1000) < 0.12     # 25 cells, 1000 samples: noise ~0.05-0.07
    assert e2e_tv(monkeypatch, always_accept, 300) > 0.2       # the test has power


# ----------------------------------------------------------------------------------------------------------------
# mask tokens: ConfAdapt, static-k, the cache

def crafted(confidences, k=5):
    """Logits (k, 8) whose row i has top-1 probability confidences[i] on token i."""
    rows = []
    for i, c in enumerate(confidences):
        p = torch.full((8,), (1 - c) / 7)
        p[i] = c
        rows.append(p.log())
    return torch.stack(rows)


def test_confadapt_emit():
    def emit(tau, conf):
        stub = SimpleNamespace(tau=tau, sampling=Sampling(), generator=None)
        return draft_mask.MaskDrafts.emit(stub, crafted(conf))
    assert emit(0.9, [0.99, 0.95, 0.5, 0.99, 0.99]) == [0, 1]          # stops at the first unsure position
    assert emit(0.9, [0.5, 0.99, 0.99, 0.99, 0.99]) == [0]             # always at least one token
    assert emit(0.9, [0.99] * 5) == [0, 1, 2, 3, 4]
    assert emit(None, [0.5, 0.2, 0.99, 0.3, 0.99]) == [0, 1, 2, 3, 4]  # static keeps all k


def test_confadapt_stop_token():
    m = tiny(3)
    p = prompt(3, 6)
    full = generate(m, [p], 40, method="confadapt@0.01", mask_ids=[V - 1])[0]   # tau < 1/V: chunks of k_max=16
    assert len(full) == 40
    for stop in (full[5], full[20]):
        out = generate(m, [p], 40, method="confadapt@0.01", mask_ids=[V - 1], stop_ids=[stop])[0]
        assert out == full[:full.index(stop) + 1]


@pytest.mark.parametrize("k", [2, 3, 5])
def test_static_cache_equals_recompute(k):
    for seed in range(3):
        m = tiny(seed, arch="gpt2" if seed == 2 else "llama")
        p = prompt(seed, 2 + 5 * seed)
        text, out = list(p), []
        with torch.no_grad():
            while len(out) < 25:   # no cache: the whole text plus k-1 masks, emit the last k predictions
                logits = m(torch.tensor([text + [V - 1] * (k - 1)]))[0, -k:]
                new = logits.argmax(-1).tolist()
                out, text = out + new, text + new
        assert generate(m, [p], 25, method=f"static@{k}", mask_ids=[V - 1]) == [out[:25]], (seed, k)


# ----------------------------------------------------------------------------------------------------------------
# errors, stats, provenance

def test_errors():
    m = tiny(0)
    with pytest.raises(ValueError, match="unknown method"):
        generate(m, [[1, 2]], 4, method="beam@3")
    with pytest.raises(ValueError, match="context"):
        generate(m, [[1] * 200], 57)
    with pytest.raises(ValueError, match="heads"):
        generate(m, [[1, 2]], 4, method="mtp@2")
    with pytest.raises(ValueError, match="mask"):
        generate(m, [[1, 2]], 4, method="static@3")


def test_stats_definitions():
    m = tiny(2, heads=2, residual=0.01)
    ar, mtp = Stats(), Stats()
    p = prompt(0, 5)
    generate(m, [p, p[:3]], 20, method="ar", stats=ar)
    assert ar.tokens_per_forward == 1.0 and ar.steps == 0
    out = generate(m, [p], 20, method="mtp@3", stats=mtp)[0]
    assert mtp.tokens == len(out) == 20
    # per step: 1 + accepted tokens; prefill (one forward, one token) left out of tokens per forward
    assert mtp.forwards - 1 == mtp.steps and mtp.tokens_per_forward > 1
    assert sum(mtp.accepted) + mtp.steps >= 19
    assert mtp.cum_acceptance_rate[0] == mtp.accepted[0] / mtp.steps
    assert mtp.tokens_per_forward == pytest.approx((20 - 1) / mtp.steps)
    static = Stats()   # the prefill forward yields k tokens: left out with it
    generate(m, [p], 24, method="static@3", mask_ids=[V - 1], stats=static)
    assert static.tokens_per_forward == 3.0
    verified = Stats()
    generate(m, [p], 24, method="verified@3", mask_ids=[V - 1], stats=verified)
    assert verified.steps < verified.forwards - 1     # forwards with nothing to verify are not steps


def test_batched_ar_counts_only_rows_still_decoding():
    m = tiny(0)
    prompts = [prompt(s, 4 + s) for s in range(3)]
    free = generate(m, prompts, 12)[0]
    i = next(i for i in range(1, 12) if free[i] not in free[:i])   # row 0 stops at its (i+1)-th token
    stats = Stats()
    outs = generate(m, prompts, 12, stop_ids=[free[i]], stats=stats)
    assert len(outs[0]) == i + 1 < max(map(len, outs))
    assert stats.tokens_per_forward == 1.0


@pytest.mark.parametrize("method", ["mtp@3", "verified@3", "static@3", "ar"])
def test_trace_matches_stats(method):
    """generate(trace=) labels each token: depth-d labels are exactly the drafts Stats counts as accepted at d."""
    prompts = [prompt(0, 5), prompt(1, 9)]
    stats, trace, outs = Stats(), [], []
    for p in prompts:
        m = tiny(2, heads=2, residual=0.01)
        if method.startswith("verified"):       # good mask drafts, so some are accepted
            with_mask_oracle(m, [V - 1], p + generate(m, [p], 24)[0])
        outs += generate(m, [p], 24, method=method, mask_ids=[V - 1], stats=stats, trace=trace)
    assert [len(t) for t in trace] == [len(o) for o in outs]
    labels = [d for t in trace for d in t]
    # static@K's prefill keeps K-1 mask predictions too, and Stats records steps only
    prefill = len(prompts) if method.startswith("static") else 0
    for d in range(1, max(labels) + 1):
        assert labels.count(d) == stats.accepted[d - 1] + prefill, (method, d)
    assert (max(labels) > 1) == (method != "ar")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_head_drafts_keep_the_main_head_state(arch):
    """The accepted tokens' head states that the heads read are the main model's own, fused: equal to a cache-free
    forward over the final text (a wrong write leaves the output identical but starves the heads)."""
    m = tiny(2, arch=arch, heads=2, residual=0.01)
    m.add_fusion([0])      # a fusion that is not "take the last", so head_state differs from hidden()
    with torch.no_grad():
        m.fuse.weight.add_(0.3 * torch.randn_like(m.fuse.weight) / m.cfg.n_embd ** 0.5)
    p = prompt(2, 7)
    strategy = decode.make_strategy(m, "mtp@3", len(p) + 30)
    stats = Stats()
    out = generate(m, [p], 30, method=strategy, stats=stats)[0]
    assert_exercised(stats)
    final = int(strategy.newest[0])                      # positions before it hold accepted tokens
    text = torch.tensor([p + out])[:, :final]
    with torch.no_grad():
        expected = head_start(m, text)
        assert not torch.allclose(expected, m.hidden(text), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(strategy.head_state[:, :final], expected, rtol=1e-4, atol=1e-5)


def test_graphed_steps_are_idempotent(monkeypatch):
    """A CUDA graph is captured after warm-up runs of its step on the same state (engine.Graph), so every graphed
    step must leave the same state however often it runs; counters advance outside it. Simulated on the CPU: every
    step here runs three times per call, and the outputs must not change."""
    m, cases = case(2, 0.01)
    lossy = {meth: [generate(m, [p], 24, method=meth, mask_ids=[V - 1])[0] for p, _ in cases]
             for meth in ("static@3", "confadapt@0.5")}

    def thrice(graph):
        graph.fn()
        graph.fn()
        return graph.fn()
    monkeypatch.setattr(engine.Graph, "__call__", thrice)
    for meth in ("ar", "ar@4", "mtp@1", "mtp@3", "mtp@auto3", "verified@3"):
        for p, ref in cases:
            assert generate(m, [p], 24, method=meth, mask_ids=[V - 1]) == ref, meth
    for meth, outs in lossy.items():
        assert [generate(m, [p], 24, method=meth, mask_ids=[V - 1])[0] for p, _ in cases] == outs, meth


# ----------------------------------------------------------------------------------------------------------------
# the engine's host side: padded prefill, steps queued ahead, one read-back per step

@pytest.mark.parametrize("method", ["ar", "mtp@3", "verified@3"])
def test_prefill_pads_are_invisible(method):
    """With graphs, prompts are padded to engine.PREFILL_LENGTHS (longer ones run unpadded; here padded on the CPU
    too): on both sides of a padded length and past the last, the output is greedy decoding recomputed without a
    cache."""
    m = tiny(0, heads=2, max_seq_len=600)
    strategy = make_strategy(m, method, 536, mask_ids=[V - 1])
    strategy.prefill_lengths = engine.PREFILL_LENGTHS
    assert engine.PREFILL_LENGTHS[-1] < 530
    for n in (1, 15, 16, 17, 530):
        text = prompt(n, n)
        with torch.no_grad():
            for _ in range(6):
                text.append(int(m(torch.tensor([text]))[0, -1].argmax()))
        assert generate(m, [text[:n]], 6, method=strategy)[0] == text[n:], (method, n)
    assert sorted(strategy.prefills) == [16, 32, 530]         # the lengths the prompts were padded to


@pytest.mark.parametrize("method,batch", [("ar", 3), ("ar@4", 1), ("mtp@3", 3), ("tree@3x4", 1)])
def test_a_step_queued_ahead_changes_nothing(method, batch):
    """generate queues a strategy's next step before the current one's tokens reach the host where the steps need
    nothing from it (on CUDA): the outputs and every count are those of waiting for each step, at max_new_tokens and
    at stop tokens."""
    m, cases = case(1, 0.01)
    prompts = [p for p, _ in cases] + [prompt(7, 9)]
    groups = [prompts[:batch]] if batch > 1 else [[p] for p in prompts]
    full = generate(m, prompts[:1], 24)[0]
    for stop_ids in ([], [full[3]], [full[10], full[11]]):
        results = []
        for ahead in (False, True):
            strategy = make_strategy(m, method, 60, batch_size=batch)
            strategy.runs_ahead = ahead
            stats = Stats()
            outs = [generate(m, g, 24, stop_ids=stop_ids, method=strategy, stats=stats) for g in groups]
            results.append((outs, stats))
        assert results[0] == results[1], (method, stop_ids)


@pytest.mark.parametrize("method", ["ar", "mtp@3", "tree@3x4"])
def test_one_read_back_per_step(monkeypatch, method):
    """A greedy ar, mtp or tree step reads the device once (the host waits for nothing else), the prefill once."""
    m, cases = case(1, 0.01)
    strategy = make_strategy(m, method, 60)
    strategy.runs_ahead = True
    reads = [0]
    for name in ("tolist", "item", "__int__", "__bool__", "__float__", "__index__"):
        def counted(self, *args, _real=getattr(torch.Tensor, name)):
            reads[0] += 1
            return _real(self, *args)
        monkeypatch.setattr(torch.Tensor, name, counted)
    stats = Stats()
    generate(m, [cases[0][0]], 24, method=strategy, stats=stats)
    assert reads[0] == stats.forwards, (reads[0], stats.forwards)   # prefill + steps
