"""Helper threads that let one engine step use every core the CPU gives it.

MLX's CPU backend runs a graph's element-wise work, reductions and gathers on one thread per
stream; only the BLAS spreads a matmul over cores. Work that splits into independent parts (an
encoder batch: every sequence is its own) runs faster as one part per core, each on its own
thread and MLX stream with a one-thread BLAS, than as one graph with a many-thread BLAS: all
of it runs in parallel then, not only the matmuls (all-MiniLM-L6-v2, 64 inputs of 64 tokens,
2 cores: 0.66 s against 0.81 s; docs/benchmarks.md).

The engine thread hands the parts over and waits for them: MLX work still happens only within
the engine thread's step. Each helper keeps its stream for its life and drops its MLX state
before it ends (``close``), so no MLX thread state outlives the helpers.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import mlx.core as mx

T = TypeVar("T")
R = TypeVar("R")

_STOP = object()


class CpuWorkers:
    """Runs ``fn(part)`` for each part on its own helper thread (started on first use, kept
    until ``close``; ``with CpuWorkers() as workers:`` closes them at the end)."""

    def __init__(self, name: str = "candlewick-cpu-worker") -> None:
        self.name = name
        self._threads: list[tuple[threading.Thread, queue.SimpleQueue]] = []

    def __enter__(self) -> CpuWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def count(self) -> int:
        return len(self._threads)

    def map(self, fn: Callable[[T], R], parts: Sequence[T]) -> list[R]:
        """``[fn(p) for p in parts]``, every call at once on a helper of its own; raises the
        first part's error, after every part has ended."""
        while len(self._threads) < len(parts):
            self._start()
        futures: list[Future] = []
        for (_, inbox), part in zip(self._threads, parts, strict=False):
            future: Future = Future()
            inbox.put((fn, part, future))
            futures.append(future)
        errors = [f.exception() for f in futures]  # waits for every part
        for error in errors:
            if error is not None:
                raise error
        return [f.result() for f in futures]

    def close(self) -> None:
        """Ends the helpers (each drops its MLX state first) and waits for them."""
        for _, inbox in self._threads:
            inbox.put(_STOP)
        for thread, _ in self._threads:
            thread.join()
        self._threads.clear()

    def _start(self) -> None:
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        name = f"{self.name}-{len(self._threads)}"
        thread = threading.Thread(target=_serve, args=(inbox,), name=name, daemon=True)
        thread.start()
        self._threads.append((thread, inbox))


def _serve(inbox: queue.SimpleQueue) -> None:
    stream = mx.new_stream(mx.cpu)
    try:
        while (task := inbox.get()) is not _STOP:
            fn, part, future = task
            try:
                with mx.stream(stream):
                    result: Any = fn(part)
            except BaseException as e:  # reported to the caller, who re-raises it
                future.set_exception(e)
            else:
                future.set_result(result)
    finally:
        mx.synchronize()
        mx.clear_streams()


def split_even(lengths: Sequence[int], parts: int) -> list[range]:
    """Contiguous index ranges of ``lengths`` in at most ``parts`` groups of about equal total
    length (none empty), in order."""
    parts = max(1, min(parts, len(lengths)))
    total = sum(lengths)
    bounds, start, acc = [], 0, 0
    for i, n in enumerate(lengths):
        acc += n
        remaining_groups = parts - len(bounds) - 1
        remaining_items = len(lengths) - i - 1
        if remaining_groups and (
            acc >= total * (len(bounds) + 1) / parts or remaining_items == remaining_groups
        ):
            bounds.append(range(start, i + 1))
            start = i + 1
    bounds.append(range(start, len(lengths)))
    return [b for b in bounds if len(b)]
