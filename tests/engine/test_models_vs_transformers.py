"""Our forward pass against transformers' on tiny random models of every architecture."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from engine.loader.hf import load_hf_model
from tests.engine.tiny_models import ARCHS, VOCAB, build_tiny, reference_greedy

pytest.importorskip("torch")

STEPS = 32


def our_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    cache = model.make_cache()
    logits_seen, tokens = [], []
    logits = model(mx.array([prompt]), cache)
    for _ in range(steps):
        logits_np = np.array(logits[0].astype(mx.float32))
        logits_seen.append(logits_np)
        token = int(logits_np[-1].argmax())
        tokens.append(token)
        logits = model(mx.array([[token]]), cache)
    return tokens, logits_seen


def assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-3 * scale)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_logits_and_greedy_tokens_match_transformers(arch, tmp_path):
    ref_model = build_tiny(arch, tmp_path)
    prompt = np.random.default_rng(1).integers(3, VOCAB, size=12).tolist()
    ref_tokens, ref_logits = reference_greedy(ref_model, prompt, STEPS)

    model = load_hf_model(tmp_path, mx.float32)
    tokens, logits = our_greedy(model, prompt, STEPS)

    assert len(set(ref_tokens)) > 3, "degenerate reference: the test would prove little"
    for ours, ref in zip(logits, ref_logits, strict=True):
        assert_close(ours, ref)
    assert tokens == ref_tokens
