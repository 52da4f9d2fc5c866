"""
Training, one script for every recipe of both papers:

  --mode scratch   a main model and K MTP heads from scratch (Paper B; --beta 0 is plain MTP,
                   --beta 1 MTP-D)
  --mode heads     K MTP heads on a frozen pretrained model, trained on the model's own answers
                   (Paper B)
  --mode extend    looped extension: copy the m trained heads into m new ones, train only the new
                   ones (Paper B)
  --mode mask_tokens mask-token MTP by student-forced self-distillation from a frozen copy
                   (Paper A), full fine-tuning, LoRA, or gated LoRA (adapters only at mask
                   tokens: next-token predictions stay exactly the original)

Checkpoints (--out) hold the model, its tokenizer, the optimizer, the step, and the RNG states of
training and of the data sampler, written atomically: a resumed run (--resume) continues the same
loss curve. --export writes the small file that ships: the heads (mode heads/extend) or the
mask-token adapter (mode mask_tokens) in bf16 safetensors.

Nothing is lost: an existing --out is refused unless it is a checkpoint of train.py and --resume
(continue it) or --overwrite (replace it) is given; a folder holding any file train.py did not write
is never replaced. An existing --export file is replaced only with --overwrite. The log
OUT.log.jsonl beside --out is appended to, one "run" line at the start of each run. One run at a
time holds --out (a lock on OUT.lock beside it); a loss that turns NaN or Inf stops the run before
it saves, keeping the last checkpoint.

Several GPUs: torchrun --standalone --nproc_per_node N train.py ... (--parallel ddp, the default, or
fsdp). The global batch is batch_size x grad_accum x N sequences: every process reads its shard of
one random draw, so N processes train what one process with the whole batch trains. Rank 0 logs and
writes full (unsharded) checkpoints; --resume needs the same N. Each step logs tokens/s, and MFU on
a GPU (the FLOPs are counted in flops_per_token).

Examples (presets in config/ write under out/):
  python train.py --config config/synthmath_scratch.json
  python train.py --config config/smollm2_heads.json --data data/chat
  python train.py --out out/sm_mtpd4 --resume --max_steps 4000
  torchrun --standalone --nproc_per_node 8 train.py --config config/smollm2_mask.json \\
      --parallel fsdp
Not here: the losses (distill.py), checkpoints, export and the lock on --out (train_state.py), the
options (train_options.py), the data files (data/), measurement (bench.py).
"""

import copy
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate
from tqdm import tqdm

import distill
from data.dataset import TokenData, check_tokenizer
from data.synthmath import NUMBER, score
from decode import Stats, generate
from files import plural
from load import load
from model import Config, Transformer
from parallel import Parallel, flops_per_token, peak_flops
from prompts import encode_prompt, read_prompts
from tokenizer import load_tokenizer, mask_token_names
from train_options import LR_FLOOR, VAL_DECODE_PROMPTS, checkpoint_args, first_pass, get_args
from train_state import export, restore, resume, run_lock, save

EVAL_SEED = 1234           # every evaluation draws the same validation batches
VAL_ANSWER_TOKENS = 128   # greedy answer length of each --val_prompts prompt
VAL_DECODE_TOKENS = 64    # mask_tokens: their answer length (a synthmath solution: ~32 tokens)


def count(n):
    """A parameter count for people: 135.0M, or the number itself below 0.1M."""
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"


# --------------------------------------------------------------------------------------------------
# building the model for each mode

