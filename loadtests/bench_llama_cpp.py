"""The default model against llama.cpp's own server, on the very GGUF file `make serve` installs.

candlewick starts the way a newcomer starts it (`candlewick serve`: no model, no flag; the CLI
picks the BLAS and the engine its threads); `llama-server` (built from llama.cpp's sources,
which this script does not do: it is slow to build) starts on the same file with every core
(`--threads`, default: the usable cores) and one slot per stream (`-np`, each with `--ctx`
tokens). Both are loaded with loadgen's streaming chats (greedy, `ignore_eos`, fixed length),
one server at a time, alternating server order every round; each run reports the share of the
CPUs other processes took meanwhile.

    python -m loadtests.bench_llama_cpp --llama-server /path/to/llama-server --json out.json

Building llama-server (CPU, this machine's instructions): from llama.cpp's source tree,
`cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build --target llama-server`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from engine.cpu_blas import usable_cores
from engine.loader.load import default_model_path
from loadtests.bench_engine import environment
from loadtests.bench_server import cpu_clock, free_port, others_cpu, process_tree, running
from loadtests.loadgen import LoadConfig, LoadReport, format_table, run_load

MODEL = "default"


def candlewick_argv(port: int, data_dir: Path) -> list[str]:
    serve = [sys.executable, "-m", "server.cli", "serve"]
    return [*serve, "--port", str(port), "--data-dir", str(data_dir)]


def llama_argv(args: argparse.Namespace, gguf: Path, port: int, streams: int) -> list[str]:
    return [
        str(args.llama_server), "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1",
        "--threads", str(args.threads), "-np", str(streams), "-c", str(streams * args.ctx),
        "--alias", MODEL,
    ]  # fmt: skip


def newcomer_env() -> dict[str, str]:
    """This environment less whatever would make candlewick's start not a newcomer's: a BLAS
    preloaded or a thread count set by hand."""
    drop = ("LD_PRELOAD", "LD_LIBRARY_PATH", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    return {
        k: v for k, v in os.environ.items() if k not in drop and not k.startswith("CANDLEWICK_")
    }


def load(
    url: str, model: str, streams: int, args: argparse.Namespace, pid: int, seed: int
) -> dict[str, Any]:
    config = LoadConfig(
        url=url, model=model, concurrency=streams, requests=max(4, streams), chat=True,
        prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, seed=seed,
        warmup=1, timeout=args.timeout,
    )  # fmt: skip
    start = cpu_clock(pids := (os.getpid(), *process_tree(pid)))
    report: LoadReport = asyncio.run(run_load(config))
    return {"report": report, "others_cpu": others_cpu(start, pids)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-server", type=Path, required=True)
    p.add_argument("--gguf", type=Path, help="default: the file `candlewick serve` loads")
    p.add_argument("--streams", type=lambda t: [int(x) for x in t.split(",")], default="1,16")
    p.add_argument("--threads", type=int, default=usable_cores(), help="llama-server's")
    p.add_argument("--ctx", type=int, default=512, help="llama-server's context per slot")
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--logs", type=Path, default=Path("/tmp/candlewick-bench-logs"))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    gguf = args.gguf or default_model_path()
    args.logs.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, LoadReport]] = []
    result: dict[str, Any] = {**environment(), "gguf": str(gguf), "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-llama-cpp-") as tmp:
        for r in range(args.rounds):
            order = ("candlewick", "llama.cpp") if r % 2 == 0 else ("llama.cpp", "candlewick")
            for system in order:
                for streams in args.streams:
                    port = free_port()
                    if system == "candlewick":
                        argv_, name = candlewick_argv(port, Path(tmp) / f"data{r}"), gguf.stem
                        env = newcomer_env()
                    else:
                        argv_, name, env = llama_argv(args, gguf, port, streams), MODEL, None
                    log = args.logs / f"{system}-{streams}.log"
                    seed = 100 * r + streams
                    with running(argv_, log, timeout=600, env=env) as server:
                        run = load(server.url, name, streams, args, server.pid, seed)
                    label = f"{system} r{r} @{streams}"
                    rows.append((label, run["report"]))
                    result["runs"].append({"system": system, "round": r, "streams": streams,
                                           "others_cpu": run["others_cpu"],
                                           **run["report"].to_dict(), "results": None})  # fmt: skip
                    print(f"{label}: {run['report'].output_tok_s:.1f} tok/s", flush=True)
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
