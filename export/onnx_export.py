"""Turn a trained ShowAttendTell + backbone into the bundle's two ONNX graphs.

encoder.onnx: uint8 pixels [N, S, S, 3] -> features [N, L, E], keys [N, L, A], hidden0 [N, H]
decoder.onnx: ONE step, token [B], hidden [B, H], features [B, L, E], keys [B, L, A]
              -> logprobs [B, V] (log-softmax), hidden_out [B, H], attention [B, L]
The runtime drives the decoder step by step (beam search), so the graphs hold no loop.
Both are written at opset 17 and IR version 8: onnxruntime 1.17, the oldest runtime
pyproject allows, loads up to IR 9 / opset 20, and 17 is the newest opset the
TorchScript exporter covers fully (LayerNorm is a single node from 17 on).

decoder.onnx may store its large weights as float16 (`half_weights`) while computing in
float32: each such initializer is followed by a Cast to float32, which onnxruntime folds
at load time. The weights are rounded to float16 in PyTorch before the trace, so the
graph and `half_decoder_reference(model)` hold bit-identical values and parity stays exact.
The encoder stays float32: its BatchNorms are folded into the convolutions on export.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.backbone import EfficientNetLite
from training.features import PixelsToGrid
from training.model import ShowAttendTell

if TYPE_CHECKING:
    import onnx

OPSET = 17
IR_VERSION = 8
ENCODER_INPUTS = ["pixels"]
ENCODER_OUTPUTS = ["features", "keys", "hidden0"]
# With a confidence scorer (a second, cross-entropy-trained model on the same backbone), the
# encoder also gives the scorer's own projection of the grid, after the three above.
SCORER_ENCODER_OUTPUTS = ["scorer_features", "scorer_keys", "scorer_hidden0"]
DECODER_INPUTS = ["token", "hidden", "features", "keys"]
DECODER_OUTPUTS = ["logprobs", "hidden_out", "attention"]
HALF_MIN_ELEMENTS = 1024  # smaller tensors (biases) stay float32: a Cast node there saves almost nothing


class EncoderGraph(nn.Module):
    """What encoder.onnx computes: pixels -> backbone grid -> per-image decoder inputs
    (and, with a scorer, the scorer's decoder inputs from the same grid: the backbone,
    nearly all of the encoder's cost, runs once for both)."""

    def __init__(self, model: ShowAttendTell, backbone: EfficientNetLite,
                 scorer: ShowAttendTell | None = None) -> None:
        super().__init__()
        self.grid = PixelsToGrid(backbone)
        self.encoder = model.encoder
        self.scorer = scorer.encoder if scorer is not None else None

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grid = self.grid(pixels)  # [N, L, D]
        outputs = self.encoder(grid)  # [N, L, E], [N, L, A], [N, H]
        if self.scorer is None:
            return outputs
        return (*outputs, *self.scorer(grid))  # + the scorer's [N, L, E'], [N, L, A'], [N, H']


class DecoderGraph(nn.Module):
    """What decoder.onnx computes: one step, with log-softmax so beams add scores directly."""

    def __init__(self, model: ShowAttendTell) -> None:
        super().__init__()
        self.step = model.step

    def forward(self, token: torch.Tensor, hidden: torch.Tensor, features: torch.Tensor,
                keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, hidden, alpha = self.step(token, hidden, features, keys)  # [B, V], [B, H], [B, L]
        return F.log_softmax(logits, dim=1), hidden, alpha


def _frozen_copy(module: nn.Module) -> nn.Module:
    """An eval-mode deep copy: tracing never touches (or leaves state on) the caller's module."""
    clone = copy.deepcopy(module).eval()
    clone.requires_grad_(False)
    return clone


def _round_to_half_(module: nn.Module) -> None:
    """Round every parameter of `module` to a float16-representable value, in place, kept float32."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            rounded = param.data.half().float()
            if (torch.isfinite(param.data) & ~torch.isfinite(rounded)).any():
                raise ValueError(f"decoder weight {name} exceeds the float16 range (|w| > 65504); "
                                 "export it with float32 weights")
            param.data = rounded


def half_decoder_reference(model: ShowAttendTell) -> ShowAttendTell:
    """A deep copy of `model` whose decoder step holds float16-rounded weights (still float32).

    This is the PyTorch twin of a decoder.onnx written with half_weights=True: parity
    checks compare against it, since rounding moves logprobs by far more than 1e-4.
    """
    clone = copy.deepcopy(model)
    _round_to_half_(clone.step)
    return clone


def store_weights_as_half(proto: onnx.ModelProto, min_elements: int = HALF_MIN_ELEMENTS) -> list[str]:
    """Store each float32 initializer of more than `min_elements` as float16 + Cast(to=FLOAT).

    The Cast produces the original name, so the rest of the graph is untouched; the casts
    go first in the node list (they depend on initializers only). A tensor whose values
    float16 cannot hold exactly (e.g. one the exporter folded from rounded weights) stays
    float32, so the graph computes exactly what it did before. Returns the converted names.
    """
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    fed = {v.name for v in graph.input}  # an initializer that is also an input can be overridden: leave it
    taken = fed | {i.name for i in graph.initializer} | {out for node in graph.node for out in node.output}
    casts, converted = [], []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or init.name in fed:
            continue
        values = numpy_helper.to_array(init)
        half = values.astype(np.float16)
        if values.size <= min_elements or not np.array_equal(half.astype(np.float32), values):
            continue
        stored = f"{init.name}.float16"
        while stored in taken:
            stored += "_"
        taken.add(stored)
        name = init.name
        init.CopyFrom(numpy_helper.from_array(half, stored))
        casts.append(onnx.helper.make_node("Cast", [stored], [name], name=f"{name}.to_float32",
                                           to=onnx.TensorProto.FLOAT))
        converted.append(name)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return converted


@contextmanager
def _quiet_trace() -> Iterator[None]:
    """Silence the tracer's expected notes (S is a constant per bundle by design)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding")
        # the TorchScript exporter is chosen on purpose (verified parity, opset 17); its
        # deprecation notes would only repeat on every export
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="The feature will be removed")
        yield


def _finish(path: Path, shapes: dict[str, list[int | str]], half_weights: bool = False,
            optimise_step: bool = False, fold_embedding: bool = True) -> None:
    """Fold the padding into the convolutions, name every output dimension, pin the IR
    version old runtimes accept, run onnx's checker.

    Folding (export.onnx_passes) makes the encoder about 1.7x faster in onnxruntime on a
    CPU with identical outputs. The tracer leaves L as an anonymous symbol after the
    grid's reshape; writing the real shapes makes the file self-describing for anyone
    who opens it in Netron. half_weights: store the large weights as float16.
    optimise_step: the decoder rewrites of export.decoder_passes (same maths, about a
    quarter less time per step; the bundle's parity check then judges the rewritten graph).
    """
    import onnx

    from export.onnx_passes import fold_pads_into_convs

    proto = onnx.load(str(path))
    fold_pads_into_convs(proto)
    proto.ir_version = IR_VERSION
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, shapes[value.name], strict=True):
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size
    if half_weights:
        store_weights_as_half(proto)
    if optimise_step:
        from export.decoder_passes import optimise_decoder

        optimise_decoder(proto, fold_embedding=fold_embedding)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def export_encoder(model: ShowAttendTell, backbone: EfficientNetLite, path: Path,
                   scorer: ShowAttendTell | None = None) -> Path:
    """Write encoder.onnx; dynamic N, fixed S (the backbone's 'SAME' padding is baked in).

    scorer: a second model on the same backbone whose projection the encoder also outputs
    (SCORER_ENCODER_OUTPUTS), for the confidence scorer's teacher-forced pass.
    """
    graph = _frozen_copy(EncoderGraph(model, backbone, scorer))
    cfg, size = model.cfg, backbone.spec.image_size
    L = cfg.grid[0] * cfg.grid[1]
    dummy = torch.zeros(2, size, size, 3, dtype=torch.uint8)  # pixels [N, S, S, 3]
    outputs = ENCODER_OUTPUTS + (SCORER_ENCODER_OUTPUTS if scorer is not None else [])
    shapes: dict[str, list[int | str]] = {
        "pixels": ["N", size, size, 3], "features": ["N", L, cfg.encoder_dim],
        "keys": ["N", L, cfg.attention_dim], "hidden0": ["N", cfg.hidden_dim]}
    if scorer is not None:
        own = scorer.cfg
        shapes.update({"scorer_features": ["N", L, own.encoder_dim], "scorer_keys": ["N", L, own.attention_dim],
                       "scorer_hidden0": ["N", own.hidden_dim]})
    axes = {name: {0: "N"} for name in ENCODER_INPUTS + outputs}
    with torch.no_grad(), _quiet_trace():
        torch.onnx.export(graph, (dummy,), str(path), input_names=ENCODER_INPUTS, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    _finish(path, shapes)
    return path


def export_decoder(model: ShowAttendTell, path: Path, *, half_weights: bool = False, optimise: bool = True,
                   fold_embedding: bool = True) -> Path:
    """Write decoder.onnx: one step, dynamic B (images x beams).

    half_weights: round the step's weights to float16 and store the large ones as float16
    (about half the file); the graph still computes in float32, exactly like
    half_decoder_reference(model). The caller's model is never changed.
    optimise: apply export.decoder_passes (False gives the graph exactly as traced);
    fold_embedding: with optimise, also precompute the per-word GRU input table (faster on a
    CPU, but a float32 [V, 3H] table; see decoder_passes.optimise_decoder).
    """
    graph = _frozen_copy(DecoderGraph(model))
    if half_weights:
        _round_to_half_(graph.step)  # the copy's weights: graph and reference share exact values
    cfg = model.cfg
    L = cfg.grid[0] * cfg.grid[1]
    B = 3  # an odd size in the trace, so no dimension can be mistaken for a constant 1
    dummy = (
        torch.full((B,), cfg.special["start"], dtype=torch.long),  # token [B]
        torch.zeros(B, cfg.hidden_dim),  # hidden [B, H]
        torch.zeros(B, L, cfg.encoder_dim),  # features [B, L, E]
        torch.zeros(B, L, cfg.attention_dim),  # keys [B, L, A]
    )
    axes = {name: {0: "B"} for name in DECODER_INPUTS + DECODER_OUTPUTS}
    with torch.no_grad(), _quiet_trace():
        torch.onnx.export(graph, dummy, str(path), input_names=DECODER_INPUTS, output_names=DECODER_OUTPUTS,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    _finish(path, {"token": ["B"], "hidden": ["B", cfg.hidden_dim], "features": ["B", L, cfg.encoder_dim],
                   "keys": ["B", L, cfg.attention_dim], "logprobs": ["B", cfg.vocab_size],
                   "hidden_out": ["B", cfg.hidden_dim], "attention": ["B", L]},
            half_weights=half_weights, optimise_step=optimise, fold_embedding=fold_embedding)
    return path
