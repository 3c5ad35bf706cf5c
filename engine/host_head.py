"""The language-model head for one sampled row on the CPU, as one BLAS matrix-vector product.

MLX multiplies ``x @ W.T`` with ``cblas_sgemm`` even when ``x`` is a single row, and OpenBLAS
packs the whole of ``W`` (vocabulary x hidden) into its own layout on every such call before
multiplying: a 32000 x 512 float32 head (65 MB) took 5.2 ms a token on 2 cores that way, where
``cblas_sgemv`` reads it once in place: 2.5 ms (docs/benchmarks.md). One sequence decoding
samples one row a step, so this is most of what one stream's step spends beyond its layers.

Only where it applies exactly: the CPU, a dense float32 head (``lm_head`` without bias, or the
tied embedding), and a real BLAS providing ``cblas_sgemv`` in the global scope (the library
MLX's own matmuls resolve to, so it runs with the threads the engine gives that library). The
hidden row is evaluated first: on the CPU each layer's attention already waits for its scores.
Where the CLI preloaded the CPU kernels library (`metal_kernels.cpu_kernels`), MLX's own head
product already goes by sgemv, without the wait for the row, and this declines (measured: 13.5
against 15.2 ms a one-sequence step of a 50M llama on 2 cores).
"""

from __future__ import annotations

import ctypes
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from metal_kernels import cpu_kernels

_ROW_MAJOR, _NO_TRANS = 101, 111
_F32_P = ctypes.POINTER(ctypes.c_float)


def cblas_sgemv(library: ctypes.CDLL | None = None) -> Any | None:
    """``cblas_sgemv`` of ``library`` (default: the global scope, where MLX looks first), with
    its argument types set; None where it has none."""
    try:
        fn = (library or ctypes.CDLL(None)).cblas_sgemv
    except AttributeError:
        return None
    i, f = ctypes.c_int, ctypes.c_float
    fn.argtypes = [i, i, i, i, f, _F32_P, i, _F32_P, i, f, _F32_P, i]
    fn.restype = None
    return fn


class HostHead:
    """``head(row)``: the logits [1, V] of one hidden row [1, D], as ``W @ row`` by ``sgemv``."""

    def __init__(self, weight: np.ndarray, sgemv: Any) -> None:
        self.weight = weight  # [V, D] float32, C-contiguous (kept: sgemv reads it in place)
        self.vocab, self.dim = weight.shape
        self._sgemv = sgemv
        self._w = self.weight.ctypes.data_as(_F32_P)

    @classmethod
    def for_model(cls, model: Any, sgemv: Any | None = None) -> HostHead | None:
        """The host head for ``model``'s language-model head, or None where it does not apply
        (not the CPU, a head that is not a dense float32 matrix, no ``cblas_sgemv``, or the
        CPU kernels library answering MLX's one-row products by sgemv already)."""
        if mx.default_device() != mx.cpu or cpu_kernels.loaded() is not None:
            return None
        if model.config.tie_word_embeddings:
            layer = model.model.embed_tokens
            if type(layer) is not nn.Embedding:  # e.g. a quantized embedding
                return None
        else:
            layer = getattr(model, "lm_head", None)
            if type(layer) is not nn.Linear or "bias" in layer:
                return None
        if layer.weight.dtype != mx.float32 or layer.weight.ndim != 2:
            return None
        if (sgemv := sgemv or cblas_sgemv()) is None:
            return None
        mx.eval(layer.weight)
        weight = np.asarray(layer.weight)  # the MLX array's own memory where it can: no copy
        if not weight.flags.c_contiguous:
            return None
        return cls(weight, sgemv)

    def __call__(self, row: mx.array) -> mx.array:
        x = np.ascontiguousarray(np.asarray(row.astype(mx.float32)).reshape(self.dim))
        y = np.empty(self.vocab, np.float32)
        self._sgemv(
            _ROW_MAJOR, _NO_TRANS, self.vocab, self.dim, 1.0, self._w, self.dim,
            x.ctypes.data_as(_F32_P), 1, 0.0, y.ctypes.data_as(_F32_P), 1,
        )  # fmt: skip
        return mx.array(y)[None]
