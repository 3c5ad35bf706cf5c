"""The admission lease on a real uvicorn server: room and adapter pin are taken together and
given back exactly once on every way a request can end (a normal end, a disconnect midway, an
error inside the event stream, a refusal, a stream that never started).

Exactly once is observed by holding one extra sequence of room and one extra pin from the test:
a request that released its lease twice would take them down with it, one that never released
would leave its own behind. So after each request, exactly the test's own are left.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from adapters.types import AdapterVersion
from server.admission import AdapterPin
from server.settings import ServerSettings
from server.state import ServerState
from server.streaming import EventStream
from tests.server.fixtures import running_server, write_tiny_model

pytest.importorskip("torch")

ADAPTER = "pinned"
# logprobs: every token makes a chunk (text alone may be held back at a partial character).
LONG = {"prompt": "long", "max_tokens": 400, "temperature": 0, "ignore_eos": True, "logprobs": 0}


def write_adapter(folder: Path) -> tuple[bytes, bytes]:
    """A PEFT LoRA on the tiny llama's q_proj (hidden 64, 2 layers), random rank-4 weights."""
    from safetensors.numpy import save

    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(2):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = rng.normal(size=(4, 64)).astype(np.float32)
        tensors[f"{prefix}.lora_B.weight"] = rng.normal(size=(64, 4)).astype(np.float32)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    return json.dumps(config).encode(), save(tensors)


class Steps:
    """The engine's model runner with two controls on its real step path: ``fail_next`` makes
    the next step fail as a device error would (the engine's own error path then fails that
    step's requests, and only those); ``pause_after(k)`` lets k more steps start, then holds the
    engine thread before the next one until ``resume``. A paused request cannot finish while the
    test looks at it."""

    def __init__(self, runner) -> None:
        self._submit = runner.submit
        self._cond = threading.Condition()
        self._left: int | None = None  # steps still allowed to start; None: no limit
        self._fail = False

    def __call__(self, scheduled):
        with self._cond:
            self._cond.wait_for(lambda: self._left is None or self._left > 0)
            if self._left is not None:
                self._left -= 1
            fail, self._fail = self._fail, False
        if fail:
            raise RuntimeError("injected device fault")
        return self._submit(scheduled)

    def fail_next(self) -> None:
        with self._cond:
            self._fail = True

    def pause_after(self, steps: int) -> None:
        with self._cond:
            self._left = steps

    def resume(self) -> None:
        with self._cond:
            self._left = None
            self._cond.notify_all()

    @contextmanager
    def paused(self, steps: int = 2) -> Iterator[None]:
        """Two steps: the first token is published (the engine reads a step's tokens after
        starting the next one), and the request is held before its third."""
        self.pause_after(steps)
        try:
            yield
        finally:
            self.resume()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = write_tiny_model(tmp_path_factory.mktemp("lease") / "tiny")
    settings = ServerSettings(
        model=str(folder), data_dir=folder / "data", served_model_name="tiny", num_blocks=256,
        max_num_seqs=4, max_queue=2, max_loras=1, max_lora_rank=8,
        engine_process=False,  # the tests look inside the engine
    )  # fmt: skip
    state = ServerState(settings)
    state.start()
    runner = state.engine.core.runner
    runner.submit = steps = Steps(runner)
    config, weights = write_adapter(folder)
    with running_server(settings, state) as url, httpx.Client(base_url=url, timeout=60) as c:
        files = {"config": ("c.json", config), "weights": ("w.safetensors", weights)}
        assert c.post("/v1/adapters", data={"name": ADAPTER}, files=files).status_code == 201
        yield c, state, steps


def holds(state: ServerState, version: AdapterVersion) -> tuple[int, int]:
    """(sequences admitted, pins on the adapter version)."""
    return state.admission.inflight, state.registry.pinned(version)


@contextmanager
def own_holds(state: ServerState) -> Iterator[AdapterVersion]:
    """One sequence of room and one pin held by the test for the duration."""
    version = state.registry.acquire(ADAPTER)
    room = state.admission.acquire(1)
    try:
        assert holds(state, version) == (1, 1)
        yield version
    finally:
        room.release()
        state.registry.unpin(version)


