// What the fused matmul kernels share (cuda_matmul.cu, cuda_gemv.cu, cuda_matmul_t.cu): the tensor-core
// instruction, 16-bit conversion, the load of one block's K bit-plane words, and the split reduction.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda_common.cuh"
#include "xla/ffi/api/ffi.h"

namespace kbit {
namespace cuda {

// D += A B for one 16x16 (A, row-major) by 16x8 (B, column-major) tile in 16-bit inputs, float32 sums.
template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <bool kBf16>
__device__ __forceinline__ uint16_t to_16(float v) {
  if constexpr (kBf16) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  } else {
    return __half_as_ushort(__float2half_rn(v));
  }
}

// The alignment load_words needs of p: one 16-byte load at K = 4, one 8-byte load at K = 2, words otherwise.
template <int K>
constexpr uintptr_t kWordsAlign = K == 4   ? 16
                                  : K == 2 ? 8
                                           : 4;

template <int K>
__device__ __forceinline__ void load_words(const uint32_t* __restrict__ p, uint32_t (&w)[K]) {
  if constexpr (K == 4) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else if constexpr (K == 2) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x, w[1] = v.y;
  } else {
#pragma unroll
    for (int j = 0; j < K; ++j) w[j] = p[j];
  }
}

// Calls fn(std::bool_constant<bf16>, std::integral_constant<int, MT>) with MT the number of 8-row tiles of x
// the matmul kernels are instantiated for (M <= 8, 16, 32).
template <typename Fn>
void with_dtype_and_row_tiles(bool bf16, int64_t m, const Fn& fn) {
  auto by_rows = [&](auto bf) {
    if (m <= 8) {
      fn(bf, std::integral_constant<int, 1>{});
    } else if (m <= 16) {
      fn(bf, std::integral_constant<int, 2>{});
    } else {
      fn(bf, std::integral_constant<int, 4>{});
    }
  };
  if (bf16) {
    by_rows(std::true_type{});
  } else {
    by_rows(std::false_type{});
  }
}

// The fused matmul's buffers (cuda_matmul.cu, cuda_gemv.cu): y [m, n] = x [m, nb * 32] @ W, with W^T in
// format v1 ([n, nb, k] words, [n, nb] scales), its blocks in row order or, if tiled, in tile order.
struct MatmulArgs {
  ScaleFormat fmt;
  const uint32_t* packed;
  const void* scales;
  const float* codebook;
  const float* tensor_scale;
  const uint16_t* x;
  int64_t m, n, nb;
  uint16_t* out;
  float* workspace;  // partial sums of a split reduction: workspace_floats floats
  int64_t workspace_floats;
  bool tiled;  // words and scales in tile order (kbit_format.h, block_index)
  bool pairs;  // and K = 4 words as pair indices (kbit_format.h stores_pairs; the _tiled_v2 target)
};

// How many parts the reduction is split into: each warp works through its items one chunk of `chunk` blocks
// after another, each chunk a memory round trip, so the time goes as (rounds of items over the resident
// warps) x (chunks per item). The split count minimising that (the fewest splits among equals) keeps every
// resident warp busy without a nearly empty last round; parts of at least two chunks, whole chunks each, and
// at most `cap` parts (what the workspace holds).
struct Split {
  int64_t splits, per_split;
};

inline Split choose_split(int64_t nb, int64_t tiles, int64_t resident_warps, int64_t chunk, int64_t cap) {
  const int64_t max_splits = std::max<int64_t>(1, std::min(cap, nb / (2 * chunk)));
  Split best{1, nb};
  int64_t best_cost = -1;
  for (int64_t s = 1; s <= max_splits; ++s) {
    const int64_t per = ((nb + s - 1) / s + chunk - 1) / chunk * chunk;
    const int64_t used = (nb + per - 1) / per;  // no empty splits
    const int64_t rounds = (tiles * used + resident_warps - 1) / resident_warps;
    const int64_t cost = rounds * (per / chunk);
    if (best_cost < 0 || cost < best_cost) best = {used, per}, best_cost = cost;
  }
  return best;
}

// out[i] = the sum of partial[p * count + i] over p = 0..splits-1, in that order (deterministic). The
// partials are loaded sixteen at a time before they are added: the kernel is a chain of memory latencies
// (decode runs one per batch-1 product), and independent loads overlap theirs; choose_split picks up to 16
// splits for the decode layers (8192 x 2048: 16), which then take one round trip, not two.
template <bool kBf16>
__global__ void __launch_bounds__(kThreads)
    sum_splits_kernel(const float* __restrict__ partial, int64_t splits, int64_t count,
                      uint16_t* __restrict__ out) {
  constexpr int kBatch = 16;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    float s = 0.0f;
    for (int64_t p0 = 0; p0 < splits; p0 += kBatch) {
      float v[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) v[j] = p0 + j < splits ? partial[(p0 + j) * count + i] : 0.0f;
      asm volatile("" ::: "memory");  // every load of the batch is issued before the first add waits
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        // s starts as partial 0 itself (not 0 + partial 0, which would turn -0 into +0).
        if (p0 + j < splits) s = p0 + j == 0 ? v[j] : s + v[j];
      }
    }
    out[i] = to_16<kBf16>(s);
  }
}

// The float32 partial sums of a split reduction live in a workspace that the lowering allocates as a second
// result of the call (jax_kbit/matmul.py sizes it), not in scratch memory allocated per call: a handler that
// allocates nothing can be recorded into a CUDA graph (kCmdBufferCompatible), which takes the host's launch
// work off every later call. A workspace of `capacity` floats holds this many splits of `count` outputs.
inline int64_t splits_that_fit(int64_t capacity, int64_t count) {
  return std::max<int64_t>(1, capacity / std::max<int64_t>(1, count));
}

// The second kernel of a split reduction: out = the sum of the partials (nothing to do when splits == 1).
template <bool kBf16>
void launch_sum_splits(cudaStream_t stream, const float* partial, int64_t splits, int64_t count,
                       uint16_t* out) {
  if (splits <= 1) return;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((count + kThreads - 1) / kThreads, 65535));
  sum_splits_kernel<kBf16><<<grid, kThreads, 0, stream>>>(partial, splits, count, out);
}

// The FFI binding of the fused products (x, packed, scales, codebook, tensor scale -> y, workspace), shared
// by their plain and tiled handlers; the transposed product adds the attribute d (cuda_matmul_t.cu).
inline auto matmul_binding() {
  return matmul_operands_binding<ffi::PlatformStream<cudaStream_t>>()
      .Ret<ffi::Buffer<ffi::F32>>()  // workspace
      .Attr<int32_t>("k")
      .Attr<int32_t>("scale_format");
}

}  // namespace cuda
}  // namespace kbit
