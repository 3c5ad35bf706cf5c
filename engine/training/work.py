"""A training run as background work on the engine thread (engine.background).

The work builds its ``Trainer`` on its first unit (MLX, so on the engine thread), then runs one
micro-batch per unit: a training micro-batch, or, after a step that measures the validation loss
(engine.training.validation), a validation micro-batch's forward pass. A step is reported once
its validation is done, with its losses, and a checkpoint follows its step's report.

What happens goes to ``report`` as typed events, called on the engine thread: the owner must
only queue them (files, SQLite and the registry are its business, off this thread). Weights and
the resume state leave as numpy arrays, read back here once per checkpoint.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from engine.lora.request import LoRAModules, LoRAWeights
from engine.models.base import CausalLM
from engine.training.data import Example
from engine.training.trainer import StepReport, Trainer, TrainingConfig
from engine.training.validation import FULL_VALID_LOSS, VALID_LOSS, Evaluation, ValidationPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TrainingRun:
    """What one run trains: examples, starting weights, hyperparameters, and where it resumes
    (``resume``: a ``Trainer.state()``; None starts at step 0). A checkpoint is taken at each
    epoch's end and every ``checkpoint_every`` steps (0: epochs only). With ``validation``
    examples, the validation loss is measured every ``validate_every`` steps (0: at checkpoints
    and the end only), at each checkpoint and after the last step."""

    examples: Sequence[Example]
    initial: LoRAModules
    config: TrainingConfig
    resume: Mapping[str, np.ndarray] | None = None
    checkpoint_every: int = 0
    validation: Sequence[Example] = ()
    validate_every: int = 0


@dataclass(frozen=True, slots=True)
class Started:
    step: int  # steps already done (a resumed run starts past 0)
    total_steps: int


@dataclass(frozen=True, slots=True)
class StepDone:
    """A step and, when it measured them, its validation losses (a sampled batch, all)."""

    report: StepReport
    valid_loss: float | None = None
    full_valid_loss: float | None = None


@dataclass(frozen=True, slots=True)
class Checkpointed:
    step: int
    weights: dict[tuple[int, str], LoRAWeights]
    state: dict[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class Finished:
    weights: dict[tuple[int, str], LoRAWeights]


@dataclass(frozen=True, slots=True)
class Failed:
    error: str


@dataclass(frozen=True, slots=True)
class Stopped:
    """Cancelled (or the owner went away) before the end."""


TrainingEvent = Started | StepDone | Checkpointed | Finished | Failed | Stopped


class TrainingWork:
    def __init__(
        self, model: CausalLM, run: TrainingRun, report: Callable[[TrainingEvent], None]
    ) -> None:
        self.model, self.run, self.report = model, run, report
        self._trainer: Trainer | None = None
        self._validation: ValidationPlan | None = None
        self._pending: tuple[StepReport, Evaluation] | None = None  # a step being validated
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop at the next unit (any thread)."""
        self._cancelled.set()

    def run_unit(self) -> bool:
        if self._cancelled.is_set():
            return self._end(Stopped())
        try:
            if self._trainer is None:
                return self._start()
            if self._pending is not None:
                step, evaluation = self._pending
                if not evaluation.run_unit(self._trainer):
                    return True
                self._pending = None
                losses = evaluation.losses()
                return self._step_end(step, losses[VALID_LOSS], losses.get(FULL_VALID_LOSS))
            trainer = self._trainer
            step = trainer.run_unit()
            if step is None:
                return True
            evaluation = self._validation.after(
                step.step, self._checkpoint_due(step.step), trainer.done
            )
            if evaluation is not None:
                self._pending = (step, evaluation)
                return True
            return self._step_end(step)
        except Exception as e:
            log.exception("training failed")
            return self._end(Failed(f"{type(e).__name__}: {e}"))

    def _start(self) -> bool:
        run = self.run
        self._trainer = Trainer(self.model, run.examples, run.initial, run.config, run.resume)
        self._validation = ValidationPlan(
            run.validation, run.config.batch_size, run.config.micro_batch_size,
            run.validate_every, run.config.seed,
        )  # fmt: skip
        self.report(Started(self._trainer.step, self._trainer.plan.total_steps))
        if self._trainer.done:
            return self._end(Finished(self._trainer.weights()))
        return True

    def _step_end(
        self, step: StepReport, valid: float | None = None, full: float | None = None
    ) -> bool:
        trainer = self._trainer
        self.report(StepDone(step, valid, full))
        if trainer.done:
            return self._end(Finished(trainer.weights()))
        if self._checkpoint_due(step.step):
            self.report(Checkpointed(step.step, trainer.weights(), trainer.state()))
        return True

    def _checkpoint_due(self, step: int) -> bool:
        every = self.run.checkpoint_every
        return step % self._trainer.plan.steps_per_epoch == 0 or (every > 0 and step % every == 0)

    def _end(self, event: TrainingEvent) -> bool:
        self._trainer = self._pending = None  # their arrays go now, not with the work
        self.report(event)
        return False
