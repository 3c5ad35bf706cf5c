"""Paged decode attention on MLX's CUDA backend: the Metal kernel's twin.

The kernel body and launch logic live in ``metal.py`` and are shared verbatim; only the macros
below (shared memory, barrier, warp shuffle, exp2) and the thread/block index prologue differ.
``mx.fast.cuda_kernel`` wraps the body in ``__global__ void ...(inputs, outputs)``, turns the
template list into ``constexpr``/``using`` lines, and launches grid / threadgroup blocks.
"""

from __future__ import annotations

import mlx.core as mx

from metal_kernels.paged_attention.metal import KernelBackend, PagedAttentionKernel

CUDA_HEADER = """
#define PA_SHARED __shared__
#define PA_BARRIER() __syncthreads()
#define PA_SHFL_XOR(v, o) __shfl_xor_sync(0xffffffffu, (v), (o))
#define PA_EXP2(x) exp2f(x)
#define PA_FMAX(a, b) fmaxf((a), (b))
#define PA_LOAD_ROW(dst, src, off) pa_load_row<E>(dst, (src) + (off))

// E contiguous elements as float: 16-byte loads when they fill whole 16-byte words at an aligned
// address (E = 8 for head dims 64, 128, 256 in every dtype; MLX's buffers are aligned), else one
// at a time.
template <int N, typename T>
__device__ __forceinline__ void pa_load_row(float (&dst)[N], const T* src) {
  constexpr int V = 16 / sizeof(T);
  if constexpr (N % V == 0) {
    if ((reinterpret_cast<uintptr_t>(src) & 15) == 0) {
#pragma unroll
      for (int j = 0; j < N / V; ++j) {
        const uint4 raw = reinterpret_cast<const uint4*>(src)[j];
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < V; ++i) dst[j * V + i] = static_cast<float>(e[i]);
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i) dst[i] = static_cast<float>(src[i]);
}
"""

CUDA_PROLOGUE = """
  const int tid = threadIdx.x;
  const int row = blockIdx.x;
  const int split = blockIdx.y;
"""


def _backend() -> KernelBackend:
    return KernelBackend(
        make_kernel=mx.fast.cuda_kernel, header=CUDA_HEADER, prologue=CUDA_PROLOGUE
    )


_kernel: PagedAttentionKernel | None = None


def paged_decode_attention(*args, **kwargs) -> mx.array:
    """The CUDA kernel (same arguments as the reference). Needs MLX's CUDA backend."""
    global _kernel
    if _kernel is None:
        _kernel = PagedAttentionKernel(_backend())
    return _kernel(*args, **kwargs)
