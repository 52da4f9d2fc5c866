"""Losses, Paper A's layout and mask, training modes, checkpoints and the small shipped files (CPU, tiny models)."""

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import artefacts  # noqa: E402
import decode  # noqa: E402
import distill  # noqa: E402
import load  # noqa: E402
import train  # noqa: E402
import train_options  # noqa: E402
from data import synthmath  # noqa: E402
from helpers import SMALL, default_init, read_log, run_cli  # noqa: E402
from layers import LoRALinear  # noqa: E402


def tiny(vocab=40, heads=0, seed=0, **kw):
    m = default_init(vocab, heads, seed, **kw)
    if heads:
        for p in m.heads.parameters():
            torch.nn.init.normal_(p, std=0.1)
    return m


# ---------------------------------------------------------------------------------------------------------------
# Paper B loss

def test_mtp_loss_kl_sends_no_gradient_into_main_head():
    """The KL target is the main head's detached distribution: adding the KL term must not change the gradient that
    reaches the main head's logits (it still trains the heads, and the backbone through the heads' inputs)."""
    m = tiny(heads=2)
    idx = torch.randint(0, 40, (2, 24))
    output_head = m.logits

    def grads(beta):
        m.zero_grad()
        seen = {}

        def recording_logits(*args, **kwargs):   # its first call gives the main head's logits
            logits = output_head(*args, **kwargs)
            if "main" not in seen:
                logits.retain_grad()
                seen["main"] = logits
            return logits

        m.logits = recording_logits
        loss, metrics = distill.mtp_loss(m, idx, cfg=distill.MTPLossConfig(alpha=1.0, beta=beta, top_n=None))
        loss.backward()
        m.logits = output_head
        return seen["main"].grad.clone(), [p.grad.clone() for p in m.heads.parameters()], metrics

    main_ce, heads_ce, _ = grads(beta=0.0)
    main_kl, heads_kl, metrics = grads(beta=1.0)
    assert metrics["kl1"] > 0 and metrics["kl2"] > 0
    assert torch.equal(main_ce, main_kl)                              # nothing from the KL reaches the main head
    assert any(not torch.equal(a, b) for a, b in zip(heads_ce, heads_kl))   # but the heads feel it


def main_head_grad(m, idx, argv):
    """The gradient reaching the main head's logits from train.loss_fn's loss under the options
    argv, and its metrics: the first call of the shared output head gives the main head's logits."""
    args = train_options.make_parser().parse_args(["--top_n", "0", *argv])
    output_head, seen = m.logits, {}

    def recording_logits(*a, **kw):
        logits = output_head(*a, **kw)
        if "main" not in seen:
            logits.retain_grad()
            seen["main"] = logits
        return logits

    m.zero_grad()
    m.logits = recording_logits
    loss, metrics = train.loss_fn(m, None, idx, None, args, None)
    loss.backward()
    m.logits = output_head
    return seen["main"].grad.clone(), metrics


def test_main_kl_grad_sends_the_kl_gradient_into_the_main_head():
    """--main_kl_grad (Paper B's ablation) leaves the KL target attached: adding the KL term then
    changes the gradient at the main head's logits, which the default (detached) never does."""
    m = tiny(heads=2)
    idx = torch.randint(0, 40, (2, 24))
    ce_only, _ = main_head_grad(m, idx, ["--beta", "0"])
    detached, metrics = main_head_grad(m, idx, ["--beta", "1"])
    attached, _ = main_head_grad(m, idx, ["--beta", "1", "--main_kl_grad"])
    assert metrics["kl1"] > 0 and metrics["kl2"] > 0
    assert torch.equal(ce_only, detached)
    assert not torch.allclose(ce_only, attached, atol=1e-7)


def test_mtp_loss_weights_each_depth_by_its_own_alpha_and_beta():
    """Per-depth lists: the loss is the main loss plus alpha_d * CE_d + beta_d * KL_d at each depth
    d (an index off by one, or one weight for every depth, gives another sum)."""
    m = tiny(heads=3)
    idx = torch.randint(0, 40, (2, 24))
    alpha, beta = [0.5, 0.0, 2.0], [0.0, 1.0, 3.0]
    loss, metrics = distill.mtp_loss(m, idx, cfg=distill.MTPLossConfig(alpha, beta, top_n=None))
    expected = metrics["main_loss"] + sum(a * metrics[f"ce{d}"] + b * metrics.get(f"kl{d}", 0.0)
                                          for d, a, b in zip((1, 2, 3), alpha, beta))
    assert "kl1" not in metrics and metrics["kl3"] > 0
    assert abs(loss.item() - expected) < 1e-5


