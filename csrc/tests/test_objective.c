/*
 * C unit tests of the NaPO objective core, independent of Python. Built and
 * run by `make test-c` under AddressSanitizer and UBSan. Expected values are
 * closed forms (log 2, 1 - sigmoid, 2 / (1 + e), hand ratios), not outputs
 * copied from the code under test.
 */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "napo.h"
#include "napo_math.h"

static napo_layout vec(int64_t n, int64_t stride) { return (napo_layout){1, n, 0, stride}; }

static int close_rel(double actual, double expected, double rtol) {
  return fabs(actual - expected) <= rtol * fabs(expected) + 1e-300;
}

static void test_loss_closed_forms(tally *t) {
  const double margins[] = {-3.0, -0.5, 0.0, 0.5, 3.0};
  double loss[5];
  const double q_dpo = 0.0, q_mae = 1.0;
  CHECK(t, napo_loss_forward_f64(margins, vec(5, 1), &q_dpo, 0, 0.7, loss, NULL) == NAPO_OK);
  for (int i = 0; i < 5; ++i) {
    CHECK(t, close_rel(loss[i], log1p(exp(-0.7 * margins[i])), 1e-15)); /* -logsigmoid */
  }
  CHECK(t, close_rel(loss[2], log(2.0), 1e-15));
  CHECK(t, napo_loss_forward_f64(margins, vec(5, 1), &q_mae, 0, 0.7, loss, NULL) == NAPO_OK);
  for (int i = 0; i < 5; ++i) {
    CHECK(t, close_rel(loss[i], 1.0 / (1.0 + exp(0.7 * margins[i])), 1e-14)); /* 1 - sigmoid */
  }
  /* q = 1/2: (1 - sqrt(s)) / (1/2) at z = 0 is 2 - sqrt(2). */
  const double q_half = 0.5, zero = 0.0;
  double one_loss = 0.0;
  CHECK(t, napo_loss_forward_f64(&zero, vec(1, 1), &q_half, 0, 0.1, &one_loss, NULL) == NAPO_OK);
  CHECK(t, close_rel(one_loss, 2.0 - sqrt(2.0), 1e-15));
}

static void test_loss_extremes(tally *t) {
  const double margins[] = {-1e300, -1e4, -700.0, 700.0, 1e4, 1e300, INFINITY, -INFINITY};
  const double qs[] = {0.0, 1e-6, 0.3, 1.0};
  double loss[8], grad[8], ones[8];
  for (int i = 0; i < 8; ++i) {
    ones[i] = 1.0;
  }
  for (int k = 0; k < 4; ++k) {
    double factor[8];
    CHECK(t, napo_loss_forward_f64(margins, vec(8, 1), &qs[k], 0, 1.0, loss, factor) == NAPO_OK);
    CHECK(t, napo_loss_backward_f64(ones, vec(8, 1), factor, grad) == NAPO_OK);
    for (int i = 0; i < 7; ++i) {
      CHECK(t, isfinite(loss[i]) && loss[i] >= 0.0);
      CHECK(t, isfinite(grad[i]) && grad[i] <= 0.0 && grad[i] >= -1.0);
      if (qs[k] > 0.0) {
        CHECK(t, loss[i] <= 1.0 / qs[k]);
      }
    }
    /* M = -inf: DPO loss is +inf, NaPO's is its bound 1/q. */
    CHECK(t, qs[k] == 0.0 ? isinf(loss[7]) : close_rel(loss[7], 1.0 / qs[k], 1e-15));
  }
}

/* Where sigmoid(z)^q is tiny the derivative keeps full relative precision (no 1 + expm1 cancellation). */
static void test_grad_relative_precision(tally *t) {
  const double qs[] = {1.0, 0.5};
  for (int k = 0; k < 2; ++k) {
    for (double z = -60.0; z <= -2.0; z += 3.0) {
      double loss = 0.0, grad = 0.0;
      CHECK(t, napo_loss_forward_f64(&z, vec(1, 1), &qs[k], 0, 1.0, &loss, &grad) == NAPO_OK);
      const double s = 1.0 / (1.0 + exp(-z)); /* sigmoid(z), accurate for z < 0 */
      CHECK(t, close_rel(grad, -pow(s, qs[k]) * (1.0 - s), 1e-13));
    }
  }
}

