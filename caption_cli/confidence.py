"""Caption confidence: the calibrated probability that a caption is acceptable.

Wrong alt text is worse than none, so every caption carries a number in [0, 1] that
means something: the share of validation captions with the same model score that a
CIDEr threshold called acceptable. The map is a logistic regression over a few
numbers the beam search already has, and, when the bundle ships a confidence scorer,
the scorer's teacher-forced log-probability of the caption (fitted by
training/calibration.py, stored in the bundle's model.json by export/); the runtime
only evaluates it.

Why a scorer: SCST fine-tuning makes the captioning model's own distribution peaked,
so its log-probability says little about whether a caption is right (on union val, 15
more SCST epochs took its AUC from 0.723 to 0.648). The cross-entropy model it was
fine-tuned from still spreads probability by how sure it is (docs/training.md).

`passes` is the one rule every consumer uses (write-metadata, annotate
--write-metadata, alt-text, report), so they can never disagree on what "too
doubtful to publish" means.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from caption_cli.errors import BundleError

# Captions below this are held back from metadata and alt text unless the user says otherwise.
DEFAULT_MIN_CONFIDENCE = 0.5
METHOD = "logistic"
# What the map reads, by name: model.json lists the names it was fitted on, in order.
FEATURES = ("mean_logprob", "words", "scorer_mean_logprob")
# The features a map is fitted on when the bundle has no scorer / has one.
PLAIN_FEATURES = ("mean_logprob", "words")
SCORER_FEATURES = ("mean_logprob", "words", "scorer_mean_logprob")


def caption_features(logprob: float, length: int, words: int,
                     scorer_logprob: float | None = None) -> dict[str, float]:
    """The calibration inputs of one caption.

    logprob: sum of the caption's token log-probabilities (including <end>);
    length: tokens it was scored over (words + <end>, or words when cut at max_length);
    words: words in the caption; scorer_logprob: the scorer's sum over the same tokens
    (None: the bundle has no scorer). Means per token do not depend on the search's
    length penalty, so one calibration serves every --beam and penalty.
    """
    values = {"mean_logprob": logprob / max(length, 1), "words": float(words)}
    if scorer_logprob is not None:
        values["scorer_mean_logprob"] = scorer_logprob / max(length, 1)
    return values


@dataclass(frozen=True)
class Calibration:
    """confidence = sigmoid(intercept + sum coef[i] * feature[i])."""

    features: tuple[str, ...]
    coef: tuple[float, ...]
    intercept: float

    def confidence(self, values: Mapping[str, float]) -> float:
        z = self.intercept + sum(c * values[name] for name, c in zip(self.features, self.coef))
        if z >= 0:  # the two halves of the sigmoid that cannot overflow
            return 1.0 / (1.0 + math.exp(-z))
        e = math.exp(z)
        return e / (1.0 + e)

    def to_meta(self) -> dict[str, Any]:
        return {"method": METHOD, "features": list(self.features), "coef": list(self.coef),
                "intercept": self.intercept}

    @classmethod
    def from_meta(cls, meta: Any, where: str = "model.json") -> Calibration:
        """Read model.json's `calibration`; a malformed one is refused naming what is wrong."""

        def bad(why: str) -> BundleError:
            return BundleError(f"{where}: invalid 'calibration' ({why}); re-run caption-cli calibrate")

        if not isinstance(meta, dict):
            raise bad("expected an object")
        if meta.get("method") != METHOD:
            raise bad(f"method {meta.get('method')!r}, this caption-cli reads {METHOD!r}")
        features, coef, intercept = meta.get("features"), meta.get("coef"), meta.get("intercept")
        if not (isinstance(features, list) and features and all(f in FEATURES for f in features)):
            raise bad(f"features must be a list drawn from {', '.join(FEATURES)}")
        if not (isinstance(coef, list) and len(coef) == len(features) and all(_is_number(c) for c in coef)):
            raise bad("coef must be one number per feature")
        if not _is_number(intercept):
            raise bad("intercept must be a number")
        return cls(tuple(features), tuple(float(c) for c in coef), float(intercept))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_min_confidence(value: float) -> float:
    """--min-confidence must be a probability; the message names the range."""
    if not (_is_number(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"must be from 0 to 1 (0 keeps every caption), got {value!r}")
    return float(value)


def passes(confidence: float | None, minimum: float) -> bool:
    """Whether a caption may be published at this minimum.

    A caption without a confidence (a bundle without calibration, or a row written by
    an older caption-cli) passes only when the user asked for no minimum at all: not
    knowing is not the same as being sure.
    """
    if minimum <= 0.0:
        return True
    return confidence is not None and confidence >= minimum


def held_back_message(confidence: float | None, minimum: float) -> str:
    """Why `passes` said no, for the per-file line."""
    if confidence is None:
        return (f"caption has no confidence (uncalibrated model or an older database row); "
                f"re-annotate with --force, or pass --min-confidence 0")
    return f"confidence {confidence:.2f} is below --min-confidence {minimum:.2f}"


def split_by_confidence(rows: Sequence[dict], minimum: float) -> tuple[list[dict], list[dict]]:
    """(rows that pass, rows held back) for rows with a `confidence` key."""
    kept, held = [], []
    for row in rows:
        (kept if passes(row.get("confidence"), minimum) else held).append(row)
    return kept, held
