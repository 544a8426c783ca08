"""Prove a written bundle computes what the PyTorch model computes.

The check runs both sides end to end on the same pixels: encoder, then several
decoder steps, each side carrying its own hidden state, both fed the same tokens
(PyTorch's greedy choice), so errors that accumulate over steps show up too.
A bundle passes when the largest log-probability difference stays below 1e-4.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from caption_cli.errors import CaptionCliError
from training.backbone import EfficientNetLite
from training.features import PixelsToGrid
from training.model import ShowAttendTell

TOLERANCE = 1e-4  # max |logprob_onnx - logprob_torch|
# The confidence scorer's step is int8 (export.quantize), so it cannot match PyTorch to 1e-4;
# what it feeds the confidence map is a caption's mean token log-probability, and an error
# of 0.05 there moves a confidence by at most ~0.05 * coef / 4 (under 0.01 for the shipped map).
SCORER_TOLERANCE = 0.05  # max |mean logprob_onnx - mean logprob_torch| of a teacher-forced sequence
SCORER_ENCODER_TOLERANCE = 1e-3  # the scorer's projection in encoder.onnx is float32


class ParityError(CaptionCliError):
    """The ONNX bundle disagrees with the PyTorch model it was exported from."""


@dataclass(frozen=True)
class ParityReport:
    """Largest absolute differences, onnxruntime vs PyTorch, over all images and steps."""

    images: int  # N
    steps: int  # decoder steps compared
    max_abs_features: float
    max_abs_keys: float
    max_abs_hidden0: float
    max_abs_logprobs: float
    max_abs_hidden: float
    max_abs_attention: float
    same_tokens: bool  # ONNX greedy argmax == PyTorch greedy argmax at every step
    tolerance: float = TOLERANCE

    @property
    def ok(self) -> bool:
        return self.max_abs_logprobs < self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        return (f"parity over {self.images} images x {self.steps} steps: max |d logprobs| "
                f"{self.max_abs_logprobs:.2e} (limit {self.tolerance:.0e}), |d hidden| {self.max_abs_hidden:.2e}, "
                f"|d attention| {self.max_abs_attention:.2e}, |d features| {self.max_abs_features:.2e}")


@dataclass(frozen=True)
class ScorerReport:
    """The confidence scorer against its PyTorch model: its projection (in encoder.onnx)
    and its int8 step, teacher-forced over the PyTorch model's own greedy words."""

    images: int
    steps: int
    max_abs_encoder: float  # scorer_features / scorer_keys / scorer_hidden0
    max_abs_mean_logprob: float  # per sequence, the feature the confidence map reads

    @property
    def ok(self) -> bool:
        return self.max_abs_encoder < SCORER_ENCODER_TOLERANCE and self.max_abs_mean_logprob < SCORER_TOLERANCE

    def summary(self) -> str:
        return (f"scorer over {self.images} images x {self.steps} steps: max |d mean logprob| "
                f"{self.max_abs_mean_logprob:.2e} (limit {SCORER_TOLERANCE:.0e}), |d encoder outputs| "
                f"{self.max_abs_encoder:.2e} (limit {SCORER_ENCODER_TOLERANCE:.0e})")


def _sessions(bundle_dir: Path, *keys: str) -> tuple:
    import onnxruntime as ort

    meta = json.loads((bundle_dir / "model.json").read_text())
    options = ort.SessionOptions()
    options.log_severity_level = 3
    open_ = lambda key: ort.InferenceSession(  # noqa: E731
        str(bundle_dir / meta["files"][key]), options, providers=["CPUExecutionProvider"])
    return (meta, *(open_(key) for key in keys or ("encoder", "decoder")))


def _max_abs(a: np.ndarray, b: torch.Tensor) -> float:
    return float(np.max(np.abs(a - b.numpy()))) if a.size else 0.0


