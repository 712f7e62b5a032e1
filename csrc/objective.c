/*
 * CPU kernels of the NaPO objective. Each public napo_<op>_<dtype> entry point
 * checks its arguments and forwards to one dtype-generic loop: these vectors
 * hold one value per preference pair (or per loss term), so a per-element
 * dtype branch costs nothing measurable and keeps one copy of each loop.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "napo.h"
#include "napo_math.h"

typedef enum { NAPO_F32, NAPO_F64 } napo_dtype;

static double load(const void *base, napo_dtype dtype, int64_t index) {
  return dtype == NAPO_F32 ? (double)((const float *)base)[index] : ((const double *)base)[index];
}

static void store(void *base, napo_dtype dtype, int64_t index, double value) {
  if (dtype == NAPO_F32) {
    ((float *)base)[index] = (float)value;
  } else {
    ((double *)base)[index] = value;
  }
}

const char *napo_status_message(napo_status status) {
  switch (status) {
  case NAPO_OK:
    return "ok";
  case NAPO_ERR_NULL_POINTER:
    return "a required pointer is NULL";
  case NAPO_ERR_SIZE:
    return "a length or stride is out of range";
  case NAPO_ERR_Q_RANGE:
    return "q must lie in [0, 1]";
  case NAPO_ERR_PARAMETER:
    return "a scalar parameter is out of range";
  case NAPO_ERR_CUDA:
    return "a CUDA runtime call failed";
  case NAPO_ERR_NO_CUDA:
    return "napo was built without CUDA kernels";
  case NAPO_ERR_LABEL:
    return "a label is outside [0, vocab) and is not ignore_index";
  case NAPO_ERR_DTYPE:
    return "unsupported dtype";
  case NAPO_ERR_THREAD:
    return "a worker thread failed";
  }
  return "unknown napo status";
}

napo_status napo_check_vector(const void *data, int64_t n, int64_t stride, int allow_empty) {
  if (n < 0 || (n == 0 && !allow_empty)) {
    return NAPO_ERR_SIZE;
  }
  if (n == 0) {
    return NAPO_OK;
  }
  if (data == NULL) {
    return NAPO_ERR_NULL_POINTER;
  }
  /* The furthest element sits |stride| * (n - 1) elements away; keep its byte
   * offset representable so no index computation below can overflow. */
  const int64_t max_elements = INT64_MAX / (int64_t)sizeof(double);
  if (stride < -max_elements || stride > max_elements) {
    return NAPO_ERR_SIZE;
  }
  const int64_t abs_stride = stride < 0 ? -stride : stride;
  if (abs_stride != 0 && n - 1 > max_elements / abs_stride) {
    return NAPO_ERR_SIZE;
  }
  return NAPO_OK;
}

/* |a| * b <= limit without overflow, for a, b >= 0 after the sign is dropped. */
static int product_within(int64_t a, int64_t b, int64_t limit) {
  const int64_t abs_a = a < 0 ? -a : a;
  return abs_a == 0 || b <= limit / abs_a;
}

napo_status napo_check_layout(const void *data, napo_layout layout) {
  if (layout.rows < 0 || layout.cols < 0) {
    return NAPO_ERR_SIZE;
  }
  if (layout.rows == 0 || layout.cols == 0) {
    return NAPO_OK;
  }
  if (data == NULL) {
    return NAPO_ERR_NULL_POINTER;
  }
  /* Both the furthest offset and the compact output size must stay representable in bytes. */
  const int64_t half = INT64_MAX / (int64_t)sizeof(double) / 2;
  if (layout.row_stride < -half || layout.row_stride > half || layout.col_stride < -half || layout.col_stride > half ||
      !product_within(layout.row_stride, layout.rows - 1, half) ||
      !product_within(layout.col_stride, layout.cols - 1, half) || !product_within(layout.rows, layout.cols, half)) {
    return NAPO_ERR_SIZE;
  }
  return NAPO_OK;
}

napo_status napo_check_loss_params(double beta) {
  return (isfinite(beta) && beta > 0.0) ? NAPO_OK : NAPO_ERR_PARAMETER;
}

napo_status napo_check_q_params(double gamma, double q_min, double q_max) {
  if (!(isfinite(gamma) && gamma > 0.0)) {
    return NAPO_ERR_PARAMETER;
  }
  if (!(q_min >= 0.0 && q_min <= q_max && q_max <= 1.0)) {
    return NAPO_ERR_PARAMETER;
  }
  return NAPO_OK;
}

napo_status napo_check_weight_params(double w_min, double eps) {
  if (!(w_min >= 0.0 && w_min <= 1.0)) {
    return NAPO_ERR_PARAMETER;
  }
  return (isfinite(eps) && eps >= 0.0) ? NAPO_OK : NAPO_ERR_PARAMETER;
}

