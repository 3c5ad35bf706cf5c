"""Stored responses (``store: true``) in ``<data_dir>/responses.sqlite3``: each response's body,
and the conversation it ends (its input and output as chat messages), so that
``previous_response_id`` continues it, after a restart too.

One connection behind a lock (any thread may call); each write is one committed transaction.
At most ``max_stored`` responses are kept: a new one evicts the oldest beyond that.
The responses still running live only in memory (``running``), for ``cancel``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL,
    conversation TEXT NOT NULL
)
"""


class ResponsesStore:
    def __init__(self, data_dir: Path, max_stored: int) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "responses.sqlite3"
        self.max_stored = max_stored
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(SCHEMA)
        self.running: dict[str, Any] = {}  # id -> the run, whose ``cancel`` event stops it

    def put(self, id_: str, body: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        """Keep a response (replacing one of the same id), then evict the oldest beyond the
        limit."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM responses WHERE id = ?", (id_,))
                self._db.execute(
                    "INSERT INTO responses (id, body, conversation) VALUES (?, ?, ?)",
                    (id_, json.dumps(body), json.dumps(conversation)),
                )
                self._db.execute(
                    "DELETE FROM responses WHERE seq NOT IN "
                    "(SELECT seq FROM responses ORDER BY seq DESC LIMIT ?)",
                    (self.max_stored,),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def get(self, id_: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """A stored response's body and conversation, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT body, conversation FROM responses WHERE id = ?", (id_,)
            ).fetchone()
        return None if row is None else (json.loads(row[0]), json.loads(row[1]))

    def delete(self, id_: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM responses WHERE id = ?", (id_,)).rowcount > 0

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
