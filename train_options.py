"""
train.py's options: the parser, --config presets, every check that runs before anything loads, and
what --out may hold.

- `get_args(argv, description)`: the command line, over --resume's saved run, over --config, over
  the defaults; every value checked.
- `check_out`: an existing --out is replaced or continued only when it is a train.py checkpoint and
  --overwrite or --resume says so; a folder holding any file train.py did not write is never
  touched.
What is not here: training itself (train.py).
"""

import argparse
import json
import math
import os

import torch

from artefacts import recover_checkpoint
from parallel import PEAK_TFLOPS

LR_FLOOR = 0.1             # the cosine schedule decays to this fraction of the peak learning rate
VAL_DECODE_PROMPTS = 8    # mask_tokens: --val_prompts decoded at each evaluation (a cheap curve)

# What defines a run: --resume continues only with the checkpoint's own values of these.
RUN_OPTIONS = ("mode", "init_from", "answers_only", "arch", "n_layer", "n_head", "n_kv_head",
               "n_embd", "n_mtp_heads", "head_init", "head_taps", "alpha", "beta", "top_n",
               "kl_direction", "k_max", "k_fixed", "target", "prefix_loss", "distinct_masks",
               "lora_rank", "gated", "batch_size", "seq_len", "lr", "warmup", "schedule",
               "weight_decay", "grad_clip", "seed", "grad_accum", "main_kl_grad")
AT_LEAST_ONE = ("n_layer", "n_head", "n_kv_head", "n_embd", "batch_size", "grad_accum", "seq_len",
                "eval_every", "eval_batches", "save_every")
NOT_NEGATIVE = ("n_mtp_heads", "top_n", "prefix_loss", "lora_rank", "max_steps", "warmup",
                "weight_decay", "grad_clip")