/* ---- loss ---- */

napo_status napo_check_loss_forward_args(const void *margins, napo_layout layout, const void *q, int64_t q_stride,
                                         double beta, const void *loss) {
  napo_status status = napo_check_layout(margins, layout);
  if (status != NAPO_OK || (status = napo_check_loss_params(beta)) != NAPO_OK) {
    return status;
  }
  if (layout.rows == 0 || layout.cols == 0) {
    return NAPO_OK;
  }
  if (loss == NULL || q == NULL) {
    return NAPO_ERR_NULL_POINTER;
  }
  return product_within(q_stride, layout.rows, INT64_MAX / (int64_t)sizeof(double)) ? NAPO_OK : NAPO_ERR_SIZE;
}

static napo_status loss_forward(const void *margins, napo_layout layout, const void *q, int64_t q_stride, double beta,
                                void *loss, void *grad_factor, napo_dtype dtype) {
  const napo_status status = napo_check_loss_forward_args(margins, layout, q, q_stride, beta, loss);
  if (status != NAPO_OK || layout.rows == 0 || layout.cols == 0) {
    return status;
  }
  /* Every row's q is validated before anything is written. */
  for (int64_t r = 0; r < layout.rows; ++r) {
    if (!napo_q_in_range(load(q, dtype, r * q_stride))) {
      return NAPO_ERR_Q_RANGE;
    }
  }
  for (int64_t r = 0; r < layout.rows; ++r) {
    const double q_value = load(q, dtype, r * q_stride);
    for (int64_t c = 0; c < layout.cols; ++c) {
      const double margin = load(margins, dtype, r * layout.row_stride + c * layout.col_stride);
      double grad = 0.0;
      store(loss, dtype, r * layout.cols + c, napo_loss_and_grad(margin, q_value, beta, &grad));
      if (grad_factor != NULL) {
        store(grad_factor, dtype, r * layout.cols + c, grad);
      }
    }
  }
  return NAPO_OK;
}

static napo_status loss_backward(const void *grad_loss, napo_layout grad_layout, const void *grad_factor,
                                 void *grad_margins, napo_dtype dtype) {
  const napo_status status = napo_check_layout(grad_loss, grad_layout);
  if (status != NAPO_OK) {
    return status;
  }
  if (grad_layout.rows == 0 || grad_layout.cols == 0) {
    return NAPO_OK;
  }
  if (grad_factor == NULL || grad_margins == NULL) {
    return NAPO_ERR_NULL_POINTER;
  }
  for (int64_t r = 0; r < grad_layout.rows; ++r) {
    for (int64_t c = 0; c < grad_layout.cols; ++c) {
      const int64_t i = r * grad_layout.cols + c;
      const double upstream = load(grad_loss, dtype, r * grad_layout.row_stride + c * grad_layout.col_stride);
      store(grad_margins, dtype, i, upstream * load(grad_factor, dtype, i));
    }
  }
  return NAPO_OK;
}

/* ---- adaptive q ---- */

/* Compensated sum of values / *scale, where *scale is 1 unless the plain sum of finite values
 * overflows: then it is redone on values divided by a power of two near the largest (exact). */
static double scaled_sum(const void *values, int64_t stride, int64_t n, napo_dtype dtype, double *scale) {
  napo_sum_acc acc = {0.0, 0.0};
  double max_abs = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = load(values, dtype, i * stride);
    napo_sum_add(&acc, x);
    max_abs = fmax(max_abs, fabs(x));
  }
  *scale = napo_sum_scale(napo_sum_value(&acc), max_abs);
  if (*scale != 1.0) {
    acc = (napo_sum_acc){0.0, 0.0};
    for (int64_t i = 0; i < n; ++i) {
      napo_sum_add(&acc, load(values, dtype, i * stride) / *scale);
    }
  }
  return napo_sum_value(&acc);
}

static double mean_of(const void *values, int64_t stride, int64_t n, napo_dtype dtype) {
  double scale = 1.0;
  const double sum = scaled_sum(values, stride, n, dtype, &scale);
  return sum / (double)n * scale;
}

static napo_status adaptive_q(const void *margins, int64_t stride, int64_t n, double gamma, double q_min, double q_max,
                              void *q_out, napo_dtype dtype) {
  napo_status status = napo_check_vector(margins, n, stride, 0);
  if (status != NAPO_OK) {
    return status;
  }
  if (q_out == NULL) {
    return NAPO_ERR_NULL_POINTER;
  }
  if ((status = napo_check_q_params(gamma, q_min, q_max)) != NAPO_OK) {
    return status;
  }
  store(q_out, dtype, 0, napo_q_value(mean_of(margins, stride, n, dtype), gamma, q_min, q_max));
  return NAPO_OK;
}

