"""Where the engine thread's time goes while a fine-tuning job runs beside serving.

Runs the loop of `engine.engine_thread` in this process (a serving step, then
`Background.after_step`, which runs a training unit when the interleave policy says so) with
`--streams` greedy requests in flight (a new one admitted as soon as one finishes), and times
every turn: the serving step, the unit that followed it if any, the scheduler's counts. The job
is the one `bench_training --serving` starts (its data, rank 16 on q/k/v/o, batch 8, the
micro-batch the server's memory plan picks), already past its first step. Then the same load
alone. Prints where the time went, and the output tokens/s of both. `--serve-share 0
--idle-grace 0` is the earlier policy, which only counted steps.

    python -m loadtests.trace_training --model /tmp/bench-ft-serving/llama-50m
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engine.background import Background, InterleavePolicy
from engine.config import EngineConfig
from engine.cpu_blas import reexec_with_blas


@dataclass(slots=True)
class Turn:
    step_s: float
    unit_s: float  # 0: no unit ran after this step
    running: int
    waiting: int


class TimedWork:
    """A background work whose units are timed."""

    def __init__(self, work) -> None:
        self.work, self.last = work, 0.0

    def run_unit(self) -> bool:
        start = time.perf_counter()
        try:
            return self.work.run_unit()
        finally:
            self.last = time.perf_counter() - start


def closed_loop(core, bg, work, prompts, streams: int, max_tokens: int) -> tuple[float, list]:
    from engine.request import EngineRequest
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    pending = iter(enumerate(prompts))
    turns: list[Turn] = []

    def admit() -> None:
        item = next(pending, None)
        if item is not None:
            core.add_request(EngineRequest(f"r{item[0]}-{time.monotonic_ns()}", item[1], params))

    start = time.perf_counter()
    for _ in range(streams):
        admit()
    while core.has_work:
        t0 = time.perf_counter()
        outputs = core.step()
        t1 = time.perf_counter()
        for out in outputs:
            if out.finished:
                admit()
        if work is not None:
            work.last = 0.0
        bg.after_step(core.stats, True)
        unit = work.last if work is not None else 0.0
        turns.append(Turn(t1 - t0, unit, core.stats.num_running, core.stats.num_waiting))
    return time.perf_counter() - start, turns


def training_work(model_dir: Path, loaded, out: Path, budget: int):
    from engine.training.data import chat_example
    from engine.training.lora import LoRASpec, init_lora, projection_shapes
    from engine.training.memory import plan_memory
    from engine.training.trainer import TrainingConfig
    from engine.training.work import TrainingRun, TrainingWork
    from loadtests.bench_training import BATCH, KEYS, LR, RANK, SCALE, make_data

    data = make_data(out)
    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    examples = [chat_example(loaded.tokenizer, r["messages"]) for r in records]
    initial = init_lora(
        projection_shapes(loaded.model), LoRASpec(RANK, RANK * SCALE, tuple(KEYS)), 0
    )
    params = sum(w.a.size + w.b.size for w in initial.values())
    longest = max(len(e) for e in examples)
    plan = plan_memory(loaded.config, params, BATCH, longest, budget, loaded.dtype.size)
    config = TrainingConfig(learning_rate=LR, n_epochs=50, batch_size=BATCH,
                            micro_batch_size=plan.micro_batch_size,
                            checkpoint_layers=plan.checkpoint_layers)  # fmt: skip
    events: list = []
    work = TrainingWork(loaded.model, TrainingRun(examples, initial, config), events.append)
    while not any(type(e).__name__ == "StepDone" for e in events):  # past its first step
        work.run_unit()
    return work, plan


def summarize(wall: float, turns: list[Turn], tokens: int) -> dict:
    steps = np.array([t.step_s for t in turns])
    units = np.array([t.unit_s for t in turns if t.unit_s > 0])
    out = {
        "wall_s": round(wall, 2),
        "output_tok_s": round(tokens / wall, 1),
        "turns": len(turns),
        "serving_s": round(float(steps.sum()), 2),
        "serving_step_median_ms": round(1e3 * float(np.median(steps)), 1),
    }
    if len(units):
        after = [i for i, t in enumerate(turns) if t.unit_s > 0]
        gaps = np.diff(after) if len(after) > 1 else np.array([len(turns)])
        out |= {
            "units": len(units),
            "units_s": round(float(units.sum()), 2),
            "unit_median_ms": round(1e3 * float(np.median(units)), 1),
            "unit_max_ms": round(1e3 * float(units.max()), 1),
            "training_share": round(float(units.sum()) / wall, 3),
            "serving_steps_between_units_median": float(np.median(gaps)),
            "units_with_nothing_running": sum(t.unit_s > 0 and t.running == 0 for t in turns),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    reexec_with_blas()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("/tmp/trace-training"))
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    default = InterleavePolicy()
    ap.add_argument("--serve-steps", type=int, default=default.serve_steps)
    ap.add_argument("--serve-share", type=float, default=default.serve_share)
    ap.add_argument("--idle-grace", type=float, default=default.idle_grace)
    ap.add_argument("--budget-gib", type=float, default=4.0, help="training's memory budget")
    args = ap.parse_args(argv)

    import mlx.core as mx

    from engine.engine_core import EngineCore
    from engine.loader.load import load_model

    loaded = load_model(args.model)
    config = EngineConfig(max_num_seqs=max(args.streams, 16), kv_cache_memory=1 << 30)
    core = EngineCore(loaded.model, config, loaded.dtype)
    core.warm_up()
    rng = np.random.default_rng(0)
    vocab = loaded.config.vocab_size
    work, plan = training_work(args.model, loaded, args.out, int(args.budget_gib * (1 << 30)))
    report: dict = {
        "config": vars(args) | {"model": str(args.model), "out": str(args.out)},
        "micro_batch_size": plan.micro_batch_size,
        "device": str(mx.default_device()),
    }
    policy = InterleavePolicy(args.serve_steps, args.serve_share, args.idle_grace)
    tokens = args.requests * args.max_tokens
    for name in ("training", "idle"):
        prompts = rng.integers(0, vocab, size=(args.requests, args.prompt_len)).tolist()
        timed = TimedWork(work) if name == "training" else None
        bg = Background(policy)
        if timed is not None:
            bg.add(timed)
        wall, turns = closed_loop(core, bg, timed, prompts, args.streams, args.max_tokens)
        report[name] = summarize(wall, turns, tokens)
        if name == "training":
            report["turns"] = [asdict(t) for t in turns]
        print(json.dumps({name: report[name]}), flush=True)
    report["ratio"] = report["training"]["output_tok_s"] / report["idle"]["output_tok_s"]
    print(f"serving while training: {report['ratio']:.2f}x idle")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trace.json").write_text(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
