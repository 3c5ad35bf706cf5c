"""HTTP serving benchmarks: what HTTP + SSE cost over the engine, and throughput against mlx-lm.

(a) Single-stream output tok/s of `candlewick serve` under loadgen (concurrency 1) against its
`EngineCore` stepped in this process on prompts and lengths of the same size, in rounds of one
each, back to back (engine first in odd rounds, HTTP first in even ones); the median round's
overhead is the result.
(b) `candlewick serve` and `mlx_lm.server` on one float32 Hugging Face folder exported from the
GGUF, started here one at a time, warmed up, loaded at each concurrency with greedy fixed-length
requests (mlx_lm.server lacks `ignore_eos`: its requests ban EOS with `logit_bias`). Each run
reports the share of the CPUs other processes took meanwhile ("others' CPU").

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python -m loadtests.bench_server --json server.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.loader.load import load_model
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from loadtests import loadgen
from loadtests.bench_engine import environment as machine
from loadtests.export_hf import export
from loadtests.loadgen import LoadConfig, LoadReport, format_table, percentile, run_load

KV_CACHE_BYTES = 1 << 30
SINGLE, WARM = 4, 10_000  # requests a lone stream sends; the warm-up's seed offset
PROMPT = 170  # loadgen size for 128-token prompts: it assumes 0.75 words/token, its words are 1
CANDLEWICK = "candlewick"
MLX_LM = "mlx-lm"
Args = argparse.Namespace
Extra = dict[str, dict[str, Any]]  # model name -> fields merged into its request bodies
TICK = os.sysconf("SC_CLK_TCK")
GEN = "generation_config.json"


@dataclass(frozen=True, slots=True)
class Server:
    url: str
    pid: int


@dataclass(frozen=True, slots=True)
class Run:
    report: LoadReport
    others_cpu: float  # share of all CPUs that other processes used during the run


def cpu_clock(pids: tuple[int, ...]) -> tuple[float, float, float]:
    """(now, busy seconds of all CPUs, CPU seconds of `pids` and their threads), from /proc."""
    cpu = [int(x) for x in Path("/proc/stat").read_text().split()[1:8]]
    stats = (Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split() for p in pids)
    ours = sum(int(f[11]) + int(f[12]) for f in stats)  # utime + stime
    return time.monotonic(), (sum(cpu) - cpu[3] - cpu[4]) / TICK, ours / TICK  # less idle, iowait


def process_tree(pid: int) -> tuple[int, ...]:
    """``pid`` and its descendants (a server's engine process is its child)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += process_tree(int(child))
    return tuple(found)


def others_cpu(before: tuple[float, float, float], pids: tuple[int, ...]) -> float:
    now, busy, ours = (b - a for a, b in zip(before, cpu_clock(pids), strict=True))
    share = max(0.0, busy - ours) / (now * (os.cpu_count() or 1))
    if share > 0.05:
        print(f"warning: other processes used {share:.0%} of the CPUs during this run")
    return share


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def candlewick_argv(hf: Path, port: int, data_dir: Path, *extra: str) -> list[str]:
    return [
        *(sys.executable, "-m", "server.cli", "serve", "--model", str(hf), "--port", str(port)),
        *("--served-model-name", CANDLEWICK, "--kv-cache-memory", str(KV_CACHE_BYTES)),
        *("--data-dir", str(data_dir), *extra),
    ]


# Its http.server's backlog of 5 resets some of a burst of connects (ReadError): raise it.
MLX_MAIN = "import mlx_lm.server as s; s.ThreadingHTTPServer.request_queue_size = 256; s.main()"


def mlx_lm_argv(hf: Path, port: int) -> list[str]:
    return [sys.executable, "-c", MLX_MAIN, "--model", str(hf), "--port", str(port)]


@contextlib.contextmanager
def running(
    argv: list[str], log: Path, timeout: float, env: dict[str, str] | None = None
) -> Iterator[Server]:
    """A server in its own process group, yielded once healthy, always killed afterwards."""
    url = f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{log.stem} not healthy (exit {proc.returncode}); see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield Server(url, proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def extra_body(by_model: Extra) -> Iterator[None]:
    """Merges `by_model[model]` into loadgen's request bodies for `model` (mlx_lm.server needs
    `logit_bias` and `adapters`); loadgen has no such option yet, so its builder is swapped."""
    original = loadgen._body

    def body(config: LoadConfig, model: str, prompt: str) -> dict[str, Any]:
        return {**original(config, model, prompt), **by_model.get(model, {})}

    loadgen._body = body
    try:
        yield
    finally:
        loadgen._body = original


def eos_ban(hf: Path) -> dict[str, Any]:
    """`logit_bias` that bans the folder's EOS ids: mlx-lm's stand-in for `ignore_eos`."""
    eos = [json.loads((hf / f).read_text()).get("eos_token_id") for f in ("config.json", GEN)]
    ids = {i for e in eos for i in (e if isinstance(e, list) else [e]) if i is not None}
    return {"logit_bias": {str(i): -100 for i in sorted(ids)}}  # OpenAI's floor


def load(server: Server, model: str, streams: int, args: Args, extra: Extra, **over: Any) -> Run:
    """One loadgen run at `streams` (fields in `over` replace the benchmark's workload)."""
    # A seed per concurrency: no prompt repeats an earlier run's, so no run hits the prefix cache.
    kw = {"requests": max(SINGLE, streams), "seed": args.seed + streams, "timeout": args.timeout}
    kw |= {"prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens} | over
    config = LoadConfig(url=server.url, model=model, concurrency=streams, **kw)
    with extra_body(extra):
        start = cpu_clock(pids := (os.getpid(), *process_tree(server.pid)))
        report = asyncio.run(run_load(config))
    lengths = {r.output_tokens for r in report.results if r.error is None}
    if lengths - {config.max_tokens}:
        print(f"warning: output lengths {sorted(lengths)}, not {config.max_tokens}")
    return Run(report, others_cpu(start, pids))


def environment() -> dict[str, Any]:
    """bench_engine's machine and versions; the candlewick commit and the files changed since."""
    git = (["describe", "--always", "--dirty", "--exclude=*"], ["diff", "--name-only", "HEAD"])
    rev = [subprocess.run(["git", *c], capture_output=True, text=True).stdout for c in git]
    return {**machine(), "candlewick_rev": " ".join(" ".join(rev).split())}


class EngineAlone:
    """`candlewick serve`'s engine and config, stepped in this process on loadgen's prompts one
    by one: the same work as a single HTTP stream, without HTTP."""

    def __init__(self, args: Args) -> None:
        self.loaded = load_model(args.hf)
        config = EngineConfig(kv_cache_memory=KV_CACHE_BYTES, max_loras=4)  # serve's defaults
        self.core = EngineCore(self.loaded.model, config, self.loaded.dtype)
        self.args, self.rounds = args, 0
        self.generate("warmup", 0, 4)

    def generate(self, tag: str, i: int, max_tokens: int) -> tuple[float, list[float]]:
        workload = LoadConfig(url="-", model="-", prompt_tokens=self.args.prompt_tokens, seed=1)
        prompt = self.loaded.tokenizer.encode(loadgen.make_prompt(workload, tag, i))
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start, stamps = time.perf_counter(), []
        self.core.add_request(EngineRequest(f"{tag}{i}", prompt, params))
        while self.core.has_work:
            tokens = sum(len(o.new_token_ids) for o in self.core.step())
            stamps += [time.perf_counter()] * tokens
        return start, stamps

    def measure(self, requests: int) -> dict[str, float]:
        self.rounds += 1  # new prompts each round: no prefix-cache hits
        clock = cpu_clock((os.getpid(),))
        tag = f"measure{self.rounds}-"
        runs = [self.generate(tag, i, self.args.max_tokens) for i in range(requests)]
        return {
            "others_cpu": others_cpu(clock, (os.getpid(),)),
            "output_tok_s": sum(len(s) for _, s in runs) / (runs[-1][1][-1] - runs[0][0]),
            "ttft_p50": percentile([s[0] - start for start, s in runs], 50),
            "itl_p50": percentile([b - a for _, s in runs for a, b in itertools.pairwise(s)], 50),
        }


def ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.0f}"


def markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = [head, ["---"] + ["---:"] * (len(head) - 1), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def overhead_table(rounds: list[tuple[dict, Run]]) -> tuple[str, float]:
    """One row per round (engine alone and HTTP, back to back); the median round's overhead."""
    rows, overheads = [], []
    for i, (engine, http) in enumerate(rounds, 1):
        r = http.report
        overheads.append(1 - r.output_tok_s / engine["output_tok_s"])
        rows.append(
            [str(i), f"{engine['output_tok_s']:.2f}", f"{r.output_tok_s:.2f}"]
            + [ms(engine["itl_p50"]), ms(r.itl_p50), ms(engine["ttft_p50"]), ms(r.ttft_p50)]
            + [f"{overheads[-1]:+.1%}", f"{max(engine['others_cpu'], http.others_cpu):.0%}"]
        )
    head = ["round", "engine tok/s", "HTTP tok/s", "engine ITL p50 ms", "HTTP ITL p50 ms"]
    head += ["engine TTFT p50 ms", "HTTP TTFT p50 ms", "overhead", "others' CPU"]
    median = percentile(overheads, 50)
    return (
        f"{markdown(head, rows)}\n\nstreaming overhead, median round: {median:+.1%} (goal <= 5%)",
        median,
    )


def throughput_table(runs: dict[tuple[str, int], Run]) -> str:
    rows = []
    for (system, streams), run in runs.items():
        r, other = run.report, runs.get((MLX_LM, streams))
        ratio = r.output_tok_s / other.report.output_tok_s if system == CANDLEWICK and other else 0
        rows.append(
            [str(streams), system, ms(r.ttft_p50), ms(r.ttft_p99), ms(r.itl_p50)]
            + [f"{r.output_tok_s:.2f}", f"{ratio:.2f}" if ratio else "", f"{run.others_cpu:.0%}"]
        )
    head = ["streams", "server", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "output tok/s"]
    return markdown([*head, "candlewick / mlx-lm", "others' CPU"], rows)


def serve_and_load(system: str, args: Args, data: Path) -> tuple[dict[int, Run], list]:
    """Loads at each concurrency; for candlewick first the overhead rounds: the engine alone in
    this process (the server idle) and one HTTP stream (this process idle) back to back, the
    order swapped each round, so both halves of a round see the same machine."""
    port = free_port()
    if system == CANDLEWICK:
        argv, model, extra = candlewick_argv(args.hf, port, data), CANDLEWICK, {}
    else:
        argv, model = mlx_lm_argv(args.hf, port), str(args.hf)  # its default model's key
        extra = {model: eos_ban(args.hf)}
    out: dict[int, Run] = {}
    rounds: list[tuple[dict, Run]] = []
    engine = EngineAlone(args) if system == CANDLEWICK and args.rounds else None
    with running(argv, args.logs / f"{system}.log", args.start_timeout) as server:
        load(server, model, 8, args, extra, max_tokens=4, seed=args.seed + WARM)  # warm-up
        for i in range(args.rounds if engine else 0):
            seed = args.seed + 2 * WARM + i
            if i % 2:  # every other round HTTP goes first: a drifting machine favours neither
                http = load(server, model, 1, args, extra, seed=seed)
                alone = engine.measure(SINGLE)
            else:
                alone = engine.measure(SINGLE)
                http = load(server, model, 1, args, extra, seed=seed)
            rounds.append((alone, http))
            print(
                f"round {i + 1}: engine {alone['output_tok_s']:.2f} tok/s, HTTP "
                f"{http.report.output_tok_s:.2f} tok/s",
                flush=True,
            )
        del engine
        for streams in args.streams:
            out[streams] = run = load(server, model, streams, args, extra)
            print(format_table([(f"{system} x{streams}", run.report)]), flush=True)
    return out, rounds


def run(args: Args) -> dict[str, Any]:
    result: dict[str, Any] = {**environment(), "command": " ".join(sys.argv)}  # rev at start
    if not (args.hf / "config.json").is_file():
        export(None, args.hf, "float32")  # the default GGUF model, dequantized
    args.logs.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, int], Run] = {}
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        for system in args.systems:
            loads, rounds = serve_and_load(system, args, Path(tmp))
            runs |= {(system, n): r for n, r in loads.items()}
            if rounds:
                result["overhead_table"], result["streaming_overhead"] = overhead_table(rounds)
                result["overhead_rounds"] = [{"engine": e, "http": summary(h)} for e, h in rounds]
    result["throughput_table"] = throughput_table(runs)
    result["runs"] = {f"{s}@{c}": summary(r) for (s, c), r in runs.items()}
    return result


def summary(run: Run) -> dict[str, Any]:
    return {**run.report.to_dict(), "results": None, "others_cpu": run.others_cpu}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", type=Path, default=Path("/tmp/candlewick-bench-hf"))
    p.add_argument("--streams", type=lambda t: [int(x) for x in t.split(",")], default="1,8,16")
    p.add_argument("--systems", type=lambda t: t.split(","), default=f"{CANDLEWICK},{MLX_LM}")
    for flag, default in (("--prompt-tokens", PROMPT), ("--max-tokens", 64), ("--seed", 0)):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--rounds", type=int, default=5, help="overhead rounds, part (a); 0 skips")
    p.add_argument("--timeout", type=float, default=600, help="per request, seconds")
    p.add_argument("--start-timeout", type=float, default=300, help="per server, seconds")
    p.add_argument("--logs", type=Path, default=Path("/tmp/candlewick-bench-logs"))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the servers' cleanup
    result = run(args)
    print(result.get("overhead_table", ""), result["throughput_table"], sep="\n\n")
    print({k: result[k] for k in ("machine", "versions", "candlewick_rev", "openblas_preloaded")})
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
