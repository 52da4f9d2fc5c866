"""
The training losses of both papers, and Paper A's packed training layout with its visibility matrix.

Paper B (MTP-D): `mtp_loss` - every MTP head gets cross-entropy against the data plus a KL term that
pulls it towards the main head's (detached) distribution for the same target token, over the main
head's top-N tokens.

Paper A (standalone MTP via mask tokens): `pack_regions` lays out a batch with "MTP regions" of k-1
mask tokens and builds the blocked-causal visibility; `student_forced_loss` is the distillation loss
against a frozen teacher.

Nothing here owns an optimizer or a data loader (train.py does).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------------
# Paper B: MTP heads with self-distillation from the main head

def topn_kl(student_logits, teacher_logits, top_n=None, direction="forward"):
    """KL between teacher and student restricted to the teacher's top_n tokens (both renormalised
    there). direction "forward" = KL(teacher || student), "reverse" = KL(student || teacher). Mean
    over positions."""
    if top_n is not None and top_n < teacher_logits.size(-1):
        idx = teacher_logits.topk(top_n, dim=-1).indices
        teacher_logits = teacher_logits.gather(-1, idx)
        student_logits = student_logits.gather(-1, idx)
    t = F.log_softmax(teacher_logits.float(), -1)
    s = F.log_softmax(student_logits.float(), -1)
    if direction == "reverse":
        t, s = s, t
    elif direction != "forward":
        raise ValueError(f"unknown KL direction {direction!r} (forward or reverse)")
    return (t.exp() * (t - s)).sum(-1)


@dataclass
class MTPLossConfig:
    alpha: float | list = 1.0   # weight of each head's CE against the data (a list: one per depth)
    beta: float | list = 1.0    # weight of each head's KL to the main head (0: plain MTP)
    # KL over the main head's top-N logits (Paper B: 10k of a 123k vocabulary)
    top_n: int | None = 10_000
    kl_direction: str = "forward"
    # include the main head's next-token loss (off when the backbone is frozen)
    main_loss: bool = True
    detach_main: bool = True    # Paper B's stop-gradient on the KL target (False: KL trains it too)


def at_depth(weight, d):
    """Depth d's (1-based) value of a weight: a list holds one per depth, a number serves all."""
    return weight[d - 1] if isinstance(weight, list) else weight


def mtp_loss(model, idx, loss_weight=None, cfg=MTPLossConfig()):
    """Loss of the main model and its MTP heads on token ids idx (B, T).

    The head at depth d (1-based) runs module d-1 on (depth d-1's hidden state at i, token i+d) and
    predicts token i+d+1; the main head at position i+d predicts the same token, so its distribution
    there is the distillation target (detached, unless cfg.detach_main is False). loss_weight (B, T)
    marks which tokens count as targets (e.g. answers only). Returns (loss, metrics dict)."""
    T = idx.size(1)
    if loss_weight is None:
        loss_weight = torch.ones_like(idx, dtype=torch.float)
    loss_weight = loss_weight.float()
    train_main = cfg.main_loss and any(p.requires_grad for p in model.blocks.parameters())
    with torch.set_grad_enabled(train_main and torch.is_grad_enabled()):
        x, taps = model.hidden(idx, keep_taps=True)
        main_logits = model.logits(x)
    # outside: a fusion trains with the heads while the backbone stays frozen
    h = model.head_state(x, taps)
    metrics = {}
    loss = torch.zeros((), device=idx.device)
    if cfg.main_loss:
        ce = F.cross_entropy(main_logits[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten(),
                             reduction="none")
        loss = loss + _weighted_mean(ce, loss_weight[:, 1:])
        metrics["main_loss"] = loss.item()
    teacher = main_logits.detach() if cfg.detach_main else main_logits
    pos = model.default_pos(idx)
    for d in range(1, len(model.heads) + 1):
        # positions with a target inside the sequence
        n = T - d - 1
        if n <= 0:
            break
        h = model.head_forward(d - 1, h[:, :n], idx[:, d:d + n], pos[:, :n])
        # (B, n, V): predictions of tokens d+1 .. d+n
        logits = model.logits(h)
        target, m = idx[:, d + 1:d + 1 + n], loss_weight[:, d + 1:d + 1 + n]
        ce = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="none")
        ce = _weighted_mean(ce, m)
        alpha, beta = at_depth(cfg.alpha, d), at_depth(cfg.beta, d)
        head_loss = alpha * ce
        if beta:
            kl = topn_kl(logits, teacher[:, d:d + n], cfg.top_n, cfg.kl_direction)
            kl = _weighted_mean(kl.flatten(), m)
            head_loss = head_loss + beta * kl
            metrics[f"kl{d}"] = kl.item()
        loss = loss + head_loss
        pred = logits.argmax(-1)
        finite = _finite(logits, teacher[:, d:d + n])
        metrics[f"ce{d}"] = ce.item()
        # acc: against the data, agree: against the main head
        hits = {"acc": pred == target, "agree": pred == teacher[:, d:d + n].argmax(-1)}
        for key, hit in hits.items():
            metrics[f"{key}{d}"] = finite * _weighted_mean(hit.float().flatten(), m).item()
    return loss, metrics


