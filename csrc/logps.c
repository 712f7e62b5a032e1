/*
 * Per-token log-probs of labelled sequences from LM logits, on the CPU.
 *
 * The fast kernel reads each row of logits once: a chunk of it is converted to
 * float32 into a small buffer that stays in L1, its maximum and its sum of
 * exponentials (float32 partial sums of SUM_BLOCK vectors, added in double) are
 * folded into a running (max, float64 sum) pair, the online log-sum-exp, kept in
 * float64 for the backward. The exponential is a branch-free polynomial on GCC/Clang
 * vector extensions (logps_simd.h), so it vectorises without -ffast-math. Rows
 * are split over plain pthreads; nothing here touches Python or global state.
 * The serial kernel is the straightforward two-pass float64 version: the C
 * tests compare the two, and it serves float64 logits and unusual strides.
 */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "napo.h"
#include "napo_dtype.h"
#include "napo_math.h"

enum { CHUNK = 1024, SUM_BLOCK = 8, MAX_LANES = 8, MAX_THREADS = 64 };

/* Rows whose total size is below this many logits run on the calling thread. */
#define NAPO_PARALLEL_MIN_ELEMENTS ((int64_t)1 << 16)

/* The vector kernels, instantiated for 4 lanes (SSE2/NEON, the baseline) and,
 * on x86-64, for 8 lanes in an AVX2 region chosen at run time. */
#define NAPO_SIMD_LANES 4
#define NAPO_SIMD(name) name##_w4
#include "logps_simd.h"
#undef NAPO_SIMD_LANES
#undef NAPO_SIMD

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NAPO_HAVE_W8 1
#pragma GCC push_options
#pragma GCC target("avx2")
#define NAPO_SIMD_LANES 8
#define NAPO_SIMD(name) name##_w8
#include "logps_simd.h"
#undef NAPO_SIMD_LANES
#undef NAPO_SIMD
#pragma GCC pop_options
#elif defined(__x86_64__) && defined(__clang__)
#define NAPO_HAVE_W8 1
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
#define NAPO_SIMD_LANES 8
#define NAPO_SIMD(name) name##_w8
#include "logps_simd.h"
#undef NAPO_SIMD_LANES
#undef NAPO_SIMD
#pragma clang attribute pop
#endif

typedef struct {
  double (*row_lse)(const void *row, napo_logits_dtype dtype, int64_t vocab, float *buf, double *max_out);
  void (*row_grad)(const void *logits_row, void *grad_row, napo_logits_dtype dtype, int64_t vocab, double grad,
                   double lse, float *buf);
} simd_kernels;

/* 8 lanes where the CPU has AVX2, unless NAPO_SIMD_WIDTH=4 asks for the baseline (tests use it). */
static simd_kernels pick_kernels(void) {
#ifdef NAPO_HAVE_W8
  const char *forced = getenv("NAPO_SIMD_WIDTH");
  if ((forced == NULL || strcmp(forced, "4") != 0) && __builtin_cpu_supports("avx2")) {
    return (simd_kernels){row_lse_w8, row_grad_w8};
  }
#endif
  return (simd_kernels){row_lse_w4, row_grad_w4};
}

/* ---- element access in any dtype ---- */

static int accumulates_in_double(napo_logits_dtype dtype) { return dtype == NAPO_LOGITS_F64; }

static double load_logit(const void *base, napo_logits_dtype dtype, int64_t index) {
  switch (dtype) {
  case NAPO_LOGITS_F32:
    return ((const float *)base)[index];
  case NAPO_LOGITS_F64:
    return ((const double *)base)[index];
  case NAPO_LOGITS_BF16:
    return napo_bf16_to_float(((const uint16_t *)base)[index]);
  case NAPO_LOGITS_F16:
    return napo_f16_to_float(((const uint16_t *)base)[index]);
  }
  return NAN;
}

static void store_logit(void *base, napo_logits_dtype dtype, int64_t index, double value) {
  switch (dtype) {
  case NAPO_LOGITS_F32:
    ((float *)base)[index] = (float)value;
    break;
  case NAPO_LOGITS_F64:
    ((double *)base)[index] = value;
    break;
  case NAPO_LOGITS_BF16:
    ((uint16_t *)base)[index] = napo_float_to_bf16((float)value);
    break;
  case NAPO_LOGITS_F16:
    ((uint16_t *)base)[index] = napo_float_to_f16((float)value);
    break;
  }
}