def test_a_zero_weight_at_a_depth_sends_no_gradient_from_its_loss():
    """Gradients are linear in the per-depth weights, G(w) = G_main + sum_d w_d G_d: with depth 2's
    weights zero, G(1,0,1) + G(0,1,0) = G(1,1,1) + G(0,0,0), so nothing of G_2 is left in G(1,0,1)
    (heads 1 and 2 still learn from depth 3 through their outputs). At the last depth nothing is
    downstream: its head gets no gradient at all."""
    m = tiny(heads=3)
    idx = torch.randint(0, 40, (2, 24))

    def grads(alpha, beta):
        m.zero_grad()
        distill.mtp_loss(m, idx, cfg=distill.MTPLossConfig(alpha, beta, top_n=None))[0].backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in m.parameters()]

    without = grads([1.0, 0.0, 1.0], [1.0, 0.0, 1.0])
    depth2 = grads([0.0, 1.0, 0.0], [0.0, 1.0, 0.0])
    full, main = grads(1.0, 1.0), grads(0.0, 0.0)
    assert any(not torch.allclose(a, b) for a, b in zip(depth2, main))
    assert all(torch.allclose(a + b, c + d, atol=1e-6)
               for a, b, c, d in zip(without, depth2, full, main))
    grads([1.0, 1.0, 0.0], [1.0, 1.0, 0.0])
    assert all(p.grad is None or not p.grad.any() for p in m.heads[2].parameters())
    assert all(p.grad is not None and p.grad.any() for p in m.heads[1].parameters() if p.dim() > 1)


def test_topn_kl_is_zero_for_equal_distributions_and_positive_otherwise():
    a = torch.randn(5, 30)
    assert distill.topn_kl(a, a, top_n=10).abs().max() < 1e-6
    assert (distill.topn_kl(torch.randn(5, 30), a, top_n=10) > 0).all()
    assert (distill.topn_kl(torch.randn(5, 30), a, direction="reverse") > 0).all()


def test_topn_kl_renormalises_over_the_top_n():
    """Equal logits on the teacher's top-N and different elsewhere: zero only when both sides are renormalised over
    the top-N (a full-vocabulary softmax gathered afterwards would see the other tokens' mass)."""
    teacher = torch.randn(4, 50)
    top = teacher.topk(10, dim=-1).indices
    student = torch.randn(4, 50) * 5 + 3                          # different everywhere, most mass elsewhere
    student.scatter_(-1, top, teacher.gather(-1, top))
    assert distill.topn_kl(student, teacher, top_n=10).abs().max() < 1e-5
    assert (distill.topn_kl(student, teacher, top_n=None) > 1e-2).all()


def test_mtp_loss_distills_each_depth_from_the_main_head_at_the_right_position():
    """Heads whose hidden state at i is the backbone's at i + d give logits equal to the main head's at i + d, the
    position that predicts the same token: KL 0 and agreement 1 at every depth. A target shifted by one breaks it."""
    m = tiny(heads=3)
    idx = torch.randint(0, 40, (2, 16))
    main_hidden = m.hidden(idx).detach()

    def head_forward(module, h_prev, next_idx, pos, cache=None, visible=None):
        d, n = module + 1, h_prev.size(1)
        return main_hidden[:, d:d + n]

    m.head_forward = head_forward
    _, metrics = distill.mtp_loss(m, idx, cfg=distill.MTPLossConfig(beta=1.0, top_n=None))
    for d in (1, 2, 3):
        assert metrics[f"kl{d}"] < 1e-6 and metrics[f"agree{d}"] == 1.0, (d, metrics)


def test_mtp_loss_targets_are_shifted_by_depth():
    # a "perfect" head at depth d must predict token i+d+1 from position i: build logits that do exactly that and
    # check the CE is ~0, by monkeypatching the model's head_forward/logits
    m = tiny(heads=1)
    idx = torch.randint(0, 40, (1, 12))

    def head_forward(module, h_prev, next_idx, pos, cache=None, visible=None):
        return next_idx   # carry the ids of token i+1 through as the "hidden state"

    m.head_forward = head_forward
    real_logits = m.logits

    def logits(h, weight=None):
        if h.dtype == torch.long:   # the head's output: predict the token after next_idx, i.e. idx[i + 2]
            nxt = {int(a): int(b) for a, b in zip(idx[0, 1:-1], idx[0, 2:])}
            if len(nxt) < idx.size(1) - 2:
                pytest.skip("repeated token in the random sequence")
            return torch.nn.functional.one_hot(torch.tensor([[nxt[int(t)] for t in h[0]]]), 40).float() * 50
        return real_logits(h, weight)

    m.logits = logits
    _, metrics = distill.mtp_loss(m, idx, cfg=distill.MTPLossConfig(beta=0.0, main_loss=False))
    assert metrics["ce1"] < 1e-3 and metrics["acc1"] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Paper A layout and visible

