"""Work split over helper threads on the CPU: each part on its own thread and MLX stream, the
results in order and equal to the work done whole; the BLAS at one thread per call while the
helpers run, its governed count back after; and an encoder batch split this way gives the
embeddings it gives whole."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest

from engine import cpu_blas
from engine.cpu_workers import CpuWorkers, split_even


def test_split_even_keeps_order_balances_tokens_and_leaves_no_group_empty():
    assert split_even([64] * 8, 2) == [range(0, 4), range(4, 8)]
    assert split_even([100, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 5)]
    assert split_even([1, 1, 1, 1, 100], 2) == [range(0, 4), range(4, 5)]
    assert split_even([5, 5, 5], 3) == [range(0, 1), range(1, 2), range(2, 3)]
    assert split_even([5, 5], 4) == [range(0, 1), range(1, 2)]  # fewer items than parts
    assert split_even([7], 2) == [range(0, 1)]
    for lengths in ([3, 9, 1, 4, 4, 12, 2], [1] * 9, [50, 2, 2, 2, 2, 2, 50]):
        for parts in (1, 2, 3, 4):
            groups = split_even(lengths, parts)
            assert [i for g in groups for i in g] == list(range(len(lengths)))
            assert all(len(g) for g in groups) and len(groups) == min(parts, len(lengths))


def test_each_part_runs_on_its_own_helper_and_results_come_in_order():
    seen: list[int] = []
    barrier = threading.Barrier(3, timeout=10)  # every part waits for the others: all at once

    def work(x: int) -> int:
        seen.append(threading.get_ident())
        barrier.wait()
        return int(mx.sum(mx.arange(x)).item())

    with CpuWorkers() as workers:
        assert workers.map(work, [10, 20, 30]) == [45, 190, 435]
        assert workers.count == 3 and len(set(seen)) == 3
        assert threading.get_ident() not in seen
    assert workers.count == 0


def test_a_failing_part_raises_after_every_part_has_ended():
    ended: list[int] = []

    def work(x: int) -> int:
        if x == 1:
            raise ValueError("part one is bad")
        ended.append(x)
        return x

    with CpuWorkers() as workers:
        with pytest.raises(ValueError, match="part one is bad"):
            workers.map(work, [0, 1, 2])
        assert sorted(ended) == [0, 2]
        assert workers.map(work, [4, 5]) == [4, 5]  # the helpers go on


def test_mlx_work_on_helpers_equals_the_same_work_on_this_thread():
    rng = np.random.default_rng(0)
    w = mx.array(rng.standard_normal((96, 64)).astype(np.float32))
    xs = [mx.array(rng.standard_normal((n, 96)).astype(np.float32)) for n in (5, 17, 33)]

    def forward(x: mx.array) -> np.ndarray:
        return np.array(mx.softmax(mx.tanh(x @ w), axis=-1))

    whole = [forward(x) for x in xs]
    with CpuWorkers() as workers:
        parts = workers.map(forward, xs)
    for a, b in zip(whole, parts, strict=True):
        np.testing.assert_array_equal(a, b)


def test_one_thread_each_sets_the_blas_to_one_and_back_to_the_governed_count(monkeypatch):
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(cpu_blas, "set_threads", lambda path, n: calls.append((path, n)) or True)
    monkeypatch.setattr(cpu_blas, "_governed", None)
    assert cpu_blas.shared_cores() == 1  # nothing governed: the user's count, left alone
    with cpu_blas.one_thread_each():
        pass
    assert calls == []
    cpu_blas.govern_threads("/x.so", 2)
    assert cpu_blas.shared_cores() == 2
    with cpu_blas.one_thread_each():
        assert calls == [("/x.so", 2), ("/x.so", 1)]
    assert calls[-1] == ("/x.so", 2)
    with pytest.raises(RuntimeError), cpu_blas.one_thread_each():
        raise RuntimeError("a failed part")
    assert calls[-1] == ("/x.so", 2)  # restored on failure too


def test_the_governor_waits_while_helpers_run(monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(cpu_blas, "set_threads", lambda path, n: calls.append(n) or True)
    monkeypatch.setattr(cpu_blas, "_governed", ("/x.so", 2))
    with cpu_blas.one_thread_each():
        governor = threading.Thread(target=cpu_blas.govern_threads, args=("/x.so", 1))
        governor.start()
        governor.join(0.1)
        assert governor.is_alive() and calls == [1]  # its change waits for the helpers
    governor.join(5)
    assert calls == [1, 2, 1] and cpu_blas.shared_cores() == 1
