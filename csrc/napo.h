/*
 * napo's C API: the NaPO objective (Noise-Aware Preference Optimization).
 *
 * Every function returns a napo_status and never aborts; the caller (the
 * CPython binding, or a C program) turns a status into its own error.
 * Functions are named napo_<op>_<dtype>[_cuda]. Inputs are read through
 * element strides so that strided views need no copy; outputs are compact.
 * All arithmetic is carried out in double precision and rounded once on store.
 *
 * Notation (see shared/napo-spec.md): M is the reward margin of a pair,
 * z = beta * M, and logsigmoid(z) = -log(1 + exp(-z)).
 */
#ifndef NAPO_H
#define NAPO_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  NAPO_OK = 0,
  NAPO_ERR_NULL_POINTER = 1, /* a required pointer was NULL */
  NAPO_ERR_SIZE = 2,         /* a length or stride was negative, zero where not allowed, or overflows */
  NAPO_ERR_Q_RANGE = 3,      /* q outside [0, 1] */
  NAPO_ERR_PARAMETER = 4,    /* beta, gamma, clip bounds, w_min or eps out of range */
  NAPO_ERR_CUDA = 5,         /* a CUDA runtime call failed; see the cuda_error out-parameter */
  NAPO_ERR_NO_CUDA = 6,      /* this build has no CUDA kernels */
  NAPO_ERR_LABEL = 7,        /* a label outside [0, vocab) that is not ignore_index; see napo_label_error */
  NAPO_ERR_DTYPE = 8,        /* an unsupported dtype code */
  NAPO_ERR_THREAD = 9,       /* a worker thread could not be joined */
} napo_status;

/* A static, human-readable description of a status. */
const char *napo_status_message(napo_status status);

/* A strided 2-D view: element (r, c) is data[r * row_stride + c * col_stride]
 * (in elements). A vector is one row. Strides may be zero or negative. */
typedef struct {
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
  int64_t col_stride;
} napo_layout;

/* ---- parameter checks shared by the CPU and CUDA entry points ---- */
napo_status napo_check_vector(const void *data, int64_t n, int64_t stride, int allow_empty);
napo_status napo_check_layout(const void *data, napo_layout layout);
napo_status napo_check_loss_params(double beta);
napo_status napo_check_q_params(double gamma, double q_min, double q_max);
napo_status napo_check_weight_params(double w_min, double eps);
/* Everything about a loss forward's arguments that the host can check without reading device memory
 * (layout, beta, pointers, q_stride's reach over the rows); the CPU entry point then also checks q's
 * values, which the CUDA one cannot read without a sync (out-of-range q gives NaN there). */
napo_status napo_check_loss_forward_args(const void *margins, napo_layout layout, const void *q, int64_t q_stride,
                                         double beta, const void *loss);

/* ---- the NaPO loss, one value per pair ----
 * L_q(M) = -expm1(q * logsigmoid(beta M)) / q  for q in (0, 1]
 * L_0(M) = -logsigmoid(beta M)                 (exactly DPO's sigmoid loss)
 * Row r of `margins` (one loss term) uses q[r * q_stride]; q is read from
 * memory so that an adaptive q computed on the device never visits the host.
 * `grad_factor` (optional, may be NULL) receives dL/dM = -beta * sigmoid(z)^q
 * * sigmoid(-z), computed with the loss at no extra transcendental cost, so
 * the backward is one multiply. Outputs are compact rows x cols. A NaN q or
 * margin gives NaN.
 */
napo_status napo_loss_forward_f32(const float *margins, napo_layout layout, const float *q, int64_t q_stride,
                                  double beta, float *loss, float *grad_factor);
napo_status napo_loss_forward_f64(const double *margins, napo_layout layout, const double *q, int64_t q_stride,
                                  double beta, double *loss, double *grad_factor);

/* grad_margins = grad_loss * grad_factor; grad_factor and grad_margins are compact
 * grad_layout.rows x grad_layout.cols, grad_loss is read through grad_layout. */
napo_status napo_loss_backward_f32(const float *grad_loss, napo_layout grad_layout, const float *grad_factor,
                                   float *grad_margins);
napo_status napo_loss_backward_f64(const double *grad_loss, napo_layout grad_layout, const double *grad_factor,
                                   double *grad_margins);

/* ---- adaptive q (spec Eq. 12) ----
 * q = clip(2 * (1 - sigmoid(gamma * mean(M))), q_min, q_max), written to *q_out.
 * gamma > 0, 0 <= q_min <= q_max <= 1, n >= 1.
 */
napo_status napo_adaptive_q_f32(const float *margins, int64_t stride, int64_t n, double gamma, double q_min,
                                double q_max, float *q_out);
napo_status napo_adaptive_q_f64(const double *margins, int64_t stride, int64_t n, double gamma, double q_min,
                                double q_max, double *q_out);