static void test_loss_strided_float32_and_nan(tally *t) {
  const float margins[] = {1.0f, 99.0f, -2.0f, 99.0f, NAN, 99.0f};
  const float q = 0.25f;
  float loss[3];
  CHECK(t, napo_loss_forward_f32(margins, vec(3, 2), &q, 0, 1.0, loss, NULL) == NAPO_OK);
  const double s0 = 1.0 / (1.0 + exp(-1.0)), s1 = 1.0 / (1.0 + exp(2.0));
  CHECK(t, close_rel(loss[0], (1.0 - pow(s0, 0.25)) / 0.25, 1e-6));
  CHECK(t, close_rel(loss[1], (1.0 - pow(s1, 0.25)) / 0.25, 1e-6));
  CHECK(t, isnan(loss[2]));
  /* A NaN q propagates; it is not an out-of-range error. */
  const float nan_q = NAN;
  CHECK(t, napo_loss_forward_f32(margins, vec(3, 2), &nan_q, 0, 1.0, loss, NULL) == NAPO_OK && isnan(loss[0]));
}

static void test_backward_matches_finite_differences(tally *t) {
  const double qs[] = {0.0, 0.4, 1.0};
  for (int k = 0; k < 3; ++k) {
    for (double m = -20.0; m <= 20.0; m += 2.5) {
      const double h = 1e-6, one = 1.0;
      double lp = 0.0, lm = 0.0, g = 0.0;
      const double mp = m + h, mm = m - h;
      CHECK(t, napo_loss_forward_f64(&mp, vec(1, 1), &qs[k], 0, 0.3, &lp, NULL) == NAPO_OK);
      CHECK(t, napo_loss_forward_f64(&mm, vec(1, 1), &qs[k], 0, 0.3, &lm, NULL) == NAPO_OK);
      double l0 = 0.0, factor = 0.0;
      CHECK(t, napo_loss_forward_f64(&m, vec(1, 1), &qs[k], 0, 0.3, &l0, &factor) == NAPO_OK);
      CHECK(t, napo_loss_backward_f64(&one, vec(1, 1), &factor, &g) == NAPO_OK);
      CHECK(t, fabs(g - (lp - lm) / (2 * h)) <= 1e-8);
    }
  }
}

