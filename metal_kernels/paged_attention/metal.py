"""Paged decode attention as a Metal kernel, and the launch logic its CUDA twin shares.

The kernel body is written once, in C++ that both Metal and CUDA accept; each backend supplies
a few macros (shared memory, barrier, shuffle, exp, row load) and a prologue naming its thread
and block indices. So the CUDA parity runs check Metal's algorithm too; only the macros differ,
and the dispatcher checks the Metal build on first use. The design is in README.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import mlx.core as mx

THREADS = 128  # per threadgroup, both kernels
NUM_WARPS = THREADS // 32
TARGET_THREADGROUPS = 512  # measured on an H200: 2048 (shorter last wave) ran slower
MIN_TOKENS_PER_SPLIT = 64
MAX_SPLITS = 64
UNROLL = 2  # tokens in flight per token group

# Inputs: q [B, H, D], k_pool/v_pool [slots, Hkv, D], block_tables [B, n], seq_lens [B],
# params [3] int32 = (window or 0, num_splits, block_size), scale [1] float32.
_ATTEND_BODY = """
  constexpr int E = HD / TPG, GPW = 32 / TPG, NG = NW * GPW, NT = NW * 32;
  PA_SHARED float sm_m[NG * HPB];  // per token group: running max, sum
  PA_SHARED float sm_l[NG * HPB];
  PA_SHARED float sm_o[NG * HD];   // per token group: one head's accumulator
  const int lane = tid % 32, grp = (tid / 32) * GPW + lane / TPG, gl = lane % TPG;
  const int H = q_shape[1], Hkv = k_pool_shape[1], n = block_tables_shape[1];
  const int G = H / Hkv, HG = G / HPB;
  const int hg = row % HG, kvh = (row / HG) % Hkv, b = row / (HG * Hkv);
  const int h0 = kvh * G + hg * HPB;  // first query head of this threadgroup
  const int window = params[0], nsplit = params[1], BS = params[2];
  const int len = seq_lens[b];
  // Visible tokens [lo, hi): the window's start to the length, clamped to the table.
  const int hi = len < n * BS ? len : n * BS;
  const int lo = (window > 0 && len - window > 0) ? len - window : 0;
  const int chunk = ((hi > lo ? hi - lo : 0) + nsplit - 1) / nsplit;  // this split's share
  const int t_begin = lo + split * chunk, t_end = (t_begin + chunk < hi) ? t_begin + chunk : hi;

  float qr[HPB][E], acc[HPB][E], m[HPB], l[HPB];
  for (int h = 0; h < HPB; ++h) {
    m[h] = -1e30f, l[h] = 0.0f;
    PA_LOAD_ROW(qr[h], q, (int64_t)(b * H + h0 + h) * HD + gl * E);
    for (int i = 0; i < E; ++i) qr[h][i] *= scale[0], acc[h][i] = 0.0f;
  }

  // UNR tokens per token group per step: their loads are all issued before any is used.
  const int64_t tok_stride = (int64_t)Hkv * HD, head_off = (int64_t)kvh * HD + gl * E;
  for (int tb = t_begin; tb < t_end; tb += NG * UNR) {
    float kr[UNR][E], vr[UNR][E];
    bool valid[UNR];
#pragma unroll
    for (int u = 0; u < UNR; ++u) {
      const int t = tb + u * NG + grp;
      valid[u] = t < t_end;
      if (valid[u]) {
        const int64_t slot = (int64_t)block_tables[(int64_t)b * n + t / BS] * BS + t % BS;
        PA_LOAD_ROW(kr[u], k_pool, slot * tok_stride + head_off);
        PA_LOAD_ROW(vr[u], v_pool, slot * tok_stride + head_off);
      } else {
        for (int i = 0; i < E; ++i) kr[u][i] = vr[u][i] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < UNR; ++u) {
#pragma unroll
      for (int h = 0; h < HPB; ++h) {
        float s = 0.0f;
        for (int i = 0; i < E; ++i) s += qr[h][i] * kr[u][i];
        for (int off = TPG / 2; off > 0; off /= 2) s += PA_SHFL_XOR(s, off);
        if (valid[u]) {
          const float m_new = PA_FMAX(m[h], s), c = PA_EXP(m[h] - m_new), p = PA_EXP(s - m_new);
          l[h] = l[h] * c + p;
          for (int i = 0; i < E; ++i) acc[h][i] = acc[h][i] * c + p * vr[u][i];
          m[h] = m_new;
        }
      }
    }
  }

#pragma unroll
  for (int h = 0; h < HPB; ++h) {
    if (gl == 0) sm_m[grp * HPB + h] = m[h];
    if (gl == 0) sm_l[grp * HPB + h] = l[h];
  }
  PA_BARRIER();
#pragma unroll  // a rolled loop would index acc[h] dynamically and move it to memory
  for (int h = 0; h < HPB; ++h) {
    float M = -1e30f;
    for (int g = 0; g < NG; ++g) M = PA_FMAX(M, sm_m[g * HPB + h]);
    float L = 0.0f;
    for (int g = 0; g < NG; ++g) L += sm_l[g * HPB + h] * PA_EXP(sm_m[g * HPB + h] - M);
    const float f = PA_EXP(m[h] - M);
    for (int i = 0; i < E; ++i) sm_o[grp * HD + gl * E + i] = acc[h][i] * f;
    PA_BARRIER();
    const int64_t orow = (int64_t)(b * H + h0 + h);
    for (int d = tid; d < HD; d += NT) {
      float o = 0.0f;
      for (int g = 0; g < NG; ++g) o += sm_o[g * HD + d];
      EPILOGUE;
    }
    PA_BARRIER();
  }
"""

_DIRECT_EPILOGUE = "out[orow * HD + d] = static_cast<T>(L > 0.0f ? o / L : 0.0f)"
_SPLIT_EPILOGUE = """const int64_t at = orow * nsplit + split;
      part_o[at * HD + d] = o;
      if (d == 0) { part_ml[at * 2] = M; part_ml[at * 2 + 1] = L; }"""

# Inputs: part_o [B*H, S, D], part_ml [B*H, S, 2] float32, params as above. One threadgroup per
# (sequence, query head); rows whose every split is empty (L == 0) come out as zeros.
_REDUCE_BODY = """
  const int nsplit = params[1];
  const int64_t base = (int64_t)row * nsplit;
  PA_SHARED float w[MAXS];  // each split's weight exp(m_s - M)
  float M = -1e30f, L = 0.0f;
  for (int s = 0; s < nsplit; ++s) M = PA_FMAX(M, part_ml[(base + s) * 2]);
  for (int s = 0; s < nsplit; ++s) {
    const float ws = PA_EXP(part_ml[(base + s) * 2] - M);
    L += part_ml[(base + s) * 2 + 1] * ws;
    if (s % NT == tid) w[s] = ws;
  }
  PA_BARRIER();
  for (int d = tid; d < HD; d += NT) {
    float o = 0.0f;
    for (int s = 0; s < nsplit; ++s) o += part_o[(base + s) * HD + d] * w[s];
    out[(int64_t)row * HD + d] = static_cast<T>(L > 0.0f ? o / L : 0.0f);
  }
"""

METAL_HEADER = """
#define PA_SHARED threadgroup
#define PA_BARRIER() threadgroup_barrier(metal::mem_flags::mem_threadgroup)
#define PA_SHFL_XOR(v, o) metal::simd_shuffle_xor((v), (ushort)(o))
#define PA_EXP(x) metal::exp(x)
#define PA_FMAX(a, b) metal::fmax((a), (b))
#define PA_LOAD_ROW(dst, src, off) \\
  for (int i_ = 0; i_ < E; ++i_) dst[i_] = static_cast<float>(src[(off) + i_])
"""

METAL_PROLOGUE = """
  const int tid = int(thread_position_in_threadgroup.x);
  const int row = int(threadgroup_position_in_grid.x);
  const int split = int(threadgroup_position_in_grid.y);
"""


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """How one call is cut up: TPG lanes per token, HPB query heads per threadgroup, splits."""

    tpg: int
    hpb: int
    num_splits: int
    unroll: int = UNROLL

    @staticmethod
    def choose(*, head_dim: int, gqa: int, rows: int, max_tokens: int) -> LaunchPlan:
        """Small token groups (E <= 8 elements a lane) keep the per-token shuffle cost low;
        HPB * E <= 32 bounds the registers held for queries and accumulators. Splits are added
        until the GPU has ~TARGET_THREADGROUPS threadgroups, but never so many that a split of
        the table's width holds fewer than MIN_TOKENS_PER_SPLIT tokens."""
        tpg = next((t for t in (2, 4, 8, 16) if head_dim % t == 0 and head_dim // t <= 8), 32)
        e = head_dim // tpg
        hpb = max(h for h in range(1, gqa + 1) if gqa % h == 0 and (h * e <= 32 or h == 1))
        groups = rows * (gqa // hpb)
        wanted = -(-TARGET_THREADGROUPS // max(groups, 1))
        splits = min(wanted, max(1, max_tokens // MIN_TOKENS_PER_SPLIT), MAX_SPLITS)
        return LaunchPlan(tpg=tpg, hpb=hpb, num_splits=splits)


@dataclass(frozen=True, slots=True)
class KernelBackend:
    """What differs between Metal and CUDA: the kernel factory and a few lines of source."""

    make_kernel: Callable
    header: str
    prologue: str


@functools.lru_cache(maxsize=256)
def _constants(
    window: int, splits: int, block_size: int, scale: float
) -> tuple[mx.array, mx.array]:
    """The kernel's scalar inputs as device arrays, made once per value rather than per call."""
    return mx.array([window, splits, block_size], dtype=mx.int32), mx.array([scale], mx.float32)


class PagedAttentionKernel:
    """The kernels of one backend, compiled per template on first use, behind one signature."""

    def __init__(self, backend: KernelBackend):
        self.backend = backend
        attend = ["q", "k_pool", "v_pool", "block_tables", "seq_lens", "params", "scale"]
        direct = _ATTEND_BODY.replace("EPILOGUE", _DIRECT_EPILOGUE)
        split = _ATTEND_BODY.replace("EPILOGUE", _SPLIT_EPILOGUE)
        specs = {
            "direct": (attend, ["out"], direct),
            "split": (attend, ["part_o", "part_ml"], split),
            "reduce": (["part_o", "part_ml", "params"], ["out"], _REDUCE_BODY),
        }
        self._kernels = {
            key: backend.make_kernel(
                name=f"cw_paged_attn_{key}",
                input_names=ins,
                output_names=outs,
                source=backend.prologue + body,
                header=backend.header,
            )
            for key, (ins, outs, body) in specs.items()
        }

    def _launch(self, key: str, inputs, template, grid_x: int, grid_y: int, outputs) -> list:
        """Grid sizes count threads (MLX's convention); threadgroups are 1-D, THREADS wide."""
        return self._kernels[key](
            inputs=inputs,
            template=template,
            grid=(grid_x, grid_y, 1),
            threadgroup=(THREADS, 1, 1),
            output_shapes=[shape for shape, _ in outputs],
            output_dtypes=[dtype for _, dtype in outputs],
        )

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
        num_splits: int | None = None,
        unroll: int | None = None,
    ) -> mx.array:
        """Same contract as the reference; ``num_splits`` and ``unroll`` override the plan."""
        B, H, _, D = q.shape
        Hkv = k_pool.shape[1]
        assert D % 32 == 0 and H % Hkv == 0, "the dispatcher sends only supported shapes"
        if B == 0:
            return mx.zeros(q.shape, q.dtype)
        rows = B * Hkv
        max_tokens = block_tables.shape[1] * block_size
        plan = LaunchPlan.choose(head_dim=D, gqa=H // Hkv, rows=rows, max_tokens=max_tokens)
        if num_splits or unroll:
            splits = min(num_splits or plan.num_splits, MAX_SPLITS)
            plan = replace(plan, num_splits=splits, unroll=unroll or plan.unroll)
        S = plan.num_splits
        params, scale_arr = _constants(window or 0, S, block_size, scale)
        tables, lens = (
            a if a.dtype == mx.int32 else a.astype(mx.int32) for a in (block_tables, seq_lens)
        )
        inputs = [q.reshape(B, H, D), k_pool, v_pool, tables, lens, params, scale_arr]
        tpl = [("T", q.dtype), ("HD", D), ("TPG", plan.tpg), ("HPB", plan.hpb), ("NW", NUM_WARPS)]
        tpl.append(("UNR", plan.unroll))
        grid_x = THREADS * rows * ((H // Hkv) // plan.hpb)
        out_spec = [((B, H, D), q.dtype)]
        if S == 1:
            (out,) = self._launch("direct", inputs, tpl, grid_x, 1, out_spec)
            return out.reshape(B, H, 1, D)
        parts = [((B * H, S, D), mx.float32), ((B * H, S, 2), mx.float32)]
        part_o, part_ml = self._launch("split", inputs, tpl, grid_x, S, parts)
        tpl = [("T", q.dtype), ("HD", D), ("MAXS", MAX_SPLITS), ("NT", THREADS)]
        (out,) = self._launch(
            "reduce", [part_o, part_ml, params], tpl, THREADS * B * H, 1, out_spec
        )
        return out.reshape(B, H, 1, D)


METAL = KernelBackend(
    make_kernel=mx.fast.metal_kernel, header=METAL_HEADER, prologue=METAL_PROLOGUE
)
_kernel: PagedAttentionKernel | None = None


def paged_decode_attention(*args, **kwargs) -> mx.array:
    """The Metal kernel (same arguments as the reference). Needs a Metal GPU."""
    global _kernel
    if _kernel is None:
        _kernel = PagedAttentionKernel(METAL)
    return _kernel(*args, **kwargs)