def _weighted_mean(values, weight):
    weight = weight.flatten().to(values.dtype)
    return (values.flatten() * weight).sum() / weight.sum().clamp_min(1)


def _finite(*logits):
    """1.0, or NaN if any logit is NaN or Inf: the argmax of such logits means nothing, and two
    of them agree (a rate times this is NaN, never a perfect-looking 1.0)."""
    return 1.0 if all(torch.isfinite(x).all() for x in logits) else math.nan


# --------------------------------------------------------------------------------------------------
# Paper A: MTP regions and the blocked-causal visibility

@dataclass
class Regions:
    # (L,) token ids: the real tokens with k-1 mask tokens after each region's anchor
    idx: torch.Tensor
    # (L,) positions: a mask takes the position the real token it stands for would have
    pos: torch.Tensor
    span: torch.Tensor       # (L,) region number of each mask token, -1 for real tokens
    anchor: torch.Tensor     # (L,) position of the last real token a query may see
    # (R, k) indices into idx of each region's k prediction slots (anchor, then masks)
    slots: torch.Tensor
    targets: torch.Tensor    # (R, k) the real tokens those slots predict (ground truth)


def pack_regions(tokens, k, n_regions, mask_ids, generator=None):
    """Insert n_regions MTP regions into one sequence of real tokens (N,).

    A region after real token a holds k-1 mask tokens standing for tokens a+1 .. a+k-1; its k slots
    (token a and the masks) predict tokens a+1 .. a+k. The real tokens continue after the region
    with their own positions. Anchors are drawn at random (at least k apart, so regions never
    overlap in what they predict)."""
    N = tokens.numel()
    n_regions = min(n_regions, (N - 1) // k)
    if n_regions < 1:
        raise ValueError(f"a sequence of {N} tokens has no room for a region of k={k}")
    # choose anchors a_1 < a_2 < ... with a_{j+1} - a_j >= k and a_R + k <= N - 1: draw gaps and
    # spread the slack
    slack = N - 1 - n_regions * k
    cuts = torch.sort(torch.randint(0, slack + 1, (n_regions,), generator=generator)).values
    anchors = cuts + torch.arange(n_regions) * k                         # (R,)
    masks = list(mask_ids) if len(mask_ids) > 1 else list(mask_ids) * (k - 1)
    masks = torch.tensor(masks[:k - 1], dtype=torch.long)
    pieces, pos, span, anchor, slots = [], [], [], [], []
    start, length = 0, 0
    for r, a in enumerate(anchors.tolist()):
        # real tokens up to and including the anchor
        real = torch.arange(start, a + 1)
        pieces += [tokens[start:a + 1], masks]
        pos += [real, torch.arange(a + 1, a + k)]
        span += [torch.full((len(real),), -1), torch.full((k - 1,), r)]
        anchor += [real, torch.full((k - 1,), a)]
        length += len(real)
        slots.append(torch.arange(length - 1, length + k - 1))
        length += k - 1
        start = a + 1
    pieces.append(tokens[start:])
    pos.append(torch.arange(start, N))
    span.append(torch.full((N - start,), -1))
    anchor.append(torch.arange(start, N))
    targets = torch.stack([tokens[a + 1:a + k + 1] for a in anchors.tolist()])
    return Regions(torch.cat(pieces), torch.cat(pos), torch.cat(span), torch.cat(anchor),
                   torch.stack(slots), targets)


def region_visible(span, pos, anchor):
    """Blocked-causal "may attend" matrix (..., L, L) from a layout's span, pos and anchor (..., L)
    (as in Regions; one row or a batch): every query sees the real tokens up to its anchor; a mask
    token also sees the masks of its own region up to itself. Real tokens never see a mask."""
    i = torch.arange(span.size(-1), device=span.device)
    sees_real = (span == -1)[..., None, :] & (pos[..., None, :] <= anchor[..., :, None])
    same_span = ((span[..., :, None] == span[..., None, :]) & (span[..., :, None] >= 0)
                 & (i[None, :] <= i[:, None]))
    return sees_real | same_span


def regions_per_sequence(seq_len, k_max):
    """Paper A's layout: N / (2 k_max) MTP regions in a sequence of N tokens, at least one."""
    return max(1, (seq_len + 1) // (2 * k_max))


def pack_batch(batch, k, n_regions, mask_ids, generator=None, device=None):
    """pack_regions for every row of batch (B, N) with the same k and region count: returns idx,
    pos, visible (B, L, L), slots (B, R, k), targets (B, R, k), on `device` (default: the batch's).
    Rows get the same layout length because the counts are equal. The layouts are drawn on the CPU
    (small, sequential); the (B, L, L) matrix is built in one batched step where it is used: built
    row by row on the CPU, it cost seconds per step on a busy host."""
    device = device or batch.device
    packed = [pack_regions(row, k, n_regions, mask_ids, generator) for row in batch.cpu()]
    stack = lambda name: torch.stack([getattr(p, name) for p in packed]).to(device)
    span, pos, anchor = stack("span"), stack("pos"), stack("anchor")
    return stack("idx"), pos, region_visible(span, pos, anchor), stack("slots"), stack("targets")


@dataclass
class StudentForcedConfig:
    # "hard": teacher argmax (default), "soft": KL(teacher || student), "data": ground truth
    target: str = "hard"
    # weight of an extra next-token loss on the real (prefix) positions
    prefix_loss: float = 0.0


def student_forced_loss(student, teacher, idx, pos, visible, slots, targets,
                        cfg=StudentForcedConfig(), n_real_vocab=None, loss_weight=None):
    """Student-forced distillation (Paper A). The student predicts k tokens per region; its argmax
    proposals replace the masks; the frozen teacher scores that text with the same layout, which
    gives, at every slot, the teacher's next token given the prefix and the student's own earlier
    proposals. The student is trained to match. teacher may be the student itself when its adapters
    are gated (a proposal is no mask: no adapter runs). loss_weight (B, N), over the real tokens by
    position, marks the targets that count (e.g. answers only): a slot counts if the token at its
    position + 1 does, a prefix-loss target if it does. Returns (loss, metrics)."""
    V = n_real_vocab or student.cfg.vocab_size
    logits = student(idx, pos, visible=visible)[..., :V]                   # (B, L, V)
    B, R, k = slots.shape
    rows = torch.arange(B, device=idx.device)[:, None, None]
    s = logits[rows, slots]                                                # (B, R, k, V)
    proposals = s.argmax(-1)
    if loss_weight is None:         # every position counts; the layout is longer than the sequence
        loss_weight = torch.ones(B, idx.size(1), device=idx.device)
    weight = loss_weight.float().gather(1, pos.gather(1, slots.flatten(1)) + 1)   # (B, R * k)
    per_slot = lambda losses: _weighted_mean(losses, weight)
    metrics = {}
    if cfg.target == "data":
        ce = F.cross_entropy(s.flatten(0, 2).float(), targets.flatten(), reduction="none")
        loss = per_slot(ce)
    else:
        forced = idx.clone()
        # masks -> the student's own proposals
        forced[rows, slots[..., 1:]] = proposals[..., :-1]
        with torch.no_grad():
            t = teacher(forced, pos, visible=visible)[..., :V][rows, slots]  # (B, R, k, V)
        if cfg.target == "hard":
            ce = F.cross_entropy(s.flatten(0, 2).float(), t.argmax(-1).flatten(), reduction="none")
            loss = per_slot(ce)
        elif cfg.target == "soft":
            loss = per_slot(topn_kl(s, t))
        else:
            raise ValueError(f"unknown student-forced loss target {cfg.target!r} (hard, soft "
                             f"or data)")
        agree = (proposals == t.argmax(-1)).float()
        finite = _finite(s, t)
        metrics.update({f"agree{j + 1}": finite * agree[..., j].mean().item() for j in range(k)})
    if cfg.prefix_loss:
        mask_ids = torch.tensor(student.cfg.mask_token_ids, dtype=torch.long, device=idx.device)
        real = ~torch.isin(idx, mask_ids)
        metrics["prefix_loss"] = _prefix_loss(logits, idx, pos, real, loss_weight.float())
        loss = loss + cfg.prefix_loss * metrics["prefix_loss"]
        metrics["prefix_loss"] = metrics["prefix_loss"].item()
    metrics["acc"] = _finite(s) * (proposals == targets).float().mean().item()
    return loss, metrics


def _prefix_loss(logits, idx, pos, real, loss_weight):
    """Next-token cross-entropy at real tokens whose successor (position + 1) is the next real token
    in the row, over the successors that loss_weight (B, N) counts."""
    B = idx.size(0)
    losses, weights = [], []
    for b in range(B):
        r = real[b].nonzero().squeeze(1)
        cur, nxt = r[:-1], r[1:]
        ok = pos[b, nxt] == pos[b, cur] + 1
        losses.append(F.cross_entropy(logits[b, cur[ok]].float(), idx[b, nxt[ok]],
                                      reduction="none"))
        weights.append(loss_weight[b, pos[b, nxt[ok]]])
    return _weighted_mean(torch.cat(losses), torch.cat(weights))
