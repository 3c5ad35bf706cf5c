"""Async load generator for any OpenAI-compatible server: streaming clients, latency percentiles.

It parses SSE itself because the numbers it exists for (time to first token, gaps between tokens)
live between chunks, which client libraries hide. Each of `concurrency` workers sends one
streaming request at a time until `requests` were sent or `duration` seconds have passed; requests
already in flight then finish (each bounded by `timeout`), so every counted request is whole.
Requests go round-robin over `models` (adapters share the base's batch) and each gets its own
seeded random prompt, so runs repeat exactly and prefix caches don't make them trivial.

    python -m loadtests.loadgen --url http://127.0.0.1:8000 --model NAME --concurrency 16
        --requests 64 --prompt-tokens 128 --max-tokens 128 [--chat] [--models a,b] [--json out.json]

Benchmarks call `run_load(LoadConfig(...))` in-process and print `format_table(...)`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

WORDS_PER_TOKEN = 0.75  # English text runs about 3 words to 4 tokens
_WORDS = """time year people way day man thing woman life child world school state family student
group country problem hand part place case week company system program question work government
number night point home water room mother area money story fact month lot right study book eye job
word business issue side kind head house service friend father power hour game line end member law
car city community name president team minute idea body information back parent face level office
door health person art war history party result change morning reason research girl moment air"""
_VOCAB = tuple(_WORDS.split())


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """One load run. `models`, when given, replaces `model` and is used round-robin."""

    url: str
    model: str
    concurrency: int = 16
    requests: int = 64
    prompt_tokens: int = 128
    max_tokens: int = 128
    chat: bool = False
    api_key: str | None = None
    models: tuple[str, ...] = ()
    seed: int = 0
    warmup: int = 0
    duration: float | None = None
    timeout: float = 120.0

    def __post_init__(self) -> None:
        mins = {"concurrency": 1, "requests": 1, "prompt_tokens": 1, "max_tokens": 1, "warmup": 0}
        problems = [f"{k} must be >= {v}" for k, v in mins.items() if getattr(self, k) < v]
        problems += [
            f"{k} must be > 0" for k in ("duration", "timeout") if (getattr(self, k) or 1) <= 0
        ]
        problems += ["a model name is required"] * (not (self.model or self.models))
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True, slots=True)
class RequestResult:
    """One request as the client saw it; times in seconds from sending it.

    `spread` marks a stream whose chunks carried several tokens (usage said more tokens than
    content deltas): each gap was divided by the mean tokens per chunk, one ITL per gap.
    """

    model: str
    error: str | None
    ttft: float | None
    itls: tuple[float, ...]
    e2e: float
    prompt_tokens: int | None  # the server's usage; None when it sent none
    output_tokens: int
    spread: bool


@dataclass(frozen=True, slots=True)
class LoadReport:
    """Summary of the measured window (warm-up excluded); latencies over successful requests."""

    config: LoadConfig
    ok: int
    errors: int
    error_counts: dict[str, int]
    prompt_tokens: int
    output_tokens: int
    wall_s: float
    ttft_p50: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p99: float | None
    e2e_p50: float | None
    output_tok_s: float
    request_s: float
    spread_requests: int
    results: tuple[RequestResult, ...] = field(repr=False)

    @classmethod
    def summarize(cls, config: LoadConfig, results: list[RequestResult], wall: float) -> LoadReport:
        good = [r for r in results if r.error is None]
        ttfts = [r.ttft for r in good if r.ttft is not None]
        itls = [gap for r in good for gap in r.itls]
        e2es = [r.e2e for r in good]
        kinds = Counter(r.error.split(":", 1)[0] for r in results if r.error is not None)
        output = sum(r.output_tokens for r in good)
        return cls(
            config=config,
            ok=len(good),
            errors=len(results) - len(good),
            error_counts=dict(kinds),
            prompt_tokens=sum(r.prompt_tokens or 0 for r in good),
            output_tokens=output,
            wall_s=wall,
            ttft_p50=percentile(ttfts, 50),
            ttft_p99=percentile(ttfts, 99),
            itl_p50=percentile(itls, 50),
            itl_p99=percentile(itls, 99),
            e2e_p50=percentile(e2es, 50),
            output_tok_s=output / wall if wall > 0 else 0.0,
            request_s=len(good) / wall if wall > 0 else 0.0,
            spread_requests=sum(r.spread for r in good),
            results=tuple(results),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadReport:
        """Inverse of `to_dict` after a JSON round trip (lists back to tuples)."""
        config = LoadConfig(**{**data["config"], "models": tuple(data["config"]["models"])})
        results = tuple(RequestResult(**{**r, "itls": tuple(r["itls"])}) for r in data["results"])
        return cls(**{**data, "config": config, "results": results})


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None without data."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def make_prompt(config: LoadConfig, tag: str, index: int) -> str:
    rng = random.Random(f"{config.seed}/{tag}/{index}")
    words = max(1, round(config.prompt_tokens * WORDS_PER_TOKEN))
    return " ".join(rng.choice(_VOCAB) for _ in range(words))


def _body(config: LoadConfig, model: str, prompt: str) -> dict[str, Any]:
    chat = {"messages": [{"role": "user", "content": prompt}]}
    return {
        "model": model,
        **(chat if config.chat else {"prompt": prompt}),
        "max_tokens": config.max_tokens,
        "temperature": 0,
        "ignore_eos": True,  # vLLM / llama.cpp extension: every request decodes max_tokens
        "stream": True,
        "stream_options": {"include_usage": True},
    }


class _ServerError(Exception):
    """A non-200 answer or an error chunk: counted in the report, never raised out of it."""


async def _read_stream(resp: httpx.Response, chat: bool, stamps: list[float]) -> dict | None:
    """Appends each non-empty content delta's arrival time; returns the usage chunk, if any."""
    if resp.status_code != 200:
        text = (await resp.aread()).decode(errors="replace")
        raise _ServerError(f"HTTP {resp.status_code}: {text[:200]}")
    usage = None
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("error"):
            raise _ServerError(f"stream error: {chunk['error']}")
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or ():
            content = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if content:
                stamps.append(time.perf_counter())
    return usage


