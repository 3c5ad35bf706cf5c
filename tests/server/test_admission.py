"""Who gets in: API keys, the queue limit (429 + Retry-After), loading (503), and the SIGTERM
drain (new requests 503, running ones finish, the process exits)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from server.app import create_app
from server.settings import ServerSettings
from server.state import ServerState
from tests.server.fixtures import running_server, write_tiny_model

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def started(settings: ServerSettings) -> ServerState:
    state = ServerState(settings)
    state.start()
    return state


def test_api_keys_guard_everything_but_health_and_metrics(folder):
    settings = ServerSettings(
        model=str(folder), data_dir=folder / "data", api_keys=("k1", "k2"), num_blocks=64
    )
    with running_server(settings, started(settings)) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 200
        r = httpx.get(f"{url}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert (
            httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k3"}).status_code == 401
        )
        assert (
            httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
        )
        r = httpx.post(f"{url}/tokenize", json={"prompt": "x"})
        assert r.status_code == 401


def test_a_full_queue_answers_429_with_retry_after(folder):
    settings = ServerSettings(
        model=str(folder), data_dir=folder / "data", max_num_seqs=2, max_queue=1, num_blocks=64
    )
    state = started(settings)
    body = {"model": folder.name, "prompt": "x", "max_tokens": 2}
    with running_server(settings, state) as url, httpx.Client(base_url=url, timeout=30) as c:
        # n beyond what the server ever holds at once can never succeed: 400, not "retry".
        r = c.post("/v1/completions", json={**body, "n": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        # Two sequences running and one waiting: the next is refused, never queued forever.
        held = state.admission.acquire(3)
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        held.release()
        assert c.post("/v1/completions", json=body).status_code == 200
        assert state.admission.inflight == 0


def test_health_is_503_until_the_model_is_loaded(folder):
    settings = ServerSettings(model=str(folder), data_dir=folder / "data")
    app = create_app(settings)  # no lifespan under ASGITransport: it never loads

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            health = await c.get("/health")
            models = await c.get("/v1/models")
            return health, models

    import asyncio

    health, models = asyncio.run(main())
    assert health.status_code == 503 and health.json()["status"] == "loading"
    assert models.status_code == 503 and "loading" in models.json()["error"]["message"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_running_requests_then_exits(folder):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CANDLEWICK_SHUTDOWN_GRACE": "30"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--model",
            str(folder),
            "--port",
            str(port),
            "--served-model-name",
            "tiny",
            "--data-dir",
            str(folder / "data"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server never became healthy"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        body = {
            "model": "tiny",
            "prompt": "drain",
            "max_tokens": 450,
            "stream": True,
            "ignore_eos": True,
            "temperature": 0,
        }
        with (
            httpx.Client(base_url=url, timeout=60) as c,
            c.stream("POST", "/v1/completions", json=body) as r,
        ):
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (
                refused := httpx.post(
                    f"{url}/v1/completions", json={**body, "stream": False, "max_tokens": 1}
                )
            ).status_code != 503:
                assert time.monotonic() < deadline, refused.status_code
                time.sleep(0.01)
            assert httpx.get(f"{url}/health").status_code == 503
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        assert '"finish_reason":"length"' in rest[-3] or '"finish_reason":"length"' in rest[-2]
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_oversized_bodies_and_bad_json_are_clear(folder):
    settings = ServerSettings(
        model=str(folder), data_dir=folder / "data", num_blocks=64, max_request_bytes=1000
    )
    with running_server(settings, started(settings)) as url:
        r = httpx.post(f"{url}/v1/completions", json={"model": folder.name, "prompt": "x" * 2000})
        assert r.status_code == 413 and "limit is 1000" in r.json()["error"]["message"]
        r = httpx.post(
            f"{url}/v1/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "the request body is not valid JSON"


def test_a_model_that_fails_to_load_ends_the_process(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--model",
            str(tmp_path / "absent"),
            "--port",
            str(free_port()),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "does not exist" in out.stderr


def test_bad_environment_values_are_usage_errors():
    env = {**os.environ, "CANDLEWICK_PORT": "abc"}
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 2 and "--port" in out.stderr and "Traceback" not in out.stderr
