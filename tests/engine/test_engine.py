"""The serving engine against the single-sequence contiguous reference: batched = single,
paged = contiguous, chunked prefill = whole, prefix hit = miss, preempted = uninterrupted,
seeded sampling alone = in a batch; and no block leaks under random add/abort/finish."""

from __future__ import annotations

import random

import mlx.core as mx
import numpy as np
import pytest

from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.generate import GenerationSettings, generate_tokens
from engine.loader.hf import load_hf_model
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from tests.engine.tiny_models import VOCAB, build_tiny

pytest.importorskip("torch")

ARCHS = ["llama", "qwen2", "mistral"]


@pytest.fixture(scope="module", params=ARCHS)
def model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    build_tiny(request.param, folder)
    return load_hf_model(folder, mx.float32)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=int(rng.integers(3, 40))).tolist() for _ in range(n)]


def run(core: EngineCore, requests: list[EngineRequest], max_steps: int = 10_000):
    """Drive the core synchronously; returns {id: [tokens]} and {id: [logprobs]}."""
    for r in requests:
        core.add_request(r)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    logprobs: dict[str, list[float]] = {r.request_id: [] for r in requests}
    for _ in range(max_steps):
        if not core.has_work:
            break
        for out in core.step():
            assert out.error is None, out.error
            tokens[out.request_id].extend(out.new_token_ids)
            logprobs[out.request_id].extend(lp.logprob for lp in out.logprobs)
    assert not core.has_work, "engine did not finish"
    return tokens, logprobs


def make_core(model, **overrides) -> EngineCore:
    config = EngineConfig(**{"num_blocks": 256, "block_size": 4, **overrides})
    return EngineCore(model, config, mx.float32)


def greedy(max_tokens=12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def reference(model, prompt, max_tokens=12) -> list[int]:
    return list(generate_tokens(model, prompt, GenerationSettings(max_tokens=max_tokens)))


def test_batched_paged_equals_single_contiguous(model):
    ps = prompts(6)
    reqs = [EngineRequest(f"r{i}", p, greedy()) for i, p in enumerate(ps)]
    tokens, _ = run(make_core(model), reqs)
    for i, p in enumerate(ps):
        assert tokens[f"r{i}"] == reference(model, p), f"request {i}"


def test_logprobs_match_the_contiguous_logits(model):
    p = prompts(1, seed=5)[0]
    tokens, logprobs = run(make_core(model), [EngineRequest("a", p, greedy(6, logprobs=0))])
    cache = model.make_cache()
    ids = p + tokens["a"]
    logits = model(mx.array([ids[:-1]]), cache)[0, len(p) - 1 :]
    expected = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    chosen = expected[np.arange(len(tokens["a"])), tokens["a"]]
    np.testing.assert_allclose(logprobs["a"], chosen, rtol=1e-4, atol=1e-4)


def test_chunked_prefill_equals_whole(model):
    ps = prompts(4, seed=1)
    reqs = lambda: [EngineRequest(f"r{i}", p, greedy()) for i, p in enumerate(ps)]  # noqa: E731
    whole, _ = run(make_core(model), reqs())
    chunked, _ = run(make_core(model, long_prefill_chunk=5, max_num_batched_tokens=16), reqs())
    assert chunked == whole


def test_prefix_cache_hit_equals_miss(model):
    shared = prompts(1, seed=2)[0] * 2  # long enough for several full blocks
    core = make_core(model)
    first, _ = run(core, [EngineRequest("a", shared + [7, 8], greedy())])
    hits_before = core.kv.prefix_cache_stats.hits
    second, _ = run(core, [EngineRequest("b", shared + [7, 8], greedy())])
    assert core.kv.prefix_cache_stats.hits > hits_before
    uncached, _ = run(
        make_core(model, enable_prefix_caching=False),
        [EngineRequest("c", shared + [7, 8], greedy())],
    )
    assert first["a"] == second["b"] == uncached["c"]


def test_preempted_and_resumed_equals_uninterrupted(model):
    ps = prompts(6, seed=3)
    reqs = lambda: [EngineRequest(f"r{i}", p, greedy(20)) for i, p in enumerate(ps)]  # noqa: E731
    full, _ = run(make_core(model), reqs())
    core = make_core(model, num_blocks=30)
    tight, _ = run(core, reqs())
    assert core.scheduler.stats.num_preemptions > 0
    assert tight == full
    assert core.kv.num_free_blocks == core.num_blocks - 1


def test_seeded_sampling_alone_equals_in_a_batch(model):
    p = prompts(1, seed=4)[0]
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone, _ = run(make_core(model), [EngineRequest("s", p, params)])
    others = [
        EngineRequest(f"o{i}", q, SamplingParams(max_tokens=10, temperature=0.8, ignore_eos=True))
        for i, q in enumerate(prompts(5, seed=6))
    ]
    batch, _ = run(make_core(model), [*others[:2], EngineRequest("s", p, params), *others[2:]])
    assert batch["s"] == alone["s"]


def test_abort_frees_blocks_at_once(model):
    core = make_core(model)
    for i, p in enumerate(prompts(3, seed=7)):
        core.add_request(EngineRequest(f"r{i}", p, greedy(50)))
    core.step()
    core.step()
    assert core.kv.num_free_blocks < core.num_blocks - 1
    for i in range(3):
        out = core.abort_request(f"r{i}")
        assert out is not None and out.finish_reason == "abort"
    assert core.kv.num_free_blocks == core.num_blocks - 1
    assert not core.has_work
    assert core.abort_request("r0") is None


def test_random_add_abort_finish_never_leaks_or_deadlocks(model):
    rng = random.Random(0)
    core = make_core(model, num_blocks=24, max_num_seqs=4, max_num_batched_tokens=24)
    live: set[str] = set()
    aborted: set[str] = set()
    finished: set[str] = set()
    n = 0
    for _ in range(200):
        action = rng.random()
        if action < 0.3:
            n += 1
            rid = f"r{n}"
            prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 20))]
            core.add_request(EngineRequest(rid, prompt, greedy(rng.randrange(1, 12))))
            live.add(rid)
        elif action < 0.4 and live:
            rid = rng.choice(sorted(live))
            core.abort_request(rid)
            live.discard(rid)
            aborted.add(rid)
        else:
            for out in core.step():
                if out.finished:
                    live.discard(out.request_id)
                    finished.add(out.request_id)
    for _ in range(2000):
        if not core.has_work:
            break
        for out in core.step():
            if out.finished:
                live.discard(out.request_id)
                finished.add(out.request_id)
    assert not live and not core.has_work
    assert finished | aborted == {f"r{i}" for i in range(1, n + 1)}
    assert core.kv.num_free_blocks == core.num_blocks - 1


