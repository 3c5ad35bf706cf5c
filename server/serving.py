"""The serving core, under every API: prepare → admit → events → release.

- ``prepare`` validates a ``GenerationRequest`` (context length, sampling fields, the model it
  names) into a ``PreparedRequest``. It holds nothing, so a bad request costs nothing.
- ``admit`` claims room for the request's sequences and pins its adapter, as one ``Lease``:
  a full server answers 429 (a draining one 503) before any response starts.
- ``generate`` runs the choices on the engine and yields typed events (``ChoiceDelta`` per
  choice as tokens come, ``TokenUsage`` last), releasing the lease when the choices end,
  however they end.

The API modules (server/api/) turn requests into ``GenerationRequest`` and events into wire
shapes; this file knows no API.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

from adapters.lora_request import lora_request
from adapters.registry import AdapterRegistry
from engine.async_engine import AsyncEngine
from engine.chat_template import ChatTemplateError
from engine.loader.build import LoadedModel
from engine.outputs import RequestOutput
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from engine.structured.grammar import GrammarCompiler, GrammarError, GrammarSpec
from server.admission import AdapterPin, Admission, Lease
from server.errors import BadRequest, NotFound
from server.generation import (
    ChoiceDelta,
    GenerationEvent,
    GenerationRequest,
    PreparedRequest,
    TokenUsage,
)
from server.metrics import ModelSeries, ServerMetrics
from server.sampling import sampling_params
from server.text_stream import TextStream
from server.tool_parsers import ToolParser, parser_for_template


@dataclass(slots=True)
class _Tally:
    """Token counts of one request's choices so far (the choices run concurrently)."""

    completion_tokens: int = 0
    cached_tokens: int = 0


