"""What the engine needs to know of an adapter: which one, its rank, how to load its weights, and
the key under which its KV blocks and its device slot are shared.

The adapter store and the file formats live outside the engine; they hand the engine a
``LoRARequest`` whose ``load`` reads and validates the files when a slot first needs them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

# The projections a LoRA may target, by their Hugging Face module path inside a layer.
TARGETABLE = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass(frozen=True, slots=True)
class LoRAWeights:
    """One adapted projection of one layer: ``W x + scale * B (A x)``.

    a: [r, in_features]; b: [out_features, r] (PEFT's orientation), float32.
    """

    a: np.ndarray
    b: np.ndarray
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


# (layer index, module path from TARGETABLE) -> its weights; absent modules are not adapted.
LoRAModules = Mapping[tuple[int, str], LoRAWeights]


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """An adapter version as a request carries it.

    ``key`` identifies the weights and config (e.g. both digests): requests with equal keys share
    one device slot and their KV blocks; different keys never share either. ``load`` returns the
    modules; it runs on the engine thread, once per slot load.
    """

    name: str
    version: int
    key: str
    rank: int
    load: Callable[[], LoRAModules] = field(compare=False, repr=False)
