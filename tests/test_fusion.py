"""
The fused head input (Config.head_taps, EAGLE-3 style), CPU, tiny models: a fresh fusion changes nothing bit for bit;
a trained-looking (random) one keeps every head-drafting method lossless; the drafts, the verify forward and the
prefill all read the fused state; mtp_loss trains the fusion with a frozen backbone; heads files and checkpoints
carry it, and refuse what does not fit; train.py --mode heads --head_taps trains, resumes and exports it.
"""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import artefacts
import distill
import load
import parallel
import train
from chars import CharTokenizer
from decode import Stats, generate, make_strategy
from engine import Sampling
from helpers import (MODELS, SMALL, TAPS, assert_exercised, fused, head_start, prompt, read_log, reading,
                     run_cli, strategy_steps, tiny, top)

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models run on one thread


# ----------------------------------------------------------------------------------------------------------------
# a fresh fusion is no fusion

@torch.no_grad()
def test_fresh_fusion_changes_nothing():
    """fuse starts as "take the last block's output": loss, drafts and outputs bit-identical to no fusion."""
    plain = reading(1, residual=0.01)
    fusion = copy.deepcopy(plain)
    fusion.add_fusion(TAPS)
    idx = torch.tensor([prompt(1, 24)])
    a, b = distill.mtp_loss(plain, idx), distill.mtp_loss(fusion, idx)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    p = [prompt(1, 9), prompt(2, 4)]
    for method in ("mtp@3", "tree@2x3"):
        sa, sb = Stats(), Stats()
        out = generate(plain, p, 20, method=method, stats=sa)
        assert generate(fusion, p, 20, method=method, stats=sb) == out, method
        assert sa.accepted_lengths == sb.accepted_lengths and sum(sa.accepted) > 0, method




@pytest.mark.parametrize("taps", [[], [2], [1, 0], [0, 0], [-1], [0.5]])
def test_taps_that_do_not_fit_are_refused(taps):
    m = tiny(0, n_layer=3)
    with pytest.raises(ValueError, match=r"expected increasing indices of blocks before the last \(0\.\.1"):
        m.add_fusion(taps)
    assert m.fuse is None and m.cfg.head_taps == []


# ----------------------------------------------------------------------------------------------------------------
# a trained fusion: lossless, and what the drafts read

@torch.no_grad()
def test_fused_drafting_is_lossless():
    """With a random fusion, every head-drafting method still equals plain greedy decoding (float32), batched too."""
    stats = Stats()
    for seed, residual in MODELS:
        m = fused(seed, residual)
        prompts = [prompt(seed, 1 + 3 * seed), prompt(seed + 50, 20 - seed)]
        ref = generate(m, prompts, 24, method="ar")
        assert generate(m, prompts, 24, method="mtp@2", stats=stats) == ref, seed   # two rows in one batch
        for method in ("mtp@3", "tree@2x3", "tree@auto8"):
            for p, r in zip(prompts, ref):
                assert generate(m, [p], 24, method=method, stats=stats) == [r], (seed, method)
    assert_exercised(stats, depths=2)


