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
 * threads share the blocks of W: a small pool of our own, spinning briefly between products and
 * then sleeping on a futex. */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <linux/futex.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
enum { MAX_GEMV_ROWS = 2, LANE = 16, SMALL_ROWS = LANE, NB = 8, MAX_THREADS = 64 };
enum { PAUSES = 64, SPINS = 2000 }; /* a worker's wait: 64 pauses, then yields, then sleep */
enum { MIN_PART = 1 << 16 };   /* weights a thread takes at least (256 KB: ~20 us to stream) */
enum { MIN_WEIGHT = 1 << 15 }; /* smaller ones (attention's per-sequence products) sit in the
                                  caches, where sgemm's packing is cheap: left to the BLAS */

typedef float vec __attribute__((vector_size(4 * LANE)));
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
typedef int (*threads_fn)(void);

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;
static threads_fn blas_threads;
static pthread_once_t bound = PTHREAD_ONCE_INIT;
static unsigned long long by_rows, by_kernel, by_pool;

static void bind(void) {
  const char *path = getenv("CANDLEWICK_KERNELS_BLAS");
  void *lib = path ? dlopen(path, RTLD_NOW | RTLD_NOLOAD) : NULL;
  void *scope = lib ? lib : RTLD_NEXT;
  real_sgemm = (sgemm_fn)dlsym(scope, "cblas_sgemm");
  real_sgemv = (sgemv_fn)dlsym(scope, "cblas_sgemv");
  blas_threads = (threads_fn)dlsym(scope, "openblas_get_num_threads");
  if (!blas_threads) blas_threads = (threads_fn)dlsym(scope, "MKL_Get_Max_Threads");
}

static void need_sgemm(void) {
  if (real_sgemm) return;
  const char *path = getenv("CANDLEWICK_KERNELS_BLAS");
  fprintf(stderr, "candlewick: the CPU kernels found no cblas_sgemm (CANDLEWICK_KERNELS_BLAS=%s)\n",
          path ? path : "");
  abort();
}

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ volatile("yield");
#endif
}

/* A wait's first rounds pause the core; later ones yield it: with more runnable threads than
 * cores (the BLAS's own spinning workers, the server's Python thread), a thread spinning
 * without yielding can hold the core the one it waits for needs. */
static inline void wait_a_little(int round) {
  if (round < PAUSES)
    relax();
  else
    sched_yield();
}

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

/* ---- the pool: worker i (1..parts-1) runs part i of the current job ------------------------ */

typedef void (*part_fn)(const void *arg, int part, int parts);

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER; /* one job on the pool */
static int workers;                                            /* started so far */
static unsigned tickets[MAX_THREADS]; /* bumped for each job a worker has a part in */
static unsigned generation;           /* futex word, bumped with every job: wakes sleepers */
static int sleepers, pending, job_parts;
static part_fn job_fn;
static const void *job_arg;

static void *worker(void *arg) {
  const int me = (int)(long)arg;
  unsigned seen = 0;
  for (;;) {
    int spin = 0;
    while (__atomic_load_n(&tickets[me], __ATOMIC_SEQ_CST) == seen) {
      if (spin++ < SPINS) {
        wait_a_little(spin);
        continue;
      }
      const unsigned now = __atomic_load_n(&generation, __ATOMIC_SEQ_CST);
      if (__atomic_load_n(&tickets[me], __ATOMIC_SEQ_CST) != seen) break;
      __atomic_add_fetch(&sleepers, 1, __ATOMIC_SEQ_CST);
      syscall(SYS_futex, &generation, FUTEX_WAIT_PRIVATE, now, NULL, NULL, 0);
      __atomic_sub_fetch(&sleepers, 1, __ATOMIC_SEQ_CST);
      spin = 0;
    }
    seen = __atomic_load_n(&tickets[me], __ATOMIC_SEQ_CST);
    job_fn(job_arg, me, job_parts); /* stable: the caller waits for this part before the next */
    __atomic_sub_fetch(&pending, 1, __ATOMIC_SEQ_CST);
  }
  return NULL;
}

static void after_fork_in_child(void) { /* the pool's threads do not exist in a child */
  pthread_mutex_init(&pool_lock, NULL);
  workers = sleepers = pending = 0;
  memset(tickets, 0, sizeof(tickets));
}

/* fn(arg, i, parts) for i in 0..parts-1, on this thread and parts-1 workers (fewer where the
 * pool is busy with another caller's job or threads cannot start). */
