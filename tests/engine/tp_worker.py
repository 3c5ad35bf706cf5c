"""The work the tensor-parallel tests compare: run in-process on one rank (the reference) and, as
``python -m tests.engine.tp_worker JOBS OUT``, on every rank of a launched group, sharded.

A job loads a tiny model and either runs a contiguous greedy forward (tokens and every logit),
or drives an ``EngineCore`` through a batch with chunked prefill, prefix-cache hits, sampled
rows and adapters (tokens)."""

from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np


@dataclass
class Job:
    name: str
    kind: str  # "forward" or "engine"
    path: Path  # a model folder or a .gguf file
    adapters: dict = field(default_factory=dict)  # name -> AdapterVersion (engine jobs)
    prompts: list = field(default_factory=list)
    steps: int = 8


def load(path: Path):
    from engine.loader.gguf import load_gguf_model
    from engine.loader.hf import load_hf_model

    if path.suffix == ".gguf":
        return load_gguf_model(path, mx.float32)[0]
    return load_hf_model(path, mx.float32)


def run_jobs(jobs: list[Job], group=None) -> dict:
    from engine.parallel.shard import shard_model

    results = {}
    for job in jobs:
        model = load(job.path)
        full = model.config
        if job.kind == "lockstep":
            results[job.name] = lockstep(model, job, group)
            continue
        if group is not None:
            shard_model(model, group)
        run = forward if job.kind == "forward" else engine
        results[job.name] = run(model, job, full)
        mlp = model.model.layers[0].mlp
        results[job.name]["shape"] = {  # what this rank holds
            "heads": model.config.num_heads,
            "kv_heads": model.config.num_kv_heads,
            "quantized": "scales" in getattr(mlp.down_proj, "inner", mlp.down_proj),
        }
    return results


def forward(model, job: Job, _full) -> dict:
    cache = model.make_cache()
    ids = list(job.prompts[0])
    logits_seen, tokens = [], []
    x = mx.array([ids])
    for _ in range(job.steps):
        logits = model(x, cache)[0]
        mx.eval(logits)
        logits_seen.append(np.array(logits))
        token = int(np.array(logits[-1]).argmax())
        tokens.append(token)
        x = mx.array([[token]])
    return {"tokens": tokens, "logits": logits_seen}


def engine_config(job: Job):
    from engine.config import EngineConfig

    return EngineConfig(
        num_blocks=128,
        block_size=4,
        long_prefill_chunk=5,
        max_num_batched_tokens=16,
        max_loras=len(job.adapters),
        max_lora_rank=8,
    )


def engine_requests(job: Job, full) -> list:
    """Greedy rows, seeded and unseeded sampled rows, each adapter and the base in turn."""
    from adapters.lora_request import lora_request
    from engine.request import EngineRequest
    from engine.sampling_params import SamplingParams

    names = [None, *job.adapters]
    requests = []
    for i, prompt in enumerate(job.prompts):
        greedy = i % 4 != 3
        params = SamplingParams(
            max_tokens=job.steps,
            temperature=0.0 if greedy else 0.9,
            seed=None if i % 8 == 7 else (i if not greedy else None),
            ignore_eos=True,
        )
        adapter = job.adapters.get(names[i % len(names)])
        lora = lora_request(adapter, full, max_rank=8) if adapter else None
        requests.append(EngineRequest(f"r{i}", prompt, params, lora=lora))
    return requests


def engine(model, job: Job, full) -> dict:
    from engine.engine_core import EngineCore

    core = EngineCore(model, engine_config(job), mx.float32)
    requests = engine_requests(job, full)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    # The first request alone, then the rest: their shared prefixes hit its cached blocks.
    pending = [requests[:1], requests[1:]]
    while pending or core.has_work:
        if pending and not core.has_work:
            for r in pending.pop(0):
                core.add_request(r)
        for out in core.step():
            assert out.error is None, out.error
            tokens[out.request_id].extend(out.new_token_ids)
    return {"tokens": tokens, "prefix_hits": core.kv.prefix_cache_stats.hits}


def lockstep(model, job: Job, group) -> dict:
    """Rank 0 takes requests and aborts at fixed steps and keeps the others in step; each rank
    records the outputs of its own engine. One rank: the same driver over the plain engine."""
    from engine.engine_core import EngineCore
    from engine.parallel.lockstep import LeaderCore, follow, sharded_core

    requests = engine_requests(job, model.config)
    outputs: list = []
    record = outputs.extend
    if group is None:
        core = EngineCore(model, engine_config(job), mx.float32)
        group = mx.distributed.init()  # a group of one
    elif group.rank() != 0:
        follow(sharded_core(model, None, mx.float32, group), group, sys.exit, on_outputs=record)
        return summarize(outputs)
    else:
        core = sharded_core(model, engine_config(job), mx.float32, group)
    leader = LeaderCore(core, group, heartbeat=3600.0)
    leader.warm_up()  # as the engine thread does; the followers warm up in step with it
    # r0 alone; the rest three steps later (their prefixes hit r0's blocks); r5 aborted while
    # it runs, and r1 aborted in the same step it arrives.
    events = {0: [("add", requests[0])], 3: [("add", r) for r in requests[1:]]}
    events[3].append(("abort", "r1"))
    events[16] = [("abort", "r5")]
    step = 0
    while step <= max(events) or leader.has_work:
        for kind, value in events.get(step, []):
            leader.add_request(value) if kind == "add" else leader.abort_request(value)
        record(leader.step())
        step += 1
    leader.stop()
    return summarize(outputs)


def summarize(outputs: list) -> dict:
    tokens: dict[str, list[int]] = {}
    finish: dict[str, str] = {}
    for out in outputs:
        assert out.error is None, out.error
        tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        if out.finished:
            finish[out.request_id] = out.finish_reason
    return {"tokens": tokens, "finish": finish}


def main() -> None:
    from engine.parallel.group import init_group

    jobs_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    group = init_group("ring")
    results = run_jobs(pickle.loads(jobs_path.read_bytes()), group)
    (out / f"rank{group.rank()}.pkl").write_bytes(pickle.dumps(results))


if __name__ == "__main__":
    main()