static double load_acc(const void *base, napo_logits_dtype dtype, int64_t index) {
  return accumulates_in_double(dtype) ? ((const double *)base)[index] : (double)((const float *)base)[index];
}

static void store_acc(void *base, napo_logits_dtype dtype, int64_t index, double value) {
  if (accumulates_in_double(dtype)) {
    ((double *)base)[index] = value;
  } else {
    ((float *)base)[index] = (float)value;
  }
}

/* ---- checks ---- */

static int64_t abs64(int64_t x) { return x < 0 ? -x : x; }

/* Sum of |stride| * (extent - 1) over the dimensions, or -1 if it could overflow. */
static int64_t max_offset(const int64_t *extents, const int64_t *strides, int dims) {
  const int64_t limit = INT64_MAX / 8 / 4;
  int64_t total = 0;
  for (int d = 0; d < dims; ++d) {
    if (extents[d] <= 1) {
      continue;
    }
    const int64_t stride = abs64(strides[d]);
    if (strides[d] < -limit || strides[d] > limit || (stride != 0 && extents[d] - 1 > limit / stride)) {
      return -1;
    }
    total += stride * (extents[d] - 1);
    if (total > limit) {
      return -1;
    }
  }
  return total;
}

napo_status napo_check_logits_layout(const void *data, napo_logits_layout layout) {
  if (layout.batch < 0 || layout.time < 0 || layout.vocab < 1) {
    return NAPO_ERR_SIZE;
  }
  const int64_t extents[3] = {layout.batch, layout.time, layout.vocab};
  const int64_t strides[3] = {layout.stride_b, layout.stride_t, layout.stride_v};
  if (max_offset(extents, strides, 3) < 0 || layout.batch > INT64_MAX / 8 / (layout.time > 0 ? layout.time : 1)) {
    return NAPO_ERR_SIZE;
  }
  if (layout.batch * layout.time > 0 && data == NULL) {
    return NAPO_ERR_NULL_POINTER;
  }
  return NAPO_OK;
}

napo_status napo_check_logps_backward_args(napo_logits_layout layout, const double *lse, const void *grad_token,
                                           const void *grad_logits, napo_logits_layout grad_layout) {
  if (grad_layout.batch != layout.batch || grad_layout.time != layout.time || grad_layout.vocab != layout.vocab) {
    return NAPO_ERR_SIZE;
  }
  const napo_status status = napo_check_logits_layout(grad_logits, grad_layout);
  if (status != NAPO_OK || layout.batch * layout.time == 0) {
    return status;
  }
  return lse == NULL || grad_token == NULL ? NAPO_ERR_NULL_POINTER : NAPO_OK;
}

static int dtype_known(napo_logits_dtype dtype) {
  return dtype == NAPO_LOGITS_F32 || dtype == NAPO_LOGITS_F64 || dtype == NAPO_LOGITS_BF16 || dtype == NAPO_LOGITS_F16;
}

/* The labels' strides and pointer, for batch x time positions. */
static napo_status check_labels_layout(napo_labels labels, int64_t batch, int64_t time) {
  if (batch < 0 || time < 0) {
    return NAPO_ERR_SIZE;
  }
  if (batch == 0 || time == 0) {
    return NAPO_OK;
  }
  const int64_t extents[2] = {batch, time};
  const int64_t strides[2] = {labels.stride_b, labels.stride_t};
  if (max_offset(extents, strides, 2) < 0) {
    return NAPO_ERR_SIZE;
  }
  return labels.data == NULL ? NAPO_ERR_NULL_POINTER : NAPO_OK;
}

napo_status napo_check_labels(napo_labels labels, int64_t batch, int64_t time, int64_t vocab, int64_t ignore_index,
                              napo_label_error *bad_label) {
  const napo_status status = check_labels_layout(labels, batch, time);
  if (status != NAPO_OK || batch == 0 || time == 0) {
    return status;
  }
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < time; ++t) {
      const int64_t value = labels.data[b * labels.stride_b + t * labels.stride_t];
      if (value != ignore_index && (value < 0 || value >= vocab)) {
        if (bad_label != NULL) {
          bad_label->batch = b;
          bad_label->time = t;
          bad_label->value = value;
        }
        return NAPO_ERR_LABEL;
      }
    }
  }
  return NAPO_OK;
}

