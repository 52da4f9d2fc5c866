"""
Speculative decoding of a batch (draft_heads.HeadDrafts with B rows): every row's greedy output equals that row decoded
alone with `ar`, whatever the other rows do (prompt lengths, stop points, acceptance); Stats count only rows still
decoding; sampling keeps each row's distribution; mtp@auto's depth rule; bench.py --batch_sizes. Tiny random models
on CPU (tests/test_decode.py's).
"""

import pytest
import torch

import bench
import decode
import draft_heads
import engine
import report
from decode import Method, Stats, generate
from helpers import assert_exercised, prompt, tiny


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models run on one thread


LENGTHS = (1, 9, 4, 17, 2)   # different prompt lengths: the right-padded prefill and per-row windows


@pytest.mark.parametrize("arch, seed, method", [("llama", 1, "mtp@1"), ("llama", 2, "mtp@3"), ("gpt2", 1, "mtp@2"),
                                                ("gpt2", 2, "mtp@4"), ("llama", 0, "mtp@2")])
def test_batch_equals_ar_alone(arch, seed, method):
    m = tiny(seed, arch=arch, heads=2, residual=None if seed == 0 else 0.01)
    prompts = [prompt(seed + i, n) for i, n in enumerate(LENGTHS)]
    alone = [generate(m, [p], 24, method="ar")[0] for p in prompts]
    stats = Stats()
    assert generate(m, prompts, 24, method=method, stats=stats) == alone
    if seed:   # fully random models (seed 0) reject nearly every draft
        assert_exercised(stats)
    # stop ids that end rows at different points, some inside an accepted run
    stop = [alone[0][3], alone[2][10]]
    alone = [generate(m, [p], 24, method="ar", stop_ids=stop)[0] for p in prompts]
    assert len({len(a) for a in alone}) > 1, "every row stopped at the same point: the test lost its point"
    assert generate(m, prompts, 24, method=method, stop_ids=stop) == alone


def test_one_strategy_reused_across_batches():
    """Buffers left by an earlier, longer batch must not leak into the next (pads, windows, caches)."""
    m = tiny(2, heads=2, residual=0.01)
    s = decode.make_strategy(m, "mtp@3", 60, batch_size=3)
    long = [prompt(i, 30) for i in range(3)]
    short = [prompt(10 + i, n) for i, n in enumerate((2, 7, 1))]
    for batch in (long, short, long):
        assert generate(m, batch, 24, method=s) == [generate(m, [p], 24)[0] for p in batch]


def test_full_context_batch():
    """Rows that reach the model's context while others stopped long before: positions stay in range."""
    m = tiny(1, arch="gpt2", heads=2, residual=0.01, max_seq_len=32)
    prompts = [prompt(1, 12), prompt(2, 3), prompt(3, 8)]
    alone = [generate(m, [p], 20, method="ar")[0] for p in prompts]
    stop = [alone[1][1]]
    alone = [generate(m, [p], 20, method="ar", stop_ids=stop)[0] for p in prompts]
    assert generate(m, prompts, 20, method="mtp@4", stop_ids=stop) == alone


def test_finished_rows_do_not_count():
    """tokens per forward counts rows still decoding: a row that stops early takes no forwards, so batching leaves
    the metric (and acceptance) exactly as decoding each row alone does."""
    m = tiny(2, heads=2, residual=0.01)
    prompts = [prompt(i, n) for i, n in enumerate((3, 11, 6))]
    first = generate(m, prompts[:1], 30)[0]
    i = next(i for i in range(1, 30) if first[i] not in first[:i])   # row 0 stops at its (i+1)-th token
    stop = [first[i]]
    batch, alone = Stats(), Stats()
    outs = generate(m, prompts, 30, method="mtp@3", stop_ids=stop, stats=batch)
    for p in prompts:
        generate(m, [p], 30, method="mtp@3", stop_ids=stop, stats=alone)
    assert len(outs[0]) == i + 1 < max(map(len, outs))
    assert batch == alone
    ar = Stats()
    generate(m, prompts, 30, stop_ids=stop, stats=ar)
    assert ar.tokens_per_forward == 1.0


def test_trace_per_row():
    m = tiny(2, heads=2, residual=0.01)
    prompts = [prompt(i, n) for i, n in enumerate((3, 11, 6))]
    trace, stats = [], Stats()
    outs = generate(m, prompts, 24, method="mtp@3", trace=trace, stats=stats)
    assert [len(t) for t in trace] == [len(o) for o in outs]
    alone = []
    for p in prompts:
        generate(m, [p], 24, method="mtp@3", trace=alone)
    assert trace == alone


