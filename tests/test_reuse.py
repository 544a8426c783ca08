"""Captions reused by content, one row per real file, missing files and prune."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from caption_cli.pipeline import annotate
from caption_cli.prune import mark_missing, outermost, prune
from caption_cli.store import Store
from tests.test_pipeline import FakeCaptioner, make_photos, options, stored


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "captions.db") as opened:
        yield opened


def rows(store: Store) -> dict[str, dict]:
    return {row["path"]: row for row in store.iter_images()}


def details(store: Store, path: Path) -> tuple:
    """Everything a reused row must share with its source: caption, alternatives, attention."""
    row = store.get_image(path)
    attention = [(word, weights.tolist()) for word, weights in store.attention(row["id"])]
    return (row["caption"], row["score"], row["confidence"], row["width"], row["height"],
            store.alternatives(row["id"]), attention)


def test_a_copied_folder_reuses_every_caption_without_running_the_model(tmp_path: Path, store: Store):
    make_photos(tmp_path / "photos", 6, bad=(3,))
    annotate([tmp_path / "photos"], FakeCaptioner(), store, options())
    shutil.copytree(tmp_path / "photos", tmp_path / "copy")
    captioner = FakeCaptioner()

    summary = annotate([tmp_path / "copy"], captioner, store, options(workers=2))

    assert captioner.batches == []  # no model run at all
    assert (summary.captioned, summary.reused, summary.failed) == (0, 5, 1)  # the bad file is still bad
    for original in (tmp_path / "photos").rglob("*.png"):
        copy = tmp_path / "copy" / original.relative_to(tmp_path / "photos")
        if store.get_image(original)["status"] == "ok":
            assert details(store, copy) == details(store, original)
            assert store.get_image(copy)["content_hash"] == store.get_image(original)["content_hash"]
    run = store.db["runs"].get(store.get_image(tmp_path / "copy" / "a" / "p001.png")["run_id"])
    assert (run["captioned"], run["reused"], run["failed"]) == (0, 5, 1)


def test_a_moved_file_reuses_its_caption_and_its_old_row_is_marked_then_pruned(tmp_path: Path, store: Store):
    make_photos(tmp_path / "lib", 4)
    annotate([tmp_path / "lib"], FakeCaptioner(), store, options())
    old, new = tmp_path / "lib" / "a" / "p001.png", tmp_path / "lib" / "moved" / "renamed.png"
    before = details(store, old)
    new.parent.mkdir()
    old.rename(new)
    captioner = FakeCaptioner()

    summary = annotate([tmp_path / "lib"], captioner, store, options())

    assert captioner.batches == []
    assert (summary.reused, summary.skipped, summary.missing) == (1, 3, 1)
    assert details(store, new) == before
    assert rows(store)[str(old)]["missing_since"] is not None
    assert rows(store)[str(new)]["missing_since"] is None

    would = prune(store, dry_run=True)
    assert would.removed == [str(old)] and str(old) in rows(store)  # a dry run deletes nothing
    done = prune(store)
    assert done.removed == [str(old)]
    assert set(rows(store)) == {str(p) for p in (tmp_path / "lib").rglob("*.png")}
    assert store.db.execute("select count(*) from alternatives where image_id not in (select id from images)"
                            ).fetchone()[0] == 0


def test_a_deleted_file_that_comes_back_before_prune_keeps_its_row(tmp_path: Path, store: Store):
    make_photos(tmp_path / "lib", 3)
    annotate([tmp_path / "lib"], FakeCaptioner(), store, options())
    gone = tmp_path / "lib" / "b" / "p000.png"
    saved = gone.read_bytes()
    gone.unlink()
    assert annotate([tmp_path / "lib"], FakeCaptioner(), store, options()).missing == 1
    gone.write_bytes(saved)

    result = prune(store)

    assert result.removed == [] and result.back == [str(gone)]
    assert rows(store)[str(gone)]["missing_since"] is None


def test_only_the_folders_walked_are_checked_and_unreadable_is_not_gone(tmp_path: Path, store: Store):
    make_photos(tmp_path / "one", 2)
    make_photos(tmp_path / "two", 2)
    annotate([tmp_path / "one", tmp_path / "two"], FakeCaptioner(), store, options())
    shutil.rmtree(tmp_path / "two")
    (tmp_path / "one" / "a" / "p001.png").unlink()
    # A run over "one" only marks what is gone inside "one"; "two" is not looked at.
    summary = annotate([tmp_path / "one"], FakeCaptioner(), store, options())
    assert summary.missing == 1
    marked = {path for path, row in rows(store).items() if row["missing_since"]}
    assert marked == {str(tmp_path / "one" / "a" / "p001.png")}

def test_a_file_that_cannot_be_looked_at_is_not_gone(tmp_path: Path, store: Store, monkeypatch):
    # A folder that cannot be searched, a mount that is away: not evidence of deletion.
    make_photos(tmp_path / "lib", 2)
    annotate([tmp_path / "lib"], FakeCaptioner(), store, options())
    real_lstat = os.lstat

    def lstat(path, *args, **kwargs):
        if "/b/" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr("caption_cli.prune.os.lstat", lstat)
    (tmp_path / "lib" / "a" / "p001.png").unlink()
    assert mark_missing(store, [tmp_path / "lib"]) == 1  # a/p001 only; b/p000 unknown, kept


def test_outermost_drops_nested_folders():
    assert outermost([Path("/a/b"), Path("/a"), Path("/c"), Path("/a/b/c")]) == [Path("/a"), Path("/c")]


def test_a_symlinked_root_reaches_the_same_rows(tmp_path: Path, store: Store):
    expected = make_photos(tmp_path / "real", 4)
    os.symlink(tmp_path / "real", tmp_path / "alias")
    annotate([tmp_path / "real"], FakeCaptioner(), store, options())
    captioner = FakeCaptioner()

    summary = annotate([tmp_path / "alias"], captioner, store, options())

    assert (summary.skipped, summary.captioned, summary.reused, summary.missing) == (4, 0, 0, 0)
    assert stored(store) == expected  # no second set of rows under alias/


def test_copies_in_one_batch_are_captioned_once(tmp_path: Path, store: Store):
    make_photos(tmp_path / "photos", 2)
    for copy in ("x", "y"):
        shutil.copytree(tmp_path / "photos", tmp_path / copy)
    captioner = FakeCaptioner()

    summary = annotate([tmp_path], captioner, store, options(batch_size=16))

    assert sum(captioner.batches) == 2  # two distinct photos, six files
    assert (summary.captioned, summary.reused) == (2, 4)
    assert len({row["caption"] for row in rows(store).values()}) == 2


def test_force_and_no_reuse_run_the_model_again(tmp_path: Path, store: Store):
    make_photos(tmp_path / "photos", 3)
    annotate([tmp_path / "photos"], FakeCaptioner(), store, options())
    shutil.copytree(tmp_path / "photos", tmp_path / "copy")
    for opts in (options(reuse=False), options(force=True)):
        captioner = FakeCaptioner()
        summary = annotate([tmp_path / "copy"], captioner, store, opts)
        assert sum(captioner.batches) == 3 and summary.reused == 0


def test_another_model_does_not_reuse(tmp_path: Path, store: Store):
    make_photos(tmp_path / "photos", 2)
    annotate([tmp_path / "photos"], FakeCaptioner(), store, options())
    shutil.copytree(tmp_path / "photos", tmp_path / "copy")
    captioner = FakeCaptioner(model_id="other@111111111111")
    summary = annotate([tmp_path / "copy"], captioner, store, options())
    assert (summary.captioned, summary.reused) == (2, 0)


def test_a_source_row_deleted_between_lookup_and_copy_is_captioned(tmp_path: Path, store: Store, monkeypatch):
    make_photos(tmp_path / "photos", 2)
    annotate([tmp_path / "photos"], FakeCaptioner(), store, options())
    shutil.copytree(tmp_path / "photos", tmp_path / "copy")
    monkeypatch.setattr(Store, "reusable_caption", lambda self, content_hash, model_id: None)
    captioner = FakeCaptioner()
    summary = annotate([tmp_path / "copy"], captioner, store, options())
    assert (summary.captioned, summary.reused) == (2, 0)
    assert all(row["status"] == "ok" for row in rows(store).values())


def test_the_hash_is_of_the_bytes(tmp_path: Path, store: Store):
    make_photos(tmp_path, 2)
    annotate([tmp_path], FakeCaptioner(), store, options())
    import xxhash

    for path, row in rows(store).items():
        assert row["content_hash"] == xxhash.xxh3_128_hexdigest(Path(path).read_bytes())
    assert np.unique([row["content_hash"] for row in rows(store).values()]).size == 2


def test_rows_from_before_content_reuse_get_their_hash_when_skipped(tmp_path: Path, store: Store):
    make_photos(tmp_path / "photos", 3)
    annotate([tmp_path / "photos"], FakeCaptioner(), store, options())
    store.db.execute("update images set content_hash = null")  # as an older caption-cli wrote them
    store.db.conn.commit()
    annotate([tmp_path / "photos"], FakeCaptioner(), store, options())  # skips all, fills the hashes
    assert all(row["content_hash"] for row in rows(store).values())
    shutil.copytree(tmp_path / "photos", tmp_path / "copy")
    captioner = FakeCaptioner()
    summary = annotate([tmp_path / "copy"], captioner, store, options())
    assert (summary.reused, captioner.batches) == (3, [])
