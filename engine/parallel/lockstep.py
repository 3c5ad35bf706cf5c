"""One scheduler decision per step for every rank.

Every rank runs a whole ``EngineCore`` over its shard of the model: the same scheduler, the same
KV block tables, the same sampler keys. Rank 0 alone takes requests (it serves HTTP). At the
start of each step it broadcasts what arrived since the last one (new requests, aborts, in
arrival order); every rank applies that list to its core, then steps it. The engine is
deterministic given its inputs (``EngineConfig.seed`` seeds the sampler), so every rank
schedules the same batch, runs the same collectives, and samples the same tokens from the same
(replicated-head) logits: no token ever travels between ranks, and only rank 0 publishes.

Faults: a lost peer makes the next collective raise; a hung one is caught by a watchdog that
sees a step (or the wait for one) outlast ``timeout``. While idle, rank 0 sends an empty list
every ``heartbeat`` seconds, so a dead rank is noticed without traffic. Rank 0 then fails every
request it holds and calls ``on_fault`` (the server reports 503 and exits); a follower raises
``RankError`` (its process exits non-zero).
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import mlx.core as mx

from engine.config import EngineConfig
from engine.engine_core import EngineCore, kv_blocks
from engine.models.base import CausalLM
from engine.outputs import RequestOutput, request_output
from engine.parallel.group import RankError, broadcast, gather_ints
from engine.parallel.shard import shard_model
from engine.request import EngineRequest, RequestStatus

log = logging.getLogger(__name__)

HEARTBEAT = 1.0  # seconds between rank 0's empty steps while idle
TIMEOUT = 30.0  # seconds a step, or a follower's wait for one, may take before it is a fault

_STOP = ("stop",)


def sharded_core(
    model: CausalLM, config: EngineConfig | None, dtype: mx.Dtype, group
) -> EngineCore:
    """This rank's engine over its shard of ``model``, with rank 0's ``config`` (followers pass
    None) and a KV pool of as many blocks as the tightest rank holds: every rank's scheduler
    must see the same pool."""
    config = broadcast(group, config)
    shard_model(model, group)
    blocks = gather_ints(group, kv_blocks(model, config, dtype))
    return EngineCore(model, replace(config, num_blocks=min(blocks)), dtype)


def _apply(core: EngineCore, events: list) -> list[RequestOutput]:
    outputs = []
    for kind, value in events:
        if kind == "add":
            core.add_request(value)
        elif kind == "abort" and (out := core.abort_request(value)) is not None:
            outputs.append(out)
    return outputs


class _Watchdog:
    """Calls ``on_hang`` once if a guarded section lasts longer than ``timeout``."""

    def __init__(self, timeout: float, on_hang: Callable[[str], None]) -> None:
        self.timeout, self.on_hang = timeout, on_hang
        self._since: float | None = None
        self._what = ""
        self._fired = False
        threading.Thread(target=self._watch, name="candlewick-rank-watchdog", daemon=True).start()

    def enter(self, what: str) -> None:
        self._what, self._since = what, time.monotonic()

    def leave(self) -> None:
        self._since = None

    def _watch(self) -> None:
        while not self._fired:
            time.sleep(min(0.25, self.timeout / 4))
            since = self._since
            if since is not None and time.monotonic() - since > self.timeout:
                self._fired = True
                self.on_hang(f"{self._what} took longer than {self.timeout:g}s")


class LeaderCore:
    """Rank 0's core: stands where an ``EngineCore`` does (the engine thread drives it), and
    keeps the other ranks in step with it."""

    def __init__(
        self,
        core: EngineCore,
        group,
        *,
        heartbeat: float = HEARTBEAT,
        timeout: float = TIMEOUT,
        on_fault: Callable[[str], None] | None = None,
    ) -> None:
        self.core, self.group = core, group
        self.size = group.size()
        self.heartbeat_interval = heartbeat  # the engine thread wakes this often when idle
        self.on_fault = on_fault
        self.fault: str | None = None
        self.last_exchange = time.monotonic()  # when every rank last answered
        self._pending: list = []
        self._rejected: list[RequestOutput] = []
        self._live: dict[str, EngineRequest] = {}
        self._lock = threading.Lock()
        self._watchdog = _Watchdog(timeout, self._fail)

    @property
    def num_blocks(self) -> int:
        return self.core.num_blocks

    @property
    def stats(self):
        return replace(self.core.stats, tensor_parallel_size=self.size)

    def warm_up(self) -> None:
        self.core.warm_up()

    def add_request(self, request: EngineRequest) -> None:
        try:
            pickle.dumps(request)
        except Exception as e:  # e.g. a logits processor that is a local function
            self._rejected.append(
                _failed(request, f"this request cannot be sent to the other ranks: {e}")
            )
            return
        self._live[request.request_id] = request
        self._pending.append(("add", request))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        self._pending.append(("abort", request_id))
        return None  # its output comes with the next step, on every rank at once

    @property
    def has_work(self) -> bool:
        idle_for = time.monotonic() - self.last_exchange
        return bool(
            self._pending
            or self._rejected
            or (self.fault is None and (self.core.has_work or idle_for >= self.heartbeat_interval))
        )

    def step(self) -> list[RequestOutput]:
        outputs, self._rejected = self._rejected, []
        if self.fault is not None:
            return outputs + self._fail_all()
        events, self._pending = self._pending, []
        try:
            self._watchdog.enter("a step across the ranks")
            broadcast(self.group, events)
            outputs += _apply(self.core, events)
            if self.core.has_work:
                outputs += self.core.step()
            self._watchdog.leave()
        except Exception as e:
            self._watchdog.leave()
            log.exception("a step across the ranks failed")
            self._fail(f"a rank failed: {e}")
            return outputs + self._fail_all()
        self.last_exchange = time.monotonic()
        for out in outputs:
            if out.finished:
                self._live.pop(out.request_id, None)
        return outputs

    def stop(self) -> None:
        """Tell the other ranks to exit (after the engine thread has stopped)."""
        if self.fault is None:
            try:
                broadcast(self.group, [_STOP])
            except Exception:
                log.exception("stopping the other ranks failed")

    def ranks(self) -> list[dict]:
        """Every rank's state as rank 0 sees it: all answered the last step, or not."""
        status = "error" if self.fault else "ok"
        age = round(time.monotonic() - self.last_exchange, 3)
        return [{"rank": r, "status": status, "last_step_s_ago": age} for r in range(self.size)]

    def _fail(self, message: str) -> None:
        with self._lock:
            if self.fault is not None:
                return
            self.fault = message
        log.error("tensor parallel fault: %s", message)
        if self.on_fault is not None:
            self.on_fault(message)

    def _fail_all(self) -> list[RequestOutput]:
        live, self._live = self._live, {}
        return [_failed(r, f"RankError: {self.fault}") for r in live.values()]


def _failed(request: EngineRequest, message: str) -> RequestOutput:
    r = request.to_request()
    r.status = RequestStatus.FINISHED_ABORTED
    return request_output(r, error=message)


def follow(
    core: EngineCore,
    group,
    on_hang: Callable[[str], None],
    timeout: float = TIMEOUT,
    on_outputs: Callable[[list[RequestOutput]], None] | None = None,
) -> None:
    """A follower rank's loop: apply rank 0's list, step; returns when rank 0 says stop.
    Raises ``RankError`` when rank 0 is gone; calls ``on_hang`` (from another thread: it
    should end the process) when rank 0 is silent for longer than ``timeout``. Its outputs
    (which rank 0 publishes) go to ``on_outputs``, if given."""
    watchdog = _Watchdog(timeout, on_hang)
    core.warm_up()
    while True:
        watchdog.enter("waiting for rank 0")
        try:
            events = broadcast(group)
            if _STOP in events:
                return
            outputs = _apply(core, events)
            if core.has_work:
                outputs += core.step()
            if on_outputs is not None:
                on_outputs(outputs)
        except Exception as e:
            raise RankError(f"rank {group.rank()} lost rank 0: {e}") from e
        finally:
            watchdog.leave()
