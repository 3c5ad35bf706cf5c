"""Validation loss during a run: what the validation examples' target tokens cost under the
adapter being trained, measured between steps in bounded units.

After step ``s`` (steps done, 1-based) of a run that has validation examples:

- ``valid_loss``, on a sampled batch: every ``every`` steps, at each checkpoint and after the
  last step; the batch is ``batch_size`` validation examples drawn from (seed, s) alone (all of
  them when there are no more), so a resumed run measures what an unbroken one does;
- ``full_valid_loss``, over every validation example: at each checkpoint and after the last step.

Both are the mean cross-entropy over the target tokens (the assistant's, as in training), like a
step's training loss, with no dropout. The examples go through in micro-batches, one forward
pass per unit, so serving waits for at most one of them (less than one training unit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from engine.training.data import Example

VALID_LOSS, FULL_VALID_LOSS = "valid_loss", "full_valid_loss"
_STREAM = 0x7A11D  # keeps the batch draws apart from the training order's (seed, epoch) draws


class LossSum(Protocol):
    def loss_sum(self, examples: Sequence[Example]) -> tuple[float, int]: ...


@dataclass(frozen=True, slots=True)
class ValidationPlan:
    """When a run measures its validation loss, and on which examples."""

    examples: Sequence[Example]
    batch_size: int
    micro_batch_size: int
    every: int = 0  # 0: only at checkpoints and after the last step
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.micro_batch_size < 1 or self.every < 0:
            raise ValueError(f"bad validation plan: {self.batch_size=} {self.micro_batch_size=} "
                             f"{self.every=}")  # fmt: skip

    def batch(self, step: int) -> list[int]:
        """The indices of the sampled batch after ``step`` steps."""
        n = len(self.examples)
        if n <= self.batch_size:
            return list(range(n))
        rng = np.random.default_rng([self.seed, _STREAM, step])
        return sorted(int(i) for i in rng.choice(n, self.batch_size, replace=False))

    def after(self, step: int, checkpoint: bool, last: bool) -> Evaluation | None:
        """The evaluation due after ``step`` steps (None: nothing is due)."""
        if not self.examples:
            return None
        full = checkpoint or last
        if not (full or (self.every > 0 and step % self.every == 0)):
            return None
        parts: dict[str, Sequence[Example]] = {}
        if full:
            parts[FULL_VALID_LOSS] = self.examples
        if not (full and len(self.examples) <= self.batch_size):  # else the batch is all of them
            parts[VALID_LOSS] = [self.examples[i] for i in self.batch(step)]
        return Evaluation(parts, self.micro_batch_size)


class Evaluation:
    """One measurement after a step: ``run_unit`` runs one micro-batch until all are done."""

    def __init__(self, parts: dict[str, Sequence[Example]], micro_batch_size: int) -> None:
        self._units = [
            (name, examples[k : k + micro_batch_size])
            for name, examples in parts.items()
            for k in range(0, len(examples), micro_batch_size)
        ]
        self._sums = dict.fromkeys(parts, 0.0)
        self._counts = dict.fromkeys(parts, 0)
        self._next = 0

    @property
    def done(self) -> bool:
        return self._next >= len(self._units)

    def run_unit(self, model: LossSum) -> bool:
        """One micro-batch's forward pass; True once the whole measurement is done."""
        name, examples = self._units[self._next]
        total, count = model.loss_sum(examples)
        self._sums[name] += total
        self._counts[name] += count
        self._next += 1
        return self.done

    def losses(self) -> dict[str, float]:
        """Mean cross-entropy per target token of each part (``valid_loss`` is the full loss
        when the sampled batch was every example)."""
        assert self.done, "the evaluation has units left"
        out = {name: self._sums[name] / max(1, self._counts[name]) for name in self._sums}
        if VALID_LOSS not in out:
            out[VALID_LOSS] = out[FULL_VALID_LOSS]
        return out
