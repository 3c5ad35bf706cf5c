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
MAX_SPLITS = 128  # the reduce gives each split one thread: at most THREADS
UNROLL = 2  # tokens in flight per token group

# Inputs: q [B, H, D], k_pool/v_pool [slots, Hkv, D], block_tables [B, n], seq_lens [B],
# params [2] int32 = (window or 0, num_splits), scale [1] float32. The block size BS is a template
# constant: t / BS and t % BS become shifts and masks rather than integer divisions.
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
  const int window = params[0], nsplit = params[1];
  const int len = seq_lens[b];
  // Visible tokens [lo, hi): the window's start to the length, clamped to the table.
  const int hi = len < n * BS ? len : n * BS;
  const int lo = (window > 0 && len - window > 0) ? len - window : 0;
  const int chunk = ((hi > lo ? hi - lo : 0) + nsplit - 1) / nsplit;  // this split's share
  const int t_begin = lo + split * chunk, t_end = (t_begin + chunk < hi) ? t_begin + chunk : hi;

  // Scores in log2 units: q carries scale * log2(e), so softmax weights are exp2 (one
  // instruction on both GPUs) of score differences; m and l (and the splits' (m, l)) are too.
  const float qscale = scale[0] * 1.4426950408889634f;
  float qr[HPB][E], acc[HPB][E], m[HPB], l[HPB];
  for (int h = 0; h < HPB; ++h) {
    m[h] = -1e30f, l[h] = 0.0f;
    PA_LOAD_ROW(qr[h], q, (int64_t)(b * H + h0 + h) * HD + gl * E);
    for (int i = 0; i < E; ++i) qr[h][i] *= qscale, acc[h][i] = 0.0f;
  }

  // UNR tokens per token group per step: their loads are all issued before any is used, and
  // the next step's slots are read from the block table while this step computes.
  const int64_t tok_stride = (int64_t)Hkv * HD, head_off = (int64_t)kvh * HD + gl * E;
  const auto table = block_tables + (int64_t)b * n;  // keeps Metal's address space
  int64_t slot[UNR];
