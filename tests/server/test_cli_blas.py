"""The CLI runs MLX on a real BLAS: it re-executes itself once with the library preloaded, the
library is mapped in the serving process, and /health says which one runs. Each interpreter
start is counted by a sitecustomize module the test puts on PYTHONPATH (os.execve keeps the
process id, so starts are what is counted)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from engine import cpu_blas
from metal_kernels import cpu_kernels
from tests.server.fixtures import write_tiny_model
from tests.server.test_admission import free_port
from tests.server.test_embeddings_api import minilm_folder

ROOT = Path(__file__).resolve().parents[2]

FOUND = cpu_blas.find_blas(os.environ, *cpu_blas.default_locations())
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="preloading is Linux-only")
needs_blas = pytest.mark.skipif(
    FOUND is None,
    reason=f"no BLAS to preload on this machine (install one: {cpu_blas.fix_command(None)})",
)

COUNTER = """
import os
with open({path!r}, "a") as f:
    f.write(os.environ.get("LD_PRELOAD", "") + "\\n")
"""


def cli_env(tmp_path: Path, **extra: str) -> tuple[dict[str, str], Path]:
    """The environment for a CLI subprocess: this one less anything preloaded, plus a counter
    of interpreter starts (one line each, holding the LD_PRELOAD it started with)."""
    hook, starts = tmp_path / "hook", tmp_path / "starts.txt"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(COUNTER.format(path=str(starts)))
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", cpu_blas.MARKER)}
    env.pop("CANDLEWICK_BLAS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(hook), str(ROOT)])
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    return env | extra, starts


def generate_missing_model(env: dict[str, str]) -> subprocess.CompletedProcess:
    """`candlewick generate` up to the point where the model turns out missing (exit 2): the
    BLAS is chosen, loaded and measured before that."""
    args = ["generate", "--model", "/nonexistent/model", "--prompt", "hi"]
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@linux
@needs_blas
def test_serve_reexecutes_once_with_the_blas_mapped_and_reported(tmp_path):
    folder = write_tiny_model(tmp_path / "tiny")
    env, starts = cli_env(tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(folder), "--port", str(port)]
        + ["--data-dir", str(tmp_path / "data")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        health = wait_healthy(proc, f"http://127.0.0.1:{port}")
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        child_maps = [Path(f"/proc/{pid}/maps").read_text() for pid in children]
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    lines = starts.read_text().splitlines()
    # the command as typed, then once with the BLAS preloaded; the processes it starts (the
    # engine's, multiprocessing's resource tracker) inherit the preload and never re-execute
    assert lines[0] == "" and len(lines) >= 3, lines
    # the CPU kernels first where this machine has a C compiler, the BLAS right behind them
    built = tmp_path / "cache/candlewick/cpu-kernels"  # built there by the CLI: found, not rebuilt
    kernels = [str(cpu_kernels.build(built))] if cpu_kernels.compiler() else []
    assert all(line.split()[:-1] == kernels for line in lines[1:]), lines
    assert all(line.split()[-1] == str(FOUND.path) for line in lines[1:]), lines
    real = os.path.realpath(FOUND.path)
    assert real in cpu_blas.mapped_files(maps)
    assert any(real in cpu_blas.mapped_files(m) for m in child_maps)  # the engine's matmuls
    assert all(set(kernels) <= set(cpu_blas.mapped_files(m)) for m in child_maps)
    blas = health["cpu_blas"]
    assert os.path.realpath(blas["path"]) == real and blas["source"] == FOUND.source
    assert blas["gemm_gflops"] > 0 and blas["fix"] is None
    assert blas["own_rows"] == (cpu_kernels.SMALL_ROWS if kernels else 0)
    assert f"cpu blas: {blas['library']} ({FOUND.source}" in output


def wait_healthy(proc: subprocess.Popen, url: str) -> dict:
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "server never became healthy"
        try:
            r = httpx.get(f"{url}/health", timeout=1)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.05)


@linux
@needs_blas
def test_generate_preloads_too(tmp_path):
    env, starts = cli_env(tmp_path)
    out = generate_missing_model(env)
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert len(starts.read_text().splitlines()) == 2
    assert f"({FOUND.source}" in out.stderr and str(FOUND.path) in out.stderr


@linux
def test_the_marker_stops_a_second_reexecution(tmp_path):
    """A re-executed process whose preload did not take (the marker is set, the library not
    loaded) runs on rather than looping: one start, the bundled BLAS, one warning line."""
    env, starts = cli_env(tmp_path, **{cpu_blas.MARKER: "ngsolve-openblas wheel"})
    out = generate_missing_model(env)
    assert out.returncode == 2
    assert starts.read_text().splitlines() == [""]
    warnings = [line for line in out.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "MLX's bundled reference BLAS" in warnings[0]
    assert "for a real BLAS run: " in warnings[0]


@linux
def test_candlewick_blas_off_keeps_the_bundled_blas_quietly(tmp_path):
    env, starts = cli_env(tmp_path, CANDLEWICK_BLAS="off")
    out = generate_missing_model(env)
    assert out.returncode == 2 and starts.read_text().splitlines() == [""]
    assert "cpu blas: MLX's bundled reference BLAS" in out.stderr and "warning" not in out.stderr


@linux
@needs_blas
def test_a_blas_the_user_preloaded_is_kept(tmp_path):
    """LD_PRELOAD already naming a BLAS: no re-execution, and the report says it is the user's."""
    env, starts = cli_env(tmp_path)
    plan = cpu_blas.plan_preload(env, FOUND, preloaded=False)
    env = env | {k: plan[k] for k in ("LD_PRELOAD", "LD_LIBRARY_PATH") if k in plan}
    out = generate_missing_model(env)
    assert out.returncode == 2 and len(starts.read_text().splitlines()) == 1
    assert "(LD_PRELOAD" in out.stderr and str(FOUND.path) in out.stderr


