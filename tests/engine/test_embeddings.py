"""Embeddings in the engine: decoder models pooled through the paged engine (chunked, batched
with generation, after prefix-cache hits) and BERT encoders, both against transformers'
forward with sentence-transformers' pooling; the encoder's token budget; and a burst of
embeddings beside a chat stream, which waits at most one encoder step between two of its own."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from engine import encoder_core
from engine.config import EngineConfig
from engine.core_group import CoreGroup
from engine.encoder_core import EncoderCore, EncodeRequest
from engine.engine_core import EngineCore
from engine.loader.encoder import LoadedEncoder
from engine.loader.load import load_model
from engine.pooling import PoolingConfig, PoolingMode
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from tests.engine.tiny_embedders import (
    build_tiny_bert,
    build_tiny_decoder_embedder,
    hidden_states,
    reference_pool,
    write_pooling,
    write_word_tokenizer,
)
from tests.engine.tiny_models import VOCAB, build_tiny

pytest.importorskip("torch")

MODES = [m.value for m in PoolingMode]


def prompts(n: int, seed: int = 0, longest: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=int(rng.integers(1, longest))).tolist() for _ in range(n)]


def drive(core, requests, max_steps: int = 10_000) -> dict[str, np.ndarray]:
    """Run requests to the end on ``core``; each pooling request's embedding by id."""
    for r in requests:
        core.add_request(r)
    embeddings = {}
    for _ in range(max_steps):
        if not core.has_work:
            break
        for out in core.step():
            assert out.error is None, out.error
            if out.embedding is not None:
                embeddings[out.request_id] = out.embedding
    assert not core.has_work, "the engine did not finish"
    return embeddings


def embed_request(rid: str, ids: list[int], pooling: PoolingConfig) -> EngineRequest:
    return EngineRequest(rid, ids, SamplingParams(max_tokens=1), pooling=pooling)


@pytest.mark.parametrize("mode", MODES)
def test_decoder_embeddings_equal_transformers_with_the_same_pooling(tmp_path, mode):
    reference = build_tiny_decoder_embedder(tmp_path, mode)
    loaded = load_model(tmp_path)
    assert loaded.pooling == PoolingConfig(PoolingMode(mode), normalize=True)
    # Chunks of 8 tokens: longer prompts are pooled over several steps.
    core = EngineCore(
        loaded.model, EngineConfig(num_blocks=128, block_size=4, long_prefill_chunk=8), mx.float32
    )
    ps = prompts(6, seed=1)
    chat = EngineRequest("chat", ps[0], SamplingParams(max_tokens=5, temperature=0.0))
    requests = [embed_request(f"e{i}", p, loaded.pooling) for i, p in enumerate(ps)]
    got = drive(core, [chat, *requests])
    # The same prompts again: their blocks are cached now (pooling must not lose their states).
    again = drive(core, [embed_request(f"again{i}", p, loaded.pooling) for i, p in enumerate(ps)])
    for i, p in enumerate(ps):
        expected = reference_pool(hidden_states(reference, p), mode)
        np.testing.assert_allclose(got[f"e{i}"], expected, atol=2e-5, err_msg=f"prompt {i}")
        np.testing.assert_allclose(again[f"again{i}"], expected, atol=2e-5, err_msg=f"again {i}")
    assert core.kv.num_free_blocks == core.num_blocks - 1


def test_a_decoder_embedding_folder_keeps_a_plain_model_folder_generative(tmp_path):
    build_tiny("llama", tmp_path)
    write_word_tokenizer(tmp_path)
    assert load_model(tmp_path).pooling is None
    write_pooling(tmp_path, "lasttoken", normalize=False)
    assert load_model(tmp_path).pooling == PoolingConfig(PoolingMode.LAST, normalize=False)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    reference = build_tiny_bert(folder)
    write_pooling(folder, "mean")
    loaded = load_model(folder)
    assert isinstance(loaded, LoadedEncoder)
    return reference, loaded


def test_bert_packed_batch_equals_transformers_one_by_one(bert):
    reference, loaded = bert
    ps = prompts(7, seed=2, longest=60)
    core = EncoderCore(loaded.model, loaded.pooling, max_batch_tokens=10_000)
    got = core.embed(ps)
    for i, p in enumerate(ps):
        expected = reference_pool(hidden_states(reference, p), "mean")
        np.testing.assert_allclose(got[i], expected, atol=2e-5, err_msg=f"prompt {i}")


