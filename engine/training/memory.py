"""What a training run needs in memory, and the micro-batch and checkpointing that fit a budget.

The weights, the KV cache and the adapter slots are allocated when the engine starts; what is
left on the device is what training may use (``--fine-tuning-memory`` caps it). A job is
planned against it when it is created: the largest micro-batch (halving from the batch size)
that fits, first without layer checkpointing, then with it; a job that does not fit even one
sequence with checkpointing is refused, with the numbers.

The estimate, per micro-batch of T = sequences × longest example tokens (bytes):
- adapter state: parameters, the step's gradients, their running sum, AdamW's m and v: 5 × 4 × P;
- per block, what its backward pass keeps: about 8 hidden-sized and 4 MLP-sized activations per
  token, the Q/K/V projections, and the attention probabilities (sequences × heads × S²) in
  float32;
- with checkpointing, only each block's input, plus one block's full activations while it is
  recomputed;
- logits and their gradient in float32: 3 × T × vocabulary.
It is an upper estimate, not a measurement: the error it must avoid is an out-of-memory crash.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import ModelConfig
from engine.memory import fmt


class TrainingTooLarge(ValueError):
    """No micro-batch of one sequence fits the training budget; the message has the numbers."""


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    micro_batch_size: int
    checkpoint_layers: bool
    nbytes: int  # the estimate for that choice


def training_bytes(
    cfg: ModelConfig, num_params: int, sequences: int, length: int, checkpoint: bool, act: int
) -> int:
    """The estimate above; ``act``: bytes per activation element (the model's dtype)."""
    tokens = sequences * length
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    per_block = tokens * (8 * cfg.hidden_size + 4 * cfg.intermediate_size + qkv) * act
    per_block += sequences * cfg.num_heads * length * length * 4
    if checkpoint:
        blocks = cfg.num_layers * tokens * cfg.hidden_size * act + per_block
    else:
        blocks = cfg.num_layers * per_block
    return 5 * 4 * num_params + blocks + 3 * tokens * cfg.vocab_size * 4


def plan_memory(
    cfg: ModelConfig, num_params: int, batch_size: int, length: int, budget: int, act: int
) -> MemoryPlan:
    """The largest micro-batch that fits ``budget``, without checkpointing if it can."""
    for checkpoint in (False, True):
        size = batch_size
        while size >= 1:
            need = training_bytes(cfg, num_params, size, length, checkpoint, act)
            if need <= budget:
                return MemoryPlan(size, checkpoint, need)
            size //= 2
    least = training_bytes(cfg, num_params, 1, length, True, act)
    raise TrainingTooLarge(
        f"training needs about {fmt(least)} (one sequence of {length} tokens at a time, "
        f"layers recomputed, {num_params:,} adapter parameters) and {fmt(budget)} is left for "
        "it beside the weights, the KV cache and the adapter slots: use a smaller rank, fewer "
        "target modules or shorter examples, or raise --fine-tuning-memory"
    )
