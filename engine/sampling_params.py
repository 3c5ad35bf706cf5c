"""How one request wants its tokens chosen and when it stops."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling settings, with OpenAI's / vLLM's meanings.

    ``temperature`` 0 is greedy. ``top_k`` 0 disables it. ``logprobs`` None returns none; N
    returns the chosen token's log-probability and the N most likely alternatives. A ``seed``
    makes the request's tokens depend only on the seed and its own logits, never on which other
    requests share its batch.
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    ignore_eos: bool = False
    logprobs: int | None = None

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        """Every invalid field, each named with its value."""
        p = []
        if self.max_tokens < 1:
            p.append(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= max(self.max_tokens, 0):
            p.append(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.temperature < 0:
            p.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            p.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            p.append(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            p.append(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                p.append(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            p.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= self.MAX_LOGPROBS:
            p.append(f"logprobs must be in [0, {self.MAX_LOGPROBS}], got {self.logprobs}")
        bad_bias = [t for t, b in self.logit_bias.items() if not -100 <= b <= 100]
        if bad_bias:
            p.append(f"logit_bias values must be in [-100, 100] (tokens {bad_bias})")
        return p

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
