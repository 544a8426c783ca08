"""The caption database: schema, migrations and every SQL statement live here.

A plain SQLite file (read it with any SQLite tool or Datasette) written through
sqlite-utils. WAL mode and a busy timeout let two processes share one file; every
write is one `BEGIN IMMEDIATE` transaction, so a reader never sees half a batch and
a writer waits for the lock instead of failing on a lock upgrade.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sqlite_utils import Database

from caption_cli.errors import StoreError
from caption_cli.results import CaptionResult

DEFAULT_DB = Path("captions.db")
DB_ENV = "CAPTION_CLI_DB"
BUSY_TIMEOUT_S = 60.0
ATTENTION_DTYPE = np.dtype("<f2")  # float16, little-endian, row-major [grid_h, grid_w]

FileKey = tuple[str | Path, int, float]  # (path, size, mtime): what "unchanged" means
StoredCaption = tuple[str, str, int, float, float | None]  # (path, caption, size, mtime, confidence)

# ---------------------------------------------------------------------- migrations

Migration = Callable[[Database], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    """Register a schema step; steps run once each, in definition order."""
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_runs(db: Database) -> None:
    db["runs"].create(
        {
            "id": int,
            "started_at": str,
            "finished_at": str,
            "model_id": str,
            "device": str,
            "argv": str,
            "captioned": int,
            "skipped": int,
            "failed": int,
        },
        pk="id",
    )


@migration
def m002_images(db: Database) -> None:
    db["images"].create(
        {
            "id": int,
            "path": str,
            "size": int,
            "mtime": float,
            "width": int,
            "height": int,
            "status": str,
            "error": str,
            "caption": str,
            "score": float,
            "model_id": str,
            "captioned_at": str,
            "run_id": int,
        },
        pk="id",
        not_null={"path", "status"},
        foreign_keys=[("run_id", "runs", "id")],
    )
    db["images"].create_index(["path"], unique=True)


@migration
def m003_alternatives_attention(db: Database) -> None:
    db["alternatives"].create(
        {"image_id": int, "rank": int, "caption": str, "score": float},
        pk=("image_id", "rank"),
        foreign_keys=[("image_id", "images", "id")],
    )
    db["attention"].create(
        {
            "image_id": int,
            "position": int,
            "word": str,
            "grid_h": int,
            "grid_w": int,
            "weights": bytes,
        },
        pk=("image_id", "position"),
        foreign_keys=[("image_id", "images", "id")],
    )


@migration
def m004_caption_fts(db: Database) -> None:
    # Porter stemming: "dogs running" finds "a dog runs".
    db["images"].enable_fts(["caption"], create_triggers=True, tokenize="porter")


@migration
def m005_confidence(db: Database) -> None:
    # Calibrated P(acceptable) of the best caption and of each alternative; NULL for rows
    # written before calibration existed (they are treated as "unknown", never as sure).
    db["images"].add_column("confidence", float)
    db["alternatives"].add_column("confidence", float)


# --------------------------------------------------------------------------- store


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _json_list(values: Iterable) -> str:
    """One bound parameter for an IN list of any length (SQLite caps variables)."""
    return json.dumps([str(v) if isinstance(v, Path) else v for v in values])


def _enable_wal(db: Database, tries: int = 100) -> None:
    """Switch to WAL, waiting for another process that is creating the same new file:
    SQLite answers a journal-mode change with "database is locked" at once, without
    calling the busy handler, while that process holds its first write lock."""
    for attempt in range(tries):
        try:
            db.enable_wal()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == tries - 1:
                raise
            time.sleep(0.05)


class Store:
    """One caption database file; open it once per process."""

    def __init__(self, path: Path | str, busy_timeout: float = BUSY_TIMEOUT_S) -> None:
        self.path = Path(path)
        try:
            conn = sqlite3.connect(str(self.path), timeout=busy_timeout)
            self.db = Database(conn)
            self.db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            _enable_wal(self.db)
            self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the caption database: {exc}") from exc

    # -- lifecycle

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[Database]:
        """One write transaction that takes the lock up front (waits, then writes).

        A deferred transaction that reads first can fail at once with "database is
        locked" when it tries to upgrade; IMMEDIATE makes the busy timeout apply.
        sqlite-utils calls inside nest as savepoints, so it all commits together.
        """
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.rollback()
            raise
        self.db.execute("COMMIT")

    def _applied_migrations(self) -> set[str]:
        if not self.db["migrations"].exists():
            return set()
        return {row["name"] for row in self.db.query("select name from migrations")}

    def _migrate(self) -> None:
        names = [fn.__name__ for fn in MIGRATIONS]
        if set(names) <= self._applied_migrations():
            return  # the usual case: no write lock needed
        with self._write():
            # Checked again under the lock: another process may have just migrated.
            self.db["migrations"].create(
                {"name": str, "applied_at": str}, pk="name", if_not_exists=True
            )
            applied = self._applied_migrations()
            for fn in MIGRATIONS:
                if fn.__name__ not in applied:
                    fn(self.db)
                    self.db["migrations"].insert({"name": fn.__name__, "applied_at": _now()})

    def _sql_error(self, exc: sqlite3.Error) -> StoreError:
        return StoreError(f"{self.path}: {exc}")

    # -- runs

    def start_run(self, model_id: str, device: str, argv: Sequence[str]) -> int:
        """Record a run's start; its id goes on every row the run writes."""
        try:
            with self._write():
                table = self.db["runs"].insert(
                    {
                        "started_at": _now(),
                        "model_id": model_id,
                        "device": device,
                        "argv": json.dumps(list(argv)),
                    }
                )
        except sqlite3.Error as exc:
            raise self._sql_error(exc) from exc
        return int(table.last_pk)

    def finish_run(self, run_id: int, captioned: int, skipped: int, failed: int) -> None:
        try:
            with self._write():
                self.db["runs"].update(
                    run_id,
                    {
                        "finished_at": _now(),
                        "captioned": captioned,
                        "skipped": skipped,
                        "failed": failed,
                    },
                )
        except sqlite3.Error as exc:
            raise self._sql_error(exc) from exc

    # -- resume

    def already_done(self, keys: Sequence[FileKey], model_id: str) -> set[str]:
        """Paths among keys captioned OK by this model with the same size and mtime.

        One query for the whole list; size and mtime are compared in Python, where
        the float mtime round-trips exactly (no text or JSON conversion in between).
        """
        try:
            return _done_paths(self.db.conn, keys, model_id)
        except sqlite3.Error as exc:
            raise self._sql_error(exc) from exc

    def stored_captions(self, paths: Sequence[Path | str], model_id: str) -> list[StoredCaption]:
        """(path, caption, size, mtime, confidence) of those paths this model captioned OK:
        what annotate --write-metadata writes for the files it skips as already done."""
        try:
            return _stored_captions(self.db.conn, paths, model_id)
        except sqlite3.Error as exc:
            raise self._sql_error(exc) from exc

    # -- writing

    def write_batch(self, results: Sequence[CaptionResult], model_id: str, run_id: int) -> None:
        """Store one batch of outcomes in ONE transaction, replacing earlier rows.

        An image keeps its id; its alternatives and attention are deleted and
        written again, so re-captioning (--force, a new model) never duplicates them.
        """
        if not results:
            return
        # One row per path: a path twice in one upsert statement is an SQLite error.
        results = list({str(result.path): result for result in results}.values())
        now = _now()
        rows = [_image_row(result, model_id, run_id, now) for result in results]
        paths = [row["path"] for row in rows]
        try:
            with self._write():
                self.db["images"].upsert_all(rows, pk="path")
                ids = dict(
                    self.db.execute(
                        "select path, id from images where path in (select value from json_each(?))",
                        [_json_list(paths)],
                    ).fetchall()
                )
                id_list = _json_list(ids.values())
                for table in ("alternatives", "attention"):
                    self.db.execute(
                        f"delete from {table} where image_id in (select value from json_each(?))",
                        [id_list],
                    )
                alternatives, attention = [], []
                for result in results:
                    if result.caption is not None:
                        image_id = ids[str(result.path)]
                        alternatives.extend(_alternative_rows(image_id, result))
                        attention.extend(_attention_rows(image_id, result))
                self.db["alternatives"].insert_all(alternatives)
                self.db["attention"].insert_all(attention)
        except sqlite3.Error as exc:
            raise self._sql_error(exc) from exc

    def update_keys(self, keys: Sequence[FileKey]) -> None:
        """New size/mtime after a metadata write changed the file, so resume still skips it."""
        if not keys:
            return
        try:
            with self._write():
                self.db.conn.executemany(
                    "update images set size = ?, mtime = ? where path = ?",
                    [(size, mtime, str(path)) for path, size, mtime in keys],
                )
        except sqlite3.Error as exc:
            raise self._sql_error(exc) from exc

    # -- reading

    def get_image(self, path: Path | str) -> dict | None:
        rows = list(self.db.query("select * from images where path = ?", [str(path)]))
        return rows[0] if rows else None

    def iter_images(
        self, status: str | None = None, paths: Iterable[Path | str] | None = None
    ) -> Iterator[dict]:
        """Image rows ordered by path, optionally only one status or some paths."""
        where, params = [], []
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if paths is not None:
            where.append("path in (select value from json_each(?))")
            params.append(_json_list(paths))
        sql = "select * from images"
        if where:
            sql += " where " + " and ".join(where)
        yield from self.db.query(sql + " order by path", params)

    def alternatives(self, image_id: int) -> list[dict]:
        return list(
            self.db.query(
                "select rank, caption, score, confidence from alternatives where image_id = ? order by rank",
                [image_id],
            )
        )

    def attention(self, image_id: int) -> list[tuple[str, np.ndarray]]:
        """(word, weights float32 [grid_h, grid_w]) for each word of the best caption."""
        rows = self.db.execute(
            "select word, grid_h, grid_w, weights from attention"
            " where image_id = ? order by position",
            [image_id],
        ).fetchall()
        return [
            (word, np.frombuffer(blob, dtype=ATTENTION_DTYPE).reshape(h, w).astype(np.float32))
            for word, h, w, blob in rows
        ]

    def search(self, query: str, limit: int = 20) -> list[dict]:
        """Full-text search over best captions (words are stemmed; every word must match)."""
        try:
            return list(
                self.db["images"].search(
                    query,
                    columns=["id", "path", "caption", "score", "confidence", "model_id", "width", "height"],
                    limit=limit,
                    where="status = 'ok'",
                    quote=True,
                )
            )
        except sqlite3.Error as exc:
            raise self._sql_error(exc) from exc


