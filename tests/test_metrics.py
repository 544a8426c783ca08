"""Caption metrics through pycocoevalcap, with and without Java."""

from __future__ import annotations

import pytest

pytest.importorskip("pycocoevalcap")

from training import metrics  # noqa: E402

REFS = {"a": ["a dog runs on the grass", "a brown dog is running"], "b": ["two people ride bikes", "people on bicycles"]}


def test_perfect_hypotheses_score_high_and_wrong_ones_low(monkeypatch) -> None:
    monkeypatch.setattr(metrics, "java_available", lambda: False)  # python-only path, fast
    perfect = metrics.score_captions(REFS, {"a": "a dog runs on the grass", "b": "two people ride bikes"})
    wrong = metrics.score_captions(REFS, {"a": "bikes", "b": "a cat sleeps"})
    assert perfect["BLEU-1"] > 0.99 and perfect["ROUGE-L"] > 0.99
    assert wrong["BLEU-1"] < 0.3 and wrong["CIDEr"] < perfect["CIDEr"]
    assert "METEOR" not in perfect
    assert any("METEOR skipped" in note for note in perfect["notes"])


def test_java_metrics_when_java_is_installed() -> None:
    if not metrics.java_available():
        pytest.skip("no java here; CI installs a headless JRE")
    scores = metrics.score_captions(REFS, {"a": "a dog runs on the grass", "b": "two people ride bikes"})
    assert scores["METEOR"] > 0.5
    assert "notes" not in scores