#pragma unroll
  for (int u = 0; u < UNR; ++u) {
    const int t = t_begin + u * NG + grp;
    slot[u] = t < t_end ? (int64_t)table[t / BS] * BS + t % BS : 0;
  }
  for (int tb = t_begin; tb < t_end; tb += NG * UNR) {
    float kr[UNR][E], vr[UNR][E];
    bool valid[UNR];
#pragma unroll
    for (int u = 0; u < UNR; ++u) {
      valid[u] = tb + u * NG + grp < t_end;
      if (valid[u]) {
        PA_LOAD_ROW(kr[u], k_pool, slot[u] * tok_stride + head_off);
        PA_LOAD_ROW(vr[u], v_pool, slot[u] * tok_stride + head_off);
      } else {
        for (int i = 0; i < E; ++i) kr[u][i] = vr[u][i] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < UNR; ++u) {
      const int t = tb + NG * UNR + u * NG + grp;
      slot[u] = t < t_end ? (int64_t)table[t / BS] * BS + t % BS : 0;
    }
    // One softmax update per head for the UNR tokens together: a single rescale of the
    // accumulator per step instead of one per token. Scores are in log2 units (see qr).
#pragma unroll
    for (int h = 0; h < HPB; ++h) {
      float s[UNR], m_new = m[h];
#pragma unroll
      for (int u = 0; u < UNR; ++u) {
        s[u] = 0.0f;
        for (int i = 0; i < E; ++i) s[u] += qr[h][i] * kr[u][i];
        for (int off = TPG / 2; off > 0; off /= 2) s[u] += PA_SHFL_XOR(s[u], off);
        if (valid[u]) m_new = PA_FMAX(m_new, s[u]);
      }
      const float c = PA_EXP2(m[h] - m_new);
      float p[UNR], psum = 0.0f;
#pragma unroll
      for (int u = 0; u < UNR; ++u) p[u] = valid[u] ? PA_EXP2(s[u] - m_new) : 0.0f, psum += p[u];
      l[h] = l[h] * c + psum;
      for (int i = 0; i < E; ++i) {
        float a = acc[h][i] * c;
#pragma unroll
        for (int u = 0; u < UNR; ++u) a += p[u] * vr[u][i];
        acc[h][i] = a;
      }
      m[h] = m_new;
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
    for (int g = 0; g < NG; ++g) L += sm_l[g * HPB + h] * PA_EXP2(sm_m[g * HPB + h] - M);
    const float f = PA_EXP2(m[h] - M);
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
# (sequence, query head); rows whose every split is empty (L == 0) come out as zeros. Thread s
# reads split s's (m, l) (NT >= MAXS), so M and L are two block reductions rather than serial
# loops over the splits; the weighted sum over splits is shared among the warps.
_REDUCE_BODY = """
  const int nsplit = params[1], lane = tid % 32, warp = tid / 32;
  const int64_t base = (int64_t)row * nsplit;
  PA_SHARED float w[MAXS];  // each split's weight exp(m_s - M)
  PA_SHARED float red[NT / 32];
  const bool mine = tid < nsplit;
  const float ms = mine ? part_ml[(base + tid) * 2] : -1e30f;
  const float ls = mine ? part_ml[(base + tid) * 2 + 1] : 0.0f;
  float M = ms;
  for (int off = 16; off > 0; off /= 2) M = PA_FMAX(M, PA_SHFL_XOR(M, off));
  if (lane == 0) red[warp] = M;
  PA_BARRIER();
  M = red[0];
  for (int i = 1; i < NT / 32; ++i) M = PA_FMAX(M, red[i]);
  const float ws = mine ? PA_EXP2(ms - M) : 0.0f;
  if (mine) w[tid] = ws;
  float L = ls * ws;
  for (int off = 16; off > 0; off /= 2) L += PA_SHFL_XOR(L, off);
  PA_BARRIER();  // every thread has read red[] as maxima
  if (lane == 0) red[warp] = L;
  PA_BARRIER();
  L = 0.0f;
  for (int i = 0; i < NT / 32; ++i) L += red[i];
  // Each warp sums every (NT/32)-th split, each lane EL = HD/32 neighbouring elements, so a
  // thread's chain of dependent loads is nsplit / (NT/32) long; then the warps' sums are added.
  constexpr int NWR = NT / 32, EL = HD / 32;
  PA_SHARED float so[NWR * HD];
  float o[EL];
  for (int e = 0; e < EL; ++e) o[e] = 0.0f;
#pragma unroll 4
  for (int s = warp; s < nsplit; s += NWR) {
    const float wt = w[s];
    const int64_t at = (base + s) * HD + lane * EL;
    for (int e = 0; e < EL; ++e) o[e] += part_o[at + e] * wt;
  }
  for (int e = 0; e < EL; ++e) so[warp * HD + lane * EL + e] = o[e];
  PA_BARRIER();
  for (int d = tid; d < HD; d += NT) {
    float sum = 0.0f;
    for (int i = 0; i < NWR; ++i) sum += so[i * HD + d];
    out[(int64_t)row * HD + d] = static_cast<T>(L > 0.0f ? sum / L : 0.0f);
  }
"""

METAL_HEADER = """
#define PA_SHARED threadgroup
#define PA_BARRIER() threadgroup_barrier(metal::mem_flags::mem_threadgroup)
#define PA_SHFL_XOR(v, o) metal::simd_shuffle_xor((v), (ushort)(o))
#define PA_EXP2(x) metal::exp2(x)
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
def _constants(window: int, splits: int, scale: float) -> tuple[mx.array, mx.array]:
    """The kernel's scalar inputs as device arrays, made once per value rather than per call."""
    return mx.array([window, splits], dtype=mx.int32), mx.array([scale], mx.float32)


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
        n = block_tables.shape[1]
        spec = _launch_spec(
            B, H, Hkv, D, q.dtype, n, block_size, window or 0, scale, num_splits, unroll
        )
        tables, lens = (
            a if a.dtype == mx.int32 else a.astype(mx.int32) for a in (block_tables, seq_lens)
        )
        inputs = [q.reshape(B, H, D), k_pool, v_pool, tables, lens, spec.params, spec.scale]
        if spec.num_splits == 1:
            (out,) = self._launch("direct", inputs, spec.attend_tpl, spec.grid_x, 1, spec.out)
            return out.reshape(B, H, 1, D)
        part_o, part_ml = self._launch(
            "split", inputs, spec.attend_tpl, spec.grid_x, spec.num_splits, spec.parts
        )
        reduce_in = [part_o, part_ml, spec.params]
        (out,) = self._launch("reduce", reduce_in, spec.reduce_tpl, spec.reduce_x, 1, spec.out)
        return out.reshape(B, H, 1, D)


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """Everything one call's launches need that follows from its shapes and scalars."""

    num_splits: int
    params: mx.array
    scale: mx.array
    attend_tpl: list
    reduce_tpl: list
    grid_x: int
    reduce_x: int
    out: list
    parts: list


@functools.lru_cache(maxsize=1024)
def _launch_spec(
    B: int,
    H: int,
    Hkv: int,
    D: int,
    dtype: mx.Dtype,
    n: int,
    block_size: int,
    window: int,
    scale: float,
    num_splits: int | None,
    unroll: int | None,
) -> LaunchSpec:
    """Made once per shape: a decode step calls the kernel once a layer with the same shapes,
    so per-call Python work stays small next to the kernel's few tens of microseconds."""
    plan = LaunchPlan.choose(head_dim=D, gqa=H // Hkv, rows=B * Hkv, max_tokens=n * block_size)
    if num_splits or unroll:
        splits = min(num_splits or plan.num_splits, MAX_SPLITS)
        plan = replace(plan, num_splits=splits, unroll=unroll or plan.unroll)
    S = plan.num_splits
    params, scale_arr = _constants(window, S, scale)
    attend = [("T", dtype), ("HD", D), ("TPG", plan.tpg), ("HPB", plan.hpb), ("NW", NUM_WARPS)]
    attend += [("UNR", plan.unroll), ("BS", block_size)]
    return LaunchSpec(
        num_splits=S,
        params=params,
        scale=scale_arr,
        attend_tpl=attend,
        reduce_tpl=[("T", dtype), ("HD", D), ("MAXS", MAX_SPLITS), ("NT", THREADS)],
        grid_x=THREADS * B * Hkv * ((H // Hkv) // plan.hpb),
        reduce_x=THREADS * B * H,
        out=[((B, H, D), dtype)],
        parts=[((B * H, S, D), mx.float32), ((B * H, S, 2), mx.float32)],
    )


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
