"""What the engine hands back: per step from the model runner, per request to the caller."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.request import Request


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A sampled token's log-probability and its most likely alternatives (raw model logits)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class ModelRunnerOutput:
    """One step's sampled tokens, keyed by request id (only requests that sampled): one token
    per position sampled, so k + 1 for a request that verified k drafts."""

    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    pooled: dict[str, np.ndarray] = field(default_factory=dict)  # embeddings [D] float32


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
    embedding: np.ndarray | None = None  # a pooling request's result [D] float32 (finished)

    def merge(self, later: RequestOutput) -> RequestOutput:
        """This output followed by ``later`` of the same request, as one: a caller that fell
        behind the engine takes several steps' tokens at once instead of one by one."""
        if later.request_id != self.request_id:
            raise ValueError(f"cannot merge {later.request_id!r} into {self.request_id!r}")
        if self.finished:
            raise ValueError(f"request {self.request_id!r} already finished")
        return RequestOutput(
            request_id=self.request_id,
            new_token_ids=self.new_token_ids + later.new_token_ids,
            finished=later.finished,
            finish_reason=later.finish_reason,
            num_prompt_tokens=later.num_prompt_tokens or self.num_prompt_tokens,
            num_cached_tokens=later.num_cached_tokens or self.num_cached_tokens,
            num_output_tokens=max(later.num_output_tokens, self.num_output_tokens),
            logprobs=self.logprobs + later.logprobs,
            error=later.error,
            queued_s=self.queued_s if self.queued_s is not None else later.queued_s,
            embedding=later.embedding,
        )


def request_output(
    request: Request,
    new_token_ids: Sequence[int] = (),
    logprobs: Sequence[TokenLogprob] = (),
    *,
    error: str | None = None,
    queued_s: float | None = None,
    embedding: np.ndarray | None = None,
) -> RequestOutput:
    """The one place a ``RequestOutput`` is built: new tokens, a finish (stop, length, abort)
    or a failure all read the request as it stands now."""
    finished = request.status.finished
    return RequestOutput(
        request_id=request.request_id,
        new_token_ids=tuple(new_token_ids),
        finished=finished,
        finish_reason=request.status.value if finished else None,
        num_prompt_tokens=request.num_prompt_tokens,
        num_cached_tokens=request.num_cached_tokens,
        num_output_tokens=request.num_output_tokens,
        logprobs=tuple(logprobs),
        error=error,
        queued_s=queued_s,
        embedding=embedding,
    )
