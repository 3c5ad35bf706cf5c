"""Megatron-style tensor parallelism: each rank keeps a slice of every attention and MLP
projection, and one ``all_sum`` per attention and one per MLP rebuilds the full activations.

- q/k/v and gate/up are column-parallel: a rank keeps its rows of the weight (its query heads,
  its KV heads, its share of the intermediate features) and computes its part of the output.
- o and down are row-parallel: a rank keeps the matching columns, multiplies its part of the
  input, and the partial results are summed across ranks (``all_sum``); a bias is added once,
  after the sum.
- KV heads are split when there are at least as many as ranks; with fewer (GQA), each rank keeps
  the one KV head its query heads read, so a KV head is replicated on ``ranks / kv_heads`` ranks
  (vLLM does the same). The KV pool of each rank then holds only its own heads.
- The embedding, the final norm and the language-model head are replicated. Every rank then
  computes the full logits from the same summed hidden states and samples them identically
  (same keys, same order), so no token ever has to travel between ranks; the price is a copy
  of the embedding (and head) on every rank.
- Quantized layers (MLX affine groups, GGUF sub-blocks) are sliced along their groups: a column
  slice takes whole rows; a row slice must start and end on a group boundary of every packed
  tensor (weight codes, scales, biases, super-block scales), otherwise sharding fails with the
  layer's name.
- A LoRA adapter on a sharded projection is sliced to match: B's columns for a column-parallel
  layer, A's rows for a row-parallel one (whose low-rank update then joins the same sum).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn

from engine.config import ConfigError, ModelConfig
from engine.models.base import CausalLM


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """What rank ``rank`` of ``size`` keeps: heads, KV heads and MLP features as [start, stop)."""

    rank: int
    size: int
    heads: tuple[int, int]
    kv_heads: tuple[int, int]
    features: tuple[int, int]

    @classmethod
    def for_rank(cls, cfg: ModelConfig, rank: int, size: int) -> ShardPlan:
        H, Hkv, inter = cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
        problems = []
        if H % size:
            problems.append(f"{H} attention heads do not split over {size} ranks")
        if Hkv % size and size % Hkv:
            problems.append(
                f"{Hkv} KV heads neither split over {size} ranks nor divide them (replication)"
            )
        if inter % size:
            problems.append(f"intermediate size {inter} does not split over {size} ranks")
        if problems:
            raise ConfigError("cannot shard the model: " + "; ".join(problems))
        h = H // size
        if Hkv >= size:
            kv = Hkv // size
            kv_heads = (rank * kv, (rank + 1) * kv)
        else:  # one KV head per rank: the one this rank's query heads read
            first = (rank * h) // (H // Hkv)
            kv_heads = (first, first + 1)
        f = inter // size
        return cls(rank, size, (rank * h, (rank + 1) * h), kv_heads, (rank * f, (rank + 1) * f))

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The shapes one rank's layers and KV pool have."""
        return replace(
            cfg,
            num_heads=self.heads[1] - self.heads[0],
            num_kv_heads=self.kv_heads[1] - self.kv_heads[0],
            intermediate_size=self.features[1] - self.features[0],
        )


class ColumnParallel(nn.Module):
    """Output features ``start .. stop`` of a projection (the input is whole on every rank)."""

    def __init__(self, inner: nn.Module, start: int, stop: int) -> None:
        super().__init__()
        self.inner = inner
        self._span = (start, stop)

    def __call__(self, x: mx.array) -> mx.array:
        return self.inner(x)

    def shard_lora(self, a: mx.array, b: mx.array) -> tuple[mx.array, mx.array]:
        """a [in, r], b [r, out] of the whole layer -> this rank's: b's columns."""
        start, stop = self._span
        return a, b[:, start:stop]


class RowParallel(nn.Module):
    """Input features ``start .. stop`` of a projection: partial outputs summed over ranks."""

    def __init__(self, inner: nn.Module, start: int, stop: int, group, bias) -> None:
        super().__init__()
        self.inner = inner
        if bias is not None:
            self.bias = bias
        self._span = (start, stop)
        self._group = group

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.distributed.all_sum(self.inner(x), group=self._group)
        return y + self.bias if "bias" in self else y

    def shard_lora(self, a: mx.array, b: mx.array) -> tuple[mx.array, mx.array]:
        """a [in, r], b [r, out] of the whole layer -> this rank's: a's rows."""
        start, stop = self._span
        return a[start:stop], b


def shard_model(model: CausalLM, group) -> ModelConfig:
    """Replace ``model``'s projections, in place, by this rank's slices; returns (and sets as
    ``model.config``) the per-rank configuration. The full weights are released."""
    full = model.config
    plan = ShardPlan.for_rank(full, group.rank(), group.size())
    D = full.head_dim
    heads = (plan.heads[0] * D, plan.heads[1] * D)
    kv = (plan.kv_heads[0] * D, plan.kv_heads[1] * D)
    local = plan.local_config(full)
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        where = f"model.layers.{i}"
        attn.q_proj = ColumnParallel(_rows(attn.q_proj, *heads), *heads)
        attn.k_proj = ColumnParallel(_rows(attn.k_proj, *kv), *kv)
        attn.v_proj = ColumnParallel(_rows(attn.v_proj, *kv), *kv)
        attn.o_proj = _row_parallel(attn.o_proj, heads, full.num_heads * D, group, where + ".o")
        attn.num_heads, attn.num_kv_heads = local.num_heads, local.num_kv_heads
        mlp.gate_proj = ColumnParallel(_rows(mlp.gate_proj, *plan.features), *plan.features)
        mlp.up_proj = ColumnParallel(_rows(mlp.up_proj, *plan.features), *plan.features)
        mlp.down_proj = _row_parallel(
            mlp.down_proj, plan.features, full.intermediate_size, group, where + ".down"
        )
    model.config = local
    mx.eval(model.parameters())
    return local


def _arrays(module: nn.Module) -> dict[str, mx.array]:
    return {k: v for k, v in module.items() if isinstance(v, mx.array)}


def _rows(module: nn.Module, start: int, stop: int) -> nn.Module:
    """Keep output features start..stop: rows of every tensor (weight, scales, biases, bias)."""
    for name, value in _arrays(module).items():
        setattr(module, name, mx.contiguous(value[start:stop]))
    return module


def _row_parallel(module: nn.Module, span, in_features: int, group, where: str) -> RowParallel:
    """Keep input features span: the matching columns of every 2-D tensor, each cut on its
    own packing (codes per word, elements per scale); the bias moves after the sum."""
    start, stop = span
    bias = module.bias if "bias" in module else None
    if bias is not None:
        del module["bias"]
    for name, value in _arrays(module).items():
        cols = value.shape[1]
        lo, hi = start * cols, stop * cols
        if lo % in_features or hi % in_features:
            raise ConfigError(
                f"cannot shard {where}: its {name} packs {in_features // cols if cols else 0} "
                f"inputs per column and the rank's inputs {start}..{stop} do not start and "
                "end on a group boundary"
            )
        setattr(module, name, mx.contiguous(value[:, lo // in_features : hi // in_features]))
    return RowParallel(module, start, stop, group, bias)
