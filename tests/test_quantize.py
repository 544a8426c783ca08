"""export.quantize: an int8 decoder step for CPUs, picked by Bundle.for_device, with its own model id."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

from caption_cli.bundle import load_bundle  # noqa: E402
from caption_cli.captioner import Captioner  # noqa: E402
from caption_cli.errors import BundleError  # noqa: E402
from export.quantize import CPU_DECODER_FILE, add_cpu_decoder  # noqa: E402
from tests.test_captioner import photos  # noqa: E402


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("int8") / "bundle"
    shutil.copytree(tiny_bundle, folder)
    return folder, add_cpu_decoder(folder)


def test_the_int8_step_is_added_checked_and_smaller(int8_bundle, tiny_bundle: Path):
    folder, check = int8_bundle
    assert check["same_next_word"] >= 0.95 and check["max_difference"] <= 0.25
    meta = json.loads((folder / "model.json").read_text())
    assert meta["files"]["decoder_cpu"] == CPU_DECODER_FILE
    assert meta["onnx"]["decoder_cpu_weights"] == "int8"
    assert CPU_DECODER_FILE in meta["sha256"]
    import onnx

    ops = {node.op_type for node in onnx.load(str(folder / CPU_DECODER_FILE)).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    # the float step is untouched: a GPU (and the bundle's own id) still use it
    assert load_bundle(folder).model_id == load_bundle(tiny_bundle).model_id


def test_a_cpu_captioner_runs_the_int8_step_under_its_own_model_id(int8_bundle, tiny_bundle: Path):
    folder, _ = int8_bundle
    bundle = load_bundle(folder)
    cpu = bundle.for_device("cpu")
    assert bundle.for_device("cuda") is bundle
    assert cpu.decoder_path.name == CPU_DECODER_FILE and cpu.model_id != bundle.model_id
    assert cpu.model_id.startswith(f"{bundle.name}@")
    captioner = Captioner(bundle, device="cpu", threads=1)
    assert captioner.bundle.model_id == cpu.model_id
    float_captioner = Captioner(bundle, device="cpu", threads=1, cpu_decoder=False)
    assert float_captioner.bundle.model_id == bundle.model_id
    pixels = photos(bundle, 6, seed=3)
    fast, exact = captioner.caption(pixels), float_captioner.caption(pixels)
    assert len(fast) == len(exact) == 6
    # the same model, rounded: scores stay close (whole-caption quality is measured with evaluate)
    for a, b in zip(fast, exact):
        assert a.text and abs(a.score - b.score) < 0.5
        assert np.asarray(a.attention).shape == np.asarray(b.attention).shape
    # a bundle without the int8 file is the same bundle on every device
    plain = load_bundle(tiny_bundle)
    assert plain.for_device("cpu") is plain


def test_a_changed_int8_file_fails_verification(int8_bundle, tmp_path: Path):
    folder, _ = int8_bundle
    copy = tmp_path / "b"
    shutil.copytree(folder, copy)
    with open(copy / CPU_DECODER_FILE, "ab") as file:
        file.write(b"\0")
    with pytest.raises(BundleError, match=f"{CPU_DECODER_FILE}: sha256 mismatch"):
        load_bundle(copy)


def test_decoder_cpu_must_name_a_file(int8_bundle, tmp_path: Path):
    folder, _ = int8_bundle
    copy = tmp_path / "b"
    shutil.copytree(folder, copy)
    meta = json.loads((copy / "model.json").read_text())
    meta["files"]["decoder_cpu"] = 3
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="files.decoder_cpu"):
        load_bundle(copy)


def test_lookup_tables_become_int8_rows_with_a_scale_each(tiny_bundle: Path, tmp_path: Path):
    """The per-word table a Gather reads is stored as int8 + one scale per row; a step still
    gives (almost) the same numbers."""
    import onnx
    import onnxruntime as ort

    from export.quantize import _int8_lookup_tables

    bundle = load_bundle(tiny_bundle)
    proto = onnx.load(str(bundle.decoder_path))
    assert _int8_lookup_tables(proto, min_elements=1) >= 1
    onnx.checker.check_model(proto, full_check=True)
    tables = [i for i in proto.graph.initializer if i.name.endswith(".int8")]
    assert tables and all(t.data_type == onnx.TensorProto.INT8 for t in tables)
    onnx.save(proto, str(tmp_path / "step.onnx"))
    dims, cells = bundle.meta["dims"], bundle.grid[0] * bundle.grid[1]
    rng = np.random.default_rng(1)
    inputs, _ = bundle.tensor_names("decoder")
    feed = dict(zip(inputs, (rng.integers(0, dims["V"], 9), rng.standard_normal((9, dims["H"]), dtype=np.float32),
                             rng.standard_normal((9, cells, dims["E"]), dtype=np.float32),
                             rng.standard_normal((9, cells, dims["A"]), dtype=np.float32))))
    run = lambda path: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)  # noqa: E731
    for exact, rounded in zip(run(bundle.decoder_path), run(tmp_path / "step.onnx"), strict=True):
        np.testing.assert_allclose(rounded, exact, atol=0.05)


def test_export_command_adds_the_int8_step_on_request(tiny_checkpoint: Path, tmp_path: Path):
    pytest.importorskip("torch")
    from typer.testing import CliRunner

    from caption_cli.cli import app

    result = CliRunner().invoke(app, ["export", str(tiny_checkpoint), "--out", str(tmp_path / "b"),
                                      "--int8-cpu-decoder"])
    assert result.exit_code == 0, result.output
    bundle = load_bundle(tmp_path / "b")
    assert bundle.for_device("cpu").decoder_path.name == CPU_DECODER_FILE
    assert bundle.meta["onnx"]["decoder_cpu_weights"] == "int8"
    # the int8 step is quantised from the folded step (a per-word int8 table); the float
    # step, CUDA's, keeps the GRU input projection unfolded: no [V, 3H] table at all
    gathers = lambda path: {i.name for i in onnx.load(str(path)).graph.initializer  # noqa: E731
                            if "folded/table" in i.name}
    assert gathers(bundle.path / CPU_DECODER_FILE) and not gathers(bundle.decoder_path)
    # quantising that bundle again (python -m export.quantize) folds in memory first: the same
    # file, so the CPU model id, and every caption stored under it, stays
    written = (bundle.path / CPU_DECODER_FILE).read_bytes()
    add_cpu_decoder(bundle.path)
    assert (bundle.path / CPU_DECODER_FILE).read_bytes() == written
