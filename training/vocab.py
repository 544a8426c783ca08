"""Caption vocabulary: tokenizer, word <-> id tables and vocab.json.

Tokens are lower-cased runs of letters and digits; an apostrophe inside a word stays
("dog's" is one token, like "don't"), every other character (punctuation, hyphens,
quotes) separates words: "A dog's T-shirt." -> ["a", "dog's", "t", "shirt"].
The typographic apostrophe (’) counts as "'". The bundle's vocab.json is a JSON list
of tokens, index = id, with ids 0..3 = <pad>, <start>, <end>, <unk>.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from caption_cli.errors import DatasetError

PAD, START, END, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")
WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")  # letters/digits, joined by single in-word apostrophes


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens of one caption (see the module docstring for the rules)."""
    return WORD.findall(text.lower().replace("\u2019", "'"))


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class Vocab:
    """Word <-> id mapping; ids 0..3 are the special tokens."""

    def __init__(self, tokens: Sequence[str]) -> None:
        tokens = tuple(tokens)
        if tokens[: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"a vocabulary must start with {', '.join(SPECIALS)}; got {list(tokens[:4])}")
        if len(set(tokens)) != len(tokens):
            duplicate = next(t for t, n in Counter(tokens).items() if n > 1)
            raise ValueError(f"token {duplicate!r} appears more than once in the vocabulary")
        if bad := [t for t in tokens[len(SPECIALS):] if not isinstance(t, str) or tokenize(t) != [t]]:
            raise ValueError(f"{bad[0]!r} is not a word token (see training.vocab.tokenize)")
        self.tokens = tokens
        self.ids = {token: index for index, token in enumerate(tokens)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5, top_k: int | None = None) -> Vocab:
        """Words seen at least `min_count` times, the `top_k` most frequent of them (specials not counted).

        Order: count descending, then the word, so the same captions always give the same ids.
        """
        if not _positive_int(min_count):
            raise ValueError(f"min_count must be an integer >= 1, got {min_count!r} (1 keeps every word)")
        if top_k is not None and not _positive_int(top_k):
            raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r} (None keeps every word)")
        if isinstance(captions, str):
            raise ValueError("captions must be an iterable of captions, not one string")
        counts = Counter(word for caption in captions for word in tokenize(caption))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(SPECIALS + tuple(kept[:top_k]))

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.tokens == other.tokens

    def __repr__(self) -> str:
        return f"Vocab({len(self)} tokens)"

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """[<start>, word ids..., <end>]; unknown words -> <unk>.

        At most `max_length` words are kept (None: all), so the result is at most max_length + 2 long.
        """
        if max_length is not None and not _positive_int(max_length):
            raise ValueError(f"max_length must be an integer >= 1 or None, got {max_length!r}")
        words = tokenize(text)[:max_length]
        return [START] + [self.ids.get(word, UNK) for word in words] + [END]

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first <end>; <start> and <pad> dropped, unknown words shown as <unk>."""
        words = []
        for index in ids:
            index = int(index)
            if not 0 <= index < len(self.tokens):
                raise ValueError(f"token id {index} is outside the vocabulary (0..{len(self.tokens) - 1})")
            if index == END:
                break
            if index not in (START, PAD):
                words.append(self.tokens[index])
        return " ".join(words)

    def save(self, path: Path) -> None:
        """Write vocab.json: a JSON list of tokens, index = id."""
        Path(path).write_text(json.dumps(list(self.tokens), ensure_ascii=False, indent=0) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Vocab:
        """Read a vocab.json written by `save` (or shipped in a bundle)."""
        try:
            tokens = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DatasetError(f"{path}: file not found") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DatasetError(f"{path}: not a JSON vocabulary ({error})") from None
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise DatasetError(f"{path}: expected a JSON list of token strings")
        try:
            return cls(tokens)
        except ValueError as error:
            raise DatasetError(f"{path}: {error}") from None
