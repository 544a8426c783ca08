"""An int8 copy of a bundle's decoder step for CPUs: `decoder_cpu` in model.json.

Why: on a CPU the beam search's decoder steps cost about as much as the encoder, and
most of a step is its matrix products. onnxruntime's dynamic quantisation (int8
weights per output channel, activations quantised per call) makes a 48-row step of the
Flickr8k model 1.8x faster on 2 threads (3.90 -> 2.16 ms, AVX-512 VNNI EPYC). Captions
change a little: Flickr8k val, beam 3, BLEU-4 21.41 -> 21.40, METEOR 20.12 -> 20.12,
CIDEr 0.516 -> 0.511. onnxruntime's CUDA provider runs MatMulInteger and
DynamicQuantizeLinear on the host (onnxruntime#7745), so the float decoder stays the one
for GPUs and the bundle holds both; Bundle.for_device picks.

The int8 step has its own sha256, so captions made with it carry their own model id.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

CPU_DECODER_FILE = "decoder.int8.onnx"
QUANTISED_OPS = ("MatMul", "Gemm")


def _float_weights_for_products(proto: onnx.ModelProto) -> int:
    """Turn float16-stored weights (initializer + Cast) that feed a MatMul/Gemm back into
    float32 initializers: the quantiser only quantises weights it can read as constants.
    Other float16 weights (the embedding table a Gather reads) stay as they are."""
    graph = proto.graph
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    initializers = {init.name: init for init in graph.initializer}
    restored = 0
    for node in list(graph.node):
        if not (node.op_type == "Cast" and node.input[0] in initializers
                and consumers.get(node.output[0], set()) <= set(QUANTISED_OPS)):
            continue
        stored = initializers.pop(node.input[0])
        values = numpy_helper.to_array(stored).astype(np.float32)
        graph.initializer.remove(stored)
        graph.initializer.append(numpy_helper.from_array(values, node.output[0]))
        graph.node.remove(node)
        restored += 1
    return restored


def _int8_lookup_tables(proto: onnx.ModelProto, min_elements: int = 1 << 16) -> int:
    """Store each large float32 table a Gather reads (decoder_passes' per-word GRU input
    table, 15.6 MB for the Flickr8k model) as int8 rows with one scale per row: the step
    gathers the int8 row and its scale and multiplies, so only B rows are dequantised."""
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    changed = 0
    for node in list(graph.node):
        table = initializers.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or table.data_type != onnx.TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(table)
        if values.ndim != 2 or values.size < min_elements or _attribute(node, "axis", 0) != 0:
            continue
        scale = np.maximum(np.abs(values).max(axis=1, keepdims=True), 1e-12) / 127.0
        rows = np.clip(np.rint(values / scale), -127, 127).astype(np.int8)
        name, position = table.name, list(graph.node).index(node)
        graph.initializer.remove(table)
        graph.initializer.extend([numpy_helper.from_array(rows, name + ".int8"),
                                  numpy_helper.from_array(scale.astype(np.float32), name + ".scale")])
        picked, output = node.output[0] + ".int8", node.output[0]
        graph.node.remove(node)
        for offset, new in enumerate([
            helper.make_node("Gather", [name + ".int8", node.input[1]], [picked]),
            helper.make_node("Gather", [name + ".scale", node.input[1]], [picked + ".scale"]),
            helper.make_node("Cast", [picked], [picked + ".float"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [picked + ".float", picked + ".scale"], [output]),
        ]):
            graph.node.insert(position + offset, new)
        changed += 1
    return changed


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def quantise_decoder(source: Path, target: Path) -> None:
    """Write an int8 (per-channel, dynamic) version of the decoder step at `source` to `target`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from export.decoder_passes import optimise_decoder

    proto = onnx.load(str(source))
    # the CPU step is always the fully rewritten one (a float decoder.onnx written next to an int8
    # step keeps its embedding projection unfolded); on a rewritten graph this changes nothing,
    # so export and `python -m export.quantize` give the same file
    optimise_decoder(proto)
    _float_weights_for_products(proto)
    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory() as scratch:
        plain = Path(scratch) / "decoder.float.onnx"
        onnx.save(proto, str(plain))
        root.setLevel(logging.ERROR)  # its "consider pre-processing" advice is for static CNN quantisation
        try:
            quantize_dynamic(str(plain), str(target), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=list(QUANTISED_OPS))
        finally:
            root.setLevel(level)
    quantised = onnx.load(str(target))
    _int8_lookup_tables(quantised)
    onnx.checker.check_model(quantised, full_check=True)
    onnx.save(quantised, str(target))