@linux
def test_candlewick_blas_naming_a_missing_file_is_an_error(tmp_path):
    env, starts = cli_env(tmp_path, CANDLEWICK_BLAS=str(tmp_path / "libnothing.so"))
    out = generate_missing_model(env)
    assert out.returncode == 2 and starts.read_text().splitlines() == [""]
    assert out.stderr.strip() == (
        f"candlewick: error: CANDLEWICK_BLAS={tmp_path / 'libnothing.so'}: no such library file"
    )


@linux
@needs_blas
@pytest.mark.parametrize("user_threads", [None, "1"])
def test_the_engine_process_governs_the_blas_threads_unless_the_user_said(tmp_path, user_threads):
    """The engine's process lets the BLAS's threads follow the cores other programs leave free
    (an encoder here: it and a decoder start the same way), unless the user set the count."""
    folder = minilm_folder()
    extra = {FOUND.threads_env: user_threads} if user_threads else {}
    env, _ = cli_env(tmp_path, **extra)
    port = free_port()
    argv = [sys.executable, "-m", "server.cli", "serve", "--model", str(folder)]
    argv += ["--port", str(port), "--data-dir", str(tmp_path / "data")]
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}")
        body = {"model": folder.name, "input": ["a few words", "and a few more"]}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json=body, timeout=60)
        assert r.status_code == 200 and len(r.json()["data"]) == 2
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output
    start = cpu_blas.default_threads()
    line = f"cpu blas: its threads follow the cores other programs leave free (now {start})"
    assert (line in output) == (user_threads is None), output


SET_THREADS = """
import ctypes, os
from engine import cpu_blas
cpu_blas.check()
report = cpu_blas.governed()
lib = ctypes.CDLL(report.path)
for n in (3, 1):
    assert cpu_blas.set_threads(report.path, n)
    print(lib.openblas_get_num_threads())
"""


@linux
@needs_blas
@pytest.mark.skipif(FOUND is not None and "mkl" in FOUND.path.name, reason="an OpenBLAS call")
def test_set_threads_changes_the_preloaded_library_in_a_running_process(tmp_path):
    env, _ = cli_env(tmp_path)
    env = cpu_blas.plan_preload(env, FOUND, preloaded=False)  # as the CLI re-executes
    out = subprocess.run(
        [sys.executable, "-c", SET_THREADS], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "1"]
