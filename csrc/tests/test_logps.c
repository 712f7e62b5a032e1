/*
 * C unit tests of the sequence log-prob kernels, run under ASan/UBSan by
 * `make test-c`. The fast kernel is compared with the float64 serial kernel,
 * and both with closed forms (uniform logits: lse = log V).
 */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "logits_buffer.h"
#include "napo.h"
#include "napo_dtype.h"
#include "napo_math.h"

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static double uniform(void) { /* xorshift64*, in [0, 1) */
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return (double)((rng_state * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0;
}

static double acc(const void *base, napo_logits_dtype dtype, int64_t i) {
  return dtype == NAPO_LOGITS_F64 ? ((const double *)base)[i] : ((const float *)base)[i];
}

/* Fast vs serial on one shape: forward values, then backward (out of place and in place). */
static void compare_kernels(tally *t, napo_logits_dtype dtype, int64_t batch, int64_t time, int64_t vocab,
                            int threads) {
  /* Logits stored [time, batch, vocab + 3]: strided rows, padded vocab. */
  const int64_t row = vocab + 3, total = time * batch * row;
  void *logits = malloc((size_t)total * item_size(dtype));
  void *grad_fast = malloc((size_t)(batch * time * vocab) * item_size(dtype));
  void *grad_serial = malloc((size_t)(batch * time * vocab) * item_size(dtype));
  int64_t *labels = malloc(sizeof(int64_t) * (size_t)(batch * time));
  double *buffers = malloc(sizeof(double) * (size_t)(batch * time) * 5);
  if (!logits || !grad_fast || !grad_serial || !labels || !buffers) {
    CHECK(t, 0);
    goto done;
  }
  for (int64_t i = 0; i < total; ++i) {
    put(logits, dtype, i, 6.0 * uniform() - 3.0);
  }
  for (int64_t i = 0; i < batch * time; ++i) {
    labels[i] = uniform() < 0.25 ? -100 : (int64_t)(uniform() * (double)vocab);
  }
  const napo_logits_layout layout = {batch, time, vocab, row, batch * row, 1};
  const napo_labels lab = {labels, time, 1};
  void *tok_fast = buffers, *tok_serial = buffers + 2 * batch * time, *grad_token = buffers + 4 * batch * time;
  double *lse_fast = buffers + batch * time, *lse_serial = buffers + 3 * batch * time;
  napo_label_error bad;
  CHECK(t, napo_token_logps(logits, layout, dtype, lab, -100, tok_fast, lse_fast, threads, &bad) == NAPO_OK);
  CHECK(t, napo_token_logps_serial(logits, layout, dtype, lab, -100, tok_serial, lse_serial, &bad) == NAPO_OK);
  const double tol = dtype == NAPO_LOGITS_F64 ? 1e-12 : 2e-5;
  /* The fast lse sums float32 exps in double lanes: ~1e-8 relative, not float32's rounding of the total. */
  const double lse_tol = dtype == NAPO_LOGITS_F64 ? 1e-12 : 2e-8;
  int close = 1;
  for (int64_t i = 0; i < batch * time; ++i) {
    close &= fabs(lse_fast[i] - lse_serial[i]) <= lse_tol * fabs(lse_serial[i]) + lse_tol;
    close &= fabs(acc(tok_fast, dtype, i) - acc(tok_serial, dtype, i)) <= tol * fabs(acc(tok_serial, dtype, i)) + tol;
    close &= labels[i] != -100 || acc(tok_fast, dtype, i) == 0.0;
    if (dtype == NAPO_LOGITS_F64) {
      ((double *)grad_token)[i] = uniform() - 0.5;
    } else {
      ((float *)grad_token)[i] = (float)(uniform() - 0.5);
    }
  }
  CHECK(t, close);

  const napo_logits_layout compact = {batch, time, vocab, time * vocab, vocab, 1};
  CHECK(t, napo_token_logps_backward(logits, layout, dtype, lab, -100, lse_serial, grad_token, grad_fast, compact,
                                     threads, &bad) == NAPO_OK);
  CHECK(t, napo_token_logps_backward_serial(logits, layout, dtype, lab, -100, lse_serial, grad_token, grad_serial,
                                            compact, &bad) == NAPO_OK);
  /* Gradients are stored in the logits' dtype: compare at its resolution. */
  const double grad_tol = dtype == NAPO_LOGITS_F64 ? 1e-14 : dtype == NAPO_LOGITS_F32 ? 1e-6 : 4e-3;
  int grads_close = 1;
  double row_sum_max = 0.0;
  for (int64_t r = 0; r < batch * time; ++r) {
    double row_sum = 0.0;
    for (int64_t v = 0; v < vocab; ++v) {
      const double a = get(grad_fast, dtype, r * vocab + v), e = get(grad_serial, dtype, r * vocab + v);
      grads_close &= fabs(a - e) <= grad_tol * fabs(e) + grad_tol * 1e-3;
      row_sum += a;
    }
    row_sum_max = fmax(row_sum_max, fabs(row_sum)); /* softmax gradients sum to zero per row */
  }
  CHECK(t, grads_close);
  CHECK(t, row_sum_max <= (dtype == NAPO_LOGITS_F64 ? 1e-12 : dtype == NAPO_LOGITS_F32 ? 1e-5 : 2e-2));

  /* In place: the logits buffer receives its own gradient, equal to the out-of-place one. */
  CHECK(t, napo_token_logps_backward(logits, layout, dtype, lab, -100, lse_serial, grad_token, logits, layout, threads,
                                     &bad) == NAPO_OK);
  int in_place_equal = 1;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t tt = 0; tt < time; ++tt) {
      for (int64_t v = 0; v < vocab; ++v) {
        const double a = get(logits, dtype, tt * batch * row + b * row + v);
        in_place_equal &= a == get(grad_fast, dtype, (b * time + tt) * vocab + v);
      }
    }
  }
  CHECK(t, in_place_equal);
done:
  free(logits);
  free(grad_fast);
  free(grad_serial);
  free(labels);
  free(buffers);
}

