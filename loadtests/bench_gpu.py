"""candlewick against mlx_lm.server: the same card, weights and load, in one run.

Numbers from different days or machines don't compare, so one command does it all: makes (or
reuses) a random-weight model folder, measures copy bandwidth for the batch-1 roofline, then for
each server in turn starts it on loopback, drives it with `run_load` (many streams, then one,
each after an untimed warm-up) and stops it. Prompts are calibrated to `--prompt-tokens` tokens;
each request asks for `--max-tokens` (mlx-lm has no `ignore_eos`: tokens actually produced are
reported). With py-spy on PATH each server is sampled during the many-stream run.

    python -m loadtests.bench_gpu --preset llama3-8b --model /tmp/llama3-8b --out $OUT/bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from loadtests.loadgen import LoadConfig, LoadReport, format_table, make_prompt, run_load
from loadtests.make_model import PRESETS, make_model

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True, slots=True)
class Server:
    """How to start one server and what to call the model in its requests."""

    name: str
    argv: tuple[str, ...]
    model: str | None  # None: ask /v1/models

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.argv[self.argv.index('--port') + 1]}"


def servers(args: argparse.Namespace) -> list[Server]:
    tail = f"--model {args.model} --host 127.0.0.1".split()
    seqs = str(args.concurrency)
    # mlx-lm's decode-concurrency defaults to 32: give it the same batch as candlewick. Its
    # http.server listens with a backlog of 5, and a burst of 64 connects gets most reset
    # (ReadError after ~1 s): unless --mlx-stock-backlog, raise it so the engine is measured.
    mlx = ["-m", "mlx_lm.server"] if args.mlx_stock_backlog else ["-c", _MLX_BACKLOG_256]
    mlx = [sys.executable, *mlx, *tail, "--port", "18081", "--decode-concurrency", seqs]
    cw = [sys.executable, "-m", "server.cli", "serve", *tail, "--port", "18082"]
    cw += ["--max-num-seqs", seqs, "--kv-cache-memory", args.kv_cache_memory]
    cw += ["--data-dir", tempfile.mkdtemp()]
    table = {
        "mlx-lm": Server("mlx-lm", tuple(mlx), "default_model"),
        "candlewick": Server("candlewick", tuple(cw), None),
    }
    return [table[name] for name in args.servers.split(",")]


_MLX_BACKLOG_256 = (
    "import http.server as h; h.ThreadingHTTPServer.request_queue_size = 256; "
    "from mlx_lm.server import main; main()"
)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for pkg in ("mlx", "mlx-cuda-13", "mlx-lm", "numpy", "transformers"):
        with contextlib.suppress(PackageNotFoundError):
            found[pkg] = version(pkg)
    try:
        smi = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
        found["gpu"] = subprocess.run(smi, capture_output=True, text=True, timeout=30).stdout
        found["gpu"] = found["gpu"].strip()
    except (OSError, subprocess.TimeoutExpired):
        found["gpu"] = "none (no nvidia-smi)"
    return found


def copy_bandwidth(nbytes: int, repeats: int = 10) -> dict[str, Any]:
    """Bytes read plus written per second by `x + 1` over a large array on the default device,
    the best of three dtypes (kernels vectorize differently): the ceiling of a decode step,
    which streams every weight once."""
    import mlx.core as mx

    found: dict[str, Any] = {"device": str(mx.default_device()), "bytes": nbytes}
    for dtype in (mx.bfloat16, mx.float32, mx.uint32):
        x = mx.random.normal((nbytes // dtype.size,)).astype(dtype)
        mx.eval(x)
        times = []
        for _ in range(repeats + 2):  # the first two warm up
            start = time.perf_counter()
            mx.eval(x + 1)
            mx.synchronize()
            times.append(time.perf_counter() - start)
        found[str(dtype)] = 2 * nbytes / statistics.median(times[2:]) / 1e9
        del x
        mx.clear_cache()
    found["gb_s"] = max(v for k, v in found.items() if k.startswith("mlx.core"))
    return found


def weight_bytes(folder: Path) -> dict[str, int]:
    """All weights, and what one batch-1 decode step must read: all but an untied embedding
    table, of which it reads one row."""
    header: dict[str, Any] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with open(shard, "rb") as f:
            header.update(json.loads(f.read(int.from_bytes(f.read(8), "little"))))
    header.pop("__metadata__", None)
    size = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}
    total = sum(size.values())
    embed = size["model.embed_tokens.weight"] if "lm_head.weight" in size else 0
    return {"total": total, "per_decode_step": total - embed}


def calibrate(folder: Path, want: int) -> int:
    """The loadgen `prompt_tokens` that makes its prompts `want` tokens long in this folder's
    tokenizer (the loadgen assumes English-like tokens; ours are one per character)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    probe = LoadConfig(url="http://x", model="x", prompt_tokens=want)
    counts = [len(tok.encode(make_prompt(probe, "measure", i)).ids) for i in range(8)]
    return max(1, round(want * want / statistics.mean(counts)))


