"""Qwen2/Qwen2.5 and Qwen3 in the one Transformer: logits against `transformers` on tiny random models (float32,
within 1e-4) from Hugging Face folders, sharded and weights-only ones and GGUF files; the refusals (sliding windows,
mixture of experts, Qwen3's attention_bias); Qwen's tokenizer.json (NFC, its own split) against `tokenizers`;
lossless decoding with random heads and mask tokens; heads and mask training steps through train.py."""

import json
import re

import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import artefacts
import load
import train
from chars import CharTokenizer
from conftest import (HF_V, NUMERALS, SAMPLE_TEXTS, SPECIALS, add_llama_keys, assert_same_logits,
                      corpus, edit_config, finish_gguf, gguf_with_tokenizer, randomize)
from data.prepare import main as prepare
from decode import Stats, generate
from helpers import V as DECODE_V, assert_exercised, prompt, tiny, with_mask_oracle
from model import Config, Transformer
from tokenizer import NoTokenizer, Tokenizer, load_tokenizer

# the split of Qwen2's, Qwen2.5's and Qwen3's tokenizer.json, as written there
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
# text whose NFC form differs from it (decomposed accents, Hangul jamo, the ohm and angstrom signs), and text that
# NFKC would change but NFC must not (ligatures, full-width and superscript digits)
UNNORMALIZED = ["Cafe\u0301 and re\u0301sume\u0301", "\u1100\u1161\u11a8 \u1112\u1161\u11ab", "\u2126 \u212b 5\u2126",
                "o\u0308\u0304 a\u030a", "ﬁne ﬂow", "１２３ x² ½", "e\u0301\u0301\u0301"]
CODE = ["for (int i = 0; i < 10; ++i) {\n\t\tx[i] += a[i] * 2;\n}\n",
        "def f(x, y=3.5e-3):\n    '''doc'''\n    return {'k': [x, y]}  # 123456789\n\n\n",
        "    \n\t \n  \r\n\r\n   x   \t\t  y\u3000\u3000z        \n", "SELECT * FROM t WHERE id=42;--comment",
        "https://example.com/a?b=1&c=%20 ~/.bashrc $HOME \\n \\t", "I'M YOU'RE we'Ll 'S 's 'd"]
QWEN_TEXTS = SAMPLE_TEXTS + NUMERALS + UNNORMALIZED + CODE


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models run on one thread


@pytest.fixture(scope="module")
def qwen_bpe():
    """A tokenizers.Tokenizer built the way Qwen's tokenizer.json is: NFC, Split(Qwen's regex, isolated) and
    ByteLevel without its own regex, byte-level BPE, ChatML specials at the end of the vocabulary."""
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700 - len(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus() + CODE, trainer)
    tok.add_special_tokens(SPECIALS)      # after the merges, like Qwen's <|endoftext|> at 151643
    assert tok.get_vocab_size() == 700
    return tok


def hf_qwen(folder, tok, kind="qwen3", seed=0, save=True, **overrides):
    kw = dict(vocab_size=HF_V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2,
              intermediate_size=96, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
              head_dim=16)
    torch.manual_seed(seed)
    config_class, model_class = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                                 "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[kind]
    model = randomize(model_class(config_class(**{**kw, **overrides})), seed)
    if save:
        model.save_pretrained(folder)
        tok.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    return model


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
QWENS = {
    "qwen2-gqa-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-untied-wide-heads": ("qwen2", dict(head_dim=32)),     # head_dim given explicitly, not hidden / heads
    "qwen2-linear-rope": ("qwen2", dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6})),
    "qwen3-gqa-untied-wide-heads": ("qwen3", dict(head_dim=32)),
    "qwen3-tied-narrow-heads": ("qwen3", dict(tie_word_embeddings=True, head_dim=8)),
    "qwen3-no-gqa": ("qwen3", dict(num_key_value_heads=4)),
    "qwen3-llama3-rope": ("qwen3", dict(rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0})),
}


@pytest.mark.parametrize("name", QWENS)
def test_qwen_logits_equal_transformers(tmp_path, qwen_bpe, name):
    kind, overrides = QWENS[name]
    hf = hf_qwen(tmp_path, qwen_bpe, kind, **overrides)
    model, tokenizer = load.load(tmp_path)
    c = hf.config
    assert (model.cfg.qkv_bias, model.cfg.qk_norm) == (kind == "qwen2", kind == "qwen3")
    assert (model.cfg.head_dim, model.cfg.n_kv_head, model.cfg.tie_embeddings) == \
        (c.head_dim, c.num_key_value_heads, c.tie_word_embeddings)
    assert model.cfg.rope_theta == c.rope_parameters["rope_theta"]
    assert tokenizer.nfc and tokenizer.eos_id == qwen_bpe.token_to_id("<|im_end|>") == 699
    assert_same_logits(hf, model, offset=3000)