/* Rows dominated by one logit other than the label, around 20 + r/3: the backward's largest
 * gradient is -grad * p of that logit, whose exponent x - lse would carry the float32 rounding
 * of lse (up to 1e-6 here, ~8 ulps of p) without the hi/lo split. Held to 2 ulps of the row's
 * largest gradient against the float64 serial kernel. */
static void test_backward_precision(tally *t) {
  enum { ROWS = 16, V = 200 };
  float logits[ROWS * V], grad_fast[ROWS * V], grad_serial[ROWS * V], token[ROWS], grad_token[ROWS];
  double lse[ROWS];
  int64_t labels[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    for (int v = 0; v < V; ++v) {
      logits[r * V + v] = (float)(20.0 + r / 3.0 + 2.0 * uniform());
    }
    logits[r * V + 7] += 8.0f; /* the dominant logit */
    labels[r] = 100 + r;
    grad_token[r] = 1.0f;
  }
  const napo_logits_layout layout = {ROWS, 1, V, V, V, 1};
  const napo_labels lab = {labels, 1, 1};
  napo_label_error bad;
  CHECK(t, napo_token_logps_serial(logits, layout, NAPO_LOGITS_F32, lab, -100, token, lse, &bad) == NAPO_OK);
  CHECK(t, napo_token_logps_backward(logits, layout, NAPO_LOGITS_F32, lab, -100, lse, grad_token, grad_fast, layout, 1,
                                     &bad) == NAPO_OK);
  CHECK(t, napo_token_logps_backward_serial(logits, layout, NAPO_LOGITS_F32, lab, -100, lse, grad_token, grad_serial,
                                            layout, &bad) == NAPO_OK);
  double worst_ulps = 0.0;
  for (int r = 0; r < ROWS; ++r) {
    double largest = 0.0, error = 0.0;
    for (int v = 0; v < V; ++v) {
      largest = fmax(largest, fabs((double)grad_serial[r * V + v]));
      error = fmax(error, fabs((double)grad_fast[r * V + v] - (double)grad_serial[r * V + v]));
    }
    worst_ulps = fmax(worst_ulps, error / (FLT_EPSILON * largest));
  }
  CHECK(t, worst_ulps <= 2.0);
}

static void test_uniform_logits(tally *t) {
  enum { V = 5000 };
  float *logits = malloc(sizeof(float) * V * 2);
  if (logits == NULL) {
    CHECK(t, 0);
    return;
  }
  for (int i = 0; i < V * 2; ++i) {
    logits[i] = 1.5f;
  }
  const int64_t labels[2] = {7, V - 1};
  float token[2];
  double lse[2];
  napo_label_error bad;
  CHECK(t, napo_token_logps(logits, (napo_logits_layout){1, 2, V, 2 * V, V, 1}, NAPO_LOGITS_F32,
                            (napo_labels){labels, 2, 1}, -100, token, lse, 2, &bad) == NAPO_OK);
  CHECK(t, fabs(lse[0] - (1.5 + log((double)V))) < 1e-5 && fabs(token[1] + log((double)V)) < 1e-5);
  free(logits);
}

