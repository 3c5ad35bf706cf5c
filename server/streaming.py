"""Server-Sent Events as OpenAI streams them, and the client going away.

A client that disconnects aborts its request: a watcher on the ASGI receive channel cancels the
task that streams the events, or the one collecting a whole response. Either way the engine
stream is closed, which aborts the request and frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Awaitable
from typing import TypeVar

from fastapi import Request, Response
from starlette.types import Receive, Scope, Send

from server.admission import Lease
from server.errors import APIError, error_body
from server.responses import Accumulator, ResponseBuilder
from server.serving import OpenAIServing, PreparedRequest

log = logging.getLogger(__name__)
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before its response was ready."""


class EventStream(Response):
    """Each string from ``events`` sent as one ``data:`` event, straight to the ASGI channel.

    At 64 streams the event loop sends thousands of events a second, so each one costs a
    single ``send``: no per-event cancel scope or lock, as a general SSE library adds. One task
    streams; a watcher cancels it when the client disconnects; an idle stream (a request still
    queued, say) gets a comment line every ``ping`` seconds so that proxies keep it open.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[str, None], ping: float = 15.0) -> None:
        self.events = events
        self.ping = ping
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        last_sent = loop.time()

        async def stream() -> None:
            nonlocal last_sent
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            try:
                async for data in self.events:
                    await send(
                        {"type": "http.response.body", "body": _frame(data), "more_body": True}
                    )
                    last_sent = loop.time()
            finally:
                await self.events.aclose()
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def keep_alive() -> None:
            nonlocal last_sent
            while True:
                await asyncio.sleep(max(self.ping - (loop.time() - last_sent), 0.0))
                if loop.time() - last_sent >= self.ping:
                    await send(
                        {"type": "http.response.body", "body": b": ping\n\n", "more_body": True}
                    )
                    last_sent = loop.time()

        streaming = asyncio.ensure_future(stream())
        watcher = asyncio.ensure_future(_disconnect(receive))
        pinger = asyncio.ensure_future(keep_alive())
        try:
            await asyncio.wait({streaming, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            pinger.cancel()
            streaming.cancel()  # a no-op once done; otherwise the client left: abort
            await asyncio.gather(watcher, pinger, streaming, return_exceptions=True)
        if not streaming.cancelled() and (error := streaming.exception()) is not None:
            raise error


def _frame(data: str) -> bytes:
    """One SSE event; a line break in the data starts another ``data:`` line."""
    if "\n" in data:
        data = data.replace("\n", "\ndata: ")
    return b"data: " + data.encode() + b"\n\n"


def sse(events: AsyncGenerator[str, None]) -> EventStream:
    return EventStream(events)


async def _disconnect(receive: Receive) -> None:
    """Returns once the client has gone (the request's body was read before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def collect(serving: OpenAIServing, prepared: PreparedRequest, lease: Lease) -> Accumulator:
    acc = Accumulator(prepared)
    async for event in serving.run(prepared, lease):
        acc.add(event)
    return acc


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request.receive))
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
) -> AsyncGenerator[str, None]:
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
) -> AsyncGenerator[str, None]:
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
