"""
Training, one script for every recipe of both papers:

  --mode scratch   a main model and K MTP heads from scratch (Paper B; --beta 0 is plain MTP, --beta 1 MTP-D)
  --mode heads     K MTP heads on a frozen pretrained model, trained on the model's own answers (Paper B)
  --mode extend    looped extension: copy the m trained heads into m new ones, train only the new ones (Paper B)
  --mode mask_tokens mask-token MTP by student-forced self-distillation from a frozen copy (Paper A), full fine-tuning,
                   LoRA, or gated LoRA (adapters only at mask tokens: next-token predictions stay exactly the original)

Checkpoints (--out) hold the model, its tokenizer, the optimizer, the step, and the RNG states of training and of the
data sampler, written atomically: a resumed run (--resume) continues the same loss curve. --export writes the small
file that ships: the heads (mode heads/extend) or the mask-token adapter (mode mask_tokens) in bf16 safetensors.

Nothing is lost: an existing --out is refused unless it is a checkpoint of train.py and --resume (continue it) or
--overwrite (replace it) is given; a folder holding any file train.py did not write is never replaced. An existing
--export file is replaced only with --overwrite. The log OUT.log.jsonl beside --out is appended to, one "run" line at
the start of each run. One run at a time holds --out (a lock on OUT.lock beside it); a loss that turns NaN or Inf
stops the run before it saves, keeping the last checkpoint.

Several GPUs: torchrun --standalone --nproc_per_node N train.py ... (--parallel ddp, the default, or fsdp). The
global batch is batch_size x grad_accum x N sequences: every process reads its shard of one random draw, so N
processes train what one process with the whole batch trains. Rank 0 logs and writes full (unsharded) checkpoints;
--resume needs the same N. Each step logs tokens/s, and MFU on a GPU (the FLOPs are counted in flops_per_token).

Examples (presets in config/ write under out/):
  python train.py --config config/synthmath_scratch.json
  python train.py --config config/smollm2_heads.json --data data/chat
  python train.py --out out/sm_mtpd4 --resume --max_steps 4000
  torchrun --standalone --nproc_per_node 8 train.py --config config/smollm2_mask.json --parallel fsdp
Not here: the losses (distill.py), the data files (data/), measurement (bench.py).
"""

import argparse
import copy
import fcntl
import json
import math
import os
import pickle
import sys
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Replicate
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import distill
from data.dataset import TokenData, check_tokenizer
from decode import generate
from files import plural
from artefacts import recover_checkpoint, save_checkpoint, save_heads, save_mask_adapter
from load import load
from prompts import encode_prompt, read_prompts
from tokenizer import load_tokenizer, mask_token_names
from model import Config, Transformer

LR_FLOOR = 0.1             # the cosine schedule decays to this fraction of the peak learning rate
EVAL_SEED = 1234           # every evaluation draws the same validation batches
DRAFT_VOCAB_SAVED = 32768  # exported heads carry this many of the most frequent training tokens (draft vocabulary)
VAL_ANSWER_TOKENS = 128   # greedy answer length of each --val_prompts prompt
PEAK_TFLOPS = {"H100": 989, "H200": 989, "A100": 312}   # dense bf16, by a substring of the GPU's name, for MFU
# What defines a run: --resume continues only with the checkpoint's own values of these.
RUN_OPTIONS = ("mode", "init_from", "answers_only", "arch", "n_layer", "n_head", "n_kv_head", "n_embd", "n_mtp_heads",
               "head_init", "head_taps", "alpha", "beta", "top_n", "kl_direction", "k_max", "k_fixed", "target",
               "prefix_loss", "distinct_masks", "lora_rank", "gated", "batch_size", "seq_len", "lr", "warmup",
               "schedule", "weight_decay", "grad_clip", "seed", "grad_accum", "main_kl_grad")
AT_LEAST_ONE = ("n_layer", "n_head", "n_kv_head", "n_embd", "batch_size", "grad_accum", "seq_len", "eval_every",
                "eval_batches", "save_every")
NOT_NEGATIVE = ("n_mtp_heads", "top_n", "prefix_loss", "lora_rank", "max_steps", "warmup",
                "weight_decay", "grad_clip")


