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
 * 0 <= w_min <= 1, eps >= 0, k >= 1.
 */
napo_status napo_dynamic_weights_f32(const float *reward_margins, int64_t stride, int64_t k, double w_min, double eps,
                                     float *weights);
napo_status napo_dynamic_weights_f64(const double *reward_margins, int64_t stride, int64_t k, double w_min, double eps,
                                     double *weights);

/* ---- CUDA entry points (csrc/cuda/objective.cu), same contracts ----
 * Pointers are device pointers; stream is a cudaStream_t (0 = legacy default);
 * device is the CUDA ordinal the tensors live on. On NAPO_ERR_CUDA,
 * *cuda_error holds the cudaError_t. Nothing here synchronises with the host.
 */
int napo_cuda_available(void);
const char *napo_cuda_error_string(int cuda_error);
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

#ifdef __cplusplus
}
#endif

#endif /* NAPO_H */
