"""The continuous batcher: which requests run this step, and for how many tokens each."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from engine.config import EngineConfig
from engine.kv_cache.kv_cache_manager import KVCacheManager
from engine.outputs import ModelRunnerOutput, RequestOutput
from engine.request import Request, RequestStatus


class AdapterSlotPolicy(Protocol):
    """Device slots for LoRA adapters: a request runs only while it holds its adapter's slot."""

    def acquire(self, request: Request) -> bool: ...

    def release(self, request: Request) -> None: ...


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    """``request`` computes tokens ``start .. start + num_tokens - 1`` this step into the
    blocks of ``block_ids``; ``samples`` when that reaches the end of what it has (known tokens
    and tokens still pending on the device)."""

    request: Request
    start: int
    num_tokens: int
    block_ids: tuple[int, ...]
    samples: bool


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...]
    preempted: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


@dataclass(slots=True)
class SchedulerStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_preemptions: int = 0  # since start


class Scheduler:
    """Continuous batching with a token budget per step.

    The idea: each request's ``num_computed_tokens`` catches up with its ``num_tokens``. A step
    gives running requests their missing tokens first (one for a decode, a chunk for a prefill
    in progress), then admits waiting requests while budget, sequence slots and blocks last.
    Prefill, chunked prefill, prefix-cache hits and decode are all the same counter. When blocks
    run out, the most recently admitted running request is preempted: its blocks are freed and
    it waits again, to be recomputed (prefix caching usually finds most of it).
    """

    def __init__(
        self, config: EngineConfig, kv: KVCacheManager, slots: AdapterSlotPolicy | None = None
    ) -> None:
        self.config = config
        self.kv = kv
        self.slots = slots
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerStats()

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> Request | None:
        """Stop a request now and free its blocks; None if it is unknown or already done."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED_ABORTED
        self._free(request)
        self._update_stats()
        return request

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []

        for request in list(self.running):
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = self._chunk(request, budget)
            if n == 0:
                continue  # its last token is still on the device and will end it
            while self.kv.allocate_slots(request, n) is None:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                continue
            scheduled.append(self._take(request, n))
            budget -= n

        while self.waiting and budget > 0 and not preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            if self.slots is not None and not self.slots.acquire(request):
                break  # every adapter slot is pinned by running requests
            hit_blocks, num_hit = self.kv.get_computed_blocks(request)
            n = min(request.num_tokens - num_hit, budget, self.config.long_prefill_chunk)
            if self.kv.allocate_slots(request, n, hit_blocks) is None:
                if self.slots is not None:
                    self.slots.release(request)
                break
            self.waiting.popleft()
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
                request.num_cached_tokens = num_hit
            request.num_computed_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._take(request, n))
            budget -= n

        self._update_stats()
        return SchedulerOutput(scheduled=tuple(scheduled), preempted=tuple(preempted))

    def update_from_output(
        self, output: SchedulerOutput, result: ModelRunnerOutput
    ) -> list[RequestOutput]:
        """Record sampled tokens, finish requests that stop, free their blocks."""
        outputs = []
        for item in output.scheduled:
            request = item.request
            token = result.sampled.get(request.request_id)
            if token is None or request.status != RequestStatus.RUNNING:
                continue  # finished, aborted or preempted since: the token is dropped
            request.num_pending -= 1
            request.append_output_token(token)
            status = request.check_stop()
            logprob = result.logprobs.get(request.request_id)
            if status is not None:
                self._finish(request, status)
            outputs.append(
                RequestOutput(
                    request_id=request.request_id,
                    new_token_ids=(token,),
                    finished=status is not None,
                    finish_reason=status.value if status else None,
                    num_prompt_tokens=request.num_prompt_tokens,
                    num_cached_tokens=request.num_cached_tokens,
                    num_output_tokens=request.num_output_tokens,
                    logprobs=(logprob,) if logprob else (),
                    queued_s=_queued(request) if request.num_output_tokens == 1 else None,
                )
            )
        self._update_stats()
        return outputs

    def fail_request(self, request_id: str) -> None:
        """Drop a request whose step failed on its own input; its blocks are freed."""
        request = self.requests.get(request_id)
        if request is not None:
            self._finish(request, RequestStatus.FINISHED_ABORTED)

    def _chunk(self, request: Request, budget: int) -> int:
        """Tokens to compute for a running request this step: 0 when the tokens it will ever
        produce are all sampled already (its pending token ends it by length)."""
        produced = request.num_output_tokens + request.num_pending
        if request.num_pending and produced >= request.sampling_params.max_tokens:
            return 0
        missing = request.num_tokens + request.num_pending - request.num_computed_tokens
        return min(missing, budget, self.config.long_prefill_chunk)

    def _take(self, request: Request, n: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        samples = start + n == request.num_tokens + request.num_pending
        item = ScheduledRequest(
            request=request,
            start=start,
            num_tokens=n,
            block_ids=tuple(self.kv.get_block_ids(request.request_id)),
            samples=samples,
        )
        request.num_computed_tokens += n
        if samples:
            request.num_pending += 1
        return item

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_pending = 0  # a token still on the device is dropped and sampled again
        request.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(request)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self._free(request)
        self.requests.pop(request.request_id, None)

    def _free(self, request: Request) -> None:
        """Give back everything a request holds: its KV blocks and its adapter slot."""
        self.kv.free(request)
        if self.slots is not None:
            self.slots.release(request)

    def _update_stats(self) -> None:
        self.stats.num_running = len(self.running)
        self.stats.num_waiting = len(self.waiting)
        self.stats.kv_usage = self.kv.usage


def _queued(request: Request) -> float | None:
    if request.first_scheduled_time is None or not request.arrival_time:
        return None
    return max(request.first_scheduled_time - request.arrival_time, 0.0)
