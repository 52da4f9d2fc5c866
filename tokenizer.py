"""
Tokenizers: text to token ids and back.

What is here:
- `Tokenizer`: byte-level BPE run by tiktoken, built locally from a GGUF vocabulary, a Hugging Face
  tokenizer.json or GPT-2's vocab.json + merges.txt, and saved in its own format; ids identical to
  Hugging Face's.
- `load_tokenizer(source)`: the one dispatch from a source to a tokenizer: this one, or chars.py's
  `CharTokenizer` (one id per printable ASCII character, for models trained from scratch).
- `NoTokenizer`: what a Hugging Face folder without tokenizer files gets; it fails only when text is
  touched.
- The mask tokens' names (Paper A).

Both tokenizers offer the same API (encode, decode, vocab_size, eos_id, stop_ids, special,
add_special, save, name, and chat.py's template: has_chat, chat_prompt, encode_chat), so train.py,
decode.py and bench.py never need to know which one they hold.

What is not: SentencePiece, downloads, model weights (load.py, weights.py).
"""

import json
import os
import re
import unicodedata
from pathlib import Path

import numpy as np
import tiktoken

from chars import CharTokenizer
from chat import CHATML_END, ChatML
from files import REQUIRED, gguf_value, names, open_gguf, read_json


def mask_token_names(n):
    """Paper A's mask tokens, appended to the vocabulary: one shared <mtp>, or n distinct ones."""
    return ["<mtp>"] if n == 1 else [f"<mtp_{i}>" for i in range(n)]


# --------------------------------------------------------------------------------------------------
# byte-level BPE

# Pre-tokenizer patterns (what splits text into words before BPE).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Hugging Face's Sequence[Digits(individual_digits=True), ByteLevel] in one regex (SmolLM,
# StarCoder): every numeral stands alone (Digits splits at any Unicode number, like \p{N}: ½,
# ², ٣ and ３ too), and a whitespace run before a numeral is whole, as if the text ended there.
SINGLE_DIGITS_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
                         r"""|\s+(?![^\s\p{N}])|\s+""")
# Digits(individual_digits=False)
DIGIT_RUNS_PATTERN = SINGLE_DIGITS_PATTERN.replace(r"|\p{N}|", r"|\p{N}+|")
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen2's and Qwen3's tokenizer.json: Llama 3's split, but every numeral stands alone
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
GGUF_PRE = {"gpt-2": GPT2_PATTERN, "smollm": SINGLE_DIGITS_PATTERN, "llama-bpe": LLAMA3_PATTERN,
            "llama3": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}
# pre-tokenizers whose Hugging Face tokenizer.json normalizes text to NFC first
GGUF_NFC = {"qwen2"}
GGUF_SPECIAL_TYPES = (3, 4)    # GGUF token types: control, user-defined
# the default system prompt: a whole system turn inside one string literal of the template (Qwen's
# templates also open a system turn in one literal and fill it from code in others: those are not a
# default)
SYSTEM_IN_TEMPLATE = re.compile(
    r"""(['"])<\|im_start\|>system(?:\n|\\n)(?P<prompt>(?:(?!\1).)*?)<\|im_end\|>""", re.DOTALL)
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json + merges.txt")


