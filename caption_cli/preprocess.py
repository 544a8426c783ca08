"""The one image -> model-input transform, shared by training, export and the runtime.

Training features and runtime captions must see identically prepared pixels, so this
is the single definition. The whole photo is resized to a square (no crop): the
captions describe the whole scene, and a crop would cut off what they mention.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

RESAMPLE = Image.Resampling.BICUBIC


def model_pixels(image: Image.Image, size: int) -> np.ndarray:
    """RGB uint8 array [S, S, 3] for an already upright image."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), RESAMPLE, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)
