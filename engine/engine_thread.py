"""The thread an EngineCore's step loop runs on. Only this thread touches MLX (besides the one
that loads the model, before it starts).

Threads that ran MLX work must end in order, or the process aborts at exit with "terminate called
without an active exception". MLX keeps per-thread state in C++ thread-locals: streams, the
compile cache and, once a thread has drawn from it (building a model does, initializing layers),
the default random key, whose destructor takes the GIL. Those destructors run when the OS thread
exits, which is after ``Thread.join()`` has returned in the thread that waited. If that thread is
the main one and goes on to finalize the interpreter, the key's destructor asks for the GIL during
finalization; CPython then ends the asking thread with ``pthread_exit``, and the forced unwind
through a destructor calls ``std::terminate``. So every thread that ran MLX calls
``release_thread_state`` last, while it is still a Python thread, and the engine thread is not a
daemon: ``stop`` ends its loop between steps and joins it, and the interpreter joins it too.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import mlx.core as mx

from engine.background import Background, BackgroundWork, Cancellable
from engine.engine_core import EngineCore
from engine.models.base import CausalLM
from engine.outputs import RequestOutput
from engine.request import EngineRequest
from engine.stats import EngineStats
from engine.training.work import TrainingEvent, TrainingRun, TrainingWork

log = logging.getLogger(__name__)


def release_thread_state() -> None:
    """Call last on a thread that ran MLX work: waits for what it submitted, then drops its
    per-thread MLX state (streams, compile cache, default random key) now, under the GIL,
    rather than in thread-local destructors after the thread is gone from Python's view."""
    mx.synchronize()
    mx.clear_streams()


class EngineThread:
    """Runs an EngineCore's step loop on its own thread.

    Callers (any thread) submit with ``add`` and ``abort``; every step's outputs go to
    ``publish``, called on the engine thread (the asyncio facade forwards them to its loop).
    Long work that shares the device (training) comes in with ``add_background`` and runs in
    units between steps, as ``background``'s policy decides (engine.background); a training run
    on ``model`` (the served model) with ``start_training``.
    """

    def __init__(
        self,
        core: EngineCore,
        publish: Callable[[list[RequestOutput]], None],
        background: Background | None = None,
        model: CausalLM | None = None,
    ) -> None:
        self.core = core
        self.model = model
        self.publish = publish
        self.background = background or Background()
        self._new: queue.SimpleQueue[EngineRequest] = queue.SimpleQueue()
        self._aborts: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.warmed = threading.Event()  # set once warm-up is over (done, failed or skipped)
        self._thread = threading.Thread(target=self._run, name="candlewick-engine")

    def start(self) -> None:
        self._thread.start()

    def add(self, *requests: EngineRequest) -> None:
        """Requests to run; those given in one call reach the core before the same step."""
        self._new.put(requests)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._aborts.put(request_id)
        self._wake.set()

    def add_background(self, work: BackgroundWork) -> None:
        self.background.add(work)
        self._wake.set()

    def start_training(
        self, run: TrainingRun, report: Callable[[TrainingEvent], None]
    ) -> Cancellable:
        """Train on the served model in units between steps; ``report`` gets each event (on
        this thread). The work returned cancels it."""
        if self.model is None:
            raise RuntimeError("this engine was started without a model to train")
        work = TrainingWork(self.model, run, report)
        self.add_background(work)
        return work

    @property
    def stats(self) -> EngineStats:
        """The core's latest published snapshot (safe to read from any thread)."""
        return self.core.stats

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> bool:
        """Ends the loop after the current step (or warm-up) and joins the thread; True once it
        has ended. Requests still running are dropped: drain them first."""
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the engine thread is still in a step after %ss; waiting on", timeout)
            return False
        return True

    def _run(self) -> None:
        try:
            if not self._stop.is_set():
                self.core.warm_up()
        except Exception:  # only a speed-up: serving goes on without it
            log.exception("engine warm-up failed")
        self.warmed.set()
        try:
            self._loop()
        except Exception:
            log.exception("the engine loop failed")
        try:  # the pipelined step still in flight finishes here, then this thread's MLX state goes
            release_thread_state()
        except Exception:
            log.exception("releasing the engine thread's MLX state failed")

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            outputs = self._drain_inbox()
            stepped = self.core.has_work
            if stepped:
                outputs.extend(self.core.step())
            if outputs:
                self.publish(outputs)
            self.background.after_step(self.core.stats, stepped)
            if not self.core.has_work and not self.background.pending:
                # a core that must keep in touch (a tensor-parallel leader) wakes on its own
                self._wake.wait(getattr(self.core, "heartbeat_interval", None))

    def _drain_inbox(self) -> list[RequestOutput]:
        while not self._new.empty():
            for request in self._new.get():
                self.core.add_request(request)
        aborted = []
        while not self._aborts.empty():
            if (out := self.core.abort_request(self._aborts.get())) is not None:
                aborted.append(out)
        return aborted
