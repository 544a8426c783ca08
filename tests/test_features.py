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


def test_a_name_that_now_names_another_file_is_computed_again(photos, tmp_path, capsys) -> None:
    """Two data sets in one --cache, or a re-gathered folder: same id, other photo. The
    grid of the old file must not be reused for the new one."""
    ids = sorted(p.name for p in photos.iterdir())
    extract_features(photos, ids, tmp_path / "cache", "efficientnet-lite0", SIZE)
    other = tmp_path / "other"
    other.mkdir()
    for name in ids:
        (other / name).write_bytes((photos / name).read_bytes())  # same bytes, new mtimes
    rng = np.random.default_rng(9)
    Image.fromarray(rng.integers(0, 255, (90, 70, 3), dtype=np.uint8)).save(other / ids[2])  # a different photo
    capsys.readouterr()
    again = extract_features(other, ids, tmp_path / "cache", "efficientnet-lite0", SIZE)
    assert "5 cached grid(s) were computed from other files" in capsys.readouterr().err
    fresh = extract_features(other, ids, tmp_path / "fresh", "efficientnet-lite0", SIZE)
    np.testing.assert_array_equal(again.get(ids), fresh.get(ids))
    unchanged = extract_features(other, ids, tmp_path / "cache", "efficientnet-lite0", SIZE)
    assert "cached grid" not in capsys.readouterr().err  # stamps now match: nothing recomputed
    np.testing.assert_array_equal(unchanged.get(ids), fresh.get(ids))


def test_rows_another_run_left_unfinished_are_not_this_runs_work(photos, tmp_path) -> None:
    ids = sorted(p.name for p in photos.iterdir())
    spec = spec_for("efficientnet-lite0", SIZE)
    FeatureCache(tmp_path / "cache", spec, ["elsewhere/a.jpg", "elsewhere/b.jpg"])  # never extracted
    cache = extract_features(photos, ids, tmp_path / "cache", "efficientnet-lite0", SIZE)  # must not look for them
    assert cache.missing() == [] and cache.ids[:2] == ["elsewhere/a.jpg", "elsewhere/b.jpg"]
    assert FeatureCache(tmp_path / "cache", spec, ["elsewhere/a.jpg"]).missing() == ["elsewhere/a.jpg"]


def test_a_cache_from_before_stamps_keeps_its_grids(photos, tmp_path) -> None:
    ids = sorted(p.name for p in photos.iterdir())
    cache = extract_features(photos, ids, tmp_path / "cache", "efficientnet-lite0", SIZE)
    cache.grids[0] = 7.0
    cache.grids.flush()
    del cache
    (tmp_path / "cache" / "efficientnet-lite0-64" / "stamps.i64").unlink()  # written by an older version
    again = extract_features(photos, ids, tmp_path / "cache", "efficientnet-lite0", SIZE)
    assert (again.get([ids[0]]) == 7.0).all()  # trusted once, not recomputed
    assert again.stamps.all()  # and stamped from now on


def test_two_runs_growing_one_cache_at_once_get_their_own_rows(tmp_path) -> None:
    """Each opener reads, grows and rewrites the index under the lock: no id is lost and no
    two ids share a row."""
    import threading

    spec = spec_for("efficientnet-lite0", SIZE)
    FeatureCache(tmp_path / "cache", spec, ["base.jpg"])
    start = threading.Barrier(8)
    opened: list[FeatureCache] = []

    def open_with(name: str) -> None:
        start.wait()
        opened.append(FeatureCache(tmp_path / "cache", spec, ["base.jpg", name]))

    threads = [threading.Thread(target=open_with, args=(f"run{i}.jpg",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = FeatureCache(tmp_path / "cache", spec, [])
    assert sorted(final.ids) == sorted(["base.jpg", *(f"run{i}.jpg" for i in range(8))])
    for cache in opened:
        name = cache.wanted[1]
        assert final.row[name] == cache.row[name]


def test_cached_grids_serve_after_the_photos_are_gone(photos, tmp_path) -> None:
    """Features are cached so that training no longer needs the images: a run over a
    complete cache whose files were moved away still gets its grids."""
    ids = sorted(p.name for p in photos.iterdir())
    first = extract_features(photos, ids, tmp_path / "cache", "efficientnet-lite0", SIZE)
    expected = first.get(ids)
    for path in photos.iterdir():
        path.unlink()
    again = extract_features(photos, ids, tmp_path / "cache", "efficientnet-lite0", SIZE)
    assert again.missing() == []
    np.testing.assert_array_equal(again.get(ids), expected)