def _done_paths(conn: sqlite3.Connection, keys: Sequence[FileKey], model_id: str) -> set[str]:
    """The resume query: one look-up for a whole list of (path, size, mtime) keys."""
    if not keys:
        return set()
    rows = conn.execute(
        "select path, size, mtime from images where status = 'ok' and model_id = ?"
        " and path in (select value from json_each(?))",
        [model_id, _json_list(path for path, _, _ in keys)],
    ).fetchall()
    stored = set(rows)
    return {str(path) for path, size, mtime in keys if (str(path), size, mtime) in stored}


def _stored_captions(conn: sqlite3.Connection, paths: Sequence[Path | str], model_id: str) -> list[tuple]:
    """(path, caption, size, mtime, confidence) of the given paths that this model captioned OK."""
    if not paths:
        return []
    return conn.execute(
        "select path, caption, size, mtime, confidence from images where status = 'ok' and model_id = ?"
        " and path in (select value from json_each(?)) order by path",
        [model_id, _json_list(paths)],
    ).fetchall()


def _image_row(result: CaptionResult, model_id: str, run_id: int, now: str) -> dict:
    caption = result.caption
    return {
        "path": str(result.path),
        "size": result.size,
        "mtime": result.mtime,
        "width": result.width,
        "height": result.height,
        "status": result.status,
        "error": result.error,
        "caption": caption.text if caption else None,
        "score": float(caption.score) if caption else None,
        "confidence": caption.confidence if caption else None,
        "model_id": model_id,
        "captioned_at": now,
        "run_id": run_id,
    }


