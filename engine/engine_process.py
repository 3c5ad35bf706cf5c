"""The engine in a process of its own: the HTTP server's event loop and the engine's step loop
never wait for each other's hold on the interpreter.

In one process they would: MLX's bindings hold the GIL while ``eval`` and ``async_eval`` queue
a step's kernels, so on a GPU, where decoding one sequence is bound by the host's time to build
and queue each step, every token's work on the event loop (detokenizing, SSE, the socket) was
added to the step, plus a forced thread switch or two. Here the engine process owns MLX, the
model and the step loop; the server's process tokenizes, detokenizes and streams.

The two talk over a ``multiprocessing`` pipe (a socket pair; pickled messages):

- server → engine: ``("add", [(request_id, pickled request), ...])`` (requests given together
  arrive together), ``("abort", id)``,
  ``("train", token, TrainingRun)``, ``("cancel", token)``, ``("stop",)``;
- engine → server: ``("ready", EngineInfo)`` or ``("error", kind, message)`` once, then
  ``("out", outputs, stats)`` after each step that produced outputs, ``("stats", stats)``
  when only the numbers moved, ``("warmed",)``, ``("train", token, event)``, ``("stopped",)``.

A request's grammar constraint travels as what it was compiled from and is compiled again
here (``GrammarConstraint.__reduce__``). The engine process dying (killed, out of memory)
ends every open stream with an error and tells ``on_exit``: the server then says so on
``/health`` and exits non-zero, never hangs.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from tqdm import tqdm

from engine import cpu_blas
from engine.config import ConfigError, EngineConfig
from engine.loader.build import LoadedModel
from engine.loader.encoder import LoadedEncoder
from engine.loader.load import ModelNotFound
from engine.loader.quantize import QuantSpec
from engine.outputs import RequestOutput
from engine.stats import EngineStats
from engine.training.lora import ProjectionShapes
from engine.training.work import Failed, Finished, Stopped, TrainingEvent, TrainingRun

log = logging.getLogger(__name__)

STATS_INTERVAL = 0.25  # seconds between pushes of statistics that moved without outputs
STOP_TIMEOUT = 30.0  # seconds the engine process gets to end its step and exit


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """Everything the engine process needs to load the model and start the engine."""

    model: str | None
    config: EngineConfig
    quantize: QuantSpec | None = None
    cpu_weights: str = "auto"
    cuda_weights: str = "auto"
    embedding_model: str | None = None  # an encoder served beside the model
    served_name: str | None = None  # the model's served name (an encoder's must differ)
    embedding_batch_tokens: int = 8192
    serve_steps: int = 4  # the training interleave policy's


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What the engine process loaded, as the server needs it: the model without its weights
    (tokenizer, config, defaults), the KV blocks it got, the LoRA shapes training plans for,
    and the device memory left once it started."""

    loaded: LoadedModel | LoadedEncoder  # ``model`` is None: the weights stay there
    dtype_name: str  # the compute dtype's name in mlx.core ("bfloat16")
    embedding: LoadedEncoder | None
    num_blocks: int
    shapes: ProjectionShapes | None
    available_memory: int


class EngineStartError(RuntimeError):
    """The engine process could not start: ``kind`` names its error's type there."""

    def __init__(self, message: str, kind: str = "EngineStartError") -> None:
        super().__init__(message)
        self.kind = kind


