"""The BLAS's thread count follows the cores other programs leave free: /proc/stat read per
core, this process's own time taken out, and a policy that gives a core up at once and takes
it back only after a calm spell."""

from __future__ import annotations

import threading

import pytest

from engine import cpu_blas, cpu_threads
from engine.cpu_threads import CpuSample, ThreadPolicy, busy_seconds, others_cores

TICK = cpu_threads._TICK_S

STAT = """cpu  900 10 300 5000 40 5 5 70 0 0
cpu0 100 0 50 2000 10 1 2 30 0 0
cpu1 200 10 100 1000 20 2 1 40 0 0
cpu2 600 0 150 2000 10 2 2 0 0 0
intr 123 4 5
ctxt 999
"""


def test_busy_seconds_sums_user_nice_system_irq_softirq_of_our_cores_only():
    # cpu0: 100+0+50+1+2, cpu1: 200+10+100+2+1; idle, iowait and steal left out; cpu2 is not ours
    assert busy_seconds(STAT, {0, 1}) == pytest.approx((153 + 313) * TICK)
    assert busy_seconds(STAT, {2}) == pytest.approx(754 * TICK)
    assert busy_seconds(STAT, set()) == 0


def test_others_cores_is_the_machine_less_this_process_per_second_of_wall():
    before = CpuSample(wall=10.0, busy=100.0, own=40.0)
    after = CpuSample(wall=10.5, busy=101.0, own=40.7)  # 1.0 s busy, 0.7 of it ours
    assert others_cores(before, after) == pytest.approx(0.6)
    # ticks land on either side of a window: never negative, and no division by a zero wall
    assert others_cores(before, CpuSample(10.5, 100.1, 40.3)) == 0.0
    assert others_cores(before, before) == 0.0


def test_policy_gives_a_core_up_at_once_and_takes_it_back_after_a_calm_spell():
    policy = ThreadPolicy(cores=2, threads=1)
    assert [policy.observe(0.0) for _ in range(cpu_threads.UP_AFTER)] == [None, None, 2]
    assert policy.observe(0.3) is None  # between the two marks: stays
    assert policy.observe(0.67) == 1  # a busy program beside two BLAS threads gets 2/3 of a core
    assert policy.observe(1.0) is None  # it has its core: one thread stays
    assert policy.observe(0.1) is None and policy.observe(0.3) is None  # calm spell broken
    assert [policy.observe(0.0) for _ in range(cpu_threads.UP_AFTER)] == [None, None, 2]
    assert policy.threads == 2


def test_policy_on_many_cores_leaves_what_others_use_rounded_up_and_keeps_one():
    policy = ThreadPolicy(cores=16, threads=16)
    assert policy.observe(2.5) == 13  # 2.5 - 0.4 rounds up to 3 cores left to others
    assert policy.observe(2.5) is None
    assert [policy.observe(0.1) for _ in range(cpu_threads.UP_AFTER)] == [None, None, 16]
    assert policy.observe(40.0) == 1  # never below one thread


def test_govern_applies_each_change_with_what_others_used(monkeypatch):
    monkeypatch.setattr(cpu_threads, "WINDOW_S", 0)  # windows back to back: no waiting here
    stop = threading.Event()
    # per window: others' cores 0, 0, 0 (calm: up to 2), then 0.9 (down to 1), then stop
    others = [0.0, 0.0, 0.0, 0.9]
    samples = [CpuSample(0.0, 0.0, 0.0)]
    for i, used in enumerate(others, start=1):
        last = samples[-1]
        samples.append(CpuSample(i * 1.0, last.busy + used + 0.5, last.own + 0.5))
    reads: list[set[int]] = []

    def read(cores):
        reads.append(set(cores))
        if len(reads) == len(samples):
            stop.set()
        return samples[len(reads) - 1]

    applied: list[tuple[int, float]] = []
    cpu_threads.govern(lambda n, o: applied.append((n, o)), 1, stop, cores={0, 1}, read=read)
    assert applied == [(2, pytest.approx(0.0)), (1, pytest.approx(0.9))]
    assert reads == [{0, 1}] * len(samples)


def test_note_threads_changes_what_the_report_says(monkeypatch):
    report = cpu_blas.BlasReport("OpenBLAS", "ngsolve-openblas wheel", "/x.so", 1, 100.0)
    monkeypatch.setattr(cpu_blas, "_report", report)
    cpu_blas.note_threads(2)
    assert cpu_blas.current_report() == cpu_blas.BlasReport(
        "OpenBLAS", "ngsolve-openblas wheel", "/x.so", 2, 100.0
    )


def test_governed_only_where_the_count_is_ours_and_the_library_real(monkeypatch):
    bundled = cpu_blas.BlasReport("reference BLAS", "bundled", None, None, 6.0)
    monkeypatch.setattr(cpu_blas, "_report", bundled)
    assert cpu_blas.governed({cpu_blas.DEFAULT_THREADS: "1"}) is None
    monkeypatch.setattr(cpu_blas, "_report", None)  # `check` never ran: not on Linux
    assert cpu_blas.governed({cpu_blas.DEFAULT_THREADS: "1"}) is None
    real = cpu_blas.BlasReport("OpenBLAS", "LD_PRELOAD", "/x.so", 2, 100.0)
    monkeypatch.setattr(cpu_blas, "_report", real)
    assert cpu_blas.governed({}) is None  # the user's own count (or their own preload)


def test_the_server_reports_the_engine_process_thread_count(monkeypatch):
    """The engine's process tells each change through its pipe; the server's report, which
    /health shows, follows."""
    from engine.engine_process import EngineProcess

    report = cpu_blas.BlasReport("OpenBLAS", "ngsolve-openblas wheel", "/x.so", 1, 100.0)
    monkeypatch.setattr(cpu_blas, "_report", report)
    process = EngineProcess(None, publish=lambda outputs: None)  # never started
    process._child_conn.send(("blas_threads", 2))
    process._child_conn.send(("stopped",))
    process._read()
    assert cpu_blas.current_report().threads == 2