class Parser(argparse.ArgumentParser):
    """argparse that raises ValueError instead of printing its usage: every expected error is one line (cli())."""

    def error(self, message):
        raise ValueError(message)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def make_parser():
    p = Parser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--config", help="JSON file of defaults for any of the options below (config/)")
    a = p.add_argument_group("what to train")
    a.add_argument("--mode", default="scratch", choices=["scratch", "heads", "extend", "mask_tokens"],
                   help="the recipe")
    a.add_argument("--init_from", default=None, help="starting model: smollm2, a Hugging Face folder (GPT-2, Llama, "
                   "Qwen2/2.5, Qwen3), a .gguf file (llama, qwen2, qwen3), or a checkpoint folder (scratch: none)")
    a.add_argument("--data", default="data/synthmath", help="a folder prepared by data/prepare.py")
    a.add_argument("--out", default="out/run", help="checkpoint folder")
    a.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out (its options "
                   "are the defaults)")
    a.add_argument("--overwrite", action="store_true", help="replace a train.py checkpoint in --out and an existing "
                   "--export file")
    a.add_argument("--export", default=None, help="also write the shippable file here (heads or mask adapter)")
    a.add_argument("--answers_only", action="store_true", help="restrict losses to answer tokens")
    m = p.add_argument_group("model from scratch")
    m.add_argument("--arch", default="llama", choices=["llama", "gpt2"], help="architecture family")
    m.add_argument("--n_layer", type=int, default=6, help="blocks")
    m.add_argument("--n_head", type=int, default=8, help="attention heads")
    m.add_argument("--n_kv_head", type=int, default=8, help="key/value heads (grouped-query attention)")
    m.add_argument("--n_embd", type=int, default=256, help="width")
    h = p.add_argument_group("MTP heads (Paper B)")
    h.add_argument("--n_mtp_heads", type=int, default=1, help="MTP heads to train (extend: heads to add)")
    h.add_argument("--head_init", default=None, choices=["last_block", "random"],
                   help="--mode heads only: a new head starts as a copy of the last block (the default) or random")
    h.add_argument("--head_taps", type=block_list, default=[],
                   help="--mode heads only: blocks (e.g. 2,15) whose outputs head 1 reads besides the last one's, "
                   "through a learned fusion trained with the heads (EAGLE-3); none: the last block's output alone")
    h.add_argument("--alpha", type=depth_weights, default=1.0,
                   help="weight of each head's cross-entropy; a comma list (1,0.5,0.5): per depth")
    h.add_argument("--beta", type=depth_weights, default=1.0,
                   help="weight of each head's KL to the main head (0: plain MTP; or per depth)")
    h.add_argument("--top_n", type=int, default=10000, help="KL over the main head's top-N logits (0: all)")
    h.add_argument("--kl_direction", default="forward", choices=["forward", "reverse"], help="forward: KL(main||head)")
    h.add_argument("--main_kl_grad", action="store_true",
                   help="--mode scratch only: the KL's gradient also reaches the main head "
                   "(Paper B's ablation; by default its target is detached)")
    k = p.add_argument_group("mask tokens (Paper A)")
    k.add_argument("--k_max", type=int, default=16, help="largest k (tokens per forward) trained")
    k.add_argument("--k_fixed", action="store_true", help="always k_max instead of a random k in [2, k_max]")
    k.add_argument("--target", default="hard", choices=["hard", "soft", "data"], help="teacher argmax, KL, or data")
    k.add_argument("--prefix_loss", type=float, default=0.0, help="weight of an extra next-token loss on real tokens")
    k.add_argument("--distinct_masks", action="store_true", help="k_max-1 distinct mask tokens instead of one")
    k.add_argument("--lora_rank", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    k.add_argument("--gated", action="store_true", help="LoRA active at mask tokens only")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch_size", type=int, default=32, help="sequences per micro-step and process")
    o.add_argument("--grad_accum", type=int, default=1, help="micro-steps per optimizer step (global batch: "
                   "batch_size x grad_accum x processes)")
    o.add_argument("--seq_len", type=int, default=256, help="tokens per sequence")
    o.add_argument("--max_steps", type=int, default=2000, help="optimizer steps (0: build, check, write nothing)")
    o.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    o.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    o.add_argument("--schedule", default="cosine", choices=["cosine", "constant"],
                   help=f"after warm-up (cosine decays to {LR_FLOOR:g} x --lr)")
    o.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    o.add_argument("--grad_clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    o.add_argument("--eval_every", type=int, default=250, help="validate every N steps")
    o.add_argument("--eval_batches", type=int, default=8, help="validation batches")
    o.add_argument("--val_prompts", default=None, help="heads/extend: a prompts file (data/chat_prompts_val.jsonl); "
                   "each evaluation also logs the heads' agreement with the model's own greedy answers to them")
    o.add_argument("--save_every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    o.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order")
    o.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    o.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="autocast dtype on the GPU; the CPU trains in float32")
    o.add_argument("--compile", action="store_true", help="torch.compile every block and head")
    o.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                   help="under torchrun: DDP (a full copy per GPU) or FSDP2 (weights and optimizer sharded by block)")
    o.add_argument("--peak_tflops", type=float, default=None, help="peak TFLOP/s of one accelerator for MFU "
                   f"(default: by GPU name, {', '.join(f'{k} {v}' for k, v in PEAK_TFLOPS.items())}; none on CPU)")
    return p


def block_list(text):
    """"2,15" -> [2, 15]."""
    try:
        return [int(t) for t in text.split(",")] if text else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block indices separated by commas, e.g. 2,15 (got {text!r})")


def depth_weights(text):
    """One weight for every depth ("0.5") or one per depth ("1,0.5,0.5"): a float or a list."""
    try:
        weights = [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or numbers separated by commas, "
                                         f"e.g. 1,0.5 (got {text!r})")
    return weights[0] if len(weights) == 1 else weights