def test_region_visible_matches_a_hand_written_case():
    tokens = torch.arange(100, 108)                              # 8 real tokens at positions 0..7
    r = distill.pack_regions(tokens, k=3, n_regions=1, mask_ids=[99], generator=torch.Generator().manual_seed(0))
    a = int(r.anchor[r.slots[0, 0]])                            # the region follows real token a
    # layout: reals 0..a, two masks standing for a+1, a+2, then reals a+1..7
    assert r.idx.tolist() == tokens[:a + 1].tolist() + [99, 99] + tokens[a + 1:].tolist()
    assert r.pos.tolist() == list(range(a + 1)) + [a + 1, a + 2] + list(range(a + 1, 8))
    assert r.targets.tolist() == [tokens[a + 1:a + 4].tolist()]
    visible = distill.region_visible(r.span, r.pos, r.anchor)
    L = len(r.idx)
    m1, m2 = a + 1, a + 2                                        # indices of the two masks
    expected = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(L):
            if k in (m1, m2):                                    # only masks see masks: their own, earlier ones
                expected[q, k] = q in (m1, m2) and k <= q
            else:                                                # a real key: seen if at or before the anchor
                expected[q, k] = r.pos[k] <= r.anchor[q]
    assert torch.equal(visible, expected)
    assert not visible[a + 3:, m1:m2 + 1].any()                     # real tokens never see a mask
    assert visible[m2, :a + 1].all() and not visible[m1, m2]


def test_pack_regions_keeps_every_real_token_once_with_its_position():
    g = torch.Generator().manual_seed(3)
    for k in (2, 5, 8):
        tokens = torch.randint(0, 50, (64,), generator=g)
        r = distill.pack_regions(tokens, k, n_regions=4, mask_ids=[99], generator=g)
        real = r.span == -1
        assert torch.equal(r.idx[real], tokens)
        assert torch.equal(r.pos[real], torch.arange(64))
        assert (r.idx[~real] == 99).all() and int((~real).sum()) == 4 * (k - 1)
        for slots, targets in zip(r.slots, r.targets):          # slot j predicts position anchor + j + 1
            anchor = int(r.pos[slots[0]])
            assert torch.equal(targets, tokens[anchor + 1:anchor + k + 1])
            assert torch.equal(r.pos[slots[1:]], torch.arange(anchor + 1, anchor + k))