def test_qwen_parts_matter(tmp_path, qwen_bpe):
    """The tests above would be vacuous if the biases, the q/k norms or the scaled rope changed nothing."""
    for kind, overrides, off in [("qwen2", {}, {"qkv_bias": False}), ("qwen3", {}, {"qk_norm": False}),
                                 ("qwen3", dict(rope_parameters={**LLAMA3_ROPE, "rope_theta": 1e4}),
                                  {"rope_scaling": None})]:
        hf = hf_qwen(tmp_path / kind, qwen_bpe, kind, **overrides)
        model, _ = load.load(tmp_path / kind)
        crippled = Transformer(Config(**{**model.cfg.to_dict(), **off}))
        crippled.load_state_dict(model.state_dict(), strict=False)   # without the parts switched off
        with pytest.raises(AssertionError):
            assert_same_logits(hf, crippled.eval(), offset=3000)


def test_qwen_sharded_weights_only_and_checkpoint(tmp_path, qwen_bpe):
    hf = hf_qwen(tmp_path / "hf", qwen_bpe, "qwen3", save=False)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 2
    model, tokenizer = load.load(tmp_path / "hf")     # config and weights only: no tokenizer files
    assert isinstance(tokenizer, NoTokenizer)
    assert_same_logits(hf, model, offset=10)
    qwen_bpe.save(str(tmp_path / "hf" / "tokenizer.json"))
    model, tokenizer = load.load(tmp_path / "hf")
    artefacts.save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    again, tokenizer2 = load.load(tmp_path / "ckpt")   # the new Config fields and the NFC flag survive
    assert again.cfg == model.cfg and tokenizer2.nfc
    assert_same_logits(hf, again, offset=10)
    for text in QWEN_TEXTS:
        assert tokenizer2.encode(text) == tokenizer.encode(text)