def add_cpu_decoder(bundle_dir: Path, *, tolerance: float = 0.25) -> dict[str, Any]:
    """Add decoder.int8.onnx to a bundle as `files.decoder_cpu`, after checking it on random rows.

    The check: every attention weight and hidden value within `tolerance` of the float
    step's, and the most likely next word the same for at least 95% of the rows. What
    int8 does to whole captions is measured with `caption-cli evaluate` (see above).
    """
    from caption_cli.bundle import load_bundle, sha256_file
    from export.decoder_passes import _indent

    bundle = load_bundle(bundle_dir)
    target = Path(bundle_dir) / CPU_DECODER_FILE
    fd, temporary = tempfile.mkstemp(prefix=".decoder-int8.", suffix=".onnx", dir=bundle_dir)
    os.close(fd)
    try:
        quantise_decoder(bundle.decoder_path, Path(temporary))
        check = check_cpu_decoder(bundle, Path(temporary), tolerance=tolerance)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 would make the file private to its writer
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)
    meta = dict(bundle.meta)
    meta["files"] = {**meta["files"], "decoder_cpu": CPU_DECODER_FILE}
    meta["sha256"] = {**meta["sha256"], CPU_DECODER_FILE: sha256_file(target)}
    meta["onnx"] = {**meta.get("onnx", {}), "decoder_cpu_weights": "int8"}
    meta_path = Path(bundle_dir) / "model.json"
    meta_path.write_text(json.dumps(meta, indent=_indent(meta_path), ensure_ascii=False) + "\n", encoding="utf-8")
    load_bundle(bundle_dir)  # the whole bundle still verifies
    return {**check, "bytes": target.stat().st_size}


def check_cpu_decoder(bundle: Any, int8_path: Path, *, tolerance: float = 0.25) -> dict[str, float]:
    """The int8 step against the bundle's float step on the same rows; ValueError when
    an attention weight or hidden value strays beyond `tolerance` or the most likely
    next word differs on more than 5% of the rows."""
    check = _compare_steps(bundle, bundle.decoder_path, int8_path)
    if check["max_difference"] > tolerance or check["same_next_word"] < 0.95:
        raise ValueError(f"{bundle.path}: the int8 decoder strays too far from the float one: {check}")
    return check


def _compare_steps(bundle: Any, float_path: Path, int8_path: Path, rows: int = 64) -> dict[str, float]:
    """One step of both graphs on the same realistic rows: the encoder's output for random pixels."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    size = bundle.image_size
    pixels = rng.integers(0, 256, (rows, size, size, 3), dtype=np.uint8)
    encoder = ort.InferenceSession(str(bundle.encoder_path), providers=["CPUExecutionProvider"])
    (pixels_name,), encoder_outputs = bundle.tensor_names("encoder")
    features, keys, hidden = encoder.run(encoder_outputs, {pixels_name: pixels})
    token = np.full(rows, bundle.special_tokens["start"], dtype=np.int64)
    inputs, _ = bundle.tensor_names("decoder")
    feed = dict(zip(inputs, (token, hidden, features, keys)))
    runs = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
            for path in (float_path, int8_path)]
    (logp_f, hidden_f, attention_f), (logp_q, hidden_q, attention_q) = runs
    return {"max_difference": float(max(np.abs(hidden_f - hidden_q).max(), np.abs(attention_f - attention_q).max())),
            "max_logprob_difference": float(np.abs(logp_f - logp_q).max()),
            "same_next_word": float(np.mean(logp_f.argmax(1) == logp_q.argmax(1)))}


def main(argv: list[str] | None = None) -> None:
    """python -m export.quantize BUNDLE_DIR: add an int8 CPU decoder to that bundle."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("bundle", type=Path)
    print(json.dumps(add_cpu_decoder(parser.parse_args(argv).bundle)))


if __name__ == "__main__":
    main()
