"""Interleaved A/B of servers that are already running: one streamed completion at a time, taking
turns (the order flips every round), so that a box whose speed drifts (a shared VM, a GPU host
with noisy neighbours) drifts under every server alike.

Each turn is one streamed completion of ``--tokens`` tokens (``ignore_eos``, greedy): its mean
inter-token time, first to last token, is what is compared. With ``--concurrency C`` each turn
also runs C such streams at once (128 tokens each) and records their total output tokens/s.

    python -m loadtests.ab_streams --model l8b --rounds 10 before=8941 after=8942

Start the servers first, on one machine, each on its own port (for two checkouts: one
``candlewick serve`` from each). Servers that share one GPU share its memory too: give each a
KV budget (``--kv-cache-memory``) that lets all of them fit.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import threading
import time


def stream(port: int, model: str, tokens: int, prompt: str, arrivals: list[float]) -> None:
    """One streamed completion; the time each of its chunks arrived goes to ``arrivals``."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0}
    body |= {"stream": True, "ignore_eos": True}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        headers = {"content-type": "application/json"}
        conn.request("POST", "/v1/completions", json.dumps(body), headers)
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"port {port}: {response.status} {response.read()[:300]!r}")
        while line := response.readline():
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                if b'"error"' in line:
                    raise RuntimeError(f"port {port}: {line.decode()[:300]}")
                arrivals.append(time.perf_counter())
    finally:
        conn.close()


def one_stream_ms(port: int, model: str, tokens: int) -> float:
    """Mean milliseconds between a single stream's tokens (first to last)."""
    arrivals: list[float] = []
    stream(port, model, tokens, "Once upon a time", arrivals)
    if len(arrivals) < 2:
        raise RuntimeError(f"port {port}: {len(arrivals)} chunks for {tokens} tokens")
    return (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1) * 1e3


def many_streams_tok_s(port: int, model: str, concurrency: int) -> float:
    """Output tokens/s of ``concurrency`` streams of 128 tokens started together."""
    arrivals: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            stream(port, model, 128, f"Story {i}: once upon a time " * 8, arrivals[i])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return concurrency * 128 / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("servers", nargs="+", help="NAME=PORT of each running server")
    p.add_argument("--model", required=True, help="the model name the servers serve")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=0)
    p.add_argument("--json", help="write every run here")
    args = p.parse_args(argv)
    servers = [(s.split("=")[0], int(s.split("=")[1])) for s in args.servers]
    for _, port in servers:  # warm each up: first-use kernels, the prefix cache
        one_stream_ms(port, args.model, 16)
    runs: dict[str, dict[str, list[float]]] = {name: {"ms": [], "tok_s": []} for name, _ in servers}
    for r in range(args.rounds):
        for name, port in servers if r % 2 == 0 else servers[::-1]:
            runs[name]["ms"].append(one_stream_ms(port, args.model, args.tokens))
            if args.concurrency:
                runs[name]["tok_s"].append(many_streams_tok_s(port, args.model, args.concurrency))
    for name, run in runs.items():
        line = f"{name}: one stream {statistics.median(run['ms']):.3f} ms/token median"
        line += f" (runs {', '.join(f'{x:.2f}' for x in run['ms'])})"
        if run["tok_s"]:
            line += f"; {args.concurrency} streams {statistics.median(run['tok_s']):.1f} tok/s"
            line += f" median (runs {', '.join(f'{x:.0f}' for x in run['tok_s'])})"
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=2)


if __name__ == "__main__":
    main()
