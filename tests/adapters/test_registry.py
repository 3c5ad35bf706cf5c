"""AdapterRegistry: hot swaps and deletes under pins, balanced counts, no leaked files or fds."""

from __future__ import annotations

import os
import random
import tempfile
import threading
from collections import Counter
from pathlib import Path

import pytest

from adapters.registry import AdapterGone, AdapterRegistry, RegistryFull
from adapters.store import AdapterStore

META = {"rank": 4, "target_modules": ["self_attn.q_proj"]}
CONFIG = b'{"r": 4}'


def files_under(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def data_dir(tmp_path: Path):
    """tmpfs where there is one: these tests are about references and leaks, not fsync speed."""
    if not os.path.isdir("/dev/shm"):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir="/dev/shm") as root:
        yield Path(root)


@pytest.fixture
def registry(data_dir: Path):
    store = AdapterStore(data_dir)
    yield AdapterRegistry(store, max_adapters=4)
    store.close()


def test_loads_from_store_after_restart(data_dir: Path) -> None:
    store = AdapterStore(data_dir)
    first = AdapterRegistry(store)
    first.register("alpha", CONFIG, b"one", META)
    v2 = first.register("alpha", CONFIG, b"two", META)
    beta = first.register("beta", CONFIG, b"three", META)
    first.register("gone", CONFIG, b"four", META)
    first.unregister("gone")
    store.close()
    store = AdapterStore(data_dir)
    second = AdapterRegistry(store)
    assert second.list() == [v2, beta] and len(second) == 2
    assert second.resolve("alpha") == v2 and second.resolve("gone") is None
    assert files_under(store.blobs) == 4  # two blobs of two files; superseded ones removed
    store.close()


def test_hot_swap_while_pinned(registry: AdapterRegistry) -> None:
    v1 = registry.register("alpha", CONFIG, b"one", META)
    assert registry.acquire("alpha") == v1
    v2 = registry.register("alpha", CONFIG, b"two", META)
    assert (v2.version, registry.resolve("alpha")) == (2, v2)
    assert registry.pinned(v1) == 1 and registry.pinned(v2) == 0
    assert v1.weights_path.read_bytes() == b"one"  # the running request keeps its files
    registry.pin(v1)  # a pinned retired version can take another pin (e.g. a forked request)
    registry.unpin(v1)
    assert v1.weights_path.exists()
    registry.unpin(v1)
    assert not v1.weights_path.exists() and not v1.weights_path.parent.exists()
    assert v2.weights_path.read_bytes() == b"two"
    with pytest.raises(AdapterGone):
        registry.pin(v1)


def test_unregister_while_pinned(registry: AdapterRegistry) -> None:
    v1 = registry.register("alpha", CONFIG, b"one", META)
    registry.pin(v1)
    assert registry.unregister("alpha") == v1
    assert registry.resolve("alpha") is None and registry.acquire("alpha") is None
    assert registry.unregister("alpha") is None
    assert v1.weights_path.read_bytes() == b"one" and v1.config_path.exists()
    registry.unpin(v1)
    assert not v1.weights_path.exists()
    assert files_under(registry.store.root / "blobs") == 0
    with pytest.raises(ValueError, match="unpin without pin"):
        registry.unpin(v1)


def test_shared_digest_survives_until_every_user_is_gone(registry: AdapterRegistry) -> None:
    a = registry.register("alpha", CONFIG, b"shared", META)
    b = registry.register("beta", CONFIG, b"shared", META)
    registry.pin(a)
    registry.unregister("alpha")
    registry.unregister("beta")  # no live row names the digest, but a is still pinned
    assert a.weights_path.exists()
    registry.unpin(a)
    assert not b.weights_path.exists()
    registry.register("alpha", CONFIG, b"shared", META)
    registry.register("alpha", CONFIG, b"shared", META)  # same weights again: blob kept
    assert registry.resolve("alpha").weights_path.read_bytes() == b"shared"


def test_registry_full(registry: AdapterRegistry) -> None:
    for i in range(4):
        registry.register(f"a{i}", CONFIG, f"w{i}".encode(), META)
    blobs = sorted(registry.store.blobs.iterdir())
    with pytest.raises(RegistryFull, match="limit is 4"):
        registry.register("a4", CONFIG, b"w4", META)
    assert sorted(registry.store.blobs.iterdir()) == blobs  # nothing written
    registry.register("a0", CONFIG, b"w0 again", META)  # a swap is not a new name
    registry.unregister("a1")
    registry.register("a4", CONFIG, b"w4", META)
    assert [v.name for v in registry.list()] == ["a0", "a2", "a3", "a4"]


def test_pins_balanced_after_many_operations(registry: AdapterRegistry) -> None:
    rng = random.Random(0)
    held: Counter = Counter()
    for step in range(400):
        name = f"a{rng.randrange(3)}"
        op = rng.random()
        if op < 0.2:
            registry.register(name, CONFIG, f"{name}-{rng.randrange(4)}".encode(), META)
        elif op < 0.3:
            registry.unregister(name)
        elif op < 0.65:
            version = registry.acquire(name)
            if version is not None:
                held[version] += 1
        elif held:
            version = rng.choice(sorted(held, key=lambda v: (v.name, v.version)))
            registry.unpin(version)
            held[version] -= 1
            if held[version] == 0:
                del held[version]
        for version, count in held.items():
            assert registry.pinned(version) == count, step
            assert version.weights_path.exists() and version.config_path.exists(), step
    for version, count in held.items():
        for _ in range(count):
            registry.unpin(version)
    assert registry._pins == {}
    live = {v.digest.removeprefix("sha256:") for v in registry.list()}
    assert {p.name for p in registry.store.blobs.iterdir()} == live


def test_pinned_files_stay_while_another_thread_swaps(registry: AdapterRegistry) -> None:
    registry.register("alpha", CONFIG, b"w-0", META)
    stop = threading.Event()
    failures: list[str] = []

    def request_loop() -> None:
        while not stop.is_set():
            version = registry.acquire("alpha")
            if version is None:
                continue
            if not version.weights_path.read_bytes().startswith(b"w-"):
                failures.append(repr(version))
            registry.unpin(version)

    reader = threading.Thread(target=request_loop)
    reader.start()
    for i in range(1, 60):
        registry.register("alpha", CONFIG, f"w-{i % 5}".encode(), META)
        if i % 7 == 0:
            registry.unregister("alpha")
    stop.set()
    reader.join()
    assert failures == [] and registry._pins == {}


def test_thousand_cycles_leave_no_files_or_fds_behind(data_dir: Path) -> None:
    store = AdapterStore(data_dir)
    registry = AdapterRegistry(store)

    def cycle(i: int) -> None:
        v1 = registry.register("alpha", CONFIG, f"one-{i}".encode(), META)
        registry.pin(v1)
        registry.register("alpha", CONFIG, f"two-{i}".encode(), META)  # hot swap
        registry.unregister("alpha")
        registry.unpin(v1)

    cycle(-1)  # warm up: WAL and shared-memory files appear on the first write
    files, fds = files_under(data_dir), open_fds()
    for i in range(1000):
        cycle(i)
    assert files_under(data_dir) <= files
    assert open_fds() <= fds
    assert registry.list() == [] and registry._pins == {}
    assert list(store.blobs.iterdir()) == [] and list(store.tmp.iterdir()) == []
    assert store.versions("alpha")[-1].version == 2002
    store.close()
