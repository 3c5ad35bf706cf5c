"""Running the app under uvicorn: start-up checks, a graceful drain on SIGTERM, an orderly exit.

Exit statuses: 0 after SIGTERM (drained, or stopped before the model had loaded), 130 after
SIGINT, 1 when the server cannot start (no model there, weights that do not load, a KV cache that
does not fit, a port in use): then the last line on stderr says why, and nothing else is dumped.

Teardown order: uvicorn stops serving, the lifespan stops the engine thread and joins it, and only
then does the interpreter exit, so no thread is inside MLX when MLX's static destructors run. A
stop that comes while the model is still loading does not wait for the load (which cannot be
interrupted and can take minutes): the process ends at once with ``os._exit``, before the load
thread's MLX work could meet interpreter finalization, and without writing anything (the adapter
store is opened only once the model has loaded).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from engine.loader.load import ModelNotFound, default_model_path, model_name
from engine.parallel.group import launched
from server.app import create_app
from server.settings import ServerSettings
from server.state import ServerState

if TYPE_CHECKING:
    from server.tensor_parallel import Parallel

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The server cannot start; the message says why, in one line."""


class DrainingServer(uvicorn.Server):
    """On SIGTERM: stop admitting (503), let running requests finish within the grace period,
    then exit. A second signal, or SIGINT, exits at once as uvicorn normally does.

    Unlike uvicorn, it does not re-raise the signal after shutting down (that would end the
    process by the signal, skipping the exit status): ``stopped_by`` records it instead."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.stopped_by: int | None = None
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        self.stopped_by = self.stopped_by or sig
        admission = self.state.admission
        if sig == signal.SIGTERM and not (self._draining or admission is None or not self._loop):
            self._draining = True
            admission.draining = True
            log.info("SIGTERM: draining %d sequences", admission.inflight)
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))
        elif self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.state.settings.shutdown_grace
        while self.state.admission.inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.should_exit = True


def serve(settings: ServerSettings, parallel: Parallel | None = None) -> int:
    """Serve until stopped; the exit status. ``parallel``: this process is rank 0 of a
    tensor-parallel group (``server.tensor_parallel`` starts or joins the ranks, then calls
    this)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if parallel is None and (settings.tensor_parallel > 1 or launched()):
        from server.tensor_parallel import serve_parallel

        return serve_parallel(settings)
    try:
        name = check_model(settings.model)
        if settings.embedding_model is not None:
            check_model(settings.embedding_model)
        name = settings.served_model_name or name
        sock = listen(settings.host, settings.port)
    except StartupError as e:
        return fail(str(e))
    state = ServerState(settings, parallel=parallel)
    app = create_app(settings, state)
    url = f"http://{settings.host}:{settings.port}"
    print(f"candlewick: serving on {url} (the model loads in the background; /health says when)")
    auth = ' -H "Authorization: Bearer $CANDLEWICK_API_KEY"' if settings.api_keys else ""
    body = {"model": name, "messages": [{"role": "user", "content": "Hello!"}]}
    print(
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
        f"-d '{json.dumps(body)}'",
        flush=True,
    )
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=1)
    server = DrainingServer(config, state)

    def give_up() -> None:
        server.should_exit = True  # read by uvicorn's main loop; nothing to serve

    state.on_load_failed = give_up
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    loader = app.state.loader
    if state.load_error:
        loader.join()  # it reported and is ending (its MLX state already released)
        return fail(state.load_error)
    if loader is not None and loader.is_alive():
        _exit_now(0 if server.stopped_by == signal.SIGTERM else 130)
    return 130 if server.stopped_by == signal.SIGINT else 0


def check_model(model: str | None) -> str:
    """The served name of ``model`` (a path, or None for the default model); a StartupError if
    there is nothing there, before any port is opened or anything is loaded."""
    try:
        path = Path(model).expanduser() if model is not None else default_model_path()
    except ModelNotFound as e:
        raise StartupError(f"ModelNotFound: {e}") from None
    if not path.exists():
        raise StartupError(f"ModelNotFound: model path {path} does not exist")
    return model_name(path)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the model loads: a port in use is reported at once."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        # create_server appends the address to strerror; the bare reason reads better.
        reason = os.strerror(e.errno) if e.errno and e.errno > 0 else (e.strerror or str(e))
        raise StartupError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


def fail(message: str) -> int:
    print(f"candlewick: error: {message}", file=sys.stderr, flush=True)
    return 1


def _exit_now(status: int) -> None:
    """Ends the process while the model is still loading (see the module docstring)."""
    print("candlewick: stopped before the model finished loading", file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
