// A probe, not part of the library: the bandwidth ceiling of quantize- and dequantize-*shaped* traffic at
// 2^28 elements, against the copy that issue 3's targets are ratios of. Each kernel moves exactly the bytes
// of format v1 at K = 4 with 16-bit values (per 8 values: 16 bytes of values, 4 bytes of codes, and one
// scale byte per 32 values) and does no more arithmetic than it takes to make every byte depend on its input,
// so its time is what memory allows for that mix of reads and writes:
//   copy     float32 read + write, 16-byte accesses (issue 3's ratios are to bench_gpu.py's XLA copy)
//   memcpy   cudaMemcpyAsync device to device of the same bytes
//   fill     16-bit values written, nothing read (a write-only ceiling)
//   dequant  codes + scales read, 16-bit values written (plain stores, then evict-first st.global.cs)
//   quant    16-bit values read, codes + scales written
// each with persistent CTAs (a grid-stride loop, as the library's kernels run) and with a full grid.
// The dequantize target (95 % of copy) is reachable only if "dequant" here is well above 95 %; likewise 85 %
// for quantize.
// Build and run: nvcc -O3 -arch=sm_90 -o /tmp/probe_codec bench/probe_codec_ceiling.cu && /tmp/probe_codec
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "probe_common.cuh"

constexpr int kThreads = 256;

__device__ __forceinline__ void st_cs(uint4* p, uint4 v) {
  asm volatile("st.global.cs.v4.u32 [%0], {%1,%2,%3,%4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// n16: number of 16-byte units.
__global__ void copy_kernel(const uint4* __restrict__ in, uint4* __restrict__ out, int64_t n16) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n16;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    uint4 v = in[i];
    v.x += 1u;
    out[i] = v;
  }
}

__global__ void fill_kernel(uint4* __restrict__ out, int64_t n16, uint32_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n16;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const uint32_t v = seed ^ static_cast<uint32_t>(i);
    out[i] = make_uint4(v, v, v, v);
  }
}

// One 16-byte output (8 values) from one 4-byte code word and the scale byte of its 32-value block.
template <bool kStreaming>
__global__ void dequant_kernel(const uint32_t* __restrict__ codes, const uint8_t* __restrict__ scales,
                               uint4* __restrict__ out, int64_t n16) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n16;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const uint32_t c = codes[i];
    const uint32_t s = scales[i >> 2];
    const uint4 v = make_uint4(c ^ s, (c >> 8) ^ s, (c >> 16) ^ s, (c >> 24) ^ s);
    if constexpr (kStreaming) {
      st_cs(out + i, v);
    } else {
      out[i] = v;
    }
  }
}

// The reverse: one 16-byte input (8 values) to one code word; lane 0 of each group of 4 writes the scale.
__global__ void quant_kernel(const uint4* __restrict__ in, uint32_t* __restrict__ codes,
                             uint8_t* __restrict__ scales, int64_t n16) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n16;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const uint4 v = in[i];
    const uint32_t c = v.x ^ v.y ^ v.z ^ v.w;
    codes[i] = c;
    const uint32_t m = __reduce_max_sync(0xffffffffu, c & 0xffu);  // loops are warp-uniform (n16 % 32 == 0)
    if ((i & 3) == 0) scales[i >> 2] = static_cast<uint8_t>(m ^ (c >> 24));
  }
}

