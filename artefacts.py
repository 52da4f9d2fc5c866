"""
The project's own artefacts: train.py's checkpoint folders and the small files that ship on top of a
base model.

- `save_checkpoint` / `recover_checkpoint`: a folder of model.safetensors + config.json + tokenizer
  (+ train.py's state), replaced atomically; load.load reads it back.
- `save_heads` / `attach_heads`: MTP heads (Paper B), with the fusion head 1 may read and a draft
  vocabulary.
- `save_mask_adapter` / `attach_mask_adapter`: Paper A's mask tokens and LoRA adapters.
Every file is checked against the model it goes on before anything changes: a refused file leaves
model and tokenizer as they were. What is not here: weights from outside the project (load.py,
weights.py).
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from files import names, plural
from model import Config, Transformer
from tokenizer import mask_token_names


# --------------------------------------------------------------------------------------------------
# checkpoint folders: config.json {"format": "nanomtp", "model": Config, ...} + model.safetensors

def save_checkpoint(folder, model, tokenizer, extra=None, train_state=None):
    """Write model, config, tokenizer (and train.py's optimizer/RNG state) to `folder` atomically:
    everything goes to a temporary folder beside it, which then replaces the old one. A failure
    while writing leaves the previous checkpoint as it was; a crash between the two renames of the
    swap leaves it in .NAME.old, where recover_checkpoint (called by load and by the next save)
    finds it."""
    folder = Path(folder)
    recover_checkpoint(folder)
    extra = dict(extra or {})
    if {"format", "model"} & set(extra):
        raise ValueError("extra must not override the keys 'format' and 'model'")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        # the embedding itself; safetensors refuses tensors that share memory
        del state["lm_head.weight"]
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(state, tmp / "model.safetensors")
        (tmp / "config.json").write_text(
            json.dumps({"format": "nanomtp", "model": model.cfg.to_dict(), **extra}, indent=2))
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


def recover_checkpoint(folder):
    """Finish a swap that stopped between its renames: the folder is gone, the previous checkpoint
    is in .NAME.old."""
    folder = Path(folder)
    old = folder.with_name(f".{folder.name}.old")
    if not folder.exists() and old.is_dir():
        old.rename(folder)


# --------------------------------------------------------------------------------------------------
# small shippable files on top of a base model: MTP heads (Paper B) and mask-token adapters
# (Paper A)

def _save_small(path, tensors, meta):
    """bf16 safetensors with string metadata, written atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.detach().to(torch.bfloat16) if v.is_floating_point()
                   else v.detach()).cpu().contiguous()
               for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, path)


