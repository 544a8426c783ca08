"""The Captioner on the tiny exported bundle: shapes, batching, determinism, devices."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caption_cli import session as session_mod
from caption_cli.beam import SearchOptions
from caption_cli.bundle import Bundle, load_bundle
from caption_cli.captioner import Captioner
from caption_cli.errors import BundleError
from caption_cli.results import Alternative, Caption
from caption_cli.session import DeviceError, open_session, runtime_info

SPECIAL = {"<pad>", "<start>", "<end>"}


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Bundle:
    return load_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def captioner(bundle: Bundle) -> Captioner:
    return Captioner(bundle, device="cpu", threads=1)


def photos(bundle: Bundle, n: int, seed: int = 0) -> np.ndarray:
    """n distinct smooth 'photos' (random colour blobs), uint8 [n, S, S, 3]."""
    rng = np.random.default_rng(seed)
    s = bundle.image_size
    y, x = np.mgrid[0:s, 0:s] / s
    out = np.empty((n, s, s, 3), np.uint8)
    for i in range(n):
        cy, cx, r = rng.uniform(0.2, 0.8, 3)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (0.05 + 0.2 * r))
        colours = rng.uniform(0, 255, (2, 3))
        out[i] = (blob[..., None] * colours[0] + (1 - blob[..., None]) * colours[1]).astype(np.uint8)
    return out


def test_batch_of_seven_beam_three(captioner: Captioner, bundle: Bundle):
    captions = captioner.caption(photos(bundle, 7))
    assert len(captions) == 7
    h, w = bundle.grid
    for caption in captions:
        assert isinstance(caption, Caption)
        assert 1 <= len(caption.words) <= bundle.max_length
        assert not set(caption.words) & SPECIAL
        assert caption.text == " ".join(caption.words)
        assert caption.attention.dtype == np.float32
        assert caption.attention.shape == (len(caption.words), h, w)
        np.testing.assert_allclose(caption.attention.sum(axis=(1, 2)), 1.0, atol=1e-5)  # softmax per word
        assert 1 <= len(caption.alternatives) <= 3
        assert all(isinstance(a, Alternative) for a in caption.alternatives)
        assert caption.alternatives[0] == Alternative(caption.text, caption.score)
        scores = [a.score for a in caption.alternatives]
        assert scores == sorted(scores, reverse=True)
        assert caption.score < 0
    assert len({c.text for c in captions}) > 1  # the captions depend on the image


def test_options_come_from_the_bundle(captioner: Captioner, bundle: Bundle):
    assert captioner.options == SearchOptions(beam_size=3, alternatives=3, max_length=bundle.max_length,
                                              length_penalty=0.7)
    greedy = Captioner(bundle, device="cpu", options=SearchOptions(beam_size=1), threads=1)
    assert greedy.options == SearchOptions(1, 1, bundle.max_length, 0.7)


def test_beam_one_is_greedy(bundle: Bundle):
    greedy = Captioner(bundle, device="cpu", options=SearchOptions(beam_size=1), threads=1)
    pixels = photos(bundle, 7, seed=1)
    captions = greedy.caption(pixels)
    features, keys, hidden = greedy.encode(pixels)
    end = bundle.special_tokens["end"]
    for image, caption in enumerate(captions):
        assert len(caption.alternatives) == 1
        words, state = [], hidden[image:image + 1]
        for t in range(bundle.max_length):
            token = np.array([bundle.vocab.index(words[-1]) if words else bundle.special_tokens["start"]])
            logprobs, state, _ = greedy.step(token, state, features[image:image + 1], keys[image:image + 1])
            logprobs[0, [bundle.special_tokens[name] for name in ("pad", "start", "unk")]] = -np.inf
            if t == 0:
                logprobs[0, end] = -np.inf
            best = int(np.argmax(logprobs[0]))
            if best == end:
                break
            words.append(bundle.vocab[best])
        assert caption.words == words


def test_deterministic_and_independent_of_batching(captioner: Captioner, bundle: Bundle):
    pixels = photos(bundle, 7, seed=2)
    first = captioner.caption(pixels)
    again = captioner.caption(pixels)
    assert [(c.text, c.score) for c in first] == [(c.text, c.score) for c in again]
    one_by_one = [captioner.caption(pixels[i:i + 1])[0] for i in range(7)]
    assert [[a.caption for a in c.alternatives] for c in first] == [[a.caption for a in c.alternatives]
                                                                    for c in one_by_one]
    for batched, single in zip(first, one_by_one):
        assert batched.score == pytest.approx(single.score, abs=1e-4)
        np.testing.assert_allclose(batched.attention, single.attention, atol=1e-5)


class _CountingSession:
    """An onnxruntime session that records how many images each call got."""

    def __init__(self, session) -> None:
        self.session, self.batches = session, []

    def run(self, outputs, feed):
        self.batches.append(len(feed["pixels"]))
        return self.session.run(outputs, feed)


@pytest.mark.parametrize("chunk", [1, 3, 7, 50])
def test_encoder_chunks_change_nothing(bundle: Bundle, chunk: int):
    """The encoder may run a batch in chunks (memory); the search still sees the whole batch."""
    pixels = photos(bundle, 7, seed=4)
    whole = Captioner(bundle, device="cpu", threads=1, encoder_chunk=7)
    chunked = Captioner(bundle, device="cpu", threads=1, encoder_chunk=chunk)
    chunked._encoder = counting = _CountingSession(chunked._encoder)
    for a, b in zip(whole.encode(pixels), chunked.encode(pixels), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert counting.batches == [min(chunk, 7 - start) for start in range(0, 7, chunk)]
    expected = [(c.text, round(c.score, 4)) for c in whole.caption(pixels)]
    assert [(c.text, round(c.score, 4)) for c in chunked.caption(pixels)] == expected


def test_unk_is_never_said_even_when_the_model_prefers_it(bundle: Bundle):
    """<unk> is the model's favourite word here, yet no caption or alternative contains it."""
    captioner = Captioner(bundle, device="cpu", threads=1)
    unk = bundle.special_tokens["unk"]
    favourite = []
    plain_step = captioner.step

    def unk_loving_step(token, hidden, features, keys):
        logprobs, hidden_out, attention = plain_step(token, hidden, features, keys)
        logprobs = logprobs.copy()
        logprobs[:, unk] = 0.0  # log-prob 0: certainty
        favourite.append(int(np.argmax(logprobs[0])))
        return logprobs, hidden_out, attention

    captioner.step = unk_loving_step
    captions = captioner.caption(photos(bundle, 5, seed=7))
    assert favourite and set(favourite) == {unk}
    for caption in captions:
        assert caption.words, "a caption of real words remains"
        assert "<unk>" not in caption.words
        assert all("<unk>" not in alternative.caption.split() for alternative in caption.alternatives)