def test_pack_batch_builds_each_rows_own_visibility():
    batch = torch.randint(0, 30, (3, 40))
    idx, pos, visible, slots, targets = distill.pack_batch(batch, 4, 3, [30], torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    rows = [distill.pack_regions(row, 4, 3, [30], g) for row in batch]       # the same draws, row by row
    for b, r in enumerate(rows):
        assert torch.equal(idx[b], r.idx) and torch.equal(pos[b], r.pos) and torch.equal(slots[b], r.slots)
        assert torch.equal(visible[b], distill.region_visible(r.span, r.pos, r.anchor))
    assert not torch.equal(visible[0], visible[1])                     # the rows' layouts differ


def test_mask_loss_zero_when_student_equals_teacher_and_teacher_gets_no_gradient():
    torch.manual_seed(0)
    student = tiny(vocab=30)
    ids = student.add_mask_tokens(1)
    teacher = tiny(vocab=30)
    teacher.load_state_dict({k: v for k, v in student.state_dict().items() if not k.startswith(("embed", "lm_head"))},
                            strict=False)
    batch = torch.randint(0, 30, (2, 40))
    packed = distill.pack_batch(batch, 4, 3, ids, torch.Generator().manual_seed(0))
    # student and teacher that agree exactly: both predict from the position alone, so the student's predictions
    # on the masked text equal the teacher's on the student-forced text -> zero loss, hard and soft
    class ByPosition(torch.nn.Module):
        def forward(self, idx, pos, visible=None):
            return torch.nn.functional.one_hot((pos * 7) % 30, 31).float() * 60

    agree = ByPosition()
    for target in ("hard", "soft"):
        loss, metrics = distill.student_forced_loss(agree, agree, *packed, cfg=distill.StudentForcedConfig(target), n_real_vocab=30)
        assert abs(loss.item()) < 1e-6, target
    assert metrics["agree1"] == metrics["agree4"] == 1.0
    loss, metrics = distill.student_forced_loss(student, teacher.requires_grad_(False), *packed, n_real_vocab=30)
    loss.backward()
    assert loss.item() > 0 and all(p.grad is None for p in teacher.parameters())
    assert student.embed.weight.grad is not None


def test_student_forced_loss_counts_only_the_slots_whose_targets_the_loss_weight_marks():
    """Tokens equal to their positions make every target name its position: the loss must be the
    mean over the slots whose target position the loss weight marks (not the slot's own), plus the
    prefix loss over the marked successors."""
    student = tiny(vocab=60)
    ids = student.add_mask_tokens(1)
    batch = torch.arange(40).repeat(2, 1)
    loss_weight = (torch.rand(2, 40, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    packed = distill.pack_batch(batch, 4, 5, ids, torch.Generator().manual_seed(0))
    idx, pos, visible, slots, targets = packed
    cfg = distill.StudentForcedConfig("data", prefix_loss=0.5)
    loss, _ = distill.student_forced_loss(student, student, *packed, cfg, 60, loss_weight)
    logits = student(idx, pos, visible=visible)[..., :60]
    s = logits[torch.arange(2)[:, None, None], slots]
    ce = torch.nn.functional.cross_entropy(s.flatten(0, 2), targets.flatten(), reduction="none")
    w = loss_weight.gather(1, targets.flatten(1)).flatten()
    real = [(idx[b] < 60).nonzero()[:, 0] for b in range(2)]  # next-token loss: real -> next real
    nxt = [(b, i, j) for b in range(2) for i, j in zip(real[b][:-1], real[b][1:])
           if pos[b, j] == pos[b, i] + 1]
    prefix = torch.stack([torch.nn.functional.cross_entropy(logits[b, i], idx[b, j])
                          for b, i, j in nxt])
    prefix_w = torch.stack([loss_weight[b, pos[b, j]] for b, i, j in nxt])
    expected = (ce * w).sum() / w.sum() + 0.5 * (prefix * prefix_w).sum() / prefix_w.sum()
    assert 0 < w.sum() < w.numel() and torch.allclose(loss, expected, atol=1e-5)


def test_answers_only_restricts_the_mask_tokens_loss_to_answers():
    """--answers_only in --mode mask_tokens: a batch without answer tokens trains nothing (it used to be
    ignored, the loss the same with the loss weights all ones or all zeros)."""
    student = tiny(vocab=30)
    student.add_mask_tokens(1)
    teacher = copy.deepcopy(student).requires_grad_(False)
    idx = torch.randint(0, 30, (2, 40))
    base = ["--mode", "mask_tokens", "--k_max", "4", "--k_fixed", "--seq_len", "39", "--target", "hard"]

    def loss(argv, loss_weight):
        args = train_options.make_parser().parse_args([*base, *argv])
        g = torch.Generator().manual_seed(0)
        return train.loss_fn(student, teacher, idx, loss_weight, args, g)[0]

    ones, zeros = torch.ones(2, 40), torch.zeros(2, 40)
    assert loss(["--answers_only"], zeros).item() == 0
    assert torch.equal(loss(["--answers_only"], ones), loss([], zeros))
    assert loss([], zeros).item() > 0


def test_gated_lora_leaves_next_token_logits_unchanged():
    m = tiny()
    ids = m.add_mask_tokens(1)
    idx = torch.randint(0, 40, (2, 20))
    before = m(idx)
    plain, ungated = copy.deepcopy(m), copy.deepcopy(m)
    m.add_lora(4, gated=True)
    ungated.add_lora(4, gated=False)
    assert any(isinstance(mod, LoRALinear) for mod in m.modules()) and not any(
        isinstance(mod, LoRALinear) for mod in m.heads.modules())
    for name, p in m.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1.0)                    # adapters that really change things
    ungated.load_state_dict(m.state_dict())                       # the same adapters, active everywhere
    assert torch.equal(m(idx), before)                           # no mask token: not one adapter runs
    with_mask = torch.cat([idx, torch.full((2, 3), ids[0])], 1)
    out = m(with_mask)
    assert torch.allclose(out[:, :20], before, atol=1e-5)        # real tokens before the masks: unchanged
    assert not torch.allclose(out[:, 20:], plain(with_mask)[:, 20:], atol=1e-3)   # at the masks they act
    assert not torch.allclose(ungated(idx), before, atol=1e-3)   # ungated adapters do change them


def test_mask_tokens_are_never_predicted():
    """Mask tokens are inputs only: their logits are -inf even when their output rows would win."""
    for tied in (True, False):
        m = tiny(tie_embeddings=tied)
        ids = m.add_mask_tokens(2)
        with torch.no_grad():
            m.lm_head.weight[ids] = 100 * m.norm(torch.ones(32)).sign()   # rows that align with every state
        logits = m(torch.randint(0, 40, (2, 10)))
        assert torch.equal(logits[..., ids], torch.full_like(logits[..., ids], float("-inf")))
        assert logits.argmax(-1).max() < ids[0]


# ---------------------------------------------------------------------------------------------------------------
# train.py: extension, resume, shipped files

def test_extension_copies_heads_and_freezes_the_rest(synth, tmp_path):
    base = tmp_path / "base"
    train.main(["--mode", "scratch", "--data", str(synth), "--out", str(base), "--n_mtp_heads", "1",
                "--max_steps", "2", *SMALL])
    args = train_options.get_args(["--mode", "extend", "--init_from", str(base), "--data", str(synth), "--n_mtp_heads", "2",
                           *SMALL])
    model, _, _ = train.build(args, None)
    train.set_trainable(model, args)
    assert len(model.heads) == 3
    for new in (1, 2):   # each new head starts as a copy of head 0
        for a, b in zip(model.heads[0].parameters(), model.heads[new].parameters()):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("heads.1.", "heads.2.")) for n in trainable)
    export = tmp_path / "ext.safetensors"
    train.main(["--mode", "extend", "--init_from", str(base), "--data", str(synth), "--n_mtp_heads", "2",
                "--out", str(tmp_path / "ext"), "--export", str(export), "--max_steps", "1", *SMALL])
    frozen_before = load.load(base)[0].heads[0].state_dict()
    after = load.load(tmp_path / "ext")[0]
    assert all(torch.equal(v, after.heads[0].state_dict()[k]) for k, v in frozen_before.items())
    # the exported file holds only the new heads and attaches after the one it extends
    fresh = load.load(base)[0]
    artefacts.attach_heads(fresh, export)
    assert len(fresh.heads) == 3
    headless = load.load(base)[0]
    headless.heads = torch.nn.ModuleList()
    with pytest.raises(ValueError, match="order"):                # head 0 must be there before heads 1, 2
        artefacts.attach_heads(headless, export)