def get_args(argv=None):
    """Options in order of precedence: the command line, then (with --resume) the run in --out, then --config, then
    the defaults. Every value is checked here, before anything loads."""
    p, pre = first_pass(argv)
    saved = None
    if pre.resume:
        saved = checkpoint_args(pre.out)
        if saved is None:
            raise ValueError(f"--resume: {pre.out} holds no train.py checkpoint to continue")
        known = option_names(p) - {"config", "resume", "overwrite"}
        p.set_defaults(**{key: value for key, value in saved.items() if key in known})
    args = p.parse_args(argv)
    check_args(args)
    if saved is not None:
        changed = [key for key in RUN_OPTIONS if key in saved and saved[key] != getattr(args, key)]
        if changed:
            key = changed[0]
            raise ValueError(f"--resume: the run in {args.out} has --{key} {saved[key]}, not {getattr(args, key)}; "
                             f"a different run needs another --out")
        step = saved["step"]
        if step > args.max_steps:       # e.g. a killed run resumed with less than it reached
            raise ValueError(f"--resume --max_steps {args.max_steps}: below step {step} of the "
                             f"checkpoint in {args.out}; give more than {step} to train further")
        if step == args.max_steps:
            done = "finished" if step == saved["max_steps"] else "stopped"
            raise ValueError(f"--resume: the run in {args.out} {done} at step {step}, which "
                             f"--max_steps {args.max_steps} already reaches; raise it to go on")
    check_out(args)
    return args


def first_pass(argv):
    """The parser with --config's defaults, and the options as known before --resume."""
    p = make_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.config:
        p.set_defaults(**read_config(pre.config, p))
        pre, _ = p.parse_known_args(argv)
    return p, pre


def option_names(parser):
    """Every option's name, from a parse of no arguments (no option is required)."""
    return set(vars(parser.parse_args([])))


def read_config(path, parser):
    try:
        with open(path) as f:
            defaults = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(defaults, dict):
        raise ValueError(f"{path}: expected a JSON object of option names and values")
    unknown = set(defaults) - option_names(parser)
    if unknown:
        raise ValueError(f"{path}: unknown options {sorted(unknown)}")
    return defaults


def count(n):
    """A parameter count for people: 135.0M, or the number itself below 0.1M."""
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"


def check_args(args):
    for key in AT_LEAST_ONE:
        if getattr(args, key) < 1:
            raise ValueError(f"--{key} {getattr(args, key)}: must be at least 1")
    for key in NOT_NEGATIVE:
        if getattr(args, key) < 0:
            raise ValueError(f"--{key} {getattr(args, key)}: must not be negative")
    for key, value in vars(args).items():     # float() takes "inf" and "nan", JSON Infinity and NaN
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{key} {value}: must be a finite number")
    for key in ("alpha", "beta"):     # a number, or one per depth (command line or config)
        value = getattr(args, key)
        weights = value if isinstance(value, list) else [value]
        if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
            raise ValueError(f"--{key} {value}: expected finite numbers")
        if min(weights) < 0:
            raise ValueError(f"--{key} {value}: must not be negative")
    for key in ("lr", "peak_tflops"):
        if getattr(args, key) is not None and not getattr(args, key) > 0:
            raise ValueError(f"--{key} {getattr(args, key)}: must be positive")
    if args.n_embd % args.n_head or args.n_head % args.n_kv_head:
        raise ValueError(f"--n_embd {args.n_embd}, --n_head {args.n_head}, --n_kv_head {args.n_kv_head}: the width "
                         f"must be a multiple of --n_head, and --n_head a multiple of --n_kv_head")
    if (args.mode == "scratch") == bool(args.init_from):
        raise ValueError("--mode scratch starts from nothing: drop --init_from" if args.init_from else
                         f"--mode {args.mode} needs --init_from (a pretrained model or checkpoint)")
    if args.mode in ("heads", "extend") and args.n_mtp_heads < 1:
        raise ValueError(f"--n_mtp_heads {args.n_mtp_heads}: --mode {args.mode} trains at least one head")
    if args.head_init and args.mode != "heads":
        raise ValueError(f"--head_init applies to --mode heads only (scratch heads start random, extend copies "
                         f"the trained heads); drop it for --mode {args.mode}")
    if args.head_taps and args.mode != "heads":
        raise ValueError(f"--head_taps applies to --mode heads only (head 1 is trained there); drop it for --mode "
                         f"{args.mode}")
    taps = args.head_taps
    if not (isinstance(taps, list) and all(type(t) is int and t >= 0 for t in taps) and taps == sorted(set(taps))):
        raise ValueError(f"--head_taps {taps}: expected increasing block indices, at least 0 (e.g. 2,15)")
    if args.k_max < 2:
        raise ValueError(f"--k_max {args.k_max}: must be at least 2 (one real token and one mask)")
    if args.mode == "mask_tokens" and args.seq_len < args.k_max:
        raise ValueError(f"--seq_len {args.seq_len}: mask mode needs at least --k_max {args.k_max} tokens")
    if args.gated and not args.lora_rank:
        raise ValueError("--gated gates LoRA adapters: give --lora_rank too")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise ValueError(f"--device {args.device}: expected cpu, cuda or cuda:N")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here (use --device cpu)")
    if args.main_kl_grad and args.mode != "scratch":
        raise ValueError(f"--main_kl_grad: only --mode scratch trains the main head; drop it for "
                         f"--mode {args.mode}")
    if args.val_prompts and args.mode not in ("heads", "extend"):
        raise ValueError(f"--val_prompts scores MTP heads on a frozen model: --mode heads or extend, not {args.mode}")
    if args.val_prompts and not os.path.isfile(args.val_prompts):
        raise ValueError(f"--val_prompts {args.val_prompts}: no such file")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: choose one")


