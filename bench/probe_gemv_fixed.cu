// A probe, not part of the library: where a small batch-1 product's time goes. A decode layer (2-9 MB of
// K = 4 weights) runs for about 5 us of kernel time where its bytes alone need 1-2 us; this times, per
// launch, in CUDA graphs of back-to-back launches as decode runs them (weights cycled through a pool larger
// than L2, so every launch reads from DRAM):
//   empty     a kernel with the batch-1 kernel's grid, block and dynamic shared memory that does nothing
//   empty0    the same without dynamic shared memory
//   tables    + the batch-1 kernel's 64 KB table build and barrier (codebook read, tensor scale not read)
//   tables_t  + the tensor scale read first, as the kernel does
//   loads     the kernel's grid and (tile, split) items reading their weight bytes (4 steps in flight) and
//             storing one float per row and split, nothing else
//   gemv      the library's batch-1 launch (launch_gemv: the product kernel; its splits added up in the
//             CTA, or by the split-sum kernel where they are too many)
//   gemv1     the same with a workspace too small for a split (one split, one kernel)
//   sums      the split-sum kernel alone, with gemv's split count
//   e+l1 / e+sm  empty, then a small kernel preferring all-L1 / the maximum shared-memory carve-out
//   g+l1 / g+sm  gemv, then the same small kernels
// Build and run (jaxlib's headers for ffi::Error):
//   nvcc -std=c++17 -O3 -arch=sm_90 --fmad=false -I ffi -I "$(python3 -c 'import jax.ffi as f;
//   print(f.include_dir())')" -o /tmp/pf bench/probe_gemv_fixed.cu && /tmp/pf
#include <vector>

#include "../ffi/cuda_gemv.cu"  // the kernel itself, anonymous namespace included
#include "probe_common.cuh"

using kbit::ScaleFormat;
using namespace kbit::cuda;

namespace probe {

__global__ void __launch_bounds__(kGvThreads, 1) empty_kernel(float* out) {
  if (threadIdx.x == 0 && blockIdx.x == 0) out[0] = 1.0f;
}

// Stand-ins for the XLA fusions between decode's products: one does nothing with a shared-memory carve-out
// preference of 0 (all L1, as small fusions run), the other asks for the maximum carve-out, like the batch-1
// kernel. Alternating each with a kernel that needs >128 KB of shared memory shows whether the SMs'
// reconfiguration between the two carve-outs costs time.
__global__ void tiny_l1_kernel(float* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = 2.0f;
}
__global__ void tiny_smem_kernel(float* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = 3.0f;
}

template <bool kReadScale>
__global__ void __launch_bounds__(kGvThreads, 1) tables_kernel(MatmulArgs a, float* out) {
  extern __shared__ uint4 smem[];
  const float t = kReadScale ? a.tensor_scale[0] : 1.0f;
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t tables = (base + 0xffffu) & ~0xffffu;
  build_gemv_tables<true, 4>(a.codebook, a.fmt, t, smem + (tables - base) / 16);
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = __uint_as_float(smem[(tables - base) / 16 + blockIdx.x % 256].x);
}

// The batch-1 kernel's items and loads at K = 4 (16 bytes per block per lane and row), nothing computed.
__global__ void __launch_bounds__(kGvThreads, 1)
    loads_kernel(const uint4* __restrict__ w, int64_t n, int64_t nb, int64_t splits, int64_t per_split,
                 float* __restrict__ partial) {
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, c = lane & 3;
  const int64_t tiles = (n + 15) / 16;
  for (int64_t item = static_cast<int64_t>(threadIdx.x >> 5) * gridDim.x + blockIdx.x; item < tiles * splits;
       item += static_cast<int64_t>(gridDim.x) * kGvWarps) {
    const int64_t tile = item % tiles, split = item / tiles;
    const int64_t begin = split * per_split;
    const int64_t end = begin + per_split < nb ? begin + per_split : nb;
    const int64_t r0 = min(tile * 16 + g, n - 1), r1 = min(tile * 16 + g + 8, n - 1);
    uint32_t acc = 0;
    for (int64_t b = begin; b < end; b += 16) {
      uint4 v[8];
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const int64_t blk = min(b + 4 * s + c, end - 1);
        v[2 * s] = ld_stream(w + r0 * nb + blk);
        v[2 * s + 1] = ld_stream(w + r1 * nb + blk);
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) acc ^= v[i].x ^ v[i].y ^ v[i].z ^ v[i].w;
    }
    acc += __shfl_xor_sync(kFull, acc, 1);
    acc += __shfl_xor_sync(kFull, acc, 2);
    if (c == 0) partial[split * n + r0] = __uint_as_float(acc);
  }
}

