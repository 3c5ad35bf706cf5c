"""Generating one sequence with the contiguous cache: the simplest complete path from a prompt
to tokens, used by `candlewick generate` and as the reference the batched engine must match."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import mlx.core as mx

from engine.models.base import CausalLM
from engine.sampler import sample

PREFILL_CHUNK = 512  # prompt tokens per forward call: bounds the attention scores' memory


@dataclass(frozen=True, slots=True)
class GenerationSettings:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        problems = []
        if self.max_tokens < 0:
            problems.append(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if problems:
            raise ValueError("; ".join(problems))


def generate_tokens(
    model: CausalLM, prompt: list[int], settings: GenerationSettings
) -> Iterator[int]:
    """Yield up to ``max_tokens`` new tokens; a stop token is yielded, then generation ends.

    The next step is queued on the device (``mx.async_eval``) before the current token is read
    back, so Python's bookkeeping overlaps the model's compute.
    """
    if not prompt:
        raise ValueError("the prompt has no tokens")
    if settings.max_tokens == 0:
        return
    key = mx.random.key(settings.seed if settings.seed is not None else 0)
    cache = model.make_cache()

    def step(tokens: mx.array) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        hidden = model.hidden(tokens, cache)[:, -1, :]  # [1, hidden]
        return sample(model.logits(hidden), settings.temperature, settings.top_p, sub)

    for start in range(0, len(prompt) - 1, PREFILL_CHUNK):
        chunk = prompt[start : min(start + PREFILL_CHUNK, len(prompt) - 1)]
        model.hidden(mx.array([chunk]), cache)
        mx.eval([c.state for c in cache])
    y = step(mx.array([prompt[-1:]]))
    mx.async_eval(y)
    for n in range(settings.max_tokens):
        following = None
        if n + 1 < settings.max_tokens:
            following = step(y[:, None])
            mx.async_eval(following)
        token = int(y.item())
        yield token
        if token in settings.stop_token_ids:
            return
        y = following