# ----------------------------------------------------------------------------------------------------------------
# the output folder: what train.py may replace

def checkpoint_args(folder):
    """The options and step of the train.py checkpoint in folder ({**train_args, "step": N}), None if it is none."""
    recover_checkpoint(folder)       # as every reader does: a crashed swap left it in .NAME.old
    try:
        with open(os.path.join(folder, "config.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if not (isinstance(meta, dict) and meta.get("format") == "nanomtp" and "train_args" in meta and "step" in meta):
        return None
    return {**meta["train_args"], "step": meta["step"]}


def written_by_checkpoint(name):
    """A file save_checkpoint writes (model, config, training state, the tokenizer's files)."""
    return name in ("config.json", "model.safetensors", "train_state.pt") or name.startswith("tokenizer")


def check_out(args):
    """Refuse an --out or --export that this run must not replace. Files train.py did not write: always. A train.py
    checkpoint: unless --resume continues it or --overwrite replaces it. An existing --export file: unless
    --overwrite. The checkpoint swap then only ever removes a checkpoint folder holding nothing else."""
    out = args.out
    recover_checkpoint(out)          # a save interrupted between its two renames left the checkpoint aside
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: a file, not a checkpoint folder")
    names = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if names:
        saved = checkpoint_args(out)
        foreign = names if saved is None else [n for n in names if not written_by_checkpoint(n)]
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ValueError(f"--out {out}: holds files train.py did not write ({shown}); it never replaces them, "
                             f"choose another --out")
        if not (args.resume or args.overwrite):
            raise ValueError(f"--out {out}: holds a checkpoint (step {saved['step']} of {saved['max_steps']}, "
                             f"--mode {saved['mode']}); --resume continues it, --overwrite replaces it")
    if args.export:
        inside = os.path.commonpath([os.path.abspath(args.export), os.path.abspath(out)]) == os.path.abspath(out)
        if inside:
            raise ValueError(f"--export {args.export}: inside --out {out}, which every checkpoint replaces")
        if os.path.exists(args.export) and not args.overwrite:
            raise ValueError(f"--export {args.export}: exists; --overwrite replaces it")


# ----------------------------------------------------------------------------------------------------------------
# building the model for each mode

def build(args, tokenizer):
    """The model to train, the teacher (mask mode; None otherwise) and the tokenizer (grown by mask tokens)."""
    if args.mode == "scratch":
        cfg = Config(arch=args.arch, vocab_size=tokenizer.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                     n_kv_head=args.n_kv_head, n_embd=args.n_embd, head_dim=args.n_embd // args.n_head,
                     intermediate_size=4 * args.n_embd if args.arch == "gpt2" else 8 * args.n_embd // 3,
                     max_seq_len=max(1024, args.seq_len + 1), bias=args.arch == "gpt2")
        model = Transformer(cfg)
        model.apply(_init_weights)
        model.add_heads(args.n_mtp_heads, init="random")
        return model, None, tokenizer
    model, tokenizer = load(args.init_from)            # the data's tokenizer is checked against this one in main()
    if args.mode == "heads":
        if len(model.heads):
            raise ValueError(f"{args.init_from} already has {plural(len(model.heads), 'head')}: use --mode extend")
        if args.head_taps:
            model.add_fusion(args.head_taps)
        model.add_heads(args.n_mtp_heads, init=args.head_init or "last_block")
    elif args.mode == "extend":
        m = len(model.heads)
        if m == 0:
            raise ValueError(f"{args.init_from} has no MTP heads to extend: train some with --mode heads first")
        for i in range(args.n_mtp_heads):       # looped extension: new head m+i starts as a copy of head i mod m
            model.add_heads(1)
            model.heads[-1].load_state_dict(model.heads[i % m].state_dict())
    else:  # mask
        teacher = None if args.lora_rank and args.gated else copy.deepcopy(model).eval().requires_grad_(False)
        names = mask_token_names(args.k_max - 1 if args.distinct_masks else 1)
        ids = model.add_mask_tokens(len(names))
        for name, i in zip(names, ids):     # the model's ids: beyond a padded embedding's rows too (Qwen's)
            tokenizer.add_special(name, i)
        if args.lora_rank:
            model.add_lora(args.lora_rank, args.gated)
        return model, teacher, tokenizer
    return model, None, tokenizer


def _init_weights(module):
    if isinstance(module, torch.nn.Linear):
        torch.nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)
    elif isinstance(module, torch.nn.Embedding):
        torch.nn.init.normal_(module.weight, std=0.02)


def set_trainable(model, args):
    """Freeze what the recipe keeps fixed: the backbone for heads/extend, the old heads (and the fusion that feeds
    head 1) for extend, everything but the adapters and the embedding for LoRA (whose rows of real tokens
    keep_mask_rows then leaves unchanged)."""
    model.requires_grad_(args.mode == "scratch" or (args.mode == "mask_tokens" and not args.lora_rank))
    if args.mode in ("heads", "extend"):
        model.heads[len(model.heads) - args.n_mtp_heads:].requires_grad_(True)
    if args.mode == "heads" and model.fuse is not None:
        model.fuse.requires_grad_(True)
    if args.mode == "mask_tokens" and args.lora_rank:
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        model.embed.weight.requires_grad_(True)


def keep_mask_rows(model):
    """With LoRA, only the mask tokens' embedding rows train: zero the gradient of every other row. Done after the
    backward pass, on the gradient as it is: a full tensor, or FSDP's shard of rows (a DTensor)."""
    grad = model.embed.weight.grad
    keep = (torch.arange(grad.size(0), device=grad.device) >= model.cfg.mask_token_ids[0]).to(grad.dtype)[:, None]
    if isinstance(grad, DTensor):
        keep = DTensor.from_local(keep, grad.device_mesh, [Replicate()] * grad.device_mesh.ndim, run_check=False)
    grad.mul_(keep)


def make_optimizer(model, args):
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and p is not model.embed.weight]
    rest = [p for p in params if not (p.dim() >= 2 and p is not model.embed.weight)]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    fused = args.device.startswith("cuda") and args.parallel != "fsdp"   # FSDP's sharded parameters: foreach
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=fused)


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule == "constant":
        return args.lr
    progress = (step - args.warmup) / max(1, args.max_steps - args.warmup)
    return args.lr * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ----------------------------------------------------------------------------------------------------------------
