"""Shared test fixtures: the repository on sys.path, a tiny byte-level BPE trained offline, varied
sample text, the loaders' oracle (logits against transformers), the synthetic-math data train.py
tests use. The tiny models live in helpers.py."""

import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.prepare import main as prepare  # noqa: E402  (the repository is on the path now)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Text the tokenizers must agree on: accents, CJK, emoji, digit runs, whitespace runs, newlines, tabs, contractions,
# special tokens inside text, bytes that are not valid alone in UTF-8.
SAMPLE_TEXTS = [
    "Hello world! It's a test, isn't it? We'll see; they've gone, I'd say, you're right, I'm here.",
    "Numbers: 1 12 123 1234 12345 3.14159 -42 1,000,000 and 2024-06-01T12:34:56Z",
    "   leading spaces, trailing spaces   \n\n\ttabs\tand\t\tmore\n   \n  x  1  \n",
    "Café naïve résumé Ærøskøbing Straße — “quotes” ‘single’ … ©®",
    "中文字符测试，日本語のテキスト、한국어 텍스트",
    "emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷🇯🇵",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|endoftext|>",
    "def f(x):\n    return x**2  # square\n\nprint(f(12))\n",
    "MiXeD CaSe 'S 'T 'RE 'LL don'T",
    "a\r\nb\rc\u00a0d\u2003e\u3000f",
    "",
    " ",
    "\n\n\n",
    "x" * 50 + " " + "ab" * 30,
]

# Hugging Face's Digits pre-tokenizer splits at every Unicode number (\p{N}), not only at ASCII 0-9:
# fractions, superscripts, Arabic-Indic, full-width and Roman numerals, with and without the spaces
# before them
NUMERALS = ["½ cup", "x² + y²", "a ½²", "٣٤٥ and ٣", "３４ or １２３", " 12 ½", "Ⅻ ① ⁴⁵", "3½ miles",
            "costs ¼", "n=10²", "  ٣", "\t³\n", "a\u00a0½"]


def corpus(n=400, seed=0):
    rng = random.Random(seed)
    words = ("the of and to in is that it was for on are with as his they be at one have this from or had by hot "
             "word but what some we can out other were all there when up use your how said an each she which do "
             "their time if will way about many then them would write like so these her long make thing see him "
             "two has look more day could go come did number sound no most people my over know water than call "
             "first who may down side been now find café naïve straße 中文 日本語 😀 🚀 don't it's we'll").split()
    lines = []
    for _ in range(n):
        k = rng.randint(3, 14)
        line = " ".join(rng.choice(words) for _ in range(k))
        if rng.random() < 0.3:
            line += f" {rng.randint(0, 99999)}"
        if rng.random() < 0.2:
            line = "    " + line.replace(" ", "\t", 1)
        lines.append(line.capitalize() + rng.choice([".", "!", "?", ":", ""]))
    return lines + SAMPLE_TEXTS


@pytest.fixture(scope="session")
def sample_texts():
    return SAMPLE_TEXTS


@pytest.fixture(scope="session")
def tiny_bpe():
    """A tokenizers.Tokenizer: byte-level BPE with every byte in the vocabulary, a few hundred merges, ChatML
    specials at ids 0..2 (like SmolLM2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return tok


def gguf_with_tokenizer(path, hf_tok, pre="gpt-2", arch="llama", chat_template=None):
    """A gguf.GGUFWriter holding hf_tok's vocabulary the way llama.cpp's converter writes it; the caller adds the
    model's keys and tensors, then calls finish_gguf."""
    import json
    import gguf
    tj = json.loads(hf_tok.to_str())
    tokens = [t for t, _ in sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])    # 3: control
    w.add_token_merges([" ".join(m) for m in tj["model"]["merges"]])
    w.add_eos_token_id(SPECIALS.index("<|im_end|>"))
    if chat_template:
        w.add_chat_template(chat_template)
    return w


def add_llama_keys(w, c):
    """The hyperparameters every llama-like GGUF carries, from a transformers config c."""
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])


def finish_gguf(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


HF_V = 704   # the tiny tokenizer has 700 tokens: models padded a little, as real ones often are
HF_T = 24
TOL = 1e-4


def randomize(model, seed):
    """Perturb every parameter (norm weights included) so that no mis-mapped tensor can hide."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def assert_same_logits(hf, ours, offset=0, seed=0):
    torch.manual_seed(seed)
    idx = torch.randint(HF_V, (2, HF_T))
    pos = (torch.arange(HF_T) + offset).expand(2, -1)
    with torch.no_grad():
        expected = hf(idx, position_ids=pos).logits
        got = ours(idx, pos=pos)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOL


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread: more only adds synchronisation."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# the synthetic-math data that train.py tests share, prepared once per module
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "synth"
    prepare(["synthmath", "--out", str(out), "--n_train", "400", "--n_val", "40", "--n_test", "10"])
    return out
