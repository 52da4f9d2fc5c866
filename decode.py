"""
Generation: one `generate` loop, decoding methods as small strategies.

- `ar`            plain autoregressive decoding, batched, one token per forward.
- `mtp@D`         Paper B: the MTP heads draft D tokens, the main model verifies them in one forward. Lossless:
                  greedy output is identical to `ar`, sampled output follows the same distribution.
- `static@K`      Paper A: K-1 mask tokens after the text, emit all K predictions per forward. LOSSY.
- `confadapt@TAU` Paper A: as static, but emit only the leading predictions whose top-1 probability >= TAU
                  (at least one). LOSSY.
- `verified@K`    mask-token drafts checked by the model's own next-token predictions in the next forward.
                  Lossless with respect to the mask-token model's own one-token-at-a-time decoding.

Every strategy keeps a static KV cache (model.py): a token's keys live in slot = its position, a query sees slots up to
its own position, so rejected drafts and mask tokens need no rollback - they are simply overwritten later.
Speculative methods decode one sequence at a time (batch 1); `ar` batches. Nothing here trains or measures speed
(bench.py does); each call can fill a `Stats` with forwards and per-depth acceptance.

CLI: python decode.py --init_from smollm2 --prompt "What is the capital of France?" [--method mtp@3]
"""

import argparse
import time
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


# ----------------------------------------------------------------------------------------------------------------
# sampling and verification

@dataclass
class Sampling:
    temperature: float = 0.0      # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self):
        return self.temperature <= 0

    def probs(self, logits):
        """The distribution we sample from: softmax(logits / T) after top-k and top-p truncation. (..., V)"""
        if self.greedy:  # a point mass on the argmax: lets the exact-sampling code double as the greedy code
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.size(-1)).float()
        logits = logits.float() / self.temperature
        if self.top_k is not None:
            kth = torch.topk(logits, min(self.top_k, logits.size(-1)), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p is not None:
            sorted_p, order = torch.sort(probs, dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > self.top_p     # keep the smallest prefix reaching top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def pick(self, logits, generator=None):
        """One token per row of logits (..., V) -> (...)."""
        if self.greedy:
            return logits.argmax(-1)
        p = self.probs(logits)
        return torch.multinomial(p.reshape(-1, p.size(-1)), 1, generator=generator).view(p.shape[:-1])


def verify(drafts, draft_probs, target_logits, sampling, generator=None):
    """Speculative verification of one sequence (Leviathan et al., Chen et al.).
    drafts (D,) proposed tokens; draft_probs (D, V) the distributions they were drawn from (None when greedy);
    target_logits (D+1, V) the main model's logits at the position before each draft and after the last.
    Returns (number of drafts accepted, the token the main model adds after them)."""
    if sampling.greedy:   # accept while the draft equals the main model's argmax; identical to plain greedy
        target = target_logits.argmax(-1)
        n = int((drafts == target[:-1]).long().cumprod(0).sum())
        return n, int(target[n])
    p = sampling.probs(target_logits)                                   # (D+1, V)
    for i, x in enumerate(drafts.tolist()):
        u = torch.rand((), generator=generator, device=p.device)
        if u * draft_probs[i, x] <= p[i, x]:                             # accept with min(1, p/q)
            continue
        residual = (p[i] - draft_probs[i]).clamp_min(0)                 # else resample from norm(max(0, p - q))
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[-1], 1, generator=generator))


@dataclass
class Stats:
    """Counters filled by generate. Tokens and forwards count everything (prefill included); tokens per forward
    leaves out the prefill forwards and the tokens they yield, as DESIGN.md "Metrics" defines it, so `ar` has
    exactly one. Acceptance counts only steps that checked at least one draft."""
    tokens: int = 0
    forwards: int = 0
    prefills: int = 0                                  # prompts decoded (one prefill forward each)
    prefill_tokens: int = 0                            # tokens those prefills yielded (k for static@K)
    steps: int = 0                                     # verification steps (speculative methods)
    proposed: list = field(default_factory=list)       # proposed[d]: drafts at depth d+1 that were checked
    accepted: list = field(default_factory=list)       # accepted[d]: drafts at depth d+1 that were accepted
    reached: list = field(default_factory=list)        # reached[d]: steps where depths 1..d+1 were all accepted

    def record(self, n_drafts, n_accepted):
        while len(self.proposed) < n_drafts:
            self.proposed.append(0), self.accepted.append(0), self.reached.append(0)
        if n_drafts == 0:      # a forward with nothing to verify (verified@K after a rejection) is not a step
            return
        self.steps += 1
        for d in range(min(n_accepted + 1, n_drafts)):  # depth d is checked only if every earlier depth passed
            self.proposed[d] += 1
        for d in range(n_accepted):
            self.accepted[d] += 1
            self.reached[d] += 1

    @property
    def tokens_per_forward(self):
        return (self.tokens - self.prefill_tokens) / max(self.forwards - self.prefills, 1)

    @property
    def acceptance_rate(self):
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]

    @property
    def cum_acceptance_rate(self):
        return [r / self.steps if self.steps else 0.0 for r in self.reached]


