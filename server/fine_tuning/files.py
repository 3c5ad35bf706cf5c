"""Uploaded files (``POST /v1/files``): their bytes under ``<data_dir>/fine_tuning/files/<id>``,
their records in the fine-tuning database.

A file reaches its final path only by renaming a complete, fsynced temp file, and its row is
committed after that, so every row has its bytes. Deleting removes the row first, then the
bytes; a crash between leaves an orphan file that the next start removes.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.fine_tuning.db import Database, page

PURPOSES = ("fine-tune",)


@dataclass(frozen=True, slots=True)
class StoredFile:
    id: str
    filename: str
    purpose: str
    bytes: int
    examples: int
    created_at: int

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


class FileStore:
    def __init__(self, db: Database, folder: Path) -> None:
        self.db, self.folder = db, folder
        self.folder.mkdir(parents=True, exist_ok=True)
        known = {row["id"] for row in db.query("SELECT id FROM files")}
        for path in self.folder.iterdir():
            if path.name not in known:  # a temp file or a deletion a crash interrupted
                path.unlink(missing_ok=True)

    def put(self, filename: str, purpose: str, data: bytes, examples: int) -> StoredFile:
        file = StoredFile(
            id=f"file-{uuid.uuid4().hex[:24]}",
            filename=filename,
            purpose=purpose,
            bytes=len(data),
            examples=examples,
            created_at=int(time.time()),
        )
        tmp = self.folder / f".{file.id}.tmp"
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path(file.id))
        self.db.write(
            (
                "INSERT INTO files (id, filename, purpose, bytes, examples, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (file.id, filename, purpose, file.bytes, examples, file.created_at),
            )
        )
        return file

    def get(self, file_id: str) -> StoredFile | None:
        rows = self.db.query(f"SELECT {_COLUMNS} FROM files WHERE id = ?", (file_id,))
        return _file(rows[0]) if rows else None

    def list(
        self, purpose: str | None, limit: int, after: str | None, newest_first: bool
    ) -> tuple[list[StoredFile], bool]:
        sql, args = f"SELECT {_COLUMNS} FROM files WHERE 1", []
        if purpose is not None:
            sql, args = sql + " AND purpose = ?", [*args, purpose]
        if after is not None:
            op = "<" if newest_first else ">"
            sql += f" AND seq {op} (SELECT seq FROM files WHERE id = ?)"
            args.append(after)
        sql += f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?"
        rows, more = page(self.db.query(sql, [*args, limit + 1]), limit)
        return [_file(r) for r in rows], more

    def read(self, file_id: str) -> bytes:
        return self.path(file_id).read_bytes()

    def path(self, file_id: str) -> Path:
        return self.folder / file_id

    def delete(self, file_id: str) -> bool:
        if not self.db.write(("DELETE FROM files WHERE id = ?", (file_id,))):
            return False
        self.path(file_id).unlink(missing_ok=True)
        return True


_COLUMNS = "id, filename, purpose, bytes, examples, created_at"


def _file(row: Any) -> StoredFile:
    return StoredFile(**{k: row[k] for k in row.keys()})  # noqa: SIM118 (sqlite3.Row)