def test_batch_sampling_keeps_each_row():
    """Sampled rows of a batch: row b follows the distribution of decoding prompt b alone (two different prompts,
    so a row that read another row's state would show). Exact 2-token distribution as in test_decode.e2e_tv."""
    m = tiny(7, vocab=5, heads=2, std=0.5, n_layer=1, n_embd=16, head_dim=8, n_head=2, n_kv_head=1,
             intermediate_size=32, max_seq_len=16)
    prompts = [[1, 3, 2], [4]]
    exact = []
    with torch.no_grad():
        for p in prompts:
            idx = torch.tensor([p + [x] for x in range(5)])
            probs = torch.softmax(m(idx).float(), -1)
            exact.append((probs[0, len(p) - 1][:, None] * probs[:, len(p)]).flatten())
    assert 0.5 * (exact[0] - exact[1]).abs().sum() > 0.2
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(2, 25)
    s = decode.make_strategy(m, "mtp@2", 6, engine.Sampling(1.0), g, batch_size=2)
    for _ in range(600):
        for b, (a, c) in enumerate(generate(m, prompts, 2, method=s)):
            counts[b, 5 * a + c] += 1
    for b in range(2):
        assert 0.5 * (counts[b] / counts[b].sum() - exact[b]).abs().sum() < 0.12, b


# ----------------------------------------------------------------------------------------------------------------
# mtp@auto: the draft depth of each step chosen by DepthRule

def test_depth_rule_arithmetic():
    rule = draft_heads.DepthRule(3, [1.0, 1.0, 1.0, 1.0])
    assert rule.acceptance == [pytest.approx(draft_heads.ACCEPT_PRIOR)] * 3
    a = draft_heads.ACCEPT_PRIOR
    assert rule.expected_tokens() == pytest.approx([1, 1 + a, 1 + a + a * a, 1 + a + a * a + a ** 3])
    assert rule.choose() == 3                              # free verification: draft all the way
    rule.costs = [1.0, 2.0, 3.0, 4.0]                       # verification as dear as plain steps: never draft
    assert rule.choose() == 0
    rule.costs = [1.0, 1.5, 2.5, 3.5]                       # E/cost = 1, 1.13, 0.88, 0.72
    assert rule.choose() == 1
    rule.costs = [1.0, 1.0 + a, 1.0 + a + a * a, 9.0]       # ties go to the cheaper, shallower step
    assert rule.choose() == 0
    rule.observe(3, [0, 3, 1])      # depth 1 checked in 3 rows, accepted in 2; depth 2: 2 and 1; depth 3: 1 and 1
    w, decay = draft_heads.PRIOR_WEIGHT, draft_heads.ACCEPT_DECAY
    assert rule.checked == pytest.approx([decay * w + 3, decay * w + 2, decay * w + 1])
    assert rule.accepted == pytest.approx([decay * a * w + 2, decay * a * w + 1, decay * a * w + 1])
    rule.observe(1, [1, 1])         # a depth-1 step leaves depths 2 and 3 alone
    assert rule.checked[1:] == pytest.approx([decay * w + 2, decay * w + 1])
    rule.costs = [1.0, 1.2, 1.4, 1.6]
    for _ in range(40):             # drafts keep failing: the rule stops drafting
        rule.observe(rule.choose(), [0, 0, 0])
    assert rule.choose() == 0
    with pytest.raises(ValueError, match="costs"):
        draft_heads.DepthRule(3, [1.0, 1.1])


def adaptive(m, costs, batch_size, max_len=60):
    return draft_heads.HeadDrafts(m, max_len, 3, adaptive=True, costs=costs, batch_size=batch_size)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_auto_equals_ar(arch):
    """Lossless whatever depths the rule picks: cheap verification (drafts), dear (plain steps), measured costs."""
    m = tiny(2, arch=arch, heads=2, residual=0.01)
    prompts = [prompt(i, n) for i, n in enumerate(LENGTHS)]
    alone = [generate(m, [p], 24)[0] for p in prompts]
    stop = [alone[1][5]]
    stopped = [generate(m, [p], 24, stop_ids=stop)[0] for p in prompts]
    for costs in ([1.0, 1.05, 1.1, 1.15], [1.0, 1.8, 2.6, 3.4], None):
        s, stats = adaptive(m, costs, len(prompts)), Stats()
        assert generate(m, prompts, 24, method=s, stats=stats) == alone, costs
        assert generate(m, prompts, 24, method=s, stop_ids=stop) == stopped, costs
        assert s.rule.costs[0] == 1.0 and len(s.rule.costs) == 4
        if costs == [1.0, 1.8, 2.6, 3.4]:      # E(k)/costs[k] < 1 from the prior on: plain steps only
            assert stats.steps == 0 and stats.tokens_per_forward == 1.0
        elif costs is not None:
            assert_exercised(stats)


