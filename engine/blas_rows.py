"""Products of one or two rows by `cblas_sgemv` instead of `cblas_sgemm`, under MLX on Linux.

MLX's CPU matmul always calls `cblas_sgemm`, and OpenBLAS's sgemm copies ("packs") the whole
weight matrix into its own layout on every call. For a decode step of one sequence that product
is a matrix-vector one: the packing doubles the bytes read (measured on a 2-core EPYC, the 56
layer products of a 50M llama: 7.4 ms by sgemm, 5.6 ms by sgemv, and its 32000-row head 5.1
against 2.4 ms). sgemv reads the weight once, in place. At two rows, two sgemv calls still win
(7.1 against 8.2 ms); at three they tie, and from four rows sgemm is faster.

MLX offers no way to choose, so this is a small library of our own, compiled from `SOURCE` with
the machine's C compiler into the user's cache once, and preloaded by the CLI ahead of the BLAS
(`engine.cpu_blas.plan_preload`). It defines `cblas_sgemm`, which the dynamic linker then binds
MLX to; products of up to `MAX_ROWS` rows go to the BLAS's `cblas_sgemv` a row at a time, every
other call to the BLAS's own `cblas_sgemm` unchanged. The BLAS is the library that
`CANDLEWICK_ROWS_BLAS` names (the one preloaded after it). Where no C compiler is found, the CLI
preloads the BLAS alone.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

MAX_ROWS = 2
TARGET = "CANDLEWICK_ROWS_BLAS"  # the BLAS library the shim forwards to
SWITCH = "CANDLEWICK_BLAS_ROWS"  # "off": preload the BLAS without the shim

SOURCE = r"""
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
enum { MAX_ROWS = @MAX_ROWS@ };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;
static pthread_once_t bound = PTHREAD_ONCE_INIT;
static unsigned long long by_rows;

static void bind(void) {
  const char *path = getenv("@TARGET@");
  void *lib = path ? dlopen(path, RTLD_NOW | RTLD_NOLOAD) : NULL;
  void *scope = lib ? lib : RTLD_NEXT;
  real_sgemm = (sgemm_fn)dlsym(scope, "cblas_sgemm");
  real_sgemv = (sgemv_fn)dlsym(scope, "cblas_sgemv");
  if (!real_sgemm) {
    fprintf(stderr, "candlewick: the BLAS row shim found no cblas_sgemm (@TARGET@=%s)\n",
            path ? path : "");
    abort();
  }
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
  pthread_once(&bound, bind);
  if (order != ROW_MAJOR || m > MAX_ROWS || k <= 0 || !real_sgemv) {
    real_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  /* Row i of C = alpha * (row i of op(A)) @ op(B) + beta * C: op(B) transposed times a vector. */
  for (int i = 0; i < m; i++) {
    const float *x = trans_a == NO_TRANS ? a + (long)i * lda : a + i;
    int incx = trans_a == NO_TRANS ? 1 : lda;
    float *y = c + (long)i * ldc;
    if (beta == 0.0f) memset(y, 0, sizeof(float) * (size_t)n); /* C may hold NaN bytes */
    if (trans_b == NO_TRANS) /* B is [k, n] */
      real_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, x, incx, beta, y, 1);
    else /* B is [n, k] */
      real_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, x, incx, beta, y, 1);
  }
  __atomic_fetch_add(&by_rows, 1, __ATOMIC_RELAXED);
}

/* For candlewick's checks: the BLAS's own sgemm, and how many products went by sgemv. */
void *candlewick_rows_sgemm(void) {
  pthread_once(&bound, bind);
  return (void *)real_sgemm;
}

unsigned long long candlewick_rows_calls(void) {
  return __atomic_load_n(&by_rows, __ATOMIC_RELAXED);
}
""".replace("@MAX_ROWS@", str(MAX_ROWS)).replace("@TARGET@", TARGET)


def compiler() -> str | None:
    """The C compiler to build with: `CC`, else `cc` or `gcc` on the PATH."""
    named = os.environ.get("CC", "").strip()
    return shutil.which(named) if named else shutil.which("cc") or shutil.which("gcc")


def build(folder: Path) -> Path | None:
    """The shim library for this `SOURCE` in ``folder``, compiled there on first use (about
    0.1 s); None when there is no compiler or it fails. Safe against concurrent starts: each
    compiles to its own file and renames it into place."""
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    target = folder / f"candlewick-rows-{digest}.so"
    if target.is_file():
        return target
    cc = compiler()
    if cc is None:
        return None
    with tempfile.TemporaryDirectory(dir=folder) as work:
        source, out = Path(work) / "rows.c", Path(work) / "rows.so"
        source.write_text(SOURCE)
        argv = [cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(source), "-ldl", "-lpthread"]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if done.returncode != 0 or not out.is_file():
            return None
        os.replace(out, target)
    return target


def loaded() -> tuple[int, ctypes.CDLL] | None:
    """Where the shim answers `cblas_sgemm` in this process: the address of the BLAS's own
    sgemm behind it, and the shim's handle (for `calls`). None where MLX calls the BLAS
    directly."""
    scope = ctypes.CDLL(None)
    if not hasattr(scope, "candlewick_rows_sgemm"):
        return None
    scope.candlewick_rows_sgemm.restype = ctypes.c_void_p
    return scope.candlewick_rows_sgemm(), scope


def calls() -> int:
    """Products the shim has answered by sgemv in this process (0 without it)."""
    found = loaded()
    if found is None:
        return 0
    scope = found[1]
    scope.candlewick_rows_calls.restype = ctypes.c_ulonglong
    return scope.candlewick_rows_calls()
