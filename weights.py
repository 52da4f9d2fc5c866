"""
Weights from outside the project, into model.py's Transformer: Hugging Face folders (GPT-2, Llama,
Qwen2, Qwen3) and GGUF files (llama.cpp's layout of a Llama, Qwen2 or Qwen3 model).

Every architectural number comes from the file's own config, every tensor is copied by an explicit
name table (ours, theirs, transform) with shape checks (`fill`), and anything unexpected raises an
error that names the file. load.py's `load` is the entry point; this module is what it calls.
"""

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from files import REQUIRED, gguf_value, names, open_gguf, read_json
from model import Config, Transformer


def empty_model(cfg):
    """A model with uninitialised weights (fill() then writes every one): skips a random init we
    would discard."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    if cfg.tie_embeddings:   # to_empty gives every parameter its own storage: tie them again
        model.lm_head.weight = model.embed.weight
    return model


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