/* Several terms at once: row r uses q[r]; rows may be strided, transposed or reversed. */
static void test_loss_rows(tally *t) {
  /* A 3 x 4 storage read as its transpose (4 rows of 3): row r is column r of the storage. */
  const double storage[12] = {0.5, -1.0, 2.0, 4.0, -3.0, 0.0, 1.5, 7.0, 9.0, -0.5, 3.0, -2.0};
  const napo_layout transposed = {4, 3, 1, 4};
  const double q[8] = {0.0, -1.0, 0.5, -1.0, 1.0, -1.0, 0.25, -1.0}; /* every other entry: q_stride 2 */
  double loss[12], grad[12];
  const double upstream[1] = {2.0}; /* broadcast gradient: zero strides */
  const napo_layout broadcast = {4, 3, 0, 0};
  double factor[12];
  CHECK(t, napo_loss_forward_f64(storage, transposed, q, 2, 0.5, loss, factor) == NAPO_OK);
  CHECK(t, napo_loss_backward_f64(upstream, broadcast, factor, grad) == NAPO_OK);
  for (int r = 0; r < 4; ++r) {
    for (int c = 0; c < 3; ++c) {
      const double m = storage[c * 4 + r], qr = q[2 * r], z = 0.5 * m;
      const double s = 1.0 / (1.0 + exp(-z));
      const double expected = qr == 0.0 ? -log(s) : (1.0 - pow(s, qr)) / qr;
      CHECK(t, close_rel(loss[r * 3 + c], expected, 1e-13));
      CHECK(t, close_rel(grad[r * 3 + c], 2.0 * -0.5 * pow(s, qr) * (1.0 - s), 1e-13));
    }
  }
  /* Reversed rows through a negative stride, starting from the last row. */
  const napo_layout reversed = {2, 3, -3, 1};
  const double two_rows[6] = {1.0, 2.0, 3.0, -1.0, -2.0, -3.0};
  const double q_rows[2] = {1.0, 1.0};
  double out[6];
  CHECK(t, napo_loss_forward_f64(two_rows + 3, reversed, q_rows, 1, 1.0, out, NULL) == NAPO_OK);
  CHECK(t, close_rel(out[0], 1.0 / (1.0 + exp(-1.0)), 1e-15) && close_rel(out[3], 1.0 / (1.0 + exp(1.0)), 1e-15));
  /* One bad q in any row rejects the call before anything is written. */
  const double q_bad[2] = {0.5, 2.0};
  out[0] = 42.0;
  CHECK(t, napo_loss_forward_f64(two_rows, (napo_layout){2, 3, 3, 1}, q_bad, 1, 1.0, out, NULL) == NAPO_ERR_Q_RANGE);
  CHECK(t, out[0] == 42.0);
  /* Overflowing and negative layouts. */
  CHECK(t, napo_loss_backward_f64(upstream, (napo_layout){-4, 2, 0, 0}, factor, grad) == NAPO_ERR_SIZE);
  CHECK(t, napo_loss_forward_f64(storage, (napo_layout){INT64_MAX / 4, INT64_MAX / 4, 1, 1}, q, 0, 0.5, loss, NULL) ==
               NAPO_ERR_SIZE);
  CHECK(t, napo_loss_forward_f64(storage, (napo_layout){3, -1, 1, 1}, q, 0, 0.5, loss, NULL) == NAPO_ERR_SIZE);
  /* Elementwise q from several means. */
  const double means[3] = {0.0, 2.0, -1.0};
  double qs[3];
  CHECK(t, napo_q_from_mean_f64(means, 3, 1, 0.5, 0.001, 1.0, qs) == NAPO_OK);
  CHECK(t, qs[0] == 1.0 && close_rel(qs[1], 2.0 / (1.0 + exp(1.0)), 1e-15) && qs[2] == 1.0);
}

static void test_adaptive_q(tally *t) {
  const double zeros[4] = {0.0, 0.0, 0.0, 0.0};
  double q = -1.0;
  CHECK(t, napo_adaptive_q_f64(zeros, 1, 4, 0.5, 0.001, 1.0, &q) == NAPO_OK && q == 1.0);
  const double margins[] = {1.0, 3.0}; /* mean 2, gamma 0.5: 2 * sigmoid(-1) = 2 / (1 + e) */
  CHECK(t, napo_adaptive_q_f64(margins, 1, 2, 0.5, 0.001, 1.0, &q) == NAPO_OK);
  CHECK(t, close_rel(q, 2.0 / (1.0 + exp(1.0)), 1e-15));
  const double big[] = {1e5, 1e5};
  CHECK(t, napo_adaptive_q_f64(big, 1, 2, 0.5, 0.001, 1.0, &q) == NAPO_OK && q == 0.001);
  const double negative[] = {-4.0, -9.0};
  CHECK(t, napo_adaptive_q_f64(negative, 1, 2, 0.5, 0.001, 0.8, &q) == NAPO_OK && q == 0.8);
  const double mean = 2.0;
  float q32 = 0.0f;
  const float mean32 = 2.0f;
  CHECK(t,
        napo_q_from_mean_f64(&mean, 1, 1, 0.5, 0.0, 1.0, &q) == NAPO_OK && close_rel(q, 2.0 / (1.0 + exp(1.0)), 1e-15));
  CHECK(t, napo_q_from_mean_f32(&mean32, 1, 1, 0.5, 0.0, 1.0, &q32) == NAPO_OK &&
               close_rel(q32, 2.0 / (1.0 + exp(1.0)), 1e-7));
  /* The compensated mean of many values that cancel stays exact. */
  enum { N = 100001 };
  double *values = malloc(sizeof(double) * N);
  CHECK(t, values != NULL);
  if (values != NULL) {
    for (int i = 0; i < N; ++i) {
      values[i] = (i % 2 == 0 ? 1e8 : -1e8) + 0.1;
    }
    /* sum = 1e8 (one unpaired) + 0.1 N */
    CHECK(t, napo_adaptive_q_f64(values, 1, N, 1e-9, 0.0, 1.0, &q) == NAPO_OK);
    const double expected_mean = (1e8 + 0.1 * N) / N;
    CHECK(t, close_rel(q, 2.0 / (1.0 + exp(1e-9 * expected_mean)), 1e-15));
    free(values);
  }
}

