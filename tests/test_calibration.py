"""Caption confidence: the runtime's map and rule, the fit on made-up scores, the bundle round trip."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from caption_cli.bundle import load_bundle
from caption_cli.cli import app
from caption_cli.confidence import (Calibration, caption_features, check_min_confidence, held_back_message,
                                    passes, split_by_confidence)
from caption_cli.errors import BundleError
from tests.test_bundle import error_of, make_bundle

CALIBRATION = {"method": "logistic", "features": ["mean_logprob", "words"], "coef": [4.0, -0.1], "intercept": 4.5}


# ------------------------------------------------------------------ runtime side


def test_confidence_is_the_logistic_of_the_features():
    calibration = Calibration.from_meta(CALIBRATION)
    values = caption_features(logprob=-3.0, length=6, words=5)  # mean -0.5 per token, <end> included
    assert values == {"mean_logprob": -0.5, "words": 5.0}
    z = 4.5 + 4.0 * -0.5 - 0.1 * 5
    assert calibration.confidence(values) == pytest.approx(1 / (1 + math.exp(-z)), rel=1e-12)
    # extreme scores neither overflow nor leave [0, 1]
    assert calibration.confidence({"mean_logprob": -1e6, "words": 3}) == 0.0
    assert calibration.confidence({"mean_logprob": 1e6, "words": 3}) == 1.0


@pytest.mark.parametrize("change, fragment", [
    ({"method": "isotonic"}, "method 'isotonic'"),
    ({"features": ["mean_logprob", "colour"]}, "features must be a list drawn from"),
    ({"coef": [1.0]}, "coef must be one number per feature"),
    ({"coef": [1.0, float("nan")]}, "coef must be one number per feature"),
    ({"intercept": "4"}, "intercept must be a number"),
])
def test_a_malformed_calibration_refuses_the_bundle(tmp_path: Path, change: dict, fragment: str):
    folder = make_bundle(tmp_path / "b", calibration={**CALIBRATION, **change})
    message = error_of(folder)
    assert message.startswith(f"{folder / 'model.json'}: invalid 'calibration' (")
    assert fragment in message


def test_bundle_exposes_its_calibration_or_none(tmp_path: Path):
    assert load_bundle(make_bundle(tmp_path / "plain")).calibration is None
    calibrated = load_bundle(make_bundle(tmp_path / "cal", calibration=CALIBRATION)).calibration
    assert calibrated == Calibration(("mean_logprob", "words"), (4.0, -0.1), 4.5)


@pytest.mark.parametrize("confidence, minimum, expected", [
    (0.5, 0.5, True), (0.4999, 0.5, False), (None, 0.5, False), (None, 0.0, True), (0.01, 0.0, True),
    (1.0, 1.0, True),
])
def test_passes_is_the_one_rule(confidence, minimum, expected):
    assert passes(confidence, minimum) is expected


def test_split_and_messages():
    rows = [{"path": "a", "confidence": 0.9}, {"path": "b", "confidence": 0.2}, {"path": "c", "confidence": None}]
    kept, held = split_by_confidence(rows, 0.5)
    assert [r["path"] for r in kept] == ["a"] and [r["path"] for r in held] == ["b", "c"]
    assert held_back_message(0.2, 0.5) == "confidence 0.20 is below --min-confidence 0.50"
    assert "re-annotate with --force, or pass --min-confidence 0" in held_back_message(None, 0.5)
    with pytest.raises(ValueError, match="must be from 0 to 1"):
        check_min_confidence(1.5)


# ------------------------------------------------------------------ fitting (training side)


def made_up_scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x [n, 2] (mean log-prob, words) and acceptable [n] drawn from a known logistic truth."""
    rng = np.random.default_rng(seed)
    mean_logprob = rng.uniform(-2.5, -0.2, n)
    words = rng.integers(4, 15, n).astype(float)
    truth = 1 / (1 + np.exp(-(3.0 * mean_logprob + 3.5 - 0.05 * words)))
    return np.column_stack([mean_logprob, words]), rng.random(n) < truth


