"""export.word_pairs: which word may not follow which, read off training captions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from caption_cli.bundle import load_bundle
from caption_cli.errors import BundleError
from export.word_pairs import main, set_no_next_after, unlikely_pairs
from tests.test_endings import karpathy_data

VOCAB = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs", "on", "grass", "red", "the", "cat"]


def test_pairs_never_seen_although_common_are_found():
    captions = ["a dog runs on the grass"] * 50 + ["the red dog runs"] * 20 + ["a cat"]
    # 382 words: "a" 51, "dog" 70, "runs" 70, "on" 50, "the" 70, "grass" 50, "red" 20, "cat" 1
    rules = unlikely_pairs(captions, VOCAB, min_expected=9.0, max_ratio=0.0)
    assert rules["a"] == ["runs", "the"]  # 51 * 70 / 382 = 9.3; a-on and a-grass expect only 6.7
    assert rules["the"] == ["a", "dog", "on", "runs", "the"]  # "the dog" is never said: the red one is
    assert "grass" not in rules["the"] and "red" not in rules["the"]  # both seen
    assert all("cat" not in after for after in rules.values()) and "cat" not in rules  # rare: never listed
    assert not any("is" in after for after in rules.values())  # outside the vocabulary
    for first, after in rules.items():  # never a pair the captions hold
        for second in after:
            assert not any(f"{first} {second}" in f" {c} " for c in captions)
    fewer = unlikely_pairs(captions, VOCAB, min_expected=13.0, max_ratio=0.0)
    assert sum(map(len, fewer.values())) < sum(map(len, rules.values()))
    assert all(set(after) <= set(rules[first]) for first, after in fewer.items())
    assert unlikely_pairs([], VOCAB) == {}
    with pytest.raises(ValueError, match="min_expected"):
        unlikely_pairs(captions, VOCAB, min_expected=0)
    with pytest.raises(ValueError, match="max_ratio"):
        unlikely_pairs(captions, VOCAB, max_ratio=1.0)


def test_a_typo_or_two_does_not_make_a_pair_english():
    # "a the" is said once in 800 captions although chance expects it 160 times (800 * 800 / 3,998 words)
    captions = ["a dog on the grass"] * 399 + ["the dog on a grass"] * 400 + ["a the dog"]
    assert "the" not in unlikely_pairs(captions, VOCAB, min_expected=50.0, max_ratio=0.0).get("a", [])
    assert "the" not in unlikely_pairs(captions, VOCAB, min_expected=50.0, max_ratio=0.006).get("a", [])
    assert "the" in unlikely_pairs(captions, VOCAB, min_expected=50.0, max_ratio=0.007)["a"]  # 1 / 160 = 0.00625
    # pairs said often stay allowed: "on the", "on a" (399 and 400 times, ~2.5x chance)
    assert not {"the", "a"} & set(unlikely_pairs(captions, VOCAB, min_expected=50.0, max_ratio=0.007).get("on", []))


def test_the_rule_is_written_into_the_bundle_and_the_captioner_obeys_it(tiny_bundle: Path, tmp_path: Path):
    pytest.importorskip("torch")
    from caption_cli.captioner import Captioner

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    pixels = np.random.default_rng(4).integers(0, 256, (12, 64, 64, 3), dtype=np.uint8)
    before = Captioner(load_bundle(bundle), "cpu").caption(pixels)
    said = [pair for c in before for alt in c.alternatives
            for pair in zip(alt.caption.split(), alt.caption.split()[1:])]
    assert said, "the tiny model says some two-word sequence"
    first, second = max(set(said), key=said.count)
    set_no_next_after(bundle, {first: [second]})
    loaded = load_bundle(bundle)
    assert loaded.model_id == load_bundle(tiny_bundle).model_id  # a search rule, not new weights
    after = Captioner(loaded, "cpu").caption(pixels)
    for caption in after:
        for alt in caption.alternatives:
            assert (first, second) not in zip(alt.caption.split(), alt.caption.split()[1:])
    assert [c.text for c in after] != [c.text for c in before]
    with pytest.raises(BundleError, match="not an ordinary word"):
        set_no_next_after(bundle, {first: ["no-such-word"]})
    assert load_bundle(bundle).no_next_after == loaded.no_next_after  # rolled back


def test_the_command_reads_only_the_train_split(tiny_bundle: Path, tmp_path: Path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    first, second = load_bundle(bundle).vocab[4:6]
    # in train, `first second` never occurs (both common); in test it always does
    data = karpathy_data(tmp_path, train=f"{first} x {second} y", test=f"{first} {second}")
    main([str(bundle), *data, "--min-expected", "5"])
    rules = json.loads((bundle / "model.json").read_text())["search"]["no_next_after"]
    assert second in rules[first] and "written to" in capsys.readouterr().out


def test_a_version_1_bundle_given_the_rule_becomes_version_2(tmp_path: Path):
    from tests.test_bundle import make_bundle

    folder = make_bundle(tmp_path / "v1")  # format_version 1, vocabulary <pad> <start> <end> <unk> a dog runs
    set_no_next_after(folder, {"a": ["runs"]})
    meta = json.loads((folder / "model.json").read_text())
    assert meta["format_version"] == 2  # a caption-cli that would ignore the rule refuses the bundle
    assert load_bundle(folder).no_next_after == {4: (6,)}
