"""The confidence scorer: teacher-forced scoring, its export, the bundle contract, the
captioner's pass and the calibration that reads it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from caption_cli.bundle import load_bundle
from caption_cli.confidence import Calibration, caption_features
from caption_cli.results import Caption
from caption_cli.scoring import sequence_logprobs
from tests.conftest import TINY_MAX_LENGTH, TINY_SCORER_SEED, TinyParts, build_tiny_parts
from tests.test_bundle import error_of, make_bundle, sha

# ------------------------------------------------------------------ sequence_logprobs (numpy only)

V, H, L, E = 7, 3, 2, 4


class RecordingStep:
    """A deterministic fake step whose next-word distribution depends on the token, the
    hidden state and the image's features; it records the batch size of every call."""

    def __init__(self) -> None:
        rng = np.random.default_rng(1)
        self.embed = rng.normal(size=(V, H))
        self.mix = rng.normal(size=(E, H))
        self.mix_keys = rng.normal(size=(5, H))
        self.out = rng.normal(size=(H, V))
        self.batches: list[int] = []

    def __call__(self, token, hidden, features, keys):
        self.batches.append(len(token))
        hidden = np.tanh(hidden + self.embed[token] + features.mean(axis=1) @ self.mix
                         + keys.mean(axis=1) @ self.mix_keys)
        logits = hidden @ self.out
        logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return logprobs, hidden, np.full((len(token), L), 1.0 / L)


def one_by_one(step, sequence, features, keys, hidden, start_id=1) -> float:
    """The plainest teacher-forced sum: one sequence, one row, step by step."""
    token, total = np.array([start_id]), 0.0
    for word in sequence:
        logprobs, hidden, _ = step(token, hidden, features, keys)
        total += logprobs[0, word]
        token = np.array([word])
    return total


def scored_alike(step, sequences, image_of, features, keys, hidden0) -> np.ndarray:
    """sequence_logprobs over all sequences at once, checked against one_by_one for each."""
    totals = sequence_logprobs(step, sequences, image_of, features, keys, hidden0, start_id=1)
    for sequence, image, total in zip(sequences, image_of, totals):
        expected = one_by_one(RecordingStep(), sequence, features[image:image + 1], keys[image:image + 1],
                              hidden0[image:image + 1])
        assert total == pytest.approx(expected, abs=1e-12)
    return totals


def test_sequence_logprobs_match_scoring_each_sequence_alone():
    rng = np.random.default_rng(0)
    features, keys, hidden0 = rng.normal(size=(3, L, E)), rng.normal(size=(3, L, 5)), rng.normal(size=(3, H))
    sequences = [[4, 5, 2], [6, 2], [4, 4, 4, 6, 5, 2], [], [5], [6, 6, 6, 6, 6, 6]]
    image_of = [0, 2, 1, 1, 0, 2]
    step = RecordingStep()
    totals = scored_alike(step, sequences, image_of, features, keys, hidden0)
    assert totals[3] == 0.0  # nothing to score
    # one call per position, each over the distinct prefixes still being read: image 2's two
    # sequences share their first word, so they share a row until the shorter one ends
    assert step.batches == [3, 3, 3, 2, 2, 2]


def _distinct_prefixes(sequences, image_of) -> list[int]:
    """Rows per step when sequences of one image share a row while their tokens agree."""
    longest = max(map(len, sequences))
    return [len({(image, tuple(s[:t])) for s, image in zip(sequences, image_of) if len(s) > t})
            for t in range(longest)]


