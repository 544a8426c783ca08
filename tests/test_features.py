"""The feature cache: computed once, memory-mapped float16, resumable, matching PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from training.backbone import load_backbone, spec_for  # noqa: E402
from training.features import FeatureCache, PixelsToGrid, extract_features  # noqa: E402

SIZE = 64  # lite0 at 64 px: a 2x2 grid, fast


@pytest.fixture()
def photos(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def test_cache_matches_pytorch_and_resumes(photos, tmp_path) -> None:
    ids = sorted(p.name for p in photos.iterdir())
    cache = extract_features(photos, ids, tmp_path / "cache", "efficientnet-lite0", SIZE)
    assert cache.grids.dtype == np.float16 and cache.grids.shape == (5, 4, 1280)
    assert cache.missing() == []

    from caption_cli.preprocess import model_pixels

    pixels = np.stack([model_pixels(Image.open(photos / i), SIZE) for i in ids])
    with torch.no_grad():
        expected = PixelsToGrid(load_backbone("efficientnet-lite0", SIZE))(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(cache.get(ids), expected, atol=2e-2, rtol=1e-2)  # float16 storage

    # an interrupted run: rows 1 and 3 never finished; only they are recomputed
    cache.done[[1, 3]] = 0
    cache.grids[[1, 3]] = 0
    cache.grids[0] = 7.0  # a finished row must not be touched again
    cache.grids.flush(), cache.done.flush()
    again = extract_features(photos, ids, tmp_path / "cache", "efficientnet-lite0", SIZE)
    assert again.missing() == []
    np.testing.assert_allclose(again.get([ids[1], ids[3]]), expected[[1, 3]], atol=2e-2, rtol=1e-2)
    assert (again.get([ids[0]]) == 7.0).all()


def test_cache_grows_with_the_data_set_and_keeps_computed_rows(photos, tmp_path) -> None:
    ids = sorted(p.name for p in photos.iterdir())
    first = extract_features(photos, ids[:3], tmp_path / "cache", "efficientnet-lite0", SIZE)
    first.grids[0] = 7.0  # marks a row computed before the data set grew
    first.grids.flush()
    del first

    grown = FeatureCache(tmp_path / "cache", spec_for("efficientnet-lite0", SIZE), ids)
    assert grown.ids == ids and grown.missing() == ids[3:]  # old rows in place, new ones appended, not done
    again = extract_features(photos, ids, tmp_path / "cache", "efficientnet-lite0", SIZE)
    assert again.missing() == [] and again.grids.shape == (5, 4, 1280)
    assert (again.get([ids[0]]) == 7.0).all()  # never recomputed
    assert np.abs(again.get(ids[3:])).sum() > 0

    # a subset of what the cache holds needs nothing new
    subset = FeatureCache(tmp_path / "cache", spec_for("efficientnet-lite0", SIZE), ids[1:2])
    assert subset.ids == ids and subset.missing() == []