def _load_small(path, kind, model):
    """Tensors and metadata of a file written by _save_small, checked against the model it goes
    on."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {kind} file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable {kind} file, "
                         f"truncated or not safetensors ({e})") from e
    if meta.get("format") != f"nanomtp-{kind}":
        raise ValueError(f"{path}: not a nanoMTP {kind} file (format {meta.get('format')!r})")
    base = {"n_embd": model.cfg.n_embd, "base_vocab_size": model.cfg.vocab_size,
            "n_layer": model.cfg.n_layer}
    wrong = {k: (meta.get(k), v) for k, v in base.items() if meta.get(k) != v}
    if wrong:
        raise ValueError(f"{path}: made for another model: " +
                         ", ".join(f"{k} {a} in the file vs {b} in the model"
                                   for k, (a, b) in wrong.items()))
    broken = [k for k, v in tensors.items()
              if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:   # such a file decodes without a word, at 1.00 tokens per forward
        raise ValueError(f"{path}: weights hold NaN or Inf ({names(broken)}): "
                         f"a damaged {kind} file")
    return tensors, meta


def grown_shapes(model, grow):
    """{name: shape} of what grow(model) would add, found on a weightless headless copy (meta
    device), so a file is checked before the model changes: a refused file leaves model and
    tokenizer as they were."""
    with torch.device("meta"):
        skeleton = Transformer(Config(**{**model.cfg.to_dict(), "n_mtp_heads": 0, "head_taps": []}))
        before = set(skeleton.state_dict())
        grow(skeleton)
    return {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if k not in before}


def check_fits(path, kind, tensors, want):
    have = {k: tuple(v.shape) for k, v in tensors.items()}
    if have != want:
        shapes = [k for k in set(have) & set(want) if have[k] != want[k]]
        raise ValueError(f"{path}: {kind} do not fit the model "
                         f"(unexpected: {names(set(have) - set(want)) or '-'}; "
                         f"missing: {names(set(want) - set(have)) or '-'}; "
                         f"other shape: {names(shapes) or '-'})")


def save_heads(path, model, draft_vocab=None, first=0):
    """MTP heads first.. alone (looped extension ships only the heads it trained), plus, optionally,
    token ids by falling frequency for a reduced draft vocabulary. The file of head 1 (first = 0)
    also carries the fusion that makes head 1's input, if the model has one (its weight, and its
    taps in the metadata)."""
    tensors = {f"heads.{i - first}.{k}": v for i in range(first, len(model.heads))
               for k, v in model.heads[i].state_dict().items()}
    meta = {"format": "nanomtp-heads", "first": first, "n_heads": len(model.heads) - first,
            "n_embd": model.cfg.n_embd, "base_vocab_size": model.cfg.vocab_size,
            "n_layer": model.cfg.n_layer}
    if first == 0 and model.fuse is not None:
        tensors["fuse.weight"] = model.fuse.weight
        meta["head_taps"] = model.cfg.head_taps
    if draft_vocab is not None:
        tensors["draft_vocab"] = draft_vocab
    _save_small(path, tensors, meta)


def attach_heads(model, path):
    """Append the heads stored in `path` to the model (files of an extension go after the ones they
    extend), and the fusion a file of head 1 may carry; returns the frequency-ordered draft
    vocabulary or None."""
    tensors, meta = _load_small(path, "heads", model)
    first, n, taps = meta["first"], meta["n_heads"], meta.get("head_taps", [])
    if taps and (model.heads or model.fuse is not None):
        raise ValueError(f"{path}: its head 1 reads a fusion of blocks {taps} and the last one, "
                         f"made on a model without heads or fusion; this one has "
                         f"{plural(len(model.heads), 'head')}"
                         f"{' and a fusion' if model.fuse is not None else ''}: "
                         f"attach the file first")
    if first != len(model.heads):
        raise ValueError(f"{path}: holds heads {first}.. but the model has {len(model.heads)}: "
                         f"attach the heads files in the order they were trained")
    draft_vocab = tensors.pop("draft_vocab", None)

    def grow(m):
        if taps:
            m.add_fusion(taps)
        m.add_heads(n, init="random")
    try:
        want = grown_shapes(model, grow)
    except ValueError as e:   # taps that do not fit this model
        raise ValueError(f"{path}: {e}") from e
    check_fits(path, "heads", tensors, want)
    grow(model)
    if taps:
        model.fuse.load_state_dict({"weight": tensors.pop("fuse.weight")})
    state = {k.removeprefix("heads."): v for k, v in tensors.items()}
    torch.nn.ModuleList(model.heads[first:]).load_state_dict(state)
    return draft_vocab


def save_mask_adapter(path, model, meta=None):
    """Paper A's result when trained with LoRA: the adapters and the mask tokens' embedding rows."""
    cfg, ids = model.cfg, model.cfg.mask_token_ids
    tensors = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    tensors["mask_embeddings"] = model.embed.weight[ids[0]:]
    _save_small(path, tensors, {"format": "nanomtp-mask", "n_embd": cfg.n_embd,
                                "n_layer": cfg.n_layer, "base_vocab_size": ids[0],
                                "n_masks": len(ids), "lora_rank": cfg.lora_rank,
                                "lora_gated": cfg.lora_gated, **(meta or {})})


def attach_mask_adapter(model, tokenizer, path):
    """Grow model and tokenizer by the adapter's mask tokens, add its LoRA adapters; returns its
    metadata. Every check runs first: a refused file changes neither the model nor the tokenizer."""
    tensors, meta = _load_small(path, "mask", model)
    n, rank = meta["n_masks"], meta["lora_rank"]
    if not rank:
        raise ValueError(f"{path}: holds only the mask token embedding of a fully fine-tuned model "
                         f"(no LoRA): on the base model it cannot work; decode with that model's "
                         f"checkpoint folder instead")
    new_names = mask_token_names(n)
    if tokenizer.vocab_size > model.cfg.vocab_size or set(new_names) & set(tokenizer.special):
        raise ValueError(f"{path}: the tokenizer ({tokenizer.vocab_size} ids, "
                         f"specials {names(tokenizer.special)}) "
                         f"cannot give the mask tokens {names(new_names)} the model's ids "
                         f"{model.cfg.vocab_size}..{model.cfg.vocab_size + n - 1}")

    def grow(m):
        m.add_mask_tokens(n)
        m.add_lora(rank, meta["lora_gated"])
    check_fits(path, "adapters", tensors,
               {**grown_shapes(model, grow), "mask_embeddings": (n, model.cfg.n_embd)})

    # beyond a padded embedding's rows too (Qwen's): the tokenizer follows the model
    first = model.cfg.vocab_size

    grow(model)
    for i, name in enumerate(new_names):
        tokenizer.add_special(name, first + i)
    with torch.no_grad():
        model.embed.weight[-n:] = tensors.pop("mask_embeddings").to(model.embed.weight.dtype)
    # the adapters; everything else stays the base model's
    model.load_state_dict(tensors, strict=False)
    return meta
