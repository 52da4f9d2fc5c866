"""
Paper A's mask-token decoding: k-1 mask tokens after the text make one forward predict k tokens.

- `static@K`: emit all K predictions per forward. LOSSY.
- `confadapt@TAU`: emit the leading predictions whose top-1 probability is at least TAU (at least
  one), with k = the model's k_max (`confadapt@TAU:K`: k = K). LOSSY.
- `verified@K`: the mask predictions are drafts, checked by the model's own next-token predictions
  in the next forward. Lossless with respect to the mask-token model's own one-token decoding.
- One prompt at a time.
"""

import torch

from engine import Graph, Ready, Sampling, Strategy, Step, drafted, predicted, verify

K_MAX = 16        # ConfAdapt's k (Paper A's k_max) where the mask-token model does not name its own


class MaskDrafts(Strategy):
    """Each step feeds the tokens not yet in the cache (`fed`), then the masks, padded to 2k-1
    tokens; the masks' cache slots are overwritten by real tokens in the next step. tau=None emits
    all k predictions (static), a float the confident leading ones (ConfAdapt). verified=True treats
    them as drafts instead (the fed tokens come before the masks, so their predictions never see a
    mask)."""

    def __init__(self, model, max_len, mask_ids, k, tau=None, verified=False, sampling=Sampling(),
                 generator=None, graphs=None, compile=False):
        if k < 2:
            raise ValueError(f"mask-token decoding needs k >= 2, got {k}")
        super().__init__(model, 1, max_len, 2 * k - 1, sampling, generator, graphs, compile)
        shared = len(mask_ids) == 1
        self.mask_ids = list(mask_ids) * (k - 1) if shared else list(mask_ids)   # or distinct
        if len(self.mask_ids) < k - 1:
            raise ValueError(f"{len(mask_ids)} distinct mask tokens cannot make k={k}")
        self.mask_ids = self.mask_ids[:k - 1]
        self.k, self.tau, self.verified = k, tau, verified
        self.caches, _ = model.make_caches(1, self.cache_len)
        self.ids = torch.zeros(1, self.query_len, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, self.query_len, dtype=torch.long, device=self.device)
        self.offsets = torch.arange(self.query_len, device=self.device)
        self.step_logits = Graph(self._step_logits, self.graphs)
        self.fed = []        # tokens known but not yet in the cache, from position newest on
        self.drafts = []     # verified: the mask predictions the next forward checks
        self.q = None        # ... and the distributions they were drawn from (None: greedy)

    def _step_logits(self):
        return self.forward(self.ids, self.positions(self.pos), self.caches)[0]

    def logits(self, ids):
        """Logits (len(ids), V) of a forward of ids at positions newest.., padded to query_len if it
        fits."""
        n = len(ids)
        if n > self.query_len:                                    # prefill: eager, its own length
            pos = self.newest[:, None] + torch.arange(n, device=self.device)
            return self.model(torch.tensor([ids], device=self.device), self.positions(pos),
                              self.caches)[0]
        self.ids.copy_(torch.tensor([ids + self.mask_ids[:1] * (self.query_len - n)]))
        torch.add(self.newest[:, None], self.offsets, out=self.pos)
        return self.step_logits()[:n]

    def prefill(self, prompts):
        (prompt,) = prompts
        self.drafts, self.q = [], None
        if self.verified:
            # the prompt alone, as plain decoding prefills it: its cache rows match ar's bitwise
            steps = super().prefill(prompts)
            self.fed = list(steps[0].tokens)
            return steps
        self.newest.zero_()
        self.fed = list(prompt)
        tokens = self.advance(self.mask_ids).tokens
        return [Step(tokens, 0, 0, list(range(len(tokens))))]

    def step(self, live):
        return Ready([self.advance(self.mask_ids)])

    def advance(self, masks):
        """One forward of the fed tokens and `masks`; returns the row's Step."""
        fed, m = self.fed, len(self.drafts)
        logits = self.logits(fed + masks)
        # row i < len(fed): the token after fed[i]; the last 1 + len(masks) rows: those after the
        # text
        ahead = logits[len(fed) - 1:]
        if not self.verified:
            self.newest += len(fed)
            self.fed = self.emit(ahead)
            return predicted(self.fed, len(masks))
        n, nxt = verify(torch.tensor(self.drafts, device=self.device), self.q,
                        logits[len(fed) - 1 - m:len(fed)], self.sampling, self.generator)
        # the fed tokens up to the last accepted draft are cached
        self.newest += len(fed) - m + n
        out = self.drafts[:n] + [nxt]
        self.drafts, self.q = [], None
        # the masks followed an accepted text: their predictions
        if n == m and masks:
            self.q = None if self.sampling.greedy else self.sampling.probs(ahead[1:])
            picks = (self.sampling.pick(ahead[1:], self.generator) if self.q is None else
                     torch.multinomial(self.q, 1, generator=self.generator)[:, 0])
            self.drafts = picks.tolist()
        self.fed = [nxt] + self.drafts
        return drafted(out, m)

    def emit(self, logits):
        """Static keeps all k predictions; ConfAdapt the leading run with top-1 probability >= tau
        (at least 1)."""
        tokens = self.sampling.pick(logits, self.generator)
        if self.tau is None:
            return tokens.tolist()
        confident = torch.softmax(logits.float(), -1).amax(-1) >= self.tau
        return tokens[:max(1, int(confident.long().cumprod(0).sum()))].tolist()
