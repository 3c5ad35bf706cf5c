"""Where a many-stream run spends its time, step by step, without the HTTP server.

Drives `EngineCore` the way the load generator drives `candlewick serve`: `--streams` requests in
flight, a new one admitted as soon as one finishes, `--requests` in all, each with a random
`--prompt-len` prompt and exactly `--max-tokens` greedy output tokens. Every engine step is
recorded: its wall time, how many decodes and prefill tokens it carried, and how that time split
between scheduling, building and submitting the graph (host) and waiting for the device
(`collect`). Then it measures the device alone, steps run one at a time: a decode-only step at
the run's batch and context, and a prefill-only step of a full token budget. From those it
prints the time the run's steps would take back to back, against the time they took.

    python -m loadtests.trace_engine --model /tmp/m --out trace.json
    python -m loadtests.trace_engine --model /tmp/m --max-num-batched-tokens 4096 --out t.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from engine import model_runner
from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.loader.load import load_model
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerOutput


@dataclass(slots=True)
class Step:
    t: float  # when the step began, seconds from the run's start
    wall: float  # the whole `EngineCore.step` call
    decodes: int  # requests computing one token
    prefill_tokens: int
    prefills: int  # prefill chunks
    schedule: float = 0.0
    submit: float = 0.0  # all of the below: preparing inputs, building the graph, queueing it
    prepare: float = 0.0  # the step's input arrays (Python, NumPy)
    sample: float = 0.0  # the sampler's part of the graph
    async_eval: float = 0.0  # handing the graph to MLX (encoding it for the device)
    collect: float = 0.0  # waiting for the previous step's tokens


class Recorder:
    """Wraps the core's phases (instance attributes) to fill one `Step` per call; as a
    context manager, also times `mx.async_eval` as `engine.model_runner` calls it."""

    def __init__(self, core: EngineCore) -> None:
        self.steps: list[Step] = []
        self.t0 = time.perf_counter()
        self._current: Step | None = None
        self._wrap(core.scheduler, "schedule", "schedule", self._composition)
        self._wrap(core.runner, "submit", "submit")
        self._wrap(core.runner, "prepare_inputs", "prepare")
        self._wrap(core.runner.sampler, "submit", "sample")
        self._wrap(core.runner, "collect", "collect")
        inner = core.step

        def step() -> list:
            start = time.perf_counter()
            self._current = Step(
                t=start - self.t0, wall=0.0, decodes=0, prefill_tokens=0, prefills=0
            )
            try:
                return inner()
            finally:
                self._current.wall = time.perf_counter() - start
                self.steps.append(self._current)

        core.step = step

    def __enter__(self) -> Recorder:
        model_runner.mx = _TimedMx(self)
        return self

    def __exit__(self, *exc: object) -> None:
        model_runner.mx = mx
        self._current = None

    def _composition(self, out: SchedulerOutput) -> None:
        for item in out.scheduled:
            if item.num_tokens == 1:
                self._current.decodes += 1
            else:
                self._current.prefills += 1
                self._current.prefill_tokens += item.num_tokens

    def _wrap(self, obj: Any, attr: str, field_name: str, seen: Callable | None = None) -> None:
        fn = getattr(obj, attr)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            if self._current is not None:
                setattr(
                    self._current,
                    field_name,
                    getattr(self._current, field_name) + time.perf_counter() - start,
                )
                if seen is not None:
                    seen(result)
            return result

        setattr(obj, attr, wrapper)


class _TimedMx:
    """``mlx.core`` as `engine.model_runner` sees it, with ``async_eval`` timed."""

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(mx, name)

    def async_eval(self, *args: Any) -> None:
        start = time.perf_counter()
        mx.async_eval(*args)
        if (step := self._recorder._current) is not None:
            step.async_eval += time.perf_counter() - start


def closed_loop(core: EngineCore, prompts: list[list[int]], streams: int, max_tokens: int) -> float:
    """Keep `streams` requests running until every prompt is done; returns the wall time."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    pending = iter(enumerate(prompts))
    produced: dict[str, int] = {}

    def admit() -> None:
        item = next(pending, None)
        if item is not None:
            rid = f"r{item[0]}"
            produced[rid] = 0
            core.add_request(EngineRequest(rid, item[1], params))

    start = time.perf_counter()
    for _ in range(streams):
        admit()
    while core.has_work:
        for out in core.step():
            produced[out.request_id] += len(out.new_token_ids)
            if out.finished:
                admit()
    wall = time.perf_counter() - start
    assert all(n == max_tokens for n in produced.values()), "every request makes max_tokens"
    return wall


