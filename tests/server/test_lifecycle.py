"""Starting and stopping `candlewick serve` as real processes: every start-up failure is one
clear line and exit status 1, SIGTERM exits 0, SIGINT 130, and no thread that ran MLX is still
holding per-thread MLX state when the interpreter finalizes (the cause of "terminate called
without an active exception")."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from loadtests.make_model import make_model

REPO = Path(__file__).resolve().parents[2]
ABORTS = ("terminate called", "Fatal Python error", "Traceback")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A llama folder with random weights and a byte-level tokenizer (no torch needed)."""
    folder = tmp_path_factory.mktemp("tiny")
    make_model("tiny", folder, workers=1)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: Path | str, port: int, tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", "serve", "--model", str(model),
            "--port", str(port), "--data-dir", str(tmp_path / "data"), *extra]  # fmt: skip


def fails_to_start(argv: list[str], env: dict[str, str] | None = None) -> str:
    """Runs a start that must fail; returns its one error line after checking the rest."""
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1, out.stderr
    assert not [m for m in ABORTS if m in out.stderr + out.stdout], out.stderr
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, out.stderr
    assert out.stderr.splitlines()[-1] == errors[0]
    assert errors[0].startswith("candlewick: error: ")
    return errors[0]


def test_a_kv_cache_too_small_for_one_block_is_one_clear_line(tiny, tmp_path):
    line = fails_to_start(serve(tiny, free_port(), tmp_path, "--kv-cache-memory", "64KiB"))
    assert "KV cache budget of 64.0 KiB (--kv-cache-memory)" in line
    assert "raise --kv-cache-memory or lower --max-loras" in line


def test_a_missing_model_is_one_clear_line(tmp_path):
    absent = tmp_path / "absent"
    line = fails_to_start(serve(absent, free_port(), tmp_path))
    assert line == f"candlewick: error: ModelNotFound: model path {absent} does not exist"


def test_weights_that_do_not_load_are_one_clear_line(tiny, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    shard = next(broken.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # cut short
    line = fails_to_start(serve(broken, free_port(), tmp_path))
    assert "candlewick: error: " in line and len(line) > len("candlewick: error: ") + 10


def test_a_port_in_use_is_one_clear_line_before_anything_loads(tiny, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        line = fails_to_start(serve(tiny, port, tmp_path))
    assert line.startswith(f"candlewick: error: cannot listen on 127.0.0.1:{port}: ")
    assert time.monotonic() - started < 60


def start_serving(argv: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "never became healthy"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.05)


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_serving_process_stops_cleanly_on_a_signal(tiny, tmp_path, sig, status):
    port = free_port()
    proc = start_serving(serve(tiny, port, tmp_path, "--served-model-name", "tiny"), port)
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == status, out
    assert not [m for m in ABORTS if m in out], out


# A child that makes the exit race certain: the thread under test registers, after its MLX work,
# a thread-local destructor that sleeps (they run in reverse order of registration, so before
# MLX's own), while the main thread's finalization is made long by garbage to collect. MLX state
# left to the thread-local destructors then meets a finalizing interpreter every time.
CHILD = textwrap.dedent(
    """
    import ctypes, json, sys, threading
    import mlx.core as mx
    import engine.engine_thread, server.app
    from engine.engine_core import EngineCore
    from engine.config import EngineConfig
    from engine.engine_thread import EngineThread
    from engine.loader.load import load_model
    from engine.request import EngineRequest
    from engine.sampling_params import SamplingParams
    from server.app import _load
    from server.settings import ServerSettings
    from server.state import ServerState

    which, folder, data, release = sys.argv[1:5]
    if release == "skip":  # the control: what happens without the release
        server.app.release_thread_state = engine.engine_thread.release_thread_state = (
            lambda: None
        )
    libc = ctypes.CDLL(None)

    def linger():
        sleep = ctypes.cast(libc.usleep, ctypes.c_void_p)
        libc.__cxa_thread_atexit_impl(sleep, ctypes.c_void_p(100_000), None)

    class Node:
        pass

    garbage = []
    for _ in range(1_000_000):
        node = Node()
        node.me = node
        garbage.append(node)

    if which == "loader":  # a load that fails on the KV budget, as on a GPU before the fix
        settings = ServerSettings(
            model=folder, data_dir=data, kv_cache_memory=64 << 10, engine_process=False
        )
        state = ServerState(settings)
        state.on_load_failed = linger  # called on the loader thread, as it ends
        thread = threading.Thread(target=_load, args=(state,))
        thread.start()
        thread.join()
        print(json.dumps({"error": state.load_error}))
    else:  # the engine thread, after a request and any draw from the default random key
        loaded = load_model(folder)
        core = EngineCore(loaded.model, EngineConfig(num_blocks=64), loaded.dtype)
        done = threading.Event()

        def publish(outputs):
            mx.eval(mx.random.uniform(shape=(2,)))
            linger()
            if any(o.finished for o in outputs):
                done.set()

        worker = EngineThread(core, publish)
        worker.start()
        worker.add(EngineRequest("r", [1, 2, 3], SamplingParams(max_tokens=3, temperature=1.0)))
        assert done.wait(60)
        assert worker.stop(timeout=30)
        print(json.dumps({"error": None}))
    """
)


def run_child(which: str, tiny: Path, tmp_path: Path, release: str):
    argv = [sys.executable, "-c", CHILD, which, str(tiny), str(tmp_path / "data"), release]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses glibc's thread-local hooks")
@pytest.mark.parametrize("which", ["loader", "engine"])
def test_threads_that_ran_mlx_leave_nothing_for_finalization(tiny, tmp_path, which):
    control = run_child(which, tiny, tmp_path, "skip")
    if "terminate called" not in control.stderr:
        pytest.skip(f"this Python does not abort on the race (rc {control.returncode})")
    out = run_child(which, tiny, tmp_path, "keep")
    assert out.returncode == 0, out.stderr
    assert "terminate called" not in out.stderr
    if which == "loader":
        assert "KVCacheTooSmall" in json.loads(out.stdout.splitlines()[-1])["error"]
