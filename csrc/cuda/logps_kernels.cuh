/*
 * The kernels of the sequence log-probs (launched by csrc/cuda/logps.cu): one block per (b, t) row,
 * float32 accumulation, bf16/fp16/fp32/fp64 loads. Compiled by nvcc, and by the host C++ compiler
 * against napo's CPU emulation of CUDA (csrc/cuda/emu, `make test-cuda-emu`), so the same source
 * runs in CI under the sanitizers.
 */
#ifndef NAPO_CUDA_LOGPS_KERNELS_CUH
#define NAPO_CUDA_LOGPS_KERNELS_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../napo.h"
#include "../napo_math.h"

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

} // namespace

#endif /* NAPO_CUDA_LOGPS_KERNELS_CUH */