def _alternative_rows(image_id: int, result: CaptionResult) -> list[dict]:
    caption = result.caption
    alternatives = caption.alternatives or []
    return [
        {"image_id": image_id, "rank": rank, "caption": alt.caption, "score": float(alt.score),
         "confidence": alt.confidence}
        for rank, alt in enumerate(alternatives, start=1)
    ]


def _attention_rows(image_id: int, result: CaptionResult) -> list[dict]:
    caption = result.caption
    weights = np.asarray(caption.attention, dtype=np.float32)
    if weights.ndim != 3 or weights.shape[0] < len(caption.words):
        raise StoreError(
            f"{result.path}: attention shape {weights.shape} does not cover "
            f"{len(caption.words)} words"
        )
    _, grid_h, grid_w = weights.shape
    return [
        {
            "image_id": image_id,
            "position": position,
            "word": word,
            "grid_h": grid_h,
            "grid_w": grid_w,
            "weights": np.ascontiguousarray(weights[position], dtype=ATTENTION_DTYPE).tobytes(),
        }
        for position, word in enumerate(caption.words)
    ]


class DryRunStore:
    """--dry-run: answers resume look-ups from an existing database, writes nothing."""

    def __init__(self, path: Path | str | None) -> None:
        self._reader: sqlite3.Connection | None = None
        if path is not None and Path(path).is_file():
            uri = Path(path).resolve().as_uri() + "?mode=ro"
            try:
                self._reader = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S)
                self._reader.execute("select 1 from images limit 1").fetchall()
            except sqlite3.Error:
                self._reader = None  # not a caption database (yet): nothing is done

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    def __enter__(self) -> DryRunStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start_run(self, model_id: str, device: str, argv: Sequence[str]) -> int:
        return 0

    def finish_run(self, run_id: int, captioned: int, skipped: int, failed: int) -> None:
        pass

    def already_done(self, keys: Sequence[FileKey], model_id: str) -> set[str]:
        if self._reader is None:
            return set()
        return _done_paths(self._reader, keys, model_id)

    def stored_captions(self, paths: Sequence[Path | str], model_id: str) -> list[StoredCaption]:
        return [] if self._reader is None else _stored_captions(self._reader, paths, model_id)

    def write_batch(self, results: Sequence[CaptionResult], model_id: str, run_id: int) -> None:
        pass

    def update_keys(self, keys: Sequence[FileKey]) -> None:
        pass
