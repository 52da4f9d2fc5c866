"""
What a training run keeps beyond its process: the checkpoint in --out (saved atomically, resumed to
continue the same loss curve), the small file --export ships, and the lock that lets one run at a
time hold --out. train.py calls these; the file formats themselves are artefacts.py's.
"""

import fcntl
import os
import pickle
from contextlib import contextmanager

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from artefacts import save_checkpoint, save_heads, save_mask_adapter
from files import plural
from load import load

# exported heads carry this many of the most frequent training tokens (draft vocabulary)
DRAFT_VOCAB_SAVED = 32768


def save(args, par, model, tokenizer, optimizer, step, data_rng, loss_rng):
    """Model, tokenizer and everything a resumed run needs to continue the same loss curve, in one
    atomic write by rank 0. Full (unsharded) state dicts of model and optimizer, whatever the
    parallel mode."""
    optimizer_state = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    loss_rngs = par.gather(loss_rng.get_state())
    full = par.full_model(model)
    if par.rank == 0:
        state = {"optimizer": optimizer_state, "step": step, "world_size": par.world_size,
                 "torch_rng": torch.get_rng_state(), "data_rng": data_rng.get_state(),
                 "loss_rng": loss_rngs}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state()
        save_checkpoint(args.out, full, tokenizer, extra={"train_args": vars(args), "step": step},
                        train_state=state)
    # no rank goes on before the checkpoint is complete
    par.barrier()


def resume(args, par):
    """Model, teacher (mask mode) and tokenizer of the checkpoint in --out, and its training
    state."""
    model, tokenizer = load(args.out)
    path = os.path.join(args.out, "train_state.pt")
    try:
        state = torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: unreadable, the training state is damaged "
                         f"({str(e).splitlines()[0]})") from e
    if state.get("world_size", 1) != par.world_size:
        raise ValueError(f"{path}: written by {plural(state.get('world_size', 1), 'process')}, "
                         f"resumed by {par.world_size}; resume with the same number (torchrun "
                         f"--nproc_per_node {state.get('world_size', 1)}): each rank continues its "
                         f"own random stream")
    teacher = None
    if args.mode == "mask_tokens" and not (args.lora_rank and args.gated):
        teacher = load(args.init_from)[0].eval().requires_grad_(False)
    return model, teacher, tokenizer, state


def restore(state, par, model, optimizer, data_rng, loss_rng):
    """Put the optimizer and every random number generator back where the checkpoint left them;
    returns the step."""
    set_optimizer_state_dict(model, optimizer, state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
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
    """Token ids of the training data by falling frequency: the draft vocabulary (EAGLE-3,
    FastMTP)."""
    counts = np.bincount(np.asarray(data.tokens("train")), minlength=1)
    order = np.argsort(-counts, kind="stable")
    return torch.from_numpy(
        order[:min(DRAFT_VOCAB_SAVED, int((counts > 0).sum()))].astype(np.int64))


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
