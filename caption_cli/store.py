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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from caption_cli.sqlite_utils_lean import Database

from caption_cli.errors import StoreError
from caption_cli.hash_lookup import BUSY_TIMEOUT_S, HashLookup
from caption_cli.results import Alternative, Caption, CaptionResult

DEFAULT_DB = Path("captions.db")
DB_ENV = "CAPTION_CLI_DB"
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


@migration
def m006_content_reuse(db: Database) -> None:
    # content_hash: a moved, renamed or copied photo reuses the caption of its bytes.
    # missing_since: set when a run over the file's root no longer finds the file;
    # `caption-cli prune` removes such rows (nothing on disk is ever deleted).
    db["images"].add_column("content_hash", str)
    db["images"].add_column("missing_since", str)
    db["images"].create_index(["content_hash", "model_id"])
    db["runs"].add_column("reused", int)


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


def _connect_read_only(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """A read-only connection, whatever the folder allows.

    mode=ro still needs the WAL's shared-memory file, which it cannot create in a
    read-only folder (or when something else sits at that name): then immutable=1,
    which reads the main file as it is. That is safe because a folder nobody can
    create files in has no writer either (a writer needs the same files), and the
    last writer's checkpoint on close left every committed row in the main file.
    """
    if not path.is_file():
        raise sqlite3.OperationalError("no such file")
    uri = path.resolve().as_uri()
    error: sqlite3.Error | None = None
    for query in ("?mode=ro", "?immutable=1"):
        try:
            conn = sqlite3.connect(uri + query, uri=True, timeout=busy_timeout)
            conn.execute("select count(*) from sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError as exc:
            error = exc
    assert error is not None
    raise error


class Store:
    """One caption database file; open it once per process.

    read_only=True is for commands that only read (search, show, report): no
    migration, no WAL switch, and a database in a read-only folder, or one whose
    WAL/shared-memory file cannot be created, still opens (see _connect_read_only).
    Use Store.for_reading, which first upgrades an older database where it can.
    """

    def __init__(self, path: Path | str, busy_timeout: float = BUSY_TIMEOUT_S, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        try:
            if read_only:
                self.db = Database(_connect_read_only(self.path, busy_timeout))
                return
            conn = sqlite3.connect(str(self.path), timeout=busy_timeout)
            self.db = Database(conn)
            self.db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            _enable_wal(self.db)
            self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the caption database: {exc}") from exc

    @classmethod
    def for_reading(cls, path: Path | str) -> Store:
        """A read-only store with the current schema; an older database is upgraded
        first when it is writable, and refused with the reason when it is not."""
        store = cls(path, read_only=True)
        try:
            pending = {fn.__name__ for fn in MIGRATIONS} - store._applied_migrations()
        except sqlite3.Error as exc:
            store.close()
            raise StoreError(f"{path}: not a caption database: {exc}") from exc
        if not pending:
            return store
        store.close()
        try:
            cls(path).close()  # migrates
        except StoreError as exc:
            raise StoreError(
                f"{path}: written by an older caption-cli and it cannot be upgraded here ({exc}); "
                "open it once with a command that can write to it (e.g. caption-cli annotate) where it is writable"
            ) from exc
        return cls(path, read_only=True)

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

    def finish_run(self, run_id: int, captioned: int, skipped: int, failed: int, reused: int = 0) -> None:
        try:
            with self._write():
                self.db["runs"].update(
                    run_id,
                    {
                        "finished_at": _now(),
                        "captioned": captioned,
                        "skipped": skipped,
                        "failed": failed,
                        "reused": reused,
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

    # -- content reuse

    def hash_lookup(self, model_id: str) -> HashLookup:
        """A picklable "is there a caption for these bytes?" for the decode workers."""
        return HashLookup(self.path, model_id)

    def reusable_caption(self, content_hash: str, model_id: str) -> ReusedCaption | None:
        """The stored caption, alternatives and attention of an OK row with these bytes."""
        try:
            return _reusable_caption(self.db.conn, content_hash, model_id)
        except sqlite3.Error as exc:
            raise self._sql_error(exc) from exc

    def unhashed(self, paths: Sequence[Path | str]) -> list[str]:
        """Those of paths whose rows have no content hash (written before content reuse)."""
        if not paths:
            return []
        rows = self.db.execute(
            "select path from images where content_hash is null and path in (select value from json_each(?))",
            [_json_list(paths)],
        ).fetchall()
        return [path for (path,) in rows]

    def set_hashes(self, hashes: Sequence[tuple[str, str]]) -> None:
        """Fill in content hashes of (path, hash) for rows that have none."""
        if not hashes:
            return
        try:
            with self._write():
                self.db.conn.executemany(
                    "update images set content_hash = ? where path = ? and content_hash is null",
                    [(digest, str(path)) for path, digest in hashes],
                )
        except sqlite3.Error as exc:
            raise self._sql_error(exc) from exc

    # -- missing files and pruning

    def paths_under(self, folder: Path | str, chunk: int = 1000) -> Iterator[list[tuple[int, str, str | None]]]:
        """(id, path, missing_since) of the rows inside folder, in chunks (memory stays flat)."""
        return _paths_under(self.db.conn, folder, chunk)

    def set_missing(self, missing: Sequence[int], found_again: Sequence[int]) -> None:
        """Mark rows whose files are gone (keeping the first time), unmark rows whose files are back."""
        if not missing and not found_again:
            return
        try:
            with self._write():
                self.db.execute(
                    "update images set missing_since = ? where missing_since is null"
                    " and id in (select value from json_each(?))",
                    [_now(), _json_list(missing)],
                )
                self.db.execute(
                    "update images set missing_since = null where id in (select value from json_each(?))",
                    [_json_list(found_again)],
                )
        except sqlite3.Error as exc:
            raise self._sql_error(exc) from exc

    def missing_rows(self) -> list[dict]:
        """Rows marked missing, oldest mark first: what prune would remove."""
        return list(self.db.query(
            "select id, path, missing_since from images where missing_since is not null order by missing_since, path"
        ))

    def delete_rows(self, ids: Sequence[int]) -> None:
        """Forget these rows, with their alternatives and attention, in one transaction."""
        if not ids:
            return
        id_list = _json_list(ids)
        try:
            with self._write():
                for table in ("alternatives", "attention"):
                    self.db.execute(
                        f"delete from {table} where image_id in (select value from json_each(?))", [id_list]
                    )
                self.db.execute("delete from images where id in (select value from json_each(?))", [id_list])
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


def _paths_under(conn: sqlite3.Connection, folder: Path | str, chunk: int) -> Iterator[list[tuple]]:
    """Rows whose path lies inside folder, as a range over the unique path index: paths
    starting with "folder/" sort between "folder/" and "folder0" ("0" follows "/")."""
    prefix = str(folder).rstrip("/") + "/"
    last_path = prefix
    while True:
        rows = conn.execute(
            "select id, path, missing_since from images where path > ? and path < ? order by path limit ?",
            [last_path, prefix[:-1] + "0", chunk],
        ).fetchall()
        if not rows:
            return
        yield rows
        last_path = rows[-1][1]


@dataclass(frozen=True)
class ReusedCaption:
    """What another row with the same bytes says: copied, not computed again."""

    caption: Caption
    width: int | None
    height: int | None


def _reusable_caption(conn: sqlite3.Connection, content_hash: str, model_id: str) -> ReusedCaption | None:
    """The newest OK row of this model with these bytes, present files before missing ones."""
    row = conn.execute(
        "select id, caption, score, confidence, width, height from images"
        " where content_hash = ? and model_id = ? and status = 'ok'"
        " order by missing_since is not null, captioned_at desc limit 1",
        [content_hash, model_id],
    ).fetchone()
    if row is None:
        return None
    image_id, text, score, confidence, width, height = row
    alternatives = [
        Alternative(caption, alt_score, alt_confidence)
        for caption, alt_score, alt_confidence in conn.execute(
            "select caption, score, confidence from alternatives where image_id = ? order by rank", [image_id]
        )
    ]
    attention = conn.execute(
        "select word, grid_h, grid_w, weights from attention where image_id = ? order by position", [image_id]
    ).fetchall()
    words = [word for word, _, _, _ in attention]
    if attention:
        _, grid_h, grid_w, _ = attention[0]
        weights = np.stack([np.frombuffer(blob, dtype=ATTENTION_DTYPE).reshape(h, w)
                            for _, h, w, blob in attention]).astype(np.float32)
    else:  # an empty caption has no words; keep the [0, h, w] shape the store expects
        weights = np.zeros((0, 1, 1), dtype=np.float32)
    caption = Caption(text=text, score=score, words=words, attention=weights,
                      alternatives=alternatives, confidence=confidence)
    return ReusedCaption(caption, width, height)


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
        "content_hash": result.content_hash,
        "missing_since": None,  # written now, so it exists
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
        self._path: Path | None = None
        if path is not None and Path(path).is_file():
            uri = Path(path).resolve().as_uri() + "?mode=ro"
            try:
                self._reader = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S)
                self._reader.execute("select 1 from images limit 1").fetchall()
            except sqlite3.Error:
                self._reader = None  # not a caption database (yet): nothing is done
            else:
                columns = {row[1] for row in self._reader.execute("pragma table_info(images)")}
                if "content_hash" in columns:  # written since content reuse exists
                    self._path = Path(path)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    def __enter__(self) -> DryRunStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start_run(self, model_id: str, device: str, argv: Sequence[str]) -> int:
        return 0

    def finish_run(self, run_id: int, captioned: int, skipped: int, failed: int, reused: int = 0) -> None:
        pass

    def hash_lookup(self, model_id: str) -> HashLookup | None:
        return None if self._path is None else HashLookup(self._path, model_id)

    def reusable_caption(self, content_hash: str, model_id: str) -> ReusedCaption | None:
        return None if self._path is None else _reusable_caption(self._reader, content_hash, model_id)

    def paths_under(self, folder: Path | str, chunk: int = 1000) -> Iterator[list[tuple]]:
        return iter(()) if self._path is None else _paths_under(self._reader, folder, chunk)

    def set_missing(self, missing: Sequence[int], found_again: Sequence[int]) -> None:
        pass  # a dry run counts what it would mark

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