def test_auto_switches_depth():
    """With costs that make depth 1 pay only while acceptance is high, a model whose drafts fail stops drafting
    and one whose drafts succeed keeps drafting; both stay exact."""
    costs = [1.0, 1.3, 1.5, 1.7]
    for seed, residual, deep in ((0, None, False), (2, 0.005, True)):
        m = tiny(seed, heads=2, residual=residual)
        prompts = [prompt(i, n) for i, n in enumerate(LENGTHS)]
        s, stats = adaptive(m, costs, len(prompts), max_len=80), Stats()
        assert generate(m, prompts, 60, method=s, stats=stats) == [generate(m, [p], 60)[0] for p in prompts]
        assert (s.rule.choose() > 0) == deep, s.rule.acceptance
        assert (stats.steps < stats.forwards - stats.prefills) != deep   # plain steps happened only where drafts failed


def test_auto_learns_from_live_rows_only(monkeypatch):
    """Without decay the rule's counts are exactly Stats' (which count rows still decoding) plus the prior."""
    monkeypatch.setattr(draft_heads, "ACCEPT_DECAY", 1.0)
    m = tiny(2, heads=2, residual=0.01)
    prompts = [prompt(i, n) for i, n in enumerate(LENGTHS)]
    first = generate(m, prompts[:1], 30)[0]
    stop = [first[next(i for i in range(1, 30) if first[i] not in first[:i])]]
    s, stats = adaptive(m, [1.0] * 4, len(prompts)), Stats()
    generate(m, prompts, 30, method=s, stop_ids=stop, stats=stats)
    w = draft_heads.PRIOR_WEIGHT
    assert s.rule.checked == pytest.approx([w + p for p in stats.proposed])
    assert s.rule.accepted == pytest.approx([draft_heads.ACCEPT_PRIOR * w + a for a in stats.accepted])


def test_parse_auto():
    assert Method.parse("mtp@auto") == Method("mtp", 3, auto=True)
    assert Method.parse("mtp@auto5") == Method("mtp", 5, auto=True)
    with pytest.raises(ValueError, match="D must be"):
        Method.parse("mtp@auto0")
    m = tiny(2, heads=2, residual=0.01)
    assert decode.make_strategy(m, "mtp@auto2", 40).rule is not None
    assert decode.make_strategy(m, "mtp@2", 40).rule is None


# ----------------------------------------------------------------------------------------------------------------
# bench.py --batch_sizes

def test_bench_batches(tmp_path):
    m, tokenizer, options = bench.tiny_setup("cpu", torch.float32, seed=0)
    prompts = ["What is 2+2?", "Hello there, how are you?", "Name a colour."]
    res = bench.run_batches(m, tokenizer, ["ar", "mtp@2", "mtp@auto2"], prompts, [1, 4], 12, options)
    for name, rows in res["methods"].items():
        assert [r["batch_size"] for r in rows] == [1, 4]
        assert all(r["exact_match"] == 1.0 for r in rows), name
    ar = res["methods"]["ar"]
    assert [r["speedup"] for r in ar] == [1.0, 1.0]
    # batch 4 repeats the three prompts in order: its first row decodes the first prompt, its fourth the first again
    alone = [decode.generate(m, [tokenizer.encode(p, specials=True)], 12, stop_ids=tokenizer.stop_ids)[0]
             for p in prompts]
    assert ar[0]["tokens"] == len(alone[0]) and ar[1]["tokens"] == sum(map(len, alone)) + len(alone[0])
    lines = report.batch_table(res).splitlines()
    assert lines[0].split()[:3] == ["batch", "ar", "tok/s"] and lines[2].split()[0] == "4"
    assert report.write_batches(res, tmp_path)[0].startswith(f"wrote {tmp_path / 'batch_sizes.md'}")
    assert (tmp_path / "batch_sizes.md").read_text().count("\n") == 4    # header, rule, two sizes


@pytest.mark.parametrize("argv, message", [
    (["--batch_sizes", "1,0"], "--batch_sizes: must be at least 1"),
    (["--batch_sizes", "1,4", "--methods", "ar,static@3"], "--batch_sizes: only methods that decode batches"),
    (["--batch_sizes", "1,4", "--methods", "ar,hf"], "not hf"),
])
def test_bench_batches_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--tiny", *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err


def test_finished_row_stays_in_its_buffers():
    """A row that finished keeps stepping while others decode: it stops at max_len instead of running past the
    buffers (here 60 steps of up to 5 tokens each would pass the 20 + 128 slots)."""
    m = tiny(2, heads=2, residual=0.01)
    s = decode.make_strategy(m, "mtp@4", 20, batch_size=2)
    s.prefill([prompt(0, 3), prompt(1, 12)])
    for _ in range(60):
        s.step([False, False])
    assert s.newest.tolist() == [20, 20]
