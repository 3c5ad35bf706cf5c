"""loop_cpu's per-thread CPU accounting, on this test's own process."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from loadtests.loop_cpu import per_token, thread_cpu

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_cpu_is_charged_to_the_thread_that_spent_it():
    pid = os.getpid()
    spun, leave = threading.Event(), threading.Event()

    def work() -> None:
        _spin(0.3)
        spun.set()
        leave.wait()  # still listed when the CPU is read

    worker = threading.Thread(target=work)
    before = thread_cpu(pid)
    worker.start()
    spun.wait()
    after = thread_cpu(pid)
    leave.set()
    worker.join()
    assert pid in before and worker.native_id in after
    cost = per_token(before, after, pid, tokens=1000)  # µs per token = ms of CPU here
    assert cost["process_us"] - cost["loop_us"] >= 250  # the worker's 0.3 s
    before = thread_cpu(pid)
    _spin(0.3)
    cost = per_token(before, thread_cpu(pid), pid, tokens=1000)
    assert 250 <= cost["loop_us"] <= cost["process_us"]
