"""The row shim (`engine.blas_rows`): built once with the machine's compiler, and under MLX it
gives the same products as NumPy for every layout MLX passes to `cblas_sgemm`, answering those
of up to `MAX_ROWS` rows by sgemv and the rest by the BLAS's sgemm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import blas_rows, cpu_blas

ROOT = Path(__file__).resolve().parents[2]
FOUND = cpu_blas.find_blas(os.environ, *cpu_blas.default_locations())
needs_cc = pytest.mark.skipif(blas_rows.compiler() is None, reason="no C compiler (cc, gcc)")

PRODUCTS = r"""
import json
import mlx.core as mx
import numpy as np
from engine import blas_rows, cpu_blas

report = cpu_blas.check()
rng = np.random.default_rng(0)
errors, expected = {}, 0
before = blas_rows.calls()
for m in (1, 2, 3, 7):
    for ta in (False, True):
        for tb in (False, True):
            a = rng.standard_normal((m, 70)).astype(np.float32)
            b = rng.standard_normal((70, 33)).astype(np.float32)
            # a transposed operand reaches sgemm as CblasTrans with its own leading dimension
            A = mx.array(np.ascontiguousarray(a.T)).T if ta else mx.array(a)
            B = mx.array(np.ascontiguousarray(b.T)).T if tb else mx.array(b)
            got = np.array(A @ B)
            errors[f"{m} {ta} {tb}"] = float(np.abs(got - a.astype(np.float64) @ b).max())
            expected += m <= blas_rows.MAX_ROWS
# alpha and beta (C read, not overwritten), and a batch of one-row products
c = rng.standard_normal((1, 33)).astype(np.float32)
a = rng.standard_normal((1, 70)).astype(np.float32)
b = rng.standard_normal((70, 33)).astype(np.float32)
got = np.array(mx.addmm(mx.array(c), mx.array(a), mx.array(b), alpha=2.0, beta=0.5))
errors["addmm"] = float(np.abs(got - (0.5 * c + 2.0 * (a.astype(np.float64) @ b))).max())
expected += 1
x = rng.standard_normal((5, 1, 70)).astype(np.float32)
w = rng.standard_normal((5, 70, 9)).astype(np.float32)
got = np.array(mx.array(x) @ mx.array(w))
errors["batched"] = float(np.abs(got - x.astype(np.float64) @ w).max())
expected += 5  # one sgemm call per batch entry
calls = blas_rows.calls() - before
# MLX's head product already goes by sgemv: the host head stands aside
import mlx.nn as nn
from engine.host_head import HostHead, cblas_sgemv
from tests.engine.test_host_head import head_model
head = HostHead.for_model(head_model(nn.Linear(8, 16, bias=False)), cblas_sgemv())
print(json.dumps({"errors": errors, "calls": calls, "expected": expected,
                  "rows": report.sgemv_rows, "path": report.path, "host_head": head is not None}))
"""


@needs_cc
def test_built_once_per_source_and_declined_without_a_compiler(tmp_path, monkeypatch):
    first = blas_rows.build(tmp_path)
    assert first is not None and first.parent == tmp_path and first.name.endswith(".so")
    stamp = first.stat().st_mtime_ns
    assert blas_rows.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no work files left
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert blas_rows.compiler() is None
    (tmp_path / "elsewhere").mkdir()
    assert blas_rows.build(tmp_path / "elsewhere") is None


def test_without_the_shim_nothing_is_counted():
    assert blas_rows.loaded() is None and blas_rows.calls() == 0


@needs_cc
@pytest.mark.skipif(FOUND is None, reason="no BLAS to preload here for the shim to forward to")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="preloading is Linux-only")
def test_products_under_mlx_match_numpy_and_few_rows_go_by_sgemv(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    shim = blas_rows.build(tmp_path)
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", cpu_blas.MARKER)}
    env = cpu_blas.plan_preload(clean, FOUND, preloaded=False, rows=shim)
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", PRODUCTS], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert max(result["errors"].values()) < 1e-4, result["errors"]
    assert result["calls"] == result["expected"] > 0
    assert result["rows"] == blas_rows.MAX_ROWS
    assert os.path.realpath(result["path"]) == os.path.realpath(FOUND.path)  # the BLAS, not us
    assert result["host_head"] is False