def test_overlapped_steps_equal_sequential_steps(model):
    """Building step N+1 while step N computes (its tokens fed from the device) changes no
    token: greedy, seeded, penalized and stop-token requests alike."""
    ps = prompts(6, seed=13)
    stop = reference(model, ps[2], 12)[4]
    params = [
        greedy(14),
        SamplingParams(max_tokens=14, temperature=0.9, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=14, temperature=0, stop_token_ids=frozenset({stop})),
        SamplingParams(
            max_tokens=14, temperature=0.7, seed=9, presence_penalty=1.0, ignore_eos=True
        ),
        greedy(3),
        SamplingParams(max_tokens=14, temperature=1.0, seed=11, top_k=5, ignore_eos=True),
    ]

    def reqs():
        return [
            EngineRequest(f"r{i}", p, s) for i, (p, s) in enumerate(zip(ps, params, strict=True))
        ]

    overlapped_core = make_core(model, pipelined=True)  # on the CPU the default is not to
    assert overlapped_core.config.pipelined
    overlapped, _ = run(overlapped_core, reqs())
    sequential, _ = run(make_core(model, pipelined=False), reqs())
    assert overlapped == sequential
    assert overlapped["r2"][-1] == stop and len(overlapped["r4"]) == 3
    assert overlapped_core.kv.num_free_blocks == overlapped_core.num_blocks - 1


def test_prefill_padded_to_stable_shapes_equals_exact(model):
    """Chunks, continuations and prefix hits with prefill attention padded to bucket shapes
    (what CUDA runs) give the tokens and logprobs of exact-shape attention."""
    shared = prompts(1, seed=21)[0] * 2
    ps = [shared + [5], shared + [9, 4], *prompts(4, seed=22)]

    def reqs():
        return [EngineRequest(f"r{i}", p, greedy(8, logprobs=0)) for i, p in enumerate(ps)]

    def make(stable: bool) -> EngineCore:
        core = make_core(model, long_prefill_chunk=7, max_num_batched_tokens=20)
        core.runner.store.stable_prefill_shapes = stable
        core.warm_up()
        return core

    padded_core = make(True)
    padded, padded_lp = run(padded_core, reqs())
    exact, exact_lp = run(make(False), reqs())
    assert padded_core.kv.prefix_cache_stats.hits > 0
    assert padded == exact
    for rid in exact_lp:
        np.testing.assert_allclose(padded_lp[rid], exact_lp[rid], rtol=1e-4, atol=1e-4)


def test_warm_up_writes_only_the_null_block_and_changes_no_tokens(model):
    """A warmed engine (a dummy step run and sampled greedy and at random) gives the tokens of
    a cold one, unseeded sampling included: the engine's key stream is untouched."""
    ps = prompts(3, seed=31)

    def reqs():
        sampled = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.8, logprobs=0)
        return [
            EngineRequest("g", ps[0], greedy(8, logprobs=0)),
            EngineRequest("s", ps[1], sampled),
            EngineRequest("t", ps[2], sampled),
        ]

    warm = make_core(model)
    warm.warm_up()
    block = warm.config.block_size
    store = warm.runner.store
    for pool in store.state:
        assert not np.any(np.array(store.slot_major(pool)[block:])), "warm-up wrote past block 0"
    assert np.any(np.array(store.slot_major(store.keys[0])[:block])), "warm-up ran no step"
    assert warm.kv.prefix_cache_stats.queries == 0
    got, got_lp = run(warm, reqs())
    want, want_lp = run(make_core(model), reqs())
    assert got == want
    for rid in want_lp:
        np.testing.assert_allclose(got_lp[rid], want_lp[rid], rtol=1e-5, atol=1e-5)


def test_on_the_cpu_steps_do_not_overlap_and_pools_are_head_major(model):
    """The CPU's choice (EngineCore): head-major pools with steps not overlapped; a caller
    who asks for overlapped steps gets slot-major pools (head-major ones would copy)."""
    assert mx.default_device() == mx.cpu
    core = make_core(model)
    assert core.config.pipelined is False and core.scheduler.config.pipelined is False
    assert core.runner.store.head_major
    overlapped = make_core(model, pipelined=True)
    assert overlapped.config.pipelined and not overlapped.runner.store.head_major
