"""The speed-ups change nothing that is computed: pipelined batches, the rewritten decoder
graph, the kept model id, the profile counters and the CUDA IO-binding step (faked here)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from caption_cli.bundle import Bundle, load_bundle
from caption_cli.captioner import PREFERRED_BATCH, Captioner, search_threads
from caption_cli.session import default_threads, session_options
from tests.conftest import TINY_MAX_LENGTH
from tests.test_captioner import photos


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Bundle:
    return load_bundle(tiny_bundle)


def _texts(captions) -> list:
    return [([a.caption for a in c.alternatives], round(c.score, 4)) for c in captions]


@pytest.mark.parametrize(("count", "chunk"), [(7, 3), (7, 1), (6, 3), (2, 5)])
def test_overlapped_batches_give_the_same_captions(bundle: Bundle, count: int, chunk: int):
    pixels = photos(bundle, count, seed=11)
    plain = Captioner(bundle, device="cpu", threads=1, encoder_chunk=chunk, overlap=False)
    piped = Captioner(bundle, device="cpu", threads=1, encoder_chunk=chunk, overlap=True)
    try:
        assert _texts(piped.caption(pixels)) == _texts(plain.caption(pixels))
        assert piped.times.images == count
        if count > chunk:
            assert piped._helper is not None  # the encoder really ran on its own thread
    finally:
        piped.close()
    assert piped._helper is None


def test_overlap_defaults_off_on_the_cpu_and_when_asked_for_halves_the_search_threads(bundle: Bundle):
    plain = Captioner(bundle, device="cpu", threads=4)
    assert plain.overlap is False  # caption() keeps searching whole batches in turns with the encoder
    assert plain.preferred_batch == PREFERRED_BATCH["cpu"]
    # onnxruntime reports the thread count each session was built with
    assert plain._decoder.get_session_options().intra_op_num_threads == 4
    ahead = Captioner(bundle, device="cpu", threads=4, overlap=True)
    assert ahead._encoder.get_session_options().intra_op_num_threads == 4
    assert ahead._decoder.get_session_options().intra_op_num_threads == 2
    assert search_threads(4, overlap=True) == 2 and search_threads(1, overlap=True) == 1
    assert search_threads(4, overlap=False) == 4 and search_threads(4, overlap=None) == 4
    assert search_threads(None, overlap=True) == max(1, default_threads() // 2)


def test_the_annotate_command_asks_for_overlap(tiny_bundle: Path):
    from caption_cli.commands.annotate import load_captioner

    captioner = load_captioner(tiny_bundle, "cpu")
    assert captioner.overlap is True


def _stream_of(batches: list) -> list:
    return [(f"batch {i}", pixels) for i, pixels in enumerate(batches)]


@pytest.mark.parametrize("overlap", [True, False])
def test_caption_stream_gives_each_batch_its_own_captions_in_order(bundle: Bundle, overlap: bool):
    """A stream with empty and missing batches between real ones: every context comes back
    in its place, with exactly the captions caption() gives its pixels alone."""
    s = bundle.image_size
    parts = [photos(bundle, 3, seed=1), None, photos(bundle, 1, seed=2), np.zeros((0, s, s, 3), np.uint8),
             photos(bundle, 4, seed=3), photos(bundle, 2, seed=4)]
    alone = Captioner(bundle, device="cpu", threads=1, overlap=False)
    expected = [_texts(alone.caption(p)) if p is not None and len(p) else [] for p in parts]
    streaming = Captioner(bundle, device="cpu", threads=1, encoder_chunk=2, overlap=overlap)
    try:
        got = [(context, _texts(captions)) for context, captions in streaming.caption_stream(_stream_of(parts))]
    finally:
        streaming.close()
    assert got == list(zip([f"batch {i}" for i in range(len(parts))], expected))
    assert streaming.times.images == 10
    assert expected[4] != expected[5]  # distinct photos: a batch given another's captions would show


def test_caption_stream_encodes_the_next_batch_before_handing_back_this_one(bundle: Bundle):
    """The overlap itself: when the caller gets batch i's captions, batch i+1 has already been
    handed to the encoder (it was pulled from the stream first)."""
    pulled: list[int] = []

    def batches():
        for i in range(3):
            pulled.append(i)
            yield i, photos(bundle, 2, seed=i)

    captioner = Captioner(bundle, device="cpu", threads=1, overlap=True)
    encoded_on: list[str] = []
    plain_encode = captioner._encode_all

    def recording_encode(pixels):
        encoded_on.append(threading.current_thread().name)
        return plain_encode(pixels)

    captioner._encode_all = recording_encode
    try:
        seen = [(context, list(pulled)) for context, _ in captioner.caption_stream(batches())]
    finally:
        captioner.close()
    assert seen == [(0, [0, 1]), (1, [0, 1, 2]), (2, [0, 1, 2])]
    assert len(encoded_on) == 3 and all(name.startswith("caption-cli-encoder") for name in encoded_on)
    assert captioner.times.encoder > 0


def test_bad_pixels_in_a_stream_fail_clearly(bundle: Bundle):
    s = bundle.image_size
    captioner = Captioner(bundle, device="cpu", threads=1, overlap=True)
    stream = captioner.caption_stream(_stream_of([photos(bundle, 2), np.zeros((2, s, s, 3), np.float32)]))
    with pytest.raises(ValueError, match=r"pixels must be uint8"):
        list(stream)
    captioner.close()


def test_bad_pixels_still_fail_clearly_when_pipelined(bundle: Bundle):
    s = bundle.image_size
    piped = Captioner(bundle, device="cpu", threads=1, encoder_chunk=2, overlap=True)
    with pytest.raises(ValueError, match=r"pixels must be uint8"):
        piped.caption(np.zeros((5, s, s, 3), np.float32))
    piped.close()


def test_times_add_up(bundle: Bundle):
    captioner = Captioner(bundle, device="cpu", threads=1)
    captioner.caption(photos(bundle, 4, seed=3))
    times = captioner.times
    assert times.images == 4 and times.steps_run >= 1
    assert 0 < times.steps <= times.search and times.encoder > 0
    times.reset()
    assert (times.encoder, times.steps, times.search, times.images, times.steps_run) == (0.0, 0.0, 0.0, 0, 0)


def test_threads_sleep_instead_of_spinning():
    options = session_options(1)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.fixture(scope="module")
def plain_bundle(tiny_parts, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The tiny model with its decoder exactly as traced (an older bundle, before the rewrites)."""
    from export.bundle_writer import write_bundle

    out = tmp_path_factory.mktemp("plain") / "bundle"
    return load_bundle(write_bundle(tiny_parts.model, tiny_parts.backbone, tiny_parts.vocab, out, name="plain",
                                    max_length=TINY_MAX_LENGTH, optimise_decoder=False))


