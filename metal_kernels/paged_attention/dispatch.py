"""Which paged decode attention runs: the device's kernel once it has proved itself, else the
reference.

Our CI has no GPU, so a kernel is trusted only after it agrees with the reference on this very
machine: the first call with a new signature (dtype, head dim, block size, GQA ratio, windowed
or not: what selects a compiled variant) first runs the kernel on small random cases of that
signature, through both of its paths (one split and several), and compares with the reference.
A disagreement or an exception is logged with its reason and that signature uses the reference
from then on: a wrong fast answer is worse than a slow right one.

``CANDLEWICK_PAGED_ATTENTION`` overrides: ``reference`` never runs a kernel; ``kernel`` runs it
without the check (for benchmarks and debugging) and fails if the device has none; ``auto``
(the default, also when unset) is the behaviour above.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from metal_kernels.paged_attention import reference
from metal_kernels.paged_attention.reference import random_case

log = logging.getLogger(__name__)

ENV_VAR = "CANDLEWICK_PAGED_ATTENTION"
MODES = ("auto", "reference", "kernel")
# max |kernel - reference| allowed, relative to max(1, |reference|), by dtype. The kernel
# accumulates in float32 and the reference in the dtype's SDPA, so bf16 carries two roundings.
TOLERANCE = {mx.float32: 1e-4, mx.float16: 4e-3, mx.bfloat16: 3e-2}

Kernel = Callable[..., mx.array]
SUPPORTED_DTYPES = (mx.float16, mx.bfloat16, mx.float32)


@dataclass(frozen=True, slots=True)
class Signature:
    """What picks a compiled kernel variant; each is checked once before it is trusted."""

    dtype: mx.Dtype
    head_dim: int
    block_size: int
    gqa: int
    windowed: bool


def self_check(kernel: Kernel, sig: Signature) -> str | None:
    """Why ``kernel`` cannot be trusted for ``sig`` (None when it agrees with the reference).

    One batch of three, lengths 0, 1 and three blocks plus two, run with the launch's own plan
    (several splits at this size), forced to one split (the path large batches take) and to
    three; a kernel that takes no ``num_splits`` runs with its own plan only.
    """
    window = 5 if sig.windowed else None
    lens = [0, 1, 3 * sig.block_size + 2]
    case = random_case(
        lens,
        num_kv_heads=2,
        gqa=sig.gqa,
        head_dim=sig.head_dim,
        block_size=sig.block_size,
        dtype=sig.dtype,
        window=window,
        seed=1234,
    )
    want = np.array(
        reference.paged_decode_attention(*case.args(), **case.kwargs()).astype(mx.float32)
    )
    variants = [{}, {"num_splits": 1}, {"num_splits": 3}] if takes_split_plans(kernel) else [{}]
    tol = TOLERANCE.get(sig.dtype, 1e-2)
    for extra in variants:
        got = np.array(kernel(*case.args(), **case.kwargs(), **extra).astype(mx.float32))
        if got.shape != want.shape:
            return f"output shape {got.shape} != reference {want.shape}"
        err = np.abs(got - want) / np.maximum(1.0, np.abs(want))
        err = np.where(np.isfinite(err), err, np.inf)  # NaN / inf count as infinitely wrong
        if err.max() > tol:
            worst = tuple(int(i) for i in np.unravel_index(np.argmax(err), err.shape))
            return (
                f"max relative error {err.max():.3g} > {tol:g} at [b, h, 0, d] = {worst} "
                f"({case.describe()}, {extra or 'default plan'})"
            )
    return None


def takes_split_plans(kernel: Kernel) -> bool:
    """Whether ``kernel`` takes a ``num_splits`` knob (the GPU kernels; not the CPU's path)."""
    params = inspect.signature(kernel).parameters
    return "num_splits" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def check_supported(q: mx.array, k_pool: mx.array) -> list[str]:
    """Every reason the kernels cannot take these shapes (empty when they can)."""
    problems = []
    if q.dtype not in SUPPORTED_DTYPES:
        problems.append(f"dtype {q.dtype} is not one of float16, bfloat16, float32")
    if k_pool.dtype != q.dtype:
        problems.append(f"pool dtype {k_pool.dtype} differs from q's {q.dtype}")
    if q.ndim != 4 or q.shape[2] != 1:
        problems.append(f"q must be [B, H, 1, D], got {q.shape}")
    elif q.shape[3] % 32 or q.shape[3] > 1024 or q.shape[3] != k_pool.shape[2]:
        problems.append(f"head dim {q.shape[3]}: need a multiple of 32, <= 1024, = the pool's")
    elif q.shape[1] % k_pool.shape[1]:
        problems.append(f"{q.shape[1]} query heads are not a multiple of {k_pool.shape[1]}")
    return problems


class PagedAttentionDispatcher:
    """Routes each call to the kernel or the reference; see the module docstring for the rule."""

    def __init__(self, backend: str, kernel: Kernel | None, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"{ENV_VAR}={mode!r}: expected one of {', '.join(MODES)}")
        if mode == "kernel" and kernel is None:
            raise ValueError(f"{ENV_VAR}=kernel, but the {backend} device has no kernel")
        self.backend, self.kernel, self.mode = backend, kernel, mode
        self.trusted: dict[Signature, bool] = {}

    def __call__(
        self,
        q: mx.array,
        k_pool: mx.array,
        v_pool: mx.array,
        block_tables: mx.array,
        seq_lens: mx.array,
        *,
        block_size: int,
        window: int | None,
        scale: float,
    ) -> mx.array:
        """q [B, H, 1, D], pools [slots, Hkv, D], tables [B, n], seq_lens [B] -> [B, H, 1, D]."""
        fn = self._choose(q, k_pool, block_size, window)
        return fn(
            q,
            k_pool,
            v_pool,
            block_tables,
            seq_lens,
            block_size=block_size,
            window=window,
            scale=scale,
        )

    def uses_kernel(self, sig: Signature) -> bool:
        """Whether calls of this signature run the kernel (checking it first if need be)."""
        if self.kernel is None or self.mode == "reference":
            return False
        if self.mode == "kernel":
            return True
        if sig not in self.trusted:
            try:
                why = self_check(self.kernel, sig)
            except Exception as exc:  # a compile error, a missing backend: same remedy
                why = f"{type(exc).__name__}: {exc}"
            if why is not None:
                log.warning(
                    "paged attention: the %s kernel disagrees with the reference for %s: %s; "
                    "using the reference for it from now on",
                    self.backend,
                    sig,
                    why,
                )
            self.trusted[sig] = why is None
        return self.trusted[sig]

    def _choose(self, q: mx.array, k_pool: mx.array, block_size: int, window: int | None) -> Kernel:
        if self.kernel is None or self.mode == "reference" or check_supported(q, k_pool):
            return reference.paged_decode_attention
        sig = Signature(
            q.dtype, q.shape[3], block_size, q.shape[1] // k_pool.shape[1], window is not None
        )
        return self.kernel if self.uses_kernel(sig) else reference.paged_decode_attention


def device_kernel() -> tuple[str, Kernel | None]:
    """The default device's kernel: Metal on a Metal GPU, CUDA on a CUDA GPU, and on the CPU
    the plain-MLX formulation that suits its ops (``cpu.py``)."""
    if mx.default_device().type != mx.gpu:
        from metal_kernels.paged_attention import cpu

        return "cpu", cpu.paged_decode_attention
    if mx.metal.is_available():
        from metal_kernels.paged_attention import metal

        return "metal", metal.paged_decode_attention
    if mx.cuda.is_available():
        from metal_kernels.paged_attention import cuda

        return "cuda", cuda.paged_decode_attention
    return "gpu", None


def mode_from_env() -> str:
    """``CANDLEWICK_PAGED_ATTENTION``, lower-cased; unset or empty means auto."""
    return os.environ.get(ENV_VAR, "").strip().lower() or "auto"


_dispatchers: dict[str, PagedAttentionDispatcher] = {}


def get_dispatcher() -> PagedAttentionDispatcher:
    """One dispatcher per default device, created on first use (reads the env var then)."""
    key = str(mx.default_device())
    if key not in _dispatchers:
        backend, kernel = device_kernel()
        _dispatchers[key] = PagedAttentionDispatcher(backend, kernel, mode_from_env())
    return _dispatchers[key]


def paged_decode_attention(
    q: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    block_tables: mx.array,
    seq_lens: mx.array,
    *,
    block_size: int,
    window: int | None,
    scale: float,
) -> mx.array:
    """The engine's entry point: the reference's contract, on the fastest trusted path."""
    return get_dispatcher()(
        q, k_pool, v_pool, block_tables, seq_lens, block_size=block_size, window=window, scale=scale
    )
