/*
 * Scalar maths of the NaPO objective, shared by the CPU kernels, the CUDA
 * kernels and the C tests so that every backend evaluates the same stable
 * formulas. Everything is in double; callers round once on store.
 */
#ifndef NAPO_MATH_H
#define NAPO_MATH_H

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define NAPO_HD __host__ __device__ static inline
#else
#define NAPO_HD static inline
#endif

/* log(sigmoid(z)) = -softplus(-z), without overflow for any finite z. */
NAPO_HD double napo_log_sigmoid(double z) { return (z < 0.0 ? z : 0.0) - log1p(exp(-fabs(z))); }

NAPO_HD double napo_sigmoid(double z) {
  if (z >= 0.0) {
    return 1.0 / (1.0 + exp(-z));
  }
  const double e = exp(z); /* also reached by NaN, which then propagates */
  return e / (1.0 + e);
}

/* Clip that lets NaN through (fmin/fmax would silently replace it). */
NAPO_HD double napo_clip(double x, double lo, double hi) { return x < lo ? lo : (x > hi ? hi : x); }

/*
 * L_q(M) = (1 - sigmoid(z)^q) / q, written as -expm1(q * logsigmoid(z)) / q:
 * sigmoid(z)^q is never formed (it underflows for very negative z) and the
 * difference 1 - s^q is never taken (it cancels for small q). q == 0 is DPO.
 * The derivative dL/dM = -beta * sigmoid(z)^q * sigmoid(-z) shares exp(-|z|),
 * its log1p and the expm1 with the loss: three transcendentals for both.
 * Returns the loss and stores the derivative in *grad.
 */
NAPO_HD double napo_loss_and_grad(double margin, double q, double beta, double *grad) {
  const double z = beta * margin;
  const double e = exp(-fabs(z));
  const double log_sig = (z < 0.0 ? z : 0.0) - log1p(e);
  const double sig_neg = z >= 0.0 ? e / (1.0 + e) : 1.0 / (1.0 + e); /* sigmoid(-z); NaN stays NaN */
  if (q == 0.0) {
    *grad = -beta * sig_neg;
    return -log_sig;
  }
  const double x = q * log_sig;
  /* Below |x| = 1e-8, expm1(x) / q is log_sig * (1 + x / 2) to within x^2 / 6 < 2e-17 relative,
   * under half an ulp, and so is the derivative's sigmoid^q = exp(x) by 1 + x (error x^2 / 2).
   * There x may be subnormal (a subnormal q, or logsigmoid near 0 at a large margin) and has lost
   * its relative precision, so expm1(x) / q would be wrong: q = 5e-324 gave 1 instead of log 2.
   * Above 1e-8, x is a normal double and expm1(x) / q is accurate. */
  if (fabs(x) < 1e-8) {
    *grad = -beta * (1.0 + x) * sig_neg;
    return -log_sig * (1.0 + 0.5 * x);
  }
  const double t = expm1(x);
  /* sigmoid(z)^q = 1 + t, except where t is near -1 and 1 + t would cancel. */
  const double sig_pow = t > -0.5 ? 1.0 + t : exp(x);
  *grad = -beta * sig_pow * sig_neg;
  return -t / q;
}

/* A divisor for sums of finite values that overflow: K margins near DBL_MAX sum to inf although
 * their mean and every ratio R_k / sum R are representable. Then the sum is redone on the values
 * divided by this power of two (exact, unlike a division by the max itself), at most 2 each.
 * 1 when the sum is finite or a value is infinite (inf / inf is NaN either way). A NaN total is
 * rescaled too: a parallel sum of finite values can meet +inf and -inf partials (max_abs, taken
 * with fmax, skips NaN values, whose rescaled sum is NaN again). */
NAPO_HD double napo_sum_scale(double total, double max_abs) {
  return !isfinite(total) && isfinite(max_abs) && max_abs > 0.0 ? ldexp(1.0, ilogb(max_abs)) : 1.0;
}

/* The dynamic weight of a term with margin r (spec Eq. 13), given the scaled sum of all K margins (their
 * sum is scaled_total * scale, napo_sum_scale) and how many margins are +inf (counted only when
 * scaled_total is +inf, which means some are +inf and none is -inf or NaN):
 *  - total <= eps: uniform 1/K (step 0, and any sum at or below zero);
 *  - some R_j = +inf: the limit of R_k / sum R as those terms grow alike: each infinite term gets
 *    clip(1/m, w_min, 1) for m infinite terms and every finite term w_min (inf / inf was NaN);
 *  - otherwise clip(R_k / sum R, w_min, 1); NaN margins (or +inf with -inf) give NaN. */
