"""candlewick's CPU kernels in C, under MLX on Linux: products of few rows, attention, GELU.

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

So this folder is a small library of our own (`products.c`): one row goes to the BLAS's
`cblas_sgemv`, 2 to `SMALL_ROWS` rows of `x @ W.T` to a kernel that streams W once, unpacked,
over the BLAS's thread count (`pool.c`), products of up to `MAX_ROWS` rows in other layouts to
sgemv a row at a time, everything else to the BLAS's own `cblas_sgemm` unchanged. It also holds
attention and GELU kernels the engine calls where it is loaded (`attention.c`, `gelu.c`). The
CLI compiles it with the machine's C compiler (`-O3 -march=native`) into the user's cache once,
and preloads it ahead of the BLAS (`engine.cpu_blas.plan_preload`): the dynamic linker binds
MLX's `cblas_sgemm` to it. The BLAS it forwards to is the library `CANDLEWICK_KERNELS_BLAS`
names (the one preloaded after it). Where no C compiler is found, the CLI preloads the BLAS
alone, and the engine runs MLX's own paths.
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

MAX_ROWS = 2  # as in products.c: other layouts of up to 2 rows go by sgemv
TARGET = "CANDLEWICK_KERNELS_BLAS"  # the BLAS library ours forwards to
SWITCH = "CANDLEWICK_CPU_KERNELS"  # "off": preload the BLAS without our library

FOLDER = Path(__file__).parent  # the C: common.h, and one .c per concept
SMALL_ROWS = 16  # as in common.h: products of 2..16 rows of `x @ W.T` go to its kernel
MIN_WEIGHT = 1 << 15  # as in common.h: smaller weights are left to the BLAS


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


def build(folder: Path, source: Path = FOLDER) -> Path | None:
    """The library for this source and machine in ``folder``, compiled there on first use
    (about 0.3 s) for this machine's instruction set (or, where the compiler cannot tell it,
    for the generic one); None when there is no compiler or it fails. Safe against concurrent
    starts: each compiles to its own file and renames it into place. ``source``: the folder of
    C files (tests build altered copies)."""
    sources = sorted(source.glob("*.c"))
    text = "\0".join(p.read_text() for p in [*sources, source / "common.h"])
    digest = hashlib.sha256(f"{text}\0{machine()}".encode()).hexdigest()[:16]
    target = folder / f"candlewick-cpu-{digest}.so"
    if target.is_file():
        return target
    cc = compiler()
    if cc is None:
        return None
    with tempfile.TemporaryDirectory(dir=folder) as work:
        out = Path(work) / "rows.so"
        for arch in (["-march=native"], []):
            flags = ["-O3", *arch, "-fvisibility=hidden", "-shared", "-fPIC"]
            argv = [cc, *flags, "-o", str(out), *map(str, sources)]
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
    """Where our library answers `cblas_sgemm` in this process: the address of the BLAS's own
    sgemm behind it, and the library's handle (for `calls`). None where MLX calls the BLAS
    directly."""
    scope = ctypes.CDLL(None)
    if not hasattr(scope, "candlewick_rows_sgemm"):
        return None
    scope.candlewick_rows_sgemm.restype = ctypes.c_void_p
    return scope.candlewick_rows_sgemm(), scope


WAYS = {"sgemv": "rows", "kernel": "kernel", "pool": "pool"}  # way -> candlewick_<x>_calls


def calls() -> dict[str, int]:
    """Products the library has answered in this process, by way (``sgemv``, ``kernel``), and
    ``pool``: its jobs (products, attention, GELU) split over threads; all 0 without it."""
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
    scope) and its start-up check passed, with ``argtypes`` set and no result, else None."""
    found = loaded()
    if _off is not None:
        return None
    fn = getattr(found[1], name, None) if found is not None else None
    if fn is not None and argtypes is not None:
        fn.argtypes, fn.restype = argtypes, None
    return fn


