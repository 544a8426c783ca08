"""export/: ONNX graphs, bundle files, checkpoint export and PyTorch-vs-onnxruntime parity."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from export import bundle_writer  # noqa: E402
from export.bundle_writer import ExportError, export_checkpoint, write_bundle  # noqa: E402
from export.onnx_export import export_decoder, half_decoder_reference, store_weights_as_half  # noqa: E402
from export.parity import TOLERANCE, ParityError, check_parity, probe_pixels  # noqa: E402
from tests.conftest import TINY_IMAGE_SIZE, TINY_MAX_LENGTH, TINY_SEARCH, TINY_VOCAB, TinyParts  # noqa: E402

FLICKR8K = Path(__file__).resolve().parents[2] / "shared/data/flickr8k"


def sessions(bundle: Path) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    open_ = lambda name: ort.InferenceSession(str(bundle / name), providers=["CPUExecutionProvider"])  # noqa: E731
    return open_("encoder.onnx"), open_("decoder.onnx")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- model.json, vocab.json, the ONNX files ----------------------------------------

def test_model_json_fields(tiny_bundle: Path) -> None:
    meta = json.loads((tiny_bundle / "model.json").read_text())
    created = meta.pop("created")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", created)
    hashes = meta.pop("sha256")
    assert meta == {
        "format": "caption-cli-bundle", "format_version": 1, "name": "tiny-random",
        "backbone": "efficientnet-lite0", "image_size": 64, "grid": [2, 2],
        "dims": {"E": 24, "A": 20, "H": 28, "V": 11},
        "special_tokens": {"pad": 0, "start": 1, "end": 2, "unk": 3}, "max_length": TINY_MAX_LENGTH,
        "search": TINY_SEARCH,
        "files": {"encoder": "encoder.onnx", "decoder": "decoder.onnx", "vocab": "vocab.json"},
        "tensors": {"encoder": {"inputs": ["pixels"], "outputs": ["features", "keys", "hidden0"]},
                    "decoder": {"inputs": ["token", "hidden", "features", "keys"],
                                "outputs": ["logprobs", "hidden_out", "attention"]}},
        "onnx": {"opset": 17, "ir_version": 8, "decoder_weights": "float32"},
        "training": {"dataset": "tiny-random", "split": "train", "images": 0, "captions": 0, "epochs": 0,
                     "config": {}},
        "scores": {"split": "none", "engine": "none"},
    }
    others = sorted(p.name for p in tiny_bundle.iterdir() if p.name != "model.json")
    assert sorted(hashes) == others == ["decoder.onnx", "encoder.onnx", "vocab.json"]
    for name, digest in hashes.items():
        assert digest == sha256(tiny_bundle / name)


def test_vocab_json(tiny_bundle: Path) -> None:
    assert json.loads((tiny_bundle / "vocab.json").read_text(encoding="utf-8")) == TINY_VOCAB


def test_runtime_loads_the_bundle(tiny_bundle: Path) -> None:
    """The runtime's own loader accepts what export writes (format, fields, hashes)."""
    bundle_mod = pytest.importorskip("caption_cli.bundle")
    bundle = bundle_mod.load_bundle(tiny_bundle)
    assert bundle.vocab == TINY_VOCAB
    assert bundle.model_id == f"tiny-random@{sha256(tiny_bundle / 'decoder.onnx')[:12]}"