static void test_dynamic_weights(tally *t) {
  const double r[] = {1.0, 2.0, 3.0};
  double w[3];
  CHECK(t, napo_dynamic_weights_f64(r, 1, 3, 0.01, 1e-8, w) == NAPO_OK);
  CHECK(t, close_rel(w[0], 1.0 / 6, 1e-15) && close_rel(w[1], 1.0 / 3, 1e-15) && close_rel(w[2], 0.5, 1e-15));
  const double mixed[] = {-1.0, 2.0, 0.5}; /* sum 1.5: -2/3 -> w_min, 4/3 -> 1 */
  CHECK(t, napo_dynamic_weights_f64(mixed, 1, 3, 0.01, 1e-8, w) == NAPO_OK);
  CHECK(t, w[0] == 0.01 && w[1] == 1.0 && close_rel(w[2], 1.0 / 3, 1e-15));
  const double zeros[] = {0.0, 0.0, 0.0};
  CHECK(t, napo_dynamic_weights_f64(zeros, 1, 3, 0.01, 1e-8, w) == NAPO_OK);
  CHECK(t, w[0] == 1.0 / 3 && w[1] == 1.0 / 3 && w[2] == 1.0 / 3);
  const float strided[] = {2.0f, 100.0f, 2.0f, 100.0f};
  float w32[2];
  CHECK(t, napo_dynamic_weights_f32(strided, 2, 2, 0.01, 1e-8, w32) == NAPO_OK && w32[0] == 0.5f && w32[1] == 0.5f);
  const double with_nan[] = {1.0, NAN};
  CHECK(t, napo_dynamic_weights_f64(with_nan, 1, 2, 0.01, 1e-8, w) == NAPO_OK && isnan(w[0]) && isnan(w[1]));
}

/* A subnormal q: q * logsigmoid(z) is subnormal too and carries no relative precision, so
 * -expm1(q * logsigmoid) / q at M = 0 came out as 1 instead of log 2. The loss is DPO's times
 * 1 + q logsigmoid / 2, and its derivative DPO's times sigmoid^q = 1 + q logsigmoid, to second order. */
