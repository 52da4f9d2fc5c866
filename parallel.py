"""
Several processes and training speed: this process's place in a torchrun job, and the FLOPs behind
MFU.

- `Parallel`: rank, world size and mode (DDP or FSDP2); without torchrun, rank 0 of 1 and every
  method the identity.
- `flops_per_token`, `peak_flops`: the one FLOPs formula (PaLM's estimate, counted by part) and the
  accelerator's peak.
What is not here: the training loop (train.py).
"""

import copy
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from distill import regions_per_sequence
from model import Transformer

# dense bf16, by a substring of the GPU's name, for MFU
PEAK_TFLOPS = {"H100": 989, "H200": 989, "A100": 312}


# --------------------------------------------------------------------------------------------------
# several processes (torchrun): DDP or FSDP2

class Parallel:
    """This process's place in a torchrun job (rank, world size, mode) and the few collective steps
    training needs. Without torchrun: rank 0 of 1, and every method is the identity."""

    def __init__(self, args):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.mode = args.parallel if self.world_size > 1 else "none"
        self.started_group = self.world_size > 1 and not dist.is_initialized()
        if self.started_group:
            dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")

    def wrap(self, objective, teacher):
        """The module the training step calls. DDP all-reduces the gradients of trained parameters
        only; FSDP2 shards each block and head (and the teacher, which it only runs forward)."""
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
        """Context of one micro-step's backward: gradients are averaged over ranks on the last
        micro-step only."""
        if self.mode == "fsdp":
            wrapped.set_requires_gradient_sync(on)
        if self.mode == "ddp" and not on:
            return wrapped.no_sync()
        return nullcontext()

    def average(self, metrics):
        """Each metric averaged over the ranks that report it (keys can differ: mask mode's k is per
        rank)."""
        if self.world_size == 1:
            return metrics
        every = [None] * self.world_size
        dist.all_gather_object(every, metrics)
        keys = dict.fromkeys(key for m in every for key in m)
        return {key: sum(m[key] for m in every if key in m) / sum(key in m for m in every)
                for key in keys}

    def gather(self, value):
        """value from every rank, as a list on every rank."""
        if self.world_size == 1:
            return [value]
        every = [None] * self.world_size
        dist.all_gather_object(every, value)
        return every

    def full_model(self, model):
        """The model unsharded on the CPU for saving: itself unless FSDP shards it; then a gathered
        copy on rank 0 (None elsewhere). Every rank must call it: gathering is collective."""
        if self.mode != "fsdp":
            return model
        state = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
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


# --------------------------------------------------------------------------------------------------
# training speed: FLOPs per token (the one formula), tokens/s, MFU

def flops_per_token(model, args):
    """Training FLOPs per window token of one step (PaLM's estimate, counted by part), the numerator
    of MFU.

    A part with P matrix weights costs 2P FLOPs per token forward, and attention adds 4 T n_head
    head_dim per layer (scores and weighted values over a window of T). Backward costs twice the
    forward where the part trains (gradients of inputs and of weights), once where it is frozen but
    gradients pass through it to trained parts before it, nothing where nothing before it trains. So
    a part counts 3x, 2x or 1x its forward:
      scratch        3 (backbone + output head) + sum over heads 3 (head + output head)
      heads/extend   1 (backbone + output head) + sum over heads: trained 3 head + 2 output head,
                     frozen 1 (both) + the fusion feeding head 1 (--head_taps): trained 2 (no input
                     gradient: nothing before it trains), frozen 1
      mask           3 (full fine-tuning) or 2 (LoRA) x (backbone + output head) + 1 x the same for
                     the teacher (not with --target data), on the packed sequence: T + regions x
                     (mean k - 1) positions."""
    cfg, T = model.cfg, args.seq_len
    attention = 4 * T * cfg.n_head * cfg.head_dim

    def forward(blocks):
        return sum(2 * p.numel() for b in blocks for p in b.parameters()
                   if p.dim() >= 2) + attention * len(blocks)

    backbone, out_head = forward(model.blocks), 2 * cfg.n_embd * cfg.vocab_size
    if args.mode == "mask_tokens":
        student = (2 if args.lora_rank else 3) * (backbone + out_head)
        teacher = 0 if args.target == "data" else backbone + out_head
        mean_k = args.k_max if args.k_fixed else (2 + args.k_max) / 2
        packed = T + regions_per_sequence(args.seq_len, args.k_max) * (mean_k - 1)
        return (student + teacher) * packed / T
    main = (3 if args.mode == "scratch" else 1) * (backbone + out_head)
    fusion = 0
    if model.fuse is not None:
        fusion = (2 if model.fuse.weight.requires_grad else 1) * 2 * model.fuse.weight.numel()
    heads = 0
    for head in model.heads:
        if any(p.requires_grad for p in head.parameters()):
            heads += 3 * forward([head]) + (3 if args.mode == "scratch" else 2) * out_head
        else:
            heads += forward([head]) + out_head
    return main + fusion + heads


def peak_flops(args):
    """The accelerator's peak dense bf16 FLOP/s for MFU: --peak_tflops, else from the GPU's name;
    None if unknown."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if not args.device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(args.device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS.items() if key in name), None)
