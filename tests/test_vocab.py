"""Tokenizer and vocabulary: counts, ordering, special ids, encode/decode and vocab.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caption_cli.errors import DatasetError
from training.vocab import END, PAD, SPECIALS, START, UNK, Vocab, tokenize

CAPTIONS = [
    "A dog runs.",
    "A dog jumps!",
    "A cat sits",
    "a DOG, a cat and a bird",
    "The dog's ball",
]


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("A dog runs.", ["a", "dog", "runs"]),
        ("a dog's ball", ["a", "dog's", "ball"]),
        ("Two  men, \"playing\" (soccer)!", ["two", "men", "playing", "soccer"]),
        ("A man in a T-shirt", ["a", "man", "in", "a", "t", "shirt"]),
        ("the dogs' toys 'here'", ["the", "dogs", "toys", "here"]),
        ("She doesn\u2019t", ["she", "doesn't"]),
        ("3 kids on 2nd_street", ["3", "kids", "on", "2nd", "street"]),
        ("Café crème", ["café", "crème"]),
        (" .,! ", []),
    ],
)
def test_tokenize(text: str, tokens: list[str]) -> None:
    assert tokenize(text) == tokens


def test_special_ids() -> None:
    vocab = Vocab.build(CAPTIONS, min_count=1)
    assert (PAD, START, END, UNK) == (0, 1, 2, 3)
    assert vocab.tokens[:4] == SPECIALS == ("<pad>", "<start>", "<end>", "<unk>")


@pytest.mark.parametrize(
    "min_count, top_k, words",
    [
        # counts: a 7, dog 3, cat 2, then the singletons in alphabetical order
        (1, None, ["a", "dog", "cat", "and", "ball", "bird", "dog's", "jumps", "runs", "sits", "the"]),
        (2, None, ["a", "dog", "cat"]),
        (3, None, ["a", "dog"]),
        (1, 4, ["a", "dog", "cat", "and"]),
        (2, 10, ["a", "dog", "cat"]),
        (8, None, []),
    ],
)
def test_build_min_count_top_k_and_order(min_count: int, top_k: int | None, words: list[str]) -> None:
    vocab = Vocab.build(CAPTIONS, min_count=min_count, top_k=top_k)
    assert list(vocab.tokens) == list(SPECIALS) + words
    assert len(vocab) == 4 + len(words)


def test_build_is_independent_of_caption_order() -> None:
    assert Vocab.build(CAPTIONS, min_count=1) == Vocab.build(reversed(CAPTIONS), min_count=1)


def test_encode_decode_round_trip() -> None:
    vocab = Vocab.build(CAPTIONS, min_count=1)
    ids = vocab.encode("A dog's ball!")
    assert ids == [START, vocab.ids["a"], vocab.ids["dog's"], vocab.ids["ball"], END]
    assert vocab.decode(ids) == "a dog's ball"


def test_encode_unknown_and_max_length() -> None:
    vocab = Vocab.build(CAPTIONS, min_count=2)  # a, dog, cat
    assert vocab.encode("A zebra and a dog") == [START, 4, UNK, UNK, 4, 5, END]
    assert vocab.encode("A zebra and a dog", max_length=2) == [START, 4, UNK, END]
    assert vocab.decode(vocab.encode("A zebra")) == "a <unk>"
    assert vocab.encode("") == [START, END]


def test_decode_stops_at_end_and_drops_start_and_pad() -> None:
    vocab = Vocab.build(CAPTIONS, min_count=2)
    assert vocab.decode([START, 4, 5, END, 6, 6]) == "a dog"
    assert vocab.decode([4, PAD, 6, PAD, PAD]) == "a cat"
    assert vocab.decode([]) == ""


def test_decode_rejects_unknown_id() -> None:
    vocab = Vocab.build(CAPTIONS, min_count=2)
    with pytest.raises(ValueError, match=r"token id 7 is outside the vocabulary \(0\.\.6\)"):
        vocab.decode([START, 7])


def test_save_load_round_trip(tmp_path: Path) -> None:
    vocab = Vocab.build(CAPTIONS + ["café café"], min_count=1)
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert json.loads(path.read_text(encoding="utf-8")) == list(vocab.tokens)
    loaded = Vocab.load(path)
    assert loaded == vocab
    assert loaded.encode("a café") == vocab.encode("a café")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"min_count": 0}, "min_count must be an integer >= 1, got 0 (1 keeps every word)"),
        ({"min_count": 2.5}, "min_count must be an integer >= 1, got 2.5 (1 keeps every word)"),
        ({"top_k": 0}, "top_k must be an integer >= 1 or None, got 0 (None keeps every word)"),
        ({"top_k": True}, "top_k must be an integer >= 1 or None, got True (None keeps every word)"),
    ],
)
def test_build_rejects_bad_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError) as error:
        Vocab.build(CAPTIONS, **options)
    assert str(error.value) == message


def test_build_rejects_a_single_string() -> None:
    with pytest.raises(ValueError, match="not one string"):
        Vocab.build("a dog runs")


@pytest.mark.parametrize("max_length", [0, -1, 1.5])
def test_encode_rejects_bad_max_length(max_length: object) -> None:
    with pytest.raises(ValueError, match="max_length must be an integer >= 1 or None"):
        Vocab.build(CAPTIONS).encode("a dog", max_length=max_length)


@pytest.mark.parametrize(
    "tokens, message",
    [
        (["<pad>", "<end>", "<start>", "<unk>", "a"], "a vocabulary must start with <pad>, <start>, <end>, <unk>"),
        ([*SPECIALS, "a", "dog", "a"], "token 'a' appears more than once in the vocabulary"),
        ([*SPECIALS, "a", "two words"], "'two words' is not a word token"),
    ],
)
def test_constructor_rejects_bad_tokens(tokens: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Vocab(tokens)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not a JSON vocabulary"),
        ('{"a": 1}', "expected a JSON list of token strings"),
        ('["<pad>", "<start>", "<end>", "<unk>", 5]', "expected a JSON list of token strings"),
        ('["a", "b"]', "a vocabulary must start with <pad>, <start>, <end>, <unk>"),
    ],
)
def test_load_rejects_malformed_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "vocab.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DatasetError) as error:
        Vocab.load(path)
    assert str(error.value).startswith(f"{path}: {message}")