@pytest.mark.parametrize("name, shapes", [
    ("encoder.onnx", {"pixels": (2, ["N", 64, 64, 3]), "features": (1, ["N", 4, 24]), "keys": (1, ["N", 4, 20]),
                      "hidden0": (1, ["N", 28])}),
    ("decoder.onnx", {"token": (7, ["B"]), "hidden": (1, ["B", 28]), "features": (1, ["B", 4, 24]),
                      "keys": (1, ["B", 4, 20]), "logprobs": (1, ["B", 11]), "hidden_out": (1, ["B", 28]),
                      "attention": (1, ["B", 4])}),
])
def test_onnx_versions_names_and_shapes(tiny_bundle: Path, name: str, shapes: dict) -> None:
    """opset 17 / IR 8 so onnxruntime >= 1.17 loads it; uint8 pixels, int64 token, float32 rest."""
    proto = onnx.load(str(tiny_bundle / name))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version == 8
    assert {o.domain: o.version for o in proto.opset_import} == {"": 17}
    found = {}
    for value in list(proto.graph.input) + list(proto.graph.output):
        tensor = value.type.tensor_type
        found[value.name] = (tensor.elem_type, [d.dim_param or d.dim_value for d in tensor.shape.dim])
    assert found == shapes  # elem types: 1 float32, 2 uint8, 7 int64


@pytest.mark.parametrize("n", [1, 7, 64])
def test_sessions_run_at_any_batch_size(tiny_bundle: Path, n: int) -> None:
    encoder, decoder = sessions(tiny_bundle)
    features, keys, hidden0 = encoder.run(None, {"pixels": probe_pixels(TINY_IMAGE_SIZE, n, seed=n)})
    assert (features.shape, keys.shape, hidden0.shape) == ((n, 4, 24), (n, 4, 20), (n, 28))
    token = np.full(n, 1, dtype=np.int64)
    logprobs, hidden, attention = decoder.run(None, {"token": token, "hidden": hidden0, "features": features,
                                                     "keys": keys})
    assert (logprobs.shape, hidden.shape, attention.shape) == ((n, 11), (n, 28), (n, 4))
    np.testing.assert_allclose(np.exp(logprobs).sum(axis=1), 1.0, atol=1e-5)  # log-softmax, not logits
    np.testing.assert_allclose(attention.sum(axis=1), 1.0, atol=1e-5)


# --- parity -------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 64])
def test_parity_synthetic(tiny_parts: TinyParts, tiny_bundle: Path, n: int) -> None:
    report = check_parity(tiny_parts.model, tiny_parts.backbone, tiny_bundle, probe_pixels(TINY_IMAGE_SIZE, n, seed=n))
    assert report.images == n and report.steps == 6
    assert report.ok, report.summary()
    assert report.max_abs_logprobs < TOLERANCE
    assert report.max_abs_hidden < TOLERANCE and report.max_abs_attention < TOLERANCE
    assert report.max_abs_features < TOLERANCE and report.max_abs_keys < TOLERANCE
    assert report.same_tokens


def test_parity_catches_a_different_model(tiny_parts: TinyParts, tiny_bundle: Path) -> None:
    import copy

    other = copy.deepcopy(tiny_parts.model)
    with torch.no_grad():
        other.step.out.bias[5] += 1e-3  # a tiny change in one logit
    report = check_parity(other, tiny_parts.backbone, tiny_bundle, probe_pixels(TINY_IMAGE_SIZE, 3))
    assert not report.ok
    assert report.max_abs_logprobs > 1e-4


def test_parity_rejects_bad_pixels(tiny_parts: TinyParts, tiny_bundle: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        check_parity(tiny_parts.model, tiny_parts.backbone, tiny_bundle, np.zeros((1, 64, 64, 3), np.float32))


@pytest.fixture(scope="module")
def flickr_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object, Path]:
    """lite0 at its native 224 px + a random decoder of the real model's size (E=A=H=W=512)."""
    from training.backbone import load_backbone
    from training.model import ModelConfig, ShowAttendTell

    backbone = load_backbone("efficientnet-lite0")
    vocab = list(TINY_VOCAB[:4]) + [f"w{i}" for i in range(2596)]
    torch.manual_seed(0)
    model = ShowAttendTell(ModelConfig(vocab_size=len(vocab))).eval()
    out = write_bundle(model, backbone, vocab, tmp_path_factory.mktemp("flickr") / "bundle", name="random-224",
                       max_length=21)
    return model, backbone, out