static void test_extremes(tally *t) {
  /* -inf entries (masked vocabulary) contribute nothing; a NaN poisons only its row. */
  const float logits[2][6] = {{-INFINITY, 0.0f, -INFINITY, 0.0f, -INFINITY, -INFINITY},
                              {1.0f, NAN, 1.0f, 1.0f, 1.0f, 1.0f}};
  const int64_t labels[2] = {1, 0};
  float token[2];
  double lse[2];
  napo_label_error bad;
  CHECK(t, napo_token_logps(logits, (napo_logits_layout){2, 1, 6, 6, 6, 1}, NAPO_LOGITS_F32,
                            (napo_labels){labels, 1, 1}, -100, token, lse, 1, &bad) == NAPO_OK);
  CHECK(t, fabs(token[0] + log(2.0)) < 1e-6 && isnan(token[1]) && isnan(lse[1]));
  /* Large logits do not overflow. */
  const float big[4] = {1e30f, 1e30f, -1e30f, 0.0f};
  const int64_t label0[1] = {0};
  CHECK(t, napo_token_logps(big, (napo_logits_layout){1, 1, 4, 4, 4, 1}, NAPO_LOGITS_F32, (napo_labels){label0, 1, 1},
                            -100, token, lse, 1, &bad) == NAPO_OK);
  CHECK(t, fabs(token[0] + log(2.0)) < 1e-6);
}

static void test_bad_input(tally *t) {
  const float logits[8] = {0};
  int64_t labels[4] = {0, 3, -100, 1};
  float token[4];
  double lse[4];
  napo_label_error bad = {0, 0, 0};
  const napo_logits_layout layout = {2, 2, 2, 4, 2, 1};
  CHECK(t, napo_token_logps(logits, layout, NAPO_LOGITS_F32, (napo_labels){labels, 2, 1}, -100, token, lse, 1, &bad) ==
               NAPO_ERR_LABEL);
  CHECK(t, bad.batch == 0 && bad.time == 1 && bad.value == 3);
  labels[1] = -5;
  CHECK(t, napo_token_logps(logits, layout, NAPO_LOGITS_F32, (napo_labels){labels, 2, 1}, -100, token, lse, 1, &bad) ==
               NAPO_ERR_LABEL);
  CHECK(t, bad.value == -5);
  labels[1] = -100;
  CHECK(t, napo_token_logps(logits, layout, NAPO_LOGITS_F32, (napo_labels){labels, 2, 1}, -100, token, lse, 1, &bad) ==
               NAPO_OK);
  CHECK(t, token[1] == 0.0f && token[2] == 0.0f);
  CHECK(t, napo_token_logps(logits, layout, (napo_logits_dtype)9, (napo_labels){labels, 2, 1}, -100, token, lse, 1,
                            &bad) == NAPO_ERR_DTYPE);
  CHECK(t, napo_token_logps(logits, (napo_logits_layout){2, 2, 0, 4, 2, 1}, NAPO_LOGITS_F32,
                            (napo_labels){labels, 2, 1}, -100, token, lse, 1, &bad) == NAPO_ERR_SIZE);
  CHECK(t, napo_token_logps(logits, (napo_logits_layout){2, 2, 2, INT64_MAX / 2, 2, 1}, NAPO_LOGITS_F32,
                            (napo_labels){labels, 2, 1}, -100, token, lse, 1, &bad) == NAPO_ERR_SIZE);
  CHECK(t, napo_token_logps(NULL, layout, NAPO_LOGITS_F32, (napo_labels){labels, 2, 1}, -100, token, lse, 1, &bad) ==
               NAPO_ERR_NULL_POINTER);
  CHECK(t, napo_token_logps(logits, layout, NAPO_LOGITS_F32, (napo_labels){NULL, 2, 1}, -100, token, lse, 1, &bad) ==
               NAPO_ERR_NULL_POINTER);
  CHECK(t, napo_token_logps(logits, layout, NAPO_LOGITS_F32, (napo_labels){labels, 2, 1}, -100, NULL, lse, 1, &bad) ==
               NAPO_ERR_NULL_POINTER);
  float grad[8];
  CHECK(t, napo_token_logps_backward(logits, layout, NAPO_LOGITS_F32, (napo_labels){labels, 2, 1}, -100, lse, token,
                                     grad, (napo_logits_layout){2, 2, 3, 6, 3, 1}, 1, &bad) == NAPO_ERR_SIZE);
  /* Empty batches are fine and write nothing. */
  CHECK(t, napo_token_logps(NULL, (napo_logits_layout){0, 5, 7, 35, 7, 1}, NAPO_LOGITS_F32, (napo_labels){NULL, 5, 1},
                            -100, NULL, NULL, 4, &bad) == NAPO_OK);
}

