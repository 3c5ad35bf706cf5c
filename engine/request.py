"""A request as the engine tracks it from arrival to finish."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.lora.request import LoRARequest
from engine.pooling import PoolingConfig
from engine.sampling_params import SamplingParams
from engine.spec.proposer import DraftProposer
from engine.structured.constraint import TokenConstraint

if TYPE_CHECKING:
    import mlx.core as mx

# A per-row logits edit: (the row's output token ids so far, its logits [V]) -> logits [V].
# (No MLX import at run time: the scheduler and its tests are pure Python.)
LogitsProcessor = Callable[[Sequence[int], "mx.array"], "mx.array"]


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


@dataclass(slots=True)
class Request:
    """One sequence being generated.

    The scheduling invariant: ``num_computed_tokens`` (tokens whose KV is in the cache) catches
    up with ``num_tokens + num_pending`` (prompt + generated, known or still on the device).
    Prefill, chunked prefill, a prefix-cache hit and decode all just advance that counter; a
    step that verifies drafts advances it past them and gives back what was rejected.

    ``cache_salt`` enters the hash of every KV block (the adapter's cache key, and any salt the
    caller adds): requests with different salts never share blocks.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = 0.0
    cache_salt: str | None = None
    lora: LoRARequest | None = None  # the adapter this request runs with, if any
    constraint: TokenConstraint | None = None  # which tokens may come next, if constrained
    logits_processors: tuple[LogitsProcessor, ...] = ()
    proposer: DraftProposer | None = None  # drafts for speculative steps, if any
    # An embedding request: its prompt's final hidden states pooled into one vector, which
    # its last prefill step yields instead of a token.
    pooling: PoolingConfig | None = None
    pooled_so_far: object | None = None  # the runner's partial pooling over earlier chunks
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    # Tokens sampled by a step that was submitted but whose result is not read yet. The next
    # step may already compute them: their ids are taken from the device, not from here.
    num_pending: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first schedule
    num_preemptions: int = 0
    first_scheduled_time: float | None = None  # time.monotonic() at first admission
    lora_slot: int = 0  # its adapter's device slot while running (0: the base model)
    block_hashes: list[int] = field(default_factory=list)  # of the full blocks, in order

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def needs_host_tokens(self) -> bool:
        """Whether sampling this request's next token needs every token it sampled before on
        the host: penalties count them, a constraint and logits processors follow them. Its
        rows are then sampled once the step before has been read back."""
        p = self.sampling_params
        penalized = p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
        return bool(penalized or self.constraint or self.logits_processors)

    def append_output_token(self, token: int) -> None:
        self.output_token_ids.append(token)
        if self.constraint is not None:
            self.constraint.advance(token)

    def check_stop(self) -> RequestStatus | None:
        """The finished status the last generated token causes, if any."""
        params = self.sampling_params
        n = len(self.output_token_ids)
        if n == 0:
            return None
        if self.constraint is not None and self.constraint.done:
            return RequestStatus.FINISHED_STOPPED
        if n < params.min_tokens:
            return None
        last = self.output_token_ids[-1]
        if last in params.stop_token_ids or (not params.ignore_eos and last in self.eos_token_ids):
            return RequestStatus.FINISHED_STOPPED
        if n >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """What a caller submits (hop 1, event loop → engine thread): tokens, not text."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    cache_salt: str | None = None
    arrival_time: float = 0.0
    lora: LoRARequest | None = None
    constraint: TokenConstraint | None = None
    logits_processors: tuple[LogitsProcessor, ...] = ()
    proposer: DraftProposer | None = None
    pooling: PoolingConfig | None = None

    def to_request(self) -> Request:
        salts = [s for s in (self.lora.key if self.lora else None, self.cache_salt) if s]
        if self.pooling is not None and self.pooling.mode.needs_every_token:
            # Pooled over every token's hidden state: a cached prefix (whose states were never
            # computed) must not be reused, so its blocks hash apart from everyone's.
            salts.append(f"pool:{self.request_id}")
        return Request(
            request_id=self.request_id,
            prompt_token_ids=list(self.prompt_token_ids),
            sampling_params=self.sampling_params,
            eos_token_ids=self.eos_token_ids,
            arrival_time=self.arrival_time,
            cache_salt="+".join(salts) if salts else None,
            lora=self.lora,
            constraint=self.constraint,
            logits_processors=tuple(self.logits_processors),
            proposer=self.proposer,
            pooling=self.pooling,
        )