@pytest.mark.skipif(not (FLICKR8K / "splits/val.txt").is_file(), reason="Flickr8k data not present")
def test_parity_real_flickr8k_images(flickr_bundle: tuple) -> None:
    from PIL import Image, ImageOps

    from caption_cli.preprocess import model_pixels

    model, backbone, bundle = flickr_bundle
    names = (FLICKR8K / "splits/val.txt").read_text().split()[:20]
    pixels = []
    for name in names:
        with Image.open(FLICKR8K / "images" / name) as image:
            pixels.append(model_pixels(ImageOps.exif_transpose(image), 224))
    report = check_parity(model, backbone, bundle, np.stack(pixels))
    assert report.images == 20
    assert report.ok, report.summary()
    assert report.same_tokens


# --- the beam search over ONNX vs over PyTorch ----------------------------------------

def torch_step(model):
    """The PyTorch step as a numpy callable with decoder.onnx's signature."""
    import torch.nn.functional as F

    @torch.no_grad()
    def step(token, hidden, features, keys):
        logits, hidden, alpha = model.step(*(torch.from_numpy(np.ascontiguousarray(a))
                                             for a in (token, hidden, features, keys)))
        return F.log_softmax(logits, dim=1).numpy(), hidden.numpy(), alpha.numpy()

    return step


@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_beam_search_same_tokens_onnx_and_torch(tiny_parts: TinyParts, tiny_bundle: Path, beam_size: int) -> None:
    beam = pytest.importorskip("caption_cli.beam")
    from training.features import PixelsToGrid

    pixels = probe_pixels(TINY_IMAGE_SIZE, 7, seed=11)
    encoder, decoder = sessions(tiny_bundle)
    onnx_step = lambda *a: tuple(decoder.run(None, dict(zip(["token", "hidden", "features", "keys"], a))))  # noqa
    with torch.no_grad():
        grid = PixelsToGrid(tiny_parts.backbone)(torch.from_numpy(pixels))
        torch_enc = [t.numpy() for t in tiny_parts.model.encoder(grid)]
    options = beam.SearchOptions(beam_size=beam_size, alternatives=beam_size, max_length=TINY_MAX_LENGTH,
                                 length_penalty=0.7)
    ids = dict(start_id=1, end_id=2, banned_ids=[0])
    from_onnx = beam.beam_search(onnx_step, *encoder.run(None, {"pixels": pixels}), options, **ids)
    from_torch = beam.beam_search(torch_step(tiny_parts.model), *torch_enc, options, **ids)
    assert [[h.tokens for h in image] for image in from_onnx] == [[h.tokens for h in image] for image in from_torch]
    for a, b in zip(sum(from_onnx, []), sum(from_torch, [])):
        assert a.score == pytest.approx(b.score, abs=1e-4)
        np.testing.assert_allclose(a.attention, b.attention, atol=1e-5)
    best = [image[0].tokens for image in from_onnx]
    assert any(len(tokens) < TINY_MAX_LENGTH for tokens in best)  # the tiny model's captions do end


# --- export_checkpoint ----------------------------------------------------------------

