"""POST /v1/chat/completions and POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.protocol import ChatCompletionRequest, CompletionRequest
from server.responses import ResponseBuilder
from server.routes.deps import serving_of
from server.streaming import (
    ClientDisconnected,
    chat_events,
    collect,
    completion_events,
    sse,
    unless_disconnected,
)

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    serving = serving_of(request)
    max_tokens = body.max_completion_tokens or body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    prepared = serving.prepare(body, serving.chat_prompt(body), max_tokens, logprobs, "chatcmpl")
    lease = serving.admit(prepared)
    usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream:
        return sse(chat_events(serving, prepared, lease, usage))
    try:
        acc = await unless_disconnected(request, collect(serving, prepared, lease))
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        lease.release()
    return JSONResponse(ResponseBuilder(serving, prepared).chat_response(acc).model_dump())


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    serving = serving_of(request)
    prompt = serving.completion_prompt(body)
    prepared = serving.prepare(body, prompt, body.max_tokens, body.logprobs, "cmpl")
    lease = serving.admit(prepared)
    usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream:
        return sse(completion_events(serving, prepared, lease, usage))
    try:
        acc = await unless_disconnected(request, collect(serving, prepared, lease))
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        lease.release()
    return JSONResponse(ResponseBuilder(serving, prepared).completion_response(acc).model_dump())