/* ---- the (max, sum) log-sum-exp merge shared by the CPU and CUDA kernels ---- */

typedef struct {
  double max, sum;
} lse_partial;

static int has_nan(lse_partial p) { return isnan(p.max) || isnan(p.sum); }

/* Every ordered pair and every order of three among normal, empty (-inf, 0), all -inf (-inf, 1),
 * all-NaN (-inf, NaN: the partial that the old CUDA merge dropped) and NaN-max partials: NaN in,
 * NaN out, whatever its position; otherwise sum * exp(max) is the total, and the order is
 * irrelevant (bitwise). Run for the double and the float32 (CUDA accumulator) variants. */
static void test_lse_merge(tally *t) {
  enum { N = 8 };
  const lse_partial parts[N] = {{1.5, 2.0},       {-3.0, 1.25}, {-INFINITY, 0.0}, {-INFINITY, 1.0},
                                {-INFINITY, NAN}, {NAN, NAN},   {0.5, NAN},       {40.0, 3.0}};
  int pairs_ok = 1, pairs_f32_ok = 1, triples_ok = 1;
  for (int i = 0; i < N; ++i) {
    for (int j = 0; j < N; ++j) {
      const lse_partial a = parts[i], b = parts[j];
      double m1 = a.max, s1 = a.sum, m2 = b.max, s2 = b.sum;
      napo_lse_merge(&m1, &s1, b.max, b.sum);
      napo_lse_merge(&m2, &s2, a.max, a.sum);
      float f_max = (float)a.max, f_sum = (float)a.sum;
      napo_lse_merge_f32(&f_max, &f_sum, (float)b.max, (float)b.sum);
      if (has_nan(a) || has_nan(b)) {
        pairs_ok &= isnan(s1) && isnan(s2) && isnan(m1) && isnan(m2);
        pairs_f32_ok &= isnan(f_sum) && isnan(f_max);
        continue;
      }
      const double total =
          (a.max == -INFINITY ? 0.0 : a.sum * exp(a.max)) + (b.max == -INFINITY ? 0.0 : b.sum * exp(b.max));
      const double merged = m1 == -INFINITY ? 0.0 : s1 * exp(m1);
      pairs_ok &= m1 == m2 && s1 == s2 && fabs(merged - total) <= 1e-14 * total;
      pairs_ok &= m1 == fmax(a.max, b.max) && (m1 != -INFINITY || s1 == 0.0);
      const double merged_f32 = f_max == -INFINITY ? 0.0 : (double)f_sum * exp((double)f_max);
      pairs_f32_ok &= fabs(merged_f32 - total) <= 1e-6 * total;
      for (int k = 0; k < N; ++k) {
        const int order[6][3] = {{i, j, k}, {i, k, j}, {j, i, k}, {j, k, i}, {k, i, j}, {k, j, i}};
        const int nan_in = has_nan(parts[k]);
        for (int o = 0; o < 6; ++o) {
          double m = -INFINITY, sum = 0.0;
          for (int p = 0; p < 3; ++p) {
            napo_lse_merge(&m, &sum, parts[order[o][p]].max, parts[order[o][p]].sum);
          }
          triples_ok &= nan_in ? isnan(sum) : !isnan(sum);
        }
      }
    }
  }
  CHECK(t, pairs_ok);
  CHECK(t, pairs_f32_ok);
  CHECK(t, triples_ok);
}

/* The CUDA forward's reduction, emulated: 256 threads each fold their strided logits one at a
 * time, then a tree merges shared[i] with shared[i + width]. With V = 7 or 123 most threads see at
 * most one logit, so a NaN logit makes its thread's partial (-inf, NaN), the other side of some
 * merge: the row's lse must still be NaN, for the NaN in every position. Without NaN, it matches
 * the float64 serial lse. */
static double emulated_block_lse(const float *row, int64_t vocab) {
  enum { THREADS = 256 };
  float max[THREADS], sum[THREADS];
  for (int thread = 0; thread < THREADS; ++thread) {
    max[thread] = -INFINITY;
    sum[thread] = 0.0f;
    for (int64_t v = thread; v < vocab; v += THREADS) {
      napo_lse_merge_f32(&max[thread], &sum[thread], row[v], 1.0f);
    }
  }
  for (int width = THREADS / 2; width > 0; width /= 2) {
    for (int thread = 0; thread < width; ++thread) {
      napo_lse_merge_f32(&max[thread], &sum[thread], max[thread + width], sum[thread + width]);
    }
  }
  return (double)max[0] + log((double)sum[0]);
}

