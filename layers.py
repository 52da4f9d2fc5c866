"""
The pieces model.py's Transformer is built from: norms, the rotary embedding, linear layers with
and without (gated) LoRA, the KV cache and the "may attend" matrix, attention, the MLP, the block,
and the MTP head. The conventions for positions, `visible` and `slots` are model.py's.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# queries up to this long (a decoding step's) attend by plain matmuls, longer ones by SDPA's kernels
SHORT_QUERY = 64


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
