"""The served model seen for training: the same weights, its own LoRA, a whole-sequence pass.

``TrainingModel`` copies only the transformer blocks' module objects (shallow: a block, its
attention and MLP), and in the copies puts a ``TrainableLoRA`` around each target projection.
Every array (embeddings, norms, base projections, the head) is the served model's own, so the
view costs no weight memory, and the served model is never changed: its modules, its serving
LoRA slots and their per-step slot ids stay as they are, and a stream running beside training
computes exactly what it would alone.

The loss is the sum of the cross-entropy of every target token (``mask``), so that a step's
micro-batches add up to the loss of the whole batch when each is divided by the step's total
count of target tokens (``Trainer``).
"""

from __future__ import annotations

import copy

import mlx.core as mx
import mlx.nn as nn

from engine.lora.request import LoRAModules
from engine.models.attention import attention, attention_mask
from engine.models.base import CausalLM
from engine.training.lora import TrainableLoRA, base_projection

# Per layer: module path -> {"a": [r, in], "b": [out, r]}, float32. The trainable parameters.
LoRAParams = list[dict[str, dict[str, mx.array]]]


class WholeSequence:
    """The ``LayerCache`` of a training pass: every position of the batch at once from 0,
    causal (and windowed where the layer slides), nothing stored."""

    def __init__(self, window: int | None) -> None:
        self.window = window

    def rotate(self, rope: nn.Module, x: mx.array) -> mx.array:
        return rope(x, 0)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, *, scale: float) -> mx.array:
        mask = attention_mask(q.shape[2], 0, self.window)
        return attention(q, k, v, scale=scale, mask=mask)


class TrainingModel:
    """A training view of ``model`` adapting the modules of ``initial`` (their scales are
    fixed here; their weights are the starting point the trainer takes from ``params``)."""

    def __init__(self, model: CausalLM, initial: LoRAModules, dropout: float = 0.0) -> None:
        self.model = model
        self.blocks: list[nn.Module] = []
        self.loras: list[dict[str, TrainableLoRA]] = []
        for i, served in enumerate(model.model.layers):
            block = copy.copy(served)
            block.self_attn = copy.copy(served.self_attn)
            block.mlp = copy.copy(served.mlp)
            loras = {}
            for (layer, path), w in initial.items():
                if layer == i:
                    loras[path] = TrainableLoRA(base_projection(served, path), w.scale, dropout)
                    parent, name = path.split(".")
                    setattr(getattr(block, parent), name, loras[path])
            self.blocks.append(block)
            self.loras.append(loras)

    def loss(
        self,
        params: LoRAParams,
        tokens: mx.array,
        mask: mx.array,
        key: mx.array | None = None,
        checkpoint: bool = False,
    ) -> mx.array:
        """Summed cross-entropy of the target tokens. tokens: [B, S] int32 (right-padded);
        mask: [B, S] float32, 1 where the token is one to predict. ``key`` draws dropout;
        ``checkpoint`` recomputes each block in the backward pass instead of keeping its
        activations (less memory, about a third more compute)."""
        inputs, targets, weights = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
        h = self.model.model.embed_tokens(inputs)  # [B, S-1, hidden]
        keys = mx.random.split(key, len(self.blocks)) if key is not None else None
        for i in range(len(self.blocks)):
            layer = self._layer_fn(i, None if keys is None else keys[i])
            h = mx.checkpoint(layer)(h, params[i]) if checkpoint else layer(h, params[i])
        logits = self.model.logits(self.model.model.norm(h)).astype(mx.float32)  # [B, S-1, V]
        picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        ce = mx.logsumexp(logits, axis=-1) - picked  # [B, S-1]
        return (ce * weights).sum()

    def _layer_fn(self, i: int, key: mx.array | None):
        block, loras = self.blocks[i], self.loras[i]

        def run(h: mx.array, layer_params: dict[str, dict[str, mx.array]]) -> mx.array:
            subkeys = mx.random.split(key, max(len(loras), 1)) if key is not None else None
            for j, (path, lora) in enumerate(sorted(loras.items())):
                p = layer_params[path]
                lora.bind(p["a"], p["b"], None if subkeys is None else subkeys[j])
            return block(h, WholeSequence(block.window))

        return run
