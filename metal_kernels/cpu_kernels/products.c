/* candlewick's cblas_sgemm for products of few rows, preloaded ahead of the BLAS (see
 * metal_kernels/cpu_kernels/__init__.py for why and how it is built and loaded).
 *
 * MLX's CPU matmul calls cblas_sgemm for every product. For `x @ W.T` with few rows of x (a
 * decode step), OpenBLAS's sgemm spends as long copying ("packing") W into its own layout as
 * multiplying, and reads W twice. Here:
 * for weights of MIN_WEIGHT numbers or more (smaller ones stay in the caches: the BLAS's own):
 *   - one row:            the BLAS's cblas_sgemv (reads W once, in place, with its threads);
 *   - 2..SMALL_ROWS rows, W given as [n, k] rows (trans_b, the `x @ W.T` of a linear layer):
 *                         our kernel below, which streams W once from memory, unpacked;
 *   - 2..MAX_GEMV_ROWS rows in any other layout: sgemv a row at a time;
 *   - everything else:    the BLAS's own cblas_sgemm, unchanged.
 *
 * The kernel: x (at most LANE rows) is transposed into a zero-padded [k, LANE] panel, and for
 * each block of NB rows of W, NB vector accumulators (one per row of W, a lane per row of x)
 * gather W[n, kk] * panel[kk, :] over kk: one scalar broadcast of W and one vector load of the
 * panel per fused multiply-add, no reduction across lanes, and W read once, in order, with the
 * next block prefetched. The BLAS's thread count (which candlewick governs) decides how many
 * threads share the blocks of W (pool.c). */

#include <stdio.h>

#include "common.h"

static unsigned long long by_rows, by_kernel;

/* ---- the kernel ---------------------------------------------------------------------------- */

struct product {
  int m, n, k;
  float alpha, beta;
  const float *panel; /* [k, LANE]: x transposed, zero-padded */
  const float *w;     /* [n, k] with row stride ldw */
  int ldw;
  float *c; /* [m, n] with row stride ldc */
  int ldc;
};

static inline void store(const struct product *p, int n, int j, int m, float acc) {
  float *out = p->c + (long)m * p->ldc + n + j;
  *out = p->beta == 0.0f ? p->alpha * acc : p->alpha * acc + p->beta * *out;
}

/* Columns [n0, n1) of C: NB rows of W a block (NB accumulators of LANE rows of x each, the
 * panel's vector and a broadcast: in the vector registers), then what is left one by one. */
static void columns(const struct product *p, int n0, int n1) {
  const int ldw = p->ldw, k = p->k;
  int n = n0;
  for (; n + NB <= n1; n += NB) {
    const float *w = p->w + (long)n * ldw;
    const int ahead = n + 2 * NB <= n1;
    vec acc[NB];
    for (int j = 0; j < NB; j++) acc[j] = (vec){0};
    for (int kk = 0; kk < k; kk++) {
      vec x;
      memcpy(&x, p->panel + (long)kk * LANE, sizeof(x));
      if (ahead && (kk % LANE) == 0) /* the next block's rows, a cache line each */
        for (int j = 0; j < NB; j++) __builtin_prefetch(w + (long)(NB + j) * ldw + kk, 0, 0);
      for (int j = 0; j < NB; j++) acc[j] += w[(long)j * ldw + kk] * x;
    }
    float sums[NB][LANE]; /* out of the registers only now, so that acc stays in them above */
    memcpy(sums, acc, sizeof(sums));
    for (int j = 0; j < NB; j++)
      for (int m = 0; m < p->m; m++) store(p, n, j, m, sums[j][m]);
  }
  for (; n < n1; n++)
    for (int m = 0; m < p->m; m++) {
      float acc = 0.0f;
      for (int kk = 0; kk < k; kk++) acc += p->panel[(long)kk * LANE + m] * p->w[(long)n * ldw + kk];
      store(p, n, 0, m, acc);
    }
}

static void product_part(const void *arg, int i, int parts) {
  const struct product *p = arg;
  const long blocks = (p->n + NB - 1) / NB;
  const int n0 = (int)(blocks * i / parts) * NB;
  const int n1 = (int)(blocks * (i + 1) / parts) * NB;
  columns(p, n0, n1 < p->n ? n1 : p->n);
}

static void product(const struct product *p) {
  long parts = threads();
  const long blocks = (p->n + NB - 1) / NB, split = (long)p->n * p->k / MIN_PART;
  if (parts > blocks / 2) parts = blocks / 2; /* two blocks of W at least per thread, */
  if (parts > split) parts = split;           /* and enough of W to pay for the handoff */
  run(product_part, p, parts);
}

/* x [m, k] (op(A)) into a [k, LANE] panel, zero-padded; a buffer per calling thread. */
static __thread struct scratch panels;

static const float *make_panel(int trans_a, int m, int k, const float *a, int lda) {
  const size_t need = (size_t)k * LANE;
  float *panel_buf = scratch(&panels, need);
  if (!panel_buf) return NULL;
  memset(panel_buf, 0, need * sizeof(float));
  for (int i = 0; i < m; i++)
    for (int kk = 0; kk < k; kk++)
      panel_buf[(size_t)kk * LANE + i] = trans_a == NO_TRANS ? a[(long)i * lda + kk] : a[(long)kk * lda + i];
  return panel_buf;
}

/* ---- the entry point MLX binds to ---------------------------------------------------------- */

EXPORT void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
  bind_blas();
  need_sgemm();
  const int ours = order == ROW_MAJOR && k > 0 && (long)n * k >= MIN_WEIGHT &&
                   !__atomic_load_n(&kernels_off, __ATOMIC_RELAXED);
  if (ours && m >= 2 && m <= SMALL_ROWS && trans_b == TRANS && n >= NB) {
    const float *panel = make_panel(trans_a, m, k, a, lda);
    if (panel) {
      struct product p = {m, n, k, alpha, beta, panel, b, ldb, c, ldc};
      product(&p);
      __atomic_fetch_add(&by_kernel, 1, __ATOMIC_RELAXED);
      return;
    }
  }
  if (!ours || m > MAX_GEMV_ROWS || !real_sgemv) {
    real_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  /* Row i of C = alpha * (row i of op(A)) @ op(B) + beta * C: op(B) transposed times a vector. */
  for (int i = 0; i < m; i++) {
    const float *x = trans_a == NO_TRANS ? a + (long)i * lda : a + i;
    const int incx = trans_a == NO_TRANS ? 1 : lda;
    float *y = c + (long)i * ldc;
    if (beta == 0.0f) memset(y, 0, sizeof(float) * (size_t)n); /* C may hold NaN bytes */
    if (trans_b == NO_TRANS) /* B is [k, n] */
      real_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, x, incx, beta, y, 1);
    else /* B is [n, k] */
      real_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, x, incx, beta, y, 1);
  }
  __atomic_fetch_add(&by_rows, 1, __ATOMIC_RELAXED);
}

/* For candlewick's checks: the BLAS's own sgemm, and how many products went each of our ways. */
EXPORT void *candlewick_rows_sgemm(void) {
  bind_blas();
  return (void *)real_sgemm;
}

EXPORT unsigned long long candlewick_rows_calls(void) { return __atomic_load_n(&by_rows, __ATOMIC_RELAXED); }

EXPORT unsigned long long candlewick_kernel_calls(void) {
  return __atomic_load_n(&by_kernel, __ATOMIC_RELAXED);
}
