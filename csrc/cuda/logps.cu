/*
 * CUDA kernels of the sequence log-probs: one block per (b, t) row, float32
 * accumulation, bf16/fp16/fp32/fp64 loads, on the caller's stream. The forward
 * reads a row once with a per-thread online log-sum-exp merged across the
 * block; the backward writes the row's gradient in one pass.
 */
#include "launch.cuh"
#include "logps_kernels.cuh"

namespace {

template <typename T>
void launch_forward(const void *logits, napo_logits_layout layout, napo_labels labels, int64_t ignore_index,
                    void *token_logps, double *lse, cudaStream_t stream) {
  using A = typename acc_of<T>::type;
  NAPO_LAUNCH(forward_kernel<T>, (unsigned)(layout.batch * layout.time), kThreads, 0,
              stream)((const T *)logits, layout, labels, ignore_index, (A *)token_logps, (double *)lse);
}

template <typename T>
void launch_backward(const void *logits, napo_logits_layout layout, napo_labels labels, int64_t ignore_index,
                     const double *lse, const void *grad_token, void *grad_logits, napo_logits_layout grad_layout,
                     cudaStream_t stream) {
  using A = typename acc_of<T>::type;
  NAPO_LAUNCH(backward_kernel<T>, (unsigned)(layout.batch * layout.time), kThreads, 0,
              stream)((const T *)logits, layout, labels, ignore_index, (const double *)lse, (const A *)grad_token,
                      (T *)grad_logits, grad_layout);
}

/* The CPU entry points' own checks (napo_check_logps_args: one validation for both), plus the grid's limit. */
napo_status check_launch(const void *logits, napo_logits_layout layout, napo_logits_dtype dtype, napo_labels labels) {
  const napo_status status = napo_check_logps_args(logits, layout, dtype, labels);
  if (status != NAPO_OK) {
    return status;
  }
  if (layout.batch * layout.time > 0x7fffffffLL) {
    return NAPO_ERR_SIZE; /* one block per row: the grid's x extent */
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