template <typename Launch>
double us_per_launch(cudaStream_t s, int launches, Launch launch) {
  launch(s, 0);  // outside the capture: first-call host set-up (attributes, occupancy)
  CHECK(cudaStreamSynchronize(s));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < launches; ++i) launch(s, i);
  CHECK(cudaStreamEndCapture(s, &graph));
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  float best = 1e30f;
  for (int r = 0; r < 12; ++r) {
    CHECK(cudaEventRecord(e0, s));
    CHECK(cudaGraphLaunch(exec, s));
    CHECK(cudaEventRecord(e1, s));
    CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    if (r >= 2) best = std::min(best, ms);
  }
  CHECK(cudaGetLastError());
  CHECK(cudaGraphExecDestroy(exec));
  CHECK(cudaGraphDestroy(graph));
  return best * 1000.0 / launches;
}

}  // namespace probe

using namespace probe;

int main() {
  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  constexpr int kLaunches = 100;
  const size_t pool_bytes = size_t(512) << 20;  // weights cycled through 512 MB: every launch reads DRAM
  uint8_t* pool;
  CHECK(cudaMalloc(&pool, pool_bytes));
  CHECK(cudaMemset(pool, 0x5a, pool_bytes));
  uint8_t* scale_pool;
  CHECK(cudaMalloc(&scale_pool, pool_bytes / 16));
  CHECK(cudaMemset(scale_pool, 0x70, pool_bytes / 16));
  std::vector<float> cb(16);
  for (int i = 0; i < 16; ++i) cb[i] = -1.0f + i / 7.5f;
  float *codebook, *tscale, *workspace, *scratch;
  uint16_t *x, *out;
  CHECK(cudaMalloc(&codebook, 16 * sizeof(float)));
  CHECK(cudaMemcpy(codebook, cb.data(), 16 * sizeof(float), cudaMemcpyHostToDevice));
  const float one = 1.0f;
  CHECK(cudaMalloc(&tscale, sizeof(float)));
  CHECK(cudaMemcpy(tscale, &one, sizeof(float), cudaMemcpyHostToDevice));
  CHECK(cudaMalloc(&x, 32768 * 2));
  CHECK(cudaMemset(x, 0x3c, 32768 * 2));
  CHECK(cudaMalloc(&out, 65536 * 2));
  const int64_t ws_floats = 32 * 65536;
  CHECK(cudaMalloc(&workspace, ws_floats * sizeof(float)));
  CHECK(cudaMalloc(&scratch, 65536 * sizeof(float)));

  constexpr int kSmem = static_cast<int>(gemv_smem_bytes(1, 8192 / 32));  // the largest shape below
  CHECK(cudaFuncSetAttribute(tiny_l1_kernel, cudaFuncAttributePreferredSharedMemoryCarveout, 0));
  CHECK(cudaFuncSetAttribute(tiny_smem_kernel, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
  const int sms = prop.multiProcessorCount;
  const int64_t shapes[][2] = {{2048, 512},  {2048, 2048}, {2048, 2560}, {2048, 5632},
                               {5632, 2048}, {2048, 8192}, {8192, 2048}, {8192, 8192}};
  std::printf(
      "%-11s %6s %5s %6s | %7s %7s %7s %8s %7s %7s %7s %7s %7s %7s %7s %7s   (us per launch, graph of %d)\n",
      "in x out", "splits", "ctas", "MB", "empty0", "empty", "tables", "tables_t", "loads", "sums", "gemv",
      "gemv1", "e+l1", "e+sm", "g+l1", "g+sm", kLaunches);
  for (const auto& sh : shapes) {
    const int64_t in = sh[0], n = sh[1], nb = in / 32;
    const GemvPlan sp = plan_gemv(n, nb, n, ws_floats, sms);  // the library's split and grid
    const unsigned ctas = sp.ctas;
    const size_t wbytes = size_t(n) * nb * 16;
    const int copies = static_cast<int>(std::max<size_t>(1, pool_bytes / wbytes));
    auto args = [&](int i, int64_t ws) {
      MatmulArgs a{};
      a.fmt = ScaleFormat::kE4M4;
      a.packed = reinterpret_cast<const uint32_t*>(pool + size_t(i % copies) * wbytes);
      a.scales = scale_pool + size_t(i % copies) * (wbytes / 16);
      a.codebook = codebook;
      a.tensor_scale = tscale;
      a.x = x;
      a.m = 1, a.n = n, a.nb = nb;
      a.out = out;
      a.workspace = workspace;
      a.workspace_floats = ws;
      return a;
    };
    auto gemv = [&](int64_t ws) {
      return [&, ws](cudaStream_t st, int i) {
        ffi::Error e = launch_gemv<true, 4, 1, true, false>(st, args(i, ws));
        if (e.failure()) {
          std::fprintf(stderr, "launch_gemv failed\n");
          std::exit(1);
        }
      };
    };
    CHECK(cudaFuncSetAttribute(tables_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    CHECK(cudaFuncSetAttribute(tables_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    CHECK(cudaFuncSetAttribute(empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    const double t_empty0 = us_per_launch(
        s, kLaunches, [&](cudaStream_t st, int) { empty_kernel<<<ctas, kGvThreads, 0, st>>>(scratch); });
    const double t_empty = us_per_launch(
        s, kLaunches, [&](cudaStream_t st, int) { empty_kernel<<<ctas, kGvThreads, kSmem, st>>>(scratch); });
    const double t_tables = us_per_launch(s, kLaunches, [&](cudaStream_t st, int i) {
      tables_kernel<false><<<ctas, kGvThreads, kSmem, st>>>(args(i, ws_floats), scratch);
    });
    const double t_tables_t = us_per_launch(s, kLaunches, [&](cudaStream_t st, int i) {
      tables_kernel<true><<<ctas, kGvThreads, kSmem, st>>>(args(i, ws_floats), scratch);
    });
    const double t_loads = us_per_launch(s, kLaunches, [&](cudaStream_t st, int i) {
      loads_kernel<<<ctas, kGvThreads, 0, st>>>(reinterpret_cast<const uint4*>(args(i, 0).packed), n, nb,
                                                sp.splits, sp.per_split, workspace);
    });
    const double t_sums = sp.splits > 1
                              ? us_per_launch(s, kLaunches,
                                              [&](cudaStream_t st, int) {
                                                launch_sum_splits<true>(st, workspace, sp.splits, n, out);
                                              })
                              : 0.0;
    const double t_gemv = us_per_launch(s, kLaunches, gemv(ws_floats));
    const double t_gemv1 = us_per_launch(s, kLaunches, gemv(n));
    auto then = [&](auto first, bool l1) {
      return [&, first, l1](cudaStream_t st, int i) {
        first(st, i);
        if (l1) {
          tiny_l1_kernel<<<sms, 256, 0, st>>>(scratch);
        } else {
          tiny_smem_kernel<<<sms, 256, 0, st>>>(scratch);
        }
      };
    };
    auto empty = [&](cudaStream_t st, int) { empty_kernel<<<ctas, kGvThreads, kSmem, st>>>(scratch); };
    const double t_el1 = us_per_launch(s, kLaunches, then(empty, true));
    const double t_esm = us_per_launch(s, kLaunches, then(empty, false));
    const double t_gl1 = us_per_launch(s, kLaunches, then(gemv(ws_floats), true));
    const double t_gsm = us_per_launch(s, kLaunches, then(gemv(ws_floats), false));
    std::printf(
        "%5lldx%-5lld %6lld %5u %6.2f | %7.2f %7.2f %7.2f %8.2f %7.2f %7.2f %7.2f %7.2f %7.2f %7.2f %7.2f "
        "%7.2f\n",
        static_cast<long long>(in), static_cast<long long>(n), static_cast<long long>(sp.splits), ctas,
        wbytes * 17.0 / 16.0 / 1e6, t_empty0, t_empty, t_tables, t_tables_t, t_loads, t_sums, t_gemv, t_gemv1,
        t_el1, t_esm, t_gl1, t_gsm);
  }
  return 0;
}
