"""
Training, one script for every recipe of both papers:

  --mode scratch   a main model and K MTP heads from scratch (Paper B; --beta 0 is plain MTP, --beta 1 MTP-D)
  --mode heads     K MTP heads on a frozen pretrained model, trained on the model's own answers (Paper B)
  --mode extend    looped extension: copy the m trained heads into m new ones, train only the new ones (Paper B)
  --mode mask      mask-token MTP by student-forced self-distillation from a frozen copy (Paper A), full fine-tuning,
                   LoRA, or gated LoRA (adapters only at mask tokens: next-token predictions stay exactly the original)

Checkpoints (--out) hold the model, its tokenizer, the optimizer, the step, and the RNG states of training and of the
data sampler, written atomically: a resumed run (--resume) continues the same loss curve. --export writes the small
file that ships: the heads (mode heads/extend) or the mask-token adapter (mode mask) in bf16 safetensors.

Examples (presets in config/; every flag has --help):
  python train.py --config config/synthmath_scratch.json
  python train.py --config config/smollm2_heads.json --data data/chat
Single GPU or CPU. Not here: the losses (distill.py), the data files (data/), measurement (bench.py).
"""

import argparse
import json
import math
import os
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

import distill
from data.dataset import TokenData, check_tokenizer
from load import load, save_checkpoint, save_heads, save_mask_adapter
from tokenizer import load_tokenizer
from model import Config, Transformer


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="JSON file of defaults for any of the options below (config/)")
    a = p.add_argument_group("what to train")
    a.add_argument("--mode", default="scratch", choices=["scratch", "heads", "extend", "mask"], help="the recipe")
    a.add_argument("--init_from", default=None, help="starting model: smollm2, HF folder, .gguf, or a checkpoint "
                   "folder (scratch: none)")
    a.add_argument("--data", default="data/synthmath", help="a folder prepared by data/prepare.py")
    a.add_argument("--out", default="out/run", help="checkpoint folder")
    a.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    a.add_argument("--export", default=None, help="also write the shippable file here (heads or mask adapter)")
    a.add_argument("--answers_only", action="store_true", help="restrict losses to answer tokens")
    m = p.add_argument_group("model from scratch")
    m.add_argument("--arch", default="llama", choices=["llama", "gpt2"], help="architecture family")
    m.add_argument("--n_layer", type=int, default=6, help="blocks")
    m.add_argument("--n_head", type=int, default=8, help="attention heads")
    m.add_argument("--n_kv_head", type=int, default=8, help="key/value heads (grouped-query attention)")
    m.add_argument("--n_embd", type=int, default=256, help="width")
    h = p.add_argument_group("MTP heads (Paper B)")
    h.add_argument("--n_heads", type=int, default=1, help="heads to train (extend: heads to add)")
    h.add_argument("--head_init", default="last_block", choices=["last_block", "random"], help="new head init")
    h.add_argument("--alpha", type=float, default=1.0, help="weight of each head's cross-entropy")
    h.add_argument("--beta", type=float, default=1.0, help="weight of each head's KL to the main head (0: plain MTP)")
    h.add_argument("--top_n", type=int, default=10000, help="KL over the main head's top-N logits (0: all)")
    h.add_argument("--kl_direction", default="forward", choices=["forward", "reverse"], help="forward: KL(main||head)")
    k = p.add_argument_group("mask tokens (Paper A)")
    k.add_argument("--k_max", type=int, default=16, help="largest k (tokens per forward) trained")
    k.add_argument("--k_fixed", action="store_true", help="always k_max instead of a random k in [2, k_max]")
    k.add_argument("--target", default="hard", choices=["hard", "soft", "data"], help="teacher argmax, KL, or data")
    k.add_argument("--prefix_loss", type=float, default=0.0, help="weight of an extra next-token loss on real tokens")
    k.add_argument("--distinct_masks", action="store_true", help="k_max-1 distinct mask tokens instead of one")
    k.add_argument("--lora_rank", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    k.add_argument("--gated", action="store_true", help="LoRA active at mask tokens only")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch_size", type=int, default=32, help="sequences per step")
    o.add_argument("--seq_len", type=int, default=256, help="tokens per sequence")
    o.add_argument("--max_steps", type=int, default=2000, help="optimizer steps")
    o.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    o.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    o.add_argument("--schedule", default="cosine", choices=["cosine", "constant"], help="after warm-up")
    o.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    o.add_argument("--grad_clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    o.add_argument("--eval_every", type=int, default=250, help="validate every N steps")
    o.add_argument("--eval_batches", type=int, default=8, help="validation batches")
    o.add_argument("--save_every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    o.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order")
    o.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    o.add_argument("--dtype", default=None, help="autocast dtype on GPU (default bfloat16); CPU trains in float32")
    pre, _ = p.parse_known_args(argv)
    if pre.config:
        with open(pre.config) as f:
            defaults = json.load(f)
        unknown = set(defaults) - {act.dest for act in p._actions}
        if unknown:
            raise ValueError(f"{pre.config}: unknown options {sorted(unknown)}")
        p.set_defaults(**defaults)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# building the model for each mode

def build(args, tok):
    """The model to train, the teacher (mask mode; None otherwise) and the tokenizer (grown by mask tokens)."""
    if args.mode == "scratch":
        if args.init_from:
            raise ValueError("--mode scratch starts from nothing; drop --init_from (or use --mode heads/extend/mask)")
        cfg = Config(arch=args.arch, vocab_size=tok.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                     n_kv_head=args.n_kv_head, n_embd=args.n_embd, head_dim=args.n_embd // args.n_head,
                     intermediate_size=4 * args.n_embd if args.arch == "gpt2" else 8 * args.n_embd // 3,
                     max_seq_len=max(1024, args.seq_len), bias=args.arch == "gpt2")
        model = Transformer(cfg)
        model.apply(_init_weights)
        model.add_heads(args.n_heads, init="random")
        return model, None, tok
    if not args.init_from:
        raise ValueError(f"--mode {args.mode} needs --init_from (a pretrained model or checkpoint)")
    model, tok = load(args.init_from)            # the data's tokenizer is checked against this one in main()
    if args.mode == "heads":
        if len(model.heads):
            raise ValueError(f"{args.init_from} already has {len(model.heads)} heads: use --mode extend")
        model.add_heads(args.n_heads, init=args.head_init)
    elif args.mode == "extend":
        m = len(model.heads)
        if m == 0:
            raise ValueError(f"{args.init_from} has no MTP heads to extend: train some with --mode heads first")
        for i in range(args.n_heads):           # looped extension: new head m+i starts as a copy of head i mod m
            model.add_heads(1)
            model.heads[-1].load_state_dict(model.heads[i % m].state_dict())
    else:  # mask
        teacher = None
        if not (args.lora_rank and args.gated):   # a gated model is its own teacher: no adapter runs without masks
            import copy
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
        names = [f"<mtp_{i}>" for i in range(args.k_max - 1)] if args.distinct_masks else ["<mtp>"]
        ids = model.add_mask_tokens(len(names))
        if [tok.add_special(n) for n in names] != ids:
            raise ValueError("the tokenizer and the model disagree on the ids of the new mask tokens")
        if args.lora_rank:
            model.add_lora(args.lora_rank, args.gated)
        return model, teacher, tok
    return model, None, tok


def _init_weights(module):
    if isinstance(module, torch.nn.Linear):
        torch.nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)
    elif isinstance(module, torch.nn.Embedding):
        torch.nn.init.normal_(module.weight, std=0.02)


def make_optimizer(model, args):
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and p is not model.embed.weight]
    rest = [p for p in params if not (p.dim() >= 2 and p is not model.embed.weight)]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    fused = args.device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=fused)


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule == "constant":
        return args.lr
    progress = (step - args.warmup) / max(1, args.max_steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ----------------------------------------------------------------------------------------------------------------
# one batch -> loss

def loss_fn(model, teacher, batch, args, generator):
    x, y, m = batch
    idx = torch.cat([x[:, :1], y], dim=1)                            # (B, T+1) the whole window
    mask = torch.cat([torch.zeros_like(m[:, :1]), m], dim=1) if args.answers_only else None
    if args.mode != "mask":
        cfg = distill.MTPLossConfig(args.alpha, args.beta, args.top_n or None, args.kl_direction,
                                    main_loss=args.mode == "scratch")
        return distill.mtp_loss(model, idx, mask, cfg)       # every head, depth d trained on module d-1
    k = args.k_max if args.k_fixed else int(torch.randint(2, args.k_max + 1, (), generator=generator))
    n_regions = max(1, idx.size(1) // (2 * args.k_max))              # Paper A: N / (2 k_max) regions
    packed = distill.pack_batch(idx.cpu(), k, n_regions, model.cfg.mask_token_ids, generator)
    packed = [t.to(idx.device) for t in packed]
    cfg = distill.MaskLossConfig(args.target, args.prefix_loss)
    loss, metrics = distill.mask_loss(model, teacher or model, *packed, cfg=cfg,
                                      n_real_vocab=model.cfg.mask_token_ids[0])
    metrics["k"] = k
    return loss, metrics


@torch.no_grad()
def evaluate(model, teacher, data, args, autocast):
    model.eval()
    g = torch.Generator().manual_seed(1234)                          # the same validation batches every time
    totals = {}
    for _ in range(args.eval_batches):
        batch = data.get_batch("val", args.batch_size, args.seq_len, g, args.device)
        with autocast:
            loss, metrics = loss_fn(model, teacher, batch, args, g)
        for key, v in {"loss": loss.item(), **metrics}.items():
            totals[key] = totals.get(key, 0.0) + v / args.eval_batches
    model.train()
    return totals


# ----------------------------------------------------------------------------------------------------------------
# checkpoints

def save(args, model, tok, optimizer, step, data_rng, loss_rng):
    """Model, tokenizer and everything a resumed run needs to continue the same loss curve, in one atomic write."""
    state = {"optimizer": optimizer.state_dict(), "step": step, "torch_rng": torch.get_rng_state(),
             "data_rng": data_rng.get_state(), "loss_rng": loss_rng.get_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    save_checkpoint(args.out, model, tok, extra={"train_args": vars(args), "step": step}, train_state=state)


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)
    data = TokenData(args.data)
    data_tok = load_tokenizer(os.path.join(args.data, "tokenizer"))
    if args.resume:
        model, tok = load(args.out)
        state = torch.load(os.path.join(args.out, "train_state.pt"), weights_only=True)
        teacher = None
        if args.mode == "mask" and not (model.cfg.lora_rank and model.cfg.lora_gated):
            teacher = load(args.init_from)[0].eval()
            teacher.requires_grad_(False)
    else:
        model, teacher, tok = build(args, data_tok)
        state = None
    set_trainable(model, args)
    check_tokenizer(data.meta, tok, args.data)
    model.to(args.device)
    if teacher is not None:
        teacher.to(args.device)
    optimizer = make_optimizer(model, args)
    data_rng, loss_rng = torch.Generator(), torch.Generator()
    data_rng.manual_seed(args.seed), loss_rng.manual_seed(args.seed + 1)
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        data_rng.set_state(state["data_rng"]), loss_rng.set_state(state["loss_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])
    on_gpu = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or "bfloat16")
    autocast = torch.autocast("cuda", dtype=dtype) if on_gpu else nullcontext()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"mode {args.mode}: {model.num_params() / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trained, "
          f"{len(model.heads)} heads, data {args.data} ({data.meta.get('counts', '')})")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    log = open(args.out.rstrip("/") + ".log.jsonl", "a")      # beside the checkpoint: it survives its replacement
    model.train()
    bar = tqdm(range(step, args.max_steps), initial=step, total=args.max_steps, dynamic_ncols=True)
    t0 = time.time()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        batch = data.get_batch("train", args.batch_size, args.seq_len, data_rng, args.device)
        with autocast:
            loss, metrics = loss_fn(model, teacher, batch, args, loss_rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.grad_clip)
        optimizer.step()
        shown = {k: v for k, v in metrics.items() if k.startswith(("acc", "agree", "k"))}
        bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.2f}" for k, v in shown.items()})
        record = {"step": step + 1, "loss": loss.item(), "time": time.time() - t0, **metrics}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.max_steps:
            val = evaluate(model, teacher, data, args, autocast)
            record["val"] = val
            tqdm.write(f"step {step + 1}: val " + " ".join(f"{k} {v:.3f}" for k, v in val.items()))
        log.write(json.dumps(record) + "\n")
        log.flush()
        if (step + 1) % args.save_every == 0 or step + 1 == args.max_steps:
            save(args, model, tok, optimizer, step + 1, data_rng, loss_rng)
    if args.export:
        if args.mode == "mask":
            save_mask_adapter(args.export, model, meta={"k_max": args.k_max})
        else:
            first = len(model.heads) - args.n_heads if args.mode == "extend" else 0   # ship what this run trained
            save_heads(args.export, model, draft_vocab=data_frequencies(data), first=first)
        print(f"exported {args.export} ({os.path.getsize(args.export) / 1e6:.1f} MB)")
    return model


def set_trainable(model, args):
    """Freeze what the recipe keeps fixed: the backbone for heads/extend, the old heads for extend, everything but
    the adapters and the mask tokens' embedding rows for LoRA."""
    model.requires_grad_(args.mode == "scratch" or (args.mode == "mask" and not args.lora_rank))
    if args.mode in ("heads", "extend"):
        model.heads[len(model.heads) - args.n_heads:].requires_grad_(True)
    if args.mode == "mask" and args.lora_rank:
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        model.embed.weight.requires_grad_(True)
        first = model.cfg.mask_token_ids[0]
        model.embed.weight.register_hook(lambda g: torch.cat([torch.zeros_like(g[:first]), g[first:]]))


def data_frequencies(data, limit=32768):
    """Token ids of the training data by falling frequency: the draft vocabulary (EAGLE-3, FastMTP)."""
    import numpy as np
    counts = np.bincount(np.asarray(data.tokens("train")), minlength=1)
    order = np.argsort(-counts, kind="stable")
    return torch.from_numpy(order[:min(limit, int((counts > 0).sum()))].astype(np.int64))


if __name__ == "__main__":
    main()
