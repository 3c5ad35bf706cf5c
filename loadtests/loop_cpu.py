"""CPU time per streamed token in `candlewick serve`: its event loop (the main thread) and the
whole process, from `/proc/<pid>/task` (Linux).

The event loop does the HTTP, SSE and text work of every stream, and shares the GIL with the
engine thread: its cost per token bounds how many streams one process can feed. CPU time, not
wall time, so other processes on the machine (the load generator included) do not skew it.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python -m loadtests.loop_cpu --streams 64 --requests 128 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path

from loadtests.bench_server import CANDLEWICK, TICK, candlewick_argv, free_port, running
from loadtests.loadgen import LoadConfig, run_load
from loadtests.make_model import make_model


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of ``pid``, by thread id."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def per_token(before: dict[int, float], after: dict[int, float], pid: int, tokens: int) -> dict:
    """Microseconds of CPU per token: the main thread's, and all threads' (ended ones excepted)."""
    main = after.get(pid, 0.0) - before.get(pid, 0.0)
    total = sum(t - before.get(tid, 0.0) for tid, t in after.items())
    return {"loop_us": 1e6 * main / tokens, "process_us": 1e6 * total / tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, help="default: the tiny preset, made in a temp folder")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="candlewick-loop-cpu-"))
    model = args.model or work / "tiny"
    if args.model is None:
        make_model("tiny", model, workers=1)
    port = free_port()
    argv = candlewick_argv(model, port, work / "data", "--max-num-seqs", str(args.streams))
    rounds = []
    with running(argv, work / "server.log", timeout=300) as server:

        def load(requests: int, seed: int):
            config = LoadConfig(
                url=server.url, model=CANDLEWICK, concurrency=args.streams, requests=requests,
                prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, seed=seed,
            )  # fmt: skip
            return asyncio.run(run_load(config))

        load(args.streams, seed=10_000)  # warm-up
        for i in range(args.rounds):
            before = thread_cpu(server.pid)
            report = load(args.requests, seed=i)
            cost = per_token(before, thread_cpu(server.pid), server.pid, report.output_tokens)
            rate = report.output_tokens / report.wall_s
            rounds.append(cost | {"tokens": report.output_tokens, "tokens_per_s": rate})
            print(
                f"round {i + 1}: event loop {cost['loop_us']:.0f} us/token, whole process "
                f"{cost['process_us']:.0f} us/token, {rate:.0f} tok/s",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"config": vars(args) | {"model": str(model)},
                                         "rounds": rounds}, indent=1, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
