"""
One decoder-only Transformer for the GPT-2, Llama and Qwen2/Qwen3 families, a static KV cache, and
DeepSeek-V3-style MTP heads.

What is here: the config, the network, the cache, the heads. What is not: loading weights (load.py,
weights.py), losses (distill.py), generation loops (decode.py).

Conventions used everywhere in the project:
- `pos` holds the absolute position of every input token, shape (B, T). RoPE (or GPT-2's learned
  positions) reads it, and the KV cache stores a token's keys and values in slot `pos`. A query at
  position p sees the cache slots 0..p. Stale slots beyond p (rejected drafts, mask tokens, padding)
  are therefore invisible until they are overwritten, which is all the "rollback" speculative
  decoding ever needs.
- `visible`, when given, is a boolean (B, T, S) "may attend" matrix that replaces the position rule
  (Paper A's blocked-causal training layout needs it). S is T without a cache, the cache length with
  one.
- `slots`, when given, (B, T) cache slots that differ from the positions (tree drafts verify
  candidates in scratch slots beyond the sequence); it always comes with a `visible`, since the
  position rule assumes slot = position.
- The forward pass returns logits for every position and, on request, the state MTP head 1 starts
  from: the last block's output (the residual stream before the final norm), or its learned fusion
  with lower blocks' outputs.
"""

import math
from dataclasses import dataclass, field, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

# queries up to this long (a decoding step's) attend by plain matmuls, longer ones by SDPA's kernels
SHORT_QUERY = 64


@dataclass
class Config:
    # "llama" (RMSNorm, SwiGLU, RoPE) or "gpt2" (LayerNorm, GELU, learned positions)
    arch: str = "llama"
    vocab_size: int = 49152
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3             # grouped-query attention: n_head must be a multiple of n_kv_head
    n_embd: int = 576
    head_dim: int = 64
    intermediate_size: int = 1536  # MLP width
    max_seq_len: int = 2048        # size of the position table and the default KV cache
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # {"rope_type": "llama3" | "linear", ...} as in a Hugging Face config
    rope_scaling: dict | None = None
    tie_embeddings: bool = True
    bias: bool = False             # biases in linear layers (GPT-2: True)
    qkv_bias: bool = False         # biases on the q, k and v projections only (Qwen2)
    qk_norm: bool = False          # an RMSNorm over each head of q and of k, before RoPE (Qwen3)
    n_mtp_heads: int = 0           # DeepSeek-style MTP modules (Paper B)
    # Paper A's <mtp> token(s), appended to the vocabulary
    mask_token_ids: list = field(default_factory=list)
    lora_rank: int = 0             # LoRA adapters on every linear layer of the blocks (0 = none)
    # adapters act on mask-token positions only: next-token predictions stay exact
    lora_gated: bool = False
    # blocks whose outputs head 1 also reads, fused (EAGLE-3)
    head_taps: list = field(default_factory=list)

    def __post_init__(self):
        if self.arch not in ("llama", "gpt2"):
            raise ValueError(f"unsupported architecture {self.arch!r}: expected 'llama' or 'gpt2'")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of "
                             f"n_kv_head={self.n_kv_head}")

    def to_dict(self):
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalised in float32, scaled in the input's dtype (Hugging Face's order)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(cfg):
    if cfg.arch == "gpt2":
        return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
    return RMSNorm(cfg.n_embd, cfg.norm_eps)


