"""What the BLAS under MLX's CPU backend is worth: float32 GEMM GFLOP/s per library and thread
count, and `candlewick serve` tok/s with and without a real BLAS.

(a) `--gemm`: each library in its own process, preloaded as the CLI preloads it
(`engine.cpu_blas.plan_preload`); the bundled reference BLAS; libraries named with
`--lib PATH[:DIR...]` (DIRs go on LD_LIBRARY_PATH: an unpacked wheel or .deb). Each process first
checks which file `cblas_sgemm` resolves to, then times the shapes below. Rounds interleave
the libraries, because a shared machine's speed drifts over minutes; the best round counts.
(b) `--serve`: a 48M-parameter float32 llama (random weights, written here once) served by
`python -m server.cli serve` with `CANDLEWICK_BLAS=off` and with the default preload at each
thread count; loadgen at each `--streams` (100-token prompts, 64 output tokens).

    python -m loadtests.bench_blas --gemm --rounds 3 --json blas-gemm.json
    python -m loadtests.bench_blas --serve --streams 1 16 --json blas-serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from engine import cpu_blas
from loadtests import make_model
from loadtests.bench_server import cpu_clock, environment, free_port, markdown, others_cpu, running
from loadtests.loadgen import LoadConfig, run_load

# (M, K, N): the start-up figure; a square GEMM; the 48M llama's FFN up-projection at decode
# batch 1 and 16 and at a 256-token prefill.
SHAPES = ((512, 512, 512), (1024, 1024, 1024), (1, 512, 1536), (16, 512, 1536), (256, 512, 1536))
LLAMA_48M = make_model.Preset("llama", 512, 10, 8, 4, 1536, 16384, 500000.0, 4096, 1e-5)

CHILD = """
import json, time, mlx.core as mx
from engine import cpu_blas
report = cpu_blas.check()
rates = {}
for m, k, n in json.loads(%r):
    a = mx.random.normal((m, k), key=mx.random.key(1), stream=mx.cpu)
    b = mx.random.normal((k, n), key=mx.random.key(2), stream=mx.cpu)
    mx.eval(mx.matmul(a, b, stream=mx.cpu))
    reps = max(1, int(2e8 // (2 * m * k * n)))
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            mx.eval(mx.matmul(a, b, stream=mx.cpu))
        best = min(best, (time.perf_counter() - t) / reps)
    rates[f"{m}x{k}x{n}"] = 2 * m * k * n / best / 1e9
print(json.dumps({"report": report.as_dict(), "gflops": rates}))
"""


def libraries(extra: list[str]) -> dict[str, cpu_blas.BlasCandidate | None]:
    """Name -> what to preload (None: the bundled reference BLAS)."""
    sites, prefix, system = cpu_blas.default_locations()
    found: dict[str, cpu_blas.BlasCandidate | None] = {"bundled": None}
    for finder in (
        lambda: cpu_blas._wheel_openblas(sites, system),
        lambda: cpu_blas._mkl(prefix),
        lambda: cpu_blas._system(system),
    ):
        if (candidate := finder()) is not None:
            found[candidate.source] = candidate
    for spec in extra:
        path, *dirs = spec.split(":")
        threads = "MKL_NUM_THREADS" if "mkl" in path else "OPENBLAS_NUM_THREADS"
        dirs = tuple(Path(d) for d in [str(Path(path).parent), *dirs])
        found[Path(path).name] = cpu_blas.BlasCandidate("--lib", Path(path), threads, dirs)
    return found


def blas_env(candidate: cpu_blas.BlasCandidate | None, threads: int) -> dict[str, str]:
    """This environment with ``candidate`` preloaded and its threads set, as the CLI does."""
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", cpu_blas.MARKER)}
    base |= {"OPENBLAS_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if candidate is None:
        return base | {"CANDLEWICK_BLAS": "off"}
    return cpu_blas.plan_preload(base, candidate, preloaded=False) or base


def gemm(args: argparse.Namespace) -> dict[str, Any]:
    libs = libraries(args.lib)
    shapes = json.dumps(SHAPES)
    best: dict[str, dict[str, Any]] = {}
    for r in range(args.rounds):
        for name, candidate in libs.items():
            for threads in args.threads:
                key = f"{name} / {threads} thread{'s' * (threads > 1)}"
                clock = _clock()
                out = subprocess.run(
                    [sys.executable, "-c", CHILD % shapes],
                    env=blas_env(candidate, threads),
                    capture_output=True,
                    text=True,
                    check=True,
                )
                run = json.loads(out.stdout.splitlines()[-1]) | {"others_cpu": _others(clock)}
                print(f"round {r + 1} {key}: {run['report']['library']} {run['gflops']}")
                prev = best.get(key)
                best[key] = run if prev is None else _better(prev, run)
    head = ["library / threads", *(f"{m}×{k}×{n}" for m, k, n in SHAPES), "others' CPU"]
    rows = [
        [key, *(f"{run['gflops'][f'{m}x{k}x{n}']:.1f}" for m, k, n in SHAPES)]
        + [f"{run['others_cpu']:.0%}"]
        for key, run in best.items()
    ]
    table = markdown(head, rows)
    print(table)
    return {"runs": best, "table": table}


def _clock() -> tuple[float, float, float]:
    """bench_server's CPU clock, counting the finished child processes as ours."""
    now, busy, _ = cpu_clock(())
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return now, busy, usage.ru_utime + usage.ru_stime


def _others(before: tuple[float, float, float]) -> float:
    now, busy, ours = (b - a for a, b in zip(before, _clock(), strict=True))
    return max(0.0, busy - ours) / (now * (os.cpu_count() or 1))


def _better(a: dict, b: dict) -> dict:
    """Per shape, the faster of two rounds (the machine's other load only slows things)."""
    return b | {"gflops": {s: max(a["gflops"][s], b["gflops"][s]) for s in a["gflops"]}}


def serve(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(args.model or Path(tempfile.gettempdir()) / "candlewick-llama-48m")
    if not (folder / "config.json").exists():
        make_model.PRESETS["llama-48m"] = LLAMA_48M
        make_model.make_model("llama-48m", folder)
    variants = {"reference BLAS (CANDLEWICK_BLAS=off)": {"CANDLEWICK_BLAS": "off"}}
    if args.skip_reference:
        variants.clear()
    for t in args.threads:
        variants[f"default preload, {t} thread{'s' * (t > 1)}"] = {"OPENBLAS_NUM_THREADS": str(t)}
    results: dict[str, Any] = {}
    rows = []
    saved = dict(os.environ)
    with tempfile.TemporaryDirectory() as data:
        for name, env in variants.items():
            os.environ.clear()
            os.environ.update({k: v for k, v in saved.items() if k != cpu_blas.MARKER} | env)
            port = free_port()
            argv = [sys.executable, "-m", "server.cli", "serve", "--model", str(folder)]
            argv += ["--port", str(port), "--served-model-name", "llama", "--data-dir", data]
            try:
                with running(argv, Path(data) / "server.log", timeout=300) as server:
                    health = json.loads(_get(f"{server.url}/health"))
                    for streams in args.streams:
                        clock = cpu_clock((server.pid, os.getpid()))
                        report = asyncio.run(run_load(_load(server.url, streams, args)))
                        share = others_cpu(clock, (server.pid, os.getpid()))
                        results[f"{name} @ {streams}"] = {
                            **report.to_dict(),
                            "results": None,
                            "cpu_blas": health.get("cpu_blas"),
                            "others_cpu": share,
                        }
                        rows.append(_row(name, streams, report, share))
                        print(rows[-1])
            finally:
                os.environ.clear()
                os.environ.update(saved)
    head = ["BLAS", "streams", "output tok/s", "TTFT p50 ms", "ITL p50 ms", "others' CPU"]
    table = markdown(head, rows)
    print(table)
    return {"runs": results, "table": table, "model": str(folder)}


def _load(url: str, streams: int, args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(
        url=url,
        model="llama",
        concurrency=streams,
        requests=streams * args.requests_per_stream,
        prompt_tokens=100,
        max_tokens=64,
        warmup=min(streams, 4),
    )


def _row(name: str, streams: int, report, share: float) -> list[str]:
    def ms(s: float | None) -> str:
        return f"{s * 1e3:.0f}" if s is not None else ""

    tok_s = f"{report.output_tok_s:.1f}"
    return [name, str(streams), tok_s, ms(report.ttft_p50), ms(report.itl_p50), f"{share:.0%}"]


def _get(url: str) -> str:
    import httpx

    return httpx.get(url, timeout=10).text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gemm", action="store_true", help="(a) GEMM GFLOP/s per library")
    ap.add_argument("--serve", action="store_true", help="(b) serving tok/s with and without")
    ap.add_argument("--lib", action="append", default=[], help="PATH[:DIR...] to measure too")
    cores = cpu_blas.usable_cores()
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, cores}))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", help="an HF folder to serve (default: a 48M llama written once)")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument("--skip-reference", action="store_true", help="(b) without CANDLEWICK_BLAS=off")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    result: dict[str, Any] = {"environment": environment()}
    if args.gemm:
        result["gemm"] = gemm(args)
    if args.serve:
        result["serve"] = serve(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
