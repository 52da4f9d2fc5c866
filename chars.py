"""
`CharTokenizer`: one id per printable ASCII character plus newline, for models trained from scratch
on synthetic math and plain text (every digit its own token; a ~100-entry vocabulary keeps a tiny
model's embedding tiny). Its API is tokenizer.Tokenizer's, so no caller needs to know which one it
holds.
"""

import json
import os
import re

from chat import ChatML
from files import read_json

EOS = "<|endoftext|>"
# newline + printable ASCII, in a fixed order
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))


class CharTokenizer(ChatML):
    """tokens[i] is the text of id i: one character, or a special token. Specials added later (Paper
    A's mask token) go at the end, so existing ids never move. A from-scratch model has no chat
    format: the default tokenizer has no ChatML tokens (tests build one with them, a small stand-in
    for the bundled model's)."""
    name = "chars"
    # what save() writes; its presence marks a folder as holding this tokenizer
    FILE = "tokenizer_chars.json"
    system_prompt = None

    def __init__(self, tokens=(EOS, *CHARS), specials=(EOS,)):
        tokens, specials = list(tokens), list(specials)
        if len(set(tokens)) != len(tokens):
            raise ValueError("CharTokenizer: duplicate tokens")
        for t in tokens:
            if len(t) != 1 and t not in specials:
                raise ValueError(f"CharTokenizer: {t!r} is neither one character "
                                 f"nor a special token")
        self.tokens = tokens
        self.special = {t: tokens.index(t) for t in specials}
        self.stoi = {t: i for i, t in enumerate(tokens) if t not in self.special}
        self.vocab_size = len(tokens)
        self.eos_id = self.special[EOS]
        self.stop_ids = [self.eos_id]
        # longest first, so that no special is matched by a prefix of another
        self._special_re = re.compile("|".join(re.escape(t)
                                               for t in sorted(specials, key=len, reverse=True)))

    def add_special(self, name, token_id=None):
        """New special token at id vocab_size (e.g. Paper A's mask token); the model's embedding
        must grow to fit.
        token_id, if given, must be that id: a character vocabulary has no gaps."""
        if name in self.special or name in self.stoi:
            raise ValueError(f"CharTokenizer: token {name!r} exists already")
        if token_id not in (None, self.vocab_size):
            raise ValueError(f"CharTokenizer: special token {name!r} can take id {self.vocab_size} "
                             f"only, not {token_id}")
        self.__init__(self.tokens + [name], [*self.special, name])
        return self.special[name]

    def encode(self, text, specials=False):
        """Text -> ids. Special-token strings are plain characters, unless specials=True (see
        Tokenizer.encode)."""
        if not specials:
            return self._encode_plain(text, 0, len(text))
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
            raise ValueError(f"CharTokenizer: character {text[bad]!r} at offset {bad} "
                             f"is not in the vocabulary (newline and printable ASCII only): "
                             f"{text[max(0, bad - 30):bad + 30]!r}") from None

    def decode(self, ids):
        return "".join(self.tokens[int(i)] for i in ids)

    def save(self, folder):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, self.FILE), "w") as f:
            json.dump({"type": "chars", "tokens": self.tokens, "specials": list(self.special)}, f,
                      indent=1)
            f.write("\n")

    @classmethod
    def load(cls, folder):
        path = os.path.join(folder, cls.FILE)
        d = read_json(path)
        if d.get("type") != "chars":
            raise ValueError(f"{path}: not a character tokenizer (type={d.get('type')!r})")
        return cls(d["tokens"], d["specials"])