@pytest.mark.parametrize("kind, changes, message", [
    ("qwen2", dict(use_sliding_window=True), "use_sliding_window=true is not supported"),
    ("qwen3", dict(layer_types=["full_attention", "sliding_attention"]),
     r"layer_types \['sliding_attention'\] are not supported"),
    ("qwen3", dict(model_type="qwen3_moe", num_experts=8), r"mixture-of-experts layers \(num_experts=8\)"),
    ("qwen2", dict(model_type="qwen2_moe"), "unsupported model_type 'qwen2_moe'"),
    ("qwen3", dict(attention_bias=True), "attention_bias=true is not supported"),
    ("qwen3", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
     "unsupported rope_scaling type 'yarn'"),
    ("qwen3", dict(head_dim=32), r"q_proj.weight has shape \(64, 64\), but blocks.0.attn.q_proj.weight needs "
                                 r"\(128, 64\)"),
])
def test_qwen_refusals_name_the_field(tmp_path, qwen_bpe, kind, changes, message):
    hf_qwen(tmp_path, qwen_bpe, kind)
    edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + ".*" + message):
        load.load(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# GGUF (llama.cpp's converter keeps Qwen's q and k in Hugging Face's layout: no permutation)

def write_qwen_gguf(path, hf, tok, kind):
    c = hf.config
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    tj = json.loads(tok.to_str())     # llama.cpp lists the added tokens with the vocabulary
    tj["model"]["vocab"].update({t["content"]: t["id"] for t in tj["added_tokens"]})
    w = gguf_with_tokenizer(path, HFTokenizer.from_str(json.dumps(tj)), pre="qwen2", arch=kind)
    add_llama_keys(w, c)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for theirs, ours in names.items():
            for part in ("weight", "bias"):
                if f"model.layers.{i}.{theirs}.{part}" in sd:
                    w.add_tensor(f"blk.{i}.{ours}.{part}", sd[f"model.layers.{i}.{theirs}.{part}"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    finish_gguf(w)
    return path


@pytest.mark.parametrize("kind, tied", [("qwen2", True), ("qwen3", False)])
def test_qwen_gguf(tmp_path, qwen_bpe, kind, tied):
    hf = hf_qwen(tmp_path, qwen_bpe, kind, save=False, tie_word_embeddings=tied, head_dim=32)
    model, tokenizer = load.load(write_qwen_gguf(tmp_path / "tiny.gguf", hf, qwen_bpe, kind))
    assert (model.cfg.qkv_bias, model.cfg.qk_norm, model.cfg.head_dim) == (kind == "qwen2", kind == "qwen3", 32)
    assert model.cfg.tie_embeddings == tied
    assert_same_logits(hf, model, offset=1000)
    for text in QWEN_TEXTS:
        assert tokenizer.encode(text, specials=True) == qwen_bpe.encode(text, add_special_tokens=False).ids, text


# ----------------------------------------------------------------------------------------------------------------
# the tokenizer

def test_qwen_tokenizer_matches_hf(tmp_path, qwen_bpe):
    qwen_bpe.save(str(tmp_path / "tokenizer.json"))
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    assert tj["normalizer"]["type"] == "NFC" and tj["pre_tokenizer"]["pretokenizers"][0]["type"] == "Split"
    ours = Tokenizer.from_hf(tmp_path)
    assert ours.nfc and ours.vocab_size == 700
    for text in QWEN_TEXTS + corpus(60, seed=5):
        ids = ours.encode(text, specials=True)
        assert ids == qwen_bpe.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == qwen_bpe.decode(ids, skip_special_tokens=False)
    assert ours.encode("e\u0301") == ours.encode("é") and ours.decode(ours.encode("e\u0301")) == "é"
    ours.nfc = False    # without NFC the decomposed texts come out differently: the flag is what makes them agree
    assert any(ours.encode(t) != qwen_bpe.encode(t, add_special_tokens=False).ids for t in UNNORMALIZED)


# The system-turn logic of Qwen2.5's and Qwen3's chat templates, as their tokenizer_config.json hold it (tool details
# left out): Qwen2.5 has a default system prompt in its plain branch, Qwen3 none; both open system turns in
# literals that code fills.
QWEN_TEMPLATE_HEAD = {
    "qwen2.5": ("{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
                "        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba "
                "Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n<tools>\" }}\n"
                "    {{- \"\\n</tools><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
                "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
                "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                "assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"),
    "qwen3": ("{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' %}\n"
              "        {{- messages[0].content + '\\n\\n' }}\n    {%- endif %}\n    {{- \"# Tools\\n<tools>\" }}\n"
              "    {{- \"\\n</tools><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0].role == 'system' %}\n"
              "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n    {%- endif %}\n"
              "{%- endif %}\n"),
}
QWEN_TEMPLATE_TAIL = ("{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == "
                      "\"system\" and not loop.first) or (message.role == \"assistant\") %}\n        {{- "
                      "'<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    "
                      "{%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- "
                      "'<|im_start|>assistant\\n' }}\n{%- endif %}\n")


@pytest.mark.parametrize("family, system", [("qwen2.5", "You are Qwen, created by Alibaba Cloud. You are a helpful "
                                                        "assistant."), ("qwen3", None)])
def test_qwen_chat_template(tmp_path, qwen_bpe, family, system):
    qwen_bpe.save(str(tmp_path / "tokenizer.json"))
    template = QWEN_TEMPLATE_HEAD[family] + QWEN_TEMPLATE_TAIL
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "chat_template": template, "tokenizer_class": "PreTrainedTokenizerFast"}))
    ours, hf = Tokenizer.from_hf(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.system_prompt == system
    for messages in ([{"role": "user", "content": "What is 2+2?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Café ½ e\u0301"}],
                     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "  code:\n\tx = 1\n"}]):
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.chat_prompt(messages) == text
        assert ours.encode_chat(messages) == hf(text, add_special_tokens=False)["input_ids"]


def test_unsupported_normalizer(tmp_path, qwen_bpe):
    hf = HFTokenizer.from_str(qwen_bpe.to_str())
    hf.normalizer = normalizers.NFKC()
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer\.json: normalizer 'NFKC' is not supported \(none or NFC\)"):
        Tokenizer.from_hf(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# decoding: lossless methods on Qwen-shaped random models (explicit head_dim 16 != 32 / 4)

QWEN_SHAPES = {"qwen3": dict(qk_norm=True, head_dim=16), "qwen2": dict(qkv_bias=True, head_dim=16)}


@pytest.mark.parametrize("kind", QWEN_SHAPES)
def test_qwen_greedy_drafts_equal_ar(kind):
    stats = {method: Stats() for method in ("mtp@1", "mtp@3", "tree@3x4", "tree@auto16", "verified@3")}
    for seed, residual in [(0, None), (1, 0.005), (2, 0.01)]:
        m = tiny(seed, heads=2, residual=residual, **QWEN_SHAPES[kind])
        assert all(hasattr(block.attn, "q_norm") == (kind == "qwen3") for block in [*m.blocks, m.heads[0].block])
        for p in (prompt(seed, 1 + 3 * seed), prompt(seed + 50, 20 - seed)):
            ref = generate(m, [p], 24, method="ar")
            ids = list(p)                                    # the static cache against recomputing everything
            with torch.no_grad():
                for _ in range(24):
                    ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
            assert ref == [ids[len(p):]], (kind, seed)
            for method in ("mtp@1", "mtp@3", "tree@3x4", "tree@auto16"):
                assert generate(m, [p], 24, method=method, stats=stats[method]) == ref, (kind, seed, method)
            mask_ids = [DECODE_V - 1]
            assert generate(m, [p], 24, method="verified@3", mask_ids=mask_ids) == ref
            with_mask_oracle(m, mask_ids, p + ref[0])        # mask drafts that are often right
            assert generate(m, [p], 24, method="verified@3", mask_ids=mask_ids, stats=stats["verified@3"]) == ref
            del m.forward                                    # the model's own forward again
    for method, s in stats.items():
        assert_exercised(s, depths=1 if method == "mtp@1" else 2)


# ----------------------------------------------------------------------------------------------------------------
# training through train.py on a Qwen3 folder: heads (then decoding with them) and gated-LoRA mask tokens

@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory, qwen_bpe):
    """A Qwen3 folder (vocabulary padded past the tokenizer's, as Qwen's is) and text prepared with its tokenizer."""
    root = tmp_path_factory.mktemp("qwen_run")
    hf_qwen(root / "hf", qwen_bpe, "qwen3", head_dim=32)
    (root / "text.txt").write_text("\n".join(corpus(300, seed=7) + CODE), encoding="utf-8")
    prepare(["text", "--file", str(root / "text.txt"), "--tokenizer", str(root / "hf"), "--out", str(root / "data")])
    return root