@torch.no_grad()
def test_drafts_read_the_fused_state():
    """HeadDrafts' depth-1 draft distribution, the tree's level-1 candidates, and the states kept for accepted tokens
    equal a cache-free recompute through the fusion. Feeding head 1 the last block's output instead (in the prefill
    or in the verify forward) fails each of them."""
    m = fused(2, residual=0.01, noise=1.0)
    p = prompt(2, 7)
    s = make_strategy(m, "mtp@2", len(p) + 40, Sampling(temperature=1.0), torch.Generator().manual_seed(0))
    s.prefill([p])
    checked = 0
    for _ in range(8):
        _, q = s.draft(2)
        L = int(s.newest[0])
        t = s.tokens[:, :L + 1]
        h1 = m.head_forward(0, head_start(m, t[:, :L]), t[:, 1:L + 1], m.default_pos(t[:, :L]))
        torch.testing.assert_close(q[0, 0], torch.softmax(m.logits(h1[0, -1]).float(), -1), atol=1e-5, rtol=1e-4)
        checked += 1
        s.step([True])
    assert checked == 8 and int(s.newest[0]) > len(p) + 8   # some drafts accepted on the way
    final = int(s.newest[0])
    torch.testing.assert_close(s.head_state[:, :final], head_start(m, s.tokens[:, :final]), atol=1e-5, rtol=1e-4)
    for tree in strategy_steps(m, "tree@2x2", p, 6):
        tree.draft()
        L = int(tree.newest)
        t = tree.tokens[:, :L + 1]
        h1 = m.head_forward(0, head_start(m, t[:, :L]), t[:, 1:L + 1], m.default_pos(t[:, :L]))
        assert tree.nodes.tolist()[1:3] == top(m, h1, 2), L
        torch.testing.assert_close(tree.head_state[:, :L], head_start(m, t[:, :L]), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# training: the loss reaches the fusion, not the backbone; FLOPs count it

def test_mtp_loss_trains_the_fusion_with_a_frozen_backbone():
    m = fused(0)
    args = SimpleNamespace(mode="heads", n_mtp_heads=2, lora_rank=0)
    train.set_trainable(m, args)
    loss, _ = distill.mtp_loss(m, torch.tensor([prompt(0, 20)]), cfg=distill.MTPLossConfig(main_loss=False))
    loss.backward()
    assert m.fuse.weight.grad is not None and m.fuse.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in m.named_parameters() if not n.startswith(("fuse.", "heads.")))
    assert all(p.grad is not None for p in m.heads.parameters())
    extend = SimpleNamespace(mode="extend", n_mtp_heads=1, lora_rank=0)
    train.set_trainable(m, extend)                 # extension trains the new head only: the fusion stays as it is
    assert not m.fuse.weight.requires_grad


def test_flops_count_the_fusion():
    m = fused(0)
    plain = tiny(0, heads=2, n_layer=3)
    args = SimpleNamespace(mode="heads", n_mtp_heads=2, lora_rank=0, seq_len=16)
    for model in (m, plain):
        train.set_trainable(model, args)
    fuse = 2 * m.fuse.weight.numel()                # forward FLOPs per token
    assert parallel.flops_per_token(m, args) - parallel.flops_per_token(plain, args) == 2 * fuse   # + weight gradients
    m.fuse.requires_grad_(False)
    assert parallel.flops_per_token(m, args) - parallel.flops_per_token(plain, args) == fuse


# ----------------------------------------------------------------------------------------------------------------
# files: heads files and checkpoints carry the fusion

def base_and_fused(seed=3):
    """A base model and the same one with a fusion and two heads whose weights are bf16 values (what a heads file
    stores), so a reloaded copy must be exact."""
    base = tiny(seed, n_layer=3, vocab=CharTokenizer().vocab_size)
    m = copy.deepcopy(base)
    m.add_fusion(TAPS)
    m.add_heads(2, init="random")
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith(("fuse.", "heads.")):
                p.copy_((p + 0.2 * torch.randn_like(p)).bfloat16().float())
    return base, m


def same_weights(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def test_heads_file_round_trip(tmp_path):
    base, m = base_and_fused()
    path, ext = tmp_path / "heads.safetensors", tmp_path / "ext.safetensors"
    artefacts.save_heads(path, m, draft_vocab=torch.arange(10))
    m.add_heads(1, init="random")                    # an extension's file never carries the fusion
    m.heads[2].load_state_dict({k: v.bfloat16().float() for k, v in m.heads[2].state_dict().items()})
    artefacts.save_heads(ext, m, first=2)
    with safe_open(str(ext), "pt") as f:
        assert "fuse.weight" not in f.keys() and "head_taps" not in f.metadata()
    again = copy.deepcopy(base)
    assert artefacts.attach_heads(again, path).tolist() == list(range(10))
    artefacts.attach_heads(again, ext)
    assert again.cfg.head_taps == TAPS and len(again.heads) == 3
    assert same_weights(m, again)
    p = [prompt(3, 8)]
    stats_m, stats_again = Stats(), Stats()
    assert generate(m, p, 20, method="mtp@3", stats=stats_m) == generate(again, p, 20, method="mtp@3",
                                                                          stats=stats_again)
    assert stats_m.accepted_lengths == stats_again.accepted_lengths


def rewrite_meta(path, **changes):
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, path, metadata={**meta, **{k: json.dumps(v) for k, v in changes.items()}})


