"""
The tiny random models every decoding test builds, defined once (CPU, float32, no weights).

- `tiny`: a 2-block random model, optionally bigram-like so head drafts are often accepted.
- `default_init`: a 2-block model at the model's own init, for training and file tests.
- `prompt`, `case`, `MODELS`: prompts and (model, greedy reference) pairs, built once per key.
- `reading`, `fused`, `head_start`: models whose heads read a fused head state (EAGLE-3 taps).
- `assert_exercised`: drafts were both accepted and rejected.
- `with_mask_oracle`: mask-token drafts that are right except where told, so verified@K accepts.
- `strategy_steps`, `top`: a strategy stepped by hand; `SMALL`, `read_log`, `run_cli`: train.py runs.
- `ChatChars`: a character tokenizer with the ChatML template, the fake of the bundled model's.
"""

import json

import torch

import model
import train
from chars import CharTokenizer
from decode import generate, make_strategy

V = 60
TAPS = [0, 1]   # of three blocks: the first, the middle, and (always) the last


def tiny(seed, arch="llama", vocab=V, heads=0, std=0.4, residual=None, **kw):
    """A tiny random model with all parameters drawn with a large std (so outputs are not degenerate).
    residual=r (e.g. 0.01) makes it bigram-like: unit norms, residual branches scaled by r, heads that read only the
    next token's embedding, untied embeddings, so head drafts agree with the main model often."""
    torch.manual_seed(seed)
    cfg = dict(arch=arch, vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2 if arch == "llama" else 4, n_embd=32,
               head_dim=8, intermediate_size=64, max_seq_len=256, bias=arch == "gpt2",
               tie_embeddings=residual is None)   # tied + bigram-like would just repeat the last token
    cfg.update(kw)
    m = model.Transformer(model.Config(**cfg))
    if heads:
        m.add_heads(heads, init="random")
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(0.0, std)
            if residual is not None:
                if "norm" in name and name.endswith("weight"):
                    p.fill_(1.0)
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    p.mul_(residual)
        if residual is not None:
            for h in m.heads:
                h.proj.weight.zero_()
                h.proj.weight[:, cfg["n_embd"]:] = torch.eye(cfg["n_embd"])   # take norm(emb(next token))
    return m.eval()


def default_init(vocab=40, heads=0, seed=0, **kw):
    """A 2-block Llama at model.py's own init (tiny draws larger weights), in training mode."""
    torch.manual_seed(seed)
    cfg = dict(arch="llama", vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
               head_dim=8, intermediate_size=64, max_seq_len=256)
    m = model.Transformer(model.Config(**{**cfg, **kw}))
    if heads:
        m.add_heads(heads, init="random")
    return m


def prompt(seed, n, vocab=V):
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, vocab - 4, (n,), generator=g).tolist()   # the last ids stay free for mask tokens


def assert_exercised(stats, depths=1):
    """Some drafts accepted and some rejected at each of the first `depths` depths."""
    assert len(stats.proposed) >= depths, stats
    for d in range(depths):
        assert 0 < stats.accepted[d] < stats.proposed[d], f"depth {d + 1}: {stats}"


# (model seed, residual) pairs: fully random models (drafts mostly rejected) and bigram-like ones (mostly accepted)
MODELS = [(0, None), (1, 0.005), (2, 0.01), (3, 0.02)]
_cache = {}


def case(seed, residual, arch="llama"):
    """A model with two heads, two prompts (lengths from 1 to 20) and their greedy ar outputs; built once."""
    key = (seed, residual, arch)
    if key not in _cache:
        m = tiny(seed, arch=arch, heads=2, residual=residual)
        prompts = [prompt(seed, 1 + 3 * seed), prompt(seed + 50, 20 - seed)]
        _cache[key] = m, [(p, generate(m, [p], 24, method="ar")) for p in prompts]
    return _cache[key]


def reading(seed, residual=None):
    """A three-block model with two heads whose input projections read the state they get (a bigram-like model's
    heads otherwise read only the next token, and no fusion would matter)."""
    m = tiny(seed, heads=2, residual=residual, n_layer=3)
    C = m.cfg.n_embd
    with torch.no_grad():
        for h in m.heads:
            h.proj.weight[:, :C] += 0.3 * torch.randn(C, C) / C ** 0.5
    return m


def fused(seed, residual=None, noise=0.3):
    """reading(seed, residual) with a fusion of TAPS whose weight moved away from "take the last" by `noise`."""
    m = reading(seed, residual)
    m.add_fusion(TAPS)
    with torch.no_grad():
        m.fuse.weight.add_(noise * torch.randn_like(m.fuse.weight) / m.cfg.n_embd ** 0.5)
    return m


def head_start(m, t):
    """The state head 1 starts from, recomputed here without caches: blocks' outputs -> fuse."""
    x, taps = m.hidden(t, keep_taps=True)
    assert len(taps) == len(m.cfg.head_taps)
    return m.fuse(torch.cat(taps + [x], dim=-1))


def strategy_steps(m, method, p, steps):
    """A tree strategy after prefill(p), and a generator yielding it before each of `steps` steps."""
    s = make_strategy(m, method, len(p) + 4 * steps + 8)
    s.prefill([p])
    for _ in range(steps):
        yield s
        s.step([True])


def top(m, h, k):
    return m.logits(h[0, -1]).topk(k).indices.tolist()


SMALL = ["--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--n_kv_head", "2", "--batch_size", "4",
         "--seq_len", "48", "--eval_every", "1000", "--eval_batches", "1", "--device", "cpu"]


def read_log(out):
    """The step records of the training log beside checkpoint folder out."""
    return [r for r in map(json.loads, open(f"{out}.log.jsonl")) if "loss" in r]


def run_cli(argv, capsys):
    """train.py's command line in process: (exit status, stderr)."""
    status = train.cli([str(a) for a in argv])
    return status, capsys.readouterr().err


def with_mask_oracle(m, mask_ids, ref, wrong=lambda pos: pos % 3 == 0):
    """Make the mask positions of m predict the reference text `ref` (prompt + greedy output) except where
    wrong(pos): random models' mask drafts are almost never right, and the acceptance path needs testing too.
    Only rows holding a mask token change, so the model's next-token predictions (the verifier) are untouched."""
    plain = m.forward
    masks = torch.tensor(mask_ids)

    def forward(idx, pos=None, caches=None, visible=None, return_head_state=False):
        out = plain(idx, pos, caches, visible, return_head_state)
        logits = out[0] if return_head_state else out
        pos = m.default_pos(idx) if pos is None else pos
        for b, t in torch.isin(idx, masks).nonzero().tolist():
            target = int(pos[b, t]) + 1        # a mask at position p stands for the token at p, predicts p + 1
            if target < len(ref) and not wrong(target):
                logits[b, t] = -10.0
                logits[b, t, ref[target]] = 10.0
        return out

    m.forward = forward
    return m


class ChatChars(CharTokenizer):
    """A character tokenizer with the ChatML specials, so the chat template works: the fake of the
    bundled model's tokenizer."""
    system_prompt = "Be brief."

    def __init__(self):
        specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
        super().__init__([*specials, *CharTokenizer().tokens[1:]], specials)
        self.stop_ids = [self.special["<|im_end|>"], self.eos_id]
