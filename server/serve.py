"""Running the app under uvicorn, with a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys

import uvicorn

from engine.loader.load import model_name
from server.app import create_app
from server.settings import ServerSettings
from server.state import ServerState

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """On SIGTERM: stop admitting (503), let running requests finish within the grace period,
    then exit. A second signal, or SIGINT, exits at once as uvicorn normally does."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        admission = self.state.admission
        if sig != signal.SIGTERM or self._draining or admission is None or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        admission.draining = True
        log.info("SIGTERM: draining %d sequences", admission.inflight)
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.state.settings.shutdown_grace
        while self.state.admission.inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.should_exit = True


def serve(settings: ServerSettings) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    state = ServerState(settings)
    app = create_app(settings, state)
    url = f"http://{settings.host}:{settings.port}"
    print(f"candlewick: serving on {url} (the model loads in the background; /health says when)")
    auth = ' -H "Authorization: Bearer $CANDLEWICK_API_KEY"' if settings.api_keys else ""
    try:
        name = settings.served_model_name or model_name(settings.model)
    except FileNotFoundError:
        name = "<id from /v1/models>"  # loading will report what is missing
    body = {"model": name, "messages": [{"role": "user", "content": "Hello!"}]}
    print(
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
        f"-d '{json.dumps(body)}'",
        flush=True,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=1,
    )
    server = DrainingServer(config, state)

    def give_up() -> None:
        server.should_exit = True  # read by uvicorn's main loop; nothing to serve

    state.on_load_failed = give_up
    server.run()
    if state.load_error:
        print(f"candlewick: error: {state.load_error}", file=sys.stderr)
        return 1
    return 0
