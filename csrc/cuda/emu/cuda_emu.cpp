/*
 * The emulator's runtime (see cuda_emu.h): the block barrier, the launch loop, the launch counts,
 * the few runtime calls napo makes, and the 16-bit float conversions.
 */
#include "cuda_emu.h"

#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace {

/* The barrier of one block's threads. It serves __syncthreads() and the end of each block: a block
 * ends when all its threads have returned, and only then does the next block start on them. A thread
 * that returns while others wait in __syncthreads() (or the reverse) is a divergent barrier: undefined
 * on CUDA, so the emulator stops the process with the kernel's name instead of guessing. */
class block_barrier {
public:
  block_barrier(const char *kernel, unsigned threads) : kernel_(kernel), threads_(threads) {}

  void sync() { wait_for(synced_, finished_, "__syncthreads() reached by only some threads of the block"); }
  void finish_block() { wait_for(finished_, synced_, "a thread returned while others wait in __syncthreads()"); }

private:
  void wait_for(unsigned &mine, unsigned other, const char *what) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (other != 0) {
      diverged(what);
    }
    if (++mine == threads_) {
      mine = 0;
      ++generation_;
      lock.unlock();
      released_.notify_all();
      return;
    }
    const unsigned long long generation = generation_;
    released_.wait(lock, [&] { return generation_ != generation; });
  }

  [[noreturn]] void diverged(const char *what) const {
    std::fprintf(stderr, "napo CUDA emulator: divergent barrier in kernel %s, block %u: %s (undefined on CUDA)\n",
                 kernel_, blockIdx.x, what);
    std::abort();
  }

  const char *kernel_;
  const unsigned threads_;
  std::mutex mutex_;
  std::condition_variable released_;
  unsigned synced_ = 0, finished_ = 0;
  unsigned long long generation_ = 0;
};

thread_local block_barrier *current_barrier = nullptr;
thread_local cudaError_t last_error = cudaSuccess;

/* The OS threads that play a block's CUDA threads, kept from one launch to the next (creating 256
 * threads per launch cost most of the suite's time, ThreadSanitizer's above all). run() hands
 * threads 0..n-1 one job and returns when all of them have finished it. */
class thread_pool {
public:
  ~thread_pool() {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    start_.notify_all();
    for (std::thread &worker : workers_) {
      worker.join();
    }
  }

  void run(unsigned n, const std::function<void(unsigned)> &job) {
    const std::lock_guard<std::mutex> one_launch_at_a_time(launch_mutex_);
    std::unique_lock<std::mutex> lock(mutex_);
    while (workers_.size() < n) {
      workers_.emplace_back(&thread_pool::work, this, (unsigned)workers_.size(), generation_);
    }
    job_ = &job;
    active_ = n;
    running_ = n;
    ++generation_;
    lock.unlock();
    start_.notify_all();
    lock.lock();
    done_.wait(lock, [&] { return running_ == 0; });
    job_ = nullptr;
  }

private:
  void work(unsigned index, unsigned long long seen) {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      start_.wait(lock, [&] { return generation_ != seen || stopping_; });
      if (stopping_) {
        return;
      }
      seen = generation_;
      if (index >= active_) {
        continue;
      }
      const std::function<void(unsigned)> *job = job_;
      lock.unlock();
      (*job)(index);
      lock.lock();
      if (--running_ == 0) {
        done_.notify_one();
      }
    }
  }

  std::mutex launch_mutex_, mutex_;
  std::condition_variable start_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(unsigned)> *job_ = nullptr;
  unsigned active_ = 0, running_ = 0;
  unsigned long long generation_ = 0;
  bool stopping_ = false;
};

thread_pool &pool() {
  static thread_pool threads;
  return threads;
}

std::mutex counts_mutex;
std::map<std::string, long long> counts;

std::string base_name(const char *kernel_name) {
  const std::string name(kernel_name);
  return name.substr(0, name.find('<'));
}

} // namespace