@torch.no_grad()
def check_parity(model: ShowAttendTell, backbone: EfficientNetLite, bundle_dir: Path, pixels: np.ndarray,
                 steps: int = 6) -> ParityReport:
    """Compare the bundle in `bundle_dir` with (model, backbone) on uint8 pixels [N, S, S, 3].

    Works on deep copies in eval mode, so the caller's modules are never touched.
    """
    bundle_dir = Path(bundle_dir)
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[3] != 3:
        raise ValueError(f"pixels must be uint8 [N, S, S, 3], got {pixels.dtype} {pixels.shape}")
    meta, encoder, decoder = _sessions(bundle_dir)
    names = meta["tensors"]
    to_grid = copy.deepcopy(PixelsToGrid(backbone)).eval()
    ref = copy.deepcopy(model).eval()

    # encoder: both sides from the same pixels
    wanted = names["encoder"]["outputs"]
    ort_enc = dict(zip(wanted, encoder.run(wanted, {names["encoder"]["inputs"][0]: pixels})))
    features, keys, hidden = ref.encoder(to_grid(torch.from_numpy(pixels)))  # [N, L, E], [N, L, A], [N, H]
    f_o, k_o, h_o = (ort_enc[n] for n in names["encoder"]["outputs"])  # same order as the contract
    diffs = {"features": _max_abs(f_o, features), "keys": _max_abs(k_o, keys), "hidden0": _max_abs(h_o, hidden)}

    # decoder: each side carries its own state; both get PyTorch's greedy token
    token = torch.full((pixels.shape[0],), ref.cfg.special["start"], dtype=torch.long)  # [N]
    hidden_o = h_o
    worst = {"logprobs": 0.0, "hidden": 0.0, "attention": 0.0}
    same_tokens = True
    dec_in, dec_out = names["decoder"]["inputs"], names["decoder"]["outputs"]
    for _ in range(steps):
        logits, hidden, alpha = ref.step(token, hidden, features, keys)  # [N, V], [N, H], [N, L]
        logprobs = F.log_softmax(logits, dim=1)
        feeds = dict(zip(dec_in, (token.numpy(), hidden_o, f_o, k_o)))
        lp_o, hidden_o, alpha_o = decoder.run(dec_out, feeds)
        worst["logprobs"] = max(worst["logprobs"], _max_abs(lp_o, logprobs))
        worst["hidden"] = max(worst["hidden"], _max_abs(hidden_o, hidden))
        worst["attention"] = max(worst["attention"], _max_abs(alpha_o, alpha))
        token = logprobs.argmax(dim=1)  # [N]
        same_tokens &= bool(np.array_equal(lp_o.argmax(axis=1), token.numpy()))

    return ParityReport(
        images=int(pixels.shape[0]), steps=steps,
        max_abs_features=diffs["features"], max_abs_keys=diffs["keys"], max_abs_hidden0=diffs["hidden0"],
        max_abs_logprobs=worst["logprobs"], max_abs_hidden=worst["hidden"], max_abs_attention=worst["attention"],
        same_tokens=same_tokens,
    )


@torch.no_grad()
def check_scorer(scorer: ShowAttendTell, backbone: EfficientNetLite, bundle_dir: Path, pixels: np.ndarray,
                 steps: int = 6) -> ScorerReport:
    """Compare the bundle's scorer (encoder outputs + scorer step) with the PyTorch `scorer`
    on uint8 pixels [N, S, S, 3]: the mean log-probability of the same `steps` words."""
    bundle_dir = Path(bundle_dir)
    meta, encoder, step = _sessions(bundle_dir, "encoder", "scorer")
    names = meta["tensors"]
    wanted = names["scorer"]["from_encoder"]
    encoded = dict(zip(wanted, encoder.run(wanted, {names["encoder"]["inputs"][0]: pixels})))
    ref = copy.deepcopy(scorer).eval()
    features, keys, hidden = ref.encoder(copy.deepcopy(PixelsToGrid(backbone)).eval()(torch.from_numpy(pixels)))
    f_o, k_o, hidden_o = (encoded[name] for name in wanted)
    encoder_diff = max(_max_abs(f_o, features), _max_abs(k_o, keys), _max_abs(hidden_o, hidden))

    token = torch.full((pixels.shape[0],), ref.cfg.special["start"], dtype=torch.long)  # [N]
    total_torch = np.zeros(pixels.shape[0])
    total_onnx = np.zeros(pixels.shape[0])
    rows = np.arange(pixels.shape[0])
    step_in, step_out = names["scorer"]["inputs"], names["scorer"]["outputs"]
    for _ in range(steps):
        logits, hidden, _alpha = ref.step(token, hidden, features, keys)
        logprobs = F.log_softmax(logits, dim=1)
        lp_o, hidden_o, _ = step.run(step_out, dict(zip(step_in, (token.numpy(), hidden_o, f_o, k_o))))
        token = logprobs.argmax(dim=1)  # both sides score the same next word
        total_torch += logprobs.numpy()[rows, token.numpy()]
        total_onnx += lp_o[rows, token.numpy()]
    return ScorerReport(images=int(pixels.shape[0]), steps=steps, max_abs_encoder=encoder_diff,
                        max_abs_mean_logprob=float(np.max(np.abs(total_onnx - total_torch)) / steps))


def probe_pixels(size: int, count: int = 4, seed: int = 0) -> np.ndarray:
    """Deterministic uint8 test images [count, S, S, 3]: noise, gradients, flat colours, extremes.

    Used when no real photos are at hand; the extremes (all 0, all 255) exercise the
    normalisation inside the graph at both ends of the uint8 range.
    """
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    kinds = [
        lambda: rng.integers(0, 256, (size, size, 3)),
        lambda: np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1),
                          np.full((size, size), rng.integers(0, 256))], axis=2),
        lambda: np.zeros((size, size, 3)),
        lambda: np.full((size, size, 3), 255),
        lambda: np.broadcast_to(rng.integers(0, 256, 3), (size, size, 3)),
    ]
    return np.stack([kinds[i % len(kinds)]() for i in range(count)]).astype(np.uint8)