@pytest.mark.parametrize("case, message", [
    ("model has heads", r"made on a model without heads or fusion; this one has 1 head: attach the file first"),
    ("tap too deep", r"head_taps \[0, 2\]: expected increasing indices of blocks before the last \(0\.\.1"),
    ("taps and weight disagree", r"heads do not fit the model \(unexpected: -; missing: -; other shape: fuse\.weight"),
])
def test_refused_fused_heads_file_changes_nothing(tmp_path, case, message):
    base, m = base_and_fused()
    path = tmp_path / "heads.safetensors"
    artefacts.save_heads(path, m)
    if case == "tap too deep":
        rewrite_meta(path, head_taps=[0, 2])
    if case == "taps and weight disagree":
        rewrite_meta(path, head_taps=[1])
    model = copy.deepcopy(base)
    if case == "model has heads":
        model.add_heads(1)
    with pytest.raises(ValueError, match=str(path) + ": .*" + message):
        artefacts.attach_heads(model, path)
    assert model.fuse is None and model.cfg.head_taps == [] and len(model.heads) == (case == "model has heads")


def test_checkpoint_round_trip(tmp_path):
    _, m = base_and_fused()
    artefacts.save_checkpoint(tmp_path / "ckpt", m, CharTokenizer())
    again, _ = load.load(tmp_path / "ckpt")
    assert again.cfg.head_taps == TAPS and same_weights(m, again)


# ----------------------------------------------------------------------------------------------------------------
# train.py --mode heads --head_taps

SMALL3 = [*SMALL, "--n_layer", "3"]   # three blocks (the last value given counts)


def test_train_heads_with_taps_resumes_and_exports(synth, tmp_path, capsys):
    base = tmp_path / "base"
    train.main(["--mode", "scratch", "--data", str(synth), "--out", str(base), "--n_mtp_heads", "0",
                "--max_steps", "1", *SMALL3])
    common = ["--mode", "heads", "--init_from", str(base), "--data", str(synth), "--head_taps", "0,1",
              "--warmup", "1", *SMALL3]
    export = tmp_path / "heads.safetensors"
    train.main([*common, "--out", str(tmp_path / "straight"), "--max_steps", "2", "--export", str(export)])
    train.main([*common, "--out", str(tmp_path / "split"), "--max_steps", "1"])
    capsys.readouterr()
    status, err = run_cli([*common, "--head_taps", "0", "--out", tmp_path / "split", "--max_steps", "2", "--resume"],
                          capsys)
    assert status == 2 and "has --head_taps [0, 1], not [0]" in err, err
    train.main([*common, "--out", str(tmp_path / "split"), "--max_steps", "2", "--resume"])
    for a, b in zip(read_log(tmp_path / "straight"), read_log(tmp_path / "split")):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
    trained = load.load(tmp_path / "straight")[0]
    C = trained.cfg.n_embd
    assert trained.cfg.head_taps == TAPS and not torch.equal(trained.fuse.weight[:, -C:], torch.eye(C))
    model = load.load(base)[0]
    artefacts.attach_heads(model, export)
    assert model.cfg.head_taps == TAPS and len(model.heads) == 1
    assert torch.equal(model.fuse.weight, trained.fuse.weight.bfloat16().float())
    capsys.readouterr()
    status, err = run_cli([*common, "--head_taps", "2", "--out", tmp_path / "deep", "--max_steps", "1"], capsys)
    assert status == 2 and err.count("\n") == 1 and "head_taps [2]: expected increasing indices" in err, err


def test_looped_extension_drafts_as_the_looped_schedule_until_trained():
    """Decoding past the last head and extension follow one rule (model.looped_head): a new head
    starts as the head that served its depth, so an untrained extension drafts as the looped model
    does, step for step."""
    m = reading(1, residual=0.005)
    p = prompt(1, 12)
    looped, extended = Stats(), Stats()
    ref = generate(m, [p], 32, method="mtp@4", stats=looped)
    m = copy.deepcopy(m)
    m.extend_heads(2)
    assert generate(m, [p], 32, method="mtp@4", stats=extended) == ref
    assert len(m.heads) == 4 and extended.accept_counts == looped.accept_counts
    assert 0 < looped.accepted[2] < looped.proposed[2]    # depth 3 drafts are checked and differ
