"""trace_engine's step records on a real (tiny) engine: they account for every token."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from engine import model_runner
from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.loader.load import load_model
from loadtests.make_model import make_model
from loadtests.trace_engine import Recorder, closed_loop, summarize


def test_steps_account_for_every_prompt_and_output_token(tmp_path):
    make_model("tiny", tmp_path / "m", workers=1)
    loaded = load_model(tmp_path / "m", mx.float32)
    config = EngineConfig(
        max_num_seqs=4, max_num_batched_tokens=64, long_prefill_chunk=24, num_blocks=64,
        enable_prefix_caching=False,
    )  # fmt: skip
    core = EngineCore(loaded.model, config, loaded.dtype)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, loaded.config.vocab_size, size=(6, 40)).tolist()
    with Recorder(core) as recorder:
        wall = closed_loop(core, prompts, streams=4, max_tokens=5)  # asserts 5 tokens each
    assert model_runner.mx is mx
    steps = recorder.steps
    assert sum(s.prefill_tokens for s in steps) == 6 * 40
    assert max(s.prefill_tokens + s.decodes for s in steps) <= 64
    assert max(s.prefills for s in steps) >= 2  # 40-token prompts in 24-token chunks
    # Every token after a request's first comes from a decode step (an overlapped step may
    # compute one more for a request that has just finished).
    assert sum(s.decodes for s in steps) >= 6 * 4
    assert all(s.submit >= s.prepare >= 0 and s.wall >= s.submit for s in steps)
    assert sum(s.async_eval for s in steps) > 0
    probe = {"decode_step_s": 0.01, "prefill_step_s": 0.02}
    report = summarize(steps, wall, 6 * 5, probe, budget=64)
    assert report["steps"] == len(steps)
    assert report["decode_only"]["n"] + report["mixed"]["n"] == len(steps)
    assert report["ideal_s"] > 0
