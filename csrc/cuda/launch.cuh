/* Launch plumbing shared by napo's CUDA sources. */
#ifndef NAPO_CUDA_LAUNCH_CUH
#define NAPO_CUDA_LAUNCH_CUH

#include <cuda_runtime.h>

#include "../napo.h"

namespace napo_cuda {

/* Runs `launch` with `device` current, restores the caller's device, and turns
 * a launch or runtime error into NAPO_ERR_CUDA with the cudaError_t in *cuda_error.
 * Never synchronises: errors raised later by the kernel surface on the next call. */
template <typename Launch> napo_status on_device(int device, int *cuda_error, Launch launch) {
  int previous = -1;
  cudaError_t err = cudaGetDevice(&previous);
  if (err == cudaSuccess && previous != device) {
    err = cudaSetDevice(device);
  }
  if (err == cudaSuccess) {
    launch();
    err = cudaGetLastError();
  }
  if (previous >= 0 && previous != device) {
    const cudaError_t restore = cudaSetDevice(previous);
    if (err == cudaSuccess) {
      err = restore;
    }
  }
  if (err != cudaSuccess) {
    if (cuda_error != nullptr) {
      *cuda_error = (int)err;
    }
    return NAPO_ERR_CUDA;
  }
  return NAPO_OK;
}

} // namespace napo_cuda

#endif /* NAPO_CUDA_LAUNCH_CUH */
