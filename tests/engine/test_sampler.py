"""The single-sequence sampler: each parameter does what its definition says."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from engine.generate import GenerationSettings
from engine.sampler import sample

LOGITS = mx.array([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]])


def draws(temperature: float, top_p: float, n: int = 4000) -> np.ndarray:
    keys = mx.random.split(mx.random.key(7), n)
    tokens = [int(sample(LOGITS, temperature, top_p, k).item()) for k in keys]
    return np.bincount(tokens, minlength=4) / n


def test_temperature_zero_is_argmax():
    assert sample(mx.array([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]]), 0.0, 1.0, None).tolist() == [1, 0]


def test_temperature_one_follows_softmax():
    np.testing.assert_allclose(draws(1.0, 1.0), [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_low_temperature_sharpens_high_flattens():
    assert draws(0.3, 1.0)[0] > 0.8
    assert draws(5.0, 1.0)[3] > 0.15


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    # 0.5 + 0.3 = 0.8 >= 0.75: tokens 2 and 3 are out, the rest renormalized to 5/8, 3/8.
    freq = draws(1.0, 0.75)
    assert freq[2] == 0 and freq[3] == 0
    np.testing.assert_allclose(freq[:2], [0.625, 0.375], atol=0.03)
    # A nucleus smaller than the top token still keeps it.
    assert draws(1.0, 0.01, n=200)[0] == 1.0


def test_same_key_same_token():
    wide = mx.random.normal((1, 1000), key=mx.random.key(1))
    key = mx.random.key(42)
    assert len({int(sample(wide, 1.0, 1.0, key).item()) for _ in range(5)}) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(max_tokens=-3), "max_tokens"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationSettings(**kwargs)
