"""OpenAI ⇄ engine translation: resolve the model, render and tokenize the prompt, build
sampling parameters, run the choices, and turn token outputs back into text events."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from adapters.lora_request import lora_request
from adapters.registry import AdapterRegistry
from adapters.types import AdapterVersion
from engine.async_engine import AsyncEngine
from engine.chat_template import ChatTemplateError
from engine.loader.build import LoadedModel
from engine.lora.request import LoRARequest
from engine.outputs import RequestOutput, TokenLogprob
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from server.admission import Admission, Lease
from server.errors import BadRequest, NotFound
from server.metrics import ModelSeries, ServerMetrics
from server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.text_stream import TextStream


@dataclass(frozen=True, slots=True)
class ServedModel:
    """What a request's ``model`` names: the base model, or a pinned adapter version on it.

    ``lora`` carries the adapter's cache key (its weights and config digests), which keeps its
    KV blocks and device slot apart from every other adapter's, and shared with the same
    adapter under any name.
    """

    name: str
    adapter: AdapterVersion | None = None
    lora: LoRARequest | None = None


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A validated request, ready for the engine: n choices of the same prompt."""

    request_id: str
    served: ServedModel
    prompt_ids: list[int]
    params: SamplingParams
    n: int
    stop: list[str]


@dataclass(slots=True)
class ChoiceEvent:
    """What one choice produced since its last event."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0


class OpenAIServing:
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

    # -- the model a request names ------------------------------------------------------------

    def resolve_model(self, name: str | None) -> ServedModel:
        """The one place a ``model`` field is understood: the base model or an adapter name.

        An adapter comes back pinned: its version (and files) stay until ``release`` — so a
        request that resolved v1 finishes on v1 even if v2 is uploaded meanwhile.
        """
        if name in (None, "", self.served_name):
            return ServedModel(self.served_name)
        version = self.registry.acquire(name) if self.registry is not None else None
        if version is None:
            raise NotFound(
                f"the model {name!r} does not exist", param="model", code="model_not_found"
            )
        lora = lora_request(version, self.loaded.config, self.max_lora_rank)
        return ServedModel(name, adapter=version, lora=lora)

    def check_model(self, name: str | None) -> None:
        """404 unless ``name`` is the base model or a registered adapter (pins nothing)."""
        if name in (None, "", self.served_name):
            return
        if self.registry is None or self.registry.resolve(name) is None:
            raise NotFound(
                f"the model {name!r} does not exist", param="model", code="model_not_found"
            )

    def release(self, served: ServedModel) -> None:
        if served.adapter is not None and self.registry is not None:
            self.registry.unpin(served.adapter)

    # -- prompts ------------------------------------------------------------------------------

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        for m in messages:
            if isinstance(m.get("content"), list):  # OpenAI content parts: keep the text ones
                parts = m["content"]
                m["content"] = "".join(p.get("text", "") for p in parts if p.get("type") == "text")
        try:
            return self.tokenizer.encode_chat(messages, req.add_generation_prompt)
        except ChatTemplateError as e:
            raise BadRequest(str(e), param="messages") from None

    def completion_prompt(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        bad = [t for t in prompt if not 0 <= t < self.loaded.config.vocab_size]
        if bad:
            raise BadRequest(f"prompt token ids out of range: {bad[:10]}", param="prompt")
        return list(prompt)

    # -- sampling -----------------------------------------------------------------------------

    def prepare(
        self,
        req: SamplingFields,
        prompt_ids: list[int],
        max_tokens: int | None,
        logprobs: int | None,
        prefix: str,
    ) -> PreparedRequest:
        if not prompt_ids:
            raise BadRequest("the prompt is empty", param="prompt")
        room = self.max_model_len - len(prompt_ids)
        if room <= 0:
            raise BadRequest(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt "
                f"has {len(prompt_ids)} tokens",
                param="messages" if prefix == "chatcmpl" else "prompt",
                code="context_length_exceeded",
            )
        if max_tokens is not None and max_tokens > room:
            raise BadRequest(
                f"this model's maximum context length is {self.max_model_len} tokens; you asked "
                f"for {len(prompt_ids) + max_tokens} ({len(prompt_ids)} in the prompt, "
                f"{max_tokens} to generate)",
                param="max_tokens",
                code="context_length_exceeded",
            )
        d = self.defaults
        bias = {}
        for key, value in (req.logit_bias or {}).items():
            try:
                bias[int(key)] = float(value)
            except ValueError:
                raise BadRequest(
                    f"logit_bias key {key!r} is not a token id", "logit_bias"
                ) from None
        try:
            params = SamplingParams(
                max_tokens=max_tokens or room,
                min_tokens=req.min_tokens,
                temperature=_pick(req.temperature, d.get("temperature"), 1.0),
                top_p=_pick(req.top_p, d.get("top_p"), 1.0),
                top_k=_pick(req.top_k, d.get("top_k"), 0),
                min_p=_pick(req.min_p, d.get("min_p"), 0.0),
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                repetition_penalty=_pick(req.repetition_penalty, d.get("repetition_penalty"), 1.0),
                logit_bias=bias,
                seed=req.seed,
                stop_token_ids=frozenset(req.stop_token_ids or ()),
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
            )
        except ValueError as e:
            raise BadRequest(str(e)) from None
        vocab = self.loaded.config.vocab_size
        bad = [t for t in [*bias, *params.stop_token_ids] if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"token ids out of range [0, {vocab}): {bad[:10]}")
        return PreparedRequest(
            request_id=f"{prefix}-{uuid.uuid4().hex}",
            served=self.resolve_model(req.model),
            prompt_ids=prompt_ids,
            params=params,
            n=req.n,
            stop=req.stop_strings,
        )

    # -- running ------------------------------------------------------------------------------

    def admit(self, prepared: PreparedRequest) -> Lease:
        """Claim room for the request's sequences now, so a full server answers 429 before any
        response starts; ``run`` gives the room (and the adapter pin) back when it ends."""
        try:
            lease = self.admission.acquire(prepared.n)
        except Exception:
            self.release(prepared.served)
            raise
        lease.also(lambda: self.release(prepared.served))
        return lease

    async def run(self, prepared: PreparedRequest, lease: Lease) -> AsyncIterator[ChoiceEvent]:
        """Events of all n choices, interleaved as they come."""
        with lease:
            if prepared.n == 1:
                async for event in self._choice(prepared, 0):
                    yield event
                return
            queue: asyncio.Queue[ChoiceEvent | None] = asyncio.Queue()

            async def pump(index: int) -> None:
                try:
                    async for event in self._choice(prepared, index):
                        await queue.put(event)
                finally:
                    await queue.put(None)

            tasks = [asyncio.create_task(pump(i)) for i in range(prepared.n)]
            try:
                remaining = prepared.n
                while remaining:
                    event = await queue.get()
                    if event is None:
                        remaining -= 1
                    else:
                        yield event
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _choice(self, prepared: PreparedRequest, index: int) -> AsyncIterator[ChoiceEvent]:
        params = prepared.params
        if prepared.n > 1 and params.seed is not None:
            params = _with_seed(params, params.seed + index)
        request_id = f"{prepared.request_id}-{index}"
        engine_request = EngineRequest(
            request_id=request_id,
            prompt_token_ids=prepared.prompt_ids,
            sampling_params=params,
            eos_token_ids=self.eos_ids,
            arrival_time=time.monotonic(),
            lora=prepared.served.lora,
        )
        model = prepared.served.name
        series = self.metrics.series(model)
        text = TextStream(self.tokenizer, prepared.stop)
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
                if generated == 0 and index == 0:
                    self.metrics.prompt_tokens.labels(model).inc(len(prepared.prompt_ids))
                generated += len(out.new_token_ids)
                delta = "".join(text.add(t) for t in self._visible(out, params))
                finish = out.finish_reason
                if text.stopped:
                    finish = "stop"
                elif out.finished:
                    delta += text.finish()
                yield ChoiceEvent(
                    index=index,
                    text=delta,
                    token_ids=list(out.new_token_ids),
                    logprobs=list(out.logprobs),
                    finish_reason=finish if (out.finished or text.stopped) else None,
                    num_cached_tokens=out.num_cached_tokens,
                )
                if text.stopped:
                    break
        finally:
            await stream.aclose()
            m = self.metrics
            m.e2e.labels(model).observe(time.monotonic() - start)
            m.requests.labels(model, finish or "abort").inc()

    def _visible(self, out: RequestOutput, params: SamplingParams) -> tuple[int, ...]:
        """The tokens whose text the client sees: a stop token id ends the text without
        appearing in it (as vLLM does); eos tokens are special and skipped anyway."""
        ids = out.new_token_ids
        if out.finish_reason == "stop" and ids and ids[-1] in params.stop_token_ids:
            return ids[:-1]
        return ids

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


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


def _pick(value, default, fallback):
    if value is not None:
        return value
    return default if default is not None else fallback


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, seed=seed)
