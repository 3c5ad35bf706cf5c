"""The SSE response on a real uvicorn server: framing, keep-alive comments while idle, and the
event source closed as soon as the client goes away."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
from starlette.applications import Starlette
from starlette.routing import Route

from server.streaming import EventStream
from tests.server.fixtures import serving

CLOSED = threading.Event()
SENT: list[int] = []


async def _slow(request):
    async def events():
        yield '{"a": 1}'
        await asyncio.sleep(0.35)  # idle: pings every 0.1 s
        yield "two\nlines"
        yield "[DONE]"

    return EventStream(events(), ping=0.1)


async def _endless(request):
    async def events():
        try:
            i = 0
            while True:
                SENT.append(i)
                yield str(i)
                i += 1
                await asyncio.sleep(0.01)
        finally:
            CLOSED.set()

    return EventStream(events())


APP = Starlette(routes=[Route("/slow", _slow), Route("/endless", _endless)])


def test_events_are_framed_and_an_idle_stream_is_pinged():
    with serving(APP) as url:
        r = httpx.get(url + "/slow", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    blocks = r.text.split("\n\n")
    assert blocks[0] == 'data: {"a": 1}'
    assert blocks[-3:] == ["data: two\ndata: lines", "data: [DONE]", ""]
    pings = blocks[1:-3]
    assert 1 <= len(pings) <= 4 and set(pings) == {": ping"}


def test_the_event_source_closes_when_the_client_leaves():
    CLOSED.clear()
    SENT.clear()
    with serving(APP) as url:
        with httpx.stream("GET", url + "/endless", timeout=10) as r:
            lines = r.iter_lines()
            assert next(lines) == "data: 0"
        assert CLOSED.wait(5), "the generator was not closed after the disconnect"
        sent = len(SENT)
        time.sleep(0.1)
        assert len(SENT) == sent, "events still produced after the disconnect"