class Serving:
    def __init__(
        self,
        engine: AsyncEngine,
        loaded: LoadedModel,
        metrics: ServerMetrics,
        admission: Admission,
        max_model_len: int,
        served_name: str,
        generation_defaults: dict | None = None,
        registry: AdapterRegistry | None = None,
        max_lora_rank: int = 0,
    ) -> None:
        self.registry = registry
        self.max_lora_rank = max_lora_rank
        self._grammars: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()
        self.engine = engine
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.metrics = metrics
        self.admission = admission
        self.max_model_len = max_model_len
        self.served_name = served_name
        self.defaults = generation_defaults or {}
        self.eos_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(
            loaded.config.eos_token_ids
        )
        self.fingerprint = "fp_candlewick"
        self.embedding_models: frozenset[str] = frozenset()  # served beside, for /v1/embeddings

    # -- prompts ------------------------------------------------------------------------------

    def chat_prompt(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **template_args: Any,
    ) -> list[int]:
        """Messages through the model's chat template. Content given as parts keeps its text
        parts (OpenAI's and Anthropic's ``{"type": "text", "text": ...}``)."""
        self._check_generative()
        rendered = []
        for m in messages:
            m = dict(m)
            if isinstance(m.get("content"), list):
                parts = m["content"]
                # Parts joined with a newline, as vLLM and llama.cpp do ("What is" + "the best
                # book" must not read "What isthe best book").
                texts = (p.get("text", "") for p in parts if p.get("type") == "text")
                m["content"] = "\n".join(texts)
            rendered.append(m)
        try:
            return self.tokenizer.encode_chat(rendered, add_generation_prompt, **template_args)
        except ChatTemplateError as e:
            raise BadRequest(str(e), param="messages") from None

    def _check_generative(self) -> None:
        """An embedding model (a pooling config) serves /v1/embeddings, not generation."""
        if self.loaded.pooling is not None:
            raise BadRequest(
                f"the model {self.served_name!r} is an embedding model: use POST /v1/embeddings",
                param="model",
            )

    def token_prompt(self, ids: Sequence[int], field: str = "prompt") -> list[int]:
        """A prompt given as token ids, each checked against the vocabulary."""
        bad = [t for t in ids if not 0 <= t < self.loaded.config.vocab_size]
        if bad:
            raise BadRequest(f"prompt token ids out of range: {bad[:10]}", param=field)
        return list(ids)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # -- the model a request names ------------------------------------------------------------

    def check_model(self, name: str | None) -> str | None:
        """404 unless ``name`` is the base model or a registered adapter (pins nothing); 400 for
        an embedding model served beside it.
        Returns the adapter's name, or None for the base model."""
        if name in (None, "", self.served_name):
            return None
        if name in self.embedding_models:
            raise BadRequest(
                f"the model {name!r} serves embeddings (POST /v1/embeddings), not text "
                f"generation: name {self.served_name!r} or one of its adapters",
                param="model",
            )
        if self.registry is None or self.registry.resolve(name) is None:
            raise _no_such_model(name)
        return name

    def _pin(self, adapter: str | None) -> AdapterPin | None:
        """Resolve and pin in one step, so a hot swap cannot fall between them: a request
        that pinned v1 finishes on v1 even if v2 is uploaded meanwhile."""
        if adapter is None:
            return None
        version = self.registry.acquire(adapter) if self.registry is not None else None
        if version is None:  # deleted since ``prepare`` looked
            raise _no_such_model(adapter)
        return AdapterPin(self.registry, version)

    # -- prepare → admit → generate -----------------------------------------------------------

    def prepare(self, spec: GenerationRequest) -> PreparedRequest:
        """Every check that needs no resources; raises ``BadRequest`` or ``NotFound``."""
        self._check_generative()
        prompts = (spec.prompt_ids, *spec.more_prompts)
        for i, prompt in enumerate(prompts):
            where = spec.prompt_field if len(prompts) == 1 else f"{spec.prompt_field}[{i}]"
            if not prompt:
                raise BadRequest(f"the prompt is empty ({where})", param=where)
            if len(prompt) >= self.max_model_len:
                raise BadRequest(
                    f"this model's maximum context length is {self.max_model_len} tokens; the "
                    f"prompt has {len(prompt)} tokens",
                    param=where,
                    code="context_length_exceeded",
                )
        prompt = max(prompts, key=len)
        room = self.max_model_len - len(prompt)
        if spec.max_tokens is not None and spec.max_tokens > room:
            raise BadRequest(
                f"this model's maximum context length is {self.max_model_len} tokens; you asked "
                f"for {len(prompt) + spec.max_tokens} ({len(prompt)} in the prompt, "
                f"{spec.max_tokens} to generate)",
                param=spec.max_tokens_field,
                code="context_length_exceeded",
            )
        vocab = self.loaded.config.vocab_size
        params = sampling_params(spec, spec.max_tokens or room, self.defaults, vocab)
        if spec.grammar is not None:
            self._check_grammar(spec.grammar, spec.grammar_field)
        return PreparedRequest(
            request_id=f"{spec.id_prefix}-{uuid.uuid4().hex}",
            model=spec.model if spec.model not in (None, "") else self.served_name,
            adapter=self.check_model(spec.model),
            prompts=prompts,
            params=params,
            n=spec.n,
            # A stop string must never cut a constrained output short of what its grammar
            # accepts: under a grammar, the grammar decides where the output ends.
            stop=() if spec.grammar is not None else spec.stop,
            grammar=spec.grammar,
            keep_tokens=spec.keep_tokens,
        )

    def _check_grammar(self, spec: GrammarSpec, field: str | None) -> None:
        """Compile (or find cached) the request's grammar now: a 400 before it is queued."""
        try:
            self.grammars.constraint(spec)
        except GrammarError as e:
            raise BadRequest(f"{field}: {e}" if field else str(e), param=field) from None

    @functools.cached_property
    def tool_parser(self) -> ToolParser:
        """How this model writes tool calls, judged from its chat template."""
        return parser_for_template(self.tokenizer.chat_template)

    def special_tags(self, tags: Sequence[str]) -> tuple[tuple[int, str], ...]:
        """Those of ``tags`` that this vocabulary holds as one special token, with their ids."""
        found = []
        for tag in tags:
            ids = self.tokenizer.encode(tag, add_special_tokens=False)
            if len(ids) == 1 and ids[0] in self.tokenizer.all_special_ids:
                found.append((ids[0], tag))
        return tuple(found)

    @property
    def grammars(self) -> GrammarCompiler:
        """The model's grammar compiler, built once on first use (a second or so for a large
        vocabulary) from the tokenizer's own JSON."""
        with self._grammar_lock:
            if self._grammars is None:
                tokenizer = self.tokenizer.backend.to_str()
                vocab = self.loaded.config.vocab_size
                self._grammars = GrammarCompiler(tokenizer, vocab, sorted(self.eos_ids))
            return self._grammars

    def admit(self, prepared: PreparedRequest) -> Lease:
        """Room for the request's sequences and its adapter's pin, as one lease, now: a full
        server answers 429 before any response starts. Refused, it holds nothing."""
        return self.admission.acquire(prepared.num_choices, self._pin(prepared.adapter))

    async def generate(
        self, prepared: PreparedRequest, lease: Lease
    ) -> AsyncGenerator[GenerationEvent, None]:
        """The deltas of all n choices, interleaved as they come, then the usage.

        The lease is released as soon as the choices end: normally, by an error (one choice
        failing fails the request), or by this generator being closed (the client went away).
        The engine streams are closed first, which aborts whatever still runs.
        """
        tally = _Tally()
        if prepared.num_choices == 1:
            deltas = self._choice(prepared, lease, 0, tally)
        else:
            deltas = self._interleaved(prepared, lease, tally)
        try:
            async with aclosing(deltas):
                async for delta in deltas:
                    yield delta
        finally:
            lease.release()
        yield TokenUsage(prepared.num_prompt_tokens, tally.completion_tokens, tally.cached_tokens)

    async def _interleaved(
        self, prepared: PreparedRequest, lease: Lease, tally: _Tally
    ) -> AsyncGenerator[ChoiceDelta, None]:
        """n choices, each pumped by its own task into one queue (None: a choice ended)."""
        queue: asyncio.Queue[ChoiceDelta | None] = asyncio.Queue()
        failed: list[Exception] = []

        async def pump(index: int) -> None:
            try:
                async for delta in self._choice(prepared, lease, index, tally):
                    await queue.put(delta)
            except Exception as e:
                failed.append(e)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(i)) for i in range(prepared.num_choices)]
        try:
            remaining = prepared.num_choices
            while remaining:
                delta = await queue.get()
                if delta is not None:
                    yield delta
                elif failed:
                    raise failed[0]
                else:
                    remaining -= 1
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _engine_request(self, prepared: PreparedRequest, lease: Lease, index: int) -> EngineRequest:
        """The one place an ``EngineRequest`` is built: choice ``index`` of ``prepared``, on the
        adapter version its lease pinned. Seeded choices of n > 1 get seeds seed, seed+1, ...
        (for each prompt of a batch alike)."""
        params = prepared.params
        if prepared.n > 1 and params.seed is not None:
            params = replace(params, seed=params.seed + index % prepared.n)
        adapter = lease.adapter
        return EngineRequest(
            request_id=f"{prepared.request_id}-{index}",
            prompt_token_ids=prepared.prompts[index // prepared.n],
            sampling_params=params,
            eos_token_ids=self.eos_ids,
            arrival_time=time.monotonic(),
            lora=lora_request(adapter, self.loaded.config, self.max_lora_rank) if adapter else None,
            constraint=self.grammars.constraint(prepared.grammar) if prepared.grammar else None,
        )

    async def _choice(
        self, prepared: PreparedRequest, lease: Lease, index: int, tally: _Tally
    ) -> AsyncGenerator[ChoiceDelta, None]:
        """One choice: engine outputs → text (stop strings cut) → deltas, with its metrics."""
        engine_request = self._engine_request(prepared, lease, index)
        params = engine_request.sampling_params
        model = prepared.model
        series = self.metrics.series(model)
        text = TextStream(self.tokenizer, list(prepared.stop), keep=dict(prepared.keep_tokens))
        start = last = time.monotonic()
        generated = 0
        finish: str | None = None
        stream = self.engine.generate(engine_request)
        try:
            async for out in stream:
                if out.error:
                    raise RuntimeError(out.error)
                now = time.monotonic()
                if out.new_token_ids:
                    _observe_tokens(series, out, generated, now - start, now - last)
                    last = now
                if generated == 0 and index % prepared.n == 0:
                    prompt = prepared.prompts[index // prepared.n]
                    self.metrics.prompt_tokens.labels(model).inc(len(prompt))
                generated += len(out.new_token_ids)
                delta = "".join(text.add(t) for t in _visible(out, params))
                finish = out.finish_reason
                if text.stopped:
                    finish = "stop"
                elif out.finished:
                    delta += text.finish()
                tally.completion_tokens += len(out.new_token_ids)
                tally.cached_tokens = max(tally.cached_tokens, out.num_cached_tokens)
                yield ChoiceDelta(
                    index=index,
                    text=delta,
                    token_ids=list(out.new_token_ids),
                    logprobs=list(out.logprobs),
                    finish_reason=finish if (out.finished or text.stopped) else None,
                    stop_string=text.stop_string,
                )
                if text.stopped:
                    break
        finally:
            await stream.aclose()
            m = self.metrics
            m.e2e.labels(model).observe(time.monotonic() - start)
            m.requests.labels(model, finish or "abort").inc()


def _no_such_model(name: str) -> NotFound:
    return NotFound(f"the model {name!r} does not exist", param="model", code="model_not_found")


def _visible(out: RequestOutput, params: SamplingParams) -> tuple[int, ...]:
    """The tokens whose text the client sees: a stop token id ends the text without
    appearing in it (as vLLM does); eos tokens are special and skipped anyway."""
    ids = out.new_token_ids
    if out.finish_reason == "stop" and ids and ids[-1] in params.stop_token_ids:
        return ids[:-1]
    return ids


def _observe_tokens(series: ModelSeries, out: RequestOutput, before: int, since_start, gap):
    n = len(out.new_token_ids)
    series.generation_tokens.inc(n)
    if before == 0:
        series.ttft.observe(since_start)
    else:  # several tokens at once (merged outputs): the gap shared out among them
        for _ in range(n):
            series.itl.observe(gap / n)
    if out.queued_s is not None:
        series.queue_time.observe(out.queued_s)