static void test_loss_subnormal_and_tiny_q(tally *t) {
  const double qs[] = {DBL_TRUE_MIN, 1e-310, DBL_MIN, 1e-300, 1e-20, 1e-12};
  const double margins[] = {-30.0, -1.0, 0.0, 0.5, 20.0};
  for (int k = 0; k < 6; ++k) {
    double loss[5], factor[5];
    CHECK(t, napo_loss_forward_f64(margins, vec(5, 1), &qs[k], 0, 1.0, loss, factor) == NAPO_OK);
    for (int i = 0; i < 5; ++i) {
      const double dpo = log1p(exp(-margins[i])); /* -logsigmoid(M), M >= -30 keeps it accurate */
      const double x = -qs[k] * dpo;              /* q logsigmoid(M), |x| <= 3e-11: x^2 is negligible */
      CHECK(t, close_rel(loss[i], dpo * (1.0 + x / 2.0), 4e-16));
      CHECK(t, close_rel(factor[i], -(1.0 + x) / (1.0 + exp(margins[i])), 4e-16)); /* -sigmoid(M)^q sigmoid(-M) */
    }
    CHECK(t, qs[k] > 1e-30 || close_rel(loss[2], log(2.0), 2e-16));
  }
  /* Where q |logsigmoid| is small but not negligible the second-order term counts:
   * (1 - s^q) / q = -log s * (1 + q log s / 2 + (q log s)^2 / 6 + ...). */
  const double q = 1e-9, m = -40.0;
  double loss = 0.0;
  CHECK(t, napo_loss_forward_f64(&m, vec(1, 1), &q, 0, 1.0, &loss, NULL) == NAPO_OK);
  const double log_s = -40.0 - log1p(exp(-40.0)), x = q * log_s;
  CHECK(t, close_rel(loss, -log_s * (1.0 + x / 2.0 + x * x / 6.0), 4e-16));
}

/* The rescaling rule the CPU and CUDA sums share. A CUDA block sums per thread, then pairwise: finite
 * margins can give +inf and -inf partials, whose sum is NaN, not inf. */
static void test_sum_scale(tally *t) {
  const double top = ldexp(1.0, 1023);
  CHECK(t, napo_sum_scale(INFINITY, 1e308) == top && napo_sum_scale(-INFINITY, 1e308) == top);
  CHECK(t, napo_sum_scale(NAN, 1e308) == top);
  CHECK(t, napo_sum_scale(3.0, 1e308) == 1.0 && napo_sum_scale(INFINITY, INFINITY) == 1.0);
  CHECK(t, napo_sum_scale(NAN, 0.0) == 1.0 && napo_sum_scale(INFINITY, 3.0) == 2.0);
}

/* The mean of finite margins is finite, but their running sum may overflow. */
static void test_adaptive_q_huge_margins(tally *t) {
  const double cancelling[] = {1e308, 1e308, -1e308, -1e308}; /* mean 0: q = 1 */
  double q = -1.0;
  CHECK(t, napo_adaptive_q_f64(cancelling, 1, 4, 0.5, 0.001, 1.0, &q) == NAPO_OK && q == 1.0);
  const double huge[] = {1e308, 1e308}; /* mean 1e308, gamma 1e-310: q = 2 sigmoid(-0.01) */
  CHECK(t, napo_adaptive_q_f64(huge, 1, 2, 1e-310, 0.001, 1.0, &q) == NAPO_OK);
  CHECK(t, close_rel(q, 2.0 / (1.0 + exp(0.01)), 1e-14));
  const double with_inf[] = {INFINITY, -1e308, -1e308}; /* an infinite margin stays an infinite mean */
  CHECK(t, napo_adaptive_q_f64(with_inf, 1, 3, 0.5, 0.001, 1.0, &q) == NAPO_OK && q == 0.001);
}

/* The sum of the margins may overflow although every ratio R_k / sum R is representable. */
static void test_dynamic_weights_huge_margins(tally *t) {
  const double huge[] = {1e308, 1e308, 1e308};
  double w[3];
  CHECK(t, napo_dynamic_weights_f64(huge, 1, 3, 0.01, 1e-8, w) == NAPO_OK);
  CHECK(t, close_rel(w[0], 1.0 / 3, 1e-15) && close_rel(w[1], 1.0 / 3, 1e-15) && close_rel(w[2], 1.0 / 3, 1e-15));
  /* The partial sum overflows, the total (1e308) does not: 1, 1 and -1 -> w_min. */
  const double mixed[] = {1e308, 1e308, -1e308};
  CHECK(t, napo_dynamic_weights_f64(mixed, 1, 3, 0.01, 1e-8, w) == NAPO_OK);
  CHECK(t, close_rel(w[0], 1.0, 1e-15) && close_rel(w[1], 1.0, 1e-15) && w[2] == 0.01);
  /* A negative total below -DBL_MAX is still <= eps: uniform. */
  const double negative[] = {-1e308, -1e308, 5e307};
  CHECK(t, napo_dynamic_weights_f64(negative, 1, 3, 0.01, 1e-8, w) == NAPO_OK);
  CHECK(t, w[0] == 1.0 / 3 && w[1] == 1.0 / 3 && w[2] == 1.0 / 3);
  const double largest[] = {DBL_MAX, DBL_MAX, DBL_MAX, DBL_MAX};
  double w4[4];
  CHECK(t, napo_dynamic_weights_f64(largest, 1, 4, 0.0, 0.0, w4) == NAPO_OK);
  CHECK(t, w4[0] == 0.25 && w4[1] == 0.25 && w4[2] == 0.25 && w4[3] == 0.25);
}

