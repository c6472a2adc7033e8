// What the CUDA quantize and dequantize handlers share: launch geometry, scale storage, error reporting.
// The format's arithmetic itself is in kbit_format.h (shared with the CPU handler).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <type_traits>

#include "kbit_format.h"
#include "kbit_layout.h"
#include "xla/ffi/api/ffi.h"

namespace kbit {
namespace cuda {

namespace ffi = xla::ffi;

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

// The scale format is a run-time argument: every branch on it is uniform across the grid and runs once per
// block, and a template argument would triple the kernels to compile.
__device__ __forceinline__ void write_scale(ScaleFormat f, void* scales, int64_t i, uint32_t stored) {
  if (f == ScaleFormat::kE4M4) {
    static_cast<uint8_t*>(scales)[i] = static_cast<uint8_t>(stored);
  } else if (f == ScaleFormat::kF16) {
    static_cast<uint16_t*>(scales)[i] = static_cast<uint16_t>(stored);
  } else {
    static_cast<uint32_t*>(scales)[i] = stored;
  }
}

__device__ __forceinline__ uint32_t read_scale(ScaleFormat f, const void* scales, int64_t i) {
  if (f == ScaleFormat::kE4M4) return static_cast<const uint8_t*>(scales)[i];
  if (f == ScaleFormat::kF16) return static_cast<const uint16_t*>(scales)[i];
  return static_cast<const uint32_t*>(scales)[i];
}

// Host queries whose answers do not change while the process runs (device attributes, a kernel's occupancy)
// cost microseconds per call, as long as a batch-1 matmul kernel; each answer is kept per device ordinal.
// A query returns a positive value, or 0 on failure (not kept: asked again next time).
constexpr int kCachedDevices = 64;
using DeviceCache = std::atomic<int>[kCachedDevices];

template <typename Query>
int per_device(DeviceCache& cache, Query query) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kCachedDevices) return query();
  int v = cache[device].load(std::memory_order_relaxed);
  if (v <= 0) {
    v = query();
    if (v > 0) cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

// An attribute of the current device, kept per device (one cache per attribute); 0 if the query fails.
template <cudaDeviceAttr kAttr>
int device_attribute() {
  static DeviceCache cache{};
  return per_device(cache, [] {
    int device = 0, value = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&value, kAttr, device) != cudaSuccess) {
      return 0;
    }
    return value;
  });
}

inline int sm_count() { return device_attribute<cudaDevAttrMultiProcessorCount>(); }

// CTAs of `kernel` (`threads` threads, `smem` bytes of dynamic shared memory) that fit on one SM at once,
// kept in `cache` (one per kernel: kernels of one signature share this template's instantiation); above
// 48 KB the kernel is first opted in to that much shared memory, on each device. 0 if a query fails.
template <typename Kernel>
int occupancy(DeviceCache& cache, Kernel kernel, int threads, int smem) {
  return per_device(cache, [&] {
    if (smem > 48 * 1024 &&
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) {
      return 0;
    }
    int per_sm = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem) != cudaSuccess)
      return 0;
    return per_sm;
  });
}

// CTAs of `kernel` (kThreads threads, no dynamic shared memory) that fit on one SM at once; 8 if the query
// fails (the launch then reports any real problem).
template <typename Kernel>
int resident_ctas(DeviceCache& cache, Kernel kernel) {
  const int per_sm = occupancy(cache, kernel, kThreads, 0);
  return per_sm > 0 ? per_sm : 8;
}

// Blocks of one group are contiguous (rows [g * rows_per_group, (g + 1) * rows_per_group) times nb blocks).
// CTAs along x: enough to cover a group's work or to fill every SM with `per_sm` resident CTAs, whichever
// is fewer (a grid of exactly one full wave: a partial second wave would run at a fraction of the
// occupancy); groups along y, capped by the hardware limit (the kernels stride over the rest).
inline dim3 grid_for(int64_t warp_steps, int64_t groups, int per_sm = 8) {
  const int64_t sms = sm_count() > 0 ? sm_count() : 132;
  const int64_t per_group = (warp_steps + kWarps - 1) / kWarps;
  const int64_t cap =
      std::max<int64_t>(1, sms * per_sm / std::max<int64_t>(1, std::min<int64_t>(groups, 64)));
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min(per_group, cap))),
              static_cast<unsigned>(std::min<int64_t>(groups, 65535)));
}

// A grid with one warp step per warp (no grid-stride loop), for bandwidth-bound kernels: a probe of
// dequantize-shaped traffic on the H200 ran 4 % faster with it than with only the resident CTAs.
inline dim3 full_grid_for(int64_t warp_steps, int64_t groups) {
  const int64_t per_group = (warp_steps + kWarps - 1) / kWarps;
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(per_group, 0x7fffffff))),
              static_cast<unsigned>(std::min<int64_t>(groups, 65535)));
}

// Shared-memory loads by 32-bit shared address (volatile: kept where they are written, after the barriers
// that publish what they read).
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ uint2 load_shared_u64(uint32_t address) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(address));
  return v;
}

__device__ __forceinline__ uint4 load_shared_u128(uint32_t address) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(address));
  return v;
}

inline ffi::Error launch_error(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string("jax_kbit: ") + what + " launch failed: " + cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace kbit
