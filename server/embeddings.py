"""The embeddings core: one ``Embedder`` per served embedding model.

Inputs (texts or token ids) → checked token lists (``prepare``: vocabulary, length, the
``dimensions`` asked; a bad input costs nothing) → one engine request per input, all in flight
at once and batched by the engine (``embed``) → vectors, truncated to ``dimensions`` and
re-normalized. The API module (``server/api/openai_embeddings.py``) knows the wire; this file
knows which engine path the model takes: an encoder's core, or the paged engine's prefill for a
decoder embedding model.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.async_engine import AsyncEngine
from engine.encoder_core import EncodeRequest
from engine.loader.build import LoadedModel
from engine.loader.encoder import LoadedEncoder
from engine.pooling import PoolingConfig
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from server.admission import Admission
from server.errors import BadRequest, Unavailable
from server.metrics import ServerMetrics

# Builds the engine request of one input: (request id, token ids, arrival time) -> request.
RequestFactory = Callable[[str, list[int], float], EngineRequest | EncodeRequest]

MAX_INPUTS = 2048  # per request, as OpenAI allows


@dataclass(frozen=True, slots=True)
class PreparedEmbeddings:
    """Checked inputs: each one's token ids, and the size to cut the vectors to."""

    token_ids: tuple[list[int], ...]
    dimensions: int | None

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)


class Embedder:
    """One embedding model as served: its name, tokenizer, limits and engine path."""

    def __init__(
        self,
        name: str,
        tokenizer: Tokenizer,
        pooling: PoolingConfig,
        max_length: int,
        vocab_size: int,
        dimension: int,
        engine: AsyncEngine,
        new_request: RequestFactory,
        metrics: ServerMetrics,
        admission: Admission,
    ) -> None:
        self.name, self.tokenizer, self.pooling = name, tokenizer, pooling
        self.max_length, self.vocab_size, self.dimension = max_length, vocab_size, dimension
        self.engine, self.new_request = engine, new_request
        self.metrics, self.admission = metrics, admission

    @classmethod
    def for_encoder(cls, loaded: LoadedEncoder, name: str, **shared) -> Embedder:
        def new_request(rid: str, ids: list[int], arrival: float) -> EncodeRequest:
            return EncodeRequest(rid, ids, arrival_time=arrival)

        cfg = loaded.config
        return cls(
            name, loaded.tokenizer, loaded.pooling, loaded.max_length, cfg.vocab_size,
            cfg.hidden_size, new_request=new_request, **shared,
        )  # fmt: skip

    @classmethod
    def for_decoder(cls, loaded: LoadedModel, name: str, max_length: int, **shared) -> Embedder:
        pooling = loaded.pooling
        assert pooling is not None, "a decoder without a pooling config embeds nothing"
        once = SamplingParams(max_tokens=1)  # the step that ends the prompt yields the vector

        def new_request(rid: str, ids: list[int], arrival: float) -> EngineRequest:
            return EngineRequest(rid, ids, once, arrival_time=arrival, pooling=pooling)

        limit = min(pooling.max_length or max_length, max_length)
        cfg = loaded.config
        return cls(
            name, loaded.tokenizer, pooling, limit, cfg.vocab_size, cfg.hidden_size,
            new_request=new_request, **shared,
        )  # fmt: skip

    # -- prepare ------------------------------------------------------------------------------

    def prepare(
        self,
        inputs: Sequence[str | list[int]],
        dimensions: int | None = None,
        truncate: int | None = None,
    ) -> PreparedEmbeddings:
        """Token ids of every input, checked; every problem named in one ``BadRequest``.

        ``truncate`` (vLLM's ``truncate_prompt_tokens``): keep at most that many tokens of each
        input (-1: the model's limit), as sentence-transformers truncates (the special tokens
        the tokenizer adds stay); without it an input over the limit is a 400."""
        self._check_dimensions(dimensions)
        limit = self.max_length
        if truncate is not None:
            if truncate > self.max_length:
                raise BadRequest(
                    f"truncate_prompt_tokens {truncate} is over this model's limit of "
                    f"{self.max_length} tokens",
                    param="truncate_prompt_tokens",
                )
            limit = self.max_length if truncate == -1 else truncate
        token_ids = [self._tokens(item, limit if truncate is not None else None) for item in inputs]
        problems = []
        for i, ids in enumerate(token_ids):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                vocab = self.vocab_size
                problems.append(f"input[{i}] has token ids out of range [0, {vocab}): {bad[:10]}")
            if not ids:
                problems.append(f"input[{i}] is empty (no tokens)")
            elif len(ids) > limit:
                problems.append(
                    f"input[{i}] has {len(ids)} tokens; this model's limit is {limit} (send "
                    "truncate_prompt_tokens to truncate)"
                )
        if problems:
            more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise BadRequest("; ".join(problems[:10]) + more, param="input")
        return PreparedEmbeddings(tuple(token_ids), dimensions)

    def _tokens(self, item: str | list[int], truncate: int | None) -> list[int]:
        if isinstance(item, str):
            return self.tokenizer.encode(item, max_length=truncate)
        return list(item) if truncate is None else list(item)[:truncate]

    def _check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is None or dimensions == self.dimension:
            return
        allowed = self.pooling.dimensions
        if not allowed:
            raise BadRequest(
                f"the model {self.name!r} does not support dimensions (not a Matryoshka "
                f"model); its embeddings have {self.dimension}",
                param="dimensions",
            )
        if dimensions not in allowed:
            shown = f"1..{self.dimension}" if len(allowed) == self.dimension else str(list(allowed))
            raise BadRequest(
                f"dimensions {dimensions} is not one this model allows ({shown})",
                param="dimensions",
            )

    # -- embed --------------------------------------------------------------------------------

    async def embed(self, prepared: PreparedEmbeddings) -> list[np.ndarray]:
        """Every input's vector (float32), in order. The inputs run as separate engine requests,
        batched there with everything else; leaving early (the client went away) aborts those
        still waiting."""
        with self.admission.acquire(1):
            start = time.monotonic()
            base = f"embd-{uuid.uuid4().hex}"
            requests = [
                self.new_request(f"{base}-{i}", ids, start)
                for i, ids in enumerate(prepared.token_ids)
            ]
            outputs = await self.engine.embed(requests)
            for out in outputs:
                if out.error:
                    raise RuntimeError(out.error)
                if out.embedding is None:
                    raise Unavailable("the request was aborted (the server is shutting down)")
            self.metrics.embedding_requests.labels(self.name).inc()
            self.metrics.embedding_tokens.labels(self.name).inc(prepared.num_tokens)
            self.metrics.embedding_latency.labels(self.name).observe(time.monotonic() - start)
        return [self._cut(out.embedding, prepared.dimensions) for out in outputs]

    def _cut(self, vector: np.ndarray, dimensions: int | None) -> np.ndarray:
        """Matryoshka truncation: the first ``dimensions`` entries, re-normalized when the
        model's vectors are normalized."""
        if dimensions is None or dimensions >= vector.shape[0]:
            return vector
        cut = vector[:dimensions]
        if self.pooling.normalize:
            cut = cut / max(float(np.linalg.norm(cut)), 1e-12)
        return cut.astype(np.float32)