def test_encoder_chunk_defaults(bundle: Bundle):
    from caption_cli.captioner import CPU_ENCODER_CHUNK

    assert Captioner(bundle, device="cpu", threads=1).encoder_chunk == CPU_ENCODER_CHUNK
    with pytest.raises(ValueError, match="encoder_chunk must be at least 1"):
        Captioner(bundle, device="cpu", encoder_chunk=0)


def test_empty_batch_and_bad_pixels(captioner: Captioner, bundle: Bundle):
    s = bundle.image_size
    assert captioner.caption(np.zeros((0, s, s, 3), np.uint8)) == []
    with pytest.raises(ValueError, match=rf"pixels must be uint8 \[N, {s}, {s}, 3\].*float32 \(2, {s}, {s}, 3\)"):
        captioner.caption(np.zeros((2, s, s, 3), np.float32))
    with pytest.raises(ValueError, match=rf"got uint8 \(2, {s + 1}, {s}, 3\)"):
        captioner.caption(np.zeros((2, s + 1, s, 3), np.uint8))


def test_cpu_device_is_reported(bundle: Bundle):
    for device in ("cpu", "auto"):  # no GPU build here: auto honestly says cpu
        captioner = Captioner(bundle, device=device, threads=1)
        assert captioner.device == "cpu"
        assert captioner.providers == ["CPUExecutionProvider"]


def test_cuda_without_a_cuda_build_is_a_clear_error(bundle: Bundle, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(session_mod.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(DeviceError, match="this onnxruntime build has no CUDA support") as raised:
        Captioner(bundle, device="cuda")
    assert "caption-cli[gpu]" in str(raised.value) and "\n" not in str(raised.value)


def test_cuda_that_does_not_start_is_detected(bundle: Bundle, monkeypatch: pytest.MonkeyPatch):
    # a GPU build whose CUDA provider cannot start: onnxruntime quietly runs on the CPU
    monkeypatch.setattr(session_mod.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    captioner = Captioner(bundle, device="auto", threads=1)
    assert captioner.device == "cpu"
    assert captioner.providers == ["CPUExecutionProvider"]
    with pytest.raises(DeviceError, match="could not start CUDAExecutionProvider"):
        Captioner(bundle, device="cuda")


def test_cuda_that_fails_to_initialise(bundle: Bundle, monkeypatch: pytest.MonkeyPatch):
    real_create = session_mod._create

    tried_cuda = []

    def create(path, providers, threads):
        if any(session_mod.CUDA in str(p) for p in providers):
            tried_cuda.append(Path(path).name)
            raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected\nmore detail")
        return real_create(path, providers, threads)

    monkeypatch.setattr(session_mod, "cuda_built_in", lambda: True)
    monkeypatch.setattr(session_mod, "_create", create)
    assert Captioner(bundle, device="auto", threads=1).device == "cpu"
    assert tried_cuda == [bundle.encoder_path.name]  # auto tried CUDA first; the decoder followed the CPU
    with pytest.raises(DeviceError) as raised:
        Captioner(bundle, device="cuda")
    assert str(raised.value) == (f"device cuda: {bundle.encoder_path}: onnxruntime could not start it on CUDA "
                                 "(CUDA failure 100: no CUDA-capable device is detected); use device auto or cpu")


def test_unknown_device(bundle: Bundle):
    with pytest.raises(DeviceError, match="unknown device 'gpu'; choose one of auto, cpu, cuda"):
        Captioner(bundle, device="gpu")


def test_tensor_names_come_from_model_json(tiny_bundle: Path, tmp_path: Path):
    copy = shutil.copytree(tiny_bundle, tmp_path / "renamed")
    meta = json.loads((copy / "model.json").read_text())
    meta["tensors"]["decoder"]["inputs"][0] = "word"
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"decoder.onnx: has no input 'word' named in model.json"):
        Captioner(load_bundle(copy), device="cpu")


def test_unloadable_graph_is_a_bundle_error(tmp_path: Path):
    broken = tmp_path / "encoder.onnx"
    broken.write_bytes(b"not an onnx graph")
    with pytest.raises(BundleError, match=rf"^{broken}: onnxruntime cannot load it \("):
        open_session(broken, "cpu")


def test_runtime_info():
    info = runtime_info()
    assert info["onnxruntime"] and "CPUExecutionProvider" in info["available_providers"]
    assert info["cpu_threads"] >= 1


def test_runtime_imports_without_torch_or_onnx():
    code = ("import sys\n"
            "for name in ('torch', 'onnx', 'matplotlib'): sys.modules[name] = None\n"
            "import caption_cli.bundle, caption_cli.session, caption_cli.beam, caption_cli.captioner, "
            "caption_cli.attention\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