def start(server: Server, log: Path, timeout: float) -> tuple[subprocess.Popen, str]:
    """Starts the server in its own process group; returns it once /health answers 200."""
    url = server.url
    with open(log, "w") as f:
        proc = subprocess.Popen(
            server.argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {proc.returncode}:\n{tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                model = server.model or httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
                return proc, model
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(proc)
    raise RuntimeError(f"{server.name} not healthy within {timeout}s:\n{tail(log)}")


def stop(proc: subprocess.Popen) -> None:
    """SIGINT the group (both servers exit at once on it), SIGKILL it if it lingers."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(20)


def tail(path: Path) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-40:])  # a crash's story


def profile(pid: int, out: Path, seconds: int) -> subprocess.Popen | None:
    """py-spy, when present, samples every thread of `pid` (native frames off: cheap)."""
    if (spy := shutil.which("py-spy")) is None:
        return None
    argv = [spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "50",
            "--format", "raw", "--threads", "--nonblocking", "--output", str(out)]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def bench_server(
    server: Server,
    args: argparse.Namespace,
    prompt: int,
    reports: dict[str, LoadReport],
    many_runs: dict[str, list[float]],
) -> None:
    """Fills `reports` run by run, so a failure late in the run keeps what was measured. With
    `--repeats`, the many-stream load runs that often; its report is the median run's and
    `many_runs` gets every run's output tok/s."""
    proc, model = start(server, args.workdir / f"{server.name}.log", args.start_timeout)
    new = dataclasses.replace
    try:
        base = LoadConfig(server.url, model, prompt_tokens=prompt, max_tokens=args.max_tokens,
                          timeout=args.request_timeout, duration=args.duration)  # fmt: skip
        many = new(base, concurrency=args.concurrency, requests=args.requests)
        one = new(base, concurrency=1, requests=args.single_requests)
        # Warm-ups (untimed, short answers) let both compile and size their buffers.
        asyncio.run(run_load(new(many, requests=args.concurrency, max_tokens=8, seed=1)))
        spy = profile(proc.pid, args.workdir / f"pyspy-{server.name}.txt", args.spy_seconds)
        runs = []
        for i in range(args.repeats):  # new prompts each time: no prefix-cache hits across runs
            runs.append(asyncio.run(run_load(new(many, seed=many.seed + 1000 * i))))
            if i == 0 and spy is not None:
                spy.wait(30)
        reports["many"] = median_run(runs)
        many_runs[server.name] = [r.output_tok_s for r in runs]
        if server.model is None:  # candlewick's own view of the run
            metrics = httpx.get(base.url + "/metrics", timeout=10).text
            (args.workdir / f"{server.name}-metrics.txt").write_text(metrics)
        asyncio.run(run_load(new(one, requests=1, max_tokens=8, seed=1)))
        reports["one"] = asyncio.run(run_load(one))
    finally:
        stop(proc)


def median_run(runs: list[LoadReport]) -> LoadReport:
    """The run with the median output tok/s (the lower of the middle two for an even count)."""
    return sorted(runs, key=lambda r: r.output_tok_s)[(len(runs) - 1) // 2]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def decode_rate(report: LoadReport) -> float | None:
    """Median over requests of tokens after the first per second after the first: a stream's
    decode speed, immune to servers that flush several tokens in one burst (ITL near 0)."""
    rates = [(r.output_tokens - 1) / (r.e2e - r.ttft) for r in report.results
             if r.error is None and r.ttft is not None and r.output_tokens > 1]  # fmt: skip
    return statistics.median(rates) if rates else None


def summarize(reports: dict[str, dict[str, LoadReport]], roof: dict[str, Any]) -> dict[str, Any]:
    """Ratios candlewick / mlx-lm against the goals, and each server's batch-1 decode rate as a
    share of the bandwidth roofline."""
    out: dict[str, Any] = {"roofline_tok_s": roof["tok_s"]}
    for name, r in reports.items():
        for load, rep in r.items():
            out[f"{name}_{load}_decode_tok_s_per_stream"] = decode_rate(rep)
        rate = decode_rate(r["one"]) if "one" in r else None
        out[f"{name}_one_share_of_roofline"] = ratio(rate, roof["tok_s"])
    cw, ml = reports.get("candlewick", {}), reports.get("mlx-lm", {})
    for load in set(cw) & set(ml):
        for key in ("output_tok_s", "ttft_p50", "ttft_p99", "itl_p50"):
            out[f"{load}_{key}_ratio"] = ratio(getattr(cw[load], key), getattr(ml[load], key))
        out[f"{load}_decode_ratio"] = ratio(decode_rate(cw[load]), decode_rate(ml[load]))
    out["goal_many_tok_s_ratio>=1.5"] = (out.get("many_output_tok_s_ratio") or 0) >= 1.5
    out["goal_one_decode_ratio>=0.95"] = (out.get("one_decode_ratio") or 0) >= 0.95
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="model folder (made if absent)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    ap.add_argument("--out", type=Path, required=True, help="results JSON; logs go beside it")
    ap.add_argument("--servers", default="mlx-lm,candlewick")
    ints = dict(concurrency=64, requests=128, single_requests=3, prompt_tokens=512)
    for name, default in (ints | dict(max_tokens=128, spy_seconds=15)).items():
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    ap.add_argument("--duration", type=float, default=90.0, help="stop sending after S s a run")
    ap.add_argument("--repeats", type=int, default=1, help="many-stream runs per server (median)")
    ap.add_argument("--request-timeout", type=float, default=180.0)
    ap.add_argument("--start-timeout", type=float, default=240.0)
    ap.add_argument("--kv-cache-memory", default="16GiB")
    ap.add_argument("--copy-bytes", type=int, default=2 << 30)
    ap.add_argument("--mlx-stock-backlog", action="store_true", help="don't raise its backlog")
    args = ap.parse_args(argv)
    args.workdir = args.out.parent
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"date": datetime.datetime.now(datetime.UTC).isoformat(),
                              "command": " ".join(sys.argv), "versions": versions()}  # fmt: skip
    if not (args.model / "config.json").is_file():
        t0 = time.perf_counter()
        make_model(args.preset, args.model, workers=os.cpu_count() or 8)
        result["make_model_s"] = time.perf_counter() - t0
        print(f"made {args.model} in {result['make_model_s']:.0f}s", flush=True)
    weights = weight_bytes(args.model)
    bw = copy_bandwidth(args.copy_bytes)
    roof = {**weights, "copy": bw, "tok_s": bw["gb_s"] * 1e9 / weights["per_decode_step"]}
    prompt = calibrate(args.model, args.prompt_tokens)
    result |= {"model": str(args.model), "roofline": roof, "loadgen_prompt_tokens": prompt}
    reports: dict[str, dict[str, LoadReport]] = {}
    many_runs: dict[str, list[float]] = {}
    for server in servers(args):
        t0 = time.perf_counter()
        try:
            bench_server(server, args, prompt, reports.setdefault(server.name, {}), many_runs)
        except Exception as exc:  # one server failing still leaves the other's numbers
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
            result[f"{server.name}_error"] = f"{type(exc).__name__}: {exc}"
        result[f"{server.name}_wall_s"] = time.perf_counter() - t0
        result["summary"] = summarize(reports, roof)  # written after each server: a run cut
        result["many_runs_output_tok_s"] = many_runs
        result["reports"] = {n: {k: v.to_dict() for k, v in r.items()} for n, r in reports.items()}
        args.out.write_text(json.dumps(result, indent=1, default=str))  # short keeps the first
    labels = {"many": f"{args.concurrency} streams", "one": "1 stream"}
    columns = [(f"{n} {labels[k]}", r[k]) for k in labels for n, r in reports.items() if k in r]
    print(json.dumps(result["versions"]), f"roofline {roof['tok_s']:.1f} tok/s at "
          f"{bw['gb_s']:.0f} GB/s over {weights['per_decode_step'] / 1e9:.2f} GB")  # fmt: skip
    print(format_table(columns), json.dumps(result["summary"], indent=1), sep="\n")
    if args.repeats > 1:
        print("many-stream output tok/s, every run (the table shows the median):", many_runs)
    return 0 if all(len(r) == 2 for r in reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
