"""Finding a BLAS to preload under MLX: folder layouts as each source lays them out, the
environment of the re-execution, and reading which file a symbol lies in."""

from __future__ import annotations

import ctypes
import os
import re
import sys
import tomllib
from pathlib import Path

import pytest

from engine import cpu_blas
from engine.cpu_blas import BlasCandidate, find_blas, mapped_file, plan_preload

ROOT = Path(__file__).resolve().parents[2]


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


@pytest.fixture
def layout(tmp_path):
    """An empty venv (site-packages, prefix) and an empty system library folder."""
    site = tmp_path / "venv/lib/python3.11/site-packages"
    prefix = tmp_path / "venv"
    system = tmp_path / "usr/lib/x86_64-linux-gnu"
    for d in (site, system):
        d.mkdir(parents=True)
    return site, prefix, system


def find(layout, environ=None):
    site, prefix, system = layout
    return find_blas(environ or {}, [site], prefix, [system, system.parent.parent / "lib64"])


def test_nothing_installed_finds_nothing(layout):
    assert find(layout) is None


def test_the_wheel_borrows_mlx_gfortran_when_the_system_has_none(layout):
    site, _, _ = layout
    lib = touch(site / "ngsolve_openblas/libopenblasp-r0.3.33.so")
    gfortran = touch(site / "mlx_cpu.libs/libgfortran-f7379c93.so.5.0.0")
    touch(site / "mlx_cpu.libs/libquadmath-a962d038.so.0.0.0")
    found = find(layout)
    assert found == BlasCandidate(
        "ngsolve-openblas wheel",
        lib,
        "OPENBLAS_NUM_THREADS",
        library_dirs=(site / "mlx_cpu.libs",),
        aliases=(("libgfortran.so.5", gfortran),),
    )


def test_the_wheel_uses_the_system_gfortran_where_there_is_one(layout):
    site, _, system = layout
    lib = touch(site / "ngsolve_openblas/libopenblasp-r0.3.33.so")
    touch(site / "mlx_cpu.libs/libgfortran-f7379c93.so.5.0.0")
    touch(system / "libgfortran.so.5")
    assert find(layout) == BlasCandidate("ngsolve-openblas wheel", lib, "OPENBLAS_NUM_THREADS")


def test_the_wheel_without_any_gfortran_is_passed_over(layout):
    site, _, system = layout
    touch(site / "ngsolve_openblas/libopenblasp-r0.3.33.so")
    assert find(layout) is None
    lib = touch(system / "openblas-pthread/libopenblas.so.0")
    assert find(layout).path == lib


def test_mkl_wheel_lives_in_the_prefix_lib_folder(layout):
    _, prefix, _ = layout
    lib = touch(prefix / "lib/libmkl_rt.so.3")
    touch(prefix / "lib/libmkl_core.so.3")
    assert find(layout) == BlasCandidate(
        "mkl wheel", lib, "MKL_NUM_THREADS", library_dirs=(prefix / "lib",)
    )


def test_system_openblas_debian_and_fedora_layouts(layout):
    _, _, system = layout
    fedora = system.parent.parent / "lib64"
    plain = touch(fedora / "libopenblas.so.0")
    assert find(layout).path == plain and find(layout).source == "system"
    pthreads = touch(fedora / "libopenblasp.so.0")  # Fedora's threaded build beats its serial one
    assert find(layout).path == pthreads
    debian = touch(system / "openblas-pthread/libopenblas.so.0")  # first folder searched first
    assert find(layout).path == debian


def test_order_is_wheel_then_mkl_then_system(layout):
    site, prefix, system = layout
    touch(system / "openblas-pthread/libopenblas.so.0")
    assert find(layout).source == "system"
    touch(prefix / "lib/libmkl_rt.so.2")
    assert find(layout).source == "mkl wheel"
    touch(site / "ngsolve_openblas/libopenblasp-r0.3.33.so")
    touch(site / "mlx_cpu.libs/libgfortran-f7379c93.so.5.0.0")
    assert find(layout).source == "ngsolve-openblas wheel"


def test_candlewick_blas_names_a_library_or_turns_preloading_off(layout, tmp_path):
    site, _, _ = layout
    touch(site / "ngsolve_openblas/libopenblasp-r0.3.33.so")
    touch(site / "mlx_cpu.libs/libgfortran-f7379c93.so.5.0.0")
    for off in ("off", "OFF", "none", "bundled"):
        assert find(layout, {"CANDLEWICK_BLAS": off}) is None
    mine = touch(tmp_path / "opt/libmkl_rt.so.2")
    found = find(layout, {"CANDLEWICK_BLAS": str(mine)})
    assert found == BlasCandidate("CANDLEWICK_BLAS", mine, "MKL_NUM_THREADS", (mine.parent,))
    assert find(layout, {"CANDLEWICK_BLAS": "  "}).source == "ngsolve-openblas wheel"


