"""The asyncio face of the engine: ``generate()`` is an async iterator of ``RequestOutput``s."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

from engine.background import Background, Cancellable
from engine.encoder_core import EncodeRequest
from engine.engine_core import EngineCore
from engine.engine_process import EngineInfo, EngineProcess, EngineSpec
from engine.engine_thread import EngineThread
from engine.models.base import CausalLM
from engine.outputs import RequestOutput
from engine.request import EngineRequest
from engine.stats import EngineStats
from engine.training.work import TrainingEvent, TrainingRun


class AsyncEngine:
    """Submits requests to the engine thread (hop 1) and routes each step's outputs back to the
    awaiting coroutine on the event loop (hop 2, ``call_soon_threadsafe``).

    A caller that stops iterating before the request finishes (a client that went away, a
    cancelled task) aborts it: its KV blocks are freed on the engine's next turn.

    A caller that falls behind (a busy event loop: many streams, each token's text, SSE and
    socket work) gets the outputs waiting for it merged into one, so its per-output costs are
    paid once per wake-up rather than once per token, and it catches up instead of lagging.
    """

    def __init__(
        self,
        core: EngineCore | None,
        background: Background | None = None,
        model: CausalLM | None = None,
        *,
        process: EngineSpec | None = None,
        on_exit: Callable[[str], None] | None = None,
    ) -> None:
        """The engine on a thread of this process over ``core`` (``model``: the served model,
        which training runs on), or, given ``process``, in a process of its own that loads the
        model itself (engine.engine_process; ``on_exit`` hears if that process ends
        unasked). Returns once the engine has started (its warm-up may still run)."""
        self.core = core  # None when the engine runs in another process
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: EngineThread | EngineProcess
        if process is not None:
            self._thread = EngineProcess(process, self._publish, on_exit)
        else:
            self._thread = EngineThread(core, self._publish, background, model)
        self._thread.start()

    @property
    def info(self) -> EngineInfo | None:
        """What an engine in its own process loaded (None for one on a thread here)."""
        return self._thread.info if isinstance(self._thread, EngineProcess) else None

    async def generate(
        self, request: EngineRequest | EncodeRequest
    ) -> AsyncIterator[RequestOutput]:
        with self._opened([request]) as (streams, finished):
            stream = streams[request.request_id]
            while not finished:
                output = await stream.get()
                while not output.finished and not stream.empty():
                    output = output.merge(stream.get_nowait())
                if output.finished:
                    finished.add(request.request_id)
                yield output

    async def embed(self, requests: Sequence[EngineRequest | EncodeRequest]) -> list[RequestOutput]:
        """Pooling requests' one output each (an embedding, or an error or abort), in order.
        They reach the engine together, so its next step sees all of them (as many as its
        token budget takes), not the first alone. Leaving early aborts those not finished."""
        done: dict[str, RequestOutput] = {}
        with self._opened(requests) as (streams, finished):
            for request_id, stream in streams.items():
                while not (output := await stream.get()).finished:
                    pass
                done[request_id] = output
                finished.add(request_id)
        return [done[r.request_id] for r in requests]

    @contextlib.contextmanager
    def _opened(
        self, requests: Sequence[EngineRequest | EncodeRequest]
    ) -> Iterator[tuple[dict[str, asyncio.Queue[RequestOutput]], set[str]]]:
        """Each request's output queue, the requests added to the engine in one call, and the
        set of those the caller saw finish: on leaving, the others are aborted (the caller went
        away) and every queue is dropped."""
        ids = [r.request_id for r in requests]
        if len(set(ids)) < len(ids):
            raise ValueError(f"request ids repeat within one call: {ids}")
        if running := [i for i in ids if i in self._streams]:
            raise ValueError(f"request id {running[0]!r} is already running")
        self._loop = asyncio.get_running_loop()
        streams: dict[str, asyncio.Queue[RequestOutput]] = {i: asyncio.Queue() for i in ids}
        self._streams.update(streams)
        finished: set[str] = set()
        try:
            self._thread.add(*requests)
            yield streams, finished
        finally:
            for request_id in ids:
                self._streams.pop(request_id, None)
                if request_id not in finished:
                    self._thread.abort(request_id)

    @property
    def warmed(self) -> bool:
        """Whether the engine thread's warm-up is over (requests before then wait for it)."""
        return self._thread.warmed.is_set()

    def wait_warm(self, timeout: float | None = None) -> bool:
        """Block until the warm-up is over; whether it is."""
        return self._thread.warmed.wait(timeout)

    @property
    def stats(self) -> EngineStats:
        """The engine's latest published snapshot (safe to read from any thread)."""
        return self._thread.stats

    @property
    def alive(self) -> bool:
        return self._thread.alive

    def abort(self, request_id: str) -> None:
        self._thread.abort(request_id)

    def start_training(
        self, run: TrainingRun, report: Callable[[TrainingEvent], None]
    ) -> Cancellable:
        """Train on the served model between steps, wherever the engine runs; ``report`` gets
        each event (on an engine thread), the handle returned cancels it."""
        return self._thread.start_training(run, report)

    def shutdown(self) -> None:
        self._thread.stop(timeout=10)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put_nowait(output)
