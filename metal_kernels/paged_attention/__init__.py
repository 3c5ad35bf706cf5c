"""Paged decode attention: a Metal kernel, its CUDA twin, the plain-MLX reference, a dispatcher.

The engine calls ``paged_decode_attention`` (the dispatcher); see README.md for the contract.
"""

from __future__ import annotations

from metal_kernels.paged_attention.cpu import (
    numpy_masked_softmax,
    paged_decode_attention_head_major,
)
from metal_kernels.paged_attention.dispatch import (
    PagedAttentionDispatcher,
    get_dispatcher,
    paged_decode_attention,
)
from metal_kernels.paged_attention.reference import gather_kv, gather_kv_head_major
from metal_kernels.paged_attention.reference import (
    paged_decode_attention as reference_paged_decode_attention,
)

__all__ = [
    "PagedAttentionDispatcher",
    "gather_kv",
    "gather_kv_head_major",
    "get_dispatcher",
    "numpy_masked_softmax",
    "paged_decode_attention",
    "paged_decode_attention_head_major",
    "reference_paged_decode_attention",
]
