"""Losses, Paper A's layout and mask, training modes, checkpoints and the small shipped files (CPU, tiny models)."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import distill  # noqa: E402
import load  # noqa: E402
import train  # noqa: E402
from model import Config, Transformer  # noqa: E402


def tiny(vocab=40, heads=0, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = Config(arch="llama", vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=8,
                 intermediate_size=64, max_seq_len=256, **kw)
    m = Transformer(cfg)
    if heads:
        m.add_heads(heads, init="random")
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
    forward = m.forward

    def grads(beta):
        m.zero_grad()
        seen = {}

        def recording_forward(*args, **kwargs):
            logits, h = forward(*args, **kwargs)
            logits.retain_grad()
            seen["main"] = logits
            return logits, h

        m.forward = recording_forward
        loss, metrics = distill.mtp_loss(m, idx, cfg=distill.MTPLossConfig(alpha=1.0, beta=beta, top_n=None))
        loss.backward()
        m.forward = forward
        return seen["main"].grad.clone(), [p.grad.clone() for p in m.heads.parameters()], metrics

    main_ce, heads_ce, _ = grads(beta=0.0)
    main_kl, heads_kl, metrics = grads(beta=1.0)
    assert metrics["kl1"] > 0 and metrics["kl2"] > 0
    assert torch.equal(main_ce, main_kl)                              # nothing from the KL reaches the main head
    assert any(not torch.equal(a, b) for a, b in zip(heads_ce, heads_kl))   # but the heads feel it


def test_topn_kl_is_zero_for_equal_distributions_and_positive_otherwise():
    a = torch.randn(5, 30)
    assert distill.topn_kl(a, a, top_n=10).abs().max() < 1e-6
    assert (distill.topn_kl(torch.randn(5, 30), a, top_n=10) > 0).all()
    assert (distill.topn_kl(torch.randn(5, 30), a, direction="reverse") > 0).all()


def test_mtp_loss_targets_are_shifted_by_depth():
    # a "perfect" head at depth d must predict token i+d+1 from position i: build logits that do exactly that and
    # check the CE is ~0, by monkeypatching the model's head_forward/logits
    m = tiny(heads=1)
    idx = torch.randint(0, 40, (1, 12))

    def head_forward(module, h_prev, next_idx, pos, cache=None, mask=None):
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
# Paper A layout and mask

def test_region_mask_matches_a_hand_written_case():
    tokens = torch.arange(100, 108)                              # 8 real tokens at positions 0..7
    r = distill.pack_regions(tokens, k=3, n_regions=1, mask_ids=[99], generator=torch.Generator().manual_seed(0))
    a = int(r.anchor[r.slots[0, 0]])                            # the region follows real token a
    # layout: reals 0..a, two masks standing for a+1, a+2, then reals a+1..7
    assert r.idx.tolist() == tokens[:a + 1].tolist() + [99, 99] + tokens[a + 1:].tolist()
    assert r.pos.tolist() == list(range(a + 1)) + [a + 1, a + 2] + list(range(a + 1, 8))
    assert r.targets.tolist() == [tokens[a + 1:a + 4].tolist()]
    mask = distill.region_mask(r)
    L = len(r.idx)
    m1, m2 = a + 1, a + 2                                        # indices of the two masks
    expected = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(L):
            if k in (m1, m2):                                    # only masks see masks: their own, earlier ones
                expected[q, k] = q in (m1, m2) and k <= q
            else:                                                # a real key: seen if at or before the anchor
                expected[q, k] = r.pos[k] <= r.anchor[q]
    assert torch.equal(mask, expected)
    assert not mask[a + 3:, m1:m2 + 1].any()                     # real tokens never see a mask
    assert mask[m2, :a + 1].all() and not mask[m1, m2]


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
        def forward(self, idx, pos, mask=None):
            return torch.nn.functional.one_hot((pos * 7) % 30, 31).float() * 60

    agree = ByPosition()
    for target in ("hard", "soft"):
        loss, metrics = distill.mask_loss(agree, agree, *packed, cfg=distill.MaskLossConfig(target), n_real_vocab=30)
        assert abs(loss.item()) < 1e-6, target
    assert metrics["agree1"] == metrics["agree4"] == 1.0
    loss, metrics = distill.mask_loss(student, teacher.requires_grad_(False), *packed, n_real_vocab=30)
    loss.backward()
    assert loss.item() > 0 and all(p.grad is None for p in teacher.parameters())
    assert student.embed.weight.grad is not None


def test_gated_lora_leaves_next_token_logits_unchanged():
    m = tiny()
    ids = m.add_mask_tokens(1)
    idx = torch.randint(0, 40, (2, 20))
    before = m(idx)
    m.add_lora(4, gated=True)
    for name, p in m.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1.0)                    # adapters that really change things
    assert torch.equal(m(idx), before)                           # no mask token: not one adapter runs
    with_mask = torch.cat([idx, torch.full((2, 3), ids[0])], 1)
    out = m(with_mask)
    assert torch.allclose(out[:, :20], before, atol=1e-5)        # real tokens before the masks: unchanged
    m.cfg.lora_gated = False
    assert not torch.allclose(m(idx), before, atol=1e-3)         # ungated adapters do change them


# ---------------------------------------------------------------------------------------------------------------
# train.py: extension, resume, shipped files

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from data.prepare import main as prepare
    out = tmp_path_factory.mktemp("data") / "synth"
    prepare(["synthmath", "--out", str(out), "--n_train", "400", "--n_val", "40", "--n_test", "10"])
    return out


SMALL = ["--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--n_kv_head", "2", "--batch_size", "4",
         "--seq_len", "48", "--eval_every", "1000", "--eval_batches", "1", "--device", "cpu"]


def test_extension_copies_heads_and_freezes_the_rest(synth, tmp_path):
    base = tmp_path / "base"
    train.main(["--mode", "scratch", "--data", str(synth), "--out", str(base), "--n_heads", "1",
                "--max_steps", "2", *SMALL])
    args = train.get_args(["--mode", "extend", "--init_from", str(base), "--data", str(synth), "--n_heads", "2",
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
    train.main(["--mode", "extend", "--init_from", str(base), "--data", str(synth), "--n_heads", "2",
                "--out", str(tmp_path / "ext"), "--export", str(export), "--max_steps", "1", *SMALL])
    frozen_before = load.load(base)[0].heads[0].state_dict()
    after = load.load(tmp_path / "ext")[0]
    assert all(torch.equal(v, after.heads[0].state_dict()[k]) for k, v in frozen_before.items())
    # the exported file holds only the new heads and attaches after the one it extends
    fresh = load.load(base)[0]
    load.attach_heads(fresh, export)
    assert len(fresh.heads) == 3
    headless = load.load(base)[0]
    headless.heads = torch.nn.ModuleList()
    with pytest.raises(ValueError, match="order"):                # head 0 must be there before heads 1, 2
        load.attach_heads(headless, export)


def test_resume_continues_the_same_loss_curve(synth, tmp_path):
    common = ["--mode", "scratch", "--data", str(synth), "--n_heads", "2", "--save_every", "3", *SMALL]
    train.main([*common, "--out", str(tmp_path / "straight"), "--max_steps", "6"])
    train.main([*common, "--out", str(tmp_path / "split"), "--max_steps", "3"])
    train.main([*common, "--out", str(tmp_path / "split"), "--max_steps", "6", "--resume"])
    read = lambda name: [json.loads(line) for line in open(tmp_path / f"{name}.log.jsonl")]
    straight, split = read("straight"), read("split")
    assert [r["step"] for r in split] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, split):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])


def test_mask_mode_gated_lora_exports_and_reattaches(synth, tmp_path):
    base = tmp_path / "base"
    train.main(["--mode", "scratch", "--data", str(synth), "--out", str(base), "--n_heads", "0",
                "--max_steps", "1", *SMALL])
    export = tmp_path / "mask.safetensors"
    train.main(["--mode", "mask", "--init_from", str(base), "--data", str(synth), "--out", str(tmp_path / "mask"),
                "--lora_rank", "4", "--gated", "--k_max", "4", "--export", str(export), "--max_steps", "2", *SMALL])
    trained = load.load(tmp_path / "mask")[0]
    model, tok = load.load(base)
    plain = model(torch.tensor([[5, 6, 7]]))
    load.attach_mask_adapter(model, tok, export)
    assert model.cfg.mask_token_ids == trained.cfg.mask_token_ids and tok.special["<mtp>"] == model.cfg.vocab_size - 1
    idx = torch.tensor([[5, 6, 7] + [model.cfg.mask_token_ids[0]] * 3])
    assert torch.allclose(model(idx), trained(idx), atol=1e-2)   # bf16 file: close, not equal
    assert torch.equal(model(idx[:, :3])[..., :-1], plain)        # gated: next-token logits untouched


def test_bad_heads_files_give_clear_errors(tmp_path):
    m = tiny(heads=1)
    path = tmp_path / "heads.safetensors"
    load.save_heads(path, m)
    other = tiny(vocab=41)
    with pytest.raises(ValueError, match=f"{path}.*another model"):
        load.attach_heads(other, path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=str(bad)):
        load.attach_heads(tiny(), bad)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load.attach_heads(tiny(), tmp_path / "missing.safetensors")
