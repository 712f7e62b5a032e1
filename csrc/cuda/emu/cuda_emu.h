/*
 * napo's CPU emulation of the parts of CUDA its kernels use, so that the same kernel source
 * (the csrc/cuda .cuh headers, launched from the .cu files) runs under a host C++17 compiler in CI,
 * under AddressSanitizer/UBSan and ThreadSanitizer.
 *
 * The execution model, as CUDA defines it for what napo's kernels do:
 *  - every thread of a block is a real OS thread, so __syncthreads() is a real barrier and a
 *    missing one is a data race that ThreadSanitizer reports;
 *  - blocks run one after another on the same blockDim.x threads (CUDA guarantees no order or
 *    concurrency between blocks, so a kernel correct on CUDA is correct here);
 *  - __shared__ is function-static storage: one copy per kernel instantiation, shared by the
 *    threads of the running block (blocks never overlap, so one copy serves them all);
 *  - a __syncthreads() that not every thread of the block reaches (one thread returned while
 *    others wait) is undefined on CUDA and reported here as an error (the launch fails);
 *  - warp shuffles, warp votes and atomics are NOT modelled: a kernel calling one does not compile
 *    (static_assert below), rather than running something else.
 * Only 1-D grids and blocks are launched by napo; threadIdx.y/z and blockIdx.y/z are 0.
 * Memory is host memory: "device pointers" are ordinary pointers; streams are ignored (every
 * launch completes before it returns, which a stream also guarantees to later work on it).
 */
#ifndef NAPO_CUDA_EMU_H
#define NAPO_CUDA_EMU_H

#include <math.h>
#include <stdint.h>

#include <cmath>
#include <cstddef>
#include <functional>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
using uint3 = dim3;

/* Set for each emulated thread before it runs a block; the sizes are fixed for a launch. */
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

void __syncthreads();

/* ---- the runtime calls napo's launch plumbing makes (one emulated device, ordinal 0) ---- */
typedef enum {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
} cudaError_t;
typedef struct napo_emu_stream *cudaStream_t;
typedef enum {
  cudaStreamCaptureStatusNone = 0,
  cudaStreamCaptureStatusActive = 1,
} cudaStreamCaptureStatus;

cudaError_t cudaGetDevice(int *device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetLastError();
cudaError_t cudaGetDeviceCount(int *count);
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus *status);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaDriverGetVersion(int *version);
const char *cudaGetErrorString(cudaError_t error);

/* The driver-entry-point lookup of csrc/cuda/runtime.cu: never found here (has_context then answers true). */
#define CUDART_VERSION 12000
typedef int CUresult;
typedef int CUdevice;
typedef enum {
  cudaDriverEntryPointSuccess = 0,
  cudaDriverEntryPointSymbolNotFound = 1
} cudaDriverEntryPointQueryResult;
enum { cudaEnableDefault = 0 };
cudaError_t cudaGetDriverEntryPoint(const char *symbol, void **fn, unsigned long long flags,
                                    cudaDriverEntryPointQueryResult *status);

/* ---- 16-bit floats: CUDA's conversions (round to nearest even unless the name says _rz) ---- */
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
float __half2float(__half h);
__half __float2half(float f);    /* round to nearest even; overflow to inf; subnormals kept */
__half __float2half_rz(float f); /* round toward zero (what a truncating conversion does) */
float __bfloat162float(__nv_bfloat16 h);
__nv_bfloat16 __float2bfloat16(float f);
__nv_bfloat16 __float2bfloat16_rz(float f);

/* ---- what is not modelled must not compile ---- */
namespace napo_emu {
template <typename... Args> constexpr bool not_modelled = sizeof...(Args) < 0;
} // namespace napo_emu
#define NAPO_EMU_NOT_MODELLED(name, what)                                                                              \
  template <typename... Args> int name(Args...) {                                                                      \
    static_assert(napo_emu::not_modelled<Args...>, #name ": " what " not modelled by napo's CUDA emulator "            \
                                                         "(csrc/cuda/emu/cuda_emu.h): model it first");                \
    return 0;                                                                                                          \
  }
NAPO_EMU_NOT_MODELLED(__shfl_sync, "warp shuffles are")
NAPO_EMU_NOT_MODELLED(__shfl_up_sync, "warp shuffles are")
NAPO_EMU_NOT_MODELLED(__shfl_down_sync, "warp shuffles are")
NAPO_EMU_NOT_MODELLED(__shfl_xor_sync, "warp shuffles are")
NAPO_EMU_NOT_MODELLED(__syncwarp, "warp barriers are")
NAPO_EMU_NOT_MODELLED(__ballot_sync, "warp votes are")
NAPO_EMU_NOT_MODELLED(__any_sync, "warp votes are")
NAPO_EMU_NOT_MODELLED(__all_sync, "warp votes are")
NAPO_EMU_NOT_MODELLED(__activemask, "warp masks are")
NAPO_EMU_NOT_MODELLED(atomicAdd, "atomics are")
NAPO_EMU_NOT_MODELLED(atomicSub, "atomics are")
NAPO_EMU_NOT_MODELLED(atomicMax, "atomics are")
NAPO_EMU_NOT_MODELLED(atomicMin, "atomics are")
NAPO_EMU_NOT_MODELLED(atomicExch, "atomics are")
NAPO_EMU_NOT_MODELLED(atomicCAS, "atomics are")
NAPO_EMU_NOT_MODELLED(__threadfence, "memory fences are")
NAPO_EMU_NOT_MODELLED(__syncthreads_count, "barrier reductions are")
NAPO_EMU_NOT_MODELLED(__syncthreads_or, "barrier reductions are")
NAPO_EMU_NOT_MODELLED(__syncthreads_and, "barrier reductions are")
#undef NAPO_EMU_NOT_MODELLED

namespace napo_emu {

/* Runs grid.x blocks of block.x threads of `body`; a launch error is kept for cudaGetLastError. */
void run(const char *kernel_name, dim3 grid, dim3 block, size_t dynamic_shared, const std::function<void()> &body);

/* Launches counted per kernel (the name as written at the launch, template arguments dropped). */
struct launch_count {
  const char *kernel;
  long long launches;
};
/* Copies up to `capacity` counts into `out` and returns how many kernels were launched. */
int launch_counts(launch_count *out, int capacity);
void reset_launch_counts();

/* NAPO_LAUNCH(kernel, grid, block, smem, stream)(args...) in the emulated build (csrc/cuda/launch.cuh). */
template <typename Kernel> struct launcher {
  const char *kernel_name;
  dim3 grid, block;
  size_t dynamic_shared;
  Kernel kernel;
  template <typename... Args> void operator()(Args... args) const {
    /* The arguments are copied once, as CUDA copies them to the device, and every thread reads that copy. */
    const Kernel body = kernel;
    run(kernel_name, grid, block, dynamic_shared, [=] { body(args...); });
  }
};
template <typename Kernel>
launcher<Kernel> make_launcher(const char *kernel_name, dim3 grid, dim3 block, size_t dynamic_shared, cudaStream_t,
                               Kernel kernel) {
  return {kernel_name, grid, block, dynamic_shared, kernel};
}

} // namespace napo_emu

#endif /* NAPO_CUDA_EMU_H */
