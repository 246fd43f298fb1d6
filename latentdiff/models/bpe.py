"""CLIP's byte-level BPE, read from the vocabulary file that open_clip bundles, without importing open_clip
(whose import pulls in torchvision and most of transformers: 2.6 s of a 2.7 s `import latentdiff`).

Same rules as open_clip's SimpleTokenizer with clean="lower" (ftfy, html-unescape twice, whitespace collapse,
lower case) and the same ids; tests/test_text.py checks it against open_clip on many prompts.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
from pathlib import Path

import ftfy
import regex

SPECIAL = ("<start_of_text>", "<end_of_text>")
N_MERGES = 49152 - 256 - 2  # the file holds more merges than CLIP's vocabulary of 49408 uses


def vocab_file() -> Path:
    spec = importlib.util.find_spec("open_clip")  # finds the package without running its __init__
    if spec is None or spec.origin is None:
        raise ImportError("open_clip_torch is not installed: its bundled bpe_simple_vocab_16e6.txt.gz is the "
                          "tokenizer vocabulary (pip install open_clip_torch)")
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """Each byte -> a printable character: printable Latin-1 bytes map to themselves, the rest to 256 + n."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(rest)}}


def clean(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class BPE:
    def __init__(self):
        lines = gzip.open(vocab_file()).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
        self.byte_encoder = bytes_to_unicode()
        byte_chars = list(self.byte_encoder.values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + list(SPECIAL)
        self.encoder = {tok: i for i, tok in enumerate(vocab)}  # 49408 entries
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.pat = regex.compile("|".join(SPECIAL) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                 regex.IGNORECASE)
        self.word = functools.lru_cache(maxsize=65536)(self._word)

    def _word(self, token: str) -> tuple[str, ...]:
        """The BPE pieces of one pre-token: merge the lowest-ranked adjacent pair until none is in the table."""
        if token in SPECIAL:
            return (token,)
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p, N_MERGES))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in self.pat.findall(clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.word(token))
        return ids
