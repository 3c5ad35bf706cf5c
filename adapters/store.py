"""Durable adapter storage: content-addressed files on disk, versions in a SQLite index.

Layout under ``<data_dir>/adapters/``::

    blobs/<hex>/adapter_model.safetensors   the weights; <hex> is their sha256, the digest
    blobs/<hex>/adapter_config.json         the config that first came with these weights
    blobs/<hex>/configs/<config hex>.json   any other config later uploaded with the same weights
    index.sqlite3 (+ -wal, -shm)            one row per (name, version)
    tmp/                                    writes and deletions in progress

Everything a row needs lives under its weights' blob directory, so one reference rule covers
configs too: a blob is in use while a live row (or, in the registry, a pin) names its digest.

Invariants:
- Files reach their final path only by ``os.replace`` of complete, fsynced temp files (a new blob
  directory is renamed whole); a row is committed only after that, so every live row has its
  files. A blob leaves by a rename into tmp/ first: blobs/ never holds a half-deleted one.
- A name has at most one live row (``deleted_at IS NULL``), its current version; ``put`` retires
  the previous one in the same transaction. Retired rows stay as history (their files may be
  gone), so a name's version numbers never repeat, even after ``delete``.
- Anything in tmp/, and any blob or extra config no live row names, is garbage for
  ``collect_garbage``, which only the owner of the pins may call (the registry, at startup).

Crash-test hook: ``fault(point)`` runs at ``"before_rename"`` (temp files written and fsynced) and
``"before_commit"`` (files in place, row inserted, not committed). A hook raising
``SimulatedCrash`` (a BaseException) leaves disk as a killed process would; any other exception
is an ordinary failure, and ``put`` undoes its own writes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from adapters.types import AdapterVersion

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
FaultHook = Callable[[str], None]

_SCHEMA = """
PRAGMA journal_mode = WAL;
PRAGMA synchronous = FULL;
PRAGMA fullfsync = ON;  -- macOS: flush the drive cache as well
CREATE TABLE IF NOT EXISTS adapter_versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    digest TEXT NOT NULL,            -- "sha256:<hex of weights>"
    config_digest TEXT NOT NULL,     -- "sha256:<hex of config>"
    config_file TEXT NOT NULL,       -- relative to the blob directory
    rank INTEGER NOT NULL,
    target_modules TEXT NOT NULL,    -- JSON list
    created REAL NOT NULL,
    deleted_at REAL,                 -- set when superseded or deleted; NULL = live
    UNIQUE (name, version)
);
CREATE UNIQUE INDEX IF NOT EXISTS one_live_version ON adapter_versions (name)
    WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS live_digest ON adapter_versions (digest) WHERE deleted_at IS NULL;
"""
_COLUMNS = "name, version, digest, config_file, rank, target_modules, created, config_digest"
_RETIRE = "UPDATE adapter_versions SET deleted_at = ? WHERE name = ? AND deleted_at IS NULL"


class SimulatedCrash(BaseException):
    """Raised by a test's fault hook: the process "dies" here, nothing gets cleaned up."""


