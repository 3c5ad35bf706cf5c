"""Tensor parallelism against one rank: two ranks on loopback (ring backend), launched the way
the server launches them, run the same jobs sharded. Greedy tokens are identical and logits
within 1e-4 of the largest (float32), for llama, qwen2 with one KV head (replicated on both
ranks) and qwen3; the engine's batch (chunked prefill, prefix-cache hits, seeded and unseeded
sampled rows) gives the same tokens on every rank as on one, for float, MLX-quantized, GGUF and
three PEFT adapters beside the base. Equal sampled tokens on both ranks with no token ever
exchanged is the proof that every rank samples identically."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.config import ConfigError
from engine.parallel.group import launch_local, local_hostfile
from engine.parallel.shard import ShardPlan
from tests.engine.tiny_models import VOCAB, build_tiny
from tests.engine.tp_worker import Job, run_jobs

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = {
    "attn-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp-r8": dict(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "all-r2": dict(
        r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    ),
}


def make_jobs(root: Path) -> list[Job]:
    from gguf import GGMLQuantizationType as Q

    from engine.loader.convert import convert
    from engine.loader.quantize import QuantSpec
    from tests.engine.gguf_writer import write_gguf
    from tests.engine.test_lora import make_adapter

    llama = build_tiny("llama", root / "llama")  # 4 heads, 2 KV heads
    build_tiny("qwen2", root / "qwen2", num_key_value_heads=1)
    build_tiny("qwen3", root / "qwen3")
    convert(root / "llama", root / "llama-q4", QuantSpec(4, 32))
    write_gguf(llama, "llama", root / "llama.gguf", Q.Q8_0)
    adapters = {
        name: make_adapter(root / "llama", root / name, seed=i, **kw)
        for i, (name, kw) in enumerate(ADAPTERS.items())
    }
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, VOCAB, size=12).tolist()
    shared = rng.integers(3, VOCAB, size=9).tolist()
    batch = [rng.integers(3, VOCAB, size=int(rng.integers(3, 30))).tolist() for _ in range(8)]
    for i in (0, 1, 4):  # 0 runs first, alone: 1 and 4 hit its blocks (4 with the base model)
        batch[i] = shared + rng.integers(3, VOCAB, size=int(rng.integers(1, 15))).tolist()
    jobs = [Job(f"forward-{a}", "forward", root / a, prompts=[prompt]) for a in MODELS]
    jobs += [Job(f"engine-{a}", "engine", root / a, prompts=batch) for a in MODELS]
    jobs.append(Job("engine-lora", "engine", root / "llama", adapters=adapters, prompts=batch))
    jobs += [Job(f"lockstep-{a}", "lockstep", root / a, prompts=batch) for a in ("llama", "qwen2")]
    return jobs


MODELS = ["llama", "qwen2", "qwen3", "llama-q4", "llama.gguf"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{job: (one rank's result, [each rank's result])}: one launch runs every job."""
    root = tmp_path_factory.mktemp("tp")
    jobs = make_jobs(root)
    (root / "jobs.pkl").write_bytes(pickle.dumps(jobs))
    command = [sys.executable, "-m", "tests.engine.tp_worker", str(root / "jobs.pkl"), str(root)]
    ranks = launch_local(command, [0, 1], local_hostfile(2), cwd=ROOT)
    assert [p.wait(timeout=600) for p in ranks] == [0, 0]
    sharded = [pickle.loads((root / f"rank{r}.pkl").read_bytes()) for r in (0, 1)]
    single = run_jobs(jobs)
    return {job.name: (single[job.name], [s[job.name] for s in sharded]) for job in jobs}


@pytest.mark.parametrize("model", MODELS)
def test_sharded_forward_equals_one_rank(results, model):
    single, ranks = results[f"forward-{model}"]
    quantized = model in ("llama-q4", "llama.gguf")
    assert single["shape"] == {"heads": 4, "kv_heads": 1 if model == "qwen2" else 2,
                               "quantized": quantized}  # fmt: skip
    for got in ranks:  # half the query heads each; qwen2's one KV head on both
        assert got["shape"] == {"heads": 2, "kv_heads": 1, "quantized": quantized}
        assert got["tokens"] == single["tokens"]
        for ours, ref in zip(got["logits"], single["logits"], strict=True):
            scale = float(np.abs(ref).max())
            np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("model", [*MODELS, "lora"])
def test_sharded_engine_batch_equals_one_rank(results, model):
    single, ranks = results[f"engine-{model}"]
    assert single["prefix_hits"] > 0
    for got in ranks:
        # greedy, seeded and unseeded sampled rows alike
        assert got["tokens"] == single["tokens"]
        assert got["prefix_hits"] == single["prefix_hits"]


def test_adapters_change_the_sharded_tokens(results):
    base, lora = results["engine-llama"][0]["tokens"], results["engine-lora"][0]["tokens"]
    changed = [rid for rid in base if base[rid] != lora[rid]]
    assert changed and "r0" not in changed  # r0 runs the base model in both


def test_kv_heads_split_or_replicated():
    from engine.models.registry import config_from_hf
    from tests.engine.tiny_models import BASE

    cfg = config_from_hf({**BASE, "model_type": "llama", "num_attention_heads": 8})
    for kv, size, expected in [
        (8, 2, [(0, 4), (4, 8)]),
        (2, 2, [(0, 1), (1, 2)]),
        (1, 2, [(0, 1), (0, 1)]),
        (2, 4, [(0, 1), (0, 1), (1, 2), (1, 2)]),
    ]:
        plans = [
            ShardPlan.for_rank(config_from_hf({**BASE, "model_type": "llama",
                "num_attention_heads": 8, "num_key_value_heads": kv}), r, size)
            for r in range(size)
        ]  # fmt: skip
        assert [p.kv_heads for p in plans] == expected, (kv, size)
    with pytest.raises(ConfigError, match="3 ranks"):
        ShardPlan.for_rank(cfg, 0, 3)


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_ranks_in_lockstep_make_the_tokens_of_one(results, model):
    """Requests and aborts reach rank 0 between steps; every rank applies them in the same step
    and publishes the same outputs as one rank does (rank 1's are its own engine's)."""
    single, (leader, follower) = results[f"lockstep-{model}"]
    assert single["finish"]["r5"] == single["finish"]["r1"] == "abort"
    assert 0 < len(single["tokens"]["r5"]) < 8 and not single["tokens"].get("r1")
    assert leader == follower == single