def data_lines(r: httpx.Response) -> Iterator[str]:
    """The ``data:`` lines of a stream. Hold on to the iterator: one that is dropped midway is
    closed, and closing it closes the connection (a disconnect, to the server)."""
    return (line for line in r.iter_lines() if line.startswith("data:"))


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_stream_holds_its_lease_until_it_ends(server, path):
    c, state, steps = server
    body = {"model": ADAPTER, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "stream": True, "n": 2}  # fmt: skip
    body |= {"prompt": "x", "logprobs": 0} if "chat" not in path else {"messages": [{"role":
             "user", "content": "x"}]}  # fmt: skip
    with own_holds(state) as version:
        with steps.paused(), c.stream("POST", path, json=body) as r:
            lines = data_lines(r)
            next(lines)
            assert holds(state, version) == (3, 2)  # n=2 sequences, one pin
            steps.resume()
            rest = list(lines)
        assert rest[-1] == "data: [DONE]" and all("error" not in line for line in rest)
        assert holds(state, version) == (1, 1)


def test_a_whole_answer_releases_before_it_is_sent(server):
    c, state, _ = server
    with own_holds(state) as version:
        body = {"model": ADAPTER, "prompt": "x", "max_tokens": 5, "temperature": 0}
        assert c.post("/v1/completions", json=body).status_code == 200
        assert holds(state, version) == (1, 1)


def test_a_disconnect_midway_releases_once(server):
    c, state, steps = server
    body = {"model": ADAPTER, "stream": True, **LONG}
    with own_holds(state) as version:
        with steps.paused():
            with c.stream("POST", "/v1/completions", json=body) as r:
                lines = data_lines(r)  # kept: closing it would close the connection already
                next(lines)
                assert holds(state, version) == (2, 2)
            # The engine is still held: the lease is given back by the event loop alone.
            wait_until(lambda: state.admission.inflight == 1, "the lease was not released")
            assert holds(state, version) == (1, 1)
        core = state.engine.core
        wait_until(lambda: not core.has_work, "the aborted request still runs")
        assert holds(state, version) == (1, 1)


def test_an_error_inside_the_event_stream_releases_once(server):
    c, state, steps = server
    body = {"model": ADAPTER, "stream": True, **LONG}
    with own_holds(state) as version:
        with steps.paused(), c.stream("POST", "/v1/completions", json=body) as r:
            lines = data_lines(r)
            next(lines)
            assert holds(state, version) == (2, 2)
            steps.fail_next()
            steps.resume()
            rest = list(lines)
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][5:])["error"]
        assert error["type"] == "server_error" and "injected device fault" in error["message"]
        assert holds(state, version) == (1, 1)

        steps.fail_next()  # a whole answer: the error becomes a 500
        # (after which the server drops the connection: not one to keep alive for the next test)
        close = {"connection": "close"}
        r = c.post("/v1/completions", json={"model": ADAPTER, **LONG}, headers=close)
        assert r.status_code == 500
        assert holds(state, version) == (1, 1)

        # n=2: a failed choice fails the whole request; the other one is aborted
        steps.fail_next()
        r = c.post("/v1/completions", json={"model": ADAPTER, **LONG, "n": 2}, headers=close)
        assert r.status_code == 500
        assert holds(state, version) == (1, 1)
        wait_until(lambda: not state.engine.core.has_work, "the other choice still runs")


def test_a_refused_request_leaves_nothing_pinned(server):
    c, state, _ = server
    with own_holds(state) as version:
        full = state.admission.acquire(state.admission.limit - 1)
        r = c.post("/v1/completions", json={"model": ADAPTER, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert holds(state, version) == (state.admission.limit, 1)
        full.release()
        r = c.post("/v1/completions", json={"model": ADAPTER, "prompt": "x", "n": 7})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        assert holds(state, version) == (1, 1)


@pytest.mark.parametrize("client", ["gone before the first byte", "first send fails"])
def test_a_stream_that_never_starts_gives_its_lease_back(server, client):
    """Its events generator never runs, so no ``finally`` of its own could release anything:
    the response, which owns the lease, does."""
    _, state, _ = server
    with own_holds(state) as version:
        pin = AdapterPin(state.registry, state.registry.acquire(ADAPTER))
        lease = state.admission.acquire(1, pin)
        assert holds(state, version) == (2, 2)
        started = []

        async def events():
            started.append(True)
            yield "never"

        async def receive():
            if client == "gone before the first byte":
                return {"type": "http.disconnect"}
            await asyncio.Event().wait()

        async def send(message):
            if client == "gone before the first byte":
                await asyncio.Event().wait()
            raise OSError("connection reset")

        async def respond():
            await EventStream(events(), lease)({"type": "http"}, receive, send)

        if client == "first send fails":
            with pytest.raises(OSError):
                asyncio.run(respond())
        else:
            asyncio.run(respond())
        assert not started and lease.released
        assert holds(state, version) == (1, 1)
