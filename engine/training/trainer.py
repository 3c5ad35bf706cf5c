"""One LoRA training run: AdamW over the adapter's A and B, gradient accumulation over
micro-batches, a learning-rate schedule, and a state that a restarted run resumes from.

The unit of work is one micro-batch (``run_unit``): its forward and backward pass, its gradients
added to the step's. The last micro-batch of a step also applies the optimizer. Interleaved with
serving, the engine thread runs one unit at a time, so the pause a running stream sees is one
micro-batch, never a whole step.

A step's loss is the mean cross-entropy over the target tokens of all its examples: each
micro-batch's summed loss is divided by the step's total count of target tokens, so the
accumulated gradient is the whole batch's (the same whatever the micro-batch size).

The optimizer is MLX's AdamW with bias correction, which is PyTorch's AdamW: decoupled weight
decay ``p -= lr * wd * p``, then ``p -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from engine.lora.request import LoRAModules, LoRAWeights
from engine.models.base import CausalLM
from engine.training.data import Example, RunPlan, collate
from engine.training.model import TrainingModel

SCHEDULES = ("linear", "constant", "cosine")


@dataclass(frozen=True, slots=True)
class TrainingConfig:
    """Hyperparameters of a run. ``warmup_steps`` ramps the rate up linearly from 0; then
    ``schedule`` takes it from ``learning_rate`` to 0 at the last step (linear, cosine) or
    keeps it (constant), as transformers' schedules of those names do."""

    learning_rate: float
    n_epochs: int = 1
    batch_size: int = 8
    micro_batch_size: int = 8
    warmup_steps: int = 0
    schedule: str = "linear"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    dropout: float = 0.0
    seed: int = 0
    checkpoint_layers: bool = False  # recompute each block in the backward pass


def learning_rate(config: TrainingConfig, step: int, total_steps: int) -> float:
    """The rate of 0-based ``step`` (transformers' ``get_*_schedule_with_warmup``)."""
    warmup = config.warmup_steps
    if step < warmup:
        return config.learning_rate * step / max(1, warmup)
    if config.schedule == "constant":
        return config.learning_rate
    progress = (step - warmup) / max(1, total_steps - warmup)
    if config.schedule == "cosine":
        return config.learning_rate * max(0.0, 0.5 * (1.0 + np.cos(np.pi * progress)))
    return config.learning_rate * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


@dataclass(frozen=True, slots=True)
class StepReport:
    """One optimizer step done. ``step`` counts steps done (1-based)."""

    step: int
    total_steps: int
    epoch: int  # 0-based epoch of this step
    loss: float  # mean cross-entropy over the step's target tokens
    learning_rate: float
    tokens: int  # tokens the step ran (prompt and target, no padding)
    learned_tokens: int
    seconds: float  # device time of its micro-batches