def test_export_checkpoint_round_trip(tiny_checkpoint: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    out = export_checkpoint(tiny_checkpoint, tmp_path / "exported")
    assert out == tmp_path / "exported"
    meta = json.loads((out / "model.json").read_text())
    assert meta["name"] == "sat-lite0-tinyset"
    assert meta["max_length"] == TINY_MAX_LENGTH  # model_config.max_length counts <start>
    assert meta["training"] == {"dataset": "tinyset", "split": "train", "images": 40, "captions": 200, "epochs": 3,
                                "step": 1234, "config": {"batch_size": 32, "lr": 1e-3, "epochs": 3,
                                                         "attention_lambda": 1.0}}
    assert meta["scores"] == {"split": "val", "beam_size": 3, "BLEU-4": 0.01, "engine": "pytorch"}
    for name, digest in meta["sha256"].items():
        assert digest == sha256(out / name)
    assert json.loads((out / "vocab.json").read_text()) == TINY_VOCAB
    # the same weights as the fixture's bundle: the graphs compute the same numbers
    pixels = probe_pixels(TINY_IMAGE_SIZE, 5)
    (enc_a, dec_a), (enc_b, dec_b) = sessions(out), sessions(tiny_bundle)
    outs_a, outs_b = enc_a.run(None, {"pixels": pixels}), enc_b.run(None, {"pixels": pixels})
    for a, b in zip(outs_a, outs_b):
        np.testing.assert_array_equal(a, b)
    feeds = {"token": np.array([4, 5, 6, 1, 2], np.int64), "hidden": outs_a[2], "features": outs_a[0],
             "keys": outs_a[1]}
    for a, b in zip(dec_a.run(None, feeds), dec_b.run(None, feeds)):
        np.testing.assert_array_equal(a, b)
    assert not [p.name for p in tmp_path.iterdir() if p.name != "exported"]  # no temp folders left


def test_export_checkpoint_name_and_scores_override(tiny_checkpoint: Path, tmp_path: Path,
                                                    fast_encoder: None) -> None:
    scores = {"split": "test", "beam_size": 3, "CIDEr": 0.5, "engine": "onnxruntime"}
    out = export_checkpoint(tiny_checkpoint, tmp_path / "b", name="mine", scores=scores, check=False)
    meta = json.loads((out / "model.json").read_text())
    assert (meta["name"], meta["scores"]) == ("mine", scores)


def _save(path: Path, data: object) -> Path:
    torch.save(data, path)
    return path


def test_export_checkpoint_bad_files(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = torch.load(tiny_checkpoint, weights_only=True)
    cases = {
        tmp_path / "missing.pt": "no such checkpoint file",
        _garbage(tmp_path / "garbage.pt"): "not a readable PyTorch checkpoint",
        _save(tmp_path / "novocab.pt", {k: v for k, v in data.items() if k != "vocab"}): "checkpoint lacks vocab",
        _save(tmp_path / "pickled.pt", {**data, "extra": Path("x")}): "objects other than tensors",
        _save(tmp_path / "list.pt", [1, 2]): "expected a checkpoint dict",
        _truncated(tiny_checkpoint, tmp_path / "truncated.pt"): "not a readable PyTorch checkpoint",
        _save(tmp_path / "short.pt", {**data, "vocab": TINY_VOCAB[:-1]}): "vocabulary has 10 tokens",
        _save(tmp_path / "shapes.pt", {**data, "model_config": {**data["model_config"], "hidden_dim": 30}}):
            "do not fit its model_config",
        _save(tmp_path / "backbone.pt", {**data, "backbone": {"name": "resnet"}}): "bad backbone entry",
        _save(tmp_path / "grid.pt", {**data, "backbone": {"name": "efficientnet-lite0", "image_size": 96}}):
            r"\(2, 2\) x 1280 grid but efficientnet-lite0 at 96 px gives \(3, 3\)",
    }
    for path, message in cases.items():
        with pytest.raises(ExportError, match=message) as info:
            export_checkpoint(path, tmp_path / "out")
        assert str(info.value).startswith(f"{path}: ")
        assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def _truncated(source: Path, path: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) - 2000])  # zip directory lost at the end
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(b"not a checkpoint at all")
    return path


