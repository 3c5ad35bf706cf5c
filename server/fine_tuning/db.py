"""One SQLite database of fine-tuning's records, ``<data_dir>/fine_tuning/index.sqlite3``.

One connection behind a lock (any thread may call); every ``write`` is one committed
transaction, so a crash leaves each record either before or after a change, never between.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SCHEMA = """
PRAGMA journal_mode = WAL;
PRAGMA synchronous = FULL;
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    examples INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL            -- the job's record as JSON (server.fine_tuning.jobs.Job)
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_of_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    folder TEXT NOT NULL,         -- relative to <data_dir>/fine_tuning
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_of_job ON checkpoints (job_id, seq);
"""

Statement = tuple[str, Sequence[Any]]


class Database:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.executescript(SCHEMA)

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def write(self, *statements: Statement) -> int:
        """Run ``statements`` in one transaction; the rows the last one changed."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                changed = 0
                for sql, args in statements:
                    changed = self._db.execute(sql, args).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return changed

    def close(self) -> None:
        with self._lock:
            self._db.close()


def page(rows: list[Any], limit: int) -> tuple[list[Any], bool]:
    """The first ``limit`` of ``rows`` (queried with ``limit + 1``) and whether more follow."""
    return rows[:limit], len(rows) > limit
