"""Shared fixtures: a tiny random model bundle built on the fly with export/.

Sizes are chosen so that mixed-up dimensions fail loudly: V=11 tokens, E=24, A=20,
H=28, W=16, a 2x2 grid (L=4) from the real EfficientNet-Lite0 at 64 px, and the
bundle's default beam size is 3. The random weights are scaled so captions depend on
the image, and the <end> logit is raised so most captions end before max_length
(some never do, which exercises the length limit too). torch is imported lazily: tests
that need no bundle run without it.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TINY_VOCAB = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs", "on", "the", "grass", "red"]
TINY_IMAGE_SIZE = 64  # lite0 at 64 px -> 2x2 grid
TINY_MAX_LENGTH = 8  # tokens the search may generate, <end> included
TINY_SEARCH = {"beam_size": 3, "length_penalty": 0.7, "alternatives": 3}
TINY_SEED = 2


@dataclass
class TinyParts:
    """The PyTorch side of the tiny bundle, for parity and search comparisons."""

    model: Any  # training.model.ShowAttendTell, eval mode
    backbone: Any  # training.backbone.EfficientNetLite at TINY_IMAGE_SIZE
    vocab: list[str]


def build_tiny_parts(seed: int = TINY_SEED) -> TinyParts:
    """A deterministic random ShowAttendTell small enough to export in a few seconds."""
    torch = pytest.importorskip("torch")
    from training.backbone import load_backbone
    from training.model import ModelConfig, ShowAttendTell

    backbone = load_backbone("efficientnet-lite0", TINY_IMAGE_SIZE)
    cfg = ModelConfig(vocab_size=len(TINY_VOCAB), feature_dim=backbone.spec.channels, grid=backbone.spec.grid,
                      encoder_dim=24, attention_dim=20, hidden_dim=28, embed_dim=16,
                      max_length=TINY_MAX_LENGTH + 1)
    torch.manual_seed(seed)
    model = ShowAttendTell(cfg)
    with torch.no_grad():
        step = model.step
        for layer in (model.encoder.project, step.out_context, step.out, step.attention.score, step.attention.query):
            layer.weight.mul_(3.0)  # let the image, not only the previous word, drive the next word
        step.embed.weight.mul_(0.5)
        step.out.bias[cfg.special["pad"]] = -8.0  # a trained model never says <pad> or <start>
        step.out.bias[cfg.special["start"]] = -8.0
        step.out.bias[cfg.special["end"]] += 0.5  # captions end, at different lengths per image
    model.eval().requires_grad_(False)
    return TinyParts(model, backbone, list(TINY_VOCAB))


@pytest.fixture(scope="session")
def tiny_parts() -> TinyParts:
    return build_tiny_parts()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_parts: TinyParts) -> Path:
    """Path of a tiny random model bundle (model.json, encoder.onnx, decoder.onnx, vocab.json)."""
    from export.bundle_writer import write_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    training = {"dataset": "tiny-random", "split": "train", "images": 0, "captions": 0, "epochs": 0, "config": {}}
    return write_bundle(tiny_parts.model, tiny_parts.backbone, tiny_parts.vocab, out, name="tiny-random",
                        max_length=TINY_MAX_LENGTH, search=dict(TINY_SEARCH), training=training,
                        scores={"split": "none", "engine": "none"})


TINY_SCORER_SEED = 5


@pytest.fixture(scope="session")
def tiny_scorer_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_parts: TinyParts) -> Path:
    """The tiny bundle with a confidence scorer: another random model on the same backbone
    and vocabulary (build_tiny_parts(TINY_SCORER_SEED)), as export --scorer writes it."""
    from export.bundle_writer import write_bundle

    scorer = build_tiny_parts(TINY_SCORER_SEED).model
    out = tmp_path_factory.mktemp("bundles") / "tiny-scorer"
    return write_bundle(tiny_parts.model, tiny_parts.backbone, tiny_parts.vocab, out, name="tiny-random",
                        max_length=TINY_MAX_LENGTH, search=dict(TINY_SEARCH), scorer=scorer,
                        scorer_info={"dataset": "tiny-random"})


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_parts: TinyParts) -> Path:
    """A training checkpoint of the tiny model, in the format training/train.py writes."""
    torch = pytest.importorskip("torch")

    model = tiny_parts.model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # its state is saved, and ignored by export
    path = tmp_path_factory.mktemp("checkpoints") / "tiny.pt"
    torch.save({
        "model": model.state_dict(),
        "model_config": model.cfg.to_dict(),
        "backbone": {"name": tiny_parts.backbone.spec.name, "image_size": tiny_parts.backbone.spec.image_size},
        "vocab": list(tiny_parts.vocab),
        "train_config": {"batch_size": 32, "lr": 1e-3, "epochs": 3, "attention_lambda": 1.0},
        "epoch": 3,
        "step": 1234,
        "dataset": {"name": "tinyset", "images": 40, "captions": 200},
        "scores": {"split": "val", "beam_size": 3, "BLEU-4": 0.01, "engine": "pytorch"},
        "optimizer": optimizer.state_dict(),
    }, path)
    return path


def sigint_as_in_a_terminal() -> None:
    """Popen preexec_fn for tests that send Ctrl-C to a child: restore SIGINT's default.

    A test run started in the background by a non-interactive shell (`pytest &`) inherits
    SIGINT ignored, and a Python started that way never raises KeyboardInterrupt; the
    child of a user's terminal gets the default, which is what these tests are about.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
