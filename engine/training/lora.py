"""Trainable LoRA: ``y = W x + scale * B (A dropout(x))`` around a frozen base projection.

The base (dense or quantized: QLoRA) is the served model's own layer, never copied or written.
A and B are float32 whatever the base's dtype, in PEFT's orientation (A [r, in], B [out, r]),
so the weights leave training as they are and load in PEFT unchanged. They are not stored in
the module between steps: the training loss hands them in as function arguments (``bind``),
which is what lets ``mx.value_and_grad`` differentiate with respect to them alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine.lora.request import TARGETABLE, LoRAModules, LoRAWeights
from engine.models.base import CausalLM


@dataclass(frozen=True, slots=True)
class LoRASpec:
    """A new adapter's shape: PEFT's ``r``, ``lora_alpha``, ``target_modules`` (paths from
    ``TARGETABLE``) and ``use_rslora`` (scale alpha/sqrt(r) instead of alpha/r)."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class TrainableLoRA(nn.Module):
    """A base projection plus the update of the A, B bound for the current forward pass."""

    def __init__(self, base: nn.Module, scale: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.scale, self.dropout = scale, dropout
        # Leading underscores: per-call inputs, not parameters of the module tree.
        self._a: mx.array | None = None  # [r, in]
        self._b: mx.array | None = None  # [out, r]
        self._key: mx.array | None = None  # dropout's key for this call; None: no dropout

    def bind(self, a: mx.array, b: mx.array, key: mx.array | None) -> None:
        self._a, self._b, self._key = a, b, key

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        h = x.astype(mx.float32)
        if self._key is not None and self.dropout > 0:
            keep = mx.random.bernoulli(1.0 - self.dropout, h.shape, key=self._key)
            h = mx.where(keep, h / (1.0 - self.dropout), 0.0)
        delta = ((h @ self._a.T) @ self._b.T) * self.scale  # [..., out]
        return y + delta.astype(y.dtype)


ProjectionShapes = dict[tuple[int, str], tuple[int, int]]
"""(layer, projection path) -> (out_features, in_features), for every adaptable projection."""


def projection_shapes(model: CausalLM) -> ProjectionShapes:
    """The shapes LoRA weights for ``model`` must fit: what planning and checking a training
    job needs of the model, without its weights (they may live in another process)."""
    return {
        (i, path): projection_shape(layer, path)
        for i, layer in enumerate(model.model.layers)
        for path in TARGETABLE
        if _has_projection(layer, path)
    }


def init_lora(
    shapes: ProjectionShapes, spec: LoRASpec, seed: int
) -> dict[tuple[int, str], LoRAWeights]:
    """New weights as PEFT initializes them: A Kaiming-uniform (bound 1/sqrt(in_features)),
    B zeros, so the adapter starts as the base model. Drawn from ``seed`` alone, never from the
    process's random state (serving's key stream must not move)."""
    rng = np.random.default_rng(seed)
    modules = {}
    for i in range(num_layers(shapes)):
        for path in spec.target_modules:
            out_f, in_f = shapes[(i, path)]
            bound = 1.0 / math.sqrt(in_f)
            a = rng.uniform(-bound, bound, (spec.rank, in_f)).astype(np.float32)
            b = np.zeros((out_f, spec.rank), np.float32)
            modules[(i, path)] = LoRAWeights(a=a, b=b, scale=spec.scale)
    return modules


def check_targets(shapes: ProjectionShapes, modules: LoRAModules) -> list[str]:
    """Problems with ``modules`` against the model's projections: unknown paths, layers or
    shapes."""
    problems = []
    for (i, path), w in sorted(modules.items()):
        if (i, path) not in shapes:
            problems.append(f"layer {i} has no projection {path!r} to adapt")
            continue
        out_f, in_f = shapes[(i, path)]
        if w.a.shape[1] != in_f or w.b.shape[0] != out_f or w.a.shape[0] != w.b.shape[1]:
            problems.append(
                f"layers.{i}.{path}: A {w.a.shape} and B {w.b.shape} do not fit [{out_f}, {in_f}]"
            )
    return problems


def num_layers(shapes: ProjectionShapes) -> int:
    return 1 + max((i for i, _ in shapes), default=-1)


def _has_projection(layer: nn.Module, path: str) -> bool:
    parent, name = path.split(".")
    return hasattr(layer, parent) and hasattr(getattr(layer, parent), name)


def base_projection(layer: nn.Module, path: str) -> nn.Module:
    """The base projection at ``path`` of a transformer block, unwrapped from the serving
    engine's per-slot LoRA layer if it has one."""
    parent, name = path.split(".")
    module = getattr(getattr(layer, parent), name)
    return getattr(module, "base", module)


def projection_shape(layer: nn.Module, path: str) -> tuple[int, int]:
    """(out_features, in_features) of a dense or affine-quantized projection."""
    linear = base_projection(layer, path)
    if hasattr(linear, "bits"):
        out_f, packed = linear.weight.shape
        return out_f, packed * 32 // linear.bits
    out_f, in_f = linear.weight.shape
    return out_f, in_f