# ----------------------------------------------------------------------------------------------------------------
# strategies: prefill(prompt) -> first tokens; step() -> tokens from one more main-model forward

def _tensor(ids, device):
    return torch.tensor(ids, dtype=torch.long, device=device)[None]


def _positions(start, n, device):
    return torch.arange(start, start + n, device=device)[None]


class HeadDrafts:
    """Paper B: MTP heads draft `depths` tokens, the main model verifies them.

    Depth d runs MTP module schedule[d-1] on (depth d-1's hidden state at position i, token at i+d) and predicts the
    token at i+d+1. Each depth has its own KV cache and a buffer of its hidden states, both indexed by position.
    A depth's state at position i is final once the token at i+d is known for certain; positions past that were
    computed from drafts and are recomputed on the next step."""

    def __init__(self, model, max_len, depths, schedule=None, draft_vocab=None, sampling=Sampling(), generator=None):
        if len(model.heads) == 0:
            raise ValueError("method mtp needs a model with MTP heads (train.py --mode heads, or --heads FILE)")
        self.schedule = schedule or [min(d, len(model.heads) - 1) for d in range(depths)]  # loop the last head
        if len(self.schedule) != depths or max(self.schedule) >= len(model.heads):
            raise ValueError(f"head schedule {self.schedule} does not fit {depths} depths and {len(model.heads)} heads")
        self.model, self.depths, self.sampling, self.generator = model, depths, sampling, generator
        self.draft_vocab = draft_vocab
        # the output rows of the draft vocabulary, gathered once (a reduced vocabulary makes each draft cheaper)
        self.draft_head = None if draft_vocab is None else model.lm_head.weight[draft_vocab]
        dev, C = model.embed.weight.device, model.cfg.n_embd
        self.limit = max_len             # positions >= limit hold tokens that can never be emitted
        self.max_len = max_len + depths + 1
        self.caches, self.depth_caches = model.make_caches(1, self.max_len, n_depths=depths)
        self.hidden = torch.zeros(depths + 1, 1, self.max_len, C, device=dev, dtype=model.embed.weight.dtype)
        self.tokens = torch.zeros(1, self.max_len, dtype=torch.long, device=dev)
        self.done = [0] * (depths + 1)   # done[d]: positions 0..done[d]-1 of depth d are final

    def prefill(self, prompt):
        n = len(prompt)
        self.tokens[0, :n] = _tensor(prompt, self.tokens.device)
        h = self.model.hidden(self.tokens[:, :n], _positions(0, n, self.tokens.device), self.caches)
        self.hidden[0, :, :n] = h
        self.L = n                       # position of the newest token known for certain (not yet in the cache)
        x = int(self.sampling.pick(self.model.logits(h[0, -1]), self.generator))
        self.tokens[0, n] = x
        return [x]

    def depths_now(self):
        """Draft depths this step: fewer near the end, so no position reaches the limit (GPT-2's learned position
        table ends at max_seq_len). The loop stops once position limit-1 is known, so L <= limit-2 here: D >= 1."""
        return min(self.depths, self.limit - 1 - self.L)

    def draft(self):
        L, D = self.L, self.depths_now()
        probs = []
        for d in range(1, D + 1):
            start = self.done[d]
            pos = _positions(start, L - start, self.tokens.device)
            h = self.model.head_forward(self.schedule[d - 1], self.hidden[d - 1, :, start:L],
                                        self.tokens[:, start + d:L + d], pos, self.depth_caches[d - 1])
            self.hidden[d, :, start:L] = h
            self.done[d] = max(L - d + 1, 0)
            logits = self.model.logits(h[:, -1], self.draft_head)[0]        # predicts the token at L + d
            q = None if self.sampling.greedy else self.sampling.probs(logits)
            tok = self.sampling.pick(logits, self.generator) if q is None else \
                torch.multinomial(q, 1, generator=self.generator)[0]
            if self.draft_vocab is not None:   # back to full-vocabulary ids (and distributions)
                tok = self.draft_vocab[tok]
                if q is not None:
                    q = torch.zeros(self.model.cfg.vocab_size, device=q.device).index_copy_(0, self.draft_vocab, q)
            self.tokens[0, L + d] = tok
            probs.append(q)
        return self.tokens[0, L + 1:L + D + 1], None if self.sampling.greedy else torch.stack(probs)

    def step(self):
        L, D = self.L, self.depths_now()
        drafts, q = self.draft()
        logits, h = self.model(self.tokens[:, L:L + D + 1], _positions(L, D + 1, self.tokens.device), self.caches,
                               return_hidden=True)
        n, nxt = verify(drafts, q, logits[0], self.sampling, self.generator)
        self.hidden[0, :, L:L + n + 1] = h[:, :n + 1]
        self.tokens[0, L + n + 1] = nxt
        self.L = L + n + 1
        self.done[0] = self.L
        return self.tokens[0, L + 1:self.L + 1].tolist(), (D, n)


