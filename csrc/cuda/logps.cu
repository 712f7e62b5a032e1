/*
 * CUDA kernels of the sequence log-probs: one block per (b, t) row, float32
 * accumulation, bf16/fp16/fp32/fp64 loads, on the caller's stream. The forward
 * reads a row once with a per-thread online log-sum-exp merged across the
 * block; the backward writes the row's gradient in one pass.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../napo.h"
#include "../napo_math.h"
#include "launch.cuh"

namespace {

constexpr int kThreads = 256;

template <typename T> struct acc_of {
  using type = float;
};
template <> struct acc_of<double> {
  using type = double;
};

__device__ inline float to_float(float x) { return x; }
__device__ inline double to_float(double x) { return x; }
__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ inline float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ inline T from_acc(float x);
template <> __device__ inline float from_acc<float>(float x) { return x; }
template <> __device__ inline __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ inline __half from_acc<__half>(float x) { return __float2half(x); }
template <typename T> __device__ inline T from_acc(double x) { return (T)x; }

/* Merges two (max, sum of exp(x - max)) pairs with the shared, NaN-propagating merge of
 * napo_math.h (the C tests exercise it): a thread whose logits were all NaN holds (-inf, NaN),
 * which a merge testing only "other max > -inf" would drop. */
__device__ inline void merge(float &max, float &sum, float other_max, float other_sum) {
  napo_lse_merge_f32(&max, &sum, other_max, other_sum);
}
__device__ inline void merge(double &max, double &sum, double other_max, double other_sum) {
  napo_lse_merge(&max, &sum, other_max, other_sum);
}

template <typename T, typename A = typename acc_of<T>::type>
__global__ void forward_kernel(const T *logits, napo_logits_layout layout, napo_labels labels, int64_t ignore_index,
                               A *token_logps, double *lse) {
  const int64_t row = blockIdx.x;
  const int64_t b = row / layout.time, t = row % layout.time;
  const int64_t label = labels.data[b * labels.stride_b + t * labels.stride_t];
  if (label == ignore_index) {
    if (threadIdx.x == 0) {
      token_logps[row] = 0;
      lse[row] = 0;
    }
    return;
  }
  const T *x = logits + b * layout.stride_b + t * layout.stride_t;
  A max = -INFINITY, sum = 0;
  for (int64_t v = threadIdx.x; v < layout.vocab; v += blockDim.x) {
    const A value = (A)to_float(x[v * layout.stride_v]);
    merge(max, sum, value, (A)1);
  }
  __shared__ A shared_max[kThreads], shared_sum[kThreads];
  shared_max[threadIdx.x] = max;
  shared_sum[threadIdx.x] = sum;
  __syncthreads();
  for (int width = blockDim.x / 2; width > 0; width /= 2) {
    if ((int)threadIdx.x < width) {
      A m = shared_max[threadIdx.x], s = shared_sum[threadIdx.x];
      merge(m, s, shared_max[threadIdx.x + width], shared_sum[threadIdx.x + width]);
      shared_max[threadIdx.x] = m;
      shared_sum[threadIdx.x] = s;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const A row_max = shared_max[0], log_sum = log(shared_sum[0]);
    /* The block sums in A (float32 for 16/32-bit logits): only its logarithm and the final addition are
     * taken in double, so this lse is as exact as that float32 sum, short of the CPU kernel's. */
    const double lse_value = (double)row_max + log((double)shared_sum[0]);
    const bool valid = label >= 0 && label < layout.vocab; /* never read outside the row */
    const A label_logit = valid ? (A)to_float(x[label * layout.stride_v]) : (A)NAN;
    token_logps[row] = (label_logit - row_max) - log_sum;
    lse[row] = valid ? lse_value : (double)NAN;
  }
}

template <typename T, typename A = typename acc_of<T>::type>
__global__ void backward_kernel(const T *logits, napo_logits_layout layout, napo_labels labels, int64_t ignore_index,
                                const double *lse, const A *grad_token, T *grad_logits,
                                napo_logits_layout grad_layout) {
  const int64_t row = blockIdx.x;
  const int64_t b = row / layout.time, t = row % layout.time;
  const int64_t label = labels.data[b * labels.stride_b + t * labels.stride_t];
  const T *x = logits + b * layout.stride_b + t * layout.stride_t;
  T *g = grad_logits + b * grad_layout.stride_b + t * grad_layout.stride_t;
  const bool counted = label != ignore_index;
  const A grad = counted ? grad_token[row] : (A)0;
  /* lse as lse_hi + lse_lo in A (lse_lo = 0 for double): x - lse_hi is exact near the top of the
   * row, so the large probabilities see no rounding of the lse (see csrc/logps_simd.h). */
  const double row_lse = counted ? lse[row] : 0.0;
  const A lse_hi = (A)row_lse;
  const A lse_lo = isfinite(lse_hi) ? (A)(row_lse - (double)lse_hi) : (A)0;
  for (int64_t v = threadIdx.x; v < layout.vocab; v += blockDim.x) {
    A value = 0;
    if (counted) {
      const A shifted = ((A)to_float(x[v * layout.stride_v]) - lse_hi) - lse_lo;
      value = v == label ? -grad * expm1(shifted) : -grad * exp(shifted);
    }
    /* Each element is read before it is written by the same thread: in-place safe. */
    g[v * grad_layout.stride_v] = from_acc<T>(value);
  }
}

template <typename T>
void launch_forward(const void *logits, napo_logits_layout layout, napo_labels labels, int64_t ignore_index,
                    void *token_logps, double *lse, cudaStream_t stream) {
  using A = typename acc_of<T>::type;
  forward_kernel<T><<<(unsigned)(layout.batch * layout.time), kThreads, 0, stream>>>(
      (const T *)logits, layout, labels, ignore_index, (A *)token_logps, (double *)lse);
}

template <typename T>
void launch_backward(const void *logits, napo_logits_layout layout, napo_labels labels, int64_t ignore_index,
                     const double *lse, const void *grad_token, void *grad_logits, napo_logits_layout grad_layout,
                     cudaStream_t stream) {
  using A = typename acc_of<T>::type;
  backward_kernel<T><<<(unsigned)(layout.batch * layout.time), kThreads, 0, stream>>>(
      (const T *)logits, layout, labels, ignore_index, (const double *)lse, (const A *)grad_token, (T *)grad_logits,
      grad_layout);
}

napo_status check_launch(const void *logits, napo_logits_layout layout, napo_logits_dtype dtype, napo_labels labels) {
  if (dtype != NAPO_LOGITS_F32 && dtype != NAPO_LOGITS_F64 && dtype != NAPO_LOGITS_BF16 && dtype != NAPO_LOGITS_F16) {
    return NAPO_ERR_DTYPE;
  }
  const napo_status status = napo_check_logits_layout(logits, layout);
  if (status != NAPO_OK) {
    return status;
  }
  if (layout.batch * layout.time > 0x7fffffffLL) {
    return NAPO_ERR_SIZE; /* one block per row: the grid's x extent */
  }
  if (layout.batch * layout.time > 0 && labels.data == nullptr) {
    return NAPO_ERR_NULL_POINTER;
  }
  return NAPO_OK;
}

} // namespace