void __syncthreads() {
  if (current_barrier == nullptr) {
    std::fprintf(stderr, "napo CUDA emulator: __syncthreads() called outside a kernel\n");
    std::abort();
  }
  current_barrier->sync();
}

namespace napo_emu {

void run(const char *kernel_name, dim3 grid, dim3 block, size_t dynamic_shared, const std::function<void()> &body) {
  /* CUDA's limits for what napo launches: 1-D, at most 1024 threads, a non-empty grid, no dynamic shared memory
   * (the emulator gives none). */
  if (grid.x == 0 || grid.y != 1 || grid.z != 1 || block.x == 0 || block.x > 1024 || block.y != 1 || block.z != 1 ||
      dynamic_shared != 0) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  {
    const std::lock_guard<std::mutex> lock(counts_mutex);
    ++counts[base_name(kernel_name)];
  }
  block_barrier barrier(kernel_name, block.x);
  pool().run(block.x, [&](unsigned t) {
    threadIdx = dim3(t, 0, 0);
    blockDim = block;
    gridDim = grid;
    current_barrier = &barrier;
    for (unsigned b = 0; b < grid.x; ++b) {
      blockIdx = dim3(b, 0, 0);
      body();
      barrier.finish_block();
    }
    current_barrier = nullptr;
  });
}

int launch_counts(launch_count *out, int capacity) {
  const std::lock_guard<std::mutex> lock(counts_mutex);
  int i = 0;
  for (const auto &entry : counts) {
    if (i < capacity) {
      out[i] = {entry.first.c_str(), entry.second};
    }
    ++i;
  }
  return i;
}

void reset_launch_counts() {
  const std::lock_guard<std::mutex> lock(counts_mutex);
  counts.clear();
}

} // namespace napo_emu

/* ---- runtime calls ---- */