_P, _INT, _LONG, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
GELU_ERF = [_P, _P, _LONG]  # candlewick_gelu_erf(x, y, n)
# candlewick_packed_attention(q, k, v, stride, starts, lens, seqs, heads, d, scale, out)
PACKED_ATTENTION = [_P, _P, _P, _LONG, _P, _P, _INT, _INT, _INT, _F, _P]
# candlewick_paged_decode(q, k, v, slots, tables, width, lens, b, h, hkv, d, block, window,
#                         scale, out)
PAGED_DECODE = [_P, _P, _P, _LONG, _P, _INT, _P, _INT, _INT, _INT, _INT, _INT, _INT, _F, _P]

_off: str | None = None  # why the library's kernels are off in this process, after `disable`


def off() -> str | None:
    """Why the library's kernels are off in this process (a failed start-up check), or None."""
    return _off


def disable(reason: str) -> None:
    """Every product to the BLAS as it is from now on, and no other kernel of the library used:
    the start-up check found ``reason``."""
    global _off
    found = loaded()
    if found is not None:
        found[1].candlewick_disable()
    _off = reason


def self_check() -> str | None:
    """Run each of the library's ways once on small random inputs against NumPy in float64,
    where the library is loaded (it was compiled on this machine, by its compiler): what
    disagrees, or None. A few milliseconds; needs MLX, so call it after MLX is loaded."""
    import mlx.core as mx
    import numpy as np

    from metal_kernels.cpu_kernels import reference

    if loaded() is None:
        return None
    rng = np.random.default_rng(0)

    def off_by(got: np.ndarray, want: np.ndarray) -> float:
        return float(np.max(np.abs(got - want) / np.maximum(1.0, np.abs(want))))

    w = rng.standard_normal((48, 700), np.float32)  # 33600 weights: our routes take it
    for rows in (1, 2, 16):
        x = rng.standard_normal((rows, 700), np.float32)
        got = np.array(mx.matmul(mx.array(x), mx.array(w).T, stream=mx.cpu))
        if (err := off_by(got, x.astype(np.float64) @ w.T)) > 1e-4:
            return f"a product of {rows} rows is off by {err:.2g}"
    x = rng.standard_normal(100, np.float32) * 4
    got = np.empty_like(x)
    function("candlewick_gelu_erf", GELU_ERF)(x.ctypes.data, got.ctypes.data, x.size)
    if (err := off_by(got, reference.gelu_erf(x))) > 1e-5:
        return f"GELU is off by {err:.2g}"
    # (arrays whose addresses are passed are held by a name until the call returns)
    lens, starts, heads, d = np.array([5, 9], np.int32), np.array([0, 5], np.int32), 2, 16
    q, k, v = (rng.standard_normal((14, heads * d), np.float32) for _ in range(3))
    got = np.zeros_like(q)
    function("candlewick_packed_attention", PACKED_ATTENTION)(
        q.ctypes.data, k.ctypes.data, v.ctypes.data, heads * d, starts.ctypes.data,
        lens.ctypes.data, 2, heads, d, d**-0.5, got.ctypes.data,
    )  # fmt: skip
    want = reference.packed_attention(q, k, v, starts, lens, heads, d, d**-0.5)
    if (err := off_by(got, want)) > 1e-5:
        return f"packed attention is off by {err:.2g}"
    # paged decode: those keys and values as head-major pools of blocks of 4
    pools = [np.zeros((heads, 16, d), np.float32) for _ in range(2)]
    tables = np.array([[1, 2, 0], [0, 3, 1]], np.int32)  # scattered, out of order, shared
    for pool, t in zip(pools, (k, v), strict=True):
        for slot, row in enumerate(t[:8]):
            pool[:, slot] = row.reshape(heads, d)
    queries = rng.standard_normal((2, heads, d), np.float32)
    got, lens = np.zeros_like(queries), np.array([6, 9], np.int32)
    function("candlewick_paged_decode", PAGED_DECODE)(
        queries.ctypes.data, pools[0].ctypes.data, pools[1].ctypes.data, 16, tables.ctypes.data,
        3, lens.ctypes.data, 2, heads, heads, d, 4, 0, d**-0.5, got.ctypes.data,
    )  # fmt: skip
    want = reference.paged_decode(queries, *pools, tables, lens.tolist(), 4, d**-0.5)
    if (err := off_by(got, want)) > 1e-5:
        return f"paged decode attention is off by {err:.2g}"
    return None