class Parser(argparse.ArgumentParser):
    """argparse that raises ValueError instead of printing its usage: every expected error is one
    line (train.cli)."""

    def error(self, message):
        raise ValueError(message)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description (train.py's docstring) as written, and every option's default."""


def make_parser(description=None):
    p = Parser(description=description, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--config", help="JSON file of defaults for any of the options below (config/)")
    a = p.add_argument_group("what to train")
    a.add_argument("--mode", default="scratch",
                   choices=["scratch", "heads", "extend", "mask_tokens"], help="the recipe")
    a.add_argument("--init_from", default=None,
                   help="starting model: smollm2, a Hugging Face folder (GPT-2, Llama, Qwen2/2.5, "
                   "Qwen3), a .gguf file (llama, qwen2, qwen3), or a checkpoint folder (scratch: "
                   "none)")
    a.add_argument("--data", default="data/synthmath", help="a folder prepared by data/prepare.py")
    a.add_argument("--out", default="out/run", help="checkpoint folder")
    a.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint is in --out (its options are the "
                   "defaults)")
    a.add_argument("--overwrite", action="store_true",
                   help="replace a train.py checkpoint in --out and an existing --export file")
    a.add_argument("--export", default=None,
                   help="also write the shippable file here (heads or mask adapter)")
    a.add_argument("--answers_only", action="store_true", help="restrict losses to answer tokens")
    m = p.add_argument_group("model from scratch")
    m.add_argument("--arch", default="llama", choices=["llama", "gpt2"], help="architecture family")
    m.add_argument("--n_layer", type=int, default=6, help="blocks")
    m.add_argument("--n_head", type=int, default=8, help="attention heads")
    m.add_argument("--n_kv_head", type=int, default=8,
                   help="key/value heads (grouped-query attention)")
    m.add_argument("--n_embd", type=int, default=256, help="width")
    h = p.add_argument_group("MTP heads (Paper B)")
    h.add_argument("--n_mtp_heads", type=int, default=1,
                   help="MTP heads to train (extend: heads to add)")
    h.add_argument("--head_init", default=None, choices=["last_block", "random"],
                   help="--mode heads only: a new head starts as a copy of the last block (the "
                   "default) or random")
    h.add_argument("--head_taps", type=block_list, default=[],
                   help="--mode heads only: blocks (e.g. 2,15) whose outputs head 1 reads besides "
                   "the last one's, through a learned fusion trained with the heads (EAGLE-3); "
                   "none: the last block's output alone")
    h.add_argument("--alpha", type=depth_weights, default=1.0,
                   help="weight of each head's cross-entropy; a comma list (1,0.5,0.5): per depth")
    h.add_argument("--beta", type=depth_weights, default=1.0,
                   help="weight of each head's KL to the main head (0: plain MTP; or per depth)")
    h.add_argument("--top_n", type=int, default=10000,
                   help="KL over the main head's top-N logits (0: all)")
    h.add_argument("--kl_direction", default="forward", choices=["forward", "reverse"],
                   help="forward: KL(main||head)")
    h.add_argument("--main_kl_grad", action="store_true",
                   help="--mode scratch only: the KL's gradient also reaches the main head "
                   "(Paper B's ablation; by default its target is detached)")
    k = p.add_argument_group("mask tokens (Paper A)")
    k.add_argument("--k_max", type=int, default=16, help="largest k (tokens per forward) trained")
    k.add_argument("--k_fixed", action="store_true",
                   help="always k_max instead of a random k in [2, k_max]")
    k.add_argument("--target", default="hard", choices=["hard", "soft", "data"],
                   help="teacher argmax, KL, or data")
    k.add_argument("--prefix_loss", type=float, default=0.0,
                   help="weight of an extra next-token loss on real tokens")
    k.add_argument("--distinct_masks", action="store_true",
                   help="k_max-1 distinct mask tokens instead of one")
    k.add_argument("--lora_rank", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    k.add_argument("--gated", action="store_true", help="LoRA active at mask tokens only")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch_size", type=int, default=32,
                   help="sequences per micro-step and process")
    o.add_argument("--grad_accum", type=int, default=1,
                   help="micro-steps per optimizer step (global batch: batch_size x grad_accum x "
                   "processes)")
    o.add_argument("--seq_len", type=int, default=256, help="tokens per sequence")
    o.add_argument("--max_steps", type=int, default=2000,
                   help="optimizer steps (0: build, check, write nothing)")
    o.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    o.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    o.add_argument("--schedule", default="cosine", choices=["cosine", "constant"],
                   help=f"after warm-up (cosine decays to {LR_FLOOR:g} x --lr)")
    o.add_argument("--weight_decay", type=float, default=0.1,
                   help="AdamW weight decay (matrices only)")
    o.add_argument("--grad_clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    o.add_argument("--eval_every", type=int, default=250, help="validate every N steps")
    o.add_argument("--eval_batches", type=int, default=8, help="validation batches")
    o.add_argument("--val_prompts", default=None,
                   help="a prompts file (data/chat_prompts_val.jsonl); heads/extend: each"
                   " evaluation also logs the heads' agreement with the model's own greedy answers;"
                   f" mask_tokens: each evaluation decodes its first {VAL_DECODE_PROMPTS} with "
                   "confadapt@--val_tau and logs tokens per forward, and accuracy (numeric answers)"
                   " or exact agreement with the original model's greedy answers")
    o.add_argument("--val_tau", type=float, default=0.9,
                   help="mask_tokens with --val_prompts: the confadapt threshold it decodes with")
    o.add_argument("--save_every", type=int, default=1000,
                   help="checkpoint every N steps (and at the end)")
    o.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order")
    o.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N")
    o.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="autocast dtype on the GPU; the CPU trains in float32")
    o.add_argument("--compile", action="store_true", help="torch.compile every block and head")
    o.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                   help="under torchrun: DDP (a full copy per GPU) or FSDP2 (weights and optimizer "
                   "sharded by block)")
    o.add_argument("--peak_tflops", type=float, default=None,
                   help="peak TFLOP/s of one accelerator for MFU (default: by GPU name, "
                   f"{', '.join(f'{k} {v}' for k, v in PEAK_TFLOPS.items())}; none on CPU)")
    return p


def block_list(text):
    """"2,15" -> [2, 15]."""
    try:
        return [int(t) for t in text.split(",")] if text else []
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected block indices separated by commas, e.g. 2,15 (got {text!r})")


def depth_weights(text):
    """One weight for every depth ("0.5") or one per depth ("1,0.5,0.5"): a float or a list."""
    try:
        weights = [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or numbers separated by commas, "
                                         f"e.g. 1,0.5 (got {text!r})")
    return weights[0] if len(weights) == 1 else weights


def get_args(argv=None, description=None):
    """Options in order of precedence: the command line, then (with --resume) the run in --out,
    then --config, then the defaults. Every value is checked here, before anything loads."""
    p, pre = first_pass(argv, description)
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
            raise ValueError(f"--resume: the run in {args.out} has --{key} {saved[key]}, "
                             f"not {getattr(args, key)}; a different run needs another --out")
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


def first_pass(argv, description=None):
    """The parser with --config's defaults, and the options as known before --resume."""
    p = make_parser(description)
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
        raise ValueError(f"--n_embd {args.n_embd}, --n_head {args.n_head}, --n_kv_head "
                         f"{args.n_kv_head}: the width must be a multiple of --n_head, and "
                         f"--n_head a multiple of --n_kv_head")
    if (args.mode == "scratch") == bool(args.init_from):
        raise ValueError("--mode scratch starts from nothing: drop --init_from" if args.init_from
                         else f"--mode {args.mode} needs --init_from (a pretrained model or "
                         f"checkpoint)")
    if args.mode in ("heads", "extend") and args.n_mtp_heads < 1:
        raise ValueError(f"--n_mtp_heads {args.n_mtp_heads}: --mode {args.mode} trains at least "
                         f"one head")
    if args.head_init and args.mode != "heads":
        raise ValueError(f"--head_init applies to --mode heads only (scratch heads start random, "
                         f"extend copies the trained heads); drop it for --mode {args.mode}")
    if args.head_taps and args.mode != "heads":
        raise ValueError(f"--head_taps applies to --mode heads only (head 1 is trained there); "
                         f"drop it for --mode {args.mode}")
    taps = args.head_taps
    if not (isinstance(taps, list) and all(type(t) is int and t >= 0 for t in taps)
            and taps == sorted(set(taps))):
        raise ValueError(f"--head_taps {taps}: expected increasing block indices, at least 0 "
                         f"(e.g. 2,15)")
    if args.k_max < 2:
        raise ValueError(f"--k_max {args.k_max}: must be at least 2 (one real token and one mask)")
    if args.mode == "mask_tokens" and args.seq_len < args.k_max:
        raise ValueError(f"--seq_len {args.seq_len}: mask mode needs at least --k_max {args.k_max} "
                         f"tokens")
    if args.gated and not args.lora_rank:
        raise ValueError("--gated gates LoRA adapters: give --lora_rank too")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise ValueError(f"--device {args.device}: expected cpu, cuda or cuda:N")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here (use --device cpu)")
    if args.main_kl_grad and args.mode != "scratch":
        raise ValueError(f"--main_kl_grad: only --mode scratch trains the main head; drop it for "
                         f"--mode {args.mode}")
    if args.val_prompts and args.mode == "scratch":
        raise ValueError("--val_prompts scores MTP heads on a frozen model or a mask-token "
                         "model: --mode heads, extend or mask_tokens, not scratch")
    if not 0 < args.val_tau <= 1:
        raise ValueError(f"--val_tau {args.val_tau:g}: confadapt's threshold must be in (0, 1]")
    if args.val_prompts and not os.path.isfile(args.val_prompts):
        raise ValueError(f"--val_prompts {args.val_prompts}: no such file")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: "
                         "choose one")