def test_export_does_not_touch_the_model(tiny_parts: TinyParts, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Export works on copies: the caller's module keeps its mode and weights."""
    import copy

    model = copy.deepcopy(tiny_parts.model).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    write_bundle(model, tiny_parts.backbone, TINY_VOCAB, tmp_path / "b", name="t", max_length=5)
    assert model.training and model.step.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # and the bundle is the eval-mode model (dropout off): it matches the fixture's numbers
    report = check_parity(tiny_parts.model, tiny_parts.backbone, tmp_path / "b", probe_pixels(TINY_IMAGE_SIZE, 3))
    assert report.ok, report.summary()


# --- write_bundle's file handling -------------------------------------------------------

@pytest.fixture
def fast_encoder(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip re-tracing the backbone in tests about folders: copy the fixture's encoder."""
    def export_encoder(model, backbone, path, scorer=None):
        assert scorer is None  # a scorer's outputs are not in the fixture's encoder
        shutil.copyfile(tiny_bundle / "encoder.onnx", path)
        return path

    monkeypatch.setattr(bundle_writer, "export_encoder", export_encoder)


def _write(parts: TinyParts, out: Path, **kwargs) -> Path:
    return write_bundle(parts.model, parts.backbone, parts.vocab, out, name="t", max_length=5, **kwargs)


def test_write_bundle_replaces_an_old_bundle(tiny_parts: TinyParts, tmp_path: Path, fast_encoder: None) -> None:
    out = _write(tiny_parts, tmp_path / "bundle")
    (out / "stale.txt").write_text("from an older export")
    _write(tiny_parts, out, scores={"CIDEr": 1.0})
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx", "model.json", "vocab.json"]
    assert json.loads((out / "model.json").read_text())["scores"] == {"CIDEr": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_write_bundle_failed_check_leaves_old_bundle(tiny_parts: TinyParts, tmp_path: Path,
                                                     fast_encoder: None) -> None:
    out = _write(tiny_parts, tmp_path / "bundle")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    seen = []

    def verify(folder: Path) -> None:
        seen.append(sorted(p.name for p in folder.iterdir()))
        raise ParityError("disagrees")

    with pytest.raises(ParityError):
        _write(tiny_parts, out, verify=verify)
    assert seen == [["decoder.onnx", "encoder.onnx", "model.json", "vocab.json"]]  # checked complete
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_write_bundle_refuses_to_replace_other_folders(tiny_parts: TinyParts, tmp_path: Path,
                                                       fast_encoder: None) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ExportError, match="holds no model bundle; refusing"):
        _write(tiny_parts, photos)
    assert [p.name for p in photos.iterdir()] == ["holiday.jpg"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        _write(tiny_parts, tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "photos"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (_write(tiny_parts, empty) / "model.json").is_file()


@pytest.mark.parametrize("vocab, message", [
    (TINY_VOCAB[:-1], "vocabulary has 10 tokens but the model scores 11"),
    (["<start>", "<pad>"] + TINY_VOCAB[2:], "vocabulary must start with <pad>, <start>, <end>, <unk>"),
])
def test_write_bundle_checks_the_vocabulary(tiny_parts: TinyParts, tmp_path: Path, vocab: list, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        write_bundle(tiny_parts.model, tiny_parts.backbone, vocab, tmp_path / "b", name="t", max_length=5)
    assert not list(tmp_path.iterdir())


# --- float16 decoder weights --------------------------------------------------------------

HALF_VOCAB = TINY_VOCAB + [f"w{i}" for i in range(600 - len(TINY_VOCAB))]  # V=600


@pytest.fixture(scope="module")
def half_parts(tiny_parts: TinyParts) -> TinyParts:
    """A random model with several > 1024-element decoder tensors (V=600, H=64) on the tiny backbone."""
    import dataclasses

    from training.model import ShowAttendTell

    cfg = dataclasses.replace(tiny_parts.model.cfg, vocab_size=len(HALF_VOCAB), hidden_dim=64)
    torch.manual_seed(3)
    model = ShowAttendTell(cfg).eval().requires_grad_(False)
    return TinyParts(model, tiny_parts.backbone, list(HALF_VOCAB))


@pytest.fixture(scope="module")
def half_bundle(half_parts: TinyParts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bundle(half_parts.model, half_parts.backbone, half_parts.vocab,
                        tmp_path_factory.mktemp("half") / "bundle", name="half", max_length=TINY_MAX_LENGTH,
                        search={"beam_size": 4}, half_decoder=True, optimise_decoder=False)


def _initializers(path: Path) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_half_decoder_stores_rounded_weights_as_float16(half_parts: TinyParts, half_bundle: Path,
                                                        tmp_path: Path) -> None:
    proto = onnx.load(str(half_bundle / "decoder.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version == 8
    assert {o.domain: o.version for o in proto.opset_import} == {"": 17}
    stored = _initializers(half_bundle / "decoder.onnx")
    assert {name: a.dtype for name, a in stored.items() if a.size > 1024} == {
        f"step.{name}.float16": np.float16 for name in
        ("embed.weight", "attention.query.weight", "gate.weight", "gru.weight_ih", "gru.weight_hh", "out.weight")}
    assert all(a.dtype == np.float32 for a in stored.values() if a.size <= 1024)
    # each one is cast back under its old name, ahead of the nodes that read it
    casts = [n for n in proto.graph.node if n.op_type == "Cast" and n.input[0].endswith(".float16")]
    assert list(proto.graph.node)[:len(casts)] == casts
    assert {(n.input[0], n.output[0]) for n in casts} == {(k, k.removesuffix(".float16")) for k, a in stored.items()
                                                         if a.dtype == np.float16}
    assert all(onnx.helper.get_attribute_value(n.attribute[0]) == onnx.TensorProto.FLOAT for n in casts)
    # the values are exactly the rounded PyTorch weights; the caller's model keeps its own
    rounded = half_decoder_reference(half_parts.model).state_dict()
    for name, values in stored.items():
        key = name.removesuffix(".float16")
        if key in rounded:
            np.testing.assert_array_equal(values.astype(np.float32), rounded[key].numpy())
    weight = half_parts.model.step.out.weight
    assert not torch.equal(weight, weight.half().float())
    # same inputs and outputs as the float32 graph, in about half the bytes
    full = export_decoder(half_parts.model, tmp_path / "decoder32.onnx", optimise=False)
    io = lambda m: [(v.name, v.type) for v in list(m.graph.input) + list(m.graph.output)]  # noqa: E731
    assert io(proto) == io(onnx.load(str(full)))
    assert (half_bundle / "decoder.onnx").stat().st_size < 0.6 * full.stat().st_size


def test_half_decoder_parity_with_the_rounded_model(half_parts: TinyParts, half_bundle: Path) -> None:
    meta = json.loads((half_bundle / "model.json").read_text())
    assert meta["onnx"] == {"opset": 17, "ir_version": 8, "decoder_weights": "float16"}
    assert meta["search"] == {"beam_size": 4, "length_penalty": 0.7, "alternatives": 3}
    reference = half_decoder_reference(half_parts.model)
    report = check_parity(reference, half_parts.backbone, half_bundle, probe_pixels(TINY_IMAGE_SIZE, 7, seed=5))
    assert report.ok, report.summary()
    assert report.max_abs_hidden < TOLERANCE and report.max_abs_attention < TOLERANCE
    assert report.same_tokens
    # why the reference must be rounded: float16 weights alone move logprobs past the limit
    assert not check_parity(half_parts.model, half_parts.backbone, half_bundle,
                            probe_pixels(TINY_IMAGE_SIZE, 7, seed=5)).ok


def test_half_decoder_bundle_captions_with_the_runtime(half_parts: TinyParts, half_bundle: Path) -> None:
    """The runtime needs no change: same captions as the beam search over the rounded PyTorch step."""
    bundle_mod = pytest.importorskip("caption_cli.bundle")
    from caption_cli.beam import beam_search
    from caption_cli.captioner import Captioner

    captioner = Captioner(bundle_mod.load_bundle(half_bundle), device="cpu")
    pixels = probe_pixels(TINY_IMAGE_SIZE, 5, seed=9)
    captions = captioner.caption(pixels)
    reference = half_decoder_reference(half_parts.model)
    expected = beam_search(torch_step(reference), *captioner.encode(pixels), captioner.options,
                           start_id=1, end_id=2, banned_ids=[0, 1])
    assert captioner.options.beam_size == 4
    assert [c.text for c in captions] == [" ".join(HALF_VOCAB[t] for t in image[0].tokens) for image in expected]
    for caption, image in zip(captions, expected):
        assert caption.score == pytest.approx(image[0].score, abs=1e-4)


def test_export_checkpoint_half_decoder(tiny_checkpoint: Path, tmp_path: Path, fast_encoder: None) -> None:
    """Parity (on by default) is checked against the rounded model, and passes."""
    out = export_checkpoint(tiny_checkpoint, tmp_path / "b", half_decoder=True,
                            search={"beam_size": 5, "alternatives": 2})
    meta = json.loads((out / "model.json").read_text())
    assert meta["onnx"]["decoder_weights"] == "float16"
    assert meta["search"] == {"beam_size": 5, "length_penalty": 0.7, "alternatives": 2}
    stored = _initializers(out / "decoder.onnx")
    assert stored["step.gru.weight_hh.float16"].dtype == np.float16  # 84 x 28: the tiny model's big ones
    assert meta["sha256"]["decoder.onnx"] == sha256(out / "decoder.onnx")


def test_exported_decoder_is_rewritten_and_computes_what_the_traced_one_does(tiny_parts: TinyParts,
                                                                            tmp_path: Path) -> None:
    """write_bundle applies export.decoder_passes by default: nothing is left for them to do, and
    every output of a step equals the plain trace's (the bundle's parity check judges this graph)."""
    import onnxruntime as ort

    from export.decoder_passes import optimise_decoder

    plain = export_decoder(tiny_parts.model, tmp_path / "plain.onnx", optimise=False)
    fast = export_decoder(tiny_parts.model, tmp_path / "fast.onnx")
    assert optimise_decoder(onnx.load(str(plain))) == {"attention_context_as_matmul": 1, "fold_embedding_into_gru": 1}
    assert optimise_decoder(onnx.load(str(fast))) == {"attention_context_as_matmul": 0, "fold_embedding_into_gru": 0}
    cfg, rows = tiny_parts.model.cfg, 7
    cells = cfg.grid[0] * cfg.grid[1]
    rng = np.random.default_rng(4)
    feed = {"token": rng.integers(0, cfg.vocab_size, rows),
            "hidden": rng.standard_normal((rows, cfg.hidden_dim), dtype=np.float32),
            "features": rng.standard_normal((rows, cells, cfg.encoder_dim), dtype=np.float32),
            "keys": rng.standard_normal((rows, cells, cfg.attention_dim), dtype=np.float32)}
    run = lambda path: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)  # noqa: E731
    for before, after in zip(run(plain), run(fast), strict=True):
        np.testing.assert_allclose(after, before, atol=1e-5)


def test_write_bundle_rejects_unknown_search_options(tiny_parts: TinyParts, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown search option 'beam'; model.json's search options are "
                                          "beam_size, length_penalty, alternatives"):
        _write(tiny_parts, tmp_path / "b", search={"beam": 3})
    assert not list(tmp_path.iterdir())


def test_store_weights_as_half_keeps_what_float16_cannot_hold() -> None:
    """Only exactly representable tensors of > 1024 elements change: the graph computes the same."""
    from onnx import TensorProto, helper, numpy_helper

    weights = {"exact": np.full((1, 1025), 0.5, np.float32), "inexact": np.full((1, 1025), 0.1, np.float32),
               "small": np.full((1, 1024), 0.5, np.float32)}
    nodes = [helper.make_node("Mul", ["x", name], [f"y_{name}"]) for name in weights]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                              [helper.make_tensor_value_info(f"y_{n}", TensorProto.FLOAT, a.shape)
                               for n, a in weights.items()],
                              [numpy_helper.from_array(a, name) for name, a in weights.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert store_weights_as_half(proto) == ["exact"]
    onnx.checker.check_model(proto, full_check=True)
    assert {i.name: i.data_type for i in proto.graph.initializer} == {
        "exact.float16": TensorProto.FLOAT16, "inexact": TensorProto.FLOAT, "small": TensorProto.FLOAT}
