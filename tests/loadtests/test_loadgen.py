"""The load generator against a real SSE server on loopback, whose answers we know exactly.

The fake server streams `max_tokens` tokens with `DELAY` seconds before each chunk and reports
usage (prompt tokens = prompt words). The model name picks a behaviour, so one run with several
`models` mixes successes and failures: `fail` → 500, `busy` → 429, `pairs` → two tokens a chunk,
`nousage` → no usage chunk, `stall` → never finishes.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from loadtests.loadgen import LoadConfig, LoadReport, format_table, main, percentile, run_load

DELAY = 0.005
SEEN: list[dict] = []  # every request body the server got, plus its Authorization header


async def _events(body: dict, chat: bool) -> AsyncIterator[str]:
    def chunk(text: str) -> str:
        choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
        return f"data: {json.dumps({'choices': [choice], 'usage': None})}\n\n"

    n, per_chunk = body["max_tokens"], 2 if body["model"] == "pairs" else 1
    if chat:
        yield chunk("")  # the role-only first delta: not a token, must not end TTFT
    for sent in range(0, n, per_chunk):
        await asyncio.sleep(DELAY if body["model"] != "stall" else 60)
        yield chunk("tok " * min(per_chunk, n - sent))
    if body["model"] != "nousage":
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n}
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


async def _serve(request: Request) -> Response:
    body = await request.json()
    SEEN.append({**body, "auth": request.headers.get("authorization")})
    if body["model"] == "fail":
        return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, 500)
    if body["model"] == "busy":
        return JSONResponse({"error": {"message": "queue full"}}, 429, {"Retry-After": "1"})
    chat = request.url.path.endswith("/chat/completions")
    return StreamingResponse(_events(body, chat), media_type="text/event-stream")


APP = Starlette(
    routes=[
        Route("/v1/completions", _serve, methods=["POST"]),
        Route("/v1/chat/completions", _serve, methods=["POST"]),
    ]
)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(APP, log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while True:  # ready once it accepts a connection
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture(autouse=True)
def _clear_seen() -> None:
    SEEN.clear()


def _run(url: str, **kwargs) -> LoadReport:
    fields = {"model": "ok", "concurrency": 4, "requests": 8, "prompt_tokens": 40, "max_tokens": 8}
    return asyncio.run(run_load(LoadConfig(url=url, **{**fields, **kwargs})))


def test_completions_counts_tokens_and_latencies(url: str) -> None:
    report = _run(url, requests=12, warmup=2, api_key="secret")
    assert (report.ok, report.errors, report.error_counts) == (12, 0, {})
    assert report.output_tokens == 12 * 8 and report.prompt_tokens == 12 * 30
    assert len(report.results) == 12 and report.spread_requests == 0
    for r in report.results:
        assert (r.output_tokens, r.prompt_tokens, len(r.itls)) == (8, 30, 7)
        assert DELAY * 0.8 < r.ttft < r.e2e and r.e2e >= 8 * DELAY * 0.8
    assert report.ttft_p50 <= report.ttft_p99 < report.e2e_p50
    assert 0 < report.itl_p50 <= report.itl_p99 < 0.5
    assert report.itl_p50 > DELAY * 0.5  # the server sleeps DELAY between chunks
    assert report.output_tok_s == pytest.approx(96 / report.wall_s)
    assert report.request_s == pytest.approx(12 / report.wall_s)
    # 2 warm-up requests went out too, but are not counted.
    assert len(SEEN) == 14
    assert len({s["prompt"] for s in SEEN}) == 14
    for body in SEEN:
        assert body["stream"] is True and body["ignore_eos"] is True
        assert body["stream_options"] == {"include_usage": True}
        assert (body["temperature"], body["max_tokens"], body["auth"]) == (0, 8, "Bearer secret")
        assert len(body["prompt"].split()) == 30


def test_chat_multi_token_chunks_and_missing_usage(url: str) -> None:
    report = _run(url, chat=True, models=("pairs", "nousage"))
    assert report.ok == 8 and report.spread_requests == 4
    pairs = [r for r in report.results if r.model == "pairs"]
    bare = [r for r in report.results if r.model == "nousage"]
    assert len(pairs) == len(bare) == 4
    for r in pairs:  # 4 chunks of 2 tokens: 3 gaps, each halved
        assert r.spread and r.output_tokens == 8 and len(r.itls) == 3
        assert sum(r.itls) <= r.e2e - r.ttft + 1e-9
        assert r.ttft > DELAY * 0.8  # the empty role delta did not count
    for r in bare:  # no usage: tokens are the content deltas
        assert not r.spread and r.output_tokens == 8 and r.prompt_tokens is None
    assert all("messages" in s for s in SEEN)


def test_errors_are_counted_not_raised(url: str) -> None:
    report = _run(url, requests=9, models=("ok", "fail", "busy"))
    assert (report.ok, report.errors) == (3, 6)
    assert report.error_counts == {"HTTP 500": 3, "HTTP 429": 3}
    assert report.output_tokens == 3 * 8
    assert all("boom" in r.error for r in report.results if r.model == "fail")
    assert "HTTP 500 x3" in format_table([("mixed", report)])


def test_timeout_and_duration_bound_the_run(url: str) -> None:
    stalled = _run(url, requests=2, model="stall", timeout=0.3)
    assert stalled.errors == 2 and stalled.error_counts == {"timeout": 2}
    assert stalled.ttft_p50 is None and stalled.wall_s < 5
    timed = _run(url, requests=100_000, duration=0.3)
    assert 4 <= timed.ok < 100_000 and timed.errors == 0 and timed.wall_s < 5


def test_json_round_trip_and_cli(url: str, tmp_path, capsys) -> None:
    report = _run(url, requests=4, models=("ok", "fail"))
    again = LoadReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report
    out = tmp_path / "out.json"
    args = ["--url", f"{url}/v1/", "--models", "ok,pairs", "--concurrency", "2", "--requests", "4"]
    assert main([*args, "--max-tokens", "6", "--chat", "--json", str(out)]) == 0
    saved = LoadReport.from_dict(json.loads(out.read_text()))
    assert saved.ok == 4 and saved.output_tokens == 24 and saved.config.models == ("ok", "pairs")
    printed = capsys.readouterr().out
    assert "TTFT p50 ms" in printed and "ok,pairs" in printed and "ITL split" in printed
    table = format_table([("a", report), ("b", saved)]).splitlines()
    assert table[0].split() == ["a", "b"] and table[1].split() == ["requests", "ok", "2", "4"]


def test_config_reports_every_problem_and_percentiles() -> None:
    with pytest.raises(ValueError) as info:
        LoadConfig(url="http://x", model="", concurrency=0, requests=0, timeout=-1)
    for problem in ("concurrency", "requests", "timeout", "model"):
        assert problem in str(info.value)
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
