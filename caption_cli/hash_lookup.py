"""The decode workers' question to the store: has this model captioned these bytes already?

Its own module, with nothing but sqlite3, because it is unpickled in every decode
worker: importing caption_cli.store there would load sqlite-utils (and, where it is
installed, pandas) into each worker for one SELECT, about half a second of start-up
per worker on a small machine.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

BUSY_TIMEOUT_S = 60.0  # the same patience as caption_cli.store's writers


class HashLookup:
    """Whether the store has an OK caption by model_id for a content hash.

    Handed (pickled) to the decode workers so they can skip decoding such a file;
    each process opens one read-only connection per database and keeps it. Any
    SQLite trouble answers False: the file is then decoded and captioned as usual.
    """

    def __init__(self, path: Path | str, model_id: str) -> None:
        self.path = str(Path(path).resolve())
        self.model_id = model_id

    def __call__(self, content_hash: str) -> bool:
        try:
            conn = _lookup_connection(self.path)
            return conn.execute(
                "select 1 from images where content_hash = ? and model_id = ? and status = 'ok' limit 1",
                [content_hash, self.model_id],
            ).fetchone() is not None
        except sqlite3.Error:
            return False

    def close(self) -> None:
        """Close this process's connection (the decode workers' end with their process)."""
        conn = _LOOKUP_CONNECTIONS.pop(self.path, None)
        if conn is not None:
            conn.close()


_LOOKUP_CONNECTIONS: dict[str, sqlite3.Connection] = {}


def _lookup_connection(path: str) -> sqlite3.Connection:
    conn = _LOOKUP_CONNECTIONS.get(path)
    if conn is None:
        conn = sqlite3.connect(Path(path).as_uri() + "?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S,
                               check_same_thread=False)
        _LOOKUP_CONNECTIONS[path] = conn
    return conn