# --------------------------------------------------------------------------------------------------
# the output folder: what train.py may replace

def checkpoint_args(folder):
    """The options and step of the train.py checkpoint in folder ({**train_args, "step": N}), None
    if it is none."""
    recover_checkpoint(folder)       # as every reader does: a crashed swap left it in .NAME.old
    try:
        with open(os.path.join(folder, "config.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if not (isinstance(meta, dict) and meta.get("format") == "nanomtp" and "train_args" in meta
            and "step" in meta):
        return None
    return {**meta["train_args"], "step": meta["step"]}


def written_by_checkpoint(name):
    """A file save_checkpoint writes (model, config, training state, the tokenizer's files)."""
    return (name in ("config.json", "model.safetensors", "train_state.pt")
            or name.startswith("tokenizer"))


def check_out(args):
    """Refuse an --out or --export that this run must not replace. Files train.py did not write:
    always. A train.py checkpoint: unless --resume continues it or --overwrite replaces it. An
    existing --export file: unless --overwrite. The checkpoint swap then only ever removes a
    checkpoint folder holding nothing else."""
    out = args.out
    # a save interrupted between its two renames left the checkpoint aside
    recover_checkpoint(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: a file, not a checkpoint folder")
    names = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if names:
        saved = checkpoint_args(out)
        foreign = names if saved is None else [n for n in names if not written_by_checkpoint(n)]
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more"
                                              if len(foreign) > 3 else "")
            raise ValueError(f"--out {out}: holds files train.py did not write ({shown}); it "
                             f"never replaces them, choose another --out")
        if not (args.resume or args.overwrite):
            raise ValueError(f"--out {out}: holds a checkpoint (step {saved['step']} of "
                             f"{saved['max_steps']}, --mode {saved['mode']}); --resume continues "
                             f"it, --overwrite replaces it")
    if args.export:
        inside = (os.path.commonpath([os.path.abspath(args.export), os.path.abspath(out)])
                  == os.path.abspath(out))
        if inside:
            raise ValueError(f"--export {args.export}: inside --out {out}, which every checkpoint "
                             f"replaces")
        if os.path.exists(args.export) and not args.overwrite:
            raise ValueError(f"--export {args.export}: exists; --overwrite replaces it")
