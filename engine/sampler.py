"""Choosing the next token from logits: greedy, temperature, nucleus (top-p), seeded."""

from __future__ import annotations

import mlx.core as mx


def sample(logits: mx.array, temperature: float, top_p: float, key: mx.array | None) -> mx.array:
    """One token per row. logits: [B, V] -> [B] (uint32).

    temperature 0 is greedy. Otherwise tokens are drawn from softmax(logits / temperature),
    restricted to the smallest set of most likely tokens whose probability reaches ``top_p``.
    A given ``key`` always draws the same token from the same logits.
    """
    if temperature <= 0:
        return mx.argmax(logits, axis=-1)
    scaled = logits.astype(mx.float32) / temperature
    if top_p < 1.0:
        scaled = _nucleus(scaled, top_p)
    return mx.random.categorical(scaled, axis=-1, key=key)


def _nucleus(logits: mx.array, top_p: float) -> mx.array:
    """Mask (to -inf) every token outside the top-p nucleus; the most likely token always stays."""
    order = mx.argsort(-logits, axis=-1)  # [B, V], most likely first
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits, axis=-1)
    mass_before = mx.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
    keep_sorted = mass_before < top_p
    keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
    return mx.where(keep, logits, -mx.inf)