template <typename F>
double best_us(F&& launch, int reps = 20) {
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  launch();  // warm up
  CHECK(cudaGetLastError());
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    CHECK(cudaEventRecord(e0));
    launch();
    CHECK(cudaEventRecord(e1));
    CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    best = std::min(best, 1e3 * ms);
  }
  CHECK(cudaGetLastError());
  CHECK(cudaEventDestroy(e0));
  CHECK(cudaEventDestroy(e1));
  return best;
}

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : (int64_t{1} << 28);  // values; a multiple of 256
  if (n <= 0 || n % 256 != 0) {
    std::fprintf(stderr, "the element count must be a positive multiple of 256\n");
    return 2;
  }
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  int per_sm = 0;
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, copy_kernel, kThreads, 0));
  const unsigned grid = static_cast<unsigned>(prop.multiProcessorCount * std::max(per_sm, 1));
  std::printf("device: %s, %d SMs, %lld elements, grid %u x %d\n", prop.name, prop.multiProcessorCount,
              static_cast<long long>(n), grid, kThreads);

  const int64_t f32_bytes = n * 4, v16_bytes = n * 2, code_bytes = n / 2, scale_bytes = n / 32;
  uint4 *a = nullptr, *b = nullptr;
  uint32_t* codes = nullptr;
  uint8_t* scales = nullptr;
  CHECK(cudaMalloc(&a, f32_bytes));
  CHECK(cudaMalloc(&b, f32_bytes));
  CHECK(cudaMalloc(&codes, code_bytes));
  CHECK(cudaMalloc(&scales, scale_bytes));
  CHECK(cudaMemset(a, 0x3c, f32_bytes));
  CHECK(cudaMemset(codes, 0x5a, code_bytes));
  CHECK(cudaMemset(scales, 0x21, scale_bytes));

  struct Row {
    const char* name;
    double us, bytes;
  };
  // Each kernel twice: persistent CTAs (as many as are resident at once, a grid-stride loop, like the
  // library's kernels) and one thread per 16-byte unit (the grid a plain elementwise kernel would use).
  const auto full = [](int64_t n16) { return static_cast<unsigned>((n16 + kThreads - 1) / kThreads); };
  const int64_t f16 = f32_bytes / 16, v16 = v16_bytes / 16;
  const double codec_bytes = 1.0 * (v16_bytes + code_bytes + scale_bytes);
  Row rows[] = {
      {"copy f32", best_us([&] { copy_kernel<<<grid, kThreads>>>(a, b, f16); }), 2.0 * f32_bytes},
      {"copy f32, full grid", best_us([&] { copy_kernel<<<full(f16), kThreads>>>(a, b, f16); }),
       2.0 * f32_bytes},
      {"memcpy f32", best_us([&] { CHECK(cudaMemcpyAsync(b, a, f32_bytes, cudaMemcpyDeviceToDevice)); }),
       2.0 * f32_bytes},
      {"fill 16-bit", best_us([&] { fill_kernel<<<grid, kThreads>>>(b, v16, 7u); }), 1.0 * v16_bytes},
      {"fill 16-bit, full grid", best_us([&] { fill_kernel<<<full(v16), kThreads>>>(b, v16, 7u); }),
       1.0 * v16_bytes},
      {"dequant K4", best_us([&] { dequant_kernel<false><<<grid, kThreads>>>(codes, scales, b, v16); }),
       codec_bytes},
      {"dequant K4 .cs", best_us([&] { dequant_kernel<true><<<grid, kThreads>>>(codes, scales, b, v16); }),
       codec_bytes},
      {"dequant K4, full grid",
       best_us([&] { dequant_kernel<false><<<full(v16), kThreads>>>(codes, scales, b, v16); }), codec_bytes},
      {"dequant K4 .cs, full grid",
       best_us([&] { dequant_kernel<true><<<full(v16), kThreads>>>(codes, scales, b, v16); }), codec_bytes},
      {"quant K4", best_us([&] { quant_kernel<<<grid, kThreads>>>(a, codes, scales, v16); }), codec_bytes},
      {"quant K4, full grid", best_us([&] { quant_kernel<<<full(v16), kThreads>>>(a, codes, scales, v16); }),
       codec_bytes},
  };
  const double copy_bw = rows[0].bytes / rows[0].us;
  std::printf("%-28s %10s %10s %10s\n", "kernel", "us", "GB/s", "% of copy");
  for (const Row& r : rows) {
    const double bw = r.bytes / r.us;
    std::printf("%-28s %10.1f %10.0f %9.1f%%\n", r.name, r.us, bw / 1e3, 100.0 * bw / copy_bw);
  }
  CHECK(cudaFree(a));
  CHECK(cudaFree(b));
  CHECK(cudaFree(codes));
  CHECK(cudaFree(scales));
  return 0;
}
