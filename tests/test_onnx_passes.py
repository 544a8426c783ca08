"""export.onnx_passes: Pads folded into convolutions compute the same values, and only safe ones fold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from export.onnx_passes import constant_value, fold_pads_into_convs  # noqa: E402

RNG = np.random.default_rng(0)
X_SHAPE = [2, 3, 9, 10]


def _pad_conv_model(pads: list[int], *, mode: str = "constant", value: float | None = None,
                    pads_as_nodes: bool = False, extra_reader: bool = False, pad_is_output: bool = False,
                    stride: int = 2) -> onnx.ModelProto:
    """x -> Pad -> Conv(3x3, stride) -> y, the way the exporter writes TF 'SAME' padding."""
    weight = numpy_helper.from_array(RNG.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    inits = [weight]
    nodes = []
    if pads_as_nodes:  # the exporter computes the amounts with a chain of constant nodes
        nodes += [helper.make_node("Constant", [], ["pads_raw"], value=numpy_helper.from_array(
                      np.array(pads, dtype=np.int32).reshape(2, 4), "pads_raw")),
                  helper.make_node("Reshape", ["pads_raw", "flat"], ["pads_i32"]),
                  helper.make_node("Cast", ["pads_i32"], ["pads"], to=TensorProto.INT64)]
        inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"))
    else:
        inits.append(numpy_helper.from_array(np.array(pads, dtype=np.int64), "pads"))
    pad_inputs = ["x", "pads"]
    if value is not None:
        inits.append(numpy_helper.from_array(np.array(value, dtype=np.float32), "value"))
        pad_inputs.append("value")
    nodes.append(helper.make_node("Pad", pad_inputs, ["padded"], mode=mode))
    nodes.append(helper.make_node("Conv", ["padded", "w"], ["y"], strides=[stride, stride]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["padded"], ["also"]))
        outputs.append(helper.make_tensor_value_info("also", TensorProto.FLOAT, ["n", "c", "h", "w"]))
    if pad_is_output:
        outputs.append(helper.make_tensor_value_info("padded", TensorProto.FLOAT, ["n", "c", "h", "w"]))
    graph = helper.make_graph(nodes, "pad_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, X_SHAPE)],
                              outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


@pytest.mark.parametrize("pads", [
    [0, 0, 0, 1, 0, 0, 1, 2],  # TF 'SAME' on even sizes: the extra pixel after
    [0, 0, 1, 1, 0, 0, 1, 1],  # symmetric
    [0, 0, 2, 0, 0, 0, 0, 3],
])
@pytest.mark.parametrize("pads_as_nodes", [False, True])
def test_folded_conv_computes_the_same_values(pads: list[int], pads_as_nodes: bool) -> None:
    model = _pad_conv_model(pads, pads_as_nodes=pads_as_nodes)
    x = RNG.normal(size=X_SHAPE).astype(np.float32)
    (before,) = _run(model, x)
    assert fold_pads_into_convs(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert _ops(model) == ["Conv"]  # the Pad and its constant chain are gone
    assert {init.name for init in model.graph.initializer} == {"w"}
    conv_pads = helper.get_attribute_value(next(a for a in model.graph.node[0].attribute if a.name == "pads"))
    assert conv_pads == pads[2:4] + pads[6:8]
    (after,) = _run(model, x)
    assert after.shape == before.shape
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


def test_a_zero_value_input_still_folds() -> None:
    model = _pad_conv_model([0, 0, 0, 1, 0, 0, 1, 0], value=0.0)
    x = RNG.normal(size=X_SHAPE).astype(np.float32)
    (before,) = _run(model, x)
    assert fold_pads_into_convs(model) == 1
    np.testing.assert_allclose(_run(model, x)[0], before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", [
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], value=0.5),  # pads with a non-zero value: a Conv pads with zeros
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="reflect"),
    dict(pads=[1, 0, 1, 1, 0, 0, 1, 1]),  # pads the batch axis, which a Conv cannot
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], extra_reader=True),  # another node reads the padded tensor
    dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], pad_is_output=True),
], ids=["nonzero-value", "reflect", "batch-axis", "two-readers", "graph-output"])
def test_unsafe_pads_are_left_alone(case: dict) -> None:
    model = _pad_conv_model(**case)
    x = RNG.normal(size=X_SHAPE).astype(np.float32)
    before = _run(model, x)
    assert fold_pads_into_convs(model) == 0
    assert "Pad" in _ops(model)
    for a, b in zip(_run(model, x), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_constant_value_refuses_what_depends_on_an_input() -> None:
    model = _pad_conv_model([0, 0, 0, 1, 0, 0, 1, 2], pads_as_nodes=True)
    assert constant_value(model, "pads").tolist() == [0, 0, 0, 1, 0, 0, 1, 2]
    assert constant_value(model, "padded") is None  # computed from the graph input x
    assert constant_value(model, "no-such-name") is None


def test_exported_encoder_has_its_padding_inside_the_convolutions(tiny_bundle: Path) -> None:
    """The tiny backbone at 64 px has stride-2 layers with TF's uneven 'SAME' padding."""
    model = onnx.load(str(tiny_bundle / "encoder.onnx"))
    assert "Pad" not in _ops(model)
    conv_pads = [helper.get_attribute_value(a) for node in model.graph.node if node.op_type == "Conv"
                 for a in node.attribute if a.name == "pads"]
    uneven = [p for p in conv_pads if p[:2] != p[2:]]
    assert uneven, "expected the stride-2 convolutions to keep TF's extra pixel after"
    assert all(p[2:] == [b + 1 for b in p[:2]] for p in uneven)


def test_feature_extraction_graph_has_no_pads(tiny_parts, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from training.features import PixelsToGrid, export_backbone

    path = tmp_path / "backbone.onnx"
    export_backbone(tiny_parts.backbone, path)
    assert "Pad" not in _ops(onnx.load(str(path)))
    size = tiny_parts.backbone.spec.image_size
    pixels = RNG.integers(0, 256, size=(3, size, size, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (grid,) = session.run(["grid"], {"pixels": pixels})
    with torch.no_grad():
        expected = PixelsToGrid(tiny_parts.backbone.eval())(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(grid, expected, rtol=1e-4, atol=1e-4)


def test_remove_unused_keeps_what_a_subgraph_reads() -> None:
    from export.onnx_passes import remove_unused

    outer = helper.make_node("Constant", [], ["outer"], value=numpy_helper.from_array(np.float32(3.0), "outer"))
    unused = helper.make_node("Constant", [], ["unused"], value=numpy_helper.from_array(np.float32(1.0), "unused"))
    then_branch = helper.make_graph([helper.make_node("Identity", ["outer"], ["then_out"])], "then", [],
                                    [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [])])
    else_branch = helper.make_graph([helper.make_node("Neg", ["outer"], ["else_out"])], "else", [],
                                    [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [])])
    branch = helper.make_node("If", ["flag"], ["y"], then_branch=then_branch, else_branch=else_branch)
    graph = helper.make_graph([outer, unused, branch], "if", [helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    remove_unused(model)
    assert [node.output[0] for node in model.graph.node] == ["outer", "y"]
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"flag": np.array(False)})[0] == -3.0