class EngineProcess:
    """The server's side of an engine process, with an engine thread's interface (``start``,
    ``add``, ``abort``, ``start_training``, ``stop``, ``warmed``, ``stats``, ``alive``):
    ``AsyncEngine`` drives either.

    ``start`` spawns the process and returns once the model is loaded and the engine runs, with
    ``info`` set; its start-up error (a missing model, a bad setting) is raised here, as the
    same kind where it is one of ours. A reader thread turns the process's messages into
    ``publish`` calls, training events and statistics."""

    def __init__(
        self,
        spec: EngineSpec,
        publish: Callable[[list[RequestOutput]], None],
        on_exit: Callable[[str], None] | None = None,
    ) -> None:
        self.publish, self.on_exit = publish, on_exit
        self.info: EngineInfo | None = None
        self.stats = EngineStats()
        self.warmed = threading.Event()
        self._context = multiprocessing.get_context("spawn")  # never a fork of MLX's state
        self._conn, self._child_conn = self._context.Pipe()
        self._process = self._context.Process(
            target=_engine_main, args=(self._child_conn, spec), name="candlewick-engine"
        )
        self._send_lock = threading.Lock()
        self._open: set[str] = set()  # requests added and not finished
        self._training: dict[int, Callable[[TrainingEvent], None]] = {}
        self._next_token = 0
        self._stopping = threading.Event()
        self._ended: str | None = None  # why the process ended, once it has
        self._reader = threading.Thread(
            target=self._read, name="candlewick-engine-reader", daemon=True
        )

    # -- starting and stopping ------------------------------------------------------------------

    def start(self) -> None:
        self._process.start()
        self._child_conn.close()
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            self._process.join(STOP_TIMEOUT)
            raise EngineStartError(
                f"the engine process ended while starting (exit code {self._process.exitcode})"
            ) from None
        if message[0] == "error":
            self._process.join(STOP_TIMEOUT)
            _, kind, text = message
            if kind in _START_ERRORS:
                raise _START_ERRORS[kind](text)
            raise EngineStartError(text, kind)
        self.info = message[1]
        self._reader.start()
        # An interpreter that exits without ``stop`` (a script, a test that forgot) stops the
        # engine first: multiprocessing's own exit handler would wait for it forever.
        atexit.register(self.stop)

    def stop(self, timeout: float | None = STOP_TIMEOUT) -> bool:
        """Ask the engine to end after its current step and wait for the process; one that
        does not end in ``timeout`` is killed. True once it has ended."""
        if self._stopping.is_set():
            return not self._process.is_alive()
        self._stopping.set()
        atexit.unregister(self.stop)
        if self._process.pid is None:
            return True
        with contextlib.suppress(OSError):  # already gone
            self._send(("stop",))
        self._process.join(timeout)
        if self._process.is_alive():
            log.warning("the engine process did not stop in %ss; killing it", timeout)
            self._process.kill()
            self._process.join()
        if self._reader.ident is not None:
            self._reader.join(timeout)
        return not self._process.is_alive()

    @property
    def alive(self) -> bool:
        return self._process.is_alive() and self._ended is None

    # -- requests -------------------------------------------------------------------------------

    def add(self, *requests: Any) -> None:
        """Requests to run; those given in one call reach the engine in one message."""
        self._open.update(r.request_id for r in requests)
        if self._ended is not None:
            self.publish([_ended_output(r.request_id, self._ended) for r in requests])
            return
        self._send(("add", [(r.request_id, pickle.dumps(r)) for r in requests]))

    def abort(self, request_id: str) -> None:
        if self._ended is None:
            with contextlib.suppress(OSError):  # the process is gone: nothing runs to abort
                self._send(("abort", request_id))

    def start_training(
        self, run: TrainingRun, report: Callable[[TrainingEvent], None]
    ) -> _RemoteTraining:
        with self._send_lock:
            token = self._next_token
            self._next_token += 1
            self._training[token] = report
        self._send(("train", token, run))
        return _RemoteTraining(self, token)

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self._conn.send(message)

    # -- the reader thread ----------------------------------------------------------------------

    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                kind = message[0]
                if kind == "out":
                    outputs, self.stats = message[1], message[2]
                    for output in outputs:
                        if output.finished:
                            self._open.discard(output.request_id)
                    self.publish(outputs)
                elif kind == "stats":
                    self.stats = message[1]
                elif kind == "warmed":
                    self.warmed.set()
                elif kind == "blas_threads":  # what /health reports
                    cpu_blas.note_threads(message[1])
                elif kind == "train":
                    _, token, event = message
                    if isinstance(event, (Finished, Failed, Stopped)):
                        report = self._training.pop(token, None)
                    else:
                        report = self._training.get(token)
                    if report is not None:
                        report(event)
                elif kind == "stopped":
                    return
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("reading from the engine process failed")
        self._process.join(5)
        self._ended = f"the engine process ended (exit code {self._process.exitcode})"
        self.warmed.set()  # nobody waits for a warm-up that will never come
        if self._stopping.is_set():
            return
        log.error("%s; ending its requests", self._ended)
        open_ids, self._open = list(self._open), set()
        if open_ids:
            self.publish([_ended_output(rid, self._ended) for rid in open_ids])
        training, self._training = list(self._training.values()), {}
        for report in training:  # a run that was under way failed with its process
            report(Failed(self._ended))
        if self.on_exit is not None:
            self.on_exit(self._ended)


class _RemoteTraining:
    """A training run in the engine process; ``cancel`` stops it at its next unit."""

    def __init__(self, process: EngineProcess, token: int) -> None:
        self.process, self.token = process, token

    def cancel(self) -> None:
        with contextlib.suppress(OSError):  # the process is gone, and the run with it
            self.process._send(("cancel", self.token))


def _ended_output(request_id: str, why: str) -> RequestOutput:
    return RequestOutput(request_id, (), finished=True, finish_reason="abort", error=why)


_START_ERRORS: dict[str, type[Exception]] = {
    "ConfigError": ConfigError,
    "ModelNotFound": ModelNotFound,
}


# -- the engine process -------------------------------------------------------------------------