static void test_block_reduction_keeps_nan(tally *t) {
  const int64_t vocabs[3] = {7, 123, 1000};
  int nan_ok = 1, finite_ok = 1, masked_ok = 1;
  for (int c = 0; c < 3; ++c) {
    const int64_t vocab = vocabs[c];
    float row[1000];
    for (int64_t v = 0; v < vocab; ++v) {
      row[v] = (float)(4.0 * uniform() - 2.0);
    }
    double serial = 0.0, max = -INFINITY;
    for (int64_t v = 0; v < vocab; ++v) {
      max = fmax(max, (double)row[v]);
    }
    for (int64_t v = 0; v < vocab; ++v) {
      serial += exp((double)row[v] - max);
    }
    finite_ok &= fabs(emulated_block_lse(row, vocab) - (max + log(serial))) <= 1e-5;
    for (int64_t position = 0; position < vocab; ++position) {
      const float kept = row[position];
      row[position] = NAN;
      nan_ok &= isnan(emulated_block_lse(row, vocab));
      row[position] = -INFINITY; /* a masked logit is simply absent */
      masked_ok &= isfinite(emulated_block_lse(row, vocab));
      row[position] = kept;
    }
  }
  CHECK(t, nan_ok);
  CHECK(t, finite_ok);
  CHECK(t, masked_ok);
}

/* The CPU kernels merge per-chunk (1024 logits) partials: a chunk of only NaN (or NaN and -inf)
 * followed by finite chunks must still give NaN, on the fast and the serial kernel alike. */
static void test_nan_chunk_propagates(tally *t) {
  enum { V = 3000 };
  float *logits = malloc(sizeof(float) * V * 3);
  if (logits == NULL) {
    CHECK(t, 0);
    return;
  }
  for (int r = 0; r < 3; ++r) {
    for (int v = 0; v < V; ++v) {
      logits[r * V + v] = (float)uniform();
    }
  }
  for (int v = 0; v < 1024; ++v) {
    logits[v] = NAN;                         /* row 0: its whole first chunk */
    logits[V + v] = v % 2 ? NAN : -INFINITY; /* row 1: NaN and -inf */
  }
  logits[2 * V + 2500] = NAN; /* row 2: one NaN in the last chunk */
  const int64_t labels[3] = {2000, 1500, 10};
  float token[3];
  double lse[3];
  napo_label_error bad;
  const napo_logits_layout layout = {3, 1, V, V, V, 1};
  CHECK(t, napo_token_logps(logits, layout, NAPO_LOGITS_F32, (napo_labels){labels, 1, 1}, -100, token, lse, 1, &bad) ==
               NAPO_OK);
  CHECK(t, isnan(token[0]) && isnan(lse[0]) && isnan(token[1]) && isnan(lse[1]) && isnan(token[2]) && isnan(lse[2]));
  CHECK(t, napo_token_logps_serial(logits, layout, NAPO_LOGITS_F32, (napo_labels){labels, 1, 1}, -100, token, lse,
                                   &bad) == NAPO_OK);
  CHECK(t, isnan(token[0]) && isnan(lse[0]) && isnan(token[1]) && isnan(lse[1]) && isnan(token[2]) && isnan(lse[2]));
  free(logits);
}

int main(void) {
  tally t = {0, 0};
  const napo_logits_dtype dtypes[4] = {NAPO_LOGITS_F32, NAPO_LOGITS_BF16, NAPO_LOGITS_F16, NAPO_LOGITS_F64};
  const int64_t shapes[][3] = {{3, 47, 123}, {2, 5, 4097}, {1, 1, 1}, {4, 3, 8}, {2, 9, 2049}};
  for (int d = 0; d < 4; ++d) {
    for (int s = 0; s < 5; ++s) {
      for (int threads = 1; threads <= 3; threads += 2) {
        compare_kernels(&t, dtypes[d], shapes[s][0], shapes[s][1], shapes[s][2], threads);
      }
    }
  }
  test_uniform_logits(&t);
  test_backward_precision(&t);
  test_extremes(&t);
  test_lse_merge(&t);
  test_block_reduction_keeps_nan(&t);
  test_nan_chunk_propagates(&t);
  test_bad_input(&t);
  printf("C logps: %d passed, %d failed\n", t.passed, t.failed);
  return t.failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
