"""Products of few rows by candlewick's own routes instead of `cblas_sgemm`, under MLX on Linux.

MLX's CPU matmul always calls `cblas_sgemm`, and OpenBLAS's sgemm copies ("packs") the whole
weight matrix into its own layout on every call, then multiplies. For a decode step (`x @ W.T`
with a row of x per sequence) the packing costs as much as the product, and reads W twice.
Measured on a 2-core EPYC, the 56 layer products of a 50M llama, 2 threads:

| rows of x | sgemm | ours |
| ---: | ---: | ---: |
| 1 | 8.1-8.7 ms | 5.8-7.6 ms (sgemv) |
| 2 | 8.8-9.9 | 5.6-6.5 (kernel) |
| 4 | 8.7-9.1 | 5.7-7.8 |
| 8 | 9.6-10.5 | 5.9-7.3 |
| 16 | 12.3-13.0 | 6.6-7.6 |
| 32 | 16.5-18.2 | (sgemm; a two-vector kernel took 14-24 ms: not used) |

So `library.c` is a small library of our own: one row goes to the BLAS's `cblas_sgemv`, 2 to
`SMALL_ROWS` rows of `x @ W.T` to a kernel that streams W once, unpacked, over the BLAS's thread
count (see the C file), products of up to `MAX_ROWS` rows in other layouts to sgemv a row at a
time, everything else to the BLAS's own `cblas_sgemm` unchanged. The CLI compiles it with the
machine's C compiler (`-O3 -march=native`) into the user's cache once, and preloads it ahead of
the BLAS (`engine.cpu_blas.plan_preload`): the dynamic linker binds MLX's `cblas_sgemm` to it.
The BLAS it forwards to is the library `CANDLEWICK_KERNELS_BLAS` names (the one preloaded after
it). Where no C compiler is found, the CLI preloads the BLAS alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

MAX_ROWS = 2  # as in library.c: other layouts of up to 2 rows go by sgemv
TARGET = "CANDLEWICK_KERNELS_BLAS"  # the BLAS library the shim forwards to
SWITCH = "CANDLEWICK_CPU_KERNELS"  # "off": preload the BLAS without the shim

SOURCE_FILE = Path(__file__).with_name("library.c")
SMALL_ROWS = 16  # as in library.c: products of 2..16 rows of `x @ W.T` go to its kernel
MIN_WEIGHT = 1 << 15  # as in library.c: smaller weights are left to the BLAS


def machine() -> str:
    """What the build is for: `-march=native` code runs only where its instruction set does,
    and a cache folder can be shared between machines (a network home)."""
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    return f"{platform.machine()} {flags}"


def compiler() -> str | None:
    """The C compiler to build with: `CC`, else `cc` or `gcc` on the PATH."""
    named = os.environ.get("CC", "").strip()
    return shutil.which(named) if named else shutil.which("cc") or shutil.which("gcc")


def build(folder: Path) -> Path | None:
    """The shim library for this source and machine in ``folder``, compiled there on first use
    (about 0.3 s) for this machine's instruction set (or, where the compiler cannot tell it,
    for the generic one); None when there is no compiler or it fails. Safe against concurrent
    starts: each compiles to its own file and renames it into place."""
    source = SOURCE_FILE.read_text()
    digest = hashlib.sha256(f"{source}\0{machine()}".encode()).hexdigest()[:16]
    target = folder / f"candlewick-cpu-{digest}.so"
    if target.is_file():
        return target
    cc = compiler()
    if cc is None:
        return None
    with tempfile.TemporaryDirectory(dir=folder) as work:
        out = Path(work) / "rows.so"
        for arch in (["-march=native"], []):
            argv = [cc, "-O3", *arch, "-shared", "-fPIC", "-o", str(out), str(SOURCE_FILE)]
            try:
                done = subprocess.run(
                    [*argv, "-ldl", "-lpthread", "-lm"], capture_output=True, text=True, timeout=120
                )
            except (OSError, subprocess.TimeoutExpired):
                return None
            if done.returncode == 0 and out.is_file():
                os.replace(out, target)
                return target
    return None


def loaded() -> tuple[int, ctypes.CDLL] | None:
    """Where the shim answers `cblas_sgemm` in this process: the address of the BLAS's own
    sgemm behind it, and the shim's handle (for `calls`). None where MLX calls the BLAS
    directly."""
    scope = ctypes.CDLL(None)
    if not hasattr(scope, "candlewick_rows_sgemm"):
        return None
    scope.candlewick_rows_sgemm.restype = ctypes.c_void_p
    return scope.candlewick_rows_sgemm(), scope


WAYS = {"sgemv": "rows", "kernel": "kernel", "pool": "pool"}  # way -> candlewick_<x>_calls


def calls() -> dict[str, int]:
    """Products the shim has answered in this process, by way: ``sgemv``, ``kernel``, and of
    those ``pool`` (split over threads); all 0 without it."""
    found = loaded()
    counts = dict.fromkeys(WAYS, 0)
    if found is not None:
        for way, name in WAYS.items():
            counter = getattr(found[1], f"candlewick_{name}_calls")
            counter.restype = ctypes.c_ulonglong
            counts[way] = counter()
    return counts


def function(name: str, argtypes: list | None = None) -> Any | None:
    """The library's function ``name`` where the CLI preloaded it in this process (the global
    scope), with ``argtypes`` set and no result, else None."""
    found = loaded()
    fn = getattr(found[1], name, None) if found is not None else None
    if fn is not None and argtypes is not None:
        fn.argtypes, fn.restype = argtypes, None
    return fn


_P, _INT, _LONG, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
GELU_ERF = [_P, _P, _LONG]  # candlewick_gelu_erf(x, y, n)
# candlewick_packed_attention(q, k, v, stride, starts, lens, seqs, heads, d, scale, out)
PACKED_ATTENTION = [_P, _P, _P, _LONG, _P, _P, _INT, _INT, _INT, _F, _P]