def test_the_preload_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    lib = touch(tmp_path / "site/ngsolve_openblas/libopenblasp.so")
    gfortran = touch(tmp_path / "site/mlx_cpu.libs/libgfortran-x.so.5.0.0")
    candidate = BlasCandidate(
        "ngsolve-openblas wheel",
        lib,
        "OPENBLAS_NUM_THREADS",
        library_dirs=(gfortran.parent,),
        aliases=(("libgfortran.so.5", gfortran),),
    )
    user = {"LD_PRELOAD": "/opt/libjemalloc.so", "LD_LIBRARY_PATH": "/opt/lib", "HOME": "/h"}
    env = plan_preload(user, candidate, preloaded=False)
    if not sys.platform.startswith("linux"):
        assert env is None
        return
    assert env["LD_PRELOAD"] == f"{lib} /opt/libjemalloc.so"  # ours first, the user's kept
    links, mlx_libs, theirs = env["LD_LIBRARY_PATH"].split(":")
    assert (Path(links) / "libgfortran.so.5").resolve() == gfortran.resolve()
    assert (mlx_libs, theirs) == (str(gfortran.parent), "/opt/lib")
    assert env["OPENBLAS_NUM_THREADS"] == str(max(1, cpu_blas.usable_cores() - 1))
    assert env[cpu_blas.MARKER] == "ngsolve-openblas wheel" and env["HOME"] == "/h"
    assert user == {
        "LD_PRELOAD": "/opt/libjemalloc.so",
        "LD_LIBRARY_PATH": "/opt/lib",
        "HOME": "/h",
    }
    assert env[cpu_blas.DEFAULT_THREADS] == "1"  # the count is ours to change
    # The user's thread count stands, and is theirs.
    theirs = plan_preload({"OPENBLAS_NUM_THREADS": "1"}, candidate, False)
    assert theirs["OPENBLAS_NUM_THREADS"] == "1" and cpu_blas.DEFAULT_THREADS not in theirs


def test_no_preload_when_done_already_or_nothing_to_load(tmp_path):
    lib = touch(tmp_path / "libopenblas.so.0")
    candidate = BlasCandidate("system", lib, "OPENBLAS_NUM_THREADS")
    assert plan_preload({cpu_blas.MARKER: "system"}, candidate, preloaded=False) is None
    assert plan_preload({}, candidate, preloaded=True) is None  # the user's LD_PRELOAD has one
    assert plan_preload({}, None, preloaded=False) is None
    gone = BlasCandidate("CANDLEWICK_BLAS", tmp_path / "missing.so", "OPENBLAS_NUM_THREADS")
    assert plan_preload({}, gone, preloaded=False) is None


def test_alias_links_follow_a_moved_target(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    old, new = touch(tmp_path / "a/libgfortran-1.so.5"), touch(tmp_path / "b/libgfortran-2.so.5")
    folder = cpu_blas.alias_dir((("libgfortran.so.5", old),))
    assert folder == tmp_path / "cache/candlewick/blas-libs"
    assert cpu_blas.alias_dir((("libgfortran.so.5", new),)) == folder
    assert (folder / "libgfortran.so.5").resolve() == new.resolve()
    assert sorted(p.name for p in folder.iterdir()) == ["libgfortran.so.5"]


MAPS = """\
55d0c0000000-55d0c0001000 r--p 00000000 08:01 131 /usr/bin/python3.11
7f0000000000-7f0000021000 rw-p 00000000 00:00 0
7f1000000000-7f1000400000 r-xp 00010000 08:01 42 /opt/lib/libopenblasp-r0.3.33.so
7f1000400000-7f1000500000 r--p 00410000 08:01 42 /opt/lib/libopenblasp-r0.3.33.so
"""


def test_mapped_file_reads_proc_maps_text():
    assert mapped_file(0x7F1000000000, MAPS) == "/opt/lib/libopenblasp-r0.3.33.so"
    assert mapped_file(0x7F10004FFFFF, MAPS) == "/opt/lib/libopenblasp-r0.3.33.so"
    assert mapped_file(0x7F0000000010, MAPS) is None  # anonymous
    assert mapped_file(0x1000, MAPS) is None
    assert cpu_blas.mapped_files(MAPS).count("/opt/lib/libopenblasp-r0.3.33.so") == 2


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="no /proc (not Linux)")
def test_mapped_file_finds_libc_of_this_process():
    libc = ctypes.CDLL(None)
    address = ctypes.cast(libc.getpid, ctypes.c_void_p).value
    path = mapped_file(address, Path("/proc/self/maps").read_text())
    assert path and re.search(r"/libc[.-]", path) and os.path.exists(path)


def test_the_wheel_pin_matches_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = [d.split(";")[0].strip() for d in deps if d.startswith("ngsolve-openblas")]
    assert pinned == [cpu_blas.WHEEL]


def test_gemm_rate_is_measured():
    rate = cpu_blas.gemm_gflops(n=64, runs=2)
    assert 0.01 < rate < 100_000
