"""Offline generation throughput: candlewick's EngineCore against mlx-lm, on the same weights.

Every system gets the same random prompts (fixed seed, no special tokens) and generates exactly
`max_tokens` greedy tokens per sequence, EOS ignored, for each batch size. Systems:

- candlewick-hf: `EngineCore` on a Hugging Face folder exported from the GGUF (float32);
- mlx-lm: `mlx_lm.generate.batch_generate` on that same folder;
- mlx-lm-step: mlx-lm's single-sequence loop (`generate_step`), batch 1 only;
- candlewick-gguf: `EngineCore` on the Q4_1 GGUF itself (informational: other weights, and a
  reduced workload, run once: MLX's CPU quantized matmul is slow past one row).

Each (system, batch) first runs a short warm-up on other prompts (untimed, and no prefix-cache
hits for the timed run), then the timed run: wall time from submitting the prompts to the last
token, prefill included. `--repeats` interleaves the systems and the table reports each one's
best run, the one least disturbed by other processes on a shared machine (the JSON keeps every
run, the median and the load average). Greedy tokens are compared across systems as a
consistency check: the same weights must give the same tokens.

    python -m loadtests.bench_engine --repeats 2 --json bench.json    # 1, 8, 32 sequences
    python -m loadtests.bench_engine --quick                          # smoke run
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python -m ...

mlx-lm is a benchmark-only dependency (`pip install --no-deps mlx-lm==0.32.2`).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import mlx.core as mx
import numpy as np

from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.loader.build import LoadedModel
from engine.loader.load import default_model_path, load_model
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from loadtests.export_hf import export

WARMUP_TOKENS = 4
SYSTEMS = ("candlewick-hf", "mlx-lm", "mlx-lm-step", "candlewick-gguf")


@dataclass(frozen=True, slots=True)
class Generated:
    token_ids: list[list[int]]  # [batch][max_tokens]
    prefill_s: float  # until every sequence had its first token


Generate = Callable[[list[list[int]], int], Generated]


@dataclass(frozen=True, slots=True)
class Workload:
    batch: int
    prompt_len: int
    max_tokens: int
    seed: int

    def prompts(self, vocab: list[int], salt: int = 0) -> list[list[int]]:
        """`batch` prompts of random ids drawn from `vocab`; `salt` gives a different set."""
        rng = np.random.default_rng([self.seed, self.batch, salt])
        return rng.choice(vocab, size=(self.batch, self.prompt_len)).tolist()


@dataclass(slots=True)
class Result:
    system: str
    batch: int
    repeat: int
    max_tokens: int
    seconds: float
    output_tokens: int
    tokens_per_s: float
    prefill_s: float
    decode_tokens_per_s: float  # the tokens after each sequence's first, over the time after
    loadavg_1m: float  # at the end of the run: other processes competing for the cores
    token_ids: list[list[int]] = field(repr=False)
    step_profile: dict[str, float] | None = None  # mean ms per engine step, by phase


class StepProfile:
    """Wall time of the phases of `EngineCore.step`, by wrapping the instance's methods.

    Host work is `schedule`, `prepare_inputs`, `update_from_output` and part of `submit`
    (building the lazy MLX graph); `collect` waits for the device. On the CPU, though, MLX's
    `async_eval` returns only once few of the queued ops remain, so `submit` holds most of the
    compute there. A phase the engine
    does not have (its internals change) is skipped. "step_median" is a decode step: the one
    prefill step is an outlier.
    """

    PHASES: ClassVar[dict[str, tuple[str, str]]] = {
        "step": ("", "step"),
        "schedule": ("scheduler", "schedule"),
        "update_from_output": ("scheduler", "update_from_output"),
        "prepare_inputs": ("runner", "prepare_inputs"),
        "submit": ("runner", "submit"),
        "collect": ("runner", "collect"),
    }

    def __init__(self, core: EngineCore) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        for phase, (owner, attr) in self.PHASES.items():
            obj = getattr(core, owner) if owner else core
            if callable(getattr(obj, attr, None)):
                setattr(obj, attr, self._timed(phase, getattr(obj, attr)))

    def _timed(self, phase: str, fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.times[phase].append(time.perf_counter() - start)

        return wrapper

    def reset(self) -> None:
        self.times.clear()

    def mean_ms(self) -> dict[str, float]:
        steps = max(len(self.times["step"]), 1)
        per = {k: 1e3 * sum(v) / steps for k, v in self.times.items()}
        per["step_median"] = 1e3 * float(np.median(self.times["step"] or [0.0]))
        return {k: round(v, 3) for k, v in per.items()}


def candlewick(loaded: LoadedModel, work: Workload) -> tuple[Generate, StepProfile]:
    """A fresh engine sized for `work`: enough KV blocks for every sequence, no preemption."""
    blocks_per_seq = -(-(work.prompt_len + work.max_tokens) // 16)
    config = EngineConfig(
        max_num_seqs=max(work.batch, 1),
        max_num_batched_tokens=max(2048, work.batch * work.prompt_len),
        num_blocks=2 * work.batch * blocks_per_seq + 1,
    )
    core = EngineCore(loaded.model, config, loaded.dtype)
    profile = StepProfile(core)
    ids = itertools.count()

    def generate(prompts: list[list[int]], max_tokens: int) -> Generated:
        start = time.perf_counter()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        order = [f"r{next(ids)}" for _ in prompts]
        for rid, prompt in zip(order, prompts, strict=True):
            core.add_request(EngineRequest(rid, prompt, params))
        out: dict[str, list[int]] = {rid: [] for rid in order}
        prefill_s = 0.0
        while core.has_work:
            for o in core.step():
                out[o.request_id].extend(o.new_token_ids)
            if not prefill_s and all(out.values()):
                prefill_s = time.perf_counter() - start
        return Generated([out[rid] for rid in order], prefill_s)

    return generate, profile


class _NoStops:
    """The tokenizer surface batch_generate uses, without EOS ids (fixed-length outputs)."""

    eos_token_ids: tuple[int, ...] = ()

    def __init__(self, tokenizer: Any) -> None:
        self.decode = tokenizer.decode


def mlx_lm_batch(model: Any, tokenizer: Any) -> Generate:
    from mlx_lm.generate import batch_generate

    def generate(prompts: list[list[int]], max_tokens: int) -> Generated:
        response = batch_generate(
            model, _NoStops(tokenizer), prompts, max_tokens=max_tokens, return_token_ids=True
        )
        return Generated(response.token_ids, response.stats.prompt_time)

    return generate


def mlx_lm_step(model: Any) -> Generate:
    from mlx_lm.generate import generate_step

    def generate(prompts: list[list[int]], max_tokens: int) -> Generated:
        assert len(prompts) == 1, "one sequence at a time"
        start = time.perf_counter()
        tokens, prefill_s = [], 0.0
        for token, _ in generate_step(mx.array(prompts[0]), model, max_tokens=max_tokens):
            prefill_s = prefill_s or time.perf_counter() - start
            tokens.append(token)
        return Generated([tokens], prefill_s)

    return generate


def measure(
    name: str,
    generate: Generate,
    work: Workload,
    vocab: list[int],
    profile: StepProfile | None,
    repeat: int = 0,
) -> Result:
    """One timed run of `work`, after an untimed warm-up of the same shape on other prompts."""
    generate(work.prompts(vocab, salt=1), min(WARMUP_TOKENS, work.max_tokens))
    if profile is not None:
        profile.reset()
    prompts = work.prompts(vocab)
    start = time.perf_counter()
    out = generate(prompts, work.max_tokens)
    seconds = time.perf_counter() - start
    n = sum(len(t) for t in out.token_ids)
    assert n == work.batch * work.max_tokens, f"{name} produced {n} tokens"
    decode_tps = (n - work.batch) / max(seconds - out.prefill_s, 1e-9)
    return Result(
        system=name,
        batch=work.batch,
        repeat=repeat,
        max_tokens=work.max_tokens,
        seconds=seconds,
        output_tokens=n,
        tokens_per_s=n / seconds,
        prefill_s=out.prefill_s,
        decode_tokens_per_s=decode_tps,
        loadavg_1m=os.getloadavg()[0],
        token_ids=out.token_ids,
        step_profile=profile.mean_ms() if profile is not None else None,
    )


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    """How many sequences match token for token, and the mean length of the common prefix
    (over the shorter of the two outputs)."""
    n = min(len(a[0]), len(b[0]))
    a, b = [s[:n] for s in a], [t[:n] for t in b]
    prefixes = [
        next((i for i, (x, y) in enumerate(zip(s, t, strict=True)) if x != y), len(s))
        for s, t in zip(a, b, strict=True)
    ]
    return {
        "identical": sum(p == len(s) for p, s in zip(prefixes, a, strict=True)) / len(a),
        "mean_common_prefix": float(np.mean(prefixes)),
    }


def _git(*args: str) -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    except OSError:
        return ""
    return done.stdout.strip()


def environment() -> dict[str, Any]:
    import mlx_lm

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if "Model name" in ln)
    except (OSError, subprocess.CalledProcessError, StopIteration):
        cpu = platform.processor()
    # numpy's wheel maps its own OpenBLAS too, so ask whether an LD_PRELOAD entry is mapped.
    maps = Path("/proc/self/maps")
    mapped = maps.read_text() if maps.is_file() else ""
    preloaded = [p for p in os.environ.get("LD_PRELOAD", "").split() if p and p in mapped]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()},
        "versions": {
            "python": platform.python_version(),
            "mlx": mx.__version__,
            "mlx_lm": mlx_lm.__version__,
        },
        "device": str(mx.default_device()),
        "loadavg_at_start": os.getloadavg()[0],
        "candlewick_commit": _git("rev-parse", "HEAD"),
        "candlewick_uncommitted": _git("status", "--porcelain", "engine").splitlines(),
        "openblas_preloaded": any("openblas" in p for p in preloaded),
        "ld_preload": preloaded,
    }


def workload(name: str, batch: int, repeat: int, args: argparse.Namespace) -> Workload | None:
    """What `name` runs at `batch` (None: skipped); the GGUF system runs a reduced set, once."""
    if name == "mlx-lm-step" and batch != 1:
        return None
    if name == "candlewick-gguf" and (batch not in args.gguf_batches or repeat > 0):
        return None
    max_tokens = args.gguf_max_tokens if name == "candlewick-gguf" else args.max_tokens
    return Workload(batch, args.prompt_len, max_tokens, args.seed)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import mlx_lm

    env = environment()
    hf_dir: Path = args.hf
    if not (hf_dir / "config.json").is_file():
        print(f"exporting {args.gguf} to {hf_dir} ...", file=sys.stderr)
        export(args.gguf, hf_dir, "float32")
    hf = load_model(hf_dir)
    special = hf.tokenizer.all_special_ids
    vocab = [i for i in range(hf.config.vocab_size) if i not in special]
    systems: dict[str, Callable[[Workload], tuple[Generate, StepProfile | None]]] = {}
    if "candlewick-hf" in args.systems:
        systems["candlewick-hf"] = lambda w: candlewick(hf, w)
    if {"mlx-lm", "mlx-lm-step"} & set(args.systems):
        model, tokenizer = mlx_lm.load(str(hf_dir))
        systems["mlx-lm"] = lambda w: (mlx_lm_batch(model, tokenizer), None)
        systems["mlx-lm-step"] = lambda w: (mlx_lm_step(model), None)
    if "candlewick-gguf" in args.systems:
        gguf = load_model(args.gguf)
        systems["candlewick-gguf"] = lambda w: candlewick(gguf, w)

    results: list[Result] = []
    # Repeats interleave the systems, so a burst of load elsewhere hits them alike.
    for batch, repeat, name in itertools.product(args.batches, range(args.repeats), args.systems):
        work = workload(name, batch, repeat, args)
        if work is None:
            continue
        generate, profile = systems[name](work)
        r = measure(name, generate, work, vocab, profile, repeat)
        results.append(r)
        print(
            f"{name:16} batch {batch:3}: {r.tokens_per_s:7.1f} tok/s in {r.seconds:6.2f} s "
            f"(prefill {r.prefill_s:.2f} s, then {r.decode_tokens_per_s:.1f} tok/s)",
            file=sys.stderr,
        )
    return {
        **env,
        "command": " ".join(
            [Path(sys.executable).name, "-m", "loadtests.bench_engine"] + sys.argv[1:]
        ),
        "workload": {
            "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens,
            "seed": args.seed,
            "warmup_tokens": WARMUP_TOKENS,
            "repeats": args.repeats,
        },
        "summary": summarize(results),
        "runs": [{k: v for k, v in asdict(r).items() if k != "token_ids"} for r in results],
        "agreement": compare(results),
    }


def summarize(results: list[Result]) -> list[dict[str, Any]]:
    """Per (system, batch) over repeats: the best run (the least disturbed by other processes on
    a shared machine: the table's number), the median and the worst."""
    groups: dict[tuple[str, int], list[Result]] = defaultdict(list)
    for r in results:
        groups[(r.system, r.batch)].append(r)
    rows = []
    for (system, batch), runs in groups.items():
        tps = [r.tokens_per_s for r in runs]
        rows.append(
            {
                "system": system,
                "batch": batch,
                "max_tokens": runs[0].max_tokens,
                "runs": len(runs),
                "tokens_per_s": max(tps),
                "tokens_per_s_median": float(np.median(tps)),
                "tokens_per_s_worst": min(tps),
                "seconds": min(r.seconds for r in runs),
                "prefill_s": min(r.prefill_s for r in runs),
                "decode_tokens_per_s": max(r.decode_tokens_per_s for r in runs),
            }
        )
    return rows


def compare(results: list[Result]) -> list[dict[str, Any]]:
    """Greedy outputs of candlewick-hf against the others, per batch size (first repeat)."""
    by_key = {(r.system, r.batch): r for r in results if r.repeat == 0}
    rows = []
    for (system, batch), r in by_key.items():
        base = by_key.get(("candlewick-hf", batch))
        if base is not None and system != "candlewick-hf":
            rows.append(
                {"a": "candlewick-hf", "b": system, "batch": batch}
                | agreement(base.token_ids, r.token_ids)
            )
    return rows


def table(report: dict[str, Any]) -> str:
    """Markdown: output tokens/s (best run) per system and batch, candlewick-hf / mlx-lm."""
    tps = {(r["system"], r["batch"]): r["tokens_per_s"] for r in report["summary"]}
    systems = [s for s in SYSTEMS if any(k[0] == s for k in tps)]
    batches = sorted({b for _, b in tps})
    tokens = {r["system"]: r["max_tokens"] for r in report["summary"]}
    default = report["workload"]["max_tokens"]
    names = [s if tokens[s] == default else f"{s} ({tokens[s]} tokens)" for s in systems]
    head = ["batch", *names, "candlewick-hf / mlx-lm"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for b in batches:
        cells = [str(b)] + [f"{tps[(s, b)]:.1f}" if (s, b) in tps else "–" for s in systems]
        ok = ("candlewick-hf", b) in tps and ("mlx-lm", b) in tps
        cells.append(f"{tps[('candlewick-hf', b)] / tps[('mlx-lm', b)]:.2f}" if ok else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=None, help="default: SmolLM2-135M Q4_1")
    parser.add_argument(
        "--hf",
        type=Path,
        default=Path("/tmp/candlewick-bench-hf"),
        help="Hugging Face folder (exported from --gguf first if it has no config.json)",
    )
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per system and batch")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument(
        "--gguf-batches",
        default="1,8",
        help="batch sizes for candlewick-gguf (MLX's CPU quantized matmul is slow past 1 row)",
    )
    parser.add_argument(
        "--gguf-max-tokens", type=int, default=32, help="output tokens for candlewick-gguf"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: batches 1,8 with 32 output tokens (GGUF: batch 1, 16 tokens)",
    )
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.max_tokens = "1,8", 32
        args.gguf_batches, args.gguf_max_tokens = "1", 16
    args.gguf = args.gguf or default_model_path()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.gguf_batches = [int(b) for b in args.gguf_batches.split(",")]
    args.systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    mx.set_default_device(mx.cpu)

    report = run(args)
    print(table(report))
    for row in report["agreement"]:
        print(
            f"{row['a']} vs {row['b']} (batch {row['batch']}): "
            f"{row['identical']:.0%} identical, mean common prefix "
            f"{row['mean_common_prefix']:.1f} tokens"
        )
    print(
        f"{report['machine']['cpu']}, {report['machine']['cores']} cores, "
        f"openblas preloaded: {report['openblas_preloaded']}, {report['versions']}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