class Trainer:
    """Trains LoRA ``initial`` on ``examples``; only the engine thread calls it (MLX).

    ``resume`` is a ``state()`` of an earlier trainer of the same run: parameters, AdamW
    moments and the count of steps done, so a restarted run goes on exactly where it stopped.
    """

    def __init__(
        self,
        model: CausalLM,
        examples: Sequence[Example],
        initial: LoRAModules,
        config: TrainingConfig,
        resume: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.config = config
        self.examples = examples
        self.view = TrainingModel(model, initial, config.dropout)
        self.plan = RunPlan(
            len(examples), config.n_epochs, config.batch_size, config.micro_batch_size, config.seed
        )
        self._scales = {key: w.scale for key, w in initial.items()}
        self.params = {_name(k): _pair(w.a, w.b) for k, w in initial.items()}
        b1, b2 = config.betas
        self.optimizer = optim.AdamW(
            learning_rate=config.learning_rate,
            betas=[b1, b2],
            eps=config.eps,
            weight_decay=config.weight_decay,
            bias_correction=True,
        )
        self.optimizer.init(self.params)
        self.step = 0  # optimizer steps done
        if resume is not None:
            self._restore(resume)
        self._grad = mx.value_and_grad(self._loss)
        self._unit = 0  # next micro-batch of the current step
        self._acc: dict | None = None  # gradients of the current step so far
        self._loss_sum = mx.array(0.0)
        self._seconds = 0.0

    @property
    def done(self) -> bool:
        return self.step >= self.plan.total_steps

    def run_unit(self) -> StepReport | None:
        """One micro-batch; returns the step's report when it completed an optimizer step."""
        assert not self.done, "the run is over"
        start = time.perf_counter()
        batches = self.plan.micro_batches(self.step)
        chosen = [self.examples[i] for i in batches[self._unit]]
        tokens, mask = collate(chosen)
        scale = mx.array(1.0 / self._learned(batches), mx.float32)
        loss, grads = self._grad(self.params, mx.array(tokens), mx.array(mask), scale, self._key())
        self._acc = grads if self._acc is None else _add(self._acc, grads)
        self._loss_sum = self._loss_sum + loss
        mx.eval(self._acc, self._loss_sum)
        self._unit += 1
        self._seconds += time.perf_counter() - start
        if self._unit < len(batches):
            return None
        return self._apply(batches, start)

    def train_step(self) -> StepReport:
        """Every remaining micro-batch of the current step."""
        while (report := self.run_unit()) is None:
            pass
        return report

    def loss_sum(self, examples: Sequence[Example]) -> tuple[float, int]:
        """The summed cross-entropy of ``examples``' target tokens under the adapter now (one
        forward pass: no dropout, no gradient) and their count."""
        tokens, mask = collate(examples)
        loss = self.view.loss(self._layered(self.params), mx.array(tokens), mx.array(mask))
        return loss.item(), sum(e.num_learned for e in examples)

    def weights(self) -> dict[tuple[int, str], LoRAWeights]:
        """The adapter now, float32 numpy in PEFT's orientation."""
        out = {}
        for key, scale in self._scales.items():
            p = self.params[_name(key)]
            out[key] = LoRAWeights(a=np.array(p["a"]), b=np.array(p["b"]), scale=scale)
        return out

    def state(self) -> dict[str, np.ndarray]:
        """Everything a restarted run needs beyond its configuration and data (between steps)."""
        assert self._unit == 0, "state is taken between steps"
        out = {"step": np.array(self.step, np.int64)}
        for name, p in self.params.items():
            s = self.optimizer.state[name]
            for ab in ("a", "b"):
                out[f"param/{name}/{ab}"] = np.array(p[ab])
                out[f"m/{name}/{ab}"] = np.array(s[ab]["m"])
                out[f"v/{name}/{ab}"] = np.array(s[ab]["v"])
        return out

    # -- internals ------------------------------------------------------------------------------

    def _loss(self, params, tokens, mask, scale, key) -> mx.array:
        return (
            self.view.loss(self._layered(params), tokens, mask, key, self.config.checkpoint_layers)
            * scale
        )

    def _layered(self, params: dict) -> list[dict]:
        layers: list[dict] = [{} for _ in self.view.blocks]
        for i, path in self._scales:
            layers[i][path] = params[_name((i, path))]
        return layers

    def _apply(self, batches: list[np.ndarray], start: float) -> StepReport:
        lr = learning_rate(self.config, self.step, self.plan.total_steps)
        self.optimizer.learning_rate = lr
        self.params = self.optimizer.apply_gradients(self._acc, self.params)
        mx.eval(self.params, self.optimizer.state)
        chosen = [self.examples[i] for batch in batches for i in batch]
        report = StepReport(
            step=self.step + 1,
            total_steps=self.plan.total_steps,
            epoch=self.plan.epoch_of(self.step),
            loss=self._loss_sum.item(),
            learning_rate=lr,
            tokens=sum(len(e) for e in chosen),
            learned_tokens=sum(e.num_learned for e in chosen),
            seconds=self._seconds + time.perf_counter() - start,
        )
        self.step += 1
        self._unit, self._acc, self._loss_sum, self._seconds = 0, None, mx.array(0.0), 0.0
        return report

    def _learned(self, batches: list[np.ndarray]) -> int:
        return max(1, sum(self.examples[i].num_learned for batch in batches for i in batch))

    def _key(self) -> mx.array | None:
        """Dropout's key for this micro-batch, from (seed, step, unit) alone."""
        if self.config.dropout <= 0:
            return None
        seed = np.random.SeedSequence([self.config.seed, self.step, self._unit])
        return mx.random.key(int(seed.generate_state(1)[0]))

    def _restore(self, state: Mapping[str, np.ndarray]) -> None:
        for name, p in self.params.items():
            s = self.optimizer.state[name]
            for ab in ("a", "b"):
                p[ab] = mx.array(state[f"param/{name}/{ab}"])
                s[ab]["m"] = mx.array(state[f"m/{name}/{ab}"])
                s[ab]["v"] = mx.array(state[f"v/{name}/{ab}"])
        self.step = int(state["step"])
        self.optimizer.state["step"] = mx.array(self.step, mx.uint64)


def _name(key: tuple[int, str]) -> str:
    return f"{key[0]}:{key[1]}"


def _pair(a: np.ndarray, b: np.ndarray) -> dict[str, mx.array]:
    return {"a": mx.array(a, mx.float32), "b": mx.array(b, mx.float32)}


def _add(x, y):
    if isinstance(x, dict):
        return {k: _add(x[k], y[k]) for k in x}
    return x + y