class MaskDrafts:
    """Paper A: k-1 mask tokens after the text make one forward predict k tokens.

    Each forward feeds the tokens that are not yet in the cache, then the masks; the masks' cache slots are
    overwritten by real tokens in the next forward. tau=None emits all k predictions (static-k), a float emits the
    leading ones whose top-1 probability is at least tau (ConfAdapt, at least one); both are lossy. verify=True
    treats the mask predictions as drafts instead, checked by the model's own next-token predictions in the next
    forward (the fed tokens come before the masks, so those predictions never see a mask)."""

    def __init__(self, model, max_len, mask_ids, k, tau=None, verify=False, sampling=Sampling(), generator=None):
        if k < 2:
            raise ValueError(f"mask-token decoding needs k >= 2, got {k}")
        self.mask_ids = list(mask_ids) if len(mask_ids) > 1 else list(mask_ids) * (k - 1)  # shared or distinct
        if len(self.mask_ids) < k - 1:
            raise ValueError(f"{len(mask_ids)} distinct mask tokens cannot make k={k}")
        self.mask_ids = self.mask_ids[:k - 1]
        self.model, self.k, self.tau, self.check = model, k, tau, verify
        self.sampling, self.generator = sampling, generator
        self.caches, _ = model.make_caches(1, max_len + 2 * k)
        self.limit = max_len             # as in HeadDrafts: no mask at a position whose prediction is never emitted
        self.device = model.embed.weight.device

    def prefill(self, prompt):
        self.L, self.fed, self.drafts, self.q = 0, list(prompt), [], None
        return self.step()[0]

    def step(self):
        fed, m = self.fed, len(self.drafts)
        masks = self.mask_ids[:max(0, min(self.k - 1, self.limit - 1 - self.L - len(fed)))]  # fewer near the end
        ids = _tensor(fed + masks, self.device)
        logits = self.model(ids, _positions(self.L, ids.size(1), self.device), self.caches)[0]
        # row i < len(fed): the next token after fed[i]; the last 1 + len(masks) rows: the tokens after the fed text
        ahead = logits[len(fed) - 1:]
        if not self.check:
            self.L += len(fed)
            self.fed = self.emit(ahead)
            return self.fed, (len(masks), len(self.fed) - 1)    # "accepted" = predictions kept beyond the first
        n, nxt = verify(_tensor(self.drafts, self.device)[0], self.q, logits[len(fed) - 1 - m:len(fed)],
                        self.sampling, self.generator)
        self.L += len(fed) - m + n            # the fed tokens up to the last accepted draft are now in the cache
        out = self.drafts[:n] + [nxt]
        self.drafts, self.q = [], None
        if n == m and masks:                   # the masks followed an accepted text: their predictions are drafts
            self.q = None if self.sampling.greedy else self.sampling.probs(ahead[1:])
            picks = self.sampling.pick(ahead[1:], self.generator) if self.q is None else \
                torch.multinomial(self.q, 1, generator=self.generator)[:, 0]
            self.drafts = picks.tolist()
        self.fed = [nxt] + self.drafts
        return out, (m, n)

    def emit(self, logits):
        """Static-k keeps all k predictions; ConfAdapt the leading run with top-1 probability >= tau (at least 1)."""
        tokens = self.sampling.pick(logits, self.generator)
        if self.tau is None:
            return tokens.tolist()
        confident = torch.softmax(logits.float(), -1).amax(-1) >= self.tau
        return tokens[:max(1, int(confident.long().cumprod(0).sum()))].tolist()


