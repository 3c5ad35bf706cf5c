"""`candlewick serve` on one rank against `--tensor-parallel 2` (two ranks on loopback, ring
backend) on one float32 llama written by loadtests/make_model.py: output tok/s, TTFT and ITL
under loadgen at each concurrency, in rounds that alternate which server goes first.

On one machine's CPU two ranks share its cores and pay a loopback all_sum per attention and
MLP: these figures say what the mechanism costs, not what several Macs or GPUs gain.

    python -m loadtests.bench_tensor_parallel --json tp.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from loadtests.bench_server import (
    CANDLEWICK,
    candlewick_argv,
    environment,
    free_port,
    load,
    running,
    summary,
)
from loadtests.loadgen import format_table
from loadtests.make_model import make_model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-50m")
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/candlewick-bench-tp"))
    p.add_argument("--streams", type=lambda t: [int(x) for x in t.split(",")], default="1,8")
    p.add_argument("--rounds", type=int, default=2)
    for flag, default in (("--prompt-tokens", 170), ("--max-tokens", 64), ("--seed", 0)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--logs", type=Path, default=Path("/tmp/candlewick-bench-logs"))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    folder = args.model_dir / args.preset
    if not (folder / "config.json").is_file():
        make_model(args.preset, folder, workers=1)
    args.logs.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {**environment(), "command": " ".join(sys.argv), "runs": []}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tp-") as tmp:
        for i in range(args.rounds):
            order = (1, 2) if i % 2 == 0 else (2, 1)
            for ranks in order:
                extra = ("--tensor-parallel", str(ranks))
                argv = candlewick_argv(folder, free_port(), Path(tmp) / f"d{ranks}", *extra)
                log = args.logs / f"tp{ranks}.log"
                with running(argv, log, 300) as server:
                    load(server, CANDLEWICK, 4, args, {}, max_tokens=4, seed=args.seed + 10_000)
                    for streams in args.streams:
                        run = load(server, CANDLEWICK, streams, args, {}, seed=args.seed + i)
                        label = f"round {i + 1}, {ranks} rank(s), x{streams}"
                        rows.append((label, run.report))
                        result["runs"].append(
                            {"round": i + 1, "ranks": ranks, "streams": streams} | summary(run)
                        )
                        print(format_table([(label, run.report)]), flush=True)
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