def byte_decoder():
    """GPT-2's byte alphabet, char -> byte: printable Latin-1 bytes stand for themselves, the other
    bytes are shifted, in order, to U+0100 and up. BPE vocabularies spell every token in it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def has_hf_tokenizer(folder):
    folder = Path(folder)
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file()
                                                     and (folder / "merges.txt").is_file())


class Tokenizer(ChatML):
    """Byte-level BPE with tiktoken doing the work.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank, and uses ranks as
    ids. When the vocabulary's ids already grow with the merge order, ranks are the ids; otherwise
    ranks follow the merge order and an array translates ranks to ids (decoding reads each id's
    bytes directly). Bytes with no token of their own are dropped, as Hugging Face does.
    Every added token of the source (control and user-defined tokens in GGUF) is a special token: it
    reaches the ids through the chat template, `add_special` or `encode(text, specials=True)`, never
    from plain text."""

    FILE = "tokenizer.nanomtp.json"

    def __init__(self, vocab, merges, special, pattern, eos_id=None, bos_id=None,
                 system_prompt=None, whole_words=False, source="tokenizer", nfc=False):
        """vocab: token (in GPT-2's byte alphabet) -> id; merges: (left, right) token pairs in merge
        order; special: text -> id (these may also appear in vocab); whole_words: a word that is a
        token is that token even if the merges never build it (Hugging Face's ignore_merges); nfc:
        text is normalized to Unicode NFC before it is split (Hugging Face's NFC normalizer,
        Qwen's)."""
        self.vocab, self.merges, self.special = (dict(vocab), [tuple(m) for m in merges],
                                                 dict(special))
        self.pattern, self.eos_id, self.bos_id = pattern, eos_id, bos_id
        self.system_prompt, self.whole_words, self.source = system_prompt, whole_words, str(source)
        self.nfc = nfc
        self.name = os.path.basename(self.source)
        self._build()

    def _build(self):
        to_byte, special_ids = byte_decoder(), set(self.special.values())
        self.pieces = {}    # id -> bytes, every non-special token
        for token, i in self.vocab.items():
            if i in special_ids:
                continue
            if any(c not in to_byte for c in token):
                raise ValueError(f"{self.source}: token {token!r} is not spelled "
                                 f"in GPT-2's byte alphabet")
            self.pieces[i] = bytes(to_byte[c] for c in token)
        made = []     # id of each merge's result, in merge order
        for a, b in self.merges:
            if a not in self.vocab or b not in self.vocab or a + b not in self.vocab:
                raise ValueError(f"{self.source}: merge {a!r} {b!r} uses or makes a token "
                                 f"not in the vocabulary")
            made.append(self.vocab[a + b])
        byte_ids = {p[0]: i for i, p in self.pieces.items() if len(p) == 1}
        unreachable = [i for i in sorted(set(self.pieces) - set(byte_ids)
                                         - set(made))] if self.whole_words else []

        if len(byte_ids) == 256 and all(x < y for x, y in zip(made, made[1:])):
            order = None   # ids are ranks
            ids = sorted(set(byte_ids.values()) | set(made) | set(unreachable))
            ranks = {self.pieces[i]: i for i in ids}
            tk_special = dict(self.special)
        else:
            # ranks 0..255 are the bytes (-1: no token, dropped), then merge results by first
            # appearance
            order, seen = [byte_ids.get(b, -1) for b in range(256)], set(byte_ids.values())
            for i in made + unreachable:
                if i not in seen:
                    order.append(i)
                    seen.add(i)
            ranks = {bytes([b]): b for b in range(256)}
            ranks.update({self.pieces[i]: r for r, i in enumerate(order) if r >= 256})
            tk_special = {name: len(order) + n for n, name in enumerate(self.special)}
            order += list(self.special.values())
        self._enc = tiktoken.Encoding(name="nanomtp", pat_str=self.pattern, mergeable_ranks=ranks,
                                      special_tokens=tk_special)
        self._rank_to_id = None if order is None else np.array(order, dtype=np.int64)
        self.vocab_size = max([*self.pieces, *self.special.values()]) + 1
        self._special_bytes = {i: name.encode() for name, i in self.special.items()}

    # --- use

    def encode(self, text, specials=False):
        """Text -> ids. Special-token strings in the text are plain text, unless specials=True,
        which is only for text the chat template wrote (a prepared prompts file): there they become
        their control tokens."""
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        ranks = (self._enc.encode(text, allowed_special="all") if specials
                 else self._enc.encode_ordinary(text))
        if self._rank_to_id is None:
            return ranks
        ids = self._rank_to_id[ranks]
        return ids[ids >= 0].tolist()

    def decode(self, ids):
        out = []
        for i in ids:
            i = int(i)
            piece = self._special_bytes.get(i, self.pieces.get(i))
            if piece is None:
                raise ValueError(f"{self.source}: token id {i} is not in the vocabulary")
            out.append(piece)
        return b"".join(out).decode("utf-8", errors="replace")

    @property
    def stop_ids(self):
        """Ids that end a generation: eos and ChatML's end of turn."""
        return sorted({self.eos_id, self.special.get(CHATML_END)} - {None})

    def add_special(self, name, token_id=None):
        """New special token at token_id (default vocab_size), e.g. Paper A's mask token; the
        model's embedding must grow to fit. A model whose embedding has more rows than the tokenizer
        has ids (Qwen's, padded) puts it after its rows: the ids between stay without a token, as
        they were."""
        if name in self.special:
            raise ValueError(f"{self.source}: special token {name!r} exists already "
                             f"(id {self.special[name]})")
        token_id = self.vocab_size if token_id is None else token_id
        if token_id < self.vocab_size:
            raise ValueError(f"{self.source}: special token {name!r} at id {token_id}: "
                             f"new ids start at {self.vocab_size}")
        self.special[name] = token_id
        self._build()
        return self.special[name]

    # --- sources

    @classmethod
    def from_gguf(cls, path, reader=None):
        reader = reader or open_gguf(path)
        get = lambda key, default=REQUIRED: gguf_value(reader, key, path, default)
        if get("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"{path}: tokenizer model {get('tokenizer.ggml.model')!r} "
                             f"is not supported (gpt2 BPE)")
        pre = get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE:
            raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported "
                             f"(supported: {names(GGUF_PRE)})")
        tokens, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type")
        merges = [tuple(m.split(" ")) for m in get("tokenizer.ggml.merges")]
        system = SYSTEM_IN_TEMPLATE.search(get("tokenizer.chat_template", ""))
        return cls(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                   special={t: i for i, (t, k) in enumerate(zip(tokens, types))
                            if k in GGUF_SPECIAL_TYPES},
                   pattern=GGUF_PRE[pre], eos_id=get("tokenizer.ggml.eos_token_id", None),
                   bos_id=get("tokenizer.ggml.bos_token_id", None),
                   system_prompt=system and system.group("prompt"),
                   source=path, nfc=pre in GGUF_NFC)

    @classmethod
    def from_hf(cls, folder):
        """From a Hugging Face folder: tokenizer.json, or GPT-2's vocab.json + merges.txt."""
        folder = Path(folder)
        tconf = (read_json(folder / "tokenizer_config.json")
                 if (folder / "tokenizer_config.json").is_file() else {})
        if not has_hf_tokenizer(folder):
            raise FileNotFoundError(f"{folder}: no tokenizer "
                                    f"(expected {' or '.join(HF_TOKENIZER_FILES)})")
        if (folder / "tokenizer.json").is_file():
            where = folder / "tokenizer.json"
            vocab, merges, special, pattern, whole_words, nfc = parse_tokenizer_json(
                read_json(where), where)
        else:
            where = folder / "vocab.json"
            vocab, pattern, whole_words, nfc = read_json(where), GPT2_PATTERN, False, False
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [tuple(line.split(" ")) for line in lines
                      if line and not line.startswith("#version")]
            special = {t["content"]: int(i)
                       for i, t in tconf.get("added_tokens_decoder", {}).items()}
        ids = {**vocab, **special}

        def token_of(key, id_key):
            value = tconf.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if value is not None:
                if value not in ids:
                    raise ValueError(f"{folder / 'tokenizer_config.json'}: {key} {value!r} "
                                     f"is not a token")
                return ids[value]
            value = (read_json(folder / "config.json").get(id_key)
                     if (folder / "config.json").is_file() else None)
            return value[0] if isinstance(value, list) else value

        eos_id, bos_id = (token_of("eos_token", "eos_token_id"),
                          token_of("bos_token", "bos_token_id"))
        # GPT-2's vocab.json lists <|endoftext|> without marking it special
        if where.name == "vocab.json":
            for i in {eos_id, bos_id} - {None} - set(special.values()):
                name = next((t for t, j in vocab.items() if j == i), None)
                if name is not None:
                    special[name] = i
        template = tconf.get("chat_template") or ""
        if isinstance(template, list):    # several named templates
            template = " ".join(t.get("template", "") for t in template)
        system = SYSTEM_IN_TEMPLATE.search(template)
        return cls(vocab, merges, special, pattern, eos_id=eos_id, bos_id=bos_id,
                   system_prompt=system and system.group("prompt"), whole_words=whole_words,
                   source=where, nfc=nfc)

    # --- own format

    def save(self, folder):
        data = {"format": "nanomtp-bpe", "pattern": self.pattern, "vocab": self.vocab,
                "merges": [" ".join(m) for m in self.merges], "special": self.special,
                "eos_id": self.eos_id, "bos_id": self.bos_id, "system_prompt": self.system_prompt,
                "whole_words": self.whole_words, "nfc": self.nfc}
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / self.FILE).write_text(json.dumps(data, ensure_ascii=False),
                                              encoding="utf-8")

    @classmethod
    def load(cls, folder):
        path = Path(folder) / cls.FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing")
        d = read_json(path)
        if d.get("format") != "nanomtp-bpe":
            raise ValueError(f"{path}: not a nanoMTP tokenizer file")
        return cls(d["vocab"], [tuple(m.split(" ")) for m in d["merges"]], d["special"],
                   d["pattern"], d["eos_id"], d["bos_id"], d["system_prompt"], d["whole_words"],
                   source=path, nfc=d.get("nfc", False))   # files saved before Qwen have no "nfc"


def parse_tokenizer_json(tj, where):
    """vocab, merges, special, pattern, whole_words, nfc from a Hugging Face tokenizer.json of a
    byte-level BPE."""
    m = tj.get("model") or {}
    if m.get("type") != "BPE":
        raise ValueError(f"{where}: tokenizer model {m.get('type')!r} is not supported "
                         f"(byte-level BPE)")
    if m.get("continuing_subword_prefix") or m.get("end_of_word_suffix") or m.get("dropout"):
        raise ValueError(f"{where}: BPE with subword prefixes/suffixes or dropout is not supported")
    normalizer = (tj.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise ValueError(f"{where}: normalizer {normalizer!r} is not supported (none or NFC)")
    merges = [tuple(x.split(" ")) if isinstance(x, str) else tuple(x) for x in m["merges"]]
    special = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    return m["vocab"], merges, special, pre_tokenizer_pattern(tj.get("pre_tokenizer"), where), \
        bool(m.get("ignore_merges")), normalizer == "NFC"


def pre_tokenizer_pattern(pre, where):
    """One regex equivalent to the supported Hugging Face pre-tokenizers."""
    def byte_level(p, use_regex):
        return (p.get("type") == "ByteLevel" and not p.get("add_prefix_space")
                and p.get("use_regex", True) == use_regex)
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0] and byte_level(steps[0], True):
        return GPT2_PATTERN
    if len(steps) == 2 and steps[0].get("type") == "Digits" and byte_level(steps[1], True):
        return SINGLE_DIGITS_PATTERN if steps[0].get("individual_digits") else DIGIT_RUNS_PATTERN
    if (len(steps) == 2 and steps[0].get("type") == "Split"
            and "Regex" in steps[0].get("pattern", {}) and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert") and byte_level(steps[1], False)):
        regex = steps[0]["pattern"]["Regex"]
        # tiktoken keeps only matches; Split also keeps the text between them: match that as a run
        # of characters where the regex does not match
        return f"(?:{regex})|(?:(?!(?:{regex}))[\\s\\S])+"
    kinds = [s.get("type") if s else None for s in steps]
    raise ValueError(f"{where}: pre-tokenizer {kinds} is not supported "
                     f"(ByteLevel; Digits + ByteLevel; "
                     f"Split(Regex, Isolated) + ByteLevel(use_regex=false); no prefix space)")


# --------------------------------------------------------------------------------------------------
# one dispatch

def load_tokenizer(source):
    """The tokenizer of a source: "chars" (a fresh CharTokenizer), a .gguf file, or a folder holding
    a saved tokenizer (a nanoMTP checkpoint, a prepared data folder's tokenizer/) or Hugging Face
    tokenizer files."""
    if str(source) == CharTokenizer.name:
        return CharTokenizer()
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return Tokenizer.from_gguf(path)
    if (path / CharTokenizer.FILE).is_file():
        return CharTokenizer.load(path)
    if (path / Tokenizer.FILE).is_file():
        return Tokenizer.load(path)
    if has_hf_tokenizer(path):
        return Tokenizer.from_hf(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path}: no tokenizer (expected {CharTokenizer.FILE}, "
                                f"{Tokenizer.FILE} or {' or '.join(HF_TOKENIZER_FILES)})")
    raise FileNotFoundError(f"{path}: no such tokenizer source "
                            f"(expected 'chars', a .gguf file or a folder)")


class NoTokenizer:
    """Stands in for the tokenizer of a Hugging Face folder that holds only config and weights: the
    model loads and runs on token ids; encoding or decoding text raises the error that says what is
    missing."""
    name = "none"
    has_chat = False
    special = {}

    def __init__(self, folder, eos_id=None):
        self.source, self.eos_id = str(folder), eos_id
        self.stop_ids = [] if eos_id is None else [eos_id]

    def _missing(self, *args, **kwargs):
        raise FileNotFoundError(f"{self.source}: no tokenizer "
                                f"(expected {' or '.join(HF_TOKENIZER_FILES)}); the model "
                                f"loaded, but text cannot be encoded or decoded without one")

    encode = decode = encode_chat = chat_prompt = add_special = save = _missing