NAPO_HD double napo_dynamic_weight(double r, double scale, double scaled_total, int64_t k, int64_t infinite,
                                   double w_min, double eps) {
  if (scaled_total * scale <= eps) {
    return 1.0 / (double)k;
  }
  if (infinite > 0) {
    return r == INFINITY ? napo_clip(1.0 / (double)infinite, w_min, 1.0) : w_min;
  }
  return napo_clip(r / scale / scaled_total, w_min, 1.0);
}

/* q = clip(2 * (1 - sigmoid(gamma * mean)), q_min, q_max), as 2 * sigmoid(-x). */
NAPO_HD double napo_q_value(double mean, double gamma, double q_min, double q_max) {
  return napo_clip(2.0 * napo_sigmoid(-gamma * mean), q_min, q_max);
}

/* q outside [0, 1] is an error; NaN is not (it propagates into the loss). */
NAPO_HD int napo_q_in_range(double q) { return !(q < 0.0 || q > 1.0); }

/*
 * Online log-sum-exp: a partial over some logits is (max, sum of exp(x - max)).
 * The empty partial, or one whose logits are all -inf, is (-inf, 0); a partial
 * that saw a NaN has sum NaN (its max may be anything, even -inf). merge folds
 * (other_max, other_sum) into (*max, *sum) in either order with the same
 * result, and
 *  - propagates NaN from either side: the test is on both sums and maxes, not
 *    on which max is larger, so an all-NaN partial (max -inf, sum NaN) is not
 *    dropped as "nothing to add" when it is the other side;
 *  - never evaluates exp(-inf - -inf) (NaN): a -inf side contributes 0.
 * A +inf logit gives NaN (exp(inf - inf)), as in the CPU kernels.
 * Defined for double (CPU kernels, float64 CUDA) and float (the CUDA kernels'
 * float32 accumulator), with the same body.
 */
#define NAPO_DEFINE_LSE_MERGE(name, real, exp_fn)                                                                      \
  NAPO_HD void name(real *max, real *sum, real other_max, real other_sum) {                                            \
    const real m = *max, s = *sum;                                                                                     \
    if (isnan(s) || isnan(other_sum) || isnan(m) || isnan(other_max)) {                                                \
      *max = (real)NAN;                                                                                                \
      *sum = (real)NAN;                                                                                                \
      return;                                                                                                          \
    }                                                                                                                  \
    const real top = m > other_max ? m : other_max;                                                                    \
    if (top == (real) - INFINITY) {                                                                                    \
      *max = top;                                                                                                      \
      *sum = (real)0;                                                                                                  \
      return;                                                                                                          \
    }                                                                                                                  \
    *sum = (m == (real) - INFINITY ? (real)0 : s * exp_fn(m - top)) +                                                  \
           (other_max == (real) - INFINITY ? (real)0 : other_sum * exp_fn(other_max - top));                           \
    *max = top;                                                                                                        \
  }

NAPO_DEFINE_LSE_MERGE(napo_lse_merge, double, exp)
NAPO_DEFINE_LSE_MERGE(napo_lse_merge_f32, float, expf)
#undef NAPO_DEFINE_LSE_MERGE

/* Neumaier-compensated running sum: the mean behind q stays exact to a few
 * ulps however long the batch, at the cost of two extra adds per element. */
typedef struct {
  double sum;
  double compensation;
} napo_sum_acc;

NAPO_HD void napo_sum_add(napo_sum_acc *acc, double x) {
  const double t = acc->sum + x;
  if (fabs(acc->sum) >= fabs(x)) {
    acc->compensation += (acc->sum - t) + x;
  } else {
    acc->compensation += (x - t) + acc->sum;
  }
  acc->sum = t;
}

/* Once the plain sum is inf or NaN the compensation is meaningless (inf - inf). */
NAPO_HD double napo_sum_value(const napo_sum_acc *acc) {
  return isfinite(acc->sum) ? acc->sum + acc->compensation : acc->sum;
}

#endif /* NAPO_MATH_H */
