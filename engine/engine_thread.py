"""The thread an EngineCore's step loop runs on. Only this thread touches MLX."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from engine.engine_core import EngineCore
from engine.outputs import RequestOutput
from engine.request import EngineRequest

log = logging.getLogger(__name__)


class EngineThread:
    """Runs an EngineCore's step loop on its own thread.

    Callers (any thread) submit with ``add`` and ``abort``; every step's outputs go to
    ``publish``, called on the engine thread (the asyncio facade forwards them to its loop).
    """

    def __init__(self, core: EngineCore, publish: Callable[[list[RequestOutput]], None]) -> None:
        self.core = core
        self.publish = publish
        self._new: queue.SimpleQueue[EngineRequest] = queue.SimpleQueue()
        self._aborts: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="candlewick-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, request: EngineRequest) -> None:
        self._new.put(request)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._aborts.put(request_id)
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self.core.warm_up()
        except Exception:  # only a speed-up: serving goes on without it
            log.exception("engine warm-up failed")
        while not self._stop.is_set():
            self._wake.clear()
            outputs = self._drain_inbox()
            if self.core.has_work:
                outputs.extend(self.core.step())
            if outputs:
                self.publish(outputs)
            if not self.core.has_work:
                self._wake.wait()

    def _drain_inbox(self) -> list[RequestOutput]:
        while not self._new.empty():
            self.core.add_request(self._new.get())
        aborted = []
        while not self._aborts.empty():
            if (out := self.core.abort_request(self._aborts.get())) is not None:
                aborted.append(out)
        return aborted
