"""
transformers side by side: the same weights in transformers' own implementation (bench.py's `hf`).

- `hf_model`: a transformers model with a model's main weights (no heads, adapters or mask tokens).
- `hf_generate`: transformers' greedy `generate` on one prompt.
"""

from pathlib import Path

import torch

import weights
from files import read_json


def hf_model(model, source):
    """A transformers model with `model`'s main weights (no heads, no adapters, no mask tokens), or
    the reason there is none. Llama is rebuilt from our own tensors (no files or network needed,
    GGUF sources included); GPT-2 is read from its Hugging Face folder."""
    try:
        import transformers
    except ImportError:
        return None, "transformers is not installed (pip install transformers)"
    cfg = model.cfg
    if cfg.lora_rank and not cfg.lora_gated:
        return None, ("the model carries ungated LoRA adapters, which transformers' Llama does not "
                      "have")
    if cfg.arch == "gpt2":
        folder = Path(str(source))
        config = folder / "config.json"
        if not config.is_file() or read_json(config).get("format") == "nanomtp":
            return None, "a GPT-2 model is compared only when loaded from its Hugging Face folder"
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        return hf.to(device=model.embed.weight.device, dtype=model.embed.weight.dtype).eval(), None
    # mask tokens are never predicted
    vocab = cfg.mask_token_ids[0] if cfg.mask_token_ids else cfg.vocab_size
    rope = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    rope = {"rope_parameters": rope} if int(transformers.__version__.split(".")[0]) >= 5 else \
        {"rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling}
    hf_cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, **rope)
    ours = model.state_dict()
    rows = ("embed.weight", "lm_head.weight")   # their vocabulary has no mask tokens
    state = {theirs: ours[name][:vocab] if name in rows else ours[name]
             for name, theirs, _ in weights.llama_table(cfg)}
    hf = transformers.LlamaForCausalLM(hf_cfg).to(dtype=model.embed.weight.dtype)
    result = hf.load_state_dict(state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:
        # a bug in weights.llama_table, not bad input
        raise RuntimeError(f"Llama names do not map: {result}")
    if cfg.tie_embeddings:
        hf.tie_weights()
    return hf.to(model.embed.weight.device).eval(), None


@torch.no_grad()
def hf_generate(hf, prompt, n, stop_ids):
    """transformers' greedy generate on one prompt: the new tokens, ending with the stop token where
    one came."""
    device = next(hf.parameters()).device
    # static cache: CUDA only pays
    cache = {"cache_implementation": "static"} if device.type == "cuda" else {}
    out = hf.generate(torch.tensor([prompt], device=device), max_new_tokens=n, do_sample=False,
                      eos_token_id=list(stop_ids) or None, pad_token_id=0, **cache)
    return out[0, len(prompt):].tolist()