/* R_k = +inf is the limit of a term growing without bound: its share R_k / sum R tends to 1 (to 1/m
 * for m terms growing alike) and every finite term's to 0, clipped to w_min. inf / inf gave NaN. */
static void test_dynamic_weights_infinite_margins(tally *t) {
  double w[4];
  const double one_inf[] = {INFINITY, 1.0, 1.0};
  CHECK(t, napo_dynamic_weights_f64(one_inf, 1, 3, 0.01, 1e-8, w) == NAPO_OK && w[0] == 1.0 && w[1] == 0.01 &&
               w[2] == 0.01);
  const double two_inf[] = {INFINITY, -5.0, INFINITY, 1e308};
  CHECK(t, napo_dynamic_weights_f64(two_inf, 1, 4, 0.01, 1e-8, w) == NAPO_OK && w[0] == 0.5 && w[1] == 0.01 &&
               w[2] == 0.5 && w[3] == 0.01);
  const float all_inf[] = {INFINITY, INFINITY, INFINITY};
  float w32[3];
  CHECK(t, napo_dynamic_weights_f32(all_inf, 1, 3, 0.5, 1e-8, w32) == NAPO_OK && w32[0] == 0.5f && w32[2] == 0.5f);
  /* +inf and -inf together have no limit: NaN, as a NaN margin gives; -inf alone is a total <= eps. */
  const double both[] = {INFINITY, -INFINITY, 1.0};
  CHECK(t, napo_dynamic_weights_f64(both, 1, 3, 0.01, 1e-8, w) == NAPO_OK && isnan(w[0]) && isnan(w[2]));
  const double with_nan[] = {INFINITY, NAN, 1.0};
  CHECK(t, napo_dynamic_weights_f64(with_nan, 1, 3, 0.01, 1e-8, w) == NAPO_OK && isnan(w[0]) && isnan(w[2]));
  const double minus_inf[] = {-INFINITY, 1.0};
  CHECK(t, napo_dynamic_weights_f64(minus_inf, 1, 2, 0.01, 1e-8, w) == NAPO_OK && w[0] == 0.5 && w[1] == 0.5);
}

