"""
Reading a prepared data folder: the small API train.py and bench.py use.

What is here: `load_meta`, `check_tokenizer` (is this the tokenizer the data was made with?),
`TokenData.get_batch` (random training windows with their loss mask). The tokenizer saved beside the data loads
with tokenizer.load_tokenizer(folder / "tokenizer"), a split's prompts with prompts.read_prompts. What is not:
making the files (data/prepare.py writes them).

A prepared folder holds, per split (train, val, test):
    {split}.bin            all tokens of the split, examples back to back, uint16 if the vocabulary fits, else uint32
    {split}_loss_mask.bin  uint8, 1 where the token is answer (trained on), 0 where it is prompt; absent for plain text
    {split}_index.bin      int64 (n_examples, 3): start offset, prompt length, total length of each example
    {split}_prompts.jsonl  {"prompt": text exactly as fed to the model, "answer": gold answer or reference}, if prompts
plus meta.json (tokenizer fingerprint, dtype, counts, the arguments that made it) and tokenizer/ (the tokenizer).
A prompt's special-token strings are the chat template's control tokens: encode it with encode(text, specials=True);
data/prepare.py refuses examples whose own text holds one, so none is forged.
"""

import hashlib
import json
import os

import numpy as np
import torch

FORMAT = "nanomtp-data-2"    # 2: the loss weights (answer tokens) are in {split}_loss_mask.bin
# Encoded by every tokenizer at preparation and at check time; a different encoding means a different tokenizer.
PROBE = "Maya has 48 apples. She gives 24 away: 48 - 24 = 24.\n#### 24 The quick brown fox, (x) [y] {z}!?"


def dtype_for(vocab_size):
    return "uint16" if vocab_size <= 2 ** 16 else "uint32"


def fingerprint(tokenizer):
    """What identifies a tokenizer: vocabulary size, end-of-text id, and a hash of the probe's encoding."""
    probe = hashlib.sha256(json.dumps([int(i) for i in tokenizer.encode(PROBE)]).encode()).hexdigest()[:16]
    return {"name": tokenizer.name, "vocab_size": int(tokenizer.vocab_size), "eos_id": int(tokenizer.eos_id),
            "probe_sha256": probe}


def load_meta(folder):
    path = os.path.join(folder, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found; prepare the folder first with data/prepare.py")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: data format {meta.get('format')!r}, this code reads {FORMAT!r}; prepare the "
                         f"folder again with data/prepare.py")
    return meta


def check_tokenizer(meta, tokenizer, folder):
    """Raise ValueError unless `tokenizer` is the one that tokenized the data in `folder`. A tokenizer that only
    appended special tokens after the data's vocabulary (Paper A's mask token) is accepted, also after a gap of ids
    without a token (a model's padded embedding rows, Qwen's: the mask tokens take ids after those rows)."""
    want, have = meta["tokenizer"], fingerprint(tokenizer)
    grown_by_specials = have["vocab_size"] > want["vocab_size"] and have["vocab_size"] - 1 in tokenizer.special.values()
    if (have["probe_sha256"] != want["probe_sha256"] or have["eos_id"] != want["eos_id"]
            or (have["vocab_size"] != want["vocab_size"] and not grown_by_specials)):
        raise ValueError(
            f"{os.path.join(folder, 'meta.json')}: the data was tokenized with {want['name']!r} (vocab "
            f"{want['vocab_size']}, eos {want['eos_id']}, probe {want['probe_sha256']}) but the model's tokenizer is "
            f"{have['name']!r} (vocab {have['vocab_size']}, eos {have['eos_id']}, probe {have['probe_sha256']}); "
            f"prepare the data again with the model's tokenizer (data/prepare.py --tokenizer ...)")


class TokenData:
    """The token files of a prepared folder, memory-mapped. get_batch draws random windows for training."""

    def __init__(self, folder):
        self.folder = folder
        self.meta = load_meta(folder)
        self.dtype = np.dtype(self.meta["dtype"])

    def _path(self, name):
        path = os.path.join(self.folder, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: missing (splits here: {sorted(self.meta['splits'])})")
        return path

    def tokens(self, split):
        return np.memmap(self._path(f"{split}.bin"), dtype=self.dtype, mode="r")

    def loss_weight(self, split):
        """1 where the token is trained on (answers); None for plain text, where every token is."""
        if not self.meta["has_prompts"]:
            return None
        return np.memmap(self._path(f"{split}_loss_mask.bin"), dtype=np.uint8, mode="r")

    def index(self, split):
        """(n_examples, 3) int64: start offset, prompt length, total length."""
        return np.memmap(self._path(f"{split}_index.bin"), dtype=np.int64, mode="r").reshape(-1, 3)

    def get_batch(self, split, batch_size, seq_len, generator=None, device="cpu", align=False, shard=(0, 1)):
        """Random windows of seq_len + 1 tokens -> (idx, loss_weight), each (batch_size, seq_len + 1): idx the token
        ids (the model reads idx[:, :-1] and predicts idx[:, 1:]), loss_weight[b, t] = 1 (float) when idx[b, t] is an
        answer token, so it counts as a target; all ones for plain text. Windows start anywhere (align=False) or at
        the start of a random example (align=True, so every answer sees its prompt); they run across example
        boundaries. Deterministic for a CPU torch.Generator.
        shard (i, n): draw the starts of n x batch_size windows and read only the i-th batch_size of them. The ranks
        of a multi-process run share one generator seed, so together they read what one process with the whole
        batch would."""
        data, answers = self.tokens(split), self.loss_weight(split)
        index, n_shards = shard
        if len(data) < seq_len + 1:
            raise ValueError(f"{self.folder}/{split}.bin: {len(data)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        if align:
            starts = self.index(split)[:, 0]
            starts = starts[starts <= len(data) - seq_len - 1]
            pick = torch.randint(len(starts), (n_shards * batch_size,), generator=generator)
            ix = [int(starts[i]) for i in pick]
        else:
            ix = torch.randint(len(data) - seq_len, (n_shards * batch_size,), generator=generator).tolist()
        ix = ix[index * batch_size:(index + 1) * batch_size]
        idx = torch.from_numpy(np.stack([data[i:i + seq_len + 1].astype(np.int64) for i in ix]))
        if answers is None:
            loss_weight = torch.ones(batch_size, seq_len + 1)
        else:
            loss_weight = torch.from_numpy(np.stack([answers[i:i + seq_len + 1] for i in ix])).float()
        if torch.device(device).type == "cuda":
            return tuple(t.pin_memory().to(device, non_blocking=True) for t in (idx, loss_weight))
        return idx.to(device), loss_weight.to(device)