class Autoregressive:
    """Plain decoding, one token per forward; the reference every other method is compared with."""

    def __init__(self, model, max_len, sampling=Sampling(), generator=None):
        self.model, self.sampling, self.generator = model, sampling, generator
        self.caches, _ = model.make_caches(1, max_len)

    def prefill(self, prompt):
        self.L = len(prompt)
        logits = self.model(_tensor(prompt, self.caches[0].k.device), _positions(0, self.L, self.caches[0].k.device),
                            self.caches)
        self.x = int(self.sampling.pick(logits[0, -1], self.generator))
        return [self.x]

    def step(self):
        dev = self.caches[0].k.device
        logits = self.model(_tensor([self.x], dev), _positions(self.L, 1, dev), self.caches)
        self.L += 1
        self.x = int(self.sampling.pick(logits[0, -1], self.generator))
        return [self.x], None


# ----------------------------------------------------------------------------------------------------------------
# the one generate

def parse_method(name):
    """'ar' | 'mtp' | 'mtp@D' | 'static@K' | 'confadapt@TAU' | 'verified@K' -> (kind, value)."""
    kind, _, arg = name.partition("@")
    defaults = {"ar": None, "mtp": 3, "static": 3, "confadapt": 0.9, "verified": 4}
    if kind not in defaults or (kind == "ar" and arg):
        raise ValueError(f"unknown method {name!r}: expected ar, mtp@D, static@K, confadapt@TAU or verified@K")
    if not arg:
        return kind, defaults[kind]
    return kind, float(arg) if kind == "confadapt" else int(arg)


def make_strategy(model, method, max_len, sampling, generator=None, schedule=None, draft_vocab=None, mask_ids=None,
                  k_max=16):
    kind, value = parse_method(method)
    if kind == "ar":
        return Autoregressive(model, max_len, sampling, generator)
    if kind == "mtp":
        return HeadDrafts(model, max_len, value, schedule, draft_vocab, sampling, generator)
    if not mask_ids:
        raise ValueError(f"method {method} needs a mask-token model (train.py --mode mask) and its mask token ids")
    if kind == "confadapt":
        return MaskDrafts(model, max_len, mask_ids, k_max, tau=value, sampling=sampling, generator=generator)
    return MaskDrafts(model, max_len, mask_ids, value, verify=kind == "verified", sampling=sampling,
                      generator=generator)


# cuDNN attention builds a plan for every new (query length, key length) pair, 40-400 ms each on an H100; decoding meets
# new lengths with every prompt and draft depth, so generate keeps to the kernels that need none.
DECODE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@torch.no_grad()
@sdpa_kernel(DECODE_ATTENTION)
def generate(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None, stop_ids=(), generator=None,
             method="ar", stats=None, **method_options):
    """Generate up to max_new_tokens after each prompt (lists of token ids); returns the new tokens of each prompt,
    ending with the stop token where one was produced. `ar` decodes the prompts as one batch; every other method
    decodes them one at a time. method_options go to make_strategy (schedule, draft_vocab, mask_ids, k_max)."""
    sampling = Sampling(temperature, top_k, top_p)
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("empty prompt: generation needs at least one token to condition on")
    if longest + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
                         f"context of {model.cfg.max_seq_len} tokens")
    if method == "ar" and len(prompts) > 1:
        return _generate_batch(model, prompts, max_new_tokens, sampling, set(stop_ids), generator, stats)
    outs = []
    for prompt in prompts:
        strategy = make_strategy(model, method, len(prompt) + max_new_tokens, sampling, generator, **method_options)
        out = strategy.prefill(prompt)
        first = len(out)
        forwards = 1
        while not _finished(out, max_new_tokens, stop_ids):
            new, accepted = strategy.step()
            out += new
            forwards += 1
            if stats is not None and accepted is not None:
                stats.record(*accepted)
        out = _truncate(out, max_new_tokens, stop_ids)
        outs.append(out)
        if stats is not None:
            stats.tokens += len(out)
            stats.forwards += forwards
            stats.prefills += 1
            stats.prefill_tokens += min(first, len(out))
    return outs


