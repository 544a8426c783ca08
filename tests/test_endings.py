"""export.endings: which words a caption may not end on, read off training captions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from caption_cli.bundle import load_bundle
from caption_cli.errors import BundleError
from export.endings import main, never_final_words, set_no_end_after

VOCAB = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs", "on", "grass", "red", "the"]


def test_words_that_rarely_end_a_caption_are_found():
    captions = ["A dog runs on the grass."] * 60 + ["a dog runs on red grass"] * 30 + ["A red dog runs"] * 10
    captions += ["the dog is red"]  # "red" ends 1 of its 41 uses; "runs" 10 of 100
    assert never_final_words(captions, VOCAB, max_rate=0.01, min_count=20) == ["a", "dog", "on", "the"]
    assert never_final_words(captions, VOCAB, max_rate=0.05, min_count=20) == ["a", "dog", "on", "red", "the"]
    # rare words are left alone, and words outside the vocabulary ("is") are never listed
    assert never_final_words(captions, VOCAB, max_rate=0.05, min_count=80) == ["a", "dog", "on"]
    with pytest.raises(ValueError, match="max_rate"):
        never_final_words(captions, VOCAB, max_rate=1.0)


def test_the_list_is_written_into_the_bundle_and_the_bundle_still_verifies(tiny_bundle: Path, tmp_path: Path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    words = load_bundle(bundle).vocab[4:6]
    set_no_end_after(bundle, words)
    loaded = load_bundle(bundle)
    assert json.loads((bundle / "model.json").read_text())["search"]["no_end_after"] == words
    assert loaded.no_end_after == (4, 5)
    with pytest.raises(BundleError, match="not an ordinary word"):
        set_no_end_after(bundle, ["no-such-word-in-the-vocabulary"])
    assert load_bundle(bundle).no_end_after == (4, 5)  # the refused change was rolled back


def karpathy_data(tmp_path: Path, train: str, test: str) -> list[str]:
    """A Karpathy-layout data set of 3 train and 3 test images, each with 20 copies of one
    caption (`train` or `test`), and the command-line arguments that read it."""
    images = tmp_path / "images"
    images.mkdir()
    entries = []
    for i, split in enumerate(["train"] * 3 + ["test"] * 3):
        (images / f"{i}.jpg").write_bytes(b"not read")
        entries.append({"filename": f"{i}.jpg", "split": split,
                        "sentences": [{"raw": train if split == "train" else test}] * 20})
    annotations = tmp_path / "dataset.json"
    annotations.write_text(json.dumps({"images": entries}))
    return ["--data", "karpathy", "--annotations", str(annotations), "--images", str(images)]


def test_the_command_reads_only_the_train_split(tiny_bundle: Path, tmp_path: Path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    word = load_bundle(bundle).vocab[4]
    # in train, `word` never ends a caption; in test it always does
    main([str(bundle), *karpathy_data(tmp_path, train=f"{word} x", test=f"x {word}"), "--min-count", "10"])
    assert load_bundle(bundle).no_end_after == (4,)
    assert "written to" in capsys.readouterr().out
