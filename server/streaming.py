"""Server-Sent Events, and the client going away: the transport under every API's stream.

A client that disconnects aborts its request: a watcher on the ASGI receive channel cancels the
task that streams the events, or the one collecting a whole response. Either way the engine
stream is closed, which aborts the request and frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable
from typing import TypeVar

from fastapi import Request, Response
from starlette.types import Receive, Scope, Send

from server.admission import Lease

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before its response was ready."""


class EventStream(Response):
    """Each string from ``events`` sent as one ``data:`` event, straight to the ASGI channel
    (an ``(event, data)`` pair as a named event, for APIs whose clients read ``event:`` lines).

    At 64 streams the event loop sends thousands of events a second, so each one costs a
    single ``send``: no per-event cancel scope or lock, as a general SSE library adds. One task
    streams; a watcher cancels it when the client disconnects; an idle stream (a request still
    queued, say) gets a comment line every ``ping`` seconds so that proxies keep it open.

    The response owns the request's ``lease`` and releases it when it ends, however it ends:
    even a stream whose events never started (the client left first, or the first send
    failed), whose generator has no ``finally`` that would run.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncGenerator[str | tuple[str, str], None],
        lease: Lease | None = None,
        ping: float = 15.0,
    ) -> None:
        self.events = events
        self.lease = lease
        self.ping = ping
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        last_sent = loop.time()

        async def stream() -> None:
            nonlocal last_sent
            try:
                await send(
                    {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                )
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
            if self.lease is not None:
                self.lease.release()
        if not streaming.cancelled() and (error := streaming.exception()) is not None:
            raise error


def _frame(data: str | tuple[str, str]) -> bytes:
    """One SSE event; a line break in the data starts another ``data:`` line."""
    name = b""
    if isinstance(data, tuple):
        event, data = data
        name = b"event: " + event.encode() + b"\n"
    if "\n" in data:
        data = data.replace("\n", "\ndata: ")
    return name + b"data: " + data.encode() + b"\n\n"


async def _disconnect(receive: Receive) -> None:
    """Returns once the client has gone (the request's body was read before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


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