# one batch -> loss

class Objective(torch.nn.Module):
    """The model with its training loss as forward(): the unit DDP and FSDP wrap, so that every parameter the loss
    touches (blocks, heads, the shared embedding and output head) is used inside the wrapper's forward. The frozen
    teacher is an argument, not a submodule: it is neither wrapped for gradients nor all-reduced."""

    def __init__(self, model, args):
        super().__init__()
        self.model = model
        self.args = args

    def forward(self, idx, loss_weight, teacher, generator, answers_only=False):
        return loss_fn(self.model, teacher, idx, loss_weight, self.args, generator, answers_only)


def loss_fn(model, teacher, idx, loss_weight, args, generator, answers_only=False):
    """Loss and metrics of one batch of windows idx (B, T+1) with their loss mask (used with --answers_only, or
    when answers_only is set here)."""
    loss_weight = loss_weight if args.answers_only or answers_only else None
    if args.mode != "mask_tokens":
        cfg = distill.MTPLossConfig(args.alpha, args.beta, args.top_n or None, args.kl_direction,
                                    main_loss=args.mode == "scratch",
                                    detach_main=not args.main_kl_grad)
        return distill.mtp_loss(model, idx, loss_weight, cfg)
    k = args.k_max if args.k_fixed else int(torch.randint(2, args.k_max + 1, (), generator=generator))
    packed = distill.pack_batch(idx, k, n_regions(args), model.cfg.mask_token_ids, generator)
    cfg = distill.StudentForcedConfig(args.target, args.prefix_loss)
    loss, metrics = distill.student_forced_loss(model, teacher or model, *packed, cfg=cfg,
                                                n_real_vocab=model.cfg.mask_token_ids[0],
                                                loss_weight=loss_weight)
    metrics["k"] = k
    return loss, metrics