def test_resume_continues_the_same_loss_curve(synth, tmp_path):
    common = ["--mode", "scratch", "--data", str(synth), "--n_mtp_heads", "2", "--save_every", "3", *SMALL]
    train.main([*common, "--out", str(tmp_path / "straight"), "--max_steps", "6"])
    train.main([*common, "--out", str(tmp_path / "split"), "--max_steps", "3"])
    train.main([*common, "--out", str(tmp_path / "split"), "--max_steps", "6", "--resume"])
    straight, split = read_log(tmp_path / "straight"), read_log(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2, 3, 4, 5, 6]
    runs = [json.loads(line) for line in open(tmp_path / "split.log.jsonl") if '"run"' in line]
    assert [(r["run"], r["step"]) for r in runs] == [("start", 0), ("resume", 3)]   # each run marks its start
    for a, b in zip(straight, split):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])


def test_mask_mode_gated_lora_exports_and_reattaches(synth, tmp_path):
    base = tmp_path / "base"
    train.main(["--mode", "scratch", "--data", str(synth), "--out", str(base), "--n_mtp_heads", "0",
                "--max_steps", "1", *SMALL])
    export = tmp_path / "mask.safetensors"
    train.main(["--mode", "mask_tokens", "--init_from", str(base), "--data", str(synth), "--out", str(tmp_path / "mask"),
                "--lora_rank", "4", "--gated", "--k_max", "4", "--export", str(export), "--max_steps", "2", *SMALL])
    trained = load.load(tmp_path / "mask")[0]
    model, tok = load.load(base)
    plain = model(torch.tensor([[5, 6, 7]]))
    artefacts.attach_mask_adapter(model, tok, export)
    assert model.cfg.mask_token_ids == trained.cfg.mask_token_ids and tok.special["<mtp>"] == model.cfg.vocab_size - 1
    idx = torch.tensor([[5, 6, 7] + [model.cfg.mask_token_ids[0]] * 3])
    assert torch.allclose(model(idx), trained(idx), atol=1e-2)   # bf16 file: close, not equal
    assert torch.equal(model(idx[:, :3])[..., :-1], plain)        # gated: next-token logits untouched


def test_bad_heads_files_give_clear_errors(tmp_path):
    m = tiny(heads=1)
    path = tmp_path / "heads.safetensors"
    artefacts.save_heads(path, m)
    other = tiny(vocab=41)
    with pytest.raises(ValueError, match=f"{path}.*another model"):
        artefacts.attach_heads(other, path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=str(bad)):
        artefacts.attach_heads(tiny(), bad)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        artefacts.attach_heads(tiny(), tmp_path / "missing.safetensors")


def test_mask_mode_resume_restores_the_loss_rng(synth, tmp_path):
    """k and the regions are drawn from the loss RNG: a resumed run draws the same ones as an uninterrupted run."""
    base = tmp_path / "base"
    train.main(["--mode", "scratch", "--data", str(synth), "--out", str(base), "--n_mtp_heads", "0",
                "--max_steps", "1", *SMALL])
    common = ["--mode", "mask_tokens", "--init_from", str(base), "--data", str(synth), "--lora_rank", "4", "--gated",
              "--k_max", "6", "--save_every", "3", *SMALL]
    train.main([*common, "--out", str(tmp_path / "straight"), "--max_steps", "6"])
    train.main([*common, "--out", str(tmp_path / "split"), "--max_steps", "3"])
    train.main(["--out", str(tmp_path / "split"), "--resume", "--max_steps", "6"])   # the run's own options
    straight, split = read_log(tmp_path / "straight"), read_log(tmp_path / "split")
    assert len({r["k"] for r in straight}) > 1                    # k varies, so a reset RNG would show
    assert [r["k"] for r in split] == [r["k"] for r in straight]
    assert all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(straight, split))


# ---------------------------------------------------------------------------------------------------------------
# train.py: nothing lost, every bad input one line

