/* What the CPU kernels' files share: the CBLAS names, the vector type, small inline helpers, and
 * the pool (pool.c) every kernel splits its work over. Built with -fvisibility=hidden: only
 * what is marked EXPORT is seen outside the library, which is preloaded into every process the
 * CLI starts (an exported helper named `run` would stand in for anyone's). */

#ifndef CANDLEWICK_CPU_KERNELS_H
#define CANDLEWICK_CPU_KERNELS_H

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
enum { MAX_GEMV_ROWS = 2, LANE = 16, SMALL_ROWS = LANE, NB = 8, MAX_THREADS = 64 };
enum { MIN_PART = 1 << 16 };   /* numbers a thread's part reads at least (256 KB: ~20 us) */
enum { MIN_WEIGHT = 1 << 15 }; /* smaller weights (attention's per-sequence products) sit in the
                                  caches, where sgemm's packing is cheap: left to the BLAS */

typedef float vec __attribute__((vector_size(4 * LANE)));
typedef int ivec __attribute__((vector_size(4 * LANE)));
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);

/* pool.c: the BLAS behind us, found once; its thread count; work split over our threads */
extern sgemm_fn real_sgemm;
extern sgemv_fn real_sgemv;
extern unsigned long long by_pool;
extern int kernels_off; /* set by candlewick_disable: every product goes to the BLAS as it is */
void bind_blas(void);
void need_sgemm(void); /* aborts, saying so, where the BLAS behind us has no cblas_sgemm */
int threads(void);
typedef void (*part_fn)(const void *arg, int part, int parts);
void run(part_fn fn, const void *arg, long parts);

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

/* A buffer that grows to what its thread needs and is kept for the next call (each kernel has one
 * per thread, `static __thread`): at least `need` floats, 64-byte aligned; NULL if none can be had. */
struct scratch {
  float *buf;
  size_t cap;
};

static inline float *scratch(struct scratch *s, size_t need) {
  if (need > s->cap) {
    free(s->buf);
    s->buf = aligned_alloc(64, ((need * sizeof(float) + 63) / 64) * 64);
    s->cap = s->buf ? need : 0;
  }
  return s->buf;
}

#endif