def n_regions(args):
    return max(1, (args.seq_len + 1) // (2 * args.k_max))           # Paper A: N / (2 k_max) regions


@torch.no_grad()
def prompt_answers(model, tokenizer, path, device):
    """The frozen model's greedy answers to the prompts in `path` (heads and extend never change them), as one
    right-padded batch: token ids (B, T) and a loss mask over the answers. On the model's own greedy text, a head's
    agreement with the main head at depth d is what decoding accepts there: prompts written like a user's choose the
    step count, not the training distribution (issue 12)."""
    prompts = [encode_prompt(tokenizer, row["prompt"]) for row in read_prompts(path)]
    answers = generate(model, prompts, VAL_ANSWER_TOKENS, stop_ids=tokenizer.stop_ids)
    T = max(len(p) + len(a) for p, a in zip(prompts, answers))
    idx = torch.zeros(len(prompts), T, dtype=torch.long)
    loss_weight = torch.zeros(len(prompts), T)
    for b, (p, a) in enumerate(zip(prompts, answers)):
        idx[b, :len(p) + len(a)] = torch.tensor(p + a)
        loss_weight[b, len(p):len(p) + len(a)] = 1
    return idx.to(device), loss_weight.to(device)


@torch.no_grad()
def evaluate(objective, teacher, data, args, par, autocast, prompt_batch=None):
    """Validation loss and metrics on the same batches every time, drawn and split like training batches (so any
    split of the global batch over processes and micro-steps sees the same windows), averaged over ranks; with a
    prompt_batch (prompt_answers), the heads' agreement on it too, as "prompts_agree{d}"."""
    objective.eval()
    g = torch.Generator().manual_seed(EVAL_SEED)
    totals = {}
    for _ in range(args.eval_batches):
        idx, loss_weight = data.get_batch("val", args.batch_size * args.grad_accum, args.seq_len, g, args.device,
                                        shard=(par.rank, par.world_size))
        for x, m in zip(idx.chunk(args.grad_accum), loss_weight.chunk(args.grad_accum)):
            with autocast:
                loss, metrics = objective(x, m, teacher, g)
            for key, v in {"loss": loss.item(), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + v / (args.eval_batches * args.grad_accum)
    if prompt_batch is not None:            # every rank scores the same batch: the average is its value
        with autocast:
            _, metrics = objective(*prompt_batch, teacher, g, answers_only=True)
        totals.update({f"prompts_{k}": v for k, v in metrics.items() if k.startswith("agree")})
    if isinstance(objective, FSDPModule):   # a root left unsharded after a forward alone holds other parameters
        objective.reshard()                 # than the optimizer's
    objective.train()
    return par.average(totals)


# ----------------------------------------------------------------------------------------------------------------
# several processes (torchrun): DDP or FSDP2

class Parallel:
    """This process's place in a torchrun job (rank, world size, mode) and the few collective steps training needs.
    Without torchrun: rank 0 of 1, and every method is the identity."""

    def __init__(self, args):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.mode = args.parallel if self.world_size > 1 else "none"
        self.started_group = self.world_size > 1 and not dist.is_initialized()
        if self.started_group:
            dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")

    def wrap(self, objective, teacher):
        """The module the training step calls. DDP all-reduces the gradients of trained parameters only; FSDP2
        shards each block and head (and the teacher, which it only runs forward)."""
        if self.mode == "ddp":
            return DDP(objective)
        if self.mode == "fsdp":
            for model in (objective.model, teacher):
                if model is not None:
                    for unit in (*model.blocks, *model.heads):
                        fully_shard(unit)
            fully_shard(objective)          # the root: embeddings, final norm and output head
            if teacher is not None:
                fully_shard(teacher)
        return objective

    def gradient_sync(self, wrapped, on):
        """Context of one micro-step's backward: gradients are averaged over ranks on the last micro-step only."""
        if self.mode == "fsdp":
            wrapped.set_requires_gradient_sync(on)
        if self.mode == "ddp" and not on:
            return wrapped.no_sync()
        return nullcontext()

    def average(self, metrics):
        """Each metric averaged over the ranks that report it (keys can differ: mask mode's k is per rank)."""
        if self.world_size == 1:
            return metrics
        every = [None] * self.world_size
        dist.all_gather_object(every, metrics)
        keys = dict.fromkeys(key for m in every for key in m)
        return {key: sum(m[key] for m in every if key in m) / sum(key in m for m in every) for key in keys}

    def gather(self, value):
        """value from every rank, as a list on every rank."""
        if self.world_size == 1:
            return [value]
        every = [None] * self.world_size
        dist.all_gather_object(every, value)
        return every

    def full_model(self, model):
        """The model unsharded on the CPU for saving: itself unless FSDP shards it; then a gathered copy on rank 0
        (None elsewhere). Every rank must call it: gathering is collective."""
        if self.mode != "fsdp":
            return model
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank:
            return None
        with torch.device("meta"):
            full = Transformer(copy.deepcopy(model.cfg))
        full.load_state_dict(state, assign=True)
        if full.cfg.tie_embeddings:
            full.lm_head.weight = full.embed.weight
        return full

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def close(self):
        if self.started_group:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# training speed: FLOPs per token (the one formula), tokens/s, MFU

def flops_per_token(model, args):
    """Training FLOPs per window token of one step (PaLM's estimate, counted by part), the numerator of MFU.

    A part with P matrix weights costs 2P FLOPs per token forward, and attention adds 4 T n_head head_dim per layer
    (scores and weighted values over a window of T). Backward costs twice the forward where the part trains
    (gradients of inputs and of weights), once where it is frozen but gradients pass through it to trained parts
    before it, nothing where nothing before it trains. So a part counts 3x, 2x or 1x its forward:
      scratch        3 (backbone + output head) + sum over heads 3 (head + output head)
      heads/extend   1 (backbone + output head) + sum over heads: trained 3 head + 2 output head, frozen 1 (both)
                     + the fusion feeding head 1 (--head_taps): trained 2 (no input gradient: nothing before it
                     trains), frozen 1
      mask           3 (full fine-tuning) or 2 (LoRA) x (backbone + output head) + 1 x the same for the teacher
                     (not with --target data), on the packed sequence: T + regions x (mean k - 1) positions."""
    cfg, T = model.cfg, args.seq_len
    attention = 4 * T * cfg.n_head * cfg.head_dim

    def forward(blocks):
        return sum(2 * p.numel() for b in blocks for p in b.parameters() if p.dim() >= 2) + attention * len(blocks)

    backbone, out_head = forward(model.blocks), 2 * cfg.n_embd * cfg.vocab_size
    if args.mode == "mask_tokens":
        student = (2 if args.lora_rank else 3) * (backbone + out_head)
        teacher = 0 if args.target == "data" else backbone + out_head
        mean_k = args.k_max if args.k_fixed else (2 + args.k_max) / 2
        return (student + teacher) * (T + n_regions(args) * (mean_k - 1)) / T
    main = (3 if args.mode == "scratch" else 1) * (backbone + out_head)
    fusion = 0 if model.fuse is None else (2 if model.fuse.weight.requires_grad else 1) * 2 * model.fuse.weight.numel()
    heads = 0
    for head in model.heads:
        trained = any(p.requires_grad for p in head.parameters())
        heads += 3 * forward([head]) + (3 if args.mode == "scratch" else 2) * out_head if trained else \
            forward([head]) + out_head
    return main + fusion + heads


def peak_flops(args):
    """The accelerator's peak dense bf16 FLOP/s for MFU: --peak_tflops, else from the GPU's name; None if unknown."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if not args.device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(args.device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS.items() if key in name), None)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: save, resume, export

def save(args, par, model, tokenizer, optimizer, step, data_rng, loss_rng):
    """Model, tokenizer and everything a resumed run needs to continue the same loss curve, in one atomic write by
    rank 0. Full (unsharded) state dicts of model and optimizer, whatever the parallel mode."""
    optimizer_state = get_optimizer_state_dict(model, optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    loss_rngs = par.gather(loss_rng.get_state())
    full = par.full_model(model)
    if par.rank == 0:
        state = {"optimizer": optimizer_state, "step": step, "world_size": par.world_size,
                 "torch_rng": torch.get_rng_state(), "data_rng": data_rng.get_state(), "loss_rng": loss_rngs}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state()
        save_checkpoint(args.out, full, tokenizer, extra={"train_args": vars(args), "step": step}, train_state=state)
    par.barrier()                                  # no rank goes on before the checkpoint is complete


def resume(args, par):
    """Model, teacher (mask mode) and tokenizer of the checkpoint in --out, and its training state."""
    model, tokenizer = load(args.out)
    path = os.path.join(args.out, "train_state.pt")
    try:
        state = torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: unreadable, the training state is damaged ({str(e).splitlines()[0]})") from e
    if state.get("world_size", 1) != par.world_size:
        raise ValueError(f"{path}: written by {plural(state.get('world_size', 1), 'process')}, resumed by "
                         f"{par.world_size}; resume with the same number (torchrun --nproc_per_node "
                         f"{state.get('world_size', 1)}): each rank continues its own random stream")
    teacher = None
    if args.mode == "mask_tokens" and not (args.lora_rank and args.gated):
        teacher = load(args.init_from)[0].eval().requires_grad_(False)
    return model, teacher, tokenizer, state


def restore(state, par, model, optimizer, data_rng, loss_rng):
    """Put the optimizer and every random number generator back where the checkpoint left them; returns the step."""
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(state["torch_rng"])
    data_rng.set_state(state["data_rng"])
    loss_rng.set_state(state["loss_rng"][par.rank])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    return state["step"]


def export(args, model, data):
    """The small file that ships: the mask-token adapter, or the heads this run trained."""
    os.makedirs(os.path.dirname(os.path.abspath(args.export)), exist_ok=True)
    if args.mode == "mask_tokens":
        save_mask_adapter(args.export, model, meta={"k_max": args.k_max})
    else:
        first = len(model.heads) - args.n_mtp_heads if args.mode == "extend" else 0
        save_heads(args.export, model, draft_vocab=data_frequencies(data), first=first)
    print(f"exported {args.export} ({os.path.getsize(args.export) / 1e6:.1f} MB)")


def data_frequencies(data):
    """Token ids of the training data by falling frequency: the draft vocabulary (EAGLE-3, FastMTP)."""
    counts = np.bincount(np.asarray(data.tokens("train")), minlength=1)
    order = np.argsort(-counts, kind="stable")
    return torch.from_numpy(order[:min(DRAFT_VOCAB_SAVED, int((counts > 0).sum()))].astype(np.int64))


# ----------------------------------------------------------------------------------------------------------------
# the training loop

def main(argv=None):
    with run_lock(first_pass(argv)[1].out):     # before anything reads --out: a swap may be on
        args = get_args(argv)
        par = Parallel(args)
        try:
            return train(args, par)
        finally:
            par.close()


@contextmanager
def run_lock(out):
    """One train.py run at a time on --out: an exclusive flock on OUT.lock beside it, held by rank 0
    (which alone writes) for the whole run. The kernel drops a flock when its process ends, so a
    crashed run's file is stale, never held. The file is removed while still locked; a run that
    locked a removed file tries again."""
    if int(os.environ.get("RANK", "0")):
        yield
        return
    path = out.rstrip("/") + ".lock"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 20).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"--out {out}: in use by another train.py run (pid {holder}, {path}); "
                             f"wait for it to end or choose another --out") from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        os.unlink(path)
        os.close(fd)


def train(args, par):
    if args.device.startswith("cuda") and par.world_size > 1:     # one GPU per process, whatever index was given
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if args.device.startswith("cuda:"):          # "cuda" alone means the current device
        torch.cuda.set_device(args.device)
    log = print if par.rank == 0 else lambda *a, **k: None
    torch.manual_seed(args.seed)                 # the same initial weights on every rank
    data = TokenData(args.data)
    if args.resume:
        model, teacher, tokenizer, state = resume(args, par)
    else:
        model, teacher, tokenizer = build(args, load_tokenizer(os.path.join(args.data, "tokenizer")))
        state = None
    set_trainable(model, args)
    check_tokenizer(data.meta, tokenizer, args.data)
    for key in ("alpha", "beta"):     # extend's depth count is known only now: the heads it adds to
        weights = getattr(args, key)
        if isinstance(weights, list) and len(weights) != len(model.heads):
            shown = ",".join(f"{w:g}" for w in weights)
            raise ValueError(f"--{key} {shown}: {len(weights)} weights for "
                             f"{plural(len(model.heads), 'MTP head')}: one per depth, or one")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fused = "" if model.fuse is None else f" (head 1 reads blocks {model.cfg.head_taps} and the last, fused)"
    log(f"mode {args.mode}: {count(model.num_params())} parameters, {count(trainable)} trained, "
        f"{plural(len(model.heads), 'MTP head')}{fused}, data {args.data} ({len(data.tokens('train')):,} training "
        f"tokens)")
    if args.max_steps == 0:
        log("--max_steps 0: model and data checked; nothing trained, saved or exported")
        return model
    sequences = args.batch_size * args.grad_accum * par.world_size
    log(f"parallel: {par.mode}, world size {par.world_size}; global batch {args.batch_size} x {args.grad_accum} x "
        f"{par.world_size} = {plural(sequences, 'sequence')}, {sequences * args.seq_len} tokens per step")
    flops = flops_per_token(model, args) * sequences * args.seq_len       # per optimizer step, all ranks
    peak = peak_flops(args)
    model.to(args.device)
    if teacher is not None:
        teacher.to(args.device)
    if args.compile:
        for unit in (*model.blocks, *model.heads):
            unit.compile()
    prompt_batch = prompt_answers(model, tokenizer, args.val_prompts, args.device) if args.val_prompts else None
    objective = Objective(model, args)
    wrapped = par.wrap(objective, teacher)
    optimizer = make_optimizer(model, args)
    data_rng = torch.Generator().manual_seed(args.seed)                   # shared: ranks read shards of one draw
    loss_rng = torch.Generator().manual_seed(args.seed + 1 + par.rank)    # per rank: its own k and regions
    step = 0 if state is None else restore(state, par, model, optimizer, data_rng, loss_rng)
    on_gpu = args.device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=getattr(torch, args.dtype)) if on_gpu else nullcontext()
    if par.rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        log_file = open(args.out.rstrip("/") + ".log.jsonl", "a")  # beside the checkpoint: survives its replacement
        log_file.write(json.dumps({"run": "resume" if args.resume else "start", "step": step,
                                   "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "args": vars(args)}) + "\n")
    objective.train()
    bar = tqdm(range(step, args.max_steps), initial=step, total=args.max_steps, dynamic_ncols=True,
               disable=par.rank != 0)
    t0 = time.time()
    for step in bar:
        t_step = time.time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        idx, loss_weight = data.get_batch("train", args.batch_size * args.grad_accum, args.seq_len, data_rng,
                                        args.device, shard=(par.rank, par.world_size))
        totals = {}
        for micro, (x, m) in enumerate(zip(idx.chunk(args.grad_accum), loss_weight.chunk(args.grad_accum))):
            with par.gradient_sync(wrapped, on=micro == args.grad_accum - 1):
                with autocast:
                    loss, metrics = wrapped(x, m, teacher, loss_rng)
                (loss / args.grad_accum).backward()
            for key, v in {"loss": loss.item(), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + v / args.grad_accum
        if args.mode == "mask_tokens" and args.lora_rank:
            keep_mask_rows(model)
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        totals = par.average(totals)        # a non-finite loss on any rank makes it non-finite here
        if not math.isfinite(totals["loss"]):
            kept = checkpoint_args(args.out)
            last = f"{args.out} keeps step {kept['step']}" if kept else "no checkpoint was written"
            raise ValueError(f"step {step + 1}: the loss is {totals['loss']}; stopped before "
                             f"saving these weights ({last}): lower --lr or raise --warmup")
        seconds = time.time() - t_step
        record = {"step": step + 1, **totals, "time": time.time() - t0,
                  "tokens_per_s": sequences * args.seq_len / seconds}
        if peak:
            record["mfu"] = flops / seconds / (peak * par.world_size)
        shown = {k: f"{v:.3f}" if k == "loss" else f"{v:.2f}" for k, v in totals.items()
                 if k == "loss" or k.startswith(("acc", "agree", "k"))}
        shown["tok/s"] = f"{record['tokens_per_s']:,.0f}"
        if peak:
            shown["mfu"] = f"{record['mfu']:.1%}"
        bar.set_postfix(shown)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.max_steps:
            record["val"] = evaluate(objective, teacher, data, args, par, autocast, prompt_batch)
            if par.rank == 0:
                tqdm.write(f"step {step + 1}: val " + " ".join(f"{k} {v:.3f}" for k, v in record["val"].items()))
        if par.rank == 0:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if (step + 1) % args.save_every == 0 or step + 1 == args.max_steps:
            save(args, par, model, tokenizer, optimizer, step + 1, data_rng, loss_rng)
    if par.rank == 0:
        log_file.close()
    if args.export:
        full = par.full_model(model)
        if par.rank == 0:
            export(args, full, data)
        par.barrier()
    return model


def cli(argv=None):
    """main() with expected errors (bad options, missing or malformed files) as one line on stderr, status 2."""
    try:
        main(argv)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