def build(args, tokenizer):
    """The model to train, the teacher (mask mode; None otherwise) and the tokenizer (grown by mask
    tokens)."""
    if args.mode == "scratch":
        cfg = Config(arch=args.arch, vocab_size=tokenizer.vocab_size, n_layer=args.n_layer,
                     n_head=args.n_head, n_kv_head=args.n_kv_head, n_embd=args.n_embd,
                     head_dim=args.n_embd // args.n_head,
                     intermediate_size=(4 * args.n_embd if args.arch == "gpt2"
                                        else 8 * args.n_embd // 3),
                     max_seq_len=max(1024, args.seq_len + 1), bias=args.arch == "gpt2")
        model = Transformer(cfg)
        model.apply(_init_weights)
        model.add_heads(args.n_mtp_heads, init="random")
        return model, None, tokenizer
    # the data's tokenizer is checked against this one in main()
    model, tokenizer = load(args.init_from)
    if args.mode == "heads":
        if len(model.heads):
            raise ValueError(f"{args.init_from} already has {plural(len(model.heads), 'head')}: "
                             f"use --mode extend")
        if args.head_taps:
            model.add_fusion(args.head_taps)
        model.add_heads(args.n_mtp_heads, init=args.head_init or "last_block")
    elif args.mode == "extend":
        if not model.heads:
            raise ValueError(f"{args.init_from} has no MTP heads to extend: train some with "
                             f"--mode heads first")
        model.extend_heads(args.n_mtp_heads)
    else:  # mask
        teacher = (None if args.lora_rank and args.gated
                   else copy.deepcopy(model).eval().requires_grad_(False))
        names = mask_token_names(args.k_max - 1 if args.distinct_masks else 1)
        ids = model.add_mask_tokens(len(names))
        # the model's ids: beyond a padded embedding's rows too (Qwen's)
        for name, i in zip(names, ids):
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
    """Freeze what the recipe keeps fixed: the backbone for heads/extend, the old heads (and the
    fusion that feeds head 1) for extend, everything but the adapters and the embedding for LoRA
    (whose rows of real tokens keep_mask_rows then leaves unchanged)."""
    model.requires_grad_(args.mode == "scratch"
                         or (args.mode == "mask_tokens" and not args.lora_rank))
    if args.mode in ("heads", "extend"):
        model.heads[len(model.heads) - args.n_mtp_heads:].requires_grad_(True)
    if args.mode == "heads" and model.fuse is not None:
        model.fuse.requires_grad_(True)
    if args.mode == "mask_tokens" and args.lora_rank:
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        model.embed.weight.requires_grad_(True)


def keep_mask_rows(model):
    """With LoRA, only the mask tokens' embedding rows train: zero the gradient of every other row.
    Done after the backward pass, on the gradient as it is: a full tensor, or FSDP's shard of rows
    (a DTensor)."""
    grad = model.embed.weight.grad
    keep = (torch.arange(grad.size(0), device=grad.device)
            >= model.cfg.mask_token_ids[0]).to(grad.dtype)[:, None]
    if isinstance(grad, DTensor):
        keep = DTensor.from_local(keep, grad.device_mesh, [Replicate()] * grad.device_mesh.ndim,
                                  run_check=False)
    grad.mul_(keep)


def make_optimizer(model, args):
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and p is not model.embed.weight]
    rest = [p for p in params if not (p.dim() >= 2 and p is not model.embed.weight)]
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    # FSDP's sharded parameters: foreach
    fused = args.device.startswith("cuda") and args.parallel != "fsdp"
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=fused)


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule == "constant":
        return args.lr
    progress = (step - args.warmup) / max(1, args.max_steps - args.warmup)
    return args.lr * (LR_FLOOR
                      + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# --------------------------------------------------------------------------------------------------
# one batch -> loss

class Objective(torch.nn.Module):
    """The model with its training loss as forward(): the unit DDP and FSDP wrap, so that every
    parameter the loss touches (blocks, heads, the shared embedding and output head) is used inside
    the wrapper's forward. The frozen teacher is an argument, not a submodule: it is neither wrapped
    for gradients nor all-reduced."""

    def __init__(self, model, args):
        super().__init__()
        self.model = model
        self.args = args

    def forward(self, idx, loss_weight, teacher, generator, answers_only=False):
        return loss_fn(self.model, teacher, idx, loss_weight, self.args, generator, answers_only)


def loss_fn(model, teacher, idx, loss_weight, args, generator, answers_only=False):
    """Loss and metrics of one batch of windows idx (B, T+1) with their loss mask (used with
    --answers_only, or when answers_only is set here)."""
    loss_weight = loss_weight if args.answers_only or answers_only else None
    if args.mode != "mask_tokens":
        cfg = distill.MTPLossConfig(args.alpha, args.beta, args.top_n or None, args.kl_direction,
                                    main_loss=args.mode == "scratch",
                                    detach_main=not args.main_kl_grad)
        return distill.mtp_loss(model, idx, loss_weight, cfg)
    k = (args.k_max if args.k_fixed
         else int(torch.randint(2, args.k_max + 1, (), generator=generator)))
    packed = distill.pack_batch(idx, k, distill.regions_per_sequence(args.seq_len, args.k_max),
                                model.cfg.mask_token_ids, generator)
    cfg = distill.StudentForcedConfig(args.target, args.prefix_loss)
    loss, metrics = distill.student_forced_loss(model, teacher or model, *packed, cfg=cfg,
                                                n_real_vocab=model.cfg.mask_token_ids[0],
                                                loss_weight=loss_weight)
    metrics["k"] = k
    return loss, metrics


@torch.no_grad()
def prompt_answers(model, tokenizer, path, device):
    """The frozen model's greedy answers to the prompts in `path` (heads and extend never change
    them), as one right-padded batch: token ids (B, T) and loss weights over the answers. On the
    model's own greedy text, a head's agreement with the main head at depth d is what decoding
    accepts there: prompts written like a user's choose the step count, not the training
    distribution."""
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
def held_out_prompts(original, tokenizer, path):
    """Mask-token mode's held-out set: the first VAL_DECODE_PROMPTS prompts of `path` as token
    ids, with what a decoding is scored against: their numeric answers when every prompt has one
    (data/synthmath's), else the greedy answers of `original`, the model before conversion (the
    teacher, or a gated model: its next-token predictions are the original's).
    Returns (prompts, answers or None, greedy answers or None)."""
    rows = read_prompts(path)[:VAL_DECODE_PROMPTS]
    prompts = [encode_prompt(tokenizer, row["prompt"]) for row in rows]
    answers = [str(row.get("answer")) for row in rows]
    if all(NUMBER.fullmatch(a) for a in answers):
        return prompts, answers, None
    greedy = generate(original, prompts, VAL_DECODE_TOKENS, stop_ids=tokenizer.stop_ids)
    return prompts, None, greedy


@torch.no_grad()
def decode_held_out(model, tokenizer, held_out, args):
    """The held-out prompts decoded with confadapt@--val_tau, as Paper A plots them against
    training steps: "prompts_tokens_per_forward", and "prompts_accuracy" (numeric answers,
    data/synthmath's scorer) or "prompts_exact_ar" (the share of answers equal to the original
    model's greedy one)."""
    prompts, answers, greedy = held_out
    stats = Stats()
    outs = generate(model, prompts, VAL_DECODE_TOKENS, stop_ids=tokenizer.stop_ids,
                    method=f"confadapt@{args.val_tau:g}", stats=stats,
                    mask_ids=model.cfg.mask_token_ids, k_max=args.k_max,
                    graphs=False)   # no CUDA graphs of weights that change at every step
    metrics = {"prompts_tokens_per_forward": stats.tokens_per_forward}
    if answers is None:
        metrics["prompts_exact_ar"] = sum(o == g for o, g in zip(outs, greedy)) / len(outs)
    else:
        texts = [tokenizer.decode([t for t in out if t not in tokenizer.stop_ids]) for out in outs]
        metrics["prompts_accuracy"] = sum(score(t, a) for t, a in zip(texts, answers)) / len(outs)
    return metrics


@torch.no_grad()
def evaluate(objective, teacher, data, args, par, autocast, prompt_batch=None, held_out=None):
    """Validation loss and metrics on the same batches every time, drawn and split like training
    batches (so any split of the global batch over processes and micro-steps sees the same windows),
    averaged over ranks; with a prompt_batch (prompt_answers), the heads' agreement on it too, as
    "prompts_agree{d}"; with a held_out set (mask_tokens: held_out_prompts), its confadapt decoding
    (decode_held_out)."""
    objective.eval()
    g = torch.Generator().manual_seed(EVAL_SEED)
    totals = {}
    for _ in range(args.eval_batches):
        idx, loss_weight = data.get_batch("val", args.batch_size * args.grad_accum, args.seq_len, g,
                                        args.device, shard=(par.rank, par.world_size))
        for x, m in zip(idx.chunk(args.grad_accum), loss_weight.chunk(args.grad_accum)):
            with autocast:
                loss, metrics = objective(x, m, teacher, g)
            for key, v in {"loss": loss.item(), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + v / (args.eval_batches * args.grad_accum)
    # every rank scores the same batch: the average is its value
    if prompt_batch is not None:
        with autocast:
            _, metrics = objective(*prompt_batch, teacher, g, answers_only=True)
        totals.update({f"prompts_{k}": v for k, v in metrics.items() if k.startswith("agree")})
    if held_out is not None:    # every rank decodes the same prompts with the same weights
        totals.update(decode_held_out(objective.model, *held_out, args))
    # a root left unsharded after a forward alone holds other parameters than the optimizer's
    if isinstance(objective, FSDPModule):
        objective.reshard()
    objective.train()
    return par.average(totals)


# --------------------------------------------------------------------------------------------------
# the training loop

def main(argv=None):
    # the lock comes before anything reads --out (a swap may be on); --help shows this docstring
    with run_lock(first_pass(argv, __doc__)[1].out):
        args = get_args(argv, __doc__)
        par = Parallel(args)
        try:
            return train(args, par)
        finally:
            par.close()


def train(args, par):
    if args.val_prompts and args.mode == "mask_tokens" and par.mode == "fsdp":
        raise ValueError("--val_prompts in --mode mask_tokens decodes with the whole model on "
                         "each rank, which FSDP shards: use --parallel ddp, or drop --val_prompts")
    # one GPU per process, whatever index was given
    if args.device.startswith("cuda") and par.world_size > 1:
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if args.device.startswith("cuda:"):          # "cuda" alone means the current device
        torch.cuda.set_device(args.device)
    log = print if par.rank == 0 else lambda *a, **k: None
    torch.manual_seed(args.seed)                 # the same initial weights on every rank
    data = TokenData(args.data)
    if args.resume:
        model, teacher, tokenizer, state = resume(args, par)
    else:
        model, teacher, tokenizer = build(args,
                                          load_tokenizer(os.path.join(args.data, "tokenizer")))
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
    fused = ("" if model.fuse is None
             else f" (head 1 reads blocks {model.cfg.head_taps} and the last, fused)")
    log(f"mode {args.mode}: {count(model.num_params())} parameters, {count(trainable)} trained, "
        f"{plural(len(model.heads), 'MTP head')}{fused}, data {args.data} "
        f"({len(data.tokens('train')):,} training tokens)")
    if args.max_steps == 0:
        log("--max_steps 0: model and data checked; nothing trained, saved or exported")
        return model
    sequences = args.batch_size * args.grad_accum * par.world_size
    log(f"parallel: {par.mode}, world size {par.world_size}; global batch {args.batch_size} x "
        f"{args.grad_accum} x {par.world_size} = {plural(sequences, 'sequence')}, "
        f"{sequences * args.seq_len} tokens per step")
    # per optimizer step, all ranks
    flops = flops_per_token(model, args) * sequences * args.seq_len
    peak = peak_flops(args)
    model.to(args.device)
    if teacher is not None:
        teacher.to(args.device)
    if args.compile:
        for unit in (*model.blocks, *model.heads):
            unit.compile()
    prompt_batch = held_out = None
    if args.val_prompts and args.mode == "mask_tokens":
        original = model if teacher is None else teacher
        held_out = tokenizer, held_out_prompts(original, tokenizer, args.val_prompts)
    elif args.val_prompts:
        prompt_batch = prompt_answers(model, tokenizer, args.val_prompts, args.device)
    objective = Objective(model, args)
    wrapped = par.wrap(objective, teacher)
    optimizer = make_optimizer(model, args)
    # shared: ranks read shards of one draw
    data_rng = torch.Generator().manual_seed(args.seed)
    # per rank: its own k and regions
    loss_rng = torch.Generator().manual_seed(args.seed + 1 + par.rank)
    step = 0 if state is None else restore(state, par, model, optimizer, data_rng, loss_rng)
    on_gpu = args.device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=getattr(torch, args.dtype)) if on_gpu else nullcontext()
    if par.rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        # beside the checkpoint: survives its replacement
        log_file = open(args.out.rstrip("/") + ".log.jsonl", "a")
        log_file.write(json.dumps({"run": "resume" if args.resume else "start", "step": step,
                                   "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                   "args": vars(args)}) + "\n")
    objective.train()
    bar = tqdm(range(step, args.max_steps), initial=step, total=args.max_steps, dynamic_ncols=True,
               disable=par.rank != 0)
    t0 = time.time()
    for step in bar:
        t_step = time.time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        idx, loss_weight = data.get_batch("train", args.batch_size * args.grad_accum, args.seq_len,
                                        data_rng, args.device, shard=(par.rank, par.world_size))
        totals = {}
        for micro, (x, m) in enumerate(zip(idx.chunk(args.grad_accum),
                                           loss_weight.chunk(args.grad_accum))):
            with par.gradient_sync(wrapped, on=micro == args.grad_accum - 1):
                with autocast:
                    loss, metrics = wrapped(x, m, teacher, loss_rng)
                (loss / args.grad_accum).backward()
            for key, v in {"loss": loss.item(), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + v / args.grad_accum
        if args.mode == "mask_tokens" and args.lora_rank:
            keep_mask_rows(model)
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                           args.grad_clip)
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
            record["val"] = evaluate(objective, teacher, data, args, par, autocast, prompt_batch,
                                     held_out)
            if par.rank == 0:
                tqdm.write(f"step {step + 1}: val "
                           + " ".join(f"{k} {v:.3f}" for k, v in record["val"].items()))
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
    """main() with expected errors (bad options, missing or malformed files) as one line on stderr,
    status 2."""
    try:
        main(argv)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