cudaError_t cudaGetDevice(int *device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : (last_error = cudaErrorInvalidDevice); }
cudaError_t cudaGetLastError() {
  const cudaError_t error = last_error;
  last_error = cudaSuccess;
  return error;
}
cudaError_t cudaGetDeviceCount(int *count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus *status) {
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDriverGetVersion(int *version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}
const char *cudaGetErrorString(cudaError_t error) {
  switch (error) {
  case cudaSuccess:
    return "no error (emulated)";
  case cudaErrorInvalidConfiguration:
    return "invalid configuration argument (emulated)";
  case cudaErrorInvalidDevice:
    return "invalid device ordinal (emulated)";
  default:
    return "emulated CUDA error";
  }
}
cudaError_t cudaGetDriverEntryPoint(const char *, void **fn, unsigned long long,
                                    cudaDriverEntryPointQueryResult *status) {
  *fn = nullptr;
  *status = cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}

/* ---- 16-bit floats ----
 * Written from the IEEE definitions in double arithmetic (a float and its rounding quantum are exact
 * there), deliberately unlike csrc/napo_dtype.h's bit tricks, so the two are independent; both are
 * tested against torch over every 16-bit pattern (tests/test_cuda_emu.py). */
namespace {

uint32_t float_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

/* |f| rounded to a multiple of `quantum`, to nearest even or toward zero. */
double quantize(double magnitude, double quantum, bool nearest) {
  const double steps = magnitude / quantum;
  return (nearest ? std::nearbyint(steps) : std::trunc(steps)) * quantum;
}

uint16_t half_bits(float f, bool nearest) {
  const uint16_t sign = (float_bits(f) >> 16) & 0x8000u;
  if (std::isnan(f)) {
    return 0x7fff; /* CUDA's canonical NaN */
  }
  const double magnitude = std::fabs((double)f);
  if (std::isinf(f) || (nearest && magnitude >= 65520.0)) { /* 65520 = max half + half its quantum */
    return sign | 0x7c00u;
  }
  if (magnitude >= 65504.0) {
    return sign | 0x7bffu; /* toward zero: the largest finite half */
  }
  const int exponent = magnitude < 0x1p-14 ? -14 : std::ilogb(magnitude);
  const double value = quantize(magnitude, std::ldexp(1.0, exponent - 10), nearest);
  if (value < 0x1p-14) {
    return sign | (uint16_t)(value * 0x1p24); /* subnormal (or zero) */
  }
  const int e = std::ilogb(value); /* rounding may have carried into the next binade */
  const uint16_t mantissa = (uint16_t)(std::ldexp(value, 10 - e) - 1024.0);
  return (uint16_t)(sign | ((e + 15) << 10) | mantissa);
}

uint16_t bfloat16_bits(float f, bool nearest) {
  const uint16_t sign = (float_bits(f) >> 16) & 0x8000u;
  if (std::isnan(f)) {
    return 0x7fff;
  }
  if (std::isinf(f)) {
    return sign | 0x7f80u;
  }
  const double magnitude = std::fabs((double)f);
  const int exponent = magnitude < 0x1p-126 ? -126 : std::ilogb(magnitude);
  const double value = quantize(magnitude, std::ldexp(1.0, exponent - 7), nearest);
  if (value >= 0x1p128) {
    return sign | 0x7f80u;
  }
  /* value has at most 8 significant bits, so as a float its low 16 bits are zero. */
  return sign | (uint16_t)(float_bits((float)value) >> 16);
}

} // namespace

float __half2float(__half h) {
  const int exponent = (h.bits >> 10) & 0x1f, mantissa = h.bits & 0x3ff;
  const float sign = (h.bits & 0x8000u) ? -1.0f : 1.0f;
  if (exponent == 0x1f) {
    if (mantissa == 0) {
      return sign * INFINITY;
    }
    uint32_t bits = ((uint32_t)(h.bits & 0x8000u) << 16) | 0x7f800000u | ((uint32_t)mantissa << 13);
    float nan;
    std::memcpy(&nan, &bits, sizeof nan);
    return nan; /* the payload is kept, as CUDA does */
  }
  if (exponent == 0) {
    return sign * std::ldexp((float)mantissa, -24);
  }
  return sign * std::ldexp((float)(1024 + mantissa), exponent - 25);
}
__half __float2half(float f) { return {half_bits(f, true)}; }
__half __float2half_rz(float f) { return {half_bits(f, false)}; }
float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = (uint32_t)h.bits << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
__nv_bfloat16 __float2bfloat16(float f) { return {bfloat16_bits(f, true)}; }
__nv_bfloat16 __float2bfloat16_rz(float f) { return {bfloat16_bits(f, false)}; }

/* ---- for tests that load the emulated kernels as a shared library (ctypes) ---- */
extern "C" {
__attribute__((visibility("default"))) float napo_emu_half_to_float(uint16_t bits) { return __half2float({bits}); }
__attribute__((visibility("default"))) uint16_t napo_emu_float_to_half(float f) { return __float2half(f).bits; }
__attribute__((visibility("default"))) float napo_emu_bfloat16_to_float(uint16_t bits) {
  return __bfloat162float({bits});
}
__attribute__((visibility("default"))) uint16_t napo_emu_float_to_bfloat16(float f) { return __float2bfloat16(f).bits; }
/* "name=count" lines into buf (NUL-terminated, truncated to capacity); returns the number of kernels. */
__attribute__((visibility("default"))) int napo_emu_launch_counts(char *buf, int capacity) {
  napo_emu::launch_count entries[64];
  const int n = napo_emu::launch_counts(entries, 64);
  int used = 0;
  buf[0] = '\0';
  for (int i = 0; i < n && i < 64 && used < capacity; ++i) {
    used += std::snprintf(buf + used, (size_t)(capacity - used), "%s=%lld\n", entries[i].kernel, entries[i].launches);
  }
  return n;
}
}