/* ---- one job over all rows, split across threads ---- */

typedef struct job job;
typedef void (*row_fn)(const job *work, int64_t row, float *buf);

struct job {
  const void *logits;
  napo_logits_layout layout;
  napo_logits_dtype dtype;
  napo_labels labels;
  int64_t ignore_index;
  void *token_logps;      /* forward */
  double *lse;            /* forward */
  const double *lse_in;   /* backward */
  const void *grad_token; /* backward */
  void *grad_logits;      /* backward */
  napo_logits_layout grad_layout;
  row_fn process;
  simd_kernels kernels;
};

typedef struct {
  const job *work;
  int64_t begin, end;
} range;

static void run_range(const job *work, int64_t begin, int64_t end) {
  float buf[CHUNK + MAX_LANES];
  for (int64_t row = begin; row < end; ++row) {
    work->process(work, row, buf);
  }
}

static void *range_thread(void *arg) {
  const range *r = (const range *)arg;
  run_range(r->work, r->begin, r->end);
  return NULL;
}

static napo_status run_rows(const job *work, int num_threads) {
  const int64_t rows = work->layout.batch * work->layout.time;
  int64_t threads = num_threads < 1 ? 1 : (num_threads > MAX_THREADS ? MAX_THREADS : num_threads);
  if (rows * work->layout.vocab < NAPO_PARALLEL_MIN_ELEMENTS || rows < threads) {
    threads = rows < 1 ? 1 : (rows < threads && rows * work->layout.vocab >= NAPO_PARALLEL_MIN_ELEMENTS ? rows : 1);
  }
  pthread_t ids[MAX_THREADS];
  range ranges[MAX_THREADS];
  int started[MAX_THREADS] = {0};
  for (int64_t i = 0; i < threads; ++i) {
    ranges[i].work = work;
    ranges[i].begin = rows * i / threads;
    ranges[i].end = rows * (i + 1) / threads;
  }
  /* Workers take ranges 1.., the calling thread range 0; a worker that cannot be
   * started has its range run here instead, so the result never depends on it. */
  for (int64_t i = 1; i < threads; ++i) {
    started[i] = pthread_create(&ids[i], NULL, range_thread, &ranges[i]) == 0;
  }
  run_range(work, ranges[0].begin, ranges[0].end);
  napo_status status = NAPO_OK;
  for (int64_t i = 1; i < threads; ++i) {
    if (!started[i]) {
      run_range(work, ranges[i].begin, ranges[i].end);
    } else if (pthread_join(ids[i], NULL) != 0) {
      status = NAPO_ERR_THREAD;
    }
  }
  return status;
}

static const void *row_pointer(const job *work, int64_t row, int64_t *b, int64_t *t) {
  *b = row / work->layout.time;
  *t = row % work->layout.time;
  const int64_t offset = *b * work->layout.stride_b + *t * work->layout.stride_t;
  switch (work->dtype) {
  case NAPO_LOGITS_F32:
    return (const float *)work->logits + offset;
  case NAPO_LOGITS_F64:
    return (const double *)work->logits + offset;
  default:
    return (const uint16_t *)work->logits + offset;
  }
}

static void *grad_row_pointer(const job *work, int64_t b, int64_t t) {
  const int64_t offset = b * work->grad_layout.stride_b + t * work->grad_layout.stride_t;
  switch (work->dtype) {
  case NAPO_LOGITS_F32:
    return (float *)work->grad_logits + offset;
  case NAPO_LOGITS_F64:
    return (double *)work->grad_logits + offset;
  default:
    return (uint16_t *)work->grad_logits + offset;
  }
}

static int64_t label_at(const job *work, int64_t b, int64_t t) {
  return work->labels.data[b * work->labels.stride_b + t * work->labels.stride_t];
}

/* ---- fast rows ---- */

