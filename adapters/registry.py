"""The live view of adapters: which version each name points at, and which versions are in use.

Loaded from the store at startup, so adapters survive a restart. Uploading an existing name is a
hot swap: requests that already pinned v1 keep reading v1's files; resolves after the swap get v2.

Threads:
- The event loop calls ``resolve``/``acquire``/``pin``/``unpin``/``pinned``/``list``: memory only,
  except that the last ``unpin`` of a retired version removes its blob (a couple of unlinks).
- ``register``/``unregister`` write to disk (fsync); call them from a worker thread
  (``asyncio.to_thread``). They are safe from any thread and serialized among themselves.
- The engine thread never calls in here: it only reads ``weights_path``/``config_path`` of the
  versions it was handed pinned.

Invariants (under ``self._lock``):
- ``_current[name]`` is the store's live row for ``name``.
- A version is *alive* while it is current or pinned (count > 0); ``pin`` accepts only alive
  versions, so a version that was released can never be pinned again.
- The files of an alive version are never removed: a blob goes only when no alive version here
  and no live row in the store names its digest.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from adapters.store import AdapterStore
from adapters.types import AdapterVersion


class RegistryFull(Exception):
    """A new name was registered while ``max_adapters`` names are live."""


class AdapterGone(LookupError):
    """``pin`` of a version that is neither current nor pinned: its files may already be gone."""


@dataclass(slots=True)
class _Pinned:
    version: AdapterVersion
    count: int


def _key(version: AdapterVersion) -> tuple[str, int]:
    return version.name, version.version


class AdapterRegistry:
    """Name → current version, plus reference counts per (name, version)."""

    def __init__(self, store: AdapterStore, *, max_adapters: int = 64) -> None:
        if max_adapters < 1:
            raise ValueError(f"max_adapters must be at least 1, got {max_adapters}")
        self.store = store
        self.max_adapters = max_adapters
        self._lock = threading.Lock()  # the maps below
        self._write_lock = threading.Lock()  # serializes register/unregister, disk I/O included
        store.collect_garbage()  # safe: nothing is pinned yet
        # Names already on disk all load, even past a lowered max_adapters; new names are refused.
        self._current: dict[str, AdapterVersion] = {v.name: v for v in store.list_latest()}
        self._pins: dict[tuple[str, int], _Pinned] = {}

    # -- the request path (event loop) ----------------------------------------------------------

    def resolve(self, name: str) -> AdapterVersion | None:
        """The current version of ``name``, or None if it is not registered."""
        with self._lock:
            return self._current.get(name)

    def acquire(self, name: str) -> AdapterVersion | None:
        """``resolve`` and ``pin`` in one step, so no swap can fall between them."""
        with self._lock:
            version = self._current.get(name)
            if version is not None:
                self._pin_locked(version)
            return version

    def pin(self, version: AdapterVersion) -> None:
        """Count one more user of ``version``; its files stay until the matching ``unpin``."""
        with self._lock:
            if _key(version) not in self._pins and not self._is_current(version):
                raise AdapterGone(f"adapter {version.name!r} v{version.version} was released")
            self._pin_locked(version)

    def unpin(self, version: AdapterVersion) -> None:
        """Drop one user; the last one out of a retired version releases its blob."""
        with self._lock:
            entry = self._pins.get(_key(version))
            if entry is None:
                raise ValueError(f"unpin without pin: {version.name!r} v{version.version}")
            entry.count -= 1
            if entry.count > 0:
                return
            del self._pins[_key(version)]
            retired = not self._is_current(version)
        if retired:
            self._release(version.digest)

    def pinned(self, version: AdapterVersion) -> int:
        with self._lock:
            entry = self._pins.get(_key(version))
            return 0 if entry is None else entry.count

    def list(self) -> list[AdapterVersion]:
        """The current version of every registered name, sorted by name."""
        with self._lock:
            return sorted(self._current.values(), key=lambda v: v.name)

    def __len__(self) -> int:
        with self._lock:
            return len(self._current)

    # -- uploads and deletes (worker thread) ----------------------------------------------------

    def register(
        self, name: str, config_bytes: bytes, weights_bytes: bytes, meta: Mapping[str, Any]
    ) -> AdapterVersion:
        """Store a new version of ``name`` and point the name at it (a hot swap if it existed).

        Raises ``RegistryFull`` for a new name when ``max_adapters`` names are live; nothing is
        written then.
        """
        with self._write_lock:
            with self._lock:
                if name not in self._current and len(self._current) >= self.max_adapters:
                    raise RegistryFull(
                        f"{len(self._current)} adapters are loaded, the limit is "
                        f"{self.max_adapters}; delete one before uploading {name!r}"
                    )
            version = self.store.put(name, config_bytes, weights_bytes, meta)
            with self._lock:
                old = self._current.get(name)
                self._current[name] = version
                old_free = old is not None and _key(old) not in self._pins
            if old_free:
                self._release(old.digest)
            return version

    def unregister(self, name: str) -> AdapterVersion | None:
        """Unpoint ``name``; its files stay until its last pin goes. None if it was unknown."""
        with self._write_lock:
            with self._lock:
                if name not in self._current:
                    return None
            self.store.delete(name)
            with self._lock:
                old = self._current.pop(name)
                old_free = _key(old) not in self._pins
            if old_free:
                self._release(old.digest)
            return old

    # -- internals ------------------------------------------------------------------------------

    def _is_current(self, version: AdapterVersion) -> bool:
        current = self._current.get(version.name)
        return current is not None and current.version == version.version

    def _pin_locked(self, version: AdapterVersion) -> None:
        entry = self._pins.get(_key(version))
        if entry is None:
            self._pins[_key(version)] = _Pinned(version, 1)
        else:
            entry.count += 1

    def _release(self, digest: str) -> bool:
        """Remove the blob of ``digest`` unless an alive version still names it.

        The check runs under our lock and the removal under the store's: a version that appears
        in between is current, so it has a live row, and the store keeps (or rewrites) its blob.
        """
        with self._lock:
            if any(v.digest == digest for v in self._current.values()):
                return False
            if any(p.version.digest == digest for p in self._pins.values()):
                return False
        return self.store.remove_blob_if_unreferenced(digest)