static void run(part_fn fn, const void *arg, long parts) {
  if (parts > MAX_THREADS) parts = MAX_THREADS;
  if (parts < 2 || pthread_mutex_trylock(&pool_lock) != 0) { /* the pool is busy: alone */
    fn(arg, 0, 1);
    return;
  }
  while (workers < parts - 1) {
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    const int started = pthread_create(&t, &attr, worker, (void *)(long)(workers + 1)) == 0;
    pthread_attr_destroy(&attr);
    if (!started) break;
    workers++;
  }
  if (parts > workers + 1) parts = workers + 1;
  job_fn = fn;
  job_arg = arg;
  job_parts = (int)parts;
  __atomic_store_n(&pending, parts - 1, __ATOMIC_SEQ_CST);
  for (int i = 1; i < parts; i++) __atomic_add_fetch(&tickets[i], 1, __ATOMIC_SEQ_CST);
  __atomic_add_fetch(&generation, 1, __ATOMIC_SEQ_CST);
  if (__atomic_load_n(&sleepers, __ATOMIC_SEQ_CST) > 0)
    syscall(SYS_futex, &generation, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
  fn(arg, 0, (int)parts);
  for (int spin = 0; __atomic_load_n(&pending, __ATOMIC_SEQ_CST) > 0; spin++) wait_a_little(spin);
  pthread_mutex_unlock(&pool_lock);
  if (parts > 1) __atomic_fetch_add(&by_pool, 1, __ATOMIC_RELAXED);
}

static int threads(void) {
  pthread_once(&bound, bind);
  return blas_threads ? blas_threads() : 1;
}

static void product(const struct product *p) {
  long parts = threads();
  const long blocks = (p->n + NB - 1) / NB, split = (long)p->n * p->k / MIN_PART;
  if (parts > blocks / 2) parts = blocks / 2; /* two blocks of W at least per thread, */
  if (parts > split) parts = split;           /* and enough of W to pay for the handoff */
  run(product_part, p, parts);
}

/* ---- paged decode attention ----------------------------------------------------------------
 * One query row per sequence and head against the sequence's keys and values, read in place
 * from head-major pools ([kv heads, slots, d]: a block of one KV head is block x d contiguous
 * numbers) through its block table: no gather into a batch of contiguous keys first. Each
 * (sequence, KV head) is one task; its query heads (gqa of them) share every key row read. */

struct attention {
  const float *q;     /* [b, h, d] */
  const float *k, *v; /* [hkv, slots, d] */
  long slots;
  const int *tables; /* [b, width] block ids */
  int width;
  const int *lens; /* [b] */
  int b, h, hkv, d, block, window;
  float scale;
  float *out; /* [b, h, d] */
};

static inline float lanes_sum(vec v) { /* a tree of shuffles: 4 steps, not 15 dependent adds */
  typedef float half __attribute__((vector_size(4 * LANE / 2)));
  typedef float quarter __attribute__((vector_size(4 * LANE / 4)));
  half h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  quarter q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

static inline float dot(const float *restrict x, const float *restrict y, int d) {
  int i = 0;
  float total = 0.0f;
  if (d >= LANE) {
    vec acc = {0};
    for (; i + LANE <= d; i += LANE) {
      vec a, b;
      memcpy(&a, x + i, sizeof(vec));
      memcpy(&b, y + i, sizeof(vec));
      acc += a * b;
    }
    total = lanes_sum(acc);
  }
  for (; i < d; i++) total += x[i] * y[i];
  return total;
}

static inline void axpy(float *restrict y, float a, const float *restrict x, int d) {
  int i = 0;
  for (; i + LANE <= d; i += LANE) {
    vec u, w;
    memcpy(&u, y + i, sizeof(vec));
    memcpy(&w, x + i, sizeof(vec));
    u += a * w;
    memcpy(y + i, &u, sizeof(vec));
  }
  for (; i < d; i++) y[i] += a * x[i];
}

static __thread float *score_buf;
static __thread size_t score_cap;

static void attend(const struct attention *a, int seq, int kv) {
  const int gqa = a->h / a->hkv, d = a->d, len = a->lens[seq];
  float *out = a->out + ((long)seq * a->h + (long)kv * gqa) * d; /* gqa rows of d */
  memset(out, 0, sizeof(float) * (size_t)gqa * d);
  if (len <= 0) return; /* nothing to attend to: zeros */
  const int start = a->window > 0 && len > a->window ? len - a->window : 0, n = len - start;
  if ((size_t)gqa * n > score_cap) {
    free(score_buf);
    score_buf = malloc(sizeof(float) * (size_t)gqa * n);
    score_cap = score_buf ? (size_t)gqa * n : 0;
    if (!score_buf) abort();
  }
  const float *q = a->q + ((long)seq * a->h + (long)kv * gqa) * d;
  const float *keys = a->k + (long)kv * a->slots * d, *values = a->v + (long)kv * a->slots * d;
  const int *table = a->tables + (long)seq * a->width;
  for (int l = start; l < len; l++) {
    const float *key = keys + ((long)table[l / a->block] * a->block + l % a->block) * d;
    for (int g = 0; g < gqa; g++) score_buf[(long)g * n + l - start] = dot(q + (long)g * d, key, d) * a->scale;
  }
  float inv[gqa];
  for (int g = 0; g < gqa; g++) {
    float *s = score_buf + (long)g * n, top = s[0], sum = 0.0f;
    for (int i = 1; i < n; i++) top = s[i] > top ? s[i] : top;
    for (int i = 0; i < n; i++) sum += (s[i] = expf(s[i] - top));
    inv[g] = 1.0f / sum;
  }
  for (int l = start; l < len; l++) {
    const float *value = values + ((long)table[l / a->block] * a->block + l % a->block) * d;
    for (int g = 0; g < gqa; g++) axpy(out + (long)g * d, score_buf[(long)g * n + l - start], value, d);
  }
  for (int g = 0; g < gqa; g++)
    for (int i = 0; i < d; i++) out[(long)g * d + i] *= inv[g];
}

static void attention_part(const void *arg, int i, int parts) {
  const struct attention *a = arg;
  const long tasks = (long)a->b * a->hkv;
  for (long t = tasks * i / parts; t < tasks * (i + 1) / parts; t++) attend(a, (int)(t / a->hkv), (int)(t % a->hkv));
}

/* q [b, h, d]; pools [hkv, slots, d]; tables [b, width]; lens [b] -> out [b, h, d]. window <= 0:
 * none. Split over the BLAS's thread count where the keys and values read pay for it. */
void candlewick_paged_decode(const float *q, const float *k, const float *v, long slots,
                             const int *tables, int width, const int *lens, int b, int h, int hkv,
                             int d, int block, int window, float scale, float *out) {
  struct attention a = {q, k, v, slots, tables, width, lens, b, h, hkv, d, block, window, scale, out};
  long read = 0; /* numbers of keys and values read */
  for (int i = 0; i < b; i++) read += 2L * (lens[i] > 0 ? lens[i] : 0) * hkv * d;
  long parts = threads();
  if (parts > (long)b * hkv) parts = (long)b * hkv;
  if (parts > read / MIN_PART) parts = read / MIN_PART;
  run(attention_part, &a, parts);
}

/* ---- an encoder's elementwise work and attention ----------------------------------------- */

typedef int ivec __attribute__((vector_size(4 * LANE)));

/* Lane-wise choice and clamps (C's ?: takes no vectors): where `mask` (a comparison's -1 / 0). */
static inline vec pick(ivec mask, vec yes, vec no) {
  ivec a, b;
  memcpy(&a, &yes, sizeof(a));
  memcpy(&b, &no, sizeof(b));
  a = (a & mask) | (b & ~mask);
  memcpy(&yes, &a, sizeof(yes));
  return yes;
}

static inline vec clamp(vec x, float lo, float hi) {
  const vec l = lo + (vec){0}, h = hi + (vec){0};
  x = pick(x < l, l, x);
  return pick(x > h, h, x);
}

/* exp of each lane: 2^n * e^r with n = round(x log2 e), r = x - n ln 2 (in two parts), e^r by
 * its degree-6 Taylor polynomial (|r| <= ln 2 / 2: relative error under 2e-7); 0 below -87. */
static inline vec exp_lanes(vec x) {
  const ivec under = x < -87.0f;
  x = clamp(x, -87.0f, 88.0f);
  const vec t = x * 1.44269504088896341f;
  const ivec n = __builtin_convertvector(t + pick(t < 0.0f, -0.5f + (vec){0}, 0.5f + (vec){0}), ivec);
  const vec nf = __builtin_convertvector(n, vec);
  const vec r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
  vec p = (1.0f / 720.0f) + (vec){0};
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  ivec bits;
  memcpy(&bits, &p, sizeof(bits));
  bits += n << 23;
  memcpy(&p, &bits, sizeof(p));
  return pick(under, (vec){0}, p);
}

/* GELU with erf, as BERT's: 0.5 x (1 + erf(x / sqrt 2)), erf(z) ~ z P(z^2) / Q(z^2) on z clipped
 * to [-4, 4] (the minimax rational Eigen and XLA use for float32 erf, within 5e-7; the same one
 * engine/models/bert.py compiles through MLX). y may be x. */
static const float ERF_P[] = {-2.72614225801306e-10f, 2.77068142495902e-08f,
                              -2.10102402082508e-06f, -5.69250639462346e-05f,
                              -7.34990630326855e-04f, -2.95459980854025e-03f,
                              -1.60960333262415e-02f};
static const float ERF_Q[] = {-1.45660718464996e-05f, -2.13374055278905e-04f,
                              -1.68282697438203e-03f, -7.37332916720468e-03f,
                              -1.42647390514189e-02f};

static inline float gelu_one(float x) {
  float z = x * 0.7071067811865476f;
  z = z < -4.0f ? -4.0f : (z > 4.0f ? 4.0f : z);
  const float z2 = z * z;
  float p = ERF_P[0], q = ERF_Q[0];
  for (int i = 1; i < 7; i++) p = p * z2 + ERF_P[i];
  for (int i = 1; i < 5; i++) q = q * z2 + ERF_Q[i];
  return 0.5f * x * (1.0f + z * p / q);
}

static void gelu_range(const float *x, float *y, long n0, long n1) {
  long i = n0;
  for (; i + LANE <= n1; i += LANE) {
    vec v, z;
    memcpy(&v, x + i, sizeof(vec));
    z = clamp(v * 0.7071067811865476f, -4.0f, 4.0f);
    const vec z2 = z * z;
    vec p = ERF_P[0] + (vec){0}, q = ERF_Q[0] + (vec){0};
    for (int k = 1; k < 7; k++) p = p * z2 + ERF_P[k];
    for (int k = 1; k < 5; k++) q = q * z2 + ERF_Q[k];
    v = 0.5f * v * (1.0f + z * p / q);
    memcpy(y + i, &v, sizeof(vec));
  }
  for (; i < n1; i++) y[i] = gelu_one(x[i]);
}

struct gelu_job {
  const float *x;
  float *y;
  long n;
};

static void gelu_part(const void *arg, int i, int parts) {
  const struct gelu_job *g = arg;
  const long chunks = (g->n + LANE - 1) / LANE;
  const long n0 = chunks * i / parts * LANE, n1 = chunks * (i + 1) / parts * LANE;
  gelu_range(g->x, g->y, n0, n1 < g->n ? n1 : g->n);
}

void candlewick_gelu_erf(const float *x, float *y, long n) {
  struct gelu_job g = {x, y, n};
  long parts = threads();
  if (parts > n / MIN_PART) parts = n / MIN_PART;
  run(gelu_part, &g, parts);
}

/* Attention of packed sequences (no padding): rows [starts[s], starts[s] + lens[s]) of q, k, v
 * (each [tokens, heads * d] with row stride `stride`) attend to each other within a sequence,
 * every key visible (an encoder's). out: [tokens, heads * d], the same layout. One task per
 * (sequence, head): its keys transposed into a [d, len] tile, so each query's scores are
 * broadcast multiply-adds over whole vectors of keys, the softmax's exp a vector at a time,
 * and the weighted sum of values a broadcast multiply-add per key. */
struct packed {
  const float *q, *k, *v;
  long stride;
  const int *starts, *lens;
  int seqs, heads, d;
  float scale;
  float *out;
};

static __thread float *tile_buf;
static __thread size_t tile_cap;

static void packed_one(const struct packed *a, int s, int h) {
  const int len = a->lens[s], d = a->d, width = (len + LANE - 1) / LANE * LANE;
  if (len <= 0) return;
  const size_t need = (size_t)d * width + (size_t)width; /* kT [d, width], then a score row */
  if (need > tile_cap) {
    free(tile_buf);
    tile_buf = aligned_alloc(64, ((need * sizeof(float) + 63) / 64) * 64);
    tile_cap = tile_buf ? need : 0;
    if (!tile_buf) abort();
  }
  float *kt = tile_buf, *row = tile_buf + (size_t)d * width;
  const long base = (long)a->starts[s] * a->stride + (long)h * d;
  for (int c = 0; c < d; c++) {
    for (int j = 0; j < len; j++) kt[(size_t)c * width + j] = a->k[base + (long)j * a->stride + c];
    for (int j = len; j < width; j++) kt[(size_t)c * width + j] = 0.0f;
  }
  for (int i = 0; i < len; i++) {
    const float *q = a->q + base + (long)i * a->stride;
    for (int j = 0; j < width; j += LANE) {
      vec acc = {0};
      for (int c = 0; c < d; c++) {
        vec kv;
        memcpy(&kv, kt + (size_t)c * width + j, sizeof(vec));
        acc += q[c] * kv;
      }
      acc *= a->scale;
      memcpy(row + j, &acc, sizeof(vec));
    }
    float top = row[0];
    for (int j = 1; j < len; j++) top = row[j] > top ? row[j] : top;
    vec sums = {0};
    for (int j = 0; j < width; j += LANE) {
      vec e;
      memcpy(&e, row + j, sizeof(vec));
      e = exp_lanes(e - top);
      for (int t = 0; t < LANE; t++)
        if (j + t >= len) e[t] = 0.0f; /* padding lanes of the tile */
      sums += e;
      memcpy(row + j, &e, sizeof(vec));
    }
    const float inv = 1.0f / lanes_sum(sums);
    float *o = a->out + base + (long)i * a->stride;
    memset(o, 0, sizeof(float) * (size_t)d);
    for (int j = 0; j < len; j++) axpy(o, row[j], a->v + base + (long)j * a->stride, d);
    for (int c = 0; c < d; c++) o[c] *= inv;
  }
}

static void packed_part(const void *arg, int i, int parts) {
  const struct packed *a = arg;
  const long tasks = (long)a->seqs * a->heads;
  for (long t = tasks * i / parts; t < tasks * (i + 1) / parts; t++)
    packed_one(a, (int)(t / a->heads), (int)(t % a->heads));
}

void candlewick_packed_attention(const float *q, const float *k, const float *v, long stride,
                                 const int *starts, const int *lens, int seqs, int heads, int d,
                                 float scale, float *out) {
  struct packed a = {q, k, v, stride, starts, lens, seqs, heads, d, scale, out};
  long work = 0; /* query-key pairs, times the head size */
  for (int s = 0; s < seqs; s++) work += (long)lens[s] * lens[s] * heads * d;
  long parts = threads();
  if (parts > (long)seqs * heads) parts = (long)seqs * heads;
  if (parts > work / MIN_PART) parts = work / MIN_PART;
  run(packed_part, &a, parts);
}

/* x [m, k] (op(A)) into a [k, LANE] panel, zero-padded; a buffer per calling thread. */
static __thread float *panel_buf;
static __thread size_t panel_cap;

static const float *make_panel(int trans_a, int m, int k, const float *a, int lda) {
  const size_t need = (size_t)k * LANE;
  if (need > panel_cap) {
    free(panel_buf);
    panel_buf = aligned_alloc(64, ((need * sizeof(float) + 63) / 64) * 64);
    panel_cap = panel_buf ? need : 0;
    if (!panel_buf) return NULL;
  }
  memset(panel_buf, 0, need * sizeof(float));
  for (int i = 0; i < m; i++)
    for (int kk = 0; kk < k; kk++)
      panel_buf[(size_t)kk * LANE + i] = trans_a == NO_TRANS ? a[(long)i * lda + kk] : a[(long)kk * lda + i];
  return panel_buf;
}

/* ---- the entry point MLX binds to ---------------------------------------------------------- */

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
  pthread_once(&bound, bind);
  need_sgemm();
  const int ours = order == ROW_MAJOR && k > 0 && (long)n * k >= MIN_WEIGHT;
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
void *candlewick_rows_sgemm(void) {
  pthread_once(&bound, bind);
  return (void *)real_sgemm;
}

unsigned long long candlewick_rows_calls(void) { return __atomic_load_n(&by_rows, __ATOMIC_RELAXED); }

unsigned long long candlewick_kernel_calls(void) {
  return __atomic_load_n(&by_kernel, __ATOMIC_RELAXED);
}

unsigned long long candlewick_pool_calls(void) { return __atomic_load_n(&by_pool, __ATOMIC_RELAXED); }

int candlewick_small_rows(void) { return SMALL_ROWS; }

__attribute__((constructor)) static void at_load(void) {
  pthread_atfork(NULL, NULL, after_fork_in_child);
}