static void test_bad_arguments(tally *t) {
  const double m[] = {0.0, 1.0};
  double out[2];
  const double q_ok = 0.5, q_high = 1.5, q_low = -0.1;
  CHECK(t, napo_loss_forward_f64(m, vec(2, 1), &q_high, 0, 0.1, out, NULL) == NAPO_ERR_Q_RANGE);
  CHECK(t, napo_loss_forward_f64(m, vec(2, 1), &q_low, 0, 0.1, out, NULL) == NAPO_ERR_Q_RANGE);
  CHECK(t, napo_loss_forward_f64(m, vec(2, 1), &q_ok, 0, 0.0, out, NULL) == NAPO_ERR_PARAMETER);
  CHECK(t, napo_loss_forward_f64(m, vec(2, 1), &q_ok, 0, NAN, out, NULL) == NAPO_ERR_PARAMETER);
  CHECK(t, napo_loss_forward_f64(m, vec(-1, 1), &q_ok, 0, 0.1, out, NULL) == NAPO_ERR_SIZE);
  CHECK(t, napo_loss_forward_f64(NULL, vec(2, 1), &q_ok, 0, 0.1, out, NULL) == NAPO_ERR_NULL_POINTER);
  CHECK(t, napo_loss_forward_f64(m, vec(2, 1), NULL, 0, 0.1, out, NULL) == NAPO_ERR_NULL_POINTER);
  CHECK(t, napo_loss_forward_f64(m, vec(2, 1), &q_ok, 0, 0.1, NULL, NULL) == NAPO_ERR_NULL_POINTER);
  CHECK(t,
        napo_loss_forward_f64(NULL, vec(0, 1), &q_ok, 0, 0.1, NULL, NULL) == NAPO_OK); /* empty is fine for the loss */
  CHECK(t, napo_loss_forward_f64(m, vec(2, INT64_MAX / 2), &q_ok, 0, 0.1, out, NULL) ==
               NAPO_ERR_SIZE); /* offset overflow */
  CHECK(t, napo_loss_backward_f64(m, vec(2, 1), NULL, out) == NAPO_ERR_NULL_POINTER);
  CHECK(t, napo_loss_backward_f64(m, vec(2, 1), m, NULL) == NAPO_ERR_NULL_POINTER);
  CHECK(t, napo_loss_backward_f64(NULL, vec(0, 1), NULL, NULL) == NAPO_OK);
  double q = 0.0;
  CHECK(t, napo_adaptive_q_f64(m, 1, 0, 0.5, 0.0, 1.0, &q) == NAPO_ERR_SIZE); /* mean of nothing */
  CHECK(t, napo_adaptive_q_f64(m, 1, 2, 0.0, 0.0, 1.0, &q) == NAPO_ERR_PARAMETER);
  CHECK(t, napo_adaptive_q_f64(m, 1, 2, INFINITY, 0.0, 1.0, &q) == NAPO_ERR_PARAMETER);
  CHECK(t, napo_adaptive_q_f64(m, 1, 2, 0.5, 0.6, 0.5, &q) == NAPO_ERR_PARAMETER);
  CHECK(t, napo_adaptive_q_f64(m, 1, 2, 0.5, 0.0, 1.5, &q) == NAPO_ERR_PARAMETER);
  CHECK(t, napo_adaptive_q_f64(m, 1, 2, 0.5, 0.0, 1.0, NULL) == NAPO_ERR_NULL_POINTER);
  CHECK(t, napo_q_from_mean_f64(NULL, 1, 1, 0.5, 0.0, 1.0, &q) == NAPO_ERR_NULL_POINTER);
  CHECK(t, napo_dynamic_weights_f64(m, 1, 0, 0.01, 1e-8, out) == NAPO_ERR_SIZE); /* K = 0 */
  CHECK(t, napo_dynamic_weights_f64(m, 1, 2, 1.5, 1e-8, out) == NAPO_ERR_PARAMETER);
  CHECK(t, napo_dynamic_weights_f64(m, 1, 2, 0.01, -1.0, out) == NAPO_ERR_PARAMETER);
  CHECK(t, strcmp(napo_status_message(NAPO_ERR_Q_RANGE), "q must lie in [0, 1]") == 0);
  CHECK(t, strcmp(napo_status_message((napo_status)99), "unknown napo status") == 0);
}

int main(void) {
  tally t = {0, 0};
  test_loss_closed_forms(&t);
  test_loss_extremes(&t);
  test_loss_strided_float32_and_nan(&t);
  test_grad_relative_precision(&t);
  test_backward_matches_finite_differences(&t);
  test_loss_rows(&t);
  test_adaptive_q(&t);
  test_dynamic_weights(&t);
  test_loss_subnormal_and_tiny_q(&t);
  test_dynamic_weights_huge_margins(&t);
  test_dynamic_weights_infinite_margins(&t);
  test_adaptive_q_huge_margins(&t);
  test_sum_scale(&t);
  test_bad_arguments(&t);
  printf("C core: %d passed, %d failed\n", t.passed, t.failed);
  return t.failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
