"""The serving core without HTTP: prepare → admit → events on the tiny model, checked against
the engine's own single-sequence generation (engine/generate.py, a contiguous cache)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from engine.generate import GenerationSettings, generate_tokens
from server.errors import BadRequest, NotFound, QueueFull
from server.generation import ChoiceDelta, GenerationRequest, TokenUsage
from server.settings import ServerSettings
from server.state import ServerState
from tests.server.fixtures import write_tiny_model

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    folder = write_tiny_model(tmp_path_factory.mktemp("core") / "tiny")
    settings = ServerSettings(
        model=str(folder), data_dir=folder / "data", served_model_name="tiny", num_blocks=256,
        max_num_seqs=4, max_queue=0, engine_process=False,  # the tests look inside the engine
    )  # fmt: skip
    state = ServerState(settings)
    state.start()
    yield state
    state.stop()


def request(prompt_ids: list[int], **fields) -> GenerationRequest:
    greedy = {"model": "tiny", "temperature": 0.0, "ignore_eos": True, "max_tokens": 12}
    return GenerationRequest(prompt_ids=prompt_ids, id_prefix="t", **(greedy | fields))


def run(state: ServerState, spec: GenerationRequest):
    """prepare → admit → every event; the lease, and the room it held while running."""
    serving = state.serving

    async def main():
        prepared = serving.prepare(spec)
        lease = serving.admit(prepared)
        held = serving.admission.inflight
        events = [event async for event in serving.generate(prepared, lease)]
        return events, lease, held

    return asyncio.run(main())


def reference(state: ServerState, prompt_ids: list[int], n: int) -> list[int]:
    return list(generate_tokens(state.serving.loaded.model, prompt_ids, GenerationSettings(n)))


def test_one_choice_streams_the_engine_reference_then_its_usage(state):
    tok = state.serving.tokenizer
    ids = tok.encode("the core")
    events, lease, held = run(state, request(ids, logprobs=2))
    *deltas, usage = events
    assert all(isinstance(d, ChoiceDelta) and d.index == 0 for d in deltas)
    tokens = [t for d in deltas for t in d.token_ids]
    expected = reference(state, ids, 12)
    assert tokens == expected
    assert "".join(d.text for d in deltas) == tok.decode(expected, skip_special_tokens=True)
    assert [lp.token_id for d in deltas for lp in d.logprobs] == expected
    assert all(len(lp.top) == 2 for d in deltas for lp in d.logprobs)
    assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + ["length"]
    assert usage == TokenUsage(prompt_tokens=len(ids), completion_tokens=12, cached_tokens=0)
    assert held == 1 and lease.released and state.admission.inflight == 0


def test_n_choices_interleave_each_seeded_like_a_request_of_its_own(state):
    ids = state.serving.tokenizer.encode("a prompt long enough to fill blocks " * 2)
    sampled = {"temperature": 1.0, "seed": 11, "max_tokens": 6}
    events, lease, held = run(state, request(ids, n=3, **sampled))
    *deltas, usage = events
    by_choice = {i: [d for d in deltas if d.index == i] for i in range(3)}
    for i, choice in by_choice.items():
        alone, _, _ = run(state, request(ids, **(sampled | {"seed": 11 + i})))
        assert [t for d in choice for t in d.token_ids] == [
            t for d in alone[:-1] for t in d.token_ids
        ]
        assert [d.finish_reason for d in choice][-1] == "length"
        assert sum(d.finish_reason is not None for d in choice) == 1
    assert usage.completion_tokens == 18 and usage.prompt_tokens == len(ids)
    assert usage.cached_tokens > 0  # the later choices found the first one's prompt blocks
    assert held == 3 and lease.released and state.admission.inflight == 0


def test_a_stop_string_ends_the_choice_and_never_shows(state):
    tok = state.serving.tokenizer
    ids = tok.encode("stop here")
    text = tok.decode(reference(state, ids, 24), skip_special_tokens=True)
    stop = text[5:8]
    events, lease, _ = run(state, request(ids, max_tokens=24, stop=(stop,)))
    *deltas, usage = events
    assert "".join(d.text for d in deltas) == text[: text.find(stop)]
    assert deltas[-1].finish_reason == "stop" and usage.completion_tokens < 24
    assert lease.released and state.admission.inflight == 0


def test_refusals_come_before_anything_is_held(state):
    serving = state.serving
    ids = serving.tokenizer.encode("no")
    with pytest.raises(NotFound):
        serving.prepare(request(ids, model="absent"))
    with pytest.raises(BadRequest, match="maximum context length"):
        serving.prepare(request(ids, max_tokens=serving.max_model_len))
    with pytest.raises(BadRequest, match="logit_bias key 'x'"):
        serving.prepare(request(ids, logit_bias={"x": 1.0}))
    prepared = serving.prepare(request(ids, n=2))
    full = serving.admission.acquire(3)
    with pytest.raises(QueueFull):
        serving.admit(prepared)
    assert serving.admission.inflight == 3
    full.release()
    with pytest.raises(BadRequest, match="n=5"):
        serving.admit(replace(prepared, n=5))
    assert serving.admission.inflight == 0


def test_closing_the_events_midway_aborts_and_releases(state):
    serving = state.serving
    ids = serving.tokenizer.encode("go on")

    async def main():
        prepared = serving.prepare(request(ids, max_tokens=400, logprobs=0))
        lease = serving.admit(prepared)
        events = serving.generate(prepared, lease)
        first = await anext(events)
        running = serving.admission.inflight
        await events.aclose()  # what a client going away does to its stream
        return first, lease, running

    first, lease, running = asyncio.run(main())
    assert isinstance(first, ChoiceDelta) and first.finish_reason is None
    assert running == 1 and lease.released and state.admission.inflight == 0
    core = state.engine.core
    deadline = time.monotonic() + 10
    while core.has_work or core.kv.usage > 0:
        assert time.monotonic() < deadline, "the closed request still runs"
        time.sleep(0.005)