def test_out_folder_of_user_files_is_kept(synth, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    for flags in ([], ["--overwrite"], ["--resume"]):
        status, err = run_cli(["--data", synth, "--out", out, "--max_steps", "1", *SMALL, *flags], capsys)
        assert status == 2 and err.count("\n") == 1 and err.startswith("error: ") and str(out) in err, err
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "precious"


def test_shipped_checkpoints_are_kept(synth, tmp_path, capsys):
    shipped = tmp_path / "checkpoints"
    shipped.mkdir()
    head = shipped / "smollm2_head1.safetensors"
    head.write_bytes(b"shipped")
    status, err = run_cli(["--data", synth, "--out", shipped, "--overwrite", "--max_steps", "1", *SMALL], capsys)
    assert status == 2 and "did not write" in err
    # a shipped file is replaced only by an explicit --export and --overwrite
    base = ["--data", synth, "--out", tmp_path / "run", "--max_steps", "1", "--export", head, *SMALL]
    status, err = run_cli(base, capsys)
    assert status == 2 and f"--export {head}: exists" in err and head.read_bytes() == b"shipped"
    assert not (tmp_path / "run").exists()                        # refused before anything was written
    assert run_cli([*base, "--overwrite"], capsys)[0] == 0 and head.read_bytes() != b"shipped"
    for preset in (Path(train.__file__).parent / "config").glob("*.json"):
        options = json.loads(preset.read_text())
        assert all(options[key].startswith("out/") for key in ("out", "export") if key in options), preset


def test_finished_run_is_not_silently_replaced(synth, tmp_path, capsys):
    out = tmp_path / "run"
    run = ["--data", synth, "--out", out, "--max_steps", "2", *SMALL]
    assert run_cli(run, capsys)[0] == 0
    weights = (out / "model.safetensors").read_bytes()
    status, err = run_cli(run, capsys)
    assert status == 2 and "--resume continues it, --overwrite replaces it" in err
    status, err = run_cli([*run, "--resume"], capsys)
    assert status == 2 and "finished at step 2" in err
    (out / "notes.txt").write_text("mine")                       # a checkpoint holding a user's file: kept too
    status, err = run_cli([*run, "--overwrite"], capsys)
    assert status == 2 and "notes.txt" in err
    assert (out / "model.safetensors").read_bytes() == weights
    (out / "notes.txt").unlink()
    assert run_cli([*run, "--overwrite", "--seed", "1"], capsys)[0] == 0
    assert (out / "model.safetensors").read_bytes() != weights
    status, err = run_cli(["--out", out, "--resume", "--max_steps", "3", "--lr", "0.5"], capsys)
    assert status == 2 and "has --lr 0.001, not 0.5" in err       # a different run needs another --out
    (out / "train_state.pt").write_bytes((out / "train_state.pt").read_bytes()[:100])
    status, err = run_cli(["--out", out, "--resume", "--max_steps", "3"], capsys)
    assert status == 2 and str(out / "train_state.pt") in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--max_steps", "-1"], "--max_steps -1: must not be negative"),
    (["--lr", "-0.1"], "--lr -0.1: must be positive"),
    (["--warmup", "-5"], "--warmup -5: must not be negative"),
    (["--seq_len", "0"], "--seq_len 0: must be at least 1"),
    (["--n_embd", "30"], "--n_embd 30, --n_head 4"),
    (["--n_heads", "2"], "unrecognized arguments: --n_heads"),
    (["--mode", "heads"], "--mode heads needs --init_from"),
    (["--init_from", "smollm2"], "--mode scratch starts from nothing"),
    (["--head_init", "random"], "--head_init applies to --mode heads only"),
    (["--head_taps", "1"], "--head_taps applies to --mode heads only"),
    (["--mode", "heads", "--init_from", "x", "--head_taps", "2,1"], "--head_taps [2, 1]: expected increasing block"),
    (["--mode", "heads", "--init_from", "x", "--head_taps", "-1"], "--head_taps [-1]: expected increasing block"),
    (["--mode", "heads", "--init_from", "x", "--head_taps", "2;5"], "argument --head_taps: expected block indices"),
    (["--mode", "mask_tokens", "--init_from", "x", "--k_max", "1"], "--k_max 1: must be at least 2"),
    (["--gated"], "--gated gates LoRA adapters"),
    (["--val_prompts", "data/chat_prompts_val.jsonl"], "--val_prompts scores MTP heads"),
    (["--val_tau", "0"], "--val_tau 0: confadapt's threshold must be in (0, 1]"),
    (["--device", "tpu"], "--device tpu: expected cpu, cuda or cuda:N"),
    (["--dtype", "int8"], "argument --dtype: invalid choice"),
    (["--lr", "fast"], "argument --lr: invalid float value"),
    (["--alpha", "1,x"], "argument --alpha: expected a number or numbers separated by commas"),
    (["--beta", "1,-1"], "--beta [1.0, -1.0]: must not be negative"),
    (["--mode", "heads", "--init_from", "x", "--main_kl_grad"], "--main_kl_grad: only --mode"),
    (["--resume"], "holds no train.py checkpoint"),
    (["--config", "missing.json"], "missing.json"),
])
def test_bad_options_are_one_line_errors(argv, message, synth, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, err = run_cli(["--data", synth, "--out", tmp_path / "run", *SMALL, *argv], capsys)
    assert status == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "run").exists()


