"""The continuous batcher: which requests run this step, and for how many tokens each."""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.kv_cache.kv_cache_manager import KVCacheManager
from engine.lora.slot_table import SlotLoad, SlotTable
from engine.outputs import ModelRunnerOutput, RequestOutput, request_output
from engine.request import Request, RequestStatus


class StepPhase(enum.Enum):
    """What a scheduled request's tokens are, which decides how the runner attends them."""

    PREFILL = "prefill"  # prompt tokens (or tokens recomputed after preemption)
    DECODE = "decode"  # its newest generated token, alone: one query against its cached context
    VERIFY = "verify"  # its newest generated token and drafts after it, sampled at each


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    """``request`` computes tokens ``start .. start + num_tokens - 1`` this step into the
    blocks of ``block_ids``; ``samples`` when that reaches the end of what it has (known tokens,
    tokens still pending on the device, and ``draft_token_ids``, which are the last of them)."""

    request: Request
    start: int
    num_tokens: int
    block_ids: tuple[int, ...]
    samples: bool
    phase: StepPhase = StepPhase.PREFILL
    draft_token_ids: tuple[int, ...] = ()

    @property
    def num_sampled(self) -> int:
        """Positions this step samples for the request: its last token and each draft."""
        return 1 + len(self.draft_token_ids) if self.samples else 0


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    """One step's decision. ``sync``: the next step needs this one's sampled tokens on the host
    before it can be scheduled (drafts are proposed from them), so the two must not overlap.
    (Rows whose sampling needs the host's tokens, such as penalized or constrained ones, do not
    stop the overlap: the runner samples them late.)
    ``lora_loads``: adapter weights the runner writes before the step runs."""

    scheduled: tuple[ScheduledRequest, ...]
    preempted: tuple[str, ...] = ()
    lora_loads: tuple[SlotLoad, ...] = ()
    sync: bool = False

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
    gives running requests their missing tokens first (one for a decode, plus any drafts to
    verify; a chunk for a prefill in progress), then admits waiting requests while budget,
    sequence slots, adapter slots and blocks last. Prefill, chunked prefill, prefix-cache hits,
    decode and verification are all the same counter. When blocks run out, the most recently
    admitted running request is preempted: its blocks are freed and it waits again, to be
    recomputed (prefix caching usually finds most of it).
    """

    def __init__(
        self, config: EngineConfig, kv: KVCacheManager, slots: SlotTable | None = None
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
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def fail_request(self, request_id: str) -> Request | None:
        """Drop a request whose step failed on its own input; its blocks are freed."""
        return self.abort_request(request_id)

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
            drafts = self._drafts(request, budget - n) if n == 1 else []
            if drafts and self.kv.allocate_slots(request, n + len(drafts)) is None:
                drafts = []  # no room to verify them: decode alone rather than preempt
            while not drafts and self.kv.allocate_slots(request, n) is None:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                continue
            scheduled.append(self._take(request, n, drafts))
            budget -= n + len(drafts)

        while self.waiting and budget > 0 and not preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            slot = self.slots.acquire(request.lora) if self.slots is not None else 0
            if slot is None:
                break  # every adapter slot is pinned by running requests
            request.lora_slot = slot
            hit_blocks, num_hit = self.kv.get_computed_blocks(request)
            n = min(request.num_tokens - num_hit, budget, self.config.long_prefill_chunk)
            if self.kv.allocate_slots(request, n, hit_blocks) is None:
                self._release_slot(request)
                break
            self.waiting.popleft()
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
                request.num_cached_tokens = num_hit
            request.num_computed_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._take(request, n, []))
            budget -= n

        self._update_stats()
        # A proposer drafts from the host's tokens: its request's steps never overlap.
        sync = not self.config.pipelined or any(
            s.samples and s.request.proposer is not None for s in scheduled
        )
        loads = self.slots.take_loads() if self.slots is not None else ()
        return SchedulerOutput(tuple(scheduled), tuple(preempted), loads, sync)

    def update_from_output(
        self, output: SchedulerOutput, result: ModelRunnerOutput
    ) -> list[RequestOutput]:
        """Record sampled tokens (keeping verified drafts), finish requests that stop, free
        their blocks."""
        outputs = []
        for item in output.scheduled:
            request = item.request
            embedding = result.pooled.get(request.request_id)
            if embedding is not None and request.status == RequestStatus.RUNNING:
                self._finish(request, RequestStatus.FINISHED_STOPPED)  # its prompt is pooled
                outputs.append(
                    request_output(request, embedding=embedding, queued_s=_queued(request))
                )
                continue
            sampled = result.sampled.get(request.request_id)
            if sampled is None or request.status != RequestStatus.RUNNING:
                continue  # finished, aborted or preempted since: the tokens are dropped
            request.num_pending -= 1
            accepted = _accepted(sampled, item.draft_token_ids)
            # The KV of rejected drafts stays in the blocks, to be overwritten.
            request.num_computed_tokens -= len(item.draft_token_ids) - (len(accepted) - 1)
            new: list[int] = []
            status = None
            for token in accepted:
                request.append_output_token(token)
                new.append(token)
                if (status := request.check_stop()) is not None:
                    break
            if status is not None:
                self._finish(request, status)
            first = request.num_output_tokens == len(new)
            logprobs = result.logprobs.get(request.request_id, [])[: len(new)]
            outputs.append(
                request_output(request, new, logprobs, queued_s=_queued(request) if first else None)
            )
        self._update_stats()
        return outputs

    def _chunk(self, request: Request, budget: int) -> int:
        """Tokens to compute for a running request this step: 0 when the tokens it will ever
        produce are all sampled already (its pending token ends it by length)."""
        produced = request.num_output_tokens + request.num_pending
        if request.num_pending and produced >= request.sampling_params.max_tokens:
            return 0
        missing = request.num_tokens + request.num_pending - request.num_computed_tokens
        return min(missing, budget, self.config.long_prefill_chunk)

    def _drafts(self, request: Request, budget: int) -> list[int]:
        """Drafts to verify after a decode's token, from the request's proposer: none while a
        token is pending on the device, under a constraint, or past what it may still make."""
        if request.proposer is None or request.num_pending or request.constraint is not None:
            return []
        room = request.sampling_params.max_tokens - request.num_output_tokens - 1
        limit = min(budget, room, self.config.long_prefill_chunk - 1)
        return list(request.proposer.propose(request.all_token_ids, limit))[: max(limit, 0)]

    def _take(self, request: Request, n: int, drafts: list[int]) -> ScheduledRequest:
        start = request.num_computed_tokens
        samples = start + n == request.num_tokens + request.num_pending
        if drafts:
            phase = StepPhase.VERIFY
        elif n == 1 and start >= request.num_prompt_tokens:
            phase = StepPhase.DECODE
        else:
            phase = StepPhase.PREFILL
        item = ScheduledRequest(
            request=request,
            start=start,
            num_tokens=n + len(drafts),
            block_ids=tuple(self.kv.get_block_ids(request.request_id)),
            samples=samples,
            phase=phase,
            draft_token_ids=tuple(drafts),
        )
        request.num_computed_tokens += n + len(drafts)
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
        self._update_stats()

    def _free(self, request: Request) -> None:
        """Give back everything a request holds: its KV blocks and its adapter slot."""
        self.kv.free(request)
        self._release_slot(request)

    def _release_slot(self, request: Request) -> None:
        if self.slots is not None:
            self.slots.release(request.lora_slot)
        request.lora_slot = 0

    def _update_stats(self) -> None:
        self.stats.num_running = len(self.running)
        self.stats.num_waiting = len(self.waiting)
        self.stats.kv_usage = self.kv.usage


def _accepted(sampled: list[int], drafts: tuple[int, ...]) -> list[int]:
    """The tokens a step yields: sampled[0], then sampled[i] for as long as draft i matched
    the token sampled before it."""
    accepted = [sampled[0]]
    for i, draft in enumerate(drafts):
        if draft != sampled[i]:
            break
        accepted.append(sampled[i + 1])
    return accepted


def _queued(request: Request) -> float | None:
    if request.first_scheduled_time is None or not request.arrival_time:
        return None
    return max(request.first_scheduled_time - request.arrival_time, 0.0)