def _finished(out, max_new_tokens, stop_ids):
    return len(out) >= max_new_tokens or any(t in stop_ids for t in out)


def _truncate(out, max_new_tokens, stop_ids):
    for i, t in enumerate(out[:max_new_tokens]):
        if t in stop_ids:
            return out[:i + 1]
    return out[:max_new_tokens]


def _generate_batch(model, prompts, max_new_tokens, sampling, stop_ids, generator, stats):
    """Batched plain decoding. Prompts are right-padded; every row writes its cache at its own positions, so the
    padding's slots are simply overwritten by that row's generated tokens."""
    B, device = len(prompts), model.embed.weight.device
    lens = torch.tensor([len(p) for p in prompts], device=device)
    idx = torch.zeros(B, int(lens.max()), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        idx[b, :len(p)] = torch.tensor(p, device=device)
    caches, _ = model.make_caches(B, idx.size(1) + max_new_tokens)
    h = model.hidden(idx, model.default_pos(idx), caches)
    logits = model.logits(h[torch.arange(B, device=device), lens - 1])      # (B, V): only the last real position
    stop = torch.tensor(sorted(stop_ids) or [-1], device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    for i in range(max_new_tokens):
        tok = sampling.pick(logits, generator)                                # (B,)
        out.append(torch.where(done, -1, tok))
        done |= torch.isin(tok, stop)
        if i == max_new_tokens - 1 or bool(done.all()):
            break
        logits = model(tok[:, None], (lens + i)[:, None], caches)[:, 0]
    out = torch.stack(out, 1).tolist()
    outs = [[t for t in row if t >= 0] for row in out]
    if stats is not None:
        stats.tokens += sum(map(len, outs))
        stats.forwards += len(out[0]) * B
        stats.prefills += B
        stats.prefill_tokens += B
    return outs


# ----------------------------------------------------------------------------------------------------------------
# CLI

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--init_from", default="smollm2", help="smollm2, a Hugging Face folder, a .gguf file, or a "
                        "nanoMTP checkpoint folder")
    parser.add_argument("--prompt", default="What is the capital of France?", help="the user's message")
    parser.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    parser.add_argument("--method", default="ar", help="ar, mtp@D, static@K, confadapt@TAU or verified@K")
    parser.add_argument("--heads", default=None, help="MTP heads file for method mtp (default: the shipped one)")
    parser.add_argument("--mask", default=None, help="mask-token adapter file for static/confadapt/verified "
                        "(default: the shipped one)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy")
    parser.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top_p", type=float, default=None, help="nucleus sampling threshold")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on GPU, float32 on CPU)")
    args = parser.parse_args()

    from load import load_for_decoding
    kind = parse_method(args.method)[0]   # attach only what the method uses
    heads = args.heads or (None if kind == "mtp" else "none")
    mask = args.mask or (None if kind in ("static", "confadapt", "verified") else "none")
    model, _, tok, options = load_for_decoding(args.init_from, args.device, args.dtype, heads, mask)
    ids = tok.encode(args.prompt) if args.raw or not tok.has_chat else tok.encode_chat(args.prompt)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    stats = Stats()
    t0 = time.perf_counter()
    out = generate(model, [ids], args.max_new_tokens, args.temperature, args.top_k, args.top_p, tok.stop_ids,
                   generator, args.method, stats, **options)[0]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(tok.decode([t for t in out if t not in tok.stop_ids]))
    print(f"--- {args.method}: {len(out)} tokens in {dt:.2f} s, {len(out) / dt:.1f} tokens/s, "
          f"{stats.tokens_per_forward:.2f} tokens per forward ({args.device}, {model.embed.weight.dtype})")


if __name__ == "__main__":
    main()
