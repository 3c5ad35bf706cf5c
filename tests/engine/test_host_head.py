"""One sampled row's logits by ``cblas_sgemv`` on the CPU: equal to MLX's head (tied and untied),
used by the engine for a single sampled row only, and declined where it does not apply (a
quantized or half-precision head, a head with a bias, a library without ``sgemv``)."""

from __future__ import annotations

import ctypes
import glob
import os
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from engine.host_head import HostHead, cblas_sgemv
from engine.loader.hf import load_hf_model
from engine.request import EngineRequest
from tests.engine.test_engine import greedy, make_core, prompts, run
from tests.engine.tiny_models import build_tiny


def bundled_sgemv():
    """``cblas_sgemv`` of the BLAS that mlx[cpu] carries (already loaded, under libmlx)."""
    site = os.path.dirname(os.path.dirname(mx.__file__))
    found = glob.glob(os.path.join(site, "mlx_cpu.libs", "libblas-*.so*"))
    if not found:
        pytest.skip("no mlx[cpu] bundled BLAS here (macOS uses Accelerate)")
    return cblas_sgemv(ctypes.CDLL(found[0]))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    build_tiny(request.param, folder, tie_word_embeddings=request.param == "qwen2")
    return load_hf_model(folder, mx.float32)


def test_one_rows_logits_equal_mlx_head(model):
    head = HostHead.for_model(model, bundled_sgemv())
    assert head is not None
    rows = mx.random.normal((3, model.config.hidden_size), key=mx.random.key(1))
    for i in range(3):
        got, want = head(rows[i : i + 1]), model.logits(rows[i : i + 1])
        assert got.shape == want.shape == (1, model.config.vocab_size)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)


def head_model(layer, tied: bool = False):
    """The parts of a model ``HostHead.for_model`` looks at."""
    inner = SimpleNamespace(embed_tokens=layer)
    config = SimpleNamespace(tie_word_embeddings=tied)
    return SimpleNamespace(config=config, model=inner, lm_head=layer)


def test_declined_where_it_does_not_apply():
    sgemv = bundled_sgemv()
    assert HostHead.for_model(head_model(nn.Linear(8, 16, bias=False)), sgemv) is not None
    assert HostHead.for_model(head_model(nn.Embedding(16, 8), tied=True), sgemv) is not None
    assert HostHead.for_model(head_model(nn.Linear(8, 16, bias=True)), sgemv) is None
    half = nn.Linear(8, 16, bias=False)
    half.set_dtype(mx.float16)
    assert HostHead.for_model(head_model(half), sgemv) is None
    quantized = nn.QuantizedLinear(64, 16, bias=False, group_size=32, bits=8)
    assert HostHead.for_model(head_model(quantized), sgemv) is None
    assert HostHead.for_model(head_model(nn.QuantizedEmbedding(16, 64), tied=True), sgemv) is None
    assert cblas_sgemv(SimpleNamespace()) is None  # a library without it


def test_one_sequence_gets_the_same_tokens_and_logprobs_through_it(model):
    """A lone sequence samples one row a step (the head by sgemv): the same greedy tokens as
    MLX's head, logprobs equal to float32 rounding."""
    head = HostHead.for_model(model, bundled_sgemv())
    calls: list[int] = []
    host = make_core(model)
    host.runner.host_head = lambda row: calls.append(row.shape[0]) or head(row)
    plain = make_core(model)
    plain.runner.host_head = None
    for i, p in enumerate(prompts(3, seed=5)):
        req = [EngineRequest(f"r{i}", p, greedy(10, logprobs=2))]
        (got, got_lps), (want, want_lps) = run(host, req), run(plain, req)
        assert got == want
        np.testing.assert_allclose(got_lps[f"r{i}"], want_lps[f"r{i}"], rtol=0, atol=1e-5)
    assert calls == [1] * 30  # every step of a lone sequence, its prefill's included
    calls.clear()
    both = [EngineRequest(f"b{i}", p, greedy(4)) for i, p in enumerate(prompts(2, seed=6))]
    run(host, both)
    assert calls == []  # two rows a step: MLX's head
