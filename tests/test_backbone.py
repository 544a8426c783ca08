"""The EfficientNet-Lite backbones load their ImageNet weights and see real photos correctly."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
skimage_data = pytest.importorskip("skimage.data")

from PIL import Image  # noqa: E402

from caption_cli.preprocess import model_pixels  # noqa: E402
from training.backbone import load_backbone, spec_for  # noqa: E402

ESPRESSO, EGYPTIAN_CAT = 967, 285


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
@pytest.mark.parametrize("photo, label", [("coffee", ESPRESSO), ("chelsea", EGYPTIAN_CAT)])
def test_imagenet_class_in_top5(name: str, photo: str, label: int) -> None:
    backbone = load_backbone(name)
    size = backbone.spec.image_size
    pixels = model_pixels(Image.fromarray(getattr(skimage_data, photo)()), size)  # [S, S, 3] uint8
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        grid = backbone(x)
        top5 = backbone.classify(x).topk(5).indices[0].tolist()
    assert label in top5
    assert tuple(grid.shape) == (1, 1280, *backbone.spec.grid)


@pytest.mark.parametrize("name, size, grid", [("efficientnet-lite0", 224, (7, 7)), ("efficientnet-lite1", 240, (8, 8)),
                                              ("efficientnet-lite2", 260, (9, 9)), ("efficientnet-lite0", 320, (10, 10)),
                                              ("efficientnet-lite0", 64, (2, 2))])
def test_grid_sizes(name: str, size: int, grid: tuple[int, int]) -> None:
    assert spec_for(name, size).grid == grid
    backbone = load_backbone(name, size)
    with torch.no_grad():
        out = backbone(torch.zeros(1, 3, size, size))
    assert tuple(out.shape[-2:]) == grid


def test_unknown_backbone_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet50'; choose one of efficientnet-lite0"):
        spec_for("resnet50")


def test_tf_same_padding_is_asymmetric_on_stride_two() -> None:
    """TF 'SAME' puts the odd padding pixel at the right/bottom; symmetric padding would not."""
    from training.backbone import SameConv2d

    conv = SameConv2d(1, 1, 3, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left tap of each window
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = conv(x).detach()  # pad total 1 per side pair: 0 before, 1 after -> windows start at rows/cols 0 and 2
    assert out[0, 0].tolist() == [[0.0, 2.0], [8.0, 10.0]]
    assert np.isfinite(out.detach().numpy()).all()