def rope_inv_freq(cfg, device=None):
    """Inverse frequencies of the rotary embedding in float32 (as Hugging Face computes them), with
    the rope_scaling variants we support. Derived from the config on every call, never stored: a
    stored buffer would follow the model's dtype, and bf16 frequencies are off by whole radians at
    long positions."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta
                      ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / rs["factor"]
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        # long waves: scaled
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)  # between: blended
        return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


def apply_rope(x, cos, sin):
    # x: (B, n_head, T, head_dim); cos, sin: (B, 1, T, head_dim). Split-half layout (Hugging Face).
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Linear(nn.Linear):
    """nn.Linear that accepts the LoRA gate and ignores it, so every projection of a block is called
    the same way."""

    def forward(self, x, gate=None):
        return super().forward(x)


class LoRALinear(Linear):
    """A Linear with a low-rank adapter, y = W x + b + B A x, that Transformer.add_lora swaps in for
    a Linear (sharing its weight and bias). Gated: the adapter's output is multiplied by gate
    (B, T, 1), 1 at mask tokens and 0 elsewhere. B starts at zero, so a new adapter changes
    nothing."""

    def __init__(self, base, rank, gated):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.gated = gated
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.randn(rank, self.in_features, device=device)
                                   / self.in_features ** 0.5)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))

    def forward(self, x, gate=None):
        delta = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return super().forward(x) + (delta * gate if self.gated else delta)


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer, written at explicit positions
    (slot = position)."""

    def __init__(self, batch_size, max_len, n_kv_head, head_dim, device=None, dtype=None):
        super().__init__()
        shape = (batch_size, max_len, n_kv_head, head_dim)   # (B, S, n_kv_head, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, slots, k, v):
        # slots: (B, T); k, v: (B, T, n_kv_head, head_dim). Advanced indexing writes every row at
        # its own slots.
        rows = torch.arange(k.size(0), device=k.device)[:, None]
        self.k[rows, slots] = k
        self.v[rows, slots] = v
        return self.k, self.v


def visibility(cfg, pos, cache=None, visible=None):
    """The "may attend" matrix, built once per forward and shared by the layers: `visible` (B, T, S)
    when given, else a query sees the keys at or before its position (the cache's slots, or the
    other inputs when there is no cache). Returned grouped as Attention takes it, (B, 1, g*T, S):
    row j*T + t is query t for the j-th of the g = n_head / n_kv_head query heads of a group."""
    if visible is None:
        key_pos = pos if cache is None else torch.arange(cache.k.size(1), device=pos.device)[None]
        visible = key_pos[:, None, :] <= pos[:, :, None]
    B, T, S = visible.shape
    g = cfg.n_head // cfg.n_kv_head
    return visible[:, None, None].expand(-1, -1, g, -1, -1).reshape(B, 1, g * T, S)


def make_caches(cfg, n_layer, batch_size, max_len, device, dtype):
    return [KVCache(batch_size, max_len, cfg.n_kv_head, cfg.head_dim, device, dtype)
            for _ in range(n_layer)]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        hd, qkv_bias = cfg.head_dim, cfg.bias or cfg.qkv_bias
        self.q_proj = Linear(cfg.n_embd, cfg.n_head * hd, bias=qkv_bias)
        self.k_proj = Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=qkv_bias)
        self.v_proj = Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=qkv_bias)
        self.o_proj = Linear(cfg.n_head * hd, cfg.n_embd, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps)
            self.k_norm = RMSNorm(hd, cfg.norm_eps)

    def forward(self, x, slots, rope, cache, visible, gate=None):
        # visible: grouped as visibility() returns it, or None for causal attention over x alone
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x, gate).view(B, T, self.cfg.n_head, hd)
        k = self.k_proj(x, gate).view(B, T, self.cfg.n_kv_head, hd)
        v = self.v_proj(x, gate).view(B, T, self.cfg.n_kv_head, hd)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)         # over head_dim, each head on its own
        if rope is not None:
            cos, sin = rope                               # (B, 1, T, hd)
            q = apply_rope(q.transpose(1, 2), cos, sin).transpose(1, 2)
            k = apply_rope(k.transpose(1, 2), cos, sin).transpose(1, 2)
        # causal over these inputs alone (training): the flash kernel, which takes no matrix
        if visible is None:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), is_causal=True,
                                               enable_gqa=self.cfg.n_head != self.cfg.n_kv_head)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1), gate)
        if cache is not None:
            k, v = cache.update(slots, k, v)              # (B, S, n_kv_head, hd), S = cache length
        # Grouped-query attention with the g = n_head / n_kv_head query heads of a group folded into
        # the query length: every kernel that takes a mask can run it, and keys and values are never
        # repeated (SDPA's enable_gqa with a mask falls back to a kernel that copies them, costly
        # over a long cache or a big batch).
        kv, g = self.cfg.n_kv_head, self.cfg.n_head // self.cfg.n_kv_head
        # (B, kv, g*T, hd)
        q = q.view(B, T, kv, g, hd).permute(0, 2, 3, 1, 4).reshape(B, kv, g * T, hd)
        k, v = k.transpose(1, 2), v.transpose(1, 2)       # (B, kv, S, hd)
        if T <= SHORT_QUERY:
            # A decoding step's few queries: two matmuls and a softmax. The fused kernels tile for
            # long queries and leave most of their tile idle here (about 5x slower per layer on an
            # H200, results/engine/).
            scores = (q * hd ** -0.5) @ k.transpose(-1, -2)
            scores = torch.where(visible, scores, float("-inf"))
            y = torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        y = y.view(B, kv, g, T, hd).permute(0, 3, 1, 2, 4)  # (B, T, kv, g, hd)
        return self.o_proj(y.reshape(B, T, -1), gate)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gated = cfg.arch == "llama"
        if self.gated:
            self.gate_proj = Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        self.up_proj = Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, gate=None):
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x, gate)) * self.up_proj(x, gate), gate)
        return self.down_proj(F.gelu(self.up_proj(x, gate), approximate="tanh"), gate)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, slots, rope, cache, visible, gate=None):
        x = x + self.attn(self.attn_norm(x), slots, rope, cache, visible, gate)
        return x + self.mlp(self.mlp_norm(x), gate)