static void forward_row_fast(const job *work, int64_t row, float *buf) {
  int64_t b, t;
  const void *logits_row = row_pointer(work, row, &b, &t);
  const int64_t label = label_at(work, b, t);
  if (label == work->ignore_index) { /* prompt and padding tokens: their logits are never read */
    work->lse[row] = 0.0;
    store_acc(work->token_logps, work->dtype, row, 0.0);
    return;
  }
  double max = 0.0;
  const double log_sum = work->kernels.row_lse(logits_row, work->dtype, work->layout.vocab, buf, &max);
  const double token = (load_logit(logits_row, work->dtype, label) - max) - log_sum;
  work->lse[row] = max + log_sum;
  store_acc(work->token_logps, work->dtype, row, token);
}

static void backward_row_fast(const job *work, int64_t row, float *buf) {
  int64_t b, t;
  const void *logits_row = row_pointer(work, row, &b, &t);
  void *grad_row = grad_row_pointer(work, b, t);
  const int64_t label = label_at(work, b, t);
  if (label == work->ignore_index) {
    work->kernels.row_grad(logits_row, grad_row, work->dtype, work->layout.vocab, 0.0, 0.0, buf);
    return;
  }
  const double grad = load_acc(work->grad_token, work->dtype, row);
  const double lse = work->lse_in[row];
  /* Read before the row is overwritten (in-place use). */
  const double label_logit = load_logit(logits_row, work->dtype, label);
  work->kernels.row_grad(logits_row, grad_row, work->dtype, work->layout.vocab, grad, lse, buf);
  store_logit(grad_row, work->dtype, label, grad * -expm1(label_logit - lse));
}

/* ---- serial rows (float64, any strides) ---- */

static void forward_row_serial(const job *work, int64_t row, float *buf) {
  (void)buf;
  int64_t b, t;
  const void *logits_row = row_pointer(work, row, &b, &t);
  const int64_t vocab = work->layout.vocab, stride = work->layout.stride_v;
  const int64_t label = label_at(work, b, t);
  if (label == work->ignore_index) {
    work->lse[row] = 0.0;
    store_acc(work->token_logps, work->dtype, row, 0.0);
    return;
  }
  double max = -INFINITY;
  for (int64_t v = 0; v < vocab; ++v) {
    const double x = load_logit(logits_row, work->dtype, v * stride);
    max = x > max || x != x ? x : max; /* a NaN logit makes max, and so the lse, NaN */
  }
  double sum = 0.0;
  for (int64_t v = 0; v < vocab && max != -INFINITY; ++v) {
    sum += exp(load_logit(logits_row, work->dtype, v * stride) - max);
  }
  const double log_sum = log(sum);
  const double token = (load_logit(logits_row, work->dtype, label * stride) - max) - log_sum;
  work->lse[row] = max + log_sum;
  store_acc(work->token_logps, work->dtype, row, token);
}

static void backward_row_serial(const job *work, int64_t row, float *buf) {
  (void)buf;
  int64_t b, t;
  const void *logits_row = row_pointer(work, row, &b, &t);
  void *grad_row = grad_row_pointer(work, b, t);
  const int64_t vocab = work->layout.vocab, stride = work->layout.stride_v, grad_stride = work->grad_layout.stride_v;
  const int64_t label = label_at(work, b, t);
  const int counted = label != work->ignore_index;
  const double grad = counted ? load_acc(work->grad_token, work->dtype, row) : 0.0;
  const double lse = work->lse_in[row];
  for (int64_t v = 0; v < vocab; ++v) {
    const double x = load_logit(logits_row, work->dtype, v * stride);
    const double value = !counted ? 0.0 : (v == label ? grad * -expm1(x - lse) : -grad * exp(x - lse));
    store_logit(grad_row, work->dtype, v * grad_stride, value);
  }
}

/* ---- entry points ---- */

napo_status napo_check_logps_args(const void *logits, napo_logits_layout layout, napo_logits_dtype dtype,
                                  napo_labels labels) {
  if (!dtype_known(dtype)) {
    return NAPO_ERR_DTYPE;
  }
  const napo_status status = napo_check_logits_layout(logits, layout);
  return status != NAPO_OK ? status : check_labels_layout(labels, layout.batch, layout.time);
}