def device_step_times(
    core: EngineCore, vocab: int, batch: int, context: int, budget: int, chunk: int, reps: int
) -> dict[str, float]:
    """Median seconds of a decode-only step (`batch` sequences at `context`) and of a
    prefill-only step (`budget` tokens of fresh prompts in `chunk`-token pieces), each run
    alone: submitted and waited for before the next."""
    rng = np.random.default_rng(1)
    params = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)
    ids = itertools.count()

    def add(n: int, length: int) -> None:
        for _ in range(n):
            prompt = rng.integers(0, vocab, size=length).tolist()
            core.add_request(EngineRequest(f"probe{next(ids)}", prompt, params))

    def timed_steps(n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            core.step()
            times.append(time.perf_counter() - start)
        return times

    pipelined = core.scheduler.config
    core.scheduler.config = dataclasses.replace(pipelined, pipelined=False)
    add(batch, context)
    while any(r.num_computed_tokens < r.num_tokens - 1 for r in core.scheduler.running) or (
        core.scheduler.waiting
    ):
        core.step()
    decode = float(np.median(timed_steps(reps)))
    for r in list(core.scheduler.running):
        core.abort_request(r.request_id)
    add(budget // chunk, chunk)
    prefill = []
    for _ in range(reps // 2 or 1):
        prefill += timed_steps(1)
        for r in list(core.scheduler.running):
            core.abort_request(r.request_id)
        add(budget // chunk, chunk)
    for r in list(core.scheduler.running) + list(core.scheduler.waiting):
        core.abort_request(r.request_id)
    core.scheduler.config = pipelined
    return {"decode_step_s": decode, "prefill_step_s": float(np.median(prefill))}


def summarize(
    steps: list[Step], wall: float, tokens: int, probe: dict[str, float], budget: int
) -> dict:
    def stats(sel: list[Step]) -> dict[str, float]:
        if not sel:
            return {"n": 0}
        w = np.array([s.wall for s in sel])
        return {
            "n": len(sel),
            "total_s": round(float(w.sum()), 3),
            "median_ms": round(1e3 * float(np.median(w)), 2),
            "p90_ms": round(1e3 * float(np.percentile(w, 90)), 2),
            "schedule_ms": round(1e3 * float(np.mean([s.schedule for s in sel])), 3),
            "submit_ms": round(1e3 * float(np.mean([s.submit for s in sel])), 3),
            "prepare_ms": round(1e3 * float(np.mean([s.prepare for s in sel])), 3),
            "sample_ms": round(1e3 * float(np.mean([s.sample for s in sel])), 3),
            "async_eval_ms": round(1e3 * float(np.mean([s.async_eval for s in sel])), 3),
            "collect_ms": round(1e3 * float(np.mean([s.collect for s in sel])), 3),
            "mean_decodes": round(float(np.mean([s.decodes for s in sel])), 1),
            "mean_prefill_tokens": round(float(np.mean([s.prefill_tokens for s in sel])), 1),
        }

    decode_only = [s for s in steps if s.prefill_tokens == 0]
    mixed = [s for s in steps if s.prefill_tokens > 0]
    prefill_tokens = sum(s.prefill_tokens for s in steps)
    # Back to back on the device: a decode step (at the probe's full batch) for every step
    # that decodes, and the prefill work at the probe's full-budget prefill rate.
    ideal = (
        sum(1 for s in steps if s.decodes) * probe["decode_step_s"]
        + prefill_tokens / budget * probe["prefill_step_s"]
    )
    return {
        "wall_s": round(wall, 3),
        "output_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "steps": len(steps),
        "steps_per_s": round(len(steps) / wall, 1),
        "decode_only": stats(decode_only),
        "mixed": stats(mixed),
        "probe": {k: round(1e3 * v, 2) for k, v in probe.items()} | {"unit": "ms"},
        "ideal_s": round(ideal, 3),
        "ideal_tokens_per_s": round(tokens / ideal, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--long-prefill-chunk", type=int, default=512)
    ap.add_argument("--kv-cache-gib", type=float, default=16.0)
    ap.add_argument("--no-pipeline", action="store_true", help="one step at a time")
    ap.add_argument("--probe-reps", type=int, default=10, help="0: skip the device-alone steps")
    ap.add_argument("--warmup", type=int, default=8, help="requests run first, untimed")
    ap.add_argument("--out", type=Path, help="JSON: the summary and every step")
    args = ap.parse_args()

    loaded = load_model(args.model)
    config = EngineConfig(
        max_num_seqs=args.streams,
        max_num_batched_tokens=args.max_num_batched_tokens,
        long_prefill_chunk=args.long_prefill_chunk,
        kv_cache_memory=int(args.kv_cache_gib * (1 << 30)),
        enable_prefix_caching=False,  # random prompts share nothing; keep the run comparable
        pipelined=not args.no_pipeline,
    )
    core = EngineCore(loaded.model, config, loaded.dtype)
    vocab = loaded.config.vocab_size
    rng = np.random.default_rng(0)

    def prompts(n: int) -> list[list[int]]:
        return rng.integers(0, vocab, size=(n, args.prompt_len)).tolist()

    core.warm_up()
    if args.warmup:
        closed_loop(core, prompts(args.warmup), min(args.warmup, args.streams), 8)
    with Recorder(core) as recorder:
        wall = closed_loop(core, prompts(args.requests), args.streams, args.max_tokens)
    steps = list(recorder.steps)
    probe = {"decode_step_s": float("nan"), "prefill_step_s": float("nan")}
    if args.probe_reps:
        probe = device_step_times(
            core,
            vocab,
            args.streams,
            args.prompt_len + args.max_tokens // 2,
            args.max_num_batched_tokens,
            args.long_prefill_chunk,
            args.probe_reps,
        )
    report = summarize(
        steps, wall, args.requests * args.max_tokens, probe, args.max_num_batched_tokens
    )
    report["config"] = vars(args) | {"model": str(args.model), "out": str(args.out)}
    report["device"] = str(mx.default_device())
    print(json.dumps(report, indent=2))
    if args.out:
        report["trace"] = [asdict(s) for s in steps]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