class MTPHead(nn.Module):
    """One DeepSeek-V3 MTP module: h' = W [norm(h_prev); norm(emb(next token))], then one
    Transformer block. The embedding, the final norm and the output head are the main model's
    (shared)."""

    def __init__(self, cfg):
        super().__init__()
        self.h_norm = make_norm(cfg)
        self.e_norm = make_norm(cfg)
        self.proj = nn.Linear(2 * cfg.n_embd, cfg.n_embd, bias=False)
        self.block = Block(cfg)

    def forward(self, h_prev, emb, slots, rope, cache, visible):
        x = self.proj(torch.cat([self.h_norm(h_prev), self.e_norm(emb)], dim=-1))
        return self.block(x, slots, rope, cache, visible)


# --------------------------------------------------------------------------------------------------
# the model

def looped_head(depth, n_heads):
    """Paper B's looped schedule, the one rule for decoding and for extension: depth d (1-based) is
    served by head d while there is one, and by the last head beyond."""
    return min(depth, n_heads) - 1


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.arch == "gpt2":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.heads = nn.ModuleList(MTPHead(cfg) for _ in range(cfg.n_mtp_heads))
        self.fuse = None
        if cfg.head_taps:
            self.add_fusion(cfg.head_taps)
        if cfg.lora_rank:
            self.add_lora(cfg.lora_rank, cfg.lora_gated)

    # --- pieces shared by the backbone and the heads

    def rope(self, pos):
        """cos/sin of the rotary embedding at positions pos (B, T), shaped (B, 1, T, head_dim); None
        for GPT-2."""
        if self.cfg.arch != "llama":
            return None
        angles = pos[..., None].float() * rope_inv_freq(self.cfg, pos.device)   # (B, T, head_dim/2)
        angles = torch.cat([angles, angles], dim=-1)[:, None]     # (B, 1, T, head_dim)
        dtype = self.embed.weight.dtype
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def logits(self, h, weight=None):
        """Output head on the residual stream h. weight: optional rows of the output matrix (a draft
        vocabulary)."""
        h = self.norm(h)
        if weight is not None:
            return F.linear(h, weight)
        logits = self.lm_head(h)
        # mask tokens are inputs only (appended last): never predict one
        if self.cfg.mask_token_ids:
            logits[..., self.cfg.mask_token_ids[0]:] = float("-inf")
        return logits

    @staticmethod
    def default_pos(idx):
        return torch.arange(idx.size(1), device=idx.device).expand(idx.size(0), -1)

    # --- the backbone

    def hidden(self, idx, pos=None, caches=None, visible=None, slots=None, keep_taps=False):
        """idx (B, T) token ids -> the last block's output (B, T, n_embd), before the final norm.
        pos (B, T) absolute positions (default 0..T-1); caches: list of KVCache, one per layer, or
        None; slots (B, T): where the cache stores the keys (default: pos). keep_taps: return
        (output, the outputs of the blocks cfg.head_taps names), the inputs of head_state()."""
        # a plain training forward: no matrix
        causal = pos is None and caches is None and visible is None
        if pos is None:
            pos = self.default_pos(idx)
        x = self.embed(idx)
        if self.cfg.arch == "gpt2":
            x = x + self.pos_embed(pos)
        rope = self.rope(pos)
        gate = self.lora_gate(idx)
        visible = None if causal else visibility(
            self.cfg, pos, None if caches is None else caches[0], visible)
        taps = []
        for i, block in enumerate(self.blocks):
            x = block(x, pos if slots is None else slots, rope,
                      None if caches is None else caches[i], visible, gate)
            if keep_taps and i in self.cfg.head_taps:
                taps.append(x)
        return (x, taps) if keep_taps else x

    def forward(self, idx, pos=None, caches=None, visible=None, return_head_state=False,
                slots=None):
        """idx (B, T) token ids -> logits (B, T, vocab) [, head_state (B, T, n_embd)]; arguments as
        in hidden()."""
        if not return_head_state:
            return self.logits(self.hidden(idx, pos, caches, visible, slots))
        x, taps = self.hidden(idx, pos, caches, visible, slots, keep_taps=True)
        return self.logits(x), self.head_state(x, taps)

    # --- Paper A: mask tokens and (gated) LoRA

    def lora_gate(self, idx):
        """(B, T, 1) gate of gated LoRA adapters: 1 at mask tokens, 0 elsewhere; None in a model
        without mask tokens (ungated adapters ignore it)."""
        if not self.cfg.mask_token_ids:
            return None
        # mask tokens are the last ids of the vocabulary; a comparison, unlike a tensor of ids, is
        # CUDA-graph safe
        return (idx >= self.cfg.mask_token_ids[0])[..., None].to(self.embed.weight.dtype)

    def add_lora(self, rank, gated):
        """Swap every linear layer of the backbone blocks for a LoRALinear (the MTP heads keep
        theirs plain).
        gated: adapters act at mask tokens only, so next-token predictions stay exactly the
        original's."""
        for block in self.blocks:
            for parent in list(block.modules()):
                for name, child in list(parent.named_children()):
                    if type(child) is Linear:
                        setattr(parent, name, LoRALinear(child, rank, gated))
        # recorded for checkpoints; forward never reads it
        self.cfg.lora_rank, self.cfg.lora_gated = rank, gated

    def add_mask_tokens(self, n):
        """Grow the vocabulary by n mask tokens; their embedding (and untied output) rows are drawn
        from the mean and spread of the existing rows. Returns the new ids."""
        old = self.cfg.vocab_size
        ids = list(range(old, old + n))

        def grown(weight):
            new = weight.detach().mean(0) + weight.detach().std(0) * torch.randn(
                n, weight.size(1), device=weight.device)
            return nn.Parameter(torch.cat([weight.detach(), new.to(weight.dtype)]))

        self.embed.weight = grown(self.embed.weight)
        self.embed.num_embeddings = old + n
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            self.lm_head.weight = grown(self.lm_head.weight)
        self.lm_head.out_features = old + n
        self.cfg.vocab_size = old + n
        self.cfg.mask_token_ids = self.cfg.mask_token_ids + ids
        return ids

    # --- the MTP heads

    def head_state(self, x, taps):
        """The state MTP head 1 starts from, computed here and nowhere else: the last block's output
        x (DeepSeek-V3), or with cfg.head_taps a learned fusion of the tapped blocks' outputs and x
        (EAGLE-3): lower blocks still carry token-level information that the last one has already
        given up for its own next-token prediction.
        x (B, T, C) and taps (as hidden(keep_taps=True) returns them) -> (B, T, C)."""
        if self.fuse is None:
            return x
        return self.fuse(torch.cat(taps + [x], dim=-1))

    def add_fusion(self, taps):
        """Make head 1 start from fuse(cat(outputs of the blocks `taps`, last output)). fuse starts
        as "take the last output", so a new fusion changes nothing until it trains."""
        n = self.cfg.n_layer
        if not (taps and all(type(t) is int for t in taps) and list(taps) == sorted(set(taps))
                and 0 <= taps[0] and taps[-1] < n - 1):
            raise ValueError(f"head_taps {taps}: expected increasing indices of blocks before the "
                             f"last (0..{n - 2} in a model of {n} blocks); the last block's output "
                             f"is always fused")
        C = self.cfg.n_embd
        self.fuse = nn.Linear((len(taps) + 1) * C, C, bias=False, device=self.embed.weight.device,
                              dtype=self.embed.weight.dtype)
        with torch.no_grad():
            self.fuse.weight.zero_()
            self.fuse.weight[:, -C:].copy_(torch.eye(C))
        self.cfg.head_taps = list(taps)

    def head_forward(self, module, h_prev, next_idx, pos, cache=None, visible=None, slots=None):
        """Run MTP module `module` (an index into self.heads): h_prev (B, T, C) is the previous
        depth's hidden state at positions pos, next_idx (B, T) the token one step further; slots as
        in hidden(). Returns this depth's hidden state."""
        return self.heads[module](h_prev, self.embed(next_idx), pos if slots is None else slots,
                                  self.rope(pos), cache, visibility(self.cfg, pos, cache, visible))

    def make_caches(self, batch_size, max_len=None, n_depths=0, device=None, dtype=None):
        """KV caches for the backbone and, if n_depths > 0, one single-layer cache per draft
        depth."""
        max_len = max_len or self.cfg.max_seq_len
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        main = make_caches(self.cfg, self.cfg.n_layer, batch_size, max_len, device, dtype)
        depths = [make_caches(self.cfg, 1, batch_size, max_len, device, dtype)[0]
                  for _ in range(n_depths)]
        return main, depths

    def extend_heads(self, n):
        """Looped extension (Paper B): n new MTP modules, each a copy of the head that the looped
        schedule gives its depth, so the extended model drafts exactly as the looped one until the
        copies train."""
        for _ in range(n):
            source = self.heads[looped_head(len(self.heads) + 1, len(self.heads))]
            self.add_heads(1)
            self.heads[-1].load_state_dict(source.state_dict())

    def add_heads(self, n, init="last_block"):
        """Append n new MTP modules. init: "last_block" copies the last backbone block (residual
        outputs zeroed so the new head starts as the identity on its input), "random" uses the
        default init (outputs also zeroed)."""
        for _ in range(n):
            head = MTPHead(self.cfg).to(self.embed.weight.device, self.embed.weight.dtype)
            if init == "last_block":
                head.block.load_state_dict(self.blocks[-1].state_dict())
            elif init != "random":
                raise ValueError(f"unknown head init {init!r} (expected 'last_block' or 'random')")
            # proj maps [norm(h); norm(e)] to the width: start as "take h" so the block sees the
            # backbone's state
            with torch.no_grad():
                head.proj.weight.zero_()
                head.proj.weight[:, :self.cfg.n_embd].copy_(torch.eye(self.cfg.n_embd))
                head.block.attn.o_proj.weight.zero_()
                head.block.mlp.down_proj.weight.zero_()
            self.heads.append(head)
        self.cfg.n_mtp_heads = len(self.heads)

    def num_params(self):
        # parameters() counts a tied embedding once
        return sum(p.numel() for p in self.parameters())
