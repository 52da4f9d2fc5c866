"""
GPU engine tests (CUDA only; skipped elsewhere, so CI, which has no GPU, skips the file): a step replayed from a CUDA
graph equals the same step run eagerly (tree drafts included), and in bf16 every lossless chain method matches `ar`
padded to its query length bit for bit.

    python -m pytest -q tests/test_gpu.py
"""

import pytest
import torch

from decode import generate, make_strategy
from helpers import V, prompt, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

LOSSLESS = [("mtp@1", {}), ("mtp@3", {}), ("mtp@4", {"schedule": [0, 1, 1, 0]}), ("verified@3", {}),
            ("verified@5", {})]
# lossless too, but not bit-exact in bf16: a tree's ancestors sit in scratch slots, so attention sums their values in
# another order than `ar`'s positional slots do
TREES = [("tree@3x4", {}), ("tree@4-2-2-1", {}), ("tree@1x8", {}), ("tree@3x3", {"schedule": [1, 0, 1]}),
         ("tree@auto16", {}), ("tree@auto40", {})]


def run(m, method, prompts, n, graphs=None, **options):
    max_len = max(map(len, prompts)) + n
    if method.startswith(("static", "confadapt", "verified")):
        options["mask_ids"] = [V - 1]
    strategy = make_strategy(m, method, max_len, graphs=graphs, **options)   # graphs captured once, for all prompts
    return [generate(m, [p], n, method=strategy)[0] for p in prompts]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_graph_equals_eager_float32(arch):
    m = tiny(2, arch=arch, heads=2, residual=0.01).cuda()
    prompts = [prompt(s, n) for s, n in ((0, 3), (1, 17), (2, 9))]
    ref = run(m, "ar", prompts, 40, graphs=False)
    assert run(m, "ar", prompts, 40, graphs=True) == ref
    assert run(m, "ar@4", prompts, 40, graphs=True) == ref
    for method, options in LOSSLESS + TREES:
        assert run(m, method, prompts, 40, graphs=True, **options) == ref, method
    for method in ("static@3", "confadapt@0.5"):
        assert run(m, method, prompts, 40, graphs=True) == run(m, method, prompts, 40, graphs=False), method


def test_batched_ar_graph_equals_eager():
    m = tiny(1).cuda()
    prompts = [prompt(s, n) for s, n in ((0, 3), (1, 17), (2, 9), (3, 1))]
    stop = generate(m, prompts[:1], 20)[0][5]
    assert generate(m, prompts, 20, stop_ids=[stop], graphs=True) == generate(m, prompts, 20, stop_ids=[stop],
                                                                               graphs=False)


def test_tree_graph_equals_eager_step_by_step():
    """A replayed tree step leaves the same tokens, hidden states and main cache as the eager step (float32)."""
    m = tiny(2, heads=2, residual=0.01).cuda()
    p = prompt(3, 11)
    for method in ("tree@3x4", "tree@auto16"):
        graphed, eager = (make_strategy(m, method, 80, graphs=g) for g in (True, False))
        for s in (graphed, eager):
            s.prefill([p])
        for _ in range(12):
            assert graphed.step([True]).result() == eager.step([True]).result(), method
            L = int(eager.newest)
            assert torch.equal(graphed.tokens[:, :L + 1], eager.tokens[:, :L + 1])
            torch.testing.assert_close(graphed.head_state[:, :L], eager.head_state[:, :L])
            for a, b in zip(graphed.caches, eager.caches):
                torch.testing.assert_close(a.k[:, :L], b.k[:, :L])


def bf16_model():
    """Wide enough that bf16 rounding differs between query lengths (the reason for the shared query length)."""
    m = tiny(3, heads=2, residual=0.02, n_embd=256, head_dim=32, n_head=8, n_kv_head=4, intermediate_size=512,
             n_layer=4, vocab=512)
    return m.cuda().to(torch.bfloat16)


def test_bf16_lossless_with_shared_query_length():
    m = bf16_model()
    prompts = [torch.randint(0, 508, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 30, 64)]
    for method, options in LOSSLESS:
        q = make_strategy(m, method, 200, mask_ids=[511], **options).query_len
        ref = run(m, f"ar@{q}", prompts, 96, graphs=True)
        options = dict(options, mask_ids=[511]) if method.startswith("verified") else options
        strategy = make_strategy(m, method, 200, **options)
        assert [generate(m, [p], 96, method=strategy)[0] for p in prompts] == ref, method


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_mtp_graph_equals_ar_float32(arch):
    """B rows of different lengths and stop points, replayed from graphs (mtp@auto: one per depth, costs measured on
    the device), equal each row decoded alone with eager ar."""
    m = tiny(2, arch=arch, heads=2, residual=0.01).cuda()
    prompts = [prompt(s, n) for s, n in ((0, 3), (1, 17), (2, 9), (3, 1), (4, 30))]
    alone = [generate(m, [p], 40, graphs=False)[0] for p in prompts]
    stop = [alone[0][6]]
    stopped = [generate(m, [p], 40, stop_ids=stop, graphs=False)[0] for p in prompts]
    for method in ("mtp@1", "mtp@3", "mtp@auto3"):
        s = make_strategy(m, method, 80, batch_size=len(prompts), graphs=True)
        assert generate(m, prompts, 40, method=s) == alone, method
        assert generate(m, prompts, 40, method=s, stop_ids=stop) == stopped, method


def test_batched_bf16_lossless_with_shared_query_length():
    """In bf16 a batch of mtp@3 matches a batch of ar@4 of the same size bit for bit."""
    m = bf16_model()
    prompts = [torch.randint(0, 508, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (5, 30, 64, 11)]
    ref = generate(m, prompts, 96, method=make_strategy(m, "ar@4", 200, batch_size=4))
    assert generate(m, prompts, 96, method=make_strategy(m, "mtp@3", 200, batch_size=4)) == ref
