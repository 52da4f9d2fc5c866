"""
A tiny character-level tokenizer for models trained from scratch on synthetic math (data/synthmath.py).

What is here: `CharTokenizer`, one id per printable ASCII character plus newline, and one special token that ends
every example. It offers the project tokenizer's API (encode, decode, vocab_size, eos_id, stop_ids, special,
save(folder), load(folder)) so train.py, decode.py and bench.py never need to know which one they hold.
What is not: chat templates (a from-scratch model has no chat format) and BPE (load.py's Tokenizer).

Why characters: the generator writes a few dozen distinct characters; a ~100-entry vocabulary keeps the embedding and
output layers of a 6-layer 256-wide model tiny, and every digit is its own token, which arithmetic needs.
"""

import json
import os
import re

FILE_NAME = "tokenizer_chars.json"   # what save() writes; its presence marks a folder as holding this tokenizer
EOS = "<|endoftext|>"
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))   # newline + printable ASCII, in a fixed order


class CharTokenizer:
    """tokens[i] is the text of id i: one character, or a special token. Specials added later (Paper A's mask
    token) go at the end, so existing ids never move."""
    name = "chars"

    def __init__(self, tokens=(EOS, *CHARS), specials=(EOS,)):
        tokens, specials = list(tokens), list(specials)
        if len(set(tokens)) != len(tokens):
            raise ValueError("CharTokenizer: duplicate tokens")
        for t in tokens:
            if len(t) != 1 and t not in specials:
                raise ValueError(f"CharTokenizer: {t!r} is neither one character nor a special token")
        self.tokens = tokens
        self.special = {t: tokens.index(t) for t in specials}
        self.stoi = {t: i for i, t in enumerate(tokens) if t not in self.special}
        self.vocab_size = len(tokens)
        self.eos_id = self.special[EOS]
        self.stop_ids = [self.eos_id]
        # longest first, so that no special is matched by a prefix of another
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))

    def add_special(self, name):
        """New special token at id vocab_size (e.g. Paper A's mask token); the model's embedding must grow to fit."""
        if name in self.special or name in self.stoi:
            raise ValueError(f"CharTokenizer: token {name!r} exists already")
        self.__init__(self.tokens + [name], [*self.special, name])
        return self.special[name]

    def encode(self, text):
        """Text -> ids. Special-token strings in the text (e.g. '<|endoftext|>') become their single id."""
        ids, last = [], 0
        for m in self._special_re.finditer(text):
            ids += self._encode_plain(text, last, m.start())
            ids.append(self.special[m.group()])
            last = m.end()
        return ids + self._encode_plain(text, last, len(text))

    def _encode_plain(self, text, start, end):
        try:
            return [self.stoi[c] for c in text[start:end]]
        except KeyError:
            bad = next(i for i in range(start, end) if text[i] not in self.stoi)
            raise ValueError(f"CharTokenizer: character {text[bad]!r} at offset {bad} is not in the vocabulary "
                             f"(newline and printable ASCII only): {text[max(0, bad - 30):bad + 30]!r}") from None

    def decode(self, ids):
        return "".join(self.tokens[int(i)] for i in ids)

    def save(self, folder):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, FILE_NAME), "w") as f:
            json.dump({"type": "chars", "tokens": self.tokens, "specials": list(self.special)}, f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, folder):
        path = os.path.join(folder, FILE_NAME)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no character tokenizer saved here")
        with open(path) as f:
            d = json.load(f)
        if d.get("type") != "chars":
            raise ValueError(f"{path}: not a character tokenizer (type={d.get('type')!r})")
        return cls(d["tokens"], d["specials"])
