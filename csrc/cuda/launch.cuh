/* Launch plumbing shared by napo's CUDA sources. */
#ifndef NAPO_CUDA_LAUNCH_CUH
#define NAPO_CUDA_LAUNCH_CUH

#include <cuda_runtime.h>

#include "../napo.h"

/* The one launch syntax of napo's sources: NAPO_LAUNCH(kernel, grid, block, smem, stream)(args...) is
 * kernel<<<grid, block, smem, stream>>>(args...) under nvcc, and a launch on napo's CPU emulation of CUDA
 * (csrc/cuda/emu/cuda_emu.h) under a host compiler, so the host code computing grids and blocks runs too. */
#ifdef __CUDACC__
#define NAPO_LAUNCH(kernel, grid, block, smem, stream) kernel<<<(grid), (block), (smem), (stream)>>>
#else
#define NAPO_LAUNCH(kernel, grid, block, smem, stream)                                                                 \
  napo_emu::make_launcher(#kernel, (grid), (block), (smem), (stream), kernel)
#endif

namespace napo_cuda {

/* NAPO_CUDA_DEBUG, as set by napo_cuda_set_debug (csrc/cuda/runtime.cu). */
bool debug_enabled();

/* Whether `device` already has its primary context (true when the driver cannot tell). */
bool has_context(int device);

/* Debug mode synchronises the stream, except while it is being captured into a CUDA graph
 * (synchronising would invalidate the capture). */
inline cudaError_t debug_sync(cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess) {
    (void)cudaGetLastError(); /* e.g. the legacy stream during another stream's capture: do not sync */
    return cudaSuccess;
  }
  return capture == cudaStreamCaptureStatusNone ? cudaStreamSynchronize(stream) : cudaSuccess;
}

/* Runs `launch` with `device` current and turns a CUDA error into NAPO_ERR_CUDA with the
 * cudaError_t in *cuda_error. Without debug mode it never synchronises, so a fault inside the
 * kernel surfaces on a later call.
 *  - An error already pending before the launch (left by earlier CUDA work: a launch nobody
 *    checked, or a sticky fault) is not napo's: napo does not launch and reports it with
 *    NAPO_CUDA_FOREIGN_ERROR set in *cuda_error, instead of returning it as its kernel's error.
 *  - Debug mode (NAPO_CUDA_DEBUG=1) synchronises the stream before the launch (a fault found
 *    there is foreign too) and after it, so a fault inside napo's kernel is reported by this call.
 *  - The device is switched only when it differs, and switched back only if the previous device
 *    already has a context: since CUDA 12 cudaSetDevice creates one (hundreds of MiB on GPU 0 for a
 *    process that only uses GPU 1). torch's own guard (c10::cuda::MaybeSetDevice) does the same. */
template <typename Launch> napo_status on_device(int device, void *stream, int *cuda_error, Launch launch) {
  const cudaStream_t s = (cudaStream_t)stream;
  const bool debug = debug_enabled();
  int previous = -1;
  bool foreign = false;
  cudaError_t err = cudaGetDevice(&previous);
  if (err == cudaSuccess && previous != device) {
    err = cudaSetDevice(device);
  }
  if (err == cudaSuccess) {
    err = cudaGetLastError();
    if (err == cudaSuccess && debug) {
      err = debug_sync(s);
    }
    foreign = err != cudaSuccess;
  }
  if (err == cudaSuccess) {
    launch();
    err = cudaGetLastError();
    if (err == cudaSuccess && debug) {
      err = debug_sync(s);
    }
  }
  if (previous >= 0 && previous != device && has_context(previous)) {
    const cudaError_t restore = cudaSetDevice(previous);
    if (err == cudaSuccess) {
      err = restore;
    }
  }
  if (err != cudaSuccess) {
    if (cuda_error != nullptr) {
      *cuda_error = (int)err | (foreign ? NAPO_CUDA_FOREIGN_ERROR : 0);
    }
    return NAPO_ERR_CUDA;
  }
  return NAPO_OK;
}

} // namespace napo_cuda

#endif /* NAPO_CUDA_LAUNCH_CUH */