async def _one_request(
    client: httpx.AsyncClient, config: LoadConfig, model: str, prompt: str
) -> RequestResult:
    path = "/v1/chat/completions" if config.chat else "/v1/completions"
    stamps: list[float] = []
    usage: dict[str, Any] | None = None
    error: str | None = None
    start = time.perf_counter()
    try:
        async with (
            asyncio.timeout(config.timeout),
            client.stream("POST", path, json=_body(config, model, prompt)) as resp,
        ):
            usage = await _read_stream(resp, config.chat, stamps)
    except _ServerError as exc:
        error = str(exc)
    except TimeoutError:
        error = f"timeout: no full answer within {config.timeout}s"
    except (httpx.HTTPError, ValueError) as exc:  # ValueError: a chunk that is not JSON
        error = f"{type(exc).__name__}: {exc}"
    e2e = time.perf_counter() - start
    chunks = len(stamps)
    output = int(usage.get("completion_tokens", chunks)) if usage else chunks
    per_chunk = output / chunks if chunks and output > chunks else 1.0
    return RequestResult(
        model=model,
        error=error,
        ttft=stamps[0] - start if stamps else None,
        itls=tuple((b - a) / per_chunk for a, b in itertools.pairwise(stamps)),
        e2e=e2e,
        prompt_tokens=usage.get("prompt_tokens") if usage else None,
        output_tokens=output,
        spread=per_chunk > 1.0,
    )


async def _drive(
    client: httpx.AsyncClient, config: LoadConfig, count: int, deadline: float | None, tag: str
) -> list[RequestResult]:
    """Runs `count` requests on `concurrency` workers; none starts after `deadline`."""
    models = config.models or (config.model,)
    indices = itertools.count()
    results: list[RequestResult] = []

    async def worker() -> None:
        while (i := next(indices)) < count and (deadline is None or time.perf_counter() < deadline):
            prompt = make_prompt(config, tag, i)
            results.append(await _one_request(client, config, models[i % len(models)], prompt))

    await asyncio.gather(*(worker() for _ in range(min(config.concurrency, count))))
    return results


async def run_load(config: LoadConfig) -> LoadReport:
    """Warm up (untimed), then measure: wall time runs from the first request to the last answer."""
    base = config.url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=None)
    # No httpx timeout: asyncio.timeout in _one_request bounds the whole request.
    async with httpx.AsyncClient(
        base_url=base, headers=headers, limits=limits, timeout=None
    ) as client:
        if config.warmup:
            await _drive(client, config, config.warmup, None, "warmup")
        start = time.perf_counter()
        deadline = start + config.duration if config.duration else None
        results = await _drive(client, config, config.requests, deadline, "measure")
        wall = time.perf_counter() - start
    return LoadReport.summarize(config, results, wall)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


_ROWS = (
    ("requests ok", lambda r: str(r.ok)),
    ("errors", lambda r: str(r.errors)),
    ("prompt tok/req", lambda r: f"{r.prompt_tokens / r.ok:.0f}" if r.ok else "-"),
    ("TTFT p50 ms", lambda r: _ms(r.ttft_p50)),
    ("TTFT p99 ms", lambda r: _ms(r.ttft_p99)),
    ("ITL p50 ms", lambda r: _ms(r.itl_p50)),
    ("ITL p99 ms", lambda r: _ms(r.itl_p99)),
    ("E2E p50 ms", lambda r: _ms(r.e2e_p50)),
    ("output tok/s", lambda r: f"{r.output_tok_s:.1f}"),
    ("requests/s", lambda r: f"{r.request_s:.2f}"),
    ("wall s", lambda r: f"{r.wall_s:.2f}"),
)


def format_table(reports: list[tuple[str, LoadReport]]) -> str:
    """One column per labelled report, so two servers (or settings) read side by side."""
    cells = [["", *(label for label, _ in reports)]]
    cells += [[name, *(cell(r) for _, r in reports)] for name, cell in _ROWS]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    head, *tail = widths
    lines = [
        name.ljust(head) + "".join(v.rjust(w + 2) for v, w in zip(values, tail, strict=True))
        for name, *values in cells
    ]
    for label, r in reports:
        if r.error_counts:
            kinds = ", ".join(f"{k} x{n}" for k, n in sorted(r.error_counts.items()))
            lines.append(f"{label}: errors: {kinds}")
        if r.spread_requests:
            lines.append(
                f"{label}: {r.spread_requests} streams sent several tokens a chunk (ITL split)"
            )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="", help="model name (or use --models)")
    p.add_argument("--models", default="", help="comma-separated names, used round-robin")
    for flag, default in (("concurrency", 16), ("requests", 64), ("prompt-tokens", 128)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=0, help="untimed requests before measuring")
    p.add_argument("--duration", type=float, default=None, help="stop sending after S seconds")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request limit, seconds")
    p.add_argument("--json", default=None, help="also write the report here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    fields = {k: v for k, v in vars(args).items() if k not in ("json", "models")}
    model = args.model or ",".join(models[:1])
    try:
        config = LoadConfig(**{**fields, "model": model, "models": models})
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = asyncio.run(run_load(config))
    print(format_table([(",".join(models) or config.model, report)]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