def _fsync_fd(fd: int) -> None:
    """Flush to stable storage; on macOS plain fsync stops at the drive cache, F_FULLFSYNC not."""
    try:
        fcntl.fcntl(fd, fcntl.F_FULLFSYNC)  # macOS only; some filesystems refuse it
    except (AttributeError, OSError):
        os.fsync(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _fsync_fd(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        _fsync_fd(f.fileno())


def _delete_now(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _hex_of(digest: str) -> str:
    """The hex part of "sha256:<hex>"; anything else is refused (it becomes a path)."""
    hex_ = digest.removeprefix("sha256:")
    if hex_ == digest or len(hex_) != 64 or not all(c in "0123456789abcdef" for c in hex_):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return hex_


class AdapterStore:
    """Adapter files and their version index under ``data_dir/adapters``; safe from any thread.

    One SQLite connection (WAL, synchronous=FULL) shared by the event loop and worker threads;
    ``self._lock`` guards it and makes each put/delete/removal atomic with respect to the others.
    """

    def __init__(self, data_dir: Path, *, fault: FaultHook | None = None) -> None:
        self.root = Path(data_dir) / "adapters"
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        for path in (self.root, self.blobs, self.tmp):
            path.mkdir(parents=True, exist_ok=True)
        self._fault: FaultHook = fault or (lambda point: None)
        self._lock = threading.RLock()
        # isolation_level=None: we issue BEGIN/COMMIT ourselves; single statements autocommit.
        self._conn = sqlite3.connect(
            self.root / "index.sqlite3", check_same_thread=False, isolation_level=None
        )
        self._conn.executescript(_SCHEMA)

    def put(
        self, name: str, config_bytes: bytes, weights_bytes: bytes, meta: Mapping[str, Any]
    ) -> AdapterVersion:
        """Store the files, then commit the next version of ``name``; meta: rank, target_modules."""
        hex_ = hashlib.sha256(weights_bytes).hexdigest()
        config_hex = hashlib.sha256(config_bytes).hexdigest()
        with self._lock:
            config_file, placed = self._place_files(hex_, config_hex, config_bytes, weights_bytes)
            try:
                return self._insert(name, hex_, config_hex, config_file, meta)
            except Exception:
                if placed is not None:  # ours alone: it did not exist before and no row names it
                    self._remove(placed)
                raise

    def _place_files(
        self, hex_: str, config_hex: str, config_bytes: bytes, weights_bytes: bytes
    ) -> tuple[str, Path | None]:
        """Put the files in place; returns the row's config_file and what this call created."""
        blob = self.blobs / hex_
        if not blob.exists():

            def write_blob(staging: Path) -> None:
                staging.mkdir()
                _write_durably(staging / WEIGHTS_FILE, weights_bytes)
                _write_durably(staging / CONFIG_FILE, config_bytes)
                _fsync_dir(staging)

            self._install(blob, write_blob)  # the whole directory appears at once
            return CONFIG_FILE, blob
        if hashlib.sha256((blob / CONFIG_FILE).read_bytes()).hexdigest() == config_hex:
            return CONFIG_FILE, None
        config_file = f"configs/{config_hex}.json"
        target = blob / config_file
        if target.exists():
            return config_file, None
        if not target.parent.exists():
            target.parent.mkdir()
            _fsync_dir(blob)
        self._install(target, lambda staging: _write_durably(staging, config_bytes))
        return config_file, target

    def _install(self, target: Path, write: Callable[[Path], None]) -> None:
        """Build ``target`` at a fresh path in tmp/ with ``write``, then rename it into place."""
        staging = self.tmp / uuid.uuid4().hex
        try:
            write(staging)
            self._fault("before_rename")
            os.replace(staging, target)
        except Exception:
            _delete_now(staging)
            raise
        _fsync_dir(target.parent)

    def _insert(
        self, name: str, hex_: str, config_hex: str, config_file: str, meta: Mapping[str, Any]
    ) -> AdapterVersion:
        now = time.time()
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            (previous,) = conn.execute(
                "SELECT COALESCE(MAX(version), 0) FROM adapter_versions WHERE name = ?", (name,)
            ).fetchone()
            conn.execute(_RETIRE, (now, name))
            row = (name, previous + 1, f"sha256:{hex_}", config_file, int(meta["rank"]))
            row += (json.dumps(list(meta["target_modules"])), now, f"sha256:{config_hex}")
            conn.execute(
                f"INSERT INTO adapter_versions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row
            )
            self._fault("before_commit")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")  # a real crash loses the open transaction the same way
            raise
        return self._version(row)

    def delete(self, name: str) -> bool:
        """Retire the name's live row; False if it had none. Files stay (the registry decides)."""
        with self._lock:
            return self._conn.execute(_RETIRE, (time.time(), name)).rowcount > 0

    def remove_blob_if_unreferenced(self, digest: str) -> bool:
        """Remove the blob of ``digest`` unless a live row names it. Pins are the caller's job."""
        blob = self.blobs / _hex_of(digest)
        with self._lock:
            if self._rows("deleted_at IS NULL AND digest = ?", (digest,)) or not blob.exists():
                return False
            self._remove(blob)
            return True

    def collect_garbage(self) -> int:
        """Empty tmp/, remove blobs and extra configs no live row names; returns how many.

        Startup only: it knows nothing of pins, so it would remove files a pinned version reads.
        """
        with self._lock:
            removed = 0
            for entry in list(self.tmp.iterdir()):
                _delete_now(entry)
                removed += 1
            live: dict[str, set[str]] = {}
            for version in self.list_latest():
                live.setdefault(version.digest, set()).add(
                    version.config_path.relative_to(version.weights_path.parent).as_posix()
                )
            for blob in list(self.blobs.iterdir()):
                wanted = live.pop(f"sha256:{blob.name}", None)
                if wanted is None:
                    self._remove(blob)
                    removed += 1
                    continue
                configs = blob / "configs"
                for extra in list(configs.iterdir()) if configs.is_dir() else []:
                    if f"configs/{extra.name}" not in wanted:
                        extra.unlink()
                        removed += 1
            for digest in live:
                logger.error("adapter index names %s but its blob is missing", digest)
            return removed

    def _remove(self, path: Path) -> None:
        """Rename into tmp/ first (atomic), then delete: a crash leaves only tmp/ garbage."""
        doomed = self.tmp / f"{uuid.uuid4().hex}.removing"
        os.replace(path, doomed)
        _fsync_dir(path.parent)
        _delete_now(doomed)

    def latest(self, name: str) -> AdapterVersion | None:
        """The live (current) version of ``name``, or None if it has none."""
        rows = self._rows("deleted_at IS NULL AND name = ?", (name,))
        return rows[0] if rows else None

    def list_latest(self) -> list[AdapterVersion]:
        """One version per live name, sorted by name."""
        return self._rows("deleted_at IS NULL")

    def versions(self, name: str) -> list[AdapterVersion]:
        """Every version of ``name`` ever committed, oldest first; retired ones may lack files."""
        return self._rows("name = ?", (name,))

    def _rows(self, where: str, args: tuple[Any, ...] = ()) -> list[AdapterVersion]:
        query = f"SELECT {_COLUMNS} FROM adapter_versions WHERE {where} ORDER BY name, version"
        with self._lock:
            rows = self._conn.execute(query, args).fetchall()
        return [self._version(row) for row in rows]

    def _version(self, row: tuple[Any, ...]) -> AdapterVersion:
        name, version, digest, config_file, rank, target_modules, created, config_digest = row
        blob = self.blobs / _hex_of(digest)
        return AdapterVersion(
            name=name,
            version=version,
            digest=digest,
            config_digest=config_digest,
            rank=rank,
            target_modules=tuple(json.loads(target_modules)),
            created=created,
            weights_path=blob / WEIGHTS_FILE,
            config_path=blob / config_file,
        )

    def close(self) -> None:
        with self._lock:
            self._conn.close()
