"""
One decoder-only Transformer for the GPT-2, Llama and Qwen2/Qwen3 families, a static KV cache, and
DeepSeek-V3-style MTP heads.

What is here: the config and the network, with its heads, adapters and mask tokens; its pieces
(attention, the KV cache, the block, the MTP head) are layers.py's. What is not: loading weights
(load.py, weights.py), losses (distill.py), generation loops (decode.py).

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

from dataclasses import dataclass, field, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import (Block, Linear, LoRALinear, MTPHead, make_caches, make_norm, rope_inv_freq,
                    visibility)


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
