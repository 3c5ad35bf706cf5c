"""The default model (SmolLM2-135M-Instruct Q4_1) served on the CPU with its layers kept
quantized and made dense at load (`--cpu-weights quantized|dense`), both on the real BLAS the
CLI preloads.

Each variant is its own `python -m server.cli serve` (default model, default KV budget); then,
through loadgen over HTTP:

1. the first chat after start-up (a 100-token user message, 16 output tokens): its TTFT is what
   a user waits for first;
2. a second chat of the same size (warm);
3. 16 streams (100-token prompts, 64 output tokens, greedy, EOS ignored), one request per
   stream after a warm-up of 4: output tok/s, TTFT and ITL.

With `--float-folder DIR` it also serves the model exported to float32 (`python -m
loadtests.export_hf --out DIR`), the twin dense-at-load must match. It records the server's
resident memory once loaded and how much of the CPUs other processes used during each run (the
machine may be shared).

    python -m loadtests.bench_cpu_weights --json cpu-weights.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from loadtests.bench_server import cpu_clock, environment, free_port, markdown, others_cpu, running
from loadtests.loadgen import LoadConfig, run_load

MODES = ("quantized", "dense")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def loads(
    url: str, streams: int, requests_per_stream: int, timeout: float
) -> dict[str, LoadConfig]:
    chat = dict(url=url, model="smol", concurrency=1, requests=1, prompt_tokens=100)
    chat["timeout"] = timeout
    return {
        "first chat": LoadConfig(**chat, max_tokens=16, chat=True, seed=1),
        "second chat": LoadConfig(**chat, max_tokens=16, chat=True, seed=2),
        f"{streams} streams": LoadConfig(
            url=url,
            model="smol",
            concurrency=streams,
            requests=streams * requests_per_stream,
            prompt_tokens=100,
            max_tokens=64,
            warmup=4,
            seed=3,
            timeout=timeout,
        ),
    }


def run_mode(mode: str, args: argparse.Namespace, data: str) -> dict[str, Any]:
    port = free_port()
    argv = [sys.executable, "-m", "server.cli", "serve", "--port", str(port)]
    argv += ["--served-model-name", "smol", "--data-dir", data]
    if mode == "float32 folder":  # the same model exported to float32 (loadtests.export_hf)
        argv += ["--model", str(args.float_folder)]
    else:
        argv += ["--cpu-weights", mode]
    started = time.monotonic()
    out: dict[str, Any] = {}
    log_path = Path(data) / f"server-{mode.replace(' ', '-')}.log"
    with running(argv, log_path, timeout=600) as server:
        out["ready_s"] = time.monotonic() - started
        out["rss_mib"] = rss_mib(server.pid)
        out["cpu_blas"] = httpx.get(f"{server.url}/health", timeout=10).json().get("cpu_blas")
        for name, config in loads(
            server.url, args.streams, args.requests_per_stream, args.timeout
        ).items():
            clock = cpu_clock((server.pid, os.getpid()))
            report = asyncio.run(run_load(config))
            share = others_cpu(clock, (server.pid, os.getpid()))
            out[name] = {**report.to_dict(), "results": None, "others_cpu": share}
            print(mode, name, f"ttft_p50={report.ttft_p50}", f"tok/s={report.output_tok_s:.1f}")
        out["rss_mib_after"] = rss_mib(server.pid)
    log = log_path.read_text()
    out["log"] = [ln for ln in log.splitlines() if "CPU weights" in ln or "cpu blas" in ln]
    return out


def table(results: dict[str, dict[str, Any]], streams: int) -> str:
    def ms(s: float | None) -> str:
        return "-" if s is None else f"{s * 1e3:.0f}"

    rows = []
    for mode, r in results.items():
        s = r[f"{streams} streams"]
        others = max(v["others_cpu"] for v in r.values() if isinstance(v, dict) and "ok" in v)
        rows.append(
            [
                mode,
                ms(r["first chat"]["ttft_p50"]),
                ms(r["second chat"]["ttft_p50"]),
                f"{s['output_tok_s']:.1f}",
                ms(s["ttft_p50"]),
                ms(s["itl_p50"]),
                f"{r['rss_mib']:.0f}",
                f"{others:.0%}",
            ]
        )
    head = ["weights", "first chat TTFT ms", "second chat TTFT ms", f"{streams}-stream tok/s"]
    head += ["TTFT p50 ms", "ITL p50 ms", "RSS MiB", "others' CPU (max)"]
    return markdown(head, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument(
        "--float-folder",
        type=Path,
        help="also serve this float32 folder (python -m loadtests.export_hf --out DIR)",
    )
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--requests-per-stream", type=int, default=1)
    ap.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help="seconds one request may take (quantized 16-stream requests take minutes)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as data:
        modes = args.modes + (["float32 folder"] if args.float_folder else [])
        for mode in modes:
            results[mode] = run_mode(mode, args, data)
    report = {"environment": environment(), "runs": results, "table": table(results, args.streams)}
    print(report["table"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
