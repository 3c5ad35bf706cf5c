"""The encoder's core: waiting inputs embedded in packed batches, one batch per step.

An encoder keeps no state between steps (no KV cache, nothing generated), so its scheduling is
a queue: each step takes the oldest inputs while their tokens fit ``max_batch_tokens`` (always
at least one), packs them into one row and pools each. The budget bounds how long one step
takes, which is what the streams of a decoder sharing the engine thread wait for at most
(``engine.core_group``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from engine import cpu_blas
from engine.cpu_workers import CpuWorkers, split_even
from engine.models import pooling
from engine.models.bert import BertModel, PackedBatch
from engine.outputs import RequestOutput
from engine.pooling import PoolingConfig
from engine.stats import EngineStats

log = logging.getLogger(__name__)

# Below this many tokens a batch runs whole: handing parts to helpers costs more than it saves.
SPLIT_TOKENS = 256


@dataclass(frozen=True, slots=True)
class EncodeRequest:
    """One input to embed (hop 1, event loop → engine thread): its tokens, special ones
    included."""

    request_id: str
    prompt_token_ids: list[int]
    arrival_time: float = 0.0


class EncoderCore:
    """Stands wherever an ``EngineCore`` does (``add_request``, ``abort_request``,
    ``has_work``, ``step``, ``warm_up``, ``stats``); only the engine thread calls it."""

    def __init__(self, model: BertModel, config: PoolingConfig, max_batch_tokens: int) -> None:
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
        self.model = model
        self.config = config
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[EncodeRequest] = deque()
        self.stats = EngineStats()

    def warm_up(self) -> None:
        """Nothing to build ahead."""

    def add_request(self, request: EncodeRequest) -> None:
        self.waiting.append(request)
        self._publish_stats()

    def abort_request(self, request_id: str) -> RequestOutput | None:
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                self._publish_stats()
                return _output(request, finish_reason="abort")
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting)

    def step(self) -> list[RequestOutput]:
        """Embed the next batch; a batch that fails fails its requests, and the core goes on."""
        batch = self._take()
        started = time.monotonic()
        try:
            embeddings = self.embed([r.prompt_token_ids for r in batch])
        except Exception as e:
            log.exception("embedding step failed")
            message = f"{type(e).__name__}: {e}"
            return [_output(r, finish_reason="abort", error=message) for r in batch]
        finally:
            self._publish_stats()
        return [
            _output(r, embedding=vector, queued_s=max(started - r.arrival_time, 0.0))
            for r, vector in zip(batch, embeddings, strict=True)
        ]

    def embed(self, sequences: list[list[int]], parts: int | None = None) -> np.ndarray:
        """The embeddings [B, D] (float32) of whole token sequences. On the CPU a batch of
        ``SPLIT_TOKENS`` or more is split into one part per core it may use (``parts``, by
        default ``cpu_blas.shared_cores()``), each run at once on a helper thread with a
        one-thread BLAS (``engine.cpu_workers``); otherwise one forward pass."""
        if parts is None:
            parts = cpu_blas.shared_cores() if mx.default_device() == mx.cpu else 1
        if parts > 1 and sum(map(len, sequences)) >= SPLIT_TOKENS:
            groups = split_even([len(s) for s in sequences], parts)
            if len(groups) > 1:
                with cpu_blas.one_thread_each(), CpuWorkers() as workers:
                    done = workers.map(self._embed, [[sequences[i] for i in g] for g in groups])
                return np.concatenate(done)
        return self._embed(sequences)

    def _embed(self, sequences: list[list[int]]) -> np.ndarray:
        batch = PackedBatch.of(sequences)
        hidden = self.model(batch)  # [T, D]
        segments = [pooling.Segment(s, n) for s, n in zip(batch.starts, batch.lengths, strict=True)]
        pooled = pooling.reduce(self.config.mode, hidden, segments)
        out = pooling.finish(self.config, pooled, batch.lengths)
        mx.eval(out)
        return np.array(out)

    def _take(self) -> list[EncodeRequest]:
        """The oldest waiting inputs whose tokens fit the budget (the first one always)."""
        batch = [self.waiting.popleft()]
        tokens = len(batch[0].prompt_token_ids)
        while self.waiting and tokens + len(self.waiting[0].prompt_token_ids) <= (
            self.max_batch_tokens
        ):
            tokens += len(self.waiting[0].prompt_token_ids)
            batch.append(self.waiting.popleft())
        return batch

    def _publish_stats(self) -> None:
        self.stats = EngineStats(num_waiting=len(self.waiting))


def _output(
    request: EncodeRequest,
    *,
    finish_reason: str = "stop",
    embedding: np.ndarray | None = None,
    error: str | None = None,
    queued_s: float | None = None,
) -> RequestOutput:
    """An input's one and only output: finished, with its embedding unless it was aborted or
    failed."""
    return RequestOutput(
        request_id=request.request_id,
        new_token_ids=(),
        finished=True,
        finish_reason=finish_reason,
        num_prompt_tokens=len(request.prompt_token_ids),
        error=error,
        queued_s=queued_s,
        embedding=embedding,
    )
