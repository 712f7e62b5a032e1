/*
 * CUDA kernels of the NaPO objective. They run on the caller's stream, read q
 * from device memory and never copy to the host, so a whole objective step
 * (margins -> q -> weights -> loss) is asynchronous and CUDA-graph capturable.
 * Arithmetic is in double as on the CPU (these are O(batch) vectors; the
 * double throughput is irrelevant next to the launch latency).
 */
#include "launch.cuh"
#include "objective_kernels.cuh"

namespace {

constexpr int64_t kMaxBlocks = 4096;

int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return (int)(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

template <typename T>
napo_status loss_forward(const T *margins, napo_layout layout, const T *q, int64_t q_stride, double beta, T *loss,
                         T *grad_factor, int device, void *stream, int *cuda_error) {
  /* The CPU entry point's checks, short of reading q's values (out-of-range q gives NaN in the kernel). */
  const napo_status status = napo_check_loss_forward_args(margins, layout, q, q_stride, beta, loss);
  const int64_t total = layout.rows * layout.cols;
  if (status != NAPO_OK || total == 0) {
    return status;
  }
  return napo_cuda::on_device(device, stream, cuda_error, [&] {
    NAPO_LAUNCH(loss_forward_kernel<T>, blocks_for(total), kThreads, 0,
                (cudaStream_t)stream)(margins, layout, q, q_stride, beta, loss, grad_factor);
  });
}

template <typename T>
napo_status loss_backward(const T *grad_loss, napo_layout grad_layout, const T *grad_factor, T *grad_margins,
                          int device, void *stream, int *cuda_error) {
  const napo_status status = napo_check_layout(grad_loss, grad_layout);
  if (status != NAPO_OK) {
    return status;
  }
  const int64_t total = grad_layout.rows * grad_layout.cols;
  if (total == 0) {
    return NAPO_OK;
  }
  if (grad_factor == nullptr || grad_margins == nullptr) {
    return NAPO_ERR_NULL_POINTER;
  }
  return napo_cuda::on_device(device, stream, cuda_error, [&] {
    NAPO_LAUNCH(loss_backward_kernel<T>, blocks_for(total), kThreads, 0,
                (cudaStream_t)stream)(grad_loss, grad_layout, grad_factor, grad_margins);
  });
}

template <typename T>
napo_status adaptive_q(const T *margins, int64_t stride, int64_t n, double gamma, double q_min, double q_max, T *q_out,
                       int device, void *stream, int *cuda_error) {
  napo_status status = napo_check_vector(margins, n, stride, 0);
  if (status != NAPO_OK || (status = napo_check_q_params(gamma, q_min, q_max)) != NAPO_OK) {
    return status;
  }
  if (q_out == nullptr) {
    return NAPO_ERR_NULL_POINTER;
  }
  return napo_cuda::on_device(device, stream, cuda_error, [&] {
    NAPO_LAUNCH(adaptive_q_kernel<T>, 1, kThreads, 0, (cudaStream_t)stream)(margins, stride, n, gamma, q_min, q_max,
                                                                            q_out);
  });
}

template <typename T>
napo_status q_from_mean(const T *means, int64_t n, int64_t stride, double gamma, double q_min, double q_max, T *q_out,
                        int device, void *stream, int *cuda_error) {
  napo_status status = napo_check_vector(means, n, stride, 1);
  if (status != NAPO_OK || (status = napo_check_q_params(gamma, q_min, q_max)) != NAPO_OK) {
    return status;
  }
  if (n == 0) {
    return NAPO_OK;
  }
  if (q_out == nullptr) {
    return NAPO_ERR_NULL_POINTER;
  }
  return napo_cuda::on_device(device, stream, cuda_error, [&] {
    NAPO_LAUNCH(q_from_mean_kernel<T>, blocks_for(n), kThreads, 0, (cudaStream_t)stream)(means, n, stride, gamma, q_min,
                                                                                         q_max, q_out);
  });
}

template <typename T>
napo_status dynamic_weights(const T *reward_margins, int64_t stride, int64_t k, double w_min, double eps, T *weights,
                            int device, void *stream, int *cuda_error) {
  napo_status status = napo_check_vector(reward_margins, k, stride, 0);
  if (status != NAPO_OK || (status = napo_check_weight_params(w_min, eps)) != NAPO_OK) {
    return status;
  }
  if (weights == nullptr) {
    return NAPO_ERR_NULL_POINTER;
  }
  return napo_cuda::on_device(device, stream, cuda_error, [&] {
    NAPO_LAUNCH(dynamic_weights_kernel<T>, 1, kThreads, 0, (cudaStream_t)stream)(reward_margins, stride, k, w_min, eps,
                                                                                 weights);
  });
}

} // namespace

extern "C" {

int napo_cuda_available(void) {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

const char *napo_cuda_error_string(int cuda_error) { return cudaGetErrorString((cudaError_t)cuda_error); }

napo_status napo_loss_forward_f32_cuda(const float *margins, napo_layout layout, const float *q, int64_t q_stride,
                                       double beta, float *loss, float *grad_factor, int device, void *stream,
                                       int *cuda_error) {
  return loss_forward(margins, layout, q, q_stride, beta, loss, grad_factor, device, stream, cuda_error);
}

napo_status napo_loss_forward_f64_cuda(const double *margins, napo_layout layout, const double *q, int64_t q_stride,
                                       double beta, double *loss, double *grad_factor, int device, void *stream,
                                       int *cuda_error) {
  return loss_forward(margins, layout, q, q_stride, beta, loss, grad_factor, device, stream, cuda_error);
}

napo_status napo_loss_backward_f32_cuda(const float *grad_loss, napo_layout grad_layout, const float *grad_factor,
                                        float *grad_margins, int device, void *stream, int *cuda_error) {
  return loss_backward(grad_loss, grad_layout, grad_factor, grad_margins, device, stream, cuda_error);
}

napo_status napo_loss_backward_f64_cuda(const double *grad_loss, napo_layout grad_layout, const double *grad_factor,
                                        double *grad_margins, int device, void *stream, int *cuda_error) {
  return loss_backward(grad_loss, grad_layout, grad_factor, grad_margins, device, stream, cuda_error);
}

napo_status napo_adaptive_q_f32_cuda(const float *margins, int64_t stride, int64_t n, double gamma, double q_min,
                                     double q_max, float *q_out, int device, void *stream, int *cuda_error) {
  return adaptive_q(margins, stride, n, gamma, q_min, q_max, q_out, device, stream, cuda_error);
}

napo_status napo_adaptive_q_f64_cuda(const double *margins, int64_t stride, int64_t n, double gamma, double q_min,
                                     double q_max, double *q_out, int device, void *stream, int *cuda_error) {
  return adaptive_q(margins, stride, n, gamma, q_min, q_max, q_out, device, stream, cuda_error);
}

napo_status napo_q_from_mean_f32_cuda(const float *means, int64_t n, int64_t stride, double gamma, double q_min,
                                      double q_max, float *q_out, int device, void *stream, int *cuda_error) {
  return q_from_mean(means, n, stride, gamma, q_min, q_max, q_out, device, stream, cuda_error);
}

napo_status napo_q_from_mean_f64_cuda(const double *means, int64_t n, int64_t stride, double gamma, double q_min,
                                      double q_max, double *q_out, int device, void *stream, int *cuda_error) {
  return q_from_mean(means, n, stride, gamma, q_min, q_max, q_out, device, stream, cuda_error);
}

napo_status napo_dynamic_weights_f32_cuda(const float *reward_margins, int64_t stride, int64_t k, double w_min,
                                          double eps, float *weights, int device, void *stream, int *cuda_error) {
  return dynamic_weights(reward_margins, stride, k, w_min, eps, weights, device, stream, cuda_error);
}

napo_status napo_dynamic_weights_f64_cuda(const double *reward_margins, int64_t stride, int64_t k, double w_min,
                                          double eps, double *weights, int device, void *stream, int *cuda_error) {
  return dynamic_weights(reward_margins, stride, k, w_min, eps, weights, device, stream, cuda_error);
}

} // extern "C"
