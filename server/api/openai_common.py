"""What OpenAI's chat and completions APIs share: their sampling fields in the core's terms, the
envelope every body and chunk carries, usage, and answering a request whole or as SSE."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from engine.outputs import TokenLogprob
from server.errors import APIError, error_body
from server.generation import (
    ChoiceDelta,
    GenerationEvent,
    GenerationRequest,
    PreparedRequest,
    TokenUsage,
)
from server.protocol import PromptTokensDetails, SamplingFields, Usage
from server.serving import Serving
from server.streaming import ClientDisconnected, EventStream, unless_disconnected
from server.structured import grammar_spec

log = logging.getLogger(__name__)


def generation_request(
    body: SamplingFields,
    prompt_ids: list[int],
    *,
    id_prefix: str,
    prompt_field: str,
    max_tokens: int | None,
    logprobs: int | None,
) -> GenerationRequest:
    """The fields chat and completions share, in the core's terms."""
    grammar, grammar_field = grammar_spec(body)
    return GenerationRequest(
        model=body.model,
        prompt_ids=prompt_ids,
        id_prefix=id_prefix,
        prompt_field=prompt_field,
        max_tokens=max_tokens,
        n=body.n,
        stop=tuple(body.stop_strings),
        logprobs=logprobs,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=body.logit_bias or {},
        seed=body.seed,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        grammar=grammar,
        grammar_field=grammar_field,
    )


class Reply:
    """What every body and chunk of one response shares, and the text its logprobs show."""

    def __init__(self, serving: Serving, prepared: PreparedRequest) -> None:
        self.prepared = prepared
        self.created = int(time.time())
        self.fingerprint = serving.fingerprint
        self.token_text = serving.token_text
        self.wants_logprobs = prepared.params.logprobs is not None

    def envelope(self) -> dict:
        return {
            "id": self.prepared.request_id,
            "created": self.created,
            "model": self.prepared.model,
            "system_fingerprint": self.fingerprint,
        }


def usage_of(usage: TokenUsage) -> Usage:
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


def split_finish(delta: ChoiceDelta) -> tuple[ChoiceDelta, ChoiceDelta]:
    """A choice's last delta as two: its text (and tokens), then its finish alone."""
    text = ChoiceDelta(delta.index, delta.text, delta.token_ids, delta.logprobs)
    return text, ChoiceDelta(delta.index, "", [], [], delta.finish_reason)


def is_empty(delta: ChoiceDelta) -> bool:
    """A delta that changes nothing a client sees (text held back at a possible stop string)."""
    return not delta.text and not delta.finish_reason and not delta.logprobs


# -- whole responses --------------------------------------------------------------------------


@dataclass(slots=True)
class ChoiceTotals:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(slots=True)
class Collected:
    """Every event of one request, gathered for a whole response."""

    choices: list[ChoiceTotals]
    usage: TokenUsage | None = None


async def collect(events: AsyncIterator[GenerationEvent], n: int) -> Collected:
    out = Collected([ChoiceTotals() for _ in range(n)])
    async for event in events:
        if isinstance(event, TokenUsage):
            out.usage = event
            continue
        c = out.choices[event.index]
        c.text.append(event.text)
        c.logprobs.extend(event.logprobs)
        c.finish_reason = event.finish_reason or c.finish_reason
    return out


# -- answering ----------------------------------------------------------------------------------

Chunks = Callable[[Reply, AsyncIterator[GenerationEvent], bool], AsyncGenerator[str, None]]
Whole = Callable[[Reply, Collected], BaseModel]


async def respond(
    request: Request,
    serving: Serving,
    body: SamplingFields,
    prepared: PreparedRequest,
    chunks: Chunks,
    whole: Whole,
) -> Response:
    """Admit the request (429 before anything starts), then stream it or answer it whole.

    The lease is released once, whichever way this ends: a whole answer releases it when it is
    collected, or when the client leaves first (the request is aborted: 499); a stream's
    response owns it from the moment it is returned, so even a stream that never starts gives
    it back.
    """
    lease = serving.admit(prepared)
    if not body.stream:
        with lease:
            events = serving.generate(prepared, lease)
            try:
                got = await unless_disconnected(request, collect(events, prepared.num_choices))
            except ClientDisconnected:
                return Response(status_code=499)  # nobody is listening
        return JSONResponse(whole(Reply(serving, prepared), got).model_dump())
    try:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = serving.generate(prepared, lease)
        return EventStream(_sse(chunks(Reply(serving, prepared), events, include_usage)), lease)
    except BaseException:
        lease.release()
        raise


async def _sse(chunks: AsyncGenerator[str, None]) -> AsyncGenerator[str, None]:
    """OpenAI's stream around an API's chunks: an error event if it fails midway, [DONE] last."""
    try:
        async with aclosing(chunks):
            async for chunk in chunks:
                yield chunk
    except Exception as e:
        yield _error_event(e)
    yield "[DONE]"


def _error_event(e: Exception) -> str:
    if isinstance(e, APIError):
        return json.dumps(error_body(e.status, e.type, e.message, e.param, e.code))
    log.exception("request failed while streaming")
    return json.dumps(error_body(500, "server_error", f"{type(e).__name__}: {e}"))
