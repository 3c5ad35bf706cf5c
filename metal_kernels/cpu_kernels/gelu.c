/* An encoder's GELU, built for this machine's vectors. */

#include "common.h"

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

EXPORT void candlewick_gelu_erf(const float *x, float *y, long n) {
  struct gelu_job g = {x, y, n};
  long parts = threads();
  if (parts > n / MIN_PART) parts = n / MIN_PART;
  run(gelu_part, &g, parts);
}
