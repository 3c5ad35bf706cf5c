"""What the engine hands back: per step from the model runner, per request to the caller."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A sampled token's log-probability and its most likely alternatives (raw model logits)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class ModelRunnerOutput:
    """One step's sampled tokens, keyed by request id (only requests that sampled)."""

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """New tokens of one request since its previous output; the last one has ``finished``.

    ``finish_reason`` is "stop", "length" or "abort" once finished. Times are
    ``time.monotonic()`` based, as is ``EngineRequest.arrival_time``. ``error`` is set when the
    request failed on its own (the engine goes on serving the others).
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    error: str | None = None
    queued_s: float | None = None  # on the first token: arrival to first scheduled (seconds)
