"""Single-sequence generation: chunked prefill = whole prefill, seeds reproduce, stops stop."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import engine.generate as generate_module
from engine.generate import GenerationSettings, generate_tokens
from engine.loader.hf import load_hf_model
from tests.engine.tiny_models import VOCAB, build_tiny

pytest.importorskip("torch")


@pytest.fixture(scope="module", params=["llama", "mistral"])
def model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    build_tiny(request.param, folder)
    return load_hf_model(folder, mx.float32)


PROMPT = np.random.default_rng(3).integers(3, VOCAB, size=40).tolist()


def test_chunked_prefill_equals_whole(model, monkeypatch):
    whole = list(generate_tokens(model, PROMPT, GenerationSettings(max_tokens=16)))
    monkeypatch.setattr(generate_module, "PREFILL_CHUNK", 7)
    chunked = list(generate_tokens(model, PROMPT, GenerationSettings(max_tokens=16)))
    assert chunked == whole


def test_seed_reproduces_and_differs_between_seeds(model):
    def run(seed):
        settings = GenerationSettings(max_tokens=24, temperature=1.5, seed=seed)
        return list(generate_tokens(model, PROMPT, settings))

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_stop_token_is_yielded_last(model):
    free = list(generate_tokens(model, PROMPT, GenerationSettings(max_tokens=16)))
    stop = free[5]
    first = free.index(stop)
    stopped = list(
        generate_tokens(
            model, PROMPT, GenerationSettings(max_tokens=16, stop_token_ids=frozenset({stop}))
        )
    )
    assert stopped == free[: first + 1]


def test_max_tokens_zero_and_empty_prompt(model):
    assert list(generate_tokens(model, PROMPT, GenerationSettings(max_tokens=0))) == []
    with pytest.raises(ValueError, match="no tokens"):
        list(generate_tokens(model, [], GenerationSettings()))