RUN = ["--batch_size", "2", "--seq_len", "32", "--eval_every", "1000", "--eval_batches", "1", "--device", "cpu",
       "--max_steps", "2"]


def test_qwen_heads_training_step(qwen_run, tmp_path):
    export = tmp_path / "heads.safetensors"
    trained = train.main(["--mode", "heads", "--init_from", str(qwen_run / "hf"), "--data", str(qwen_run / "data"),
                          "--n_mtp_heads", "2", "--out", str(tmp_path / "run"), "--export", str(export), *RUN])
    base, _ = load.load(qwen_run / "hf")
    assert all(torch.equal(a, b) for a, b in zip(base.blocks.parameters(), trained.blocks.parameters()))
    start = load.load(qwen_run / "hf")[0]
    start.add_heads(2)                    # what the run started from: heads copied from the last block
    moved = [not torch.equal(a, b) for a, b in zip(start.heads.parameters(), trained.heads.parameters())]
    assert any(moved) and all(torch.isfinite(p).all() for p in trained.heads.parameters())
    assert "q_norm.weight" in " ".join(n for n, _ in trained.heads.named_parameters())
    artefacts.attach_heads(base, export)
    p = load_tokenizer(qwen_run / "hf").encode("def f(x):\n    return x")
    ref = generate(base, [p], 16, method="ar")
    assert generate(base, [p], 16, method="mtp@2") == ref == generate(base, [p], 16, method="tree@2x2")


def test_qwen_mask_training_step(qwen_run, tmp_path):
    export = tmp_path / "mask.safetensors"
    train.main(["--mode", "mask_tokens", "--init_from", str(qwen_run / "hf"), "--data", str(qwen_run / "data"),
                "--lora_rank", "4", "--gated", "--k_max", "3", "--out", str(tmp_path / "run"), "--export",
                str(export), *RUN])
    model, tokenizer = load.load(qwen_run / "hf")
    artefacts.attach_mask_adapter(model, tokenizer, export)
    assert model.cfg.mask_token_ids == [HF_V] and tokenizer.special["<mtp>"] == HF_V
    p = tokenizer.encode("The number 12345 and")
    assert generate(model, [p], 16, method="verified@3", mask_ids=model.cfg.mask_token_ids) == \
        generate(model, [p], 16, method="ar")
    for method in ("static@3", "confadapt@0.9:3"):    # lossy: they run, and keep to the budget
        (out,) = generate(model, [p], 16, method=method, mask_ids=model.cfg.mask_token_ids)
        assert 0 < len(out) <= 16 and max(out) < HF_V


def test_special_tokens_after_a_gap(tmp_path, qwen_bpe):
    qwen_bpe.save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer.from_hf(tmp_path)
    assert tokenizer.add_special("<mtp>", HF_V) == HF_V and tokenizer.vocab_size == HF_V + 1
    assert tokenizer.encode("a<mtp>", specials=True)[-1] == HF_V
    assert tokenizer.decode([HF_V]) == "<mtp>"
    with pytest.raises(ValueError, match=r"tokenizer\.json: token id 701 is not in the vocabulary"):
        tokenizer.decode([701])                       # the gap: ids without a token
    with pytest.raises(ValueError, match=r"tokenizer\.json: special token '<x>' at id 3: new ids start at 705"):
        tokenizer.add_special("<x>", 3)
    with pytest.raises(ValueError, match=r"CharTokenizer: special token '<x>' can take id 97 only, not 99"):
        CharTokenizer().add_special("<x>", 99)
