"""The perplexity measure against PyTorch's cross-entropy on the same logits."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from loadtests.perplexity import TEXT, perplexity


def test_perplexity_is_exp_of_torch_cross_entropy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((1, 20, 50)).astype(np.float32) * 3
    tokens = rng.integers(0, 50, size=20).tolist()
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits[0, :-1]), torch.tensor(tokens[1:])
    )
    assert perplexity(mx.array(logits), tokens) == pytest.approx(math.exp(expected.item()), 1e-5)


def test_the_text_is_prose_of_a_few_paragraphs():
    paragraphs = [p for p in TEXT.read_text().split("\n\n") if p.strip()]
    assert len(paragraphs) >= 4 and len(TEXT.read_text().split()) > 400
