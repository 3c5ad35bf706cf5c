/* Attention on the CPU, read in place: a decode step's paged attention from head-major pools,
 * and an encoder's over packed sequences. */

#include <math.h>

#include "common.h"

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

static __thread struct scratch scores;

static void attend(const struct attention *a, int seq, int kv) {
  const int gqa = a->h / a->hkv, d = a->d, len = a->lens[seq];
  float *out = a->out + ((long)seq * a->h + (long)kv * gqa) * d; /* gqa rows of d */
  memset(out, 0, sizeof(float) * (size_t)gqa * d);
  if (len <= 0) return; /* nothing to attend to: zeros */
  const int start = a->window > 0 && len > a->window ? len - a->window : 0, n = len - start;
  float *score_buf = scratch(&scores, (size_t)gqa * n);
  if (!score_buf) abort();
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
EXPORT void candlewick_paged_decode(const float *q, const float *k, const float *v, long slots,
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

static __thread struct scratch tiles;

static const ivec LANES = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

/* out[0:d] = scale * sum over j < len of p[j] * v[j * stride, 0:d]: two vectors of out at a
 * time held in registers across all the rows, not loaded and stored for each. */
static void weighted_sum(float *out, const float *p, const float *v, long stride, int len, int d,
                         float scale) {
  int c = 0;
  for (; c + 2 * LANE <= d; c += 2 * LANE) {
    vec acc0 = {0}, acc1 = {0};
    for (int j = 0; j < len; j++) {
      vec v0, v1;
      memcpy(&v0, v + j * stride + c, sizeof(vec));
      memcpy(&v1, v + j * stride + c + LANE, sizeof(vec));
      acc0 += p[j] * v0;
      acc1 += p[j] * v1;
    }
    acc0 *= scale;
    acc1 *= scale;
    memcpy(out + c, &acc0, sizeof(vec));
    memcpy(out + c + LANE, &acc1, sizeof(vec));
  }
  for (; c + LANE <= d; c += LANE) {
    vec acc = {0};
    for (int j = 0; j < len; j++) {
      vec v0;
      memcpy(&v0, v + j * stride + c, sizeof(vec));
      acc += p[j] * v0;
    }
    acc *= scale;
    memcpy(out + c, &acc, sizeof(vec));
  }
  for (; c < d; c++) {
    float acc = 0.0f;
    for (int j = 0; j < len; j++) acc += p[j] * v[j * stride + c];
    out[c] = acc * scale;
  }
}

static void packed_one(const struct packed *a, int s, int h) {
  const int len = a->lens[s], d = a->d, width = (len + LANE - 1) / LANE * LANE;
  if (len <= 0) return;
  const size_t need = (size_t)d * width + (size_t)width; /* kT [d, width], then a score row */
  float *tile_buf = scratch(&tiles, need);
  if (!tile_buf) abort();
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
      e = pick(LANES + j < len, exp_lanes(e - top), (vec){0}); /* the tile's padding: 0 */
      sums += e;
      memcpy(row + j, &e, sizeof(vec));
    }
    weighted_sum(a->out + base + (long)i * a->stride, row, a->v + base, a->stride, len, d,
                 1.0f / lanes_sum(sums));
  }
}

static void packed_part(const void *arg, int i, int parts) {
  const struct packed *a = arg;
  const long tasks = (long)a->seqs * a->heads;
  for (long t = tasks * i / parts; t < tasks * (i + 1) / parts; t++)
    packed_one(a, (int)(t / a->heads), (int)(t % a->heads));
}

EXPORT void candlewick_packed_attention(const float *q, const float *k, const float *v, long stride,
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