def test_per_depth_weights_are_checked_saved_and_resumed(synth, tmp_path, capsys):
    out = tmp_path / "run"
    run = ["--data", synth, "--out", out, "--n_mtp_heads", "2", *SMALL]
    status, err = run_cli([*run, "--alpha", "1,0.5,0.5", "--max_steps", "1"], capsys)
    assert status == 2 and "--alpha 1,0.5,0.5: 3 weights for 2 MTP heads" in err
    assert err.count("\n") == 1
    assert run_cli([*run, "--alpha", "1,0.5", "--beta", "0,1", "--max_steps", "1"], capsys)[0] == 0
    saved = json.load(open(out / "config.json"))["train_args"]
    assert saved["alpha"] == [1.0, 0.5] and saved["beta"] == [0.0, 1.0]
    resume = ["--out", out, "--resume", "--max_steps", "2"]
    status, err = run_cli([*resume, "--alpha", "1,0.25"], capsys)
    assert status == 2 and "has --alpha [1.0, 0.5], not [1.0, 0.25]" in err
    assert run_cli(resume, capsys)[0] == 0
    assert [r["step"] for r in read_log(out)] == [1, 2]


def test_bad_config_files_and_max_steps_zero(synth, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    for text, message in (("{", "not valid JSON"), ("[1]", "expected a JSON object"), ('{"n_heads": 2}', "n_heads")):
        bad.write_text(text)
        status, err = run_cli(["--config", bad, "--data", synth], capsys)
        assert status == 2 and str(bad) in err and message in err, err
    out = tmp_path / "run"
    assert train.cli([str(a) for a in ["--data", synth, "--out", out, "--max_steps", "0", *SMALL]]) == 0
    assert "--max_steps 0: model and data checked; nothing trained, saved or exported" in capsys.readouterr().out
    assert not out.exists() and not (tmp_path / "run.log.jsonl").exists()


def test_val_prompts_agreement_is_measured_on_the_models_own_answers(synth, tmp_path):
    """--val_prompts logs, per depth, how often a head's argmax equals the main head's on the model's own greedy
    answers (answer tokens only): checked against a per-prompt recompute without padding."""
    base, heads = tmp_path / "base", tmp_path / "heads"
    train.main(["--mode", "scratch", "--data", str(synth), "--out", str(base), "--n_mtp_heads", "0",
                "--max_steps", "2", *SMALL])
    prompts = synth / "test_prompts.jsonl"
    train.main(["--mode", "heads", "--init_from", str(base), "--data", str(synth), "--out", str(heads),
                "--n_mtp_heads", "1", "--head_init", "random", "--val_prompts", str(prompts), "--max_steps", "1",
                *SMALL, "--eval_every", "1"])
    logged = read_log(heads)[-1]["val"]["prompts_agree1"]
    model, tokenizer = load.load(heads)
    agree = []
    with torch.no_grad():
        for row in map(json.loads, open(prompts)):
            p = tokenizer.encode(row["prompt"])
            a = decode.generate(model, [p], train.VAL_ANSWER_TOKENS, stop_ids=tokenizer.stop_ids)[0]
            ids = torch.tensor([p + a])
            main, h = model(ids, return_head_state=True)
            for i in range(len(p) - 2, len(ids[0]) - 2):         # the head at i sees token i+1, predicts token i+2
                pos = torch.tensor([[i]])
                draft = model.logits(model.head_forward(0, h[:, i:i + 1], ids[:, i + 1:i + 2], pos)).argmax(-1)
                agree.append(draft.item() == main[0, i + 1].argmax().item())
    assert logged == pytest.approx(sum(agree) / len(agree), abs=1e-6)
    assert 0 < logged < 1


def test_gpt2_from_scratch_at_a_window_of_its_whole_context(synth, tmp_path):
    """A window of seq_len tokens is seq_len + 1 ids (inputs and the last target): GPT-2's position table must hold
    them all (at seq_len 1024 it once ended one short and the GPU run failed on an out-of-range position)."""
    train.main(["--mode", "scratch", "--arch", "gpt2", "--data", str(synth), "--out", str(tmp_path / "g"),
                "--n_mtp_heads", "0", "--max_steps", "1", *SMALL, "--seq_len", "1024", "--batch_size", "1"])
    assert load.load(tmp_path / "g")[0].cfg.max_seq_len >= 1025


@pytest.fixture(scope="module")
def talking_base(synth, tmp_path_factory):
    """A base model trained just enough (200 steps) to write numbers, and confident about a few."""
    base = tmp_path_factory.mktemp("talking") / "base"
    train.main(["--mode", "scratch", "--data", str(synth), "--out", str(base), "--n_mtp_heads", "0",
                "--max_steps", "200", "--lr", "0.01", "--warmup", "0", *SMALL])
    return base


def held_out_recompute(out, prompts, tau, k_max):
    """Paper A's two curves at a run's last step, recomputed from its checkpoint without train.py:
    the first VAL_DECODE_PROMPTS prompts decoded with confadapt@tau, as (tokens per forward,
    outputs, their texts)."""
    model, tokenizer = load.load(out)
    rows = [json.loads(line) for line in open(prompts)][:train.VAL_DECODE_PROMPTS]
    ids = [tokenizer.encode(row["prompt"]) for row in rows]
    stats = decode.Stats()
    outs = decode.generate(model, ids, train.VAL_DECODE_TOKENS, stop_ids=tokenizer.stop_ids,
                           method=f"confadapt@{tau}", stats=stats,
                           mask_ids=model.cfg.mask_token_ids, k_max=k_max)
    texts = [tokenizer.decode([t for t in o if t not in tokenizer.stop_ids]) for o in outs]
    return stats.tokens_per_forward, outs, texts


def test_mask_mode_val_prompts_log_confadapt_speed_and_accuracy(synth, talking_base, tmp_path):
    """Mask-token mode with --val_prompts logs, at each evaluation, confadapt@--val_tau's tokens
    per forward and accuracy on the prompts' numeric answers: what a decoding of the saved weights
    gives."""
    tau = 0.2           # the mask tokens are confident enough at it for some of their drafts
    prompts = tmp_path / "prompts.jsonl"
    rows = [json.loads(line) for line in open(synth / "test_prompts.jsonl")]

    def run(out):
        prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
        train.main(["--mode", "mask_tokens", "--init_from", str(talking_base), "--data", str(synth),
                    "--out", str(out), "--lora_rank", "4", "--gated", "--k_max", "4",
                    "--val_prompts", str(prompts), "--val_tau", str(tau), "--max_steps", "2",
                    *SMALL, "--eval_every", "1"])
        return held_out_recompute(out, prompts, tau, 4)

    _, _, texts = run(tmp_path / "first")
    # the same run again, its gold answers now what the model writes to every other prompt
    for i, (row, text) in enumerate(zip(rows, texts)):
        written = synthmath.extract_answer(text)
        row["answer"] = written if i % 2 == 0 and written is not None else "987654"
    speed, _, texts = run(tmp_path / "second")
    log = read_log(tmp_path / "second")
    assert [r["step"] for r in log] == [1, 2] and all("prompts_accuracy" in r["val"] for r in log)
    last = log[-1]["val"]
    assert last["prompts_tokens_per_forward"] == pytest.approx(speed, abs=1e-9) and speed > 1
    right = [synthmath.score(t, r["answer"]) for t, r in zip(texts, rows)]
    assert last["prompts_accuracy"] == pytest.approx(sum(right) / len(right))
    assert 0 < last["prompts_accuracy"] < 1


def test_mask_mode_val_prompts_without_answers_log_agreement_with_the_original_ar(
        synth, talking_base, tmp_path):
    """Prompts without numeric answers: the logged score is the share of confadapt answers equal to
    the greedy `ar` answer of the model before conversion, not of the model being trained (full
    fine-tuning: one step changes this one's greedy answers), in a resumed run too."""
    out = tmp_path / "mask"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": json.loads(line)["prompt"]}) + "\n"
                               for line in open(synth / "test_prompts.jsonl")))
    train.main(["--mode", "mask_tokens", "--init_from", str(talking_base), "--data", str(synth),
                "--out", str(out), "--k_max", "4", "--val_prompts", str(prompts),
                "--max_steps", "1", "--warmup", "0", *SMALL, "--eval_every", "1"])
    train.main(["--out", str(out), "--resume", "--max_steps", "2"])
    last = read_log(out)[-1]["val"]
    speed, outs, _ = held_out_recompute(out, prompts, 0.9, 4)       # --val_tau's default

    def exact_ar(path):
        model, tokenizer = load.load(path)
        ids = [tokenizer.encode(json.loads(line)["prompt"]) for line in open(prompts)]
        greedy = decode.generate(model, ids[:len(outs)], train.VAL_DECODE_TOKENS,
                                 stop_ids=tokenizer.stop_ids)
        return sum(o == g for o, g in zip(outs, greedy)) / len(outs)

    assert "prompts_accuracy" not in last
    assert last["prompts_tokens_per_forward"] == pytest.approx(speed, abs=1e-9)
    assert last["prompts_exact_ar"] == pytest.approx(exact_ar(talking_base))
    assert exact_ar(out) != exact_ar(talking_base)   # scoring against the trained model would show