def test_fit_recovers_a_known_map_and_is_calibrated_on_fresh_data():
    pytest.importorskip("sklearn")
    from training.calibration import confidences, fit, quality, reliability

    x, acceptable = made_up_scores(20000)
    calibration = fit(x, acceptable)
    assert calibration.features == ("mean_logprob", "words")
    assert calibration.coef == pytest.approx((3.0, -0.05), abs=0.25)
    assert calibration.intercept == pytest.approx(3.5, abs=0.4)
    fresh_x, fresh_ok = made_up_scores(20000, seed=1)
    confidence = confidences(calibration, fresh_x)
    assert ((confidence >= 0) & (confidence <= 1)).all()
    bins = reliability(confidence, fresh_ok)
    assert sum(b.count for b in bins) == 20000
    assert all(abs(b.mean_confidence - b.share_acceptable) < 0.05 for b in bins if b.count > 500)
    assert quality(confidence, fresh_ok)["ece"] < 0.02
    # a map that ignores the scores (the base rate everywhere) is worse
    flat = np.full_like(confidence, fresh_ok.mean())
    assert quality(flat, fresh_ok)["brier"] > quality(confidence, fresh_ok)["brier"]


def test_cross_validation_scores_captions_the_map_never_saw():
    pytest.importorskip("sklearn")
    from sklearn.metrics import roc_auc_score

    from training.calibration import cross_validated

    x, acceptable = made_up_scores(4000)
    truth = 1 / (1 + np.exp(-(3.0 * x[:, 0] + 3.5 - 0.05 * x[:, 1])))
    report = cross_validated(x, acceptable, ("mean_logprob", "words"))
    assert report["folds"] == 5
    assert report["auc"] == pytest.approx(roc_auc_score(acceptable, truth), abs=0.01)  # as good as the truth
    kept = {k["min_confidence"]: k for k in report["kept"]}
    assert kept[0.5]["kept"] == pytest.approx(np.mean(truth >= 0.5), abs=0.03)
    # a score unrelated to the outcome ranks captions no better than chance when judged held out,
    # however well a fit can memorise it in-sample
    noise = np.random.default_rng(5).normal(size=(200, 1))
    labels = np.random.default_rng(6).random(200) < 0.5
    assert abs(cross_validated(noise, labels, ("mean_logprob",))["auc"] - 0.5) < 0.1
    # a small or lopsided split still gets a map: fewer folds, or no cross-validation at all
    assert cross_validated(x[:50], np.arange(50) < 3, ("mean_logprob", "words"))["folds"] == 3
    assert cross_validated(x[:50], np.arange(50) < 1, ("mean_logprob", "words")) is None


def test_reliability_bins_by_hand():
    from training.calibration import kept_at, quality, reliability

    confidence = np.array([0.05, 0.15, 0.12, 0.95, 0.99])
    acceptable = np.array([False, True, False, True, True])
    bins = reliability(confidence, acceptable, bins=10)
    assert [(b.low, b.count, b.share_acceptable) for b in bins] == [
        (0.0, 1, 0.0), (pytest.approx(0.1), 2, 0.5), (pytest.approx(0.9), 2, 1.0)]
    ece = (1 * 0.05 + 2 * abs(0.135 - 0.5) + 2 * abs(0.97 - 1.0)) / 5
    assert quality(confidence, acceptable, bins=10)["ece"] == pytest.approx(ece, abs=1e-4)
    assert kept_at(confidence, acceptable, 0.5) == {"min_confidence": 0.5, "kept": 0.4, "acceptable_among_kept": 1.0}


def test_fit_refuses_one_sided_labels():
    pytest.importorskip("sklearn")
    from training.calibration import fit

    x, _ = made_up_scores(50)
    with pytest.raises(ValueError, match="all 50 captions are acceptable"):
        fit(x, np.ones(50, bool))


