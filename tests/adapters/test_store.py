"""AdapterStore: versions, content addressing, restarts, and what a crash at each step leaves."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from adapters.store import AdapterStore, SimulatedCrash

META = {"rank": 8, "target_modules": ["self_attn.q_proj", "self_attn.v_proj"]}
CONFIG = b'{"r": 8, "lora_alpha": 16}'


def crash_at(point: str, exc: BaseException | None = None):
    """A fault hook that fails at ``point`` (by default as a simulated crash)."""

    def fault(at: str) -> None:
        if at == point:
            raise exc if exc is not None else SimulatedCrash(at)

    return fault


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def blob_dirs(store: AdapterStore) -> list[str]:
    return sorted(p.name for p in store.blobs.iterdir())


@pytest.fixture
def data_dir(tmp_path: Path):
    """tmpfs where there is one (fast fsync); test_restart_sees_the_same_list uses a real disk."""
    if not os.path.isdir("/dev/shm"):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir="/dev/shm") as root:
        yield Path(root)


@pytest.fixture
def store(data_dir: Path):
    store = AdapterStore(data_dir)
    yield store
    store.close()


def test_put_latest_list_versions(store: AdapterStore) -> None:
    v = store.put("alpha", CONFIG, b"weights-a", META)
    assert (v.name, v.version) == ("alpha", 1)
    assert v.digest == "sha256:" + hashlib.sha256(b"weights-a").hexdigest()
    assert (v.rank, v.target_modules) == (8, ("self_attn.q_proj", "self_attn.v_proj"))
    assert v.weights_path.read_bytes() == b"weights-a"
    assert v.config_path.read_bytes() == CONFIG
    assert v.weights_path.parent == store.blobs / v.digest.removeprefix("sha256:")
    assert store.latest("alpha") == v
    assert store.latest("nope") is None
    store.put("beta", CONFIG, b"weights-b", META)
    assert [x.name for x in store.list_latest()] == ["alpha", "beta"]
    assert store.versions("alpha") == [v]
    assert files_under(store.tmp) == []


def test_same_name_gets_next_version(store: AdapterStore) -> None:
    v1 = store.put("alpha", CONFIG, b"one", META)
    v2 = store.put("alpha", CONFIG, b"two", META)
    assert v2.version == 2 and v2.digest != v1.digest
    assert store.latest("alpha") == v2
    assert store.list_latest() == [v2]
    assert [x.version for x in store.versions("alpha")] == [1, 2]
    assert v1.weights_path.exists()  # retiring a row removes no files: the registry decides


def test_delete_then_put_continues_numbering(store: AdapterStore) -> None:
    store.put("alpha", CONFIG, b"one", META)
    store.put("alpha", CONFIG, b"two", META)
    assert store.delete("alpha") is True
    assert store.delete("alpha") is False
    assert store.latest("alpha") is None and store.list_latest() == []
    v3 = store.put("alpha", CONFIG, b"one", META)
    assert v3.version == 3
    assert [x.version for x in store.versions("alpha")] == [1, 2, 3]


def test_restart_sees_the_same_list(tmp_path: Path) -> None:
    first = AdapterStore(tmp_path)
    first.put("alpha", CONFIG, b"one", META)
    first.put("alpha", CONFIG, b"two", META)
    first.put("beta", CONFIG, b"three", META)
    first.put("gone", CONFIG, b"four", META)
    first.delete("gone")
    before = first.list_latest()
    first.close()
    second = AdapterStore(tmp_path)
    assert second.list_latest() == before
    assert second.put("gone", CONFIG, b"five", META).version == 2
    second.close()


def test_same_weights_two_names_share_one_blob(store: AdapterStore) -> None:
    a = store.put("alpha", CONFIG, b"shared", META)
    b = store.put("beta", CONFIG, b"shared", META)
    assert a.digest == b.digest and a.weights_path == b.weights_path
    assert blob_dirs(store) == [a.digest.removeprefix("sha256:")]
    assert len(store.list_latest()) == 2


def test_same_weights_other_config_stored_beside_by_its_digest(store: AdapterStore) -> None:
    other = b'{"r": 8, "lora_alpha": 32}'
    a = store.put("alpha", CONFIG, b"shared", META)
    b = store.put("beta", other, b"shared", META)
    c = store.put("gamma", other, b"shared", META)
    assert a.config_path.name == "adapter_config.json"
    assert (
        b.config_path
        == c.config_path
        == a.weights_path.parent / "configs" / (hashlib.sha256(other).hexdigest() + ".json")
    )
    assert (a.config_path.read_bytes(), b.config_path.read_bytes()) == (CONFIG, other)
    assert len(blob_dirs(store)) == 1 and files_under(store.tmp) == []


def test_blob_removed_only_when_no_live_row_names_it(store: AdapterStore) -> None:
    a = store.put("alpha", CONFIG, b"shared", META)
    store.put("beta", CONFIG, b"shared", META)
    store.delete("alpha")
    assert store.remove_blob_if_unreferenced(a.digest) is False  # beta still live
    assert a.weights_path.exists()
    store.delete("beta")
    assert store.remove_blob_if_unreferenced(a.digest) is True
    assert blob_dirs(store) == [] and files_under(store.tmp) == []
    assert store.remove_blob_if_unreferenced(a.digest) is False
    with pytest.raises(ValueError):
        store.remove_blob_if_unreferenced("sha256:../../etc")


def test_crash_before_rename_leaves_old_state(data_dir: Path) -> None:
    store = AdapterStore(data_dir, fault=crash_at("before_rename"))
    with pytest.raises(SimulatedCrash):
        store.put("alpha", CONFIG, b"one", META)
    assert store.list_latest() == [] and blob_dirs(store) == []
    assert files_under(store.tmp)  # the "dead process" left its temp files
    assert store.collect_garbage() == 1
    assert list(store.tmp.iterdir()) == []
    store.close()


def test_crash_before_rename_of_extra_config(data_dir: Path) -> None:
    AdapterStore(data_dir).put("alpha", CONFIG, b"shared", META)
    store = AdapterStore(data_dir, fault=crash_at("before_rename"))
    before = store.list_latest()
    with pytest.raises(SimulatedCrash):
        store.put("beta", b"{}", b"shared", META)
    assert store.list_latest() == before
    assert not (before[0].weights_path.parent / "configs").exists() or not any(
        (before[0].weights_path.parent / "configs").iterdir()
    )
    store.collect_garbage()
    assert list(store.tmp.iterdir()) == []
    assert before[0].weights_path.read_bytes() == b"shared"
    store.close()


def test_crash_before_commit_leaves_orphan_blob_for_gc(data_dir: Path) -> None:
    store = AdapterStore(data_dir)
    v1 = store.put("alpha", CONFIG, b"one", META)
    store.close()
    store = AdapterStore(data_dir, fault=crash_at("before_commit"))
    with pytest.raises(SimulatedCrash):
        store.put("alpha", CONFIG, b"two", META)
    assert store.list_latest() == [v1]  # the open transaction died with the "process"
    assert len(blob_dirs(store)) == 2  # the orphan is in place, named by no row
    store.close()
    restarted = AdapterStore(data_dir)
    assert restarted.list_latest() == [v1]
    assert restarted.collect_garbage() == 1
    assert blob_dirs(restarted) == [v1.digest.removeprefix("sha256:")]
    assert restarted.put("alpha", CONFIG, b"two", META).version == 2
    restarted.close()


def test_ordinary_failure_undoes_its_own_writes(data_dir: Path) -> None:
    for point in ("before_rename", "before_commit"):
        store = AdapterStore(data_dir, fault=crash_at(point, OSError("disk full")))
        with pytest.raises(OSError):
            store.put("alpha", CONFIG, b"one", META)
        assert store.list_latest() == [] and blob_dirs(store) == []
        assert list(store.tmp.iterdir()) == []
        store.close()


def test_half_written_temp_file_removed_at_startup(data_dir: Path) -> None:
    store = AdapterStore(data_dir)
    v = store.put("alpha", CONFIG, b"one", META)
    store.close()
    (data_dir / "adapters" / "tmp" / "deadbeef").mkdir()
    (data_dir / "adapters" / "tmp" / "deadbeef" / "adapter_model.safetensors").write_bytes(b"on")
    (data_dir / "adapters" / "tmp" / "half.json").write_bytes(b'{"r"')
    restarted = AdapterStore(data_dir)
    assert restarted.collect_garbage() == 2
    assert list(restarted.tmp.iterdir()) == []
    assert restarted.list_latest() == [v] and v.weights_path.read_bytes() == b"one"
    restarted.close()


def test_garbage_collection_keeps_live_files(store: AdapterStore) -> None:
    a = store.put("alpha", CONFIG, b"one", META)
    b = store.put("beta", b"{}", b"one", META)
    store.put("beta", CONFIG, b"one", META)  # beta's extra config is now named by no live row
    assert store.collect_garbage() == 1
    assert not b.config_path.exists()
    assert a.weights_path.exists() and a.config_path.exists()


def test_sqlite_is_wal_with_full_sync(store: AdapterStore, data_dir: Path) -> None:
    conn = sqlite3.connect(data_dir / "adapters" / "index.sqlite3")
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()
    assert store._conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    store.put("alpha", CONFIG, b"one", META)
    with pytest.raises(sqlite3.IntegrityError):  # UNIQUE(name, version)
        store._conn.execute(
            "INSERT INTO adapter_versions (name, version, digest, config_digest, config_file, "
            "rank, target_modules, created) VALUES ('alpha', 1, 'x', 'y', 'z', 1, '[]', 0)"
        )


@pytest.mark.parametrize("point", ["before_rename", "before_commit"])
def test_killed_process_leaves_old_state(data_dir: Path, point: str) -> None:
    """A real death (os._exit: no rollback, no cleanup), not an exception."""
    store = AdapterStore(data_dir)
    v1 = store.put("alpha", CONFIG, b"one", META)
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from adapters.store import AdapterStore\n"
        "def die(at):\n"
        f"    if at == {point!r}: os._exit(17)\n"
        "s = AdapterStore(Path(sys.argv[1]), fault=die)\n"
        "s.put('alpha', b'{}', b'two', {'rank': 1, 'target_modules': []})\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", script, str(data_dir)], cwd=root, check=False)
    assert done.returncode == 17
    assert store.list_latest() == [v1] and store.versions("alpha") == [v1]
    assert store.collect_garbage() == 1  # the temp dir, or the orphan blob
    assert list(store.tmp.iterdir()) == [] and [p.name for p in store.blobs.iterdir()] == [
        v1.digest.removeprefix("sha256:")
    ]
    assert store.put("alpha", CONFIG, b"two", META).version == 2
    store.close()
