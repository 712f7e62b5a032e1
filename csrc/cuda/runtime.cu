/*
 * What napo's CUDA code needs from the runtime besides its kernels: the versions
 * it was built with and runs on (so Python can explain a fallback), the debug
 * switch read by every launch, and whether a device already has a context.
 */
#include <cuda.h>
#include <cuda_runtime.h>

#include <atomic>

#include "../napo.h"
#include "launch.cuh"

namespace {

std::atomic<int> debug_mode{0};

using primary_ctx_state_fn = CUresult (*)(CUdevice, unsigned int *, int *);
using device_get_fn = CUresult (*)(CUdevice *, int);

struct driver_calls {
  primary_ctx_state_fn primary_ctx_state = nullptr;
  device_get_fn device_get = nullptr;
};

/* The two driver calls, looked up once through the runtime: linking libcuda itself would make the
 * module fail to import on machines without a driver. */
void *driver_symbol(const char *name) {
  void *fn = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
  if (cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &found) != cudaSuccess) {
    fn = nullptr;
  }
#else
  if (cudaGetDriverEntryPoint(name, &fn, cudaEnableDefault, &found) != cudaSuccess) {
    fn = nullptr;
  }
#endif
  (void)cudaGetLastError(); /* a failed lookup is not an error of anyone's kernel */
  return found == cudaDriverEntryPointSuccess ? fn : nullptr;
}

const driver_calls &driver() {
  static const driver_calls calls = [] {
    driver_calls c;
    c.primary_ctx_state = reinterpret_cast<primary_ctx_state_fn>(driver_symbol("cuDevicePrimaryCtxGetState"));
    c.device_get = reinterpret_cast<device_get_fn>(driver_symbol("cuDeviceGet"));
    return c;
  }();
  return calls;
}

} // namespace

namespace napo_cuda {

bool debug_enabled() { return debug_mode.load(std::memory_order_relaxed) != 0; }

bool has_context(int device) {
  const driver_calls &calls = driver();
  CUdevice handle = 0;
  unsigned int flags = 0;
  int active = 0;
  if (calls.primary_ctx_state == nullptr || calls.device_get == nullptr || calls.device_get(&handle, device) != 0 ||
      calls.primary_ctx_state(handle, &flags, &active) != 0) {
    return true; /* cannot tell: restore, as before */
  }
  return active != 0;
}

} // namespace napo_cuda

extern "C" {

int napo_cuda_runtime_version(void) { return CUDART_VERSION; }

int napo_cuda_driver_version(void) {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return version;
}

int napo_cuda_device_count(int *cuda_error) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (cuda_error != nullptr) {
    *cuda_error = (int)err;
  }
  if (err != cudaSuccess) {
    (void)cudaGetLastError(); /* e.g. cudaErrorInsufficientDriver: reported here, not by the next launch */
    return 0;
  }
  return count;
}

void napo_cuda_set_debug(int enabled) { debug_mode.store(enabled != 0, std::memory_order_relaxed); }

int napo_cuda_debug(void) { return napo_cuda::debug_enabled() ? 1 : 0; }

} // extern "C"