def test_bert_batch_split_over_helper_threads_equals_it_whole(bert, monkeypatch):
    """On the CPU a batch goes to one helper per core it may use (engine.cpu_workers): the
    same embeddings as in one pass, and as transformers'."""
    import threading

    reference, loaded = bert
    ps = prompts(14, seed=5, longest=60)
    assert sum(map(len, ps)) >= encoder_core.SPLIT_TOKENS
    core = EncoderCore(loaded.model, loaded.pooling, max_batch_tokens=10_000)
    whole = core.embed(ps, parts=1)
    threads: list[int] = []
    embed_part = core._embed
    monkeypatch.setattr(
        core, "_embed", lambda s: threads.append(threading.get_ident()) or embed_part(s)
    )
    split = core.embed(ps, parts=2)
    assert len(set(threads)) == 2 and threading.get_ident() not in threads
    np.testing.assert_allclose(split, whole, atol=1e-6)
    for i, p in enumerate(ps):
        expected = reference_pool(hidden_states(reference, p), "mean")
        np.testing.assert_allclose(split[i], expected, atol=2e-5, err_msg=f"prompt {i}")
    threads.clear()
    core.embed(ps[:3], parts=2)  # under SPLIT_TOKENS: whole, on this thread
    assert threads == [threading.get_ident()]


@pytest.mark.parametrize("act", ["gelu_new", "relu"])
def test_bert_activations(tmp_path, act):
    reference = build_tiny_bert(tmp_path, hidden_act=act)
    write_pooling(tmp_path, "cls", normalize=False)
    loaded = load_model(tmp_path)
    p = prompts(1, seed=3)[0]
    got = EncoderCore(loaded.model, loaded.pooling, 512).embed([p])[0]
    expected = reference_pool(hidden_states(reference, p), "cls", normalize=False)
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_the_encoder_batches_within_its_token_budget_and_aborts_waiting_inputs(bert):
    _, loaded = bert
    core = EncoderCore(loaded.model, loaded.pooling, max_batch_tokens=20)
    lengths = [8, 8, 8, 30, 3]
    for i, n in enumerate(lengths):
        core.add_request(EncodeRequest(f"r{i}", list(range(3, 3 + n))))
    assert core.abort_request("r4").finish_reason == "abort"
    assert core.abort_request("nope") is None
    steps = []
    while core.has_work:
        steps.append([out.request_id for out in core.step()])
    # 8 + 8 fit 20; 8 + 30 do not; 30 alone is over the budget but always runs.
    assert steps == [["r0", "r1"], ["r2"], ["r3"]]
    single = core.embed([list(range(3, 11))])[0]
    again = core.embed([list(range(3, 11)), list(range(3, 40))])[0]
    np.testing.assert_allclose(again, single, atol=1e-6)


def test_a_chat_stream_waits_at_most_one_encoder_step_while_200_embeddings_arrive(tmp_path, bert):
    build_tiny("llama", tmp_path)
    chat_model = load_model(write_word_tokenizer(tmp_path))
    chat_core = EngineCore(chat_model.model, EngineConfig(num_blocks=64, block_size=4), mx.float32)
    _, encoder = bert
    encoder_core = EncoderCore(encoder.model, encoder.pooling, max_batch_tokens=48)
    group = CoreGroup({EngineRequest: chat_core, EncodeRequest: encoder_core})
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    group.add_request(EngineRequest("chat", prompts(1)[0], greedy))
    inputs = prompts(200, seed=4, longest=20)
    token_steps: list[int] = []
    embeddings = {}
    step = 0
    while group.has_work:
        if step < len(inputs) // 20:  # a burst: 20 inputs arrive before each of the first steps
            for i in range(step * 20, step * 20 + 20):
                group.add_request(EncodeRequest(f"e{i}", inputs[i]))
        step += 1
        for out in group.step():
            if out.request_id == "chat":
                token_steps += [step] * len(out.new_token_ids)
            else:
                embeddings[out.request_id] = out.embedding
    assert len(token_steps) == 40 and len(embeddings) == 200
    gaps = np.diff(token_steps)
    assert gaps.max() <= 2, f"the chat stream waited {gaps.max()} steps for a token"
    # The encoder ran meanwhile, and each input's embedding is what it is alone.
    assert step > 40 + 200 * 10 // 48
    for i in (0, 57, 199):
        alone = encoder_core.embed([inputs[i]])[0]
        np.testing.assert_allclose(embeddings[f"e{i}"], alone, atol=1e-5)


def test_the_inputs_of_one_embed_call_reach_the_encoder_in_one_step(bert, monkeypatch):
    """However the engine is woken, the inputs of one call are added before its next step
    (one message to an engine process): one step embeds them all, the budget allowing, not
    the first alone."""
    import asyncio

    from engine.async_engine import AsyncEngine
    from engine.engine_process import EngineSpec

    _, loaded = bert
    published: list[int] = []
    publish = AsyncEngine._publish
    monkeypatch.setattr(
        AsyncEngine,
        "_publish",
        lambda self, outs: published.append(len(outs)) or publish(self, outs),
    )
    spec = EngineSpec(model=str(loaded.path), config=EngineConfig(), embedding_batch_tokens=10_000)
    engine = AsyncEngine(None, process=spec)
    try:
        ps = prompts(12, seed=4)
        for round_ in range(4):
            requests = [EncodeRequest(f"r{round_}-{i}", p) for i, p in enumerate(ps)]
            outputs = asyncio.run(engine.embed(requests))
            assert [o.request_id for o in outputs] == [r.request_id for r in requests]
            assert all(o.embedding is not None for o in outputs)
        assert published == [12] * 4
    finally:
        engine.shutdown()
