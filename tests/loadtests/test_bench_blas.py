"""The GEMM benchmark's child process measures the library it was given."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from loadtests import bench_blas


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="preloading is Linux-only")
def test_each_library_is_measured_in_its_own_process():
    libs = bench_blas.libraries([])
    assert libs["bundled"] is None
    for name, candidate in libs.items():
        out = subprocess.run(
            [sys.executable, "-c", bench_blas.CHILD % json.dumps([[64, 64, 64]])],
            env=bench_blas.blas_env(candidate, 1),
            capture_output=True,
            text=True,
            check=True,
        )
        run = json.loads(out.stdout.splitlines()[-1])
        assert run["report"]["source"] == (name if candidate else "bundled")
        if candidate is not None:
            assert os.path.realpath(run["report"]["path"]) == os.path.realpath(candidate.path)
            assert run["report"]["threads"] == 1
        assert run["gflops"]["64x64x64"] > 0