@pytest.mark.parametrize("seed", range(6))
def test_shared_prefixes_are_read_once_and_every_sum_is_exact(seed: int):
    """Alternatives that split at every position, rows that end while rows behind them go on
    (their slots are refilled), several images: each sum equals scoring that sequence alone."""
    rng = np.random.default_rng(seed)
    images = 5
    features, keys = rng.normal(size=(images, L, E)), rng.normal(size=(images, L, 5))
    hidden0 = rng.normal(size=(images, H))
    sequences, image_of = [], []
    for image in range(images):
        stem = list(rng.integers(2, V, size=rng.integers(0, 4)))
        for _ in range(rng.integers(1, 5)):  # like a beam's alternatives: a shared start, then apart
            sequences.append(stem[:rng.integers(0, len(stem) + 1)] + list(rng.integers(2, V, size=rng.integers(0, 4))))
            image_of.append(image)
    order = rng.permutation(len(sequences))
    sequences, image_of = [sequences[i] for i in order], [image_of[i] for i in order]
    step = RecordingStep()
    totals = scored_alike(step, sequences, image_of, features, keys, hidden0)
    if any(sequences):
        assert step.batches == _distinct_prefixes(sequences, image_of)
        assert sum(step.batches) < sum(map(len, sequences))  # sharing happened


def test_sequence_logprobs_edge_cases():
    step = RecordingStep()
    empty = sequence_logprobs(step, [], [], np.zeros((0, L, E)), np.zeros((0, L, 5)), np.zeros((0, H)), start_id=1)
    assert empty.shape == (0,) and step.batches == []
    with pytest.raises(ValueError, match="2 sequences but 1 image indices"):
        sequence_logprobs(step, [[4], [5]], [0], np.zeros((1, L, E)), np.zeros((1, L, 5)), np.zeros((1, H)),
                          start_id=1)


# ------------------------------------------------------------------ the bundle contract (synthetic files)

SCORER_TENSORS = {"inputs": ["token", "hidden", "features", "keys"], "outputs": ["logprobs", "hidden_out", "attention"],
                  "from_encoder": ["scorer_features", "scorer_keys", "scorer_hidden0"]}
FILES = {"encoder": "encoder.onnx", "decoder": "decoder.onnx", "vocab": "vocab.json"}
TENSORS = {"encoder": {"inputs": ["pixels"], "outputs": ["features", "keys", "hidden0"]},
           "decoder": {"inputs": ["token", "hidden", "features", "keys"],
                       "outputs": ["logprobs", "hidden_out", "attention"]}}


def scorer_bundle(folder: Path, *, tensors=SCORER_TENSORS, calibration=None) -> Path:
    make_bundle(folder)
    (folder / "scorer.int8.onnx").write_bytes(b"scorer graph bytes")
    meta = json.loads((folder / "model.json").read_text())
    meta["files"] = {**FILES, "scorer": "scorer.int8.onnx"}
    meta["tensors"] = {**TENSORS, **({"scorer": tensors} if tensors is not None else {})}
    meta["sha256"]["scorer.int8.onnx"] = sha(b"scorer graph bytes")
    if calibration is not None:
        meta["calibration"] = calibration
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


def test_bundle_with_a_scorer_exposes_it(tmp_path: Path):
    bundle = load_bundle(scorer_bundle(tmp_path / "b"))
    assert bundle.scorer_path == tmp_path / "b" / "scorer.int8.onnx"
    assert bundle.scorer_encoder_outputs == ["scorer_features", "scorer_keys", "scorer_hidden0"]
    plain = load_bundle(make_bundle(tmp_path / "plain"))
    assert plain.scorer_path is None and plain.scorer_encoder_outputs == []


@pytest.mark.parametrize("tensors", [None, {**SCORER_TENSORS, "from_encoder": ["scorer_features"]},
                                     {**SCORER_TENSORS, "inputs": ["token"]}])
def test_a_scorer_without_its_tensor_names_is_refused(tmp_path: Path, tensors):
    folder = scorer_bundle(tmp_path / "b", tensors=tensors)
    assert error_of(folder).startswith(f"{folder / 'model.json'}: missing or invalid 'tensors.scorer'")


