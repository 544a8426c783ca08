"""Graph clean-ups applied to exported ONNX files before they are checked and saved.

Why they exist: the TorchScript exporter writes TensorFlow 'SAME' padding as a separate
`Pad` node in front of every convolution, its pad amounts computed by a chain of
`Constant`/`Reshape`/`Slice`/`Cast` nodes. onnxruntime's CPU provider does not fold those
Pads into the convolutions, and converts the tensor layout (NCHW <-> NCHWc) around each
one: profiled on EfficientNet-Lite2, Pad plus the layout conversions took 46% of the
encoder's time. ONNX's `Conv` takes asymmetric `pads` itself, so merging each zero Pad
into the Conv it feeds computes exactly the same values without the detours.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

SPATIAL_START = 2  # Pad's pads cover [N, C, spatial...]; only the spatial ones can move into a Conv


def fold_pads_into_convs(proto: onnx.ModelProto) -> int:
    """Merge every zero-valued constant `Pad` that only feeds a `Conv` into that Conv.

    Changes `proto` in place, drops the nodes and initializers nothing uses any more,
    and returns how many Pads were folded. A Pad that pads N or C, reflects or repeats
    edges, pads with a non-zero value, or has a non-constant amount is left alone.
    """
    graph = proto.graph
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {value.name for value in graph.output}
    folded: list[int] = []
    for index, pad in enumerate(graph.node):
        if pad.op_type != "Pad" or pad.output[0] in graph_outputs:
            continue
        users = consumers[pad.output[0]]
        if len(users) != 1 or users[0].op_type != "Conv" or users[0].input[0] != pad.output[0]:
            continue
        conv = users[0]
        amounts = _zero_padding(proto, pad)
        if amounts is None or _attribute(conv, "auto_pad", b"NOTSET") != b"NOTSET":
            continue
        rank = len(amounts) // 2
        begins, ends = amounts[:rank], amounts[rank:]
        if any(begins[:SPATIAL_START]) or any(ends[:SPATIAL_START]) or min(amounts) < 0:
            continue
        spatial = list(begins[SPATIAL_START:]) + list(ends[SPATIAL_START:])
        current = _attribute(conv, "pads", None) or [0] * len(spatial)
        _set_attribute(conv, "pads", [int(a + b) for a, b in zip(current, spatial, strict=True)])
        conv.input[0] = pad.input[0]
        folded.append(index)
    for index in reversed(folded):
        del graph.node[index]
    if folded:
        remove_unused(proto)
    return len(folded)


def remove_unused(proto: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nothing reads, then initializers nothing reads.

    Names read inside subgraphs (If/Loop bodies) count as read, so those stay.
    """
    graph = proto.graph
    while True:
        needed = _names_read(graph)
        dead = [index for index, node in enumerate(graph.node) if not any(out in needed for out in node.output)]
        if not dead:
            break
        for index in reversed(dead):
            del graph.node[index]
    needed = _names_read(graph)
    for index in reversed([i for i, init in enumerate(graph.initializer) if init.name not in needed]):
        del graph.initializer[index]


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every name a node of `graph` or of any subgraph reads, plus the graph's outputs."""
    names = {value.name for value in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            for subgraph in [attribute.g] * attribute.HasField("g") + list(attribute.graphs):
                names |= _names_read(subgraph)
    return names


def _zero_padding(proto: onnx.ModelProto, pad: onnx.NodeProto) -> list[int] | None:
    """The Pad's amounts when it is a constant-mode zero pad over all axes, else None."""
    if _attribute(pad, "mode", b"constant") != b"constant":
        return None
    inputs = list(pad.input) + [""] * (4 - len(pad.input))
    if inputs[3]:  # an `axes` input (opset 18+): not worth handling, the exporter never writes it
        return None
    amounts = constant_value(proto, inputs[1])
    if amounts is None:
        return None
    if inputs[2]:
        value = constant_value(proto, inputs[2])
        if value is None or np.any(value != 0):
            return None
    return [int(a) for a in amounts.reshape(-1)]


def constant_value(proto: onnx.ModelProto, name: str) -> np.ndarray | None:
    """Evaluate `name` when it depends on initializers and Constant-rooted nodes only."""
    graph = proto.graph
    graph_inputs = {value.name for value in graph.input}  # an initializer that is an input can be overridden
    initializers = {init.name: init for init in graph.initializer}
    producer = {out: index for index, node in enumerate(graph.node) for out in node.output}
    nodes: set[int] = set()
    tensors: list[onnx.TensorProto] = []
    pending, seen = [name], set()
    while pending:
        current = pending.pop()
        if not current or current in seen:
            continue
        seen.add(current)
        if current in graph_inputs:
            return None
        if current in initializers:
            tensors.append(initializers[current])
        elif current in producer:
            nodes.add(producer[current])
            pending.extend(graph.node[producer[current]].input)
        else:
            return None  # a dangling name
    ordered = [graph.node[index] for index in sorted(nodes)]  # a valid graph is topologically sorted
    subgraph = helper.make_graph(ordered, "constant", [], [helper.make_tensor_value_info(name, 0, None)],
                                 initializer=tensors)
    model = helper.make_model(subgraph, opset_imports=proto.opset_import)
    return np.asarray(ReferenceEvaluator(model).run(None, {})[0])


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    for attribute in list(node.attribute):
        if attribute.name == name:
            node.attribute.remove(attribute)
    node.attribute.append(helper.make_attribute(name, value))
