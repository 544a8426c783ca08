"""Fit and check the caption confidence map (caption_cli.confidence) on held-out data.

"Acceptable" is decided per image by CIDEr against that image's references: a caption
at or above the threshold counts as acceptable. A logistic regression from the search's
own numbers (mean token log-probability, caption length; and the confidence scorer's
mean log-probability when the bundle has one) to that outcome is Platt scaling: smooth,
monotone in the log-probability, a few numbers in model.json, and the runtime needs no
library to apply it. scikit-learn fits it; the reliability
diagram bins the result against the observed share of acceptable captions.

Fitting is only allowed on a validation split; checking works on any split, so the
diagram in the docs can show test images the map never saw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from caption_cli.confidence import PLAIN_FEATURES, SCORER_FEATURES, Calibration
from caption_cli.results import Caption

DEFAULT_CIDER_THRESHOLD = 0.5  # per-image CIDEr at which a caption counts as acceptable
DEFAULT_BINS = 10


@dataclass(frozen=True)
class ReliabilityBin:
    """One confidence bin: how sure the model said it was, and how often it was right."""

    low: float
    high: float
    count: int
    mean_confidence: float
    share_acceptable: float


def feature_matrix(captions: Sequence[Caption], features: Sequence[str] = PLAIN_FEATURES) -> np.ndarray:
    """[N, F] calibration inputs, in the order the bundle lists them."""
    rows = []
    for caption in captions:
        values = {"mean_logprob": caption.mean_logprob, "words": float(len(caption.words)),
                  "scorer_mean_logprob": caption.scorer_mean_logprob}
        missing = [name for name in features if values[name] is None]
        if missing:
            raise ValueError(f"caption {caption.text!r} has no {missing[0]} to calibrate on")
        rows.append([values[name] for name in features])
    return np.asarray(rows, dtype=np.float64)


def fit(x: np.ndarray, acceptable: np.ndarray, features: Sequence[str] = PLAIN_FEATURES) -> Calibration:
    """Logistic regression (nearly unregularised) of acceptable [N] on x [N, F]."""
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(acceptable, dtype=bool)
    if labels.all() or not labels.any():
        raise ValueError(f"cannot calibrate: all {len(labels)} captions are "
                         f"{'acceptable' if labels.all() else 'unacceptable'}; change the CIDEr threshold")
    model = LogisticRegression(C=1e4, max_iter=1000).fit(x, labels)
    return Calibration(tuple(features), tuple(float(c) for c in model.coef_[0]), float(model.intercept_[0]))


def confidences(calibration: Calibration, x: np.ndarray) -> np.ndarray:
    """The runtime's own formula over x [N, F] (so the check measures what users get)."""
    return np.array([calibration.confidence(dict(zip(calibration.features, row))) for row in x])


