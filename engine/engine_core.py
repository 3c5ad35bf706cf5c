"""The engine core: one step loop over scheduler, model runner and scheduler again."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import mlx.core as mx

from engine.config import EngineConfig
from engine.kv_cache.kv_cache_manager import KVCacheManager
from engine.lora.device import DeviceLoRA, slot_bytes
from engine.lora.slot_table import SlotTable
from engine.memory import num_kv_blocks
from engine.model_runner import InFlightStep, ModelRunner
from engine.models.base import CausalLM
from engine.models.paged import PagedKVStore
from engine.outputs import RequestOutput, request_output
from engine.request import EngineRequest
from engine.scheduler import Scheduler, SchedulerOutput
from engine.stats import EngineStats

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _InFlight:
    """A step submitted to the device whose sampled tokens are not read back yet."""

    scheduled: SchedulerOutput
    submitted: InFlightStep


def kv_blocks(model: CausalLM, config: EngineConfig, dtype: mx.Dtype) -> int:
    """The KV blocks an engine over ``model`` gets: ``config.num_blocks``, or what memory holds
    beside the adapter slots."""
    reserved = 0
    if config.max_loras > 0:
        reserved = (config.max_loras + 1) * slot_bytes(model, config.max_lora_rank, dtype)
    return num_kv_blocks(model.config, config, dtype, reserved)


class EngineCore:
    """schedule() → submit to the device → update_from_output(), one step at a time, with the
    next step built while the device computes the one before it."""

    def __init__(self, model: CausalLM, config: EngineConfig, dtype: mx.Dtype) -> None:
        # On the CPU the steps do not overlap and the KV pools are head-major. Overlap gains
        # little there (each layer's decode attention waits for its scores: its softmax runs in
        # NumPy), and head-major pools make decode ~15% faster at 16 sequences; but with both,
        # a write sometimes finds the pool still held by the step before and copies it (a
        # first token up to 300 ms late). Not overlapped: faster first tokens, no copies
        # (docs/architecture.md, "Decode attention on the CPU").
        on_cpu = mx.default_device() == mx.cpu
        if config.pipelined is None:
            config = replace(config, pipelined=not on_cpu)
        self.config = config
        self.num_blocks = kv_blocks(model, config, dtype)
        lora = slots = None
        if config.max_loras > 0:
            lora = DeviceLoRA(model, config.max_loras, config.max_lora_rank, dtype)
            slots = SlotTable(config.max_loras)
        self.kv = KVCacheManager(self.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.kv, slots)
        head_major = on_cpu and not config.pipelined
        store = PagedKVStore(
            model.config, self.num_blocks, config.block_size, dtype, head_major=head_major
        )
        self.runner = ModelRunner(model, store, lora, seed=config.seed)
        self._in_flight: _InFlight | None = None
        self._failed: list[RequestOutput] = []
        self.stats = EngineStats()
        self._publish_stats()

    def warm_up(self) -> None:
        """Build what the first steps would otherwise build on the fly (on this thread): the
        attention plans of each prefill shape, and the kernels of a whole step."""
        chunk = min(self.config.long_prefill_chunk, self.config.max_num_batched_tokens)
        self.runner.store.warm_up(chunk, self.runner.windows)
        self.runner.warm_up(prefill_tokens=min(chunk, 2 * self.config.block_size))

    def add_request(self, request: EngineRequest) -> None:
        self.scheduler.add_request(request.to_request())
        self._publish_stats()

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.scheduler.abort_request(request_id)
        self._publish_stats()
        return request_output(request) if request is not None else None

    @property
    def has_work(self) -> bool:
        """Requests wait or run. (A step still in flight when none do holds only tokens of
        finished or aborted requests: nobody needs it.)"""
        return self.scheduler.has_work

    def step(self) -> list[RequestOutput]:
        """Schedule the next step and submit it, then read back the step before it while the
        device computes this one. A running request's newest token is fed to the next step
        straight from the device, before the host has seen it; a request that stops on that
        token wastes one step's work on it. Rows that need the host's tokens to be sampled
        (penalties, constraints) are sampled once the step before is read back. A step whose
        tokens the next one needs on the host to be scheduled (the scheduler says ``sync``) is
        read back at once instead."""
        scheduled = self.scheduler.schedule()
        submitted = self._submit(scheduled)
        outputs = self._collect(self._in_flight)
        self._sample_late(submitted)
        self._in_flight = submitted
        if scheduled.sync:
            outputs += self._collect(self._in_flight)
            self._in_flight = None
        self._publish_stats()
        return self._take_failed() + outputs

    def _submit(self, scheduled: SchedulerOutput) -> _InFlight | None:
        """Load new adapters, then queue the step on the device; None when it samples nothing
        (or failed: its requests fail, the engine goes on)."""
        scheduled = self._load_adapters(scheduled)
        try:
            submitted = self.runner.submit(scheduled)
        except Exception as e:
            log.exception("engine step failed")
            self._fail([item.request.request_id for item in scheduled.scheduled], e)
            return None
        return _InFlight(scheduled, submitted) if submitted.samples else None

    def _sample_late(self, in_flight: _InFlight | None) -> None:
        """Sample the submitted step's rows that waited for the host's tokens."""
        if in_flight is None:
            return
        try:
            self.runner.sample_late(in_flight.submitted)
        except Exception as e:
            log.exception("engine step failed")
            self._fail([item.request.request_id for item in in_flight.scheduled.scheduled], e)

    def _collect(self, in_flight: _InFlight | None) -> list[RequestOutput]:
        """Wait for a submitted step's tokens and hand them to the scheduler."""
        if in_flight is None:
            return []
        try:
            result = self.runner.collect(in_flight.submitted)
        except Exception as e:
            log.exception("engine step failed")
            self._fail([item.request.request_id for item in in_flight.scheduled.scheduled], e)
            return []
        return self.scheduler.update_from_output(in_flight.scheduled, result)

    def _load_adapters(self, scheduled: SchedulerOutput) -> SchedulerOutput:
        """Write the adapters the scheduler put into slots; requests whose adapter does not
        load fail and leave the step, and their slot is emptied."""
        failed: set[int] = set()
        for load in scheduled.lora_loads:
            try:
                self.runner.load_adapter(load)
            except Exception as e:
                log.exception("loading adapter %s failed", load.lora.name)
                failed.add(load.slot)
                self.scheduler.slots.forget(load.slot)
                error = e
        if not failed:
            return scheduled
        dropped = [s for s in scheduled.scheduled if s.request.lora_slot in failed]
        self._fail([item.request.request_id for item in dropped], error)
        kept = tuple(s for s in scheduled.scheduled if s not in dropped)
        return replace(scheduled, scheduled=kept, lora_loads=())

    def _fail(self, request_ids: list[str], error: Exception) -> None:
        message = f"{type(error).__name__}: {error}"
        for request_id in request_ids:
            if (request := self.scheduler.fail_request(request_id)) is not None:
                self._failed.append(request_output(request, error=message))

    def _take_failed(self) -> list[RequestOutput]:
        failed, self._failed = self._failed, []
        return failed

    def _publish_stats(self) -> None:
        sched, prefix, slots = (
            self.scheduler.stats,
            self.kv.prefix_cache_stats,
            self.scheduler.slots,
        )
        self.stats = EngineStats(
            num_running=sched.num_running,
            num_waiting=sched.num_waiting,
            kv_usage=sched.kv_usage,
            prefix_cache_queries=prefix.queries,
            prefix_cache_hits=prefix.hits,
            num_preemptions=sched.num_preemptions,
            adapters_loaded=slots.resident if slots is not None else 0,
            adapter_loads=slots.loads if slots is not None else 0,
            num_kv_blocks=self.num_blocks - 1,
            mask_seconds=self.runner.mask_seconds.snapshot(),
        )
