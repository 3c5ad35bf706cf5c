"""The asyncio facade: concurrent generate() calls get what the engine gives each alone, and a
caller that walks away aborts its request and frees its blocks."""

from __future__ import annotations

import asyncio

import mlx.core as mx
import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.loader.hf import load_hf_model
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from tests.engine.test_engine import prompts, reference
from tests.engine.tiny_models import build_tiny

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    build_tiny("llama", folder)
    return load_hf_model(folder, mx.float32)


@pytest.fixture
def engine(model):
    core = EngineCore(model, EngineConfig(num_blocks=128, block_size=4), mx.float32)
    engine = AsyncEngine(core)
    yield engine
    engine.shutdown()


async def collect(engine: AsyncEngine, request: EngineRequest) -> list[int]:
    tokens = []
    async for out in engine.generate(request):
        tokens.extend(out.new_token_ids)
    return tokens


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_concurrent_requests_each_get_their_own_answer(engine, model):
    ps = prompts(5, seed=11)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)

    async def main():
        return await asyncio.gather(
            *(collect(engine, EngineRequest(f"r{i}", p, params)) for i, p in enumerate(ps))
        )

    results = asyncio.run(main())
    for p, tokens in zip(ps, results, strict=True):
        assert tokens == reference(model, p, 10)


def test_walking_away_aborts_and_frees_blocks(engine):
    core = engine.core
    params = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)

    async def main():
        stream = engine.generate(EngineRequest("long", prompts(1, seed=12)[0], params))
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                break
        await stream.aclose()
        await until(lambda: not core.has_work)
        assert core.kv.num_free_blocks == core.num_blocks - 1

    asyncio.run(main())


def test_duplicate_request_id_is_refused(engine):
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)

    async def main():
        first = engine.generate(EngineRequest("same", [5, 6, 7], params))
        await first.__anext__()
        with pytest.raises(ValueError, match="already running"):
            await engine.generate(EngineRequest("same", [5, 6, 7], params)).__anext__()
        await first.aclose()

    asyncio.run(main())


def test_a_caller_that_falls_behind_gets_the_waiting_outputs_merged(engine, model):
    prompt = prompts(1, seed=13)[0]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)

    async def main():
        stream = engine.generate(EngineRequest("behind", prompt, params))
        first = await stream.__anext__()
        await until(lambda: not engine.core.has_work)  # every token made, none read yet
        return first, [out async for out in stream]

    first, rest = asyncio.run(main())
    assert len(rest) == 1 and rest[0].finished and rest[0].finish_reason == "length"
    assert list(first.new_token_ids + rest[0].new_token_ids) == reference(model, prompt, 10)
    assert rest[0].num_output_tokens == 10