def reliability(confidence: np.ndarray, acceptable: np.ndarray, bins: int = DEFAULT_BINS) -> list[ReliabilityBin]:
    """Equal-width bins over [0, 1]; empty bins are left out."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=False), 0, bins - 1)
    out = []
    for b in range(bins):
        inside = which == b
        if inside.any():
            out.append(ReliabilityBin(float(edges[b]), float(edges[b + 1]), int(inside.sum()),
                                      float(confidence[inside].mean()), float(np.mean(acceptable[inside]))))
    return out


def quality(confidence: np.ndarray, acceptable: np.ndarray, bins: int = DEFAULT_BINS) -> dict[str, float]:
    """Expected calibration error (count-weighted |confidence - share| over bins), Brier score, base rate."""
    from sklearn.metrics import brier_score_loss

    table = reliability(confidence, acceptable, bins)
    n = len(confidence)
    ece = sum(b.count / n * abs(b.mean_confidence - b.share_acceptable) for b in table)
    return {"ece": round(float(ece), 4), "brier": round(float(brier_score_loss(acceptable, confidence)), 4),
            "acceptable_share": round(float(np.mean(acceptable)), 4), "images": n}


def cross_validated(x: np.ndarray, acceptable: np.ndarray, features: Sequence[str], folds: int = 5,
                    seed: int = 0) -> dict[str, Any] | None:
    """How the map would do on captions it was not fitted on: each caption's confidence from a
    map fitted on the other folds (stratified), then AUC, Brier and what 0.5 / 0.7 would keep.
    The in-sample numbers of a fitted map flatter it; these are what decide between feature sets.
    With fewer than `folds` captions on one side, as many folds as that side has; None below 2
    (each fold needs both kinds to fit on)."""
    from sklearn.metrics import brier_score_loss
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(acceptable, dtype=bool)
    folds = min(folds, int(labels.sum()), int((~labels).sum()))
    if folds < 2:
        return None
    held_out = np.zeros(len(labels))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, labels):
        held_out[test] = confidences(fit(x[train], labels[train], features), x[test])
    return {"folds": folds, "auc": _auc(held_out, labels),
            "brier": round(float(brier_score_loss(labels, held_out)), 4),
            "kept": [kept_at(held_out, labels, m) for m in (0.5, 0.7)]}


def _auc(confidence: np.ndarray, acceptable: np.ndarray) -> float | None:
    """How well confidence ranks acceptable captions above the rest (0.5: not at all);
    None when every caption is on one side."""
    from sklearn.metrics import roc_auc_score

    if not 0 < np.sum(acceptable) < len(acceptable):
        return None
    return round(float(roc_auc_score(acceptable, confidence)), 4)


def kept_at(confidence: np.ndarray, acceptable: np.ndarray, minimum: float) -> dict[str, float]:
    """What --min-confidence would keep: the share of captions kept and how many of those are acceptable."""
    keep = confidence >= minimum
    return {"min_confidence": minimum, "kept": round(float(keep.mean()), 4),
            "acceptable_among_kept": round(float(acceptable[keep].mean()), 4) if keep.any() else None}


def diagram(table: Sequence[ReliabilityBin], out: Path, title: str) -> None:
    """Reliability diagram PNG: bars = share acceptable per bin, diagonal = perfect calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=(3, 1), sharex=True)
    centres = [(b.low + b.high) / 2 for b in table]
    width = table[0].high - table[0].low if table else 0.1
    top.bar(centres, [b.share_acceptable for b in table], width=width * 0.9, color="#4a7bb7",
            label="share acceptable (observed)")
    top.plot([b.mean_confidence for b in table], [b.share_acceptable for b in table], "o", color="#1b3a5c",
             label="bin mean confidence")
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    top.set_ylabel("share of captions acceptable")
    top.set_ylim(0, 1)
    top.set_title(title, fontsize=9)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, [b.count for b in table], width=width * 0.9, color="#999999")
    bottom.set_ylabel("captions")
    bottom.set_xlabel("confidence")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def acceptable_by_cider(references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str],
                        threshold: float) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, per-image CIDEr, acceptable) for the hypotheses, CIDEr from pycocoevalcap."""
    from training.metrics import per_image_cider

    ids, cider = per_image_cider(references, hypotheses)
    return ids, cider, cider >= threshold


def run_calibration(bundle_dir: Path | None, dataset, split: str, *, beam: int | None = None,
                    threshold: float = DEFAULT_CIDER_THRESHOLD, fit_map: bool = True,
                    diagram_path: Path | None = None, device: str = "auto", data_name: str = "") -> dict:
    """Caption `split` with the bundle, judge each caption by CIDEr, then fit (fit_map) or
    check the bundle's confidence map there. Fitting writes the map into model.json.

    Returns a report: quality (ECE, Brier, base rate), the reliability bins and what a few
    --min-confidence values would keep.
    """
    from caption_cli.bundle import DEFAULT_BUNDLE_DIR, load_bundle
    from training.evaluate import bundle_captions

    if fit_map and split == "test":
        raise ValueError("the confidence map is never fitted on the test split; fit on val, check on test")
    bundle = load_bundle(bundle_dir)
    beam = beam or bundle.search_defaults.beam_size
    records = dataset.split(split)
    if not records:
        raise ValueError(f"the data set has no {split!r} images")
    captions = bundle_captions(bundle_dir, dataset, records, [beam], device)[beam]
    references = {r.image_id: list(r.captions) for r in records}
    ids, cider, acceptable = acceptable_by_cider(references, {i: c.text for i, c in captions.items()}, threshold)
    if fit_map:
        features = SCORER_FEATURES if bundle.scorer_path is not None else PLAIN_FEATURES
        x = feature_matrix([captions[i] for i in ids], features)
        calibration = fit(x, acceptable, features)
        held_out = cross_validated(x, acceptable, features)
    elif bundle.calibration is None:
        raise ValueError(f"{bundle.path}: has no calibration to check; run caption-cli calibrate on val first")
    else:
        calibration = bundle.calibration
        x = feature_matrix([captions[i] for i in ids], calibration.features)
    confidence = confidences(calibration, x)
    table = reliability(confidence, acceptable)
    report = {
        "split": split, "beam_size": beam, "acceptable": {"metric": "CIDEr", "threshold": threshold},
        "quality": quality(confidence, acceptable),
        "auc": _auc(confidence, acceptable),
        "mean_cider": round(float(cider.mean()), 4),
        "kept": [kept_at(confidence, acceptable, m) for m in (0.3, 0.5, 0.7)],
        "bins": [b.__dict__ for b in table],
    }
    if fit_map and held_out is not None:
        report["cross_validated"] = held_out
    if diagram_path is not None:
        q = report["quality"]
        diagram(table, diagram_path, f"{bundle.name}, {data_name} {split} ({q['images']} images), beam {beam}\n"
                                     f"acceptable = per-image CIDEr >= {threshold}; ECE {q['ece']:.3f}")
    if fit_map:
        from export.bundle_writer import set_calibration

        meta = {**calibration.to_meta(),
                "acceptable": {"metric": "CIDEr (per image, pycocoevalcap, PTB tokens)", "threshold": threshold},
                "fitted_on": {"split": split, "images": len(ids), "beam_size": beam,
                              "data": data_name},
                "quality": report["quality"]}
        set_calibration(bundle.path if bundle_dir is not None else DEFAULT_BUNDLE_DIR, meta)
        report["calibration"] = meta
    return report
