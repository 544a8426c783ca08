"""Rewrites of decoder.onnx that compute the same step with less work per call.

Why: the beam search calls the decoder once per word for every running beam, so its
cost is paid ~15 times per image, and onnxruntime does not find these by itself.
Profiled at 48 rows on the 2-core CPU (onnxruntime 1.32), before the rewrites:
Gemm 58%, the attention's Mul + ReduceSum over [B, L, E] 20%, Add/Tanh 15%.

- `attention_context_as_matmul`: the context sum_l alpha_l * features_l is written by
  the exporter as a broadcast Mul that materialises [B, L, E] and a ReduceSum; one
  batched MatMul [B, 1, L] x [B, L, E] computes it without the temporary.
- `fold_embedding_into_gru`: the GRU's input projection W_ih [3H, W + E] is applied to
  concat(embedding(token), context). Its embedding half depends on the token only, so
  it is precomputed for every word: a [V, 3H] table (bias included) that a Gather
  reads, leaving a Gemm over the context alone (a sixth of the step's multiply-adds).

Measured (same run, best of 7, onnxruntime 1.32, 2-core CPU): 48 rows 5.65 -> 4.31 ms
on 1 thread, 3.59 -> 2.83 ms on 2. Tried and dropped: stacking the three Gemms that read
`hidden` (query, gate, W_hh) into one, which measured the same as leaving them apart.

Both change only the float summation order (differences ~1e-6), never the maths.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.onnx_passes import constant_value, remove_unused


def optimise_decoder(proto: onnx.ModelProto, *, fold_embedding: bool = True) -> dict[str, int]:
    """Apply the rewrites in place; returns how many places each one changed.

    fold_embedding=False leaves the GRU's input projection as it is: the folded table is
    float32 [V, 3H] (19 MB for a 3,156-word vocabulary, four times the weights it replaces),
    worth it only where the step runs on a CPU. A bundle with an int8 CPU step folds that
    one and keeps its float step (CUDA's) unfolded.
    """
    done = {"attention_context_as_matmul": attention_context_as_matmul(proto),
            "fold_embedding_into_gru": fold_embedding_into_gru(proto) if fold_embedding else 0}
    remove_unused(proto)
    return done


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    return users


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _axes(proto: onnx.ModelProto, node: onnx.NodeProto) -> list[int] | None:
    """The constant axes of an Unsqueeze/Squeeze/ReduceSum (input at opset 13+, else attribute)."""
    if len(node.input) > 1 and node.input[1]:
        value = constant_value(proto, node.input[1])
        return None if value is None else [int(a) for a in value.reshape(-1)]
    for attribute in node.attribute:
        if attribute.name == "axes":
            return list(helper.get_attribute_value(attribute))
    return None


def _int_tensor(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _insert_before(graph: onnx.GraphProto, anchor: onnx.NodeProto, nodes: list[onnx.NodeProto]) -> None:
    """Put `nodes` where `anchor` is (keeps the graph topologically sorted), then drop anchor."""
    index = next(i for i, node in enumerate(graph.node) if node is anchor)
    del graph.node[index]
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)


def attention_context_as_matmul(proto: onnx.ModelProto) -> int:
    """ReduceSum_l(Unsqueeze(alpha [B, L], 2) * features [B, L, E]) -> MatMul; returns the count."""
    graph = proto.graph
    users, producer = _consumers(graph), _producers(graph)
    changed = 0
    for reduce in [node for node in graph.node if node.op_type == "ReduceSum"]:
        mul = producer.get(reduce.input[0])
        if mul is None or mul.op_type != "Mul" or len(users[mul.output[0]]) != 1:
            continue
        keepdims = next((helper.get_attribute_value(a) for a in reduce.attribute if a.name == "keepdims"), 1)
        if keepdims != 0 or _axes(proto, reduce) != [1]:
            continue
        unsqueeze = next((producer[name] for name in mul.input
                          if name in producer and producer[name].op_type == "Unsqueeze"
                          and _axes(proto, producer[name]) in ([2], [-1])), None)
        if unsqueeze is None:
            continue
        values = mul.input[1] if mul.input[0] == unsqueeze.output[0] else mul.input[0]
        prefix = reduce.output[0] + "/as_matmul"
        graph.initializer.extend([_int_tensor(prefix + "/axis1", [1])])
        _insert_before(graph, reduce, [
            helper.make_node("Unsqueeze", [unsqueeze.input[0], prefix + "/axis1"], [prefix + "/weights"]),  # [B, 1, L]
            helper.make_node("MatMul", [prefix + "/weights", values], [prefix + "/context"]),  # [B, 1, E]
            helper.make_node("Squeeze", [prefix + "/context", prefix + "/axis1"], [reduce.output[0]]),  # [B, E]
        ])
        changed += 1
    return changed


def fold_embedding_into_gru(proto: onnx.ModelProto) -> int:
    """Gemm(Concat(Gather(W_emb, token), x), W_ih, b_ih) -> Gather(table, token) + Gemm(x, W_x)."""
    graph = proto.graph
    users, producer = _consumers(graph), _producers(graph)
    changed = 0
    for gemm in [node for node in graph.node if node.op_type == "Gemm"]:
        concat = producer.get(gemm.input[0])
        attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        if (concat is None or concat.op_type != "Concat" or len(concat.input) != 2
                or len(users[concat.output[0]]) != 1 or attrs.get("transA", 0) or attrs.get("transB", 0) != 1
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            continue
        axis = next((helper.get_attribute_value(a) for a in concat.attribute if a.name == "axis"), None)
        gather = producer.get(concat.input[0])
        if axis not in (1, -1) or gather is None or gather.op_type != "Gather":
            continue
        embedding = constant_value(proto, gather.input[0])  # [V, W]
        weight = constant_value(proto, gemm.input[1])  # [3H, W + E]
        bias = constant_value(proto, gemm.input[2]) if len(gemm.input) > 2 and gemm.input[2] else None
        if embedding is None or weight is None or embedding.ndim != 2 or weight.ndim != 2:
            continue
        width = embedding.shape[1]
        table = embedding.astype(np.float64) @ weight[:, :width].T.astype(np.float64)  # [V, 3H]
        if bias is not None:
            table += bias.astype(np.float64)
        prefix = gemm.output[0] + "/folded"
        rest = weight[:, width:]  # [3H, E]: still float16-exact when the weights were float16
        graph.initializer.append(numpy_helper.from_array(table.astype(np.float32), prefix + "/table"))
        cast = _stored_weight(graph, prefix + "/weight", np.ascontiguousarray(rest, np.float32))
        _insert_before(graph, gemm, cast + [
            helper.make_node("Gather", [prefix + "/table", gather.input[1]], [prefix + "/by_word"]),  # [B, 3H]
            helper.make_node("Gemm", [concat.input[1], prefix + "/weight"], [prefix + "/by_context"],
                             transB=1),  # [B, 3H]
            helper.make_node("Add", [prefix + "/by_word", prefix + "/by_context"], [gemm.output[0]]),
        ])
        changed += 1
    return changed


def _stored_weight(graph: onnx.GraphProto, name: str, value: np.ndarray) -> list[onnx.NodeProto]:
    """Add `value` as an initializer `name`: as float16 + Cast when that is exact (the
    bundle's half weights stay half on disk), else as float32. Returns the Cast, if any."""
    half = value.astype(np.float16)
    if not np.array_equal(half.astype(np.float32), value):
        graph.initializer.append(numpy_helper.from_array(value, name))
        return []
    graph.initializer.append(numpy_helper.from_array(half, name + ".float16"))
    return [helper.make_node("Cast", [name + ".float16"], [name], to=onnx.TensorProto.FLOAT)]



def optimise_bundle_decoder(bundle_dir: Path, *, tolerance: float = 1e-4) -> dict[str, Any]:
    """Rewrite a bundle's decoder.onnx in place with `optimise_decoder`, keeping its model id.

    The rewritten step is run against the old one on random rows first (every output
    within `tolerance`), and the file is only replaced when they agree. model.json gets
    the new sha256 and `weights_id` (the old decoder's sha12, see Bundle.model_id).
    Returns what changed and the largest output difference.
    """
    from caption_cli.bundle import load_bundle, sha256_file

    bundle = load_bundle(bundle_dir)
    old_path = bundle.decoder_path
    proto = onnx.load(str(old_path))
    changed = optimise_decoder(proto)
    onnx.checker.check_model(proto, full_check=True)
    fd, temporary = tempfile.mkstemp(prefix=".decoder.", suffix=".onnx", dir=old_path.parent)
    os.close(fd)
    try:
        onnx.save(proto, temporary)
        difference = _largest_difference(bundle, old_path, Path(temporary))
        if difference > tolerance:
            raise ValueError(f"{old_path}: the rewritten decoder differs by {difference:.2e} (> {tolerance})")
        meta = dict(bundle.meta)
        meta.setdefault("weights_id", bundle.model_id.rsplit("@", 1)[1])
        os.replace(temporary, old_path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    meta["sha256"] = {**meta["sha256"], old_path.name: sha256_file(old_path)}
    meta_path = Path(bundle_dir) / "model.json"
    meta_path.write_text(json.dumps(meta, indent=_indent(meta_path), ensure_ascii=False) + "\n", encoding="utf-8")
    load_bundle(bundle_dir)  # the whole bundle still verifies
    return {**changed, "max_difference": difference}


def _indent(path: Path) -> int:
    """The indent model.json is written with (write_bundle: 2, set_calibration: 1), kept."""
    second = path.read_text(encoding="utf-8").splitlines()[1:2]
    return len(second[0]) - len(second[0].lstrip(" ")) if second else 2


def _largest_difference(bundle: Any, old: Path, new: Path, rows: int = 37) -> float:
    """Largest |old - new| over every output of one decoder step on random rows."""
    import onnxruntime as ort

    dims = bundle.meta["dims"]
    cells = bundle.grid[0] * bundle.grid[1]
    rng = np.random.default_rng(0)
    feed = {"token": rng.integers(0, dims["V"], rows),
            "hidden": rng.standard_normal((rows, dims["H"]), dtype=np.float32),
            "features": rng.standard_normal((rows, cells, dims["E"]), dtype=np.float32),
            "keys": rng.standard_normal((rows, cells, dims["A"]), dtype=np.float32)}
    inputs, _ = bundle.tensor_names("decoder")
    feed = dict(zip(inputs, feed.values()))
    before = ort.InferenceSession(str(old), providers=["CPUExecutionProvider"]).run(None, feed)
    after = ort.InferenceSession(str(new), providers=["CPUExecutionProvider"]).run(None, feed)
    return max(float(np.abs(a - b).max()) for a, b in zip(before, after, strict=True))


def main(argv: list[str] | None = None) -> None:
    """python -m export.decoder_passes BUNDLE_DIR: rewrite that bundle's decoder in place."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("bundle", type=Path)
    print(json.dumps(optimise_bundle_decoder(parser.parse_args(argv).bundle)))


if __name__ == "__main__":
    main()
