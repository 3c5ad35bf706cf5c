"""The engine core: one step loop over scheduler, model runner and scheduler again."""

from __future__ import annotations

import logging

import mlx.core as mx

from adapters.slots import AdapterSlots, slot_bytes
from engine.config import EngineConfig
from engine.kv_cache.kv_cache_manager import KVCacheManager
from engine.memory import num_kv_blocks
from engine.model_runner import InFlightStep, ModelRunner
from engine.models.base import CausalLM
from engine.models.paged import PagedKVStore
from engine.outputs import RequestOutput
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput

log = logging.getLogger(__name__)


class EngineCore:
    """schedule() → execute_model() → update_from_output(), one step at a time."""

    def __init__(self, model: CausalLM, config: EngineConfig, dtype: mx.Dtype) -> None:
        self.config = config
        self.slots = None
        reserved = 0
        if config.max_loras > 0:
            reserved = (config.max_loras + 1) * slot_bytes(model, config.max_lora_rank, dtype)
        self.num_blocks = num_kv_blocks(model.config, config, dtype, reserved)
        if config.max_loras > 0:
            self.slots = AdapterSlots(model, config.max_loras, config.max_lora_rank, dtype)
        self.kv = KVCacheManager(self.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.kv, self.slots)
        store = PagedKVStore(model.config, self.num_blocks, config.block_size, dtype)
        self.runner = ModelRunner(model, store, self.slots)
        self.pipelined = config.pipelined
        self._in_flight: tuple[SchedulerOutput, InFlightStep] | None = None

    def warm_up(self) -> None:
        """Build what the first steps would otherwise build on the fly (on this thread)."""
        chunk = min(self.config.long_prefill_chunk, self.config.max_num_batched_tokens)
        self.runner.store.warm_up(chunk, self.runner.windows)

    def add_request(self, request: EngineRequest) -> None:
        self.scheduler.add_request(request.to_request())

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.scheduler.abort_request(request_id)
        if request is None:
            return None
        return RequestOutput(
            request_id=request_id,
            new_token_ids=(),
            finished=True,
            finish_reason="abort",
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
            num_output_tokens=request.num_output_tokens,
        )

    @property
    def has_work(self) -> bool:
        """Requests wait or run. (A step still in flight when none do holds only tokens of
        finished or aborted requests: nobody needs it.)"""
        return self.scheduler.has_work

    def step(self) -> list[RequestOutput]:
        """Schedule and submit the next step, then read back the one before it.

        The device computes one step while Python schedules and builds the next: a running
        request's newest token is fed to the next step straight from the device, before the host
        has seen it. A request that stops on that token wastes one step's work on it; its
        output from that step is dropped. Requests with repetition, frequency or presence
        penalties need every earlier token on the host, so while any runs, steps do not overlap.
        """
        outputs: list[RequestOutput] = []
        if self._in_flight is not None and (not self.pipelined or self._needs_history()):
            outputs += self._finish(self._in_flight)
            self._in_flight = None
        scheduled = self.scheduler.schedule()
        try:
            submitted = self.runner.submit(scheduled)
        except Exception as e:  # a failed step fails its requests, not the engine
            log.exception("engine step failed")
            submitted = None
            outputs += [self._fail(item.request.request_id, e) for item in scheduled.scheduled]
        previous = self._in_flight
        samples = submitted is not None and submitted.sampled is not None
        self._in_flight = (scheduled, submitted) if samples else None
        if previous is not None:
            outputs += self._finish(previous)
        if not self.pipelined and self._in_flight is not None:
            outputs += self._finish(self._in_flight)
            self._in_flight = None
        return outputs

    def _finish(self, in_flight: tuple[SchedulerOutput, InFlightStep]) -> list[RequestOutput]:
        scheduled, submitted = in_flight
        try:
            result = self.runner.collect(submitted)
        except Exception as e:
            log.exception("engine step failed")
            return [self._fail(item.request.request_id, e) for item in scheduled.scheduled]
        return self.scheduler.update_from_output(scheduled, result)

    def _needs_history(self) -> bool:
        return any(_penalized(r.sampling_params) for r in self.scheduler.running)

    def _fail(self, request_id: str, error: Exception) -> RequestOutput:
        self.scheduler.fail_request(request_id)
        return RequestOutput(
            request_id=request_id,
            new_token_ids=(),
            finished=True,
            finish_reason="abort",
            error=f"{type(error).__name__}: {error}",
        )


def _penalized(params: SamplingParams) -> bool:
    return bool(
        params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0
    )