/* The same, elementwise, from n already-reduced means (the distributed case:
 * all-reduce first; several terms at once). q_out is compact. */
napo_status napo_q_from_mean_f32(const float *means, int64_t n, int64_t stride, double gamma, double q_min,
                                 double q_max, float *q_out);
napo_status napo_q_from_mean_f64(const double *means, int64_t n, int64_t stride, double gamma, double q_min,
                                 double q_max, double *q_out);

/* ---- dynamic loss weights (spec Eq. 13) ----
 * w_k = clip(R_k / sum_j R_j, w_min, 1); uniform 1/K when sum_j R_j <= eps.
 * With m margins at +inf (none -inf or NaN): clip(1/m, w_min, 1) for those, w_min for the
 * others (the limit of the ratio); +inf with -inf, or a NaN margin, gives NaN weights.
 * 0 <= w_min <= 1, eps >= 0, k >= 1.
 */
napo_status napo_dynamic_weights_f32(const float *reward_margins, int64_t stride, int64_t k, double w_min, double eps,
                                     float *weights);
napo_status napo_dynamic_weights_f64(const double *reward_margins, int64_t stride, int64_t k, double w_min, double eps,
                                     double *weights);

/* ---- sequence log-probs (csrc/logps.c) ----
 * For every position (b, t) of logits [batch, time, vocab] whose label is not
 * ignore_index: lse[b, t] = logsumexp_v logits[b, t, v] and
 * token_logps[b, t] = logits[b, t, label[b, t]] - lse[b, t]; at ignored
 * positions both are 0 and the logits are not read (prompt tokens cost nothing). The caller aligns labels with
 * logits (for causal LMs: logits[:, :-1] with labels[:, 1:]). Every label is
 * checked before any logit is read. Outputs are compact [batch, time]: token_logps
 * in the accumulation dtype (float64 for float64 logits, float32 otherwise), lse
 * always float64 -- a float32 lse of ~10 is off by up to 5e-7, and exp(x - lse)
 * in the backward would carry that into every probability (several ulps).
 */
typedef enum {
  NAPO_LOGITS_F32 = 0,
  NAPO_LOGITS_F64 = 1,
  NAPO_LOGITS_BF16 = 2,
  NAPO_LOGITS_F16 = 3,
} napo_logits_dtype;

typedef struct {
  int64_t batch, time, vocab;
  int64_t stride_b, stride_t, stride_v; /* in elements */
} napo_logits_layout;

typedef struct {
  const int64_t *data;
  int64_t stride_b, stride_t; /* in elements */
} napo_labels;

/* Filled on NAPO_ERR_LABEL: the first offending position and value. */
typedef struct {
  int64_t batch, time, value;
} napo_label_error;

napo_status napo_check_logits_layout(const void *data, napo_logits_layout layout);
/* The backward's own arguments: a gradient layout of the logits' shape, lse and grad_token present. */
napo_status napo_check_logps_backward_args(napo_logits_layout layout, const double *lse, const void *grad_token,
                                           const void *grad_logits, napo_logits_layout grad_layout);
napo_status napo_check_labels(napo_labels labels, int64_t batch, int64_t time, int64_t vocab, int64_t ignore_index,
                              napo_label_error *bad_label);
/* The checks of a log-prob call that need no label value (dtype, the logits' layout, the labels' strides
 * and pointer): made by the CPU and the CUDA entry points alike; the CPU ones then check every label. */
napo_status napo_check_logps_args(const void *logits, napo_logits_layout layout, napo_logits_dtype dtype,
                                  napo_labels labels);

/* The fast kernel: chunked online log-sum-exp in float32 with float64 running
 * sums, one read of the logits, rows split over num_threads threads. Falls back
 * to the serial kernel for float64 logits or a vocab stride other than 1. */
napo_status napo_token_logps(const void *logits, napo_logits_layout layout, napo_logits_dtype dtype, napo_labels labels,
                             int64_t ignore_index, void *token_logps, double *lse, int num_threads,
                             napo_label_error *bad_label);
/* The reference kernel: two passes in float64, any dtype and strides, one thread. */
napo_status napo_token_logps_serial(const void *logits, napo_logits_layout layout, napo_logits_dtype dtype,
                                    napo_labels labels, int64_t ignore_index, void *token_logps, double *lse,
                                    napo_label_error *bad_label);

/* grad_logits[b, t, v] = grad_token[b, t] * (1[v == label] - exp(logits[b, t, v] - lse[b, t])), and 0
 * where the label is ignored. grad_token is compact [batch, time] in the accumulation dtype, lse float64;
 * grad_logits has the logits' dtype and its own layout (the logits' own layout for in-place use: each
 * row is read before it is written). */