def test_diagram_is_a_png(tmp_path: Path):
    pytest.importorskip("matplotlib")
    from training.calibration import diagram, reliability

    x, acceptable = made_up_scores(500)
    out = tmp_path / "sub" / "reliability.png"
    diagram(reliability(1 / (1 + np.exp(-(3 * x[:, 0] + 3))), acceptable), out, "made-up scores")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_image_cider_averages_to_the_corpus_cider():
    pytest.importorskip("pycocoevalcap")
    from training.metrics import per_image_cider, score_captions

    refs = {"a": ["a dog runs on the grass", "a brown dog running"], "b": ["a red car on a street", "a car parked"],
            "c": ["two people on a beach", "people walk by the sea"]}
    hyps = {"a": "a dog runs on grass", "b": "a dog on the beach", "c": "people on a beach"}
    ids, scores = per_image_cider(refs, hyps, ptb=False)
    assert ids == ["a", "b", "c"]
    assert scores.mean() == pytest.approx(score_captions(refs, hyps, meteor=False, ptb=False)["CIDEr"])
    assert scores[0] > scores[1]  # the right caption scores above the wrong one


# ------------------------------------------------------------------ the tiny bundle, end to end


def test_set_calibration_keeps_the_model_id_and_the_captioner_applies_it(tiny_bundle: Path, tmp_path: Path):
    pytest.importorskip("torch")
    from caption_cli.captioner import Captioner
    from export.bundle_writer import set_calibration

    bundle_dir = tmp_path / "tiny"
    shutil.copytree(tiny_bundle, bundle_dir)
    before = load_bundle(bundle_dir)
    pixels = np.random.default_rng(0).integers(0, 256, (3, before.image_size, before.image_size, 3), dtype=np.uint8)
    assert all(c.confidence is None and c.mean_logprob is not None for c in Captioner(before).caption(pixels))

    set_calibration(bundle_dir, CALIBRATION)
    after = load_bundle(bundle_dir)
    assert after.model_id == before.model_id  # stored captions stay valid
    assert json.loads((bundle_dir / "model.json").read_text())["calibration"] == CALIBRATION
    calibration = Calibration.from_meta(CALIBRATION)
    for caption in Captioner(after).caption(pixels):
        expected = calibration.confidence({"mean_logprob": caption.mean_logprob, "words": len(caption.words)})
        assert caption.confidence == pytest.approx(expected, abs=1e-4)
        assert caption.alternatives[0].confidence == caption.confidence
        assert all(0 <= a.confidence <= 1 for a in caption.alternatives)
    with pytest.raises(BundleError, match="coef must be one number per feature"):
        set_calibration(bundle_dir, {**CALIBRATION, "coef": [1.0]})
    assert load_bundle(bundle_dir).calibration == calibration  # a refused map leaves the bundle as it was


def test_calibrate_never_fits_on_test():
    result = CliRunner().invoke(app, ["calibrate", "--split", "test"])
    assert result.exit_code == 2
    assert "never fit on the test split" in result.output


def test_set_scores_records_measured_scores_and_refuses_a_non_object(tiny_bundle: Path, tmp_path: Path):
    pytest.importorskip("torch")
    from export.bundle_writer import ExportError, set_scores

    bundle_dir = tmp_path / "tiny"
    shutil.copytree(tiny_bundle, bundle_dir)
    model_id = load_bundle(bundle_dir).model_id
    scores = {"split": "test", "dataset": "made up", "beam_size": 3, "CIDEr": 0.5,
              "more": [{"split": "test", "dataset": "other", "beam_size": 3, "CIDEr": 0.4}]}
    set_scores(bundle_dir, scores)
    assert load_bundle(bundle_dir).meta["scores"] == scores
    assert load_bundle(bundle_dir).model_id == model_id
    with pytest.raises(ExportError, match="scores must be a JSON object"):
        set_scores(bundle_dir, [0.5])  # type: ignore[arg-type]
    assert load_bundle(bundle_dir).meta["scores"] == scores
