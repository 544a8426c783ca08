"""Plain records passed between the captioner, the pipeline, the store and the reports.

They hold numpy arrays and strings only, so every stage can use them without the
others' dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Alternative:
    """One ranked caption; score is the length-normalised log-probability,
    confidence the calibrated probability that it is acceptable (None: uncalibrated model)."""

    caption: str
    score: float
    confidence: float | None = None


@dataclass
class Caption:
    """What the model says about one image."""

    text: str
    score: float
    words: list[str]  # tokens of the best caption, without <start>/<end>
    attention: np.ndarray  # float32 [T, h, w]: where the model looked for each word
    alternatives: list[Alternative] = field(default_factory=list)  # best first, includes the best
    confidence: float | None = None  # calibrated P(acceptable) in [0, 1]; None: the bundle has no calibration
    mean_logprob: float | None = None  # per token, <end> included: what the calibration reads
    scorer_mean_logprob: float | None = None  # the bundle's confidence scorer's, same tokens; None: no scorer


@dataclass
class CaptionResult:
    """One file's outcome in a run: a caption, or the reason there is none."""

    path: Path
    size: int
    mtime: float
    status: str  # "ok" or "error"
    width: int | None = None
    height: int | None = None
    error: str | None = None
    caption: Caption | None = None
    content_hash: str | None = None  # of the file's bytes, when they could be read
    reused: bool = False  # the caption was copied from a stored row with the same bytes