napo_status napo_token_logps_backward(const void *logits, napo_logits_layout layout, napo_logits_dtype dtype,
                                      napo_labels labels, int64_t ignore_index, const double *lse,
                                      const void *grad_token, void *grad_logits, napo_logits_layout grad_layout,
                                      int num_threads, napo_label_error *bad_label);
napo_status napo_token_logps_backward_serial(const void *logits, napo_logits_layout layout, napo_logits_dtype dtype,
                                             napo_labels labels, int64_t ignore_index, const double *lse,
                                             const void *grad_token, void *grad_logits, napo_logits_layout grad_layout,
                                             napo_label_error *bad_label);

/* ---- CUDA entry points (csrc/cuda/objective.cu), same contracts ----
 * Pointers are device pointers; stream is a cudaStream_t (0 = legacy default);
 * device is the CUDA ordinal the tensors live on. On NAPO_ERR_CUDA,
 * *cuda_error holds the cudaError_t. Nothing here synchronises with the host.
 */
int napo_cuda_available(void);
const char *napo_cuda_error_string(int cuda_error);

/* Or'ed into *cuda_error when the error was already pending before napo's launch: it belongs to
 * earlier CUDA work (someone else's kernel), and napo did not launch. */
#define NAPO_CUDA_FOREIGN_ERROR 0x40000000

/* ---- the runtime (csrc/cuda/runtime.cu) ---- */
int napo_cuda_runtime_version(void);         /* CUDART_VERSION napo was built with, e.g. 13000 */
int napo_cuda_driver_version(void);          /* the newest CUDA the driver supports; 0 without a driver */
int napo_cuda_device_count(int *cuda_error); /* 0 with the cudaError_t when the runtime cannot start */
void napo_cuda_set_debug(int enabled);       /* sync and check after every napo launch (NAPO_CUDA_DEBUG) */
int napo_cuda_debug(void);
napo_status napo_loss_forward_f32_cuda(const float *margins, napo_layout layout, const float *q, int64_t q_stride,
                                       double beta, float *loss, float *grad_factor, int device, void *stream,
                                       int *cuda_error);
napo_status napo_loss_forward_f64_cuda(const double *margins, napo_layout layout, const double *q, int64_t q_stride,
                                       double beta, double *loss, double *grad_factor, int device, void *stream,
                                       int *cuda_error);
napo_status napo_loss_backward_f32_cuda(const float *grad_loss, napo_layout grad_layout, const float *grad_factor,
                                        float *grad_margins, int device, void *stream, int *cuda_error);
napo_status napo_loss_backward_f64_cuda(const double *grad_loss, napo_layout grad_layout, const double *grad_factor,
                                        double *grad_margins, int device, void *stream, int *cuda_error);
napo_status napo_adaptive_q_f32_cuda(const float *margins, int64_t stride, int64_t n, double gamma, double q_min,
                                     double q_max, float *q_out, int device, void *stream, int *cuda_error);
napo_status napo_adaptive_q_f64_cuda(const double *margins, int64_t stride, int64_t n, double gamma, double q_min,
                                     double q_max, double *q_out, int device, void *stream, int *cuda_error);
napo_status napo_q_from_mean_f32_cuda(const float *means, int64_t n, int64_t stride, double gamma, double q_min,
                                      double q_max, float *q_out, int device, void *stream, int *cuda_error);
napo_status napo_q_from_mean_f64_cuda(const double *means, int64_t n, int64_t stride, double gamma, double q_min,
                                      double q_max, double *q_out, int device, void *stream, int *cuda_error);
napo_status napo_dynamic_weights_f32_cuda(const float *reward_margins, int64_t stride, int64_t k, double w_min,
                                          double eps, float *weights, int device, void *stream, int *cuda_error);
napo_status napo_dynamic_weights_f64_cuda(const double *reward_margins, int64_t stride, int64_t k, double w_min,
                                          double eps, double *weights, int device, void *stream, int *cuda_error);

/* CUDA: one block per (b, t) row. Labels are bounds-checked on the device: an
 * invalid label (the host validates first) yields NaN, never an out-of-bounds read. */
napo_status napo_token_logps_cuda(const void *logits, napo_logits_layout layout, napo_logits_dtype dtype,
                                  napo_labels labels, int64_t ignore_index, void *token_logps, double *lse, int device,
                                  void *stream, int *cuda_error);
napo_status napo_token_logps_backward_cuda(const void *logits, napo_logits_layout layout, napo_logits_dtype dtype,
                                           napo_labels labels, int64_t ignore_index, const double *lse,
                                           const void *grad_token, void *grad_logits, napo_logits_layout grad_layout,
                                           int device, void *stream, int *cuda_error);

#ifdef __cplusplus
}
#endif

#endif /* NAPO_H */