def test_a_map_that_reads_the_scorer_needs_one(tmp_path: Path):
    calibration = {"method": "logistic", "features": ["scorer_mean_logprob"], "coef": [3.0], "intercept": 2.0}
    folder = make_bundle(tmp_path / "b", calibration=calibration)
    assert "reads scorer_mean_logprob but the bundle has no scorer" in error_of(folder)
    with_scorer = load_bundle(scorer_bundle(tmp_path / "s", calibration=calibration))
    assert with_scorer.calibration.features == ("scorer_mean_logprob",)


def test_caption_features_with_and_without_a_scorer():
    assert caption_features(-3.0, 6, 5) == {"mean_logprob": -0.5, "words": 5.0}
    assert caption_features(-3.0, 6, 5, scorer_logprob=-9.0) == {"mean_logprob": -0.5, "words": 5.0,
                                                                  "scorer_mean_logprob": -1.5}


def test_feature_matrix_reads_the_scorer_and_names_what_is_missing():
    from training.calibration import feature_matrix

    attention = np.zeros((2, 1, 1), np.float32)
    scored = Caption("a dog", -0.4, ["a", "dog"], attention, mean_logprob=-0.5, scorer_mean_logprob=-1.25)
    plain = Caption("a dog", -0.4, ["a", "dog"], attention, mean_logprob=-0.5)
    features = ("mean_logprob", "words", "scorer_mean_logprob")
    assert feature_matrix([scored], features).tolist() == [[-0.5, 2.0, -1.25]]
    assert feature_matrix([plain]).tolist() == [[-0.5, 2.0]]
    with pytest.raises(ValueError, match="has no scorer_mean_logprob"):
        feature_matrix([plain], features)


# ------------------------------------------------------------------ the exported tiny bundle, end to end

torch_needed = pytest.mark.skipif(__import__("importlib").util.find_spec("torch") is None, reason="needs torch")