extern "C" {

napo_status napo_token_logps_cuda(const void *logits, napo_logits_layout layout, napo_logits_dtype dtype,
                                  napo_labels labels, int64_t ignore_index, void *token_logps, double *lse, int device,
                                  void *stream, int *cuda_error) {
  const napo_status status = check_launch(logits, layout, dtype, labels);
  if (status != NAPO_OK || layout.batch * layout.time == 0) {
    return status;
  }
  if (token_logps == nullptr || lse == nullptr) {
    return NAPO_ERR_NULL_POINTER;
  }
  const cudaStream_t s = (cudaStream_t)stream;
  return napo_cuda::on_device(device, stream, cuda_error, [&] {
    switch (dtype) {
    case NAPO_LOGITS_F32:
      launch_forward<float>(logits, layout, labels, ignore_index, token_logps, lse, s);
      break;
    case NAPO_LOGITS_F64:
      launch_forward<double>(logits, layout, labels, ignore_index, token_logps, lse, s);
      break;
    case NAPO_LOGITS_BF16:
      launch_forward<__nv_bfloat16>(logits, layout, labels, ignore_index, token_logps, lse, s);
      break;
    case NAPO_LOGITS_F16:
      launch_forward<__half>(logits, layout, labels, ignore_index, token_logps, lse, s);
      break;
    }
  });
}

napo_status napo_token_logps_backward_cuda(const void *logits, napo_logits_layout layout, napo_logits_dtype dtype,
                                           napo_labels labels, int64_t ignore_index, const double *lse,
                                           const void *grad_token, void *grad_logits, napo_logits_layout grad_layout,
                                           int device, void *stream, int *cuda_error) {
  napo_status status = check_launch(logits, layout, dtype, labels);
  if (status != NAPO_OK ||
      (status = napo_check_logps_backward_args(layout, lse, grad_token, grad_logits, grad_layout)) != NAPO_OK ||
      layout.batch * layout.time == 0) {
    return status;
  }
  const cudaStream_t s = (cudaStream_t)stream;
  return napo_cuda::on_device(device, stream, cuda_error, [&] {
    switch (dtype) {
    case NAPO_LOGITS_F32:
      launch_backward<float>(logits, layout, labels, ignore_index, lse, grad_token, grad_logits, grad_layout, s);
      break;
    case NAPO_LOGITS_F64:
      launch_backward<double>(logits, layout, labels, ignore_index, lse, grad_token, grad_logits, grad_layout, s);
      break;
    case NAPO_LOGITS_BF16:
      launch_backward<__nv_bfloat16>(logits, layout, labels, ignore_index, lse, grad_token, grad_logits, grad_layout,
                                     s);
      break;
    case NAPO_LOGITS_F16:
      launch_backward<__half>(logits, layout, labels, ignore_index, lse, grad_token, grad_logits, grad_layout, s);
      break;
    }
  });
}

} // extern "C"
