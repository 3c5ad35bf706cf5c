"""Server-Sent Events as OpenAI streams them, and the client going away.

A client that disconnects aborts its request: for a stream, sse-starlette cancels the generator;
for a whole response, a watcher on the ASGI receive channel cancels the collecting task. Either
way the engine stream is closed, which aborts the request and frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request
from sse_starlette import EventSourceResponse

from server.admission import Lease
from server.errors import APIError, error_body
from server.responses import Accumulator, ResponseBuilder
from server.serving import OpenAIServing, PreparedRequest

log = logging.getLogger(__name__)
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before its response was ready."""


def sse(events: AsyncIterator[str]) -> EventSourceResponse:
    return EventSourceResponse(events, ping=15, sep="\n")


async def collect(serving: OpenAIServing, prepared: PreparedRequest, lease: Lease) -> Accumulator:
    acc = Accumulator(prepared)
    async for event in serving.run(prepared, lease):
        acc.add(event)
    return acc


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientDisconnected


def _error_event(e: Exception) -> str:
    if isinstance(e, APIError):
        return json.dumps(error_body(e.status, e.type, e.message, e.param, e.code))
    log.exception("request failed while streaming")
    return json.dumps(error_body(500, "server_error", f"{type(e).__name__}: {e}"))


async def chat_events(
    serving: OpenAIServing, prepared: PreparedRequest, lease: Lease, include_usage: bool
) -> AsyncIterator[str]:
    builder = ResponseBuilder(serving, prepared)
    acc = Accumulator(prepared)
    try:
        for i in range(prepared.n):
            yield builder.chat_role_chunk(i)
        async for event in serving.run(prepared, lease):
            acc.add(event)
            if chunk := builder.chat_event_chunk(event):
                yield chunk
        if include_usage:
            yield builder.chat_chunk([], usage=acc.usage())
    except Exception as e:
        yield _error_event(e)
    finally:
        lease.release()
    yield "[DONE]"


async def completion_events(
    serving: OpenAIServing, prepared: PreparedRequest, lease: Lease, include_usage: bool
) -> AsyncIterator[str]:
    builder = ResponseBuilder(serving, prepared)
    acc = Accumulator(prepared)
    offsets = [0] * prepared.n
    try:
        async for event in serving.run(prepared, lease):
            acc.add(event)
            if chunk := builder.completion_chunk(event, offset=offsets[event.index]):
                yield chunk
            offsets[event.index] += len(event.text)
        if include_usage:
            yield builder.completion_chunk(None, usage=acc.usage())
    except Exception as e:
        yield _error_event(e)
    finally:
        lease.release()
    yield "[DONE]"
