"""caption_cli.store: schema, migrations, batch writes, resume look-ups, search, concurrency."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from caption_cli import store as store_module
from caption_cli.errors import StoreError
from caption_cli.results import Alternative, Caption, CaptionResult
from caption_cli.store import DryRunStore, Store

MODEL = "tiny@0123456789ab"


def ok_result(path: str, text: str, size: int = 100, mtime: float = 1.5, grid=(2, 3)) -> CaptionResult:
    words = text.split()
    attention = np.random.default_rng(len(text)).random((len(words), *grid), dtype=np.float32)
    caption = Caption(
        text=text,
        score=-0.25,
        words=words,
        attention=attention,
        alternatives=[Alternative(text, -0.25, 0.8), Alternative(text + " again", -0.75, 0.3)],
        confidence=0.8,
    )
    return CaptionResult(Path(path), size, mtime, "ok", 640, 480, caption=caption)


def error_result(path: str, message: str = "image file is truncated") -> CaptionResult:
    return CaptionResult(Path(path), 10, 2.5, "error", error=message)


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "captions.db") as opened:
        yield opened


def count(store: Store, table: str) -> int:
    return store.db.execute(f"select count(*) from {table}").fetchone()[0]


# -------------------------------------------------------------------------- schema


def test_new_database_has_schema_wal_and_busy_timeout(store: Store):
    assert set(store.db.table_names()) >= {"images", "alternatives", "attention", "runs", "migrations", "images_fts"}
    assert [r["name"] for r in store.db.query("select name from migrations order by rowid")] == [
        fn.__name__ for fn in store_module.MIGRATIONS
    ]
    assert store.db.journal_mode == "wal"
    assert store.db.execute("pragma busy_timeout").fetchone()[0] == 60000
    assert {"images_ai", "images_ad", "images_au"} <= {t.name for t in store.db.triggers}


def test_migrations_run_once_and_only_the_missing_ones(tmp_path: Path, monkeypatch):
    path = tmp_path / "old.db"
    all_steps = list(store_module.MIGRATIONS)
    monkeypatch.setattr(store_module, "MIGRATIONS", all_steps[:2])
    Store(path).close()  # a database from an older version: runs and images only
    monkeypatch.setattr(store_module, "MIGRATIONS", all_steps)
    with Store(path) as upgraded:
        names = [r["name"] for r in upgraded.db.query("select name from migrations order by rowid")]
        assert names == [fn.__name__ for fn in all_steps]
        assert upgraded.db["attention"].exists()
    with Store(path) as again:  # nothing left to do, nothing applied twice
        assert count(again, "migrations") == len(all_steps)


def test_not_a_database_is_a_store_error(tmp_path: Path):
    path = tmp_path / "notes.db"
    path.write_text("this is a text file, not SQLite\n" * 100)
    with pytest.raises(StoreError, match=r"notes\.db: cannot open the caption database"):
        Store(path)


# --------------------------------------------------------------------------- write


def test_write_batch_stores_rows_alternatives_and_attention(store: Store):
    run_id = store.start_run(MODEL, "cpu", ["caption-cli", "annotate", "x"])
    result = ok_result("/photos/a.jpg", "a dog on the beach")
    store.write_batch([result, error_result("/photos/b.jpg")], MODEL, run_id)

    row = store.get_image("/photos/a.jpg")
    assert {k: row[k] for k in ("path", "size", "mtime", "width", "height", "status", "error")} == {
        "path": "/photos/a.jpg", "size": 100, "mtime": 1.5, "width": 640, "height": 480,
        "status": "ok", "error": None,
    }
    assert (row["caption"], row["score"], row["confidence"], row["model_id"], row["run_id"]) == (
        "a dog on the beach", -0.25, 0.8, MODEL, run_id,
    )
    assert store.alternatives(row["id"]) == [
        {"rank": 1, "caption": "a dog on the beach", "score": -0.25, "confidence": 0.8},
        {"rank": 2, "caption": "a dog on the beach again", "score": -0.75, "confidence": 0.3},
    ]
    attention = store.attention(row["id"])
    assert [word for word, _ in attention] == ["a", "dog", "on", "the", "beach"]
    weights = np.stack([grid for _, grid in attention])
    assert weights.dtype == np.float32 and weights.shape == (5, 2, 3)
    np.testing.assert_allclose(weights, result.caption.attention, atol=1e-3)  # float16 blobs
    blob, grid_h, grid_w = store.db.execute(
        "select weights, grid_h, grid_w from attention where position = 1"
    ).fetchone()
    assert (len(blob), grid_h, grid_w) == (2 * 2 * 3, 2, 3)

    bad = store.get_image("/photos/b.jpg")
    assert (bad["status"], bad["error"], bad["caption"]) == ("error", "image file is truncated", None)
    assert store.alternatives(bad["id"]) == [] and store.attention(bad["id"]) == []


def test_rewriting_replaces_without_duplicates(store: Store):
    store.write_batch([error_result("/p/a.jpg")], MODEL, 1)
    first_id = store.get_image("/p/a.jpg")["id"]
    store.write_batch([ok_result("/p/a.jpg", "a cat on a sofa")], MODEL, 1)
    store.write_batch([ok_result("/p/a.jpg", "two dogs running", size=200)], MODEL, 2)

    row = store.get_image("/p/a.jpg")
    assert row["id"] == first_id  # same image, same id
    assert (row["caption"], row["size"], row["error"], row["run_id"]) == ("two dogs running", 200, None, 2)
    assert count(store, "images") == 1
    assert count(store, "alternatives") == 2
    assert count(store, "attention") == 3
    assert store.search("sofa") == []  # the full-text index followed the update
    assert [r["path"] for r in store.search("dog")] == ["/p/a.jpg"]


def test_same_path_twice_in_one_batch_keeps_the_last(store: Store):
    store.write_batch([ok_result("/p/a.jpg", "a cat"), ok_result("/p/a.jpg", "a dog")], MODEL, 1)
    assert [r["caption"] for r in store.iter_images()] == ["a dog"]
    assert count(store, "alternatives") == 2


def test_write_batch_is_one_transaction(store: Store):
    statements = []
    store.db.conn.set_trace_callback(statements.append)
    store.write_batch([ok_result(f"/p/{i}.jpg", "a red bus") for i in range(250)], MODEL, 1)
    store.db.conn.set_trace_callback(None)
    assert [s for s in statements if s.split()[0].upper() in ("BEGIN", "COMMIT")] == [
        "BEGIN IMMEDIATE",
        "COMMIT",
    ]
    assert count(store, "images") == 250 and count(store, "attention") == 750


def test_failed_batch_leaves_nothing_behind(store: Store):
    store.write_batch([ok_result("/p/keep.jpg", "a boat")], MODEL, 1)
    broken = ok_result("/p/z.jpg", "three words here")
    broken.caption.attention = np.zeros((1, 2, 3), np.float32)  # fewer rows than words
    with pytest.raises(StoreError, match="does not cover 3 words"):
        store.write_batch([ok_result("/p/new.jpg", "a train"), broken], MODEL, 1)
    assert [r["path"] for r in store.iter_images()] == ["/p/keep.jpg"]
    assert count(store, "alternatives") == 2
    store.write_batch([ok_result("/p/new.jpg", "a train")], MODEL, 1)  # still usable


# -------------------------------------------------------------------------- resume


def test_already_done_matches_path_size_mtime_model_and_status(store: Store):
    store.write_batch(
        [ok_result("/p/a.jpg", "a dog", size=100, mtime=1.25), error_result("/p/bad.jpg")], MODEL, 1
    )
    keys = [
        (Path("/p/a.jpg"), 100, 1.25),  # same file: done
        ("/p/bad.jpg", 10, 2.5),  # failed last time: try again
        ("/p/new.jpg", 5, 1.0),  # never seen
    ]
    assert store.already_done(keys, MODEL) == {"/p/a.jpg"}
    assert store.already_done([("/p/a.jpg", 101, 1.25)], MODEL) == set()  # size changed
    assert store.already_done([("/p/a.jpg", 100, 1.2500001)], MODEL) == set()  # touched
    assert store.already_done([("/p/a.jpg", 100, 1.25)], "other@ffffffffffff") == set()
    assert store.already_done([], MODEL) == set()


def test_already_done_takes_thousands_of_keys_in_one_query(store: Store):
    store.write_batch([ok_result(f"/p/{i:05d}.jpg", "a cat", mtime=i + 0.1) for i in range(0, 5000, 2)], MODEL, 1)
    keys = [(f"/p/{i:05d}.jpg", 100, i + 0.1) for i in range(5000)]
    statements = []
    store.db.conn.set_trace_callback(statements.append)
    done = store.already_done(keys, MODEL)
    store.db.conn.set_trace_callback(None)
    assert len(statements) == 1
    assert done == {f"/p/{i:05d}.jpg" for i in range(0, 5000, 2)}


def test_update_keys(store: Store):
    store.write_batch([ok_result("/p/a.jpg", "a dog", size=100, mtime=1.0)], MODEL, 1)
    store.update_keys([("/p/a.jpg", 180, 9.5)])
    assert store.already_done([("/p/a.jpg", 180, 9.5)], MODEL) == {"/p/a.jpg"}


# ---------------------------------------------------------------- runs and reading


def test_runs_are_recorded(store: Store):
    run_id = store.start_run(MODEL, "cuda", ["caption-cli", "annotate", "."])
    store.finish_run(run_id, captioned=3, skipped=2, failed=1)
    row = store.db["runs"].get(run_id)
    assert (row["model_id"], row["device"], row["argv"]) == (MODEL, "cuda", '["caption-cli", "annotate", "."]')
    assert (row["captioned"], row["skipped"], row["failed"]) == (3, 2, 1)
    assert row["started_at"] <= row["finished_at"]


def test_iter_images_filters(store: Store):
    store.write_batch(
        [ok_result("/p/b.jpg", "b"), error_result("/p/a.jpg"), ok_result("/p/c.jpg", "c")], MODEL, 1
    )
    assert [r["path"] for r in store.iter_images()] == ["/p/a.jpg", "/p/b.jpg", "/p/c.jpg"]
    assert [r["path"] for r in store.iter_images(status="ok")] == ["/p/b.jpg", "/p/c.jpg"]
    assert [r["path"] for r in store.iter_images(paths=[Path("/p/c.jpg"), "/p/a.jpg"])] == ["/p/a.jpg", "/p/c.jpg"]
    assert store.get_image("/p/zzz.jpg") is None


def test_search_stems_ranks_and_limits(store: Store):
    store.write_batch(
        [
            ok_result("/p/1.jpg", "a dog runs on the beach"),
            ok_result("/p/2.jpg", "two dogs play in the snow"),
            ok_result("/p/3.jpg", "a man rides a bike"),
            error_result("/p/4.jpg"),
        ],
        MODEL,
        1,
    )
    assert [r["path"] for r in store.search("dog on a beach")] == ["/p/1.jpg"]
    assert sorted(r["path"] for r in store.search("dogs")) == ["/p/1.jpg", "/p/2.jpg"]
    assert len(store.search("dog", limit=1)) == 1
    hit = store.search("bike")[0]
    assert (hit["caption"], hit["score"], hit["model_id"]) == ("a man rides a bike", -0.25, MODEL)
    assert store.search('"unbalanced AND (quote-') == []  # user text is quoted, never FTS syntax


# ------------------------------------------------------------------------- dry run


def test_dry_run_store_reads_but_never_writes(tmp_path: Path):
    missing = tmp_path / "none.db"
    with DryRunStore(missing) as dry:
        assert dry.start_run(MODEL, "cpu", []) == 0
        dry.write_batch([ok_result("/p/a.jpg", "a dog")], MODEL, 0)
        assert dry.already_done([("/p/a.jpg", 100, 1.5)], MODEL) == set()
    assert not missing.exists()

    path = tmp_path / "real.db"
    with Store(path) as real:
        real.write_batch([ok_result("/p/a.jpg", "a dog")], MODEL, 1)
    with DryRunStore(path) as dry:
        assert dry.already_done([("/p/a.jpg", 100, 1.5), ("/p/b.jpg", 1, 1.0)], MODEL) == {"/p/a.jpg"}
        dry.write_batch([ok_result("/p/b.jpg", "a cat")], MODEL, 0)
    with Store(path) as real:
        assert [r["path"] for r in real.iter_images()] == ["/p/a.jpg"]


# --------------------------------------------------------------------- concurrency


def _writer(db: str, worker: int, batches: int) -> None:
    """One process hammering the shared database with overlapping batches."""
    with Store(db) as store:
        run_id = store.start_run(MODEL, "cpu", [str(worker)])
        for batch in range(batches):
            paths = [f"/shared/{(batch * 3 + i) % 20:02d}.jpg" for i in range(5)]
            store.already_done([(p, 100, 1.5) for p in paths], MODEL)
            store.write_batch([ok_result(p, f"worker {worker} batch {batch}") for p in paths], MODEL, run_id)
        store.finish_run(run_id, batches * 5, 0, 0)


def test_two_processes_share_one_database(tmp_path: Path):
    db = str(tmp_path / "shared.db")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(db, n, 40)) for n in range(2)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
    assert [p.exitcode for p in workers] == [0, 0]  # no "database is locked"

    with Store(db) as store:
        assert count(store, "images") == 20
        assert count(store, "alternatives") == 40
        assert count(store, "attention") == 20 * 4  # "worker N batch M": 4 words each
        assert store.db.execute("pragma integrity_check").fetchone()[0] == "ok"
        finished = store.db.execute("select count(*) from runs where finished_at is not null").fetchone()
        assert finished[0] == 2
        for row in store.iter_images():  # each image's rows come from one write
            alts = store.alternatives(row["id"])
            assert [a["caption"] for a in alts] == [row["caption"], row["caption"] + " again"]
            assert " ".join(word for word, _ in store.attention(row["id"])) == row["caption"]


def test_start_up_imports_stay_lean(tmp_path: Path):
    """The store never drags pandas in (sqlite-utils would, at 0.4 s of every command's start),
    and a decode worker that unpickles the hash lookup loads neither sqlite-utils nor pandas."""
    pytest.importorskip("pandas")  # without pandas installed there is nothing to keep out
    import pickle
    import subprocess
    import sys

    with Store(tmp_path / "c.db") as db:
        lookup = pickle.dumps(db.hash_lookup("m1"))
    store_script = "import sys, caption_cli.store as s; s.Store; print('pandas' in sys.modules)"
    worker_script = (
        "import pickle, sys; lookup = pickle.loads(sys.stdin.buffer.read()); "
        "print(lookup('0' * 32), 'sqlite_utils' in sys.modules, 'pandas' in sys.modules)"
    )

    def run(script: str, data: bytes | None = None) -> list[str]:
        return subprocess.run([sys.executable, "-c", script], input=data, capture_output=True,
                              check=True).stdout.decode().split()

    assert run(store_script) == ["False"]
    assert run(worker_script, lookup) == ["False", "False", "False"]
    # once something has loaded pandas, sqlite-utils is given it as usual
    assert run("import pandas, sys, caption_cli.store; print(sys.modules['sqlite_utils.db'].pd is pandas)") \
        == ["True"]
