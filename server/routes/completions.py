"""POST /v1/chat/completions and POST /v1/completions."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from server.admission import Lease
from server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.responses import Accumulator, ResponseBuilder
from server.routes.deps import serving_of
from server.serving import OpenAIServing, PreparedRequest
from server.streaming import (
    ClientDisconnected,
    chat_events,
    collect,
    completion_events,
    sse,
    unless_disconnected,
)

router = APIRouter()

Events = Callable[[OpenAIServing, PreparedRequest, Lease, bool], AsyncGenerator[str, None]]
Whole = Callable[[ResponseBuilder, Accumulator], BaseModel]


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    serving = serving_of(request)
    max_tokens = body.max_completion_tokens or body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    prepared = serving.prepare(body, serving.chat_prompt(body), max_tokens, logprobs, "chatcmpl")
    return await respond(
        request, serving, body, prepared, chat_events, ResponseBuilder.chat_response
    )


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    serving = serving_of(request)
    prompt = serving.completion_prompt(body)
    prepared = serving.prepare(body, prompt, body.max_tokens, body.logprobs, "cmpl")
    return await respond(
        request, serving, body, prepared, completion_events, ResponseBuilder.completion_response
    )


async def respond(
    request: Request,
    serving: OpenAIServing,
    body: SamplingFields,
    prepared: PreparedRequest,
    events: Events,
    whole: Whole,
) -> Response:
    """Admit the request (429 before anything starts), then stream it or answer it whole."""
    lease = serving.admit(prepared)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse(events(serving, prepared, lease, usage))
    try:
        acc = await unless_disconnected(request, collect(serving, prepared, lease))
    except ClientDisconnected:
        return Response(status_code=499)  # nobody is listening; the request was aborted
    finally:
        lease.release()
    return JSONResponse(whole(ResponseBuilder(serving, prepared), acc).model_dump())
