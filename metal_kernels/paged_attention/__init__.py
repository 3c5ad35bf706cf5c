"""Paged decode attention: a Metal kernel, its CUDA twin, the plain-MLX reference, a dispatcher.

The engine calls ``paged_decode_attention`` (the dispatcher); see README.md for the contract.
"""

from __future__ import annotations

from metal_kernels.paged_attention.dispatch import (
    PagedAttentionDispatcher,
    get_dispatcher,
    paged_decode_attention,
)
from metal_kernels.paged_attention.reference import gather_kv
from metal_kernels.paged_attention.reference import (
    paged_decode_attention as reference_paged_decode_attention,
)

__all__ = [
    "PagedAttentionDispatcher",
    "gather_kv",
    "get_dispatcher",
    "paged_decode_attention",
    "reference_paged_decode_attention",
]
