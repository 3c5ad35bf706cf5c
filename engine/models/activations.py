"""Activations on the CPU without MLX's scalar transcendental loops.

MLX's CPU backend computes ``exp`` (hence ``sigmoid`` and ``silu``) one element at a time
(``simd::exp<float, 1>``, with ``fma`` called from libm): ~15 ns an element. In SmolLM2's prefill
of 16 prompts of 100 tokens that was a quarter of the time (`perf`: the fused SiLU kernel, its
``exp`` and libm's ``fmaf``). Written with multiplies, adds, a division and a clamp, and compiled
by ``mx.compile`` into one loop (built with the system's C++ compiler, or run op by op without
one), the same SwiGLU takes 8 ms instead of 39 ms for 1600x1536.

``tanh`` is the minimax rational approximation Eigen uses for float32 (x·P(x²)/Q(x²), clamped
where float32's tanh is ±1), within 3.2e-7 of it; ``silu(x) = x·(1 + tanh(x/2))/2``. The result
differs from the exact SiLU by at most 2e-7·max(1, |x|) (MLX's own: under 1e-7·|x|): for
large negative x, where SiLU is nearly 0, that error is larger than the value itself, as it is
for any float32 ``1 + tanh`` form. Other devices use MLX's own kernels.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn

_TANH_P = (
    -2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
    1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03,
)  # fmt: skip
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)
_TANH_CLAMP = 7.90531110763549805


def odd_rational(
    x: mx.array, clamp: float, p_coeffs: tuple[float, ...], q_coeffs: tuple[float, ...]
) -> mx.array:
    """x·P(x²)/Q(x²) on x clipped to [-clamp, clamp]; coefficients from the highest power."""
    x = mx.clip(x, -clamp, clamp)
    x2 = x * x
    p, q = p_coeffs[0], q_coeffs[0]
    for c in p_coeffs[1:]:
        p = p * x2 + c
    for c in q_coeffs[1:]:
        q = q * x2 + c
    return x * p / q


def _tanh(x: mx.array) -> mx.array:
    return odd_rational(x, _TANH_CLAMP, _TANH_P, _TANH_Q)


@mx.compile
def _swiglu_rational(gate: mx.array, up: mx.array) -> mx.array:
    return gate * (0.5 + 0.5 * _tanh(0.5 * gate)) * up


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up: the rational form on the CPU, MLX's elsewhere."""
    if mx.default_device() == mx.cpu:
        return _swiglu_rational(gate, up)
    return nn.silu(gate) * up


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameters), compiled into one loop after its reduction on the CPU.

    There MLX has no RMSNorm kernel: ``mx.fast.rms_norm`` inserts its composed fallback, eight
    nodes a call that each pay the CPU's per-node cost (2-9 us, more than the arithmetic at
    decode sizes). Compiled, the elementwise part after the mean is one node; the arithmetic is
    the fallback's, in the same order (float32, then the input's dtype, then the weight).
    """

    def __call__(self, x: mx.array) -> mx.array:
        if mx.default_device() == mx.cpu:
            return _rms_norm_cpu(self.eps)(x, self.weight)
        return super().__call__(x)


@functools.cache
def _rms_norm_cpu(eps: float):
    @mx.compile
    def rms_norm(x: mx.array, weight: mx.array) -> mx.array:
        xf = x.astype(mx.float32)
        normed = xf * mx.rsqrt(mx.mean(mx.square(xf), axis=-1, keepdims=True) + eps)
        return normed.astype(x.dtype) * weight

    return rms_norm