static napo_status prepare(const void *logits, napo_logits_layout layout, napo_logits_dtype dtype, napo_labels labels,
                           int64_t ignore_index, napo_label_error *bad_label) {
  const napo_status status = napo_check_logps_args(logits, layout, dtype, labels);
  if (status != NAPO_OK) {
    return status;
  }
  return napo_check_labels(labels, layout.batch, layout.time, layout.vocab, ignore_index, bad_label);
}

static napo_status forward(const void *logits, napo_logits_layout layout, napo_logits_dtype dtype, napo_labels labels,
                           int64_t ignore_index, void *token_logps, double *lse, int num_threads,
                           napo_label_error *bad_label, int serial) {
  const napo_status status = prepare(logits, layout, dtype, labels, ignore_index, bad_label);
  if (status != NAPO_OK || layout.batch * layout.time == 0) {
    return status;
  }
  if (token_logps == NULL || lse == NULL) {
    return NAPO_ERR_NULL_POINTER;
  }
  const int fast = !serial && dtype != NAPO_LOGITS_F64 && layout.stride_v == 1;
  const job work = {.logits = logits,
                    .layout = layout,
                    .dtype = dtype,
                    .labels = labels,
                    .ignore_index = ignore_index,
                    .token_logps = token_logps,
                    .lse = lse,
                    .grad_layout = layout,
                    .process = fast ? forward_row_fast : forward_row_serial,
                    .kernels = pick_kernels()};
  return run_rows(&work, serial ? 1 : num_threads);
}

static napo_status backward(const void *logits, napo_logits_layout layout, napo_logits_dtype dtype, napo_labels labels,
                            int64_t ignore_index, const double *lse, const void *grad_token, void *grad_logits,
                            napo_logits_layout grad_layout, int num_threads, napo_label_error *bad_label, int serial) {
  napo_status status = prepare(logits, layout, dtype, labels, ignore_index, bad_label);
  if (status != NAPO_OK ||
      (status = napo_check_logps_backward_args(layout, lse, grad_token, grad_logits, grad_layout)) != NAPO_OK ||
      layout.batch * layout.time == 0) {
    return status;
  }
  const int fast = !serial && dtype != NAPO_LOGITS_F64 && layout.stride_v == 1 && grad_layout.stride_v == 1;
  const job work = {.logits = logits,
                    .layout = layout,
                    .dtype = dtype,
                    .labels = labels,
                    .ignore_index = ignore_index,
                    .lse_in = lse,
                    .grad_token = grad_token,
                    .grad_logits = grad_logits,
                    .grad_layout = grad_layout,
                    .process = fast ? backward_row_fast : backward_row_serial,
                    .kernels = pick_kernels()};
  return run_rows(&work, serial ? 1 : num_threads);
}

napo_status napo_token_logps(const void *logits, napo_logits_layout layout, napo_logits_dtype dtype, napo_labels labels,
                             int64_t ignore_index, void *token_logps, double *lse, int num_threads,
                             napo_label_error *bad_label) {
  return forward(logits, layout, dtype, labels, ignore_index, token_logps, lse, num_threads, bad_label, 0);
}

napo_status napo_token_logps_serial(const void *logits, napo_logits_layout layout, napo_logits_dtype dtype,
                                    napo_labels labels, int64_t ignore_index, void *token_logps, double *lse,
                                    napo_label_error *bad_label) {
  return forward(logits, layout, dtype, labels, ignore_index, token_logps, lse, 1, bad_label, 1);
}

napo_status napo_token_logps_backward(const void *logits, napo_logits_layout layout, napo_logits_dtype dtype,
                                      napo_labels labels, int64_t ignore_index, const double *lse,
                                      const void *grad_token, void *grad_logits, napo_logits_layout grad_layout,
                                      int num_threads, napo_label_error *bad_label) {
  return backward(logits, layout, dtype, labels, ignore_index, lse, grad_token, grad_logits, grad_layout, num_threads,
                  bad_label, 0);
}

napo_status napo_token_logps_backward_serial(const void *logits, napo_logits_layout layout, napo_logits_dtype dtype,
                                             napo_labels labels, int64_t ignore_index, const double *lse,
                                             const void *grad_token, void *grad_logits, napo_logits_layout grad_layout,
                                             napo_label_error *bad_label) {
  return backward(logits, layout, dtype, labels, ignore_index, lse, grad_token, grad_logits, grad_layout, 1, bad_label,
                  1);
}
