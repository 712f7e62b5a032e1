/*
 * The kernels of the NaPO objective (launched by csrc/cuda/objective.cu). Arithmetic is in double
 * as on the CPU. Compiled by nvcc, and by the host C++ compiler against napo's CPU emulation of
 * CUDA (csrc/cuda/emu, `make test-cuda-emu`).
 */
#ifndef NAPO_CUDA_OBJECTIVE_KERNELS_CUH
#define NAPO_CUDA_OBJECTIVE_KERNELS_CUH

#include <cuda_runtime.h>

#include "../napo.h"
#include "../napo_math.h"

namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void loss_forward_kernel(const T *margins, napo_layout layout, const T *q, int64_t q_stride, double beta,
                                    T *loss, T *grad_factor) {
  const int64_t total = layout.rows * layout.cols;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / layout.cols, c = i % layout.cols;
    const double q_value = (double)q[r * q_stride];
    const double margin = (double)margins[r * layout.row_stride + c * layout.col_stride];
    double grad = 0.0;
    const double value = napo_loss_and_grad(margin, q_value, beta, &grad);
    /* q cannot be validated on the host without a sync: out of range gives NaN. */
    const bool q_ok = napo_q_in_range(q_value);
    loss[i] = q_ok ? (T)value : (T)NAN;
    if (grad_factor != nullptr) {
      grad_factor[i] = q_ok ? (T)grad : (T)NAN;
    }
  }
}

template <typename T>
__global__ void loss_backward_kernel(const T *grad_loss, napo_layout grad_layout, const T *grad_factor,
                                     T *grad_margins) {
  const int64_t total = grad_layout.rows * grad_layout.cols;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / grad_layout.cols, c = i % grad_layout.cols;
    grad_margins[i] = grad_loss[r * grad_layout.row_stride + c * grad_layout.col_stride] * grad_factor[i];
  }
}

/* Tree reduction of one value per thread in shared memory; every thread gets the result. The last
 * barrier lets a second reduction reuse the shared array once all threads have read it. */
template <typename Combine> __device__ double block_reduce(double value, Combine combine) {
  __shared__ double partial[kThreads];
  partial[threadIdx.x] = value;
  __syncthreads();
  for (int width = blockDim.x / 2; width > 0; width /= 2) {
    if ((int)threadIdx.x < width) {
      partial[threadIdx.x] = combine(partial[threadIdx.x], partial[threadIdx.x + width]);
    }
    __syncthreads();
  }
  const double result = partial[0];
  __syncthreads();
  return result;
}

/* Sum of a strided vector (each value divided by scale) by one block: compensated per thread. */
template <typename T> __device__ double block_sum(const T *values, int64_t stride, int64_t n, double scale) {
  napo_sum_acc acc = {0.0, 0.0};
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    napo_sum_add(&acc, (double)values[i * stride] / scale);
  }
  return block_reduce(napo_sum_value(&acc), [](double a, double b) { return a + b; });
}

template <typename T> __device__ double block_max_abs(const T *values, int64_t stride, int64_t n) {
  double max_abs = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    max_abs = fmax(max_abs, fabs((double)values[i * stride]));
  }
  return block_reduce(max_abs, [](double a, double b) { return fmax(a, b); });
}

template <typename T>
__global__ void adaptive_q_kernel(const T *margins, int64_t stride, int64_t n, double gamma, double q_min, double q_max,
                                  T *q_out) {
  /* As on the CPU: an overflowing sum is redone on scaled margins (every thread takes the same branch). */
  const double total = block_sum(margins, stride, n, 1.0);
  const double scale = napo_sum_scale(total, block_max_abs(margins, stride, n));
  const double mean = scale == 1.0 ? total / (double)n : block_sum(margins, stride, n, scale) / (double)n * scale;
  if (threadIdx.x == 0) {
    *q_out = (T)napo_q_value(mean, gamma, q_min, q_max);
  }
}

template <typename T>
__global__ void q_from_mean_kernel(const T *means, int64_t n, int64_t stride, double gamma, double q_min, double q_max,
                                   T *q_out) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    q_out[i] = (T)napo_q_value((double)means[i * stride], gamma, q_min, q_max);
  }
}

template <typename T>
__global__ void dynamic_weights_kernel(const T *reward_margins, int64_t stride, int64_t k, double w_min, double eps,
                                       T *weights) {
  /* As on the CPU: an overflowing sum is redone on scaled margins (every thread takes the same branch). */
  double scaled_total = block_sum(reward_margins, stride, k, 1.0);
  const double scale = napo_sum_scale(scaled_total, block_max_abs(reward_margins, stride, k));
  if (scale != 1.0) {
    scaled_total = block_sum(reward_margins, stride, k, scale);
  }
  double infinite = 0.0; /* as on the CPU: counted only when some margin is +inf (every thread takes the same branch) */
  if (scaled_total == INFINITY) {
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      infinite += (double)reward_margins[i * stride] == INFINITY ? 1.0 : 0.0;
    }
    infinite = block_reduce(infinite, [](double a, double b) { return a + b; });
  }
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const double r = (double)reward_margins[i * stride];
    weights[i] = (T)napo_dynamic_weight(r, scale, scaled_total, k, (int64_t)infinite, w_min, eps);
  }
}

} // namespace

#endif /* NAPO_CUDA_OBJECTIVE_KERNELS_CUH */