@torch_needed
def test_export_writes_the_scorer_and_its_projection(tiny_parts: TinyParts, tiny_scorer_bundle: Path):
    import onnxruntime as ort

    from export.onnx_export import half_decoder_reference
    from export.parity import SCORER_ENCODER_TOLERANCE, SCORER_TOLERANCE, check_scorer, probe_pixels

    meta = json.loads((tiny_scorer_bundle / "model.json").read_text())
    assert meta["files"]["scorer"] == "scorer.int8.onnx"
    assert meta["tensors"]["scorer"] == SCORER_TENSORS
    assert meta["onnx"]["scorer_weights"] == "int8" and meta["scorer"]["dataset"] == "tiny-random"
    assert meta["format_version"] == 2  # a caption-cli that cannot read the scorer refuses the bundle
    assert sorted(p.name for p in tiny_scorer_bundle.iterdir()) == [
        "decoder.onnx", "encoder.onnx", "model.json", "scorer.int8.onnx", "vocab.json"]  # no float scorer left
    encoder = ort.InferenceSession(str(tiny_scorer_bundle / "encoder.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in encoder.get_outputs()] == ["features", "keys", "hidden0", *SCORER_TENSORS["from_encoder"]]
    scorer = ort.InferenceSession(str(tiny_scorer_bundle / "scorer.int8.onnx"), providers=["CPUExecutionProvider"])
    assert any(node.op_type == "MatMulInteger" for node in __import__("onnx").load(
        str(tiny_scorer_bundle / "scorer.int8.onnx")).graph.node)
    assert [i.name for i in scorer.get_inputs()] == SCORER_TENSORS["inputs"]

    reference = half_decoder_reference(build_tiny_parts(TINY_SCORER_SEED).model)
    report = check_scorer(reference, tiny_parts.backbone, tiny_scorer_bundle, probe_pixels(64))
    assert report.ok and report.max_abs_encoder < SCORER_ENCODER_TOLERANCE
    assert report.max_abs_mean_logprob < SCORER_TOLERANCE
    # the caption model's own parts are untouched by the scorer
    wrong = check_scorer(half_decoder_reference(tiny_parts.model), tiny_parts.backbone, tiny_scorer_bundle,
                         probe_pixels(64))
    assert not wrong.ok  # another model's weights are caught


@torch_needed
def test_captions_do_not_change_and_each_alternative_is_scored(tiny_bundle: Path, tiny_scorer_bundle: Path,
                                                                tmp_path: Path):
    import torch

    from caption_cli.captioner import Captioner
    from export.bundle_writer import set_calibration
    from export.onnx_export import half_decoder_reference
    from training.features import PixelsToGrid

    bundle_dir = tmp_path / "b"
    shutil.copytree(tiny_scorer_bundle, bundle_dir)
    calibration = {"method": "logistic", "features": ["scorer_mean_logprob"], "coef": [2.0], "intercept": 1.0}
    set_calibration(bundle_dir, calibration)
    pixels = np.random.default_rng(3).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    plain = Captioner(load_bundle(tiny_bundle), "cpu").caption(pixels)
    scored = Captioner(load_bundle(bundle_dir), "cpu").caption(pixels)
    assert [c.text for c in scored] == [c.text for c in plain]  # the scorer never changes a caption
    assert all(c.scorer_mean_logprob is None for c in plain)

    parts = build_tiny_parts(TINY_SCORER_SEED)
    reference = half_decoder_reference(parts.model)
    vocab = {word: i for i, word in enumerate(parts.vocab)}
    with torch.no_grad():
        grid = PixelsToGrid(parts.backbone).eval()(torch.from_numpy(pixels))
        features, keys, hidden0 = reference.encoder(grid)

    def mean_logprob(image: int, words: list[str]) -> float:
        ended = len(words) < TINY_MAX_LENGTH  # cut at max_length: no <end> was scored
        tokens = [vocab[w] for w in words] + ([vocab["<end>"]] if ended else [])
        token, hidden, total = torch.tensor([1]), hidden0[image:image + 1], 0.0
        with torch.no_grad():
            for target in tokens:
                logits, hidden, _ = reference.step(token, hidden, features[image:image + 1], keys[image:image + 1])
                total += float(torch.log_softmax(logits, 1)[0, target])
                token = torch.tensor([target])
        return total / len(tokens)

    for image, caption in enumerate(scored):
        assert caption.scorer_mean_logprob == pytest.approx(mean_logprob(image, caption.words), abs=0.05)
        for alternative in caption.alternatives:  # confidence = sigmoid(1 + 2 * the scorer's mean)
            expected = 1 / (1 + math.exp(-(1.0 + 2.0 * mean_logprob(image, alternative.caption.split()))))
            assert alternative.confidence == pytest.approx(expected, abs=0.03)
        assert caption.confidence == caption.alternatives[0].confidence
    assert len({c.confidence for c in scored}) > 1


@torch_needed
def test_export_command_takes_a_scorer_and_refuses_another_vocabulary(tiny_checkpoint: Path, tmp_path: Path):
    import torch

    from caption_cli.cli import app

    result = CliRunner().invoke(app, ["export", str(tiny_checkpoint), "--out", str(tmp_path / "b"),
                                      "--scorer", str(tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    bundle = load_bundle(tmp_path / "b")
    assert bundle.scorer_path is not None and bundle.meta["scorer"]["epochs"] == 3

    other = torch.load(tiny_checkpoint, weights_only=True)
    other["vocab"] = [*other["vocab"][:-1], "blue"]
    torch.save(other, tmp_path / "other.pt")
    result = CliRunner().invoke(app, ["export", str(tiny_checkpoint), "--out", str(tmp_path / "c"),
                                      "--scorer", str(tmp_path / "other.pt")])
    assert result.exit_code == 1
    assert "the scorer's vocabulary differs from the model's" in result.output
    assert not (tmp_path / "c").exists()


@torch_needed
def test_info_says_the_confidence_is_read_with_a_scorer(tiny_bundle: Path, tiny_scorer_bundle: Path):
    from caption_cli.cli import app

    with_scorer = CliRunner().invoke(app, ["info", "--model", str(tiny_scorer_bundle), "--device", "cpu"])
    assert with_scorer.exit_code == 0, with_scorer.output
    assert "read with a scorer (scorer.int8.onnx" in with_scorer.output
    data = json.loads(CliRunner().invoke(app, ["info", "--model", str(tiny_scorer_bundle), "--json"]).stdout)
    assert data["scorer"]["dataset"] == "tiny-random" and data["scorer"]["weights"] == "int8"
    plain = CliRunner().invoke(app, ["info", "--model", str(tiny_bundle), "--device", "cpu"])
    assert "scorer" not in plain.output


@torch_needed
def test_the_scorer_runs_on_the_cpu_even_when_the_model_runs_on_cuda(tiny_scorer_bundle: Path,
                                                                     monkeypatch: pytest.MonkeyPatch):
    """Its int8 products would run on the host node by node under CUDA; it is opened on the CPU."""
    import caption_cli.captioner as captioner_mod
    from caption_cli.session import open_session

    opened: dict[str, str] = {}

    def fake_open(path, device, threads=None):  # records what was asked, builds a CPU session
        opened[Path(path).name] = device
        return open_session(path, "cpu", threads=threads)

    monkeypatch.setattr(captioner_mod, "open_session", fake_open)
    monkeypatch.setattr(captioner_mod, "session_device", lambda session: "cuda")  # as if CUDA had started
    captioner_mod.Captioner(load_bundle(tiny_scorer_bundle), device="cuda")
    assert opened == {"encoder.onnx": "cuda", "decoder.onnx": "cuda", "scorer.int8.onnx": "cpu"}


def _calibration_data(tmp_path: Path, bundle: Path, right: int) -> list[str]:
    """8 val photos in a Karpathy-layout file whose references repeat the bundle's own caption
    for the first `right` photos (a high per-image CIDEr) and say something else for the rest
    (CIDEr 0); returns the command-line arguments that read it."""
    from PIL import Image

    from caption_cli.captioner import Captioner

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(11)
    pixels = rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    for i, photo in enumerate(pixels):
        Image.fromarray(photo).save(images / f"{i}.png")
    captions = [c.text for c in Captioner(load_bundle(bundle), "cpu").caption(pixels)]
    entries = [{"filename": f"{i}.png", "split": "val",
                "sentences": [{"raw": captions[i] if i < right else "zebra crossing wet tarmac"}] * 5}
               for i in range(8)]
    (tmp_path / "dataset.json").write_text(json.dumps({"images": entries}))
    return ["--data", "karpathy", "--annotations", str(tmp_path / "dataset.json"), "--images", str(images)]


@torch_needed
@pytest.mark.parametrize("right, folds", [(4, 4), (1, None)])
def test_calibrate_fits_on_the_scorer_and_cross_validates_what_it_can(tiny_scorer_bundle: Path, tmp_path: Path,
                                                                      right: int, folds):
    pytest.importorskip("sklearn")
    pytest.importorskip("pycocoevalcap")
    from caption_cli.captioner import Captioner
    from caption_cli.cli import app

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_scorer_bundle, bundle)
    data = _calibration_data(tmp_path, bundle, right)
    result = CliRunner().invoke(app, ["calibrate", *data, "--split", "val", "--model", str(bundle), "--device", "cpu",
                                      "--cider-threshold", "0.01", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["quality"]["images"] == 8 and report["quality"]["acceptable_share"] == right / 8
    assert report["calibration"]["features"] == ["mean_logprob", "words", "scorer_mean_logprob"]
    if folds is None:  # one acceptable caption: no fold could fit, but the map is still written
        assert "cross_validated" not in report
    else:
        assert report["cross_validated"]["folds"] == folds
    calibrated = load_bundle(bundle)
    assert calibrated.calibration.features == ("mean_logprob", "words", "scorer_mean_logprob")
    assert all(c.confidence is not None for c in Captioner(calibrated, "cpu").caption(
        np.zeros((2, 64, 64, 3), dtype=np.uint8)))