def _engine_main(conn, spec: EngineSpec) -> None:
    """The engine process: load, start the engine thread, then relay the pipe's messages until
    told to stop (or the server's end of the pipe closes). Exits with ``os._exit`` once the
    engine thread has ended and released MLX: nothing of MLX's is left for destructors."""
    # Signals are the server's to handle: it drains, then stops this process through the pipe
    # (a terminal's Ctrl-C or a service manager's SIGTERM reaches every process of the group).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # tqdm's default lock is a multiprocessing one, which this process's exit would leave behind
    tqdm.set_lock(threading.RLock())
    send_lock = threading.Lock()

    def send(message: tuple) -> None:
        with send_lock:
            conn.send(message)

    try:
        engine, info = _start(spec, send)
    except BaseException as e:  # reported by the server, as it reports its own load errors
        log.debug("the engine could not start", exc_info=True)
        send(("error", type(e).__name__, str(e)))
        _exit(1)
    send(("ready", info))
    engine.start()
    threading.Thread(target=_relay_stats, args=(engine, send), daemon=True).start()
    _govern_blas_threads(send)
    training: dict[int, Any] = {}
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                log.warning("the server's end of the engine pipe closed; stopping")
                break
            except Exception:  # a message that does not unpickle here: it alone is lost
                log.exception("a message from the server could not be read")
                continue
            kind = message[0]
            if kind == "add":
                _add(engine, message[1], send)
            elif kind == "abort":
                engine.abort(message[1])
            elif kind == "train":
                token = message[1]
                report = _reporter(token, send, training)
                training[token] = engine.start_training(message[2], report)
            elif kind == "cancel":
                if (work := training.pop(message[1], None)) is not None:
                    work.cancel()
            elif kind == "stop":
                break
    finally:
        engine.stop()
        with contextlib.suppress(OSError):
            send(("stopped",))
    _exit(0)


def _start(spec: EngineSpec, send: Callable[[tuple], None]):
    """Load the model and build the engine thread (not started); the info the server needs."""
    from engine.assembly import assemble, load_models
    from engine.engine_thread import EngineThread, release_thread_state
    from engine.memory import MemoryReading, available_memory
    from engine.structured.grammar import accept_constraints
    from engine.training.lora import projection_shapes

    cpu_blas.check()
    loaded, embedding = load_models(spec)
    core, background, num_blocks = assemble(loaded, embedding, spec)
    publish = _publisher(core, send)
    is_decoder = isinstance(loaded, LoadedModel)
    engine = EngineThread(core, publish, background, loaded.model if is_decoder else None)
    accept_constraints(loaded.tokenizer.backend.to_str())
    info = EngineInfo(
        loaded=replace(loaded, model=None, dtype=None),
        dtype_name=str(loaded.dtype).split(".")[-1],
        embedding=replace(embedding, model=None) if embedding is not None else None,
        num_blocks=num_blocks,
        shapes=projection_shapes(loaded.model) if is_decoder else None,
        available_memory=available_memory(MemoryReading.now()).nbytes,
    )
    release_thread_state()  # this thread loaded; the engine thread runs everything from here
    return engine, info


def _publisher(core, send: Callable[[tuple], None]) -> Callable[[list[RequestOutput]], None]:
    def publish(outputs: list[RequestOutput]) -> None:
        send(("out", outputs, core.stats))

    return publish


def _relay_stats(engine, send: Callable[[tuple], None]) -> None:
    """Tell the server when the warm-up is over, then push statistics that moved between
    steps' outputs (a request queued, an abort)."""
    engine.warmed.wait()
    send(("warmed",))
    last = None
    stop = threading.Event()
    while engine.alive and not stop.wait(STATS_INTERVAL):
        stats = engine.stats
        if stats != last:
            last = stats
            try:
                send(("stats", stats))
            except OSError:
                return


def _govern_blas_threads(send: Callable[[tuple], None]) -> None:
    """Where the BLAS's thread count is ours, let it follow the cores the rest of the machine
    leaves free (`engine.cpu_threads`), and tell the server each change."""
    import mlx.core as mx

    from engine import cpu_threads

    if mx.default_device() != mx.cpu:  # the model runs on a GPU: the BLAS has little to do
        return
    if (blas := cpu_blas.governed()) is None:
        return
    path = blas.path

    def apply(threads: int, others: float) -> None:
        cpu_blas.govern_threads(path, threads)
        plural = "s" * (threads != 1)
        log.info("cpu blas: %d thread%s (other programs use %.1f cores)", threads, plural, others)
        with contextlib.suppress(OSError):
            send(("blas_threads", threads))

    start = blas.threads or 1
    log.info("cpu blas: its threads follow the cores other programs leave free (now %s)", start)
    cpu_blas.govern_threads(path, start)
    stop = threading.Event()  # never set: the thread ends with the process
    args = (apply, start, stop)
    threading.Thread(
        target=cpu_threads.govern, args=args, name="candlewick-blas-threads", daemon=True
    ).start()


def _add(engine, items: list[tuple[str, bytes]], send: Callable[[tuple], None]) -> None:
    requests, failed = [], []
    for request_id, payload in items:
        try:
            requests.append(pickle.loads(payload))
        except Exception as e:  # a grammar that does not compile here: that request fails alone
            log.exception("request %s could not be received", request_id)
            error = f"{type(e).__name__}: {e}"
            failed.append(RequestOutput(request_id, (), True, "abort", error=error))
    if failed:
        send(("out", failed, engine.stats))
    engine.add(*requests)


def _reporter(
    token: int, send: Callable[[tuple], None], runs: dict[int, Any]
) -> Callable[[TrainingEvent], None]:
    def report(event: TrainingEvent) -> None:
        if isinstance(event, (Finished, Failed, Stopped)):
            runs.pop(token, None)  # over: its work (and its trainer's state) can go
        send(("train", token, event))

    return report


def _exit(status: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