def test_rewritten_decoder_has_the_same_outputs_and_model_id(plain_bundle: Bundle, tmp_path: Path):
    pytest.importorskip("onnx")
    from export.decoder_passes import optimise_bundle_decoder

    bundle = plain_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(bundle.path, copy)
    done = optimise_bundle_decoder(copy)
    assert done["attention_context_as_matmul"] == 1 and done["fold_embedding_into_gru"] == 1
    assert done["max_difference"] < 1e-5
    rewritten = load_bundle(copy)
    assert rewritten.model_id == bundle.model_id  # stored captions keep their resume/reuse key
    assert rewritten.meta["sha256"]["decoder.onnx"] != bundle.meta["sha256"]["decoder.onnx"]
    pixels = photos(bundle, 6, seed=5)
    before = Captioner(bundle, device="cpu", threads=1).caption(pixels)
    after = Captioner(rewritten, device="cpu", threads=1).caption(pixels)
    assert _texts(after) == _texts(before)
    for a, b in zip(after, before):
        np.testing.assert_allclose(a.attention, b.attention, atol=1e-5)
    # running it again keeps the original id (weights_id is not overwritten)
    optimise_bundle_decoder(copy)
    assert json.loads((copy / "model.json").read_text())["weights_id"] == bundle.model_id.rsplit("@", 1)[1]


def test_rewrite_finds_nothing_to_do_twice(plain_bundle: Bundle):
    onnx = pytest.importorskip("onnx")
    from export.decoder_passes import optimise_decoder

    proto = onnx.load(str(plain_bundle.decoder_path))
    assert optimise_decoder(proto) == {"attention_context_as_matmul": 1, "fold_embedding_into_gru": 1}
    assert optimise_decoder(proto) == {"attention_context_as_matmul": 0, "fold_embedding_into_gru": 0}


class _FakeBinding:
    """Records what an onnxruntime IOBinding was given; runs the real CPU session."""

    def __init__(self, session, log: list) -> None:
        self.session, self.log, self.feed, self.outputs = session, log, {}, []

    def bind_cpu_input(self, name, value):
        self.feed[name] = value

    def bind_ortvalue_input(self, name, value):
        self.log.append(("device input", name, id(value)))
        self.feed[name] = value.numpy()

    def bind_output(self, name, device):
        self.outputs.append(name)

    def copy_outputs_to_cpu(self):
        return self.session.run(self.outputs, self.feed)


def test_cuda_step_keeps_features_on_the_device_across_steps(bundle: Bundle, monkeypatch: pytest.MonkeyPatch):
    """On CUDA, features and keys are uploaded once per set of rows, not at every step."""
    import onnxruntime as ort

    captioner = Captioner(bundle, device="cpu", threads=1)
    reference = _texts(captioner.caption(photos(bundle, 5, seed=9)))
    session, log, uploads = captioner._decoder, [], []

    class FakeSession:
        def io_binding(self):
            return _FakeBinding(session, log)

        def run_with_iobinding(self, binding):
            pass

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    class FakeOrtValue:
        def __init__(self, array):
            self.array = array

        def numpy(self):
            return self.array

    def upload(array, device, index):
        assert (device, index) == ("cuda", 0)
        uploads.append(array.shape)
        return FakeOrtValue(array)

    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", staticmethod(upload))
    captioner._decoder = FakeSession()
    assert captioner.device == "cuda"
    assert _texts(captioner.caption(photos(bundle, 5, seed=9))) == reference
    device_steps = len(log) // 2
    assert device_steps >= 3
    # one upload of features + keys per distinct set of running rows, far fewer than steps
    assert len(uploads) % 2 == 0 and len(uploads) // 2 < device_steps
    assert captioner.times.steps_run > device_steps  # the first (CPU) call counted its steps too
    assert captioner._bound is None  # nothing held on the device between batches