static napo_status q_from_mean(const void *means, int64_t n, int64_t stride, double gamma, double q_min, double q_max,
                               void *q_out, napo_dtype dtype) {
  napo_status status = napo_check_vector(means, n, stride, 1);
  if (status != NAPO_OK || (status = napo_check_q_params(gamma, q_min, q_max)) != NAPO_OK) {
    return status;
  }
  if (n > 0 && q_out == NULL) {
    return NAPO_ERR_NULL_POINTER;
  }
  for (int64_t i = 0; i < n; ++i) {
    store(q_out, dtype, i, napo_q_value(load(means, dtype, i * stride), gamma, q_min, q_max));
  }
  return NAPO_OK;
}

/* ---- dynamic weights ---- */

static napo_status dynamic_weights(const void *reward_margins, int64_t stride, int64_t k, double w_min, double eps,
                                   void *weights, napo_dtype dtype) {
  napo_status status = napo_check_vector(reward_margins, k, stride, 0);
  if (status != NAPO_OK) {
    return status;
  }
  if (weights == NULL) {
    return NAPO_ERR_NULL_POINTER;
  }
  if ((status = napo_check_weight_params(w_min, eps)) != NAPO_OK) {
    return status;
  }
  double scale = 1.0;
  const double scaled_total = scaled_sum(reward_margins, stride, k, dtype, &scale);
  int64_t infinite = 0;
  if (scaled_total == INFINITY) { /* some margin is +inf, none -inf or NaN */
    for (int64_t i = 0; i < k; ++i) {
      infinite += load(reward_margins, dtype, i * stride) == INFINITY;
    }
  }
  for (int64_t i = 0; i < k; ++i) {
    const double r = load(reward_margins, dtype, i * stride);
    store(weights, dtype, i, napo_dynamic_weight(r, scale, scaled_total, k, infinite, w_min, eps));
  }
  return NAPO_OK;
}

/* ---- typed entry points ---- */

napo_status napo_loss_forward_f32(const float *margins, napo_layout layout, const float *q, int64_t q_stride,
                                  double beta, float *loss, float *grad_factor) {
  return loss_forward(margins, layout, q, q_stride, beta, loss, grad_factor, NAPO_F32);
}

napo_status napo_loss_forward_f64(const double *margins, napo_layout layout, const double *q, int64_t q_stride,
                                  double beta, double *loss, double *grad_factor) {
  return loss_forward(margins, layout, q, q_stride, beta, loss, grad_factor, NAPO_F64);
}

napo_status napo_loss_backward_f32(const float *grad_loss, napo_layout grad_layout, const float *grad_factor,
                                   float *grad_margins) {
  return loss_backward(grad_loss, grad_layout, grad_factor, grad_margins, NAPO_F32);
}

napo_status napo_loss_backward_f64(const double *grad_loss, napo_layout grad_layout, const double *grad_factor,
                                   double *grad_margins) {
  return loss_backward(grad_loss, grad_layout, grad_factor, grad_margins, NAPO_F64);
}

napo_status napo_adaptive_q_f32(const float *margins, int64_t stride, int64_t n, double gamma, double q_min,
                                double q_max, float *q_out) {
  return adaptive_q(margins, stride, n, gamma, q_min, q_max, q_out, NAPO_F32);
}

napo_status napo_adaptive_q_f64(const double *margins, int64_t stride, int64_t n, double gamma, double q_min,
                                double q_max, double *q_out) {
  return adaptive_q(margins, stride, n, gamma, q_min, q_max, q_out, NAPO_F64);
}

napo_status napo_q_from_mean_f32(const float *means, int64_t n, int64_t stride, double gamma, double q_min,
                                 double q_max, float *q_out) {
  return q_from_mean(means, n, stride, gamma, q_min, q_max, q_out, NAPO_F32);
}

napo_status napo_q_from_mean_f64(const double *means, int64_t n, int64_t stride, double gamma, double q_min,
                                 double q_max, double *q_out) {
  return q_from_mean(means, n, stride, gamma, q_min, q_max, q_out, NAPO_F64);
}

napo_status napo_dynamic_weights_f32(const float *reward_margins, int64_t stride, int64_t k, double w_min, double eps,
                                     float *weights) {
  return dynamic_weights(reward_margins, stride, k, w_min, eps, weights, NAPO_F32);
}

napo_status napo_dynamic_weights_f64(const double *reward_margins, int64_t stride, int64_t k, double w_min, double eps,
                                     double *weights) {
  return dynamic_weights(reward_margins, stride, k, w_min, eps, weights, NAPO_F64);
}
