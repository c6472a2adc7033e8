// CUDA handler for the transposed fused product y = g @ W^T at small batch (M rows of g, M <= 32): the
// backward pass of x @ W for x. W [in, out] is stored as format v1 of W^T ([out, in], blocks of 32 along
// `in`), so here the reduction runs over the rows of the stored matrix and every block scale varies along
// it: the scale cannot be applied after the tensor-core sum. Each A element is therefore the dequantized
// weight itself, codebook value times the block's decoded scale rounded to g's 16-bit type (what
// `dequantize` to that type gives), and the products run on the tensor cores (mma.sync m16n8k16) as
// y^T = W g^T: a warp owns one column of blocks (32 outputs) and a range of stored rows, 16 rows per step;
// lane (g, c) reads the K words of rows 2c, 2c + 1, 2c + 8, 2c + 9 of the step and rebuilds the codes of
// elements g, g + 8, g + 16, g + 24 of each with one shift and mask per plane. Warps with adjacent columns
// run together, so their reads of the same rows share sectors in L2. The reduction is split over warps when
// the columns alone would not fill the GPU; the partials are added by a second kernel in a fixed order.
#include "cuda_common.cuh"
#include "cuda_handlers.h"
#include "cuda_mma.cuh"

namespace ffi = xla::ffi;

namespace kbit {
namespace cuda {
namespace {

constexpr int kTWarps = 4;
constexpr int kTThreads = kTWarps * 32;
constexpr int kTChunk = 2;  // steps of 16 rows whose loads are issued together
constexpr int kTMaxRows = 32;

__device__ __forceinline__ uint32_t pack2(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// Byte q of the result is the code of element g + 8q (bits g, g + 8, g + 16, g + 24 of the planes).
template <int K>
__device__ __forceinline__ uint32_t column_codes(const uint32_t (&w)[K], int g) {
  uint32_t e = 0;
#pragma unroll
  for (int j = 0; j < K; ++j) e |= ((w[j] >> g) & 0x01010101u) << j;
  return e;
}

template <bool kBf16, int K, int MT>
__global__ void __launch_bounds__(kTThreads)
    matmul_t_kernel(ScaleFormat fmt, const uint32_t* __restrict__ packed, const void* __restrict__ scales,
                    const float* __restrict__ codebook, const float* __restrict__ tensor_scale,
                    const uint16_t* __restrict__ gm, int64_t m_rows, int64_t n_out, int64_t nb, int64_t d,
                    int64_t splits, int64_t per_split, float* __restrict__ partial,
                    uint16_t* __restrict__ out, bool tiled, bool pairs) {
  __shared__ float table[32];
  if (threadIdx.x < (1 << K)) table[threadIdx.x] = codebook[threadIdx.x];
  __syncthreads();
  const float t = tensor_scale[0];
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int c = lane & 3;
  const int64_t ldy = nb * kBlock;
  const int64_t items = nb * splits;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kTWarps + (threadIdx.x >> 5); item < items;
       item += static_cast<int64_t>(gridDim.x) * kTWarps) {
    const int64_t b = item % nb;
    const int64_t split = item / nb;
    const int64_t begin = split * per_split;
    const int64_t end = begin + per_split < n_out ? begin + per_split : n_out;

    float acc[2][MT][4];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int i = 0; i < MT; ++i) acc[h][i][0] = acc[h][i][1] = acc[h][i][2] = acc[h][i][3] = 0.0f;

    for (int64_t o0 = begin; o0 < end; o0 += 16 * kTChunk) {
      // Rows of step u held by this lane: r = 0..3 -> 2c, 2c + 1, 2c + 8, 2c + 9.
      uint32_t w[kTChunk][4][K];
      uint32_t st[kTChunk][4];
#pragma unroll
      for (int u = 0; u < kTChunk; ++u) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int64_t row = o0 + 16 * u + (r >> 1) * 8 + 2 * c + (r & 1);
          if (row < end) {
            const int64_t i = block_index(row, b, nb, tiled);
            load_words<K>(packed + i * K, w[u][r]);
            stored_to_planes<K>(w[u][r], pairs);
            st[u][r] = read_scale(fmt, scales, i);
          } else {
#pragma unroll
            for (int j = 0; j < K; ++j) w[u][r][j] = 0;
            st[u][r] = 0;
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kTChunk; ++u) {
        const int64_t base = o0 + 16 * u;
        if (base >= end) break;  // uniform across the warp
        // v[r][q]: the dequantized weight at row r, element g + 8q, in 16 bits; rows past `end` are 0.
        uint16_t v[4][4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int64_t row = base + (r >> 1) * 8 + 2 * c + (r & 1);
          const float s = row < end ? decode_scale(fmt, st[u][r], t) : 0.0f;
          const uint32_t e = column_codes<K>(w[u][r], g);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            v[r][q] = row < end ? to_16<kBf16>(table[(e >> (8 * q)) & 0xffu] * s) : uint16_t{0};
          }
        }
        // B: g^T for rows 2c, 2c + 1 (b0) and 2c + 8, 2c + 9 (b1) of the step, column m = 8i + g.
        uint32_t bf[MT][2];
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          const int64_t m = 8 * i + g;
          uint16_t gv[4] = {0, 0, 0, 0};
          if (m < m_rows) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
              const int64_t row = base + (r >> 1) * 8 + 2 * c + (r & 1);
              if (row < end) gv[r] = gm[m * n_out + row];
            }
          }
          bf[i][0] = pack2(gv[0], gv[1]);
          bf[i][1] = pack2(gv[2], gv[3]);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // A: rows are outputs 16h + g (+8), columns the 16 stored rows of the step.
          const uint32_t a[4] = {pack2(v[0][2 * h], v[1][2 * h]), pack2(v[0][2 * h + 1], v[1][2 * h + 1]),
                                 pack2(v[2][2 * h], v[3][2 * h]), pack2(v[2][2 * h + 1], v[3][2 * h + 1])};
#pragma unroll
          for (int i = 0; i < MT; ++i) mma_16816<kBf16>(acc[h][i], a, bf[i][0], bf[i][1]);
        }
      }
    }

    // acc[h][i][e]: output column b * 32 + 16h + g + 8 (e >> 1), row m = 8i + 2c + (e & 1). Columns past d
    // (the padding of the last block) are zeros.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t m = 8 * i + 2 * c + (e & 1);
          const int64_t col = b * kBlock + 16 * h + g + 8 * (e >> 1);
          if (m >= m_rows) continue;
          const float val = col < d ? acc[h][i][e] : 0.0f;
          if (splits == 1) {
            out[m * ldy + col] = to_16<kBf16>(val);
          } else {
            partial[(split * m_rows + m) * ldy + col] = val;
          }
        }
      }
    }
  }
}

struct TArgs {
  ScaleFormat fmt;
  const uint32_t* packed;
  const void* scales;
  const float* codebook;
  const float* tensor_scale;
  const uint16_t* g;
  int64_t m, n, nb, d;
  uint16_t* out;
  float* workspace;  // partial sums of a split reduction (cuda_mma.cuh)
  int64_t workspace_floats;
  bool tiled;  // words and scales in tile order (kbit_format.h)
  bool pairs;  // and K = 4 words as pair indices (kbit_format.h stores_pairs; the _tiled_v2 target)
};

// Splits the reduction (the stored rows) so that the resident warps have about one item each, with at least
// two chunks of rows per item; persistent CTAs, as many as fit on the GPU at once.
template <bool kBf16, int K, int MT>
ffi::Error run_matmul_t(cudaStream_t stream, const TArgs& a) {
  auto* kernel = matmul_t_kernel<kBf16, K, MT>;
  static DeviceCache cache{};
  const int per_sm = occupancy(cache, kernel, kTThreads, 0);
  if (per_sm < 1) return launch_error("transposed matmul occupancy query");
  const int64_t sms = sm_count() > 0 ? sm_count() : 132;
  const int64_t resident_warps = sms * per_sm * kTWarps;
  constexpr int64_t kStep = 16 * kTChunk;
  const int64_t steps = (a.n + kStep - 1) / kStep;
  const int64_t count = a.m * a.nb * kBlock;
  const int64_t max_splits =
      std::max<int64_t>(1, std::min(steps / 2, splits_that_fit(a.workspace_floats, count)));
  int64_t splits = std::min<int64_t>(max_splits, std::max<int64_t>(1, (resident_warps + a.nb - 1) / a.nb));
  const int64_t per_split = (steps + splits - 1) / splits * kStep;
  splits = (a.n + per_split - 1) / per_split;  // no empty splits
  float* partial = splits > 1 ? a.workspace : nullptr;
  const int64_t items = a.nb * splits;
  const unsigned ctas =
      static_cast<unsigned>(std::min<int64_t>((items + kTWarps - 1) / kTWarps, sms * per_sm));
  kernel<<<ctas, kTThreads, 0, stream>>>(a.fmt, a.packed, a.scales, a.codebook, a.tensor_scale, a.g, a.m, a.n,
                                         a.nb, a.d, splits, per_split, partial, a.out, a.tiled, a.pairs);
  launch_sum_splits<kBf16>(stream, partial, splits, count, a.out);
  return launch_error("transposed matmul");
}

// kPairWords: tiled K = 4 words are pair indices (the _tiled_v2 name; _tiled reads planes).
template <bool kTiled, bool kPairWords>
ffi::Error MatmulTImpl(cudaStream_t stream, ffi::AnyBuffer g, ffi::Buffer<ffi::U32> packed,
                       ffi::AnyBuffer scales, ffi::Buffer<ffi::F32> codebook,
                       ffi::Buffer<ffi::F32> tensor_scale, ffi::Result<ffi::AnyBuffer> out,
                       ffi::Result<ffi::Buffer<ffi::F32>> workspace, int32_t k, int32_t scale_format,
                       int64_t d) {
  MatmulLayout L;
  if (ffi::Error e =
          matmul_t_layout_of(g, packed, scales, codebook, tensor_scale, *out, k, scale_format, kTiled, d, &L);
      e.failure()) {
    return e;
  }
  if (g.element_type() == ffi::DataType::F32) {
    return invalid(
        "the CUDA transposed matmul takes float16 or bfloat16 g (float32 is lowered to dequantize + dot)");
  }
  if (L.m > kTMaxRows) {
    return invalid("the CUDA transposed matmul takes at most " + std::to_string(kTMaxRows) + " rows, got " +
                   std::to_string(L.m));
  }
  if (L.m == 0 || L.nb == 0) return ffi::Error::Success();
  auto* o = static_cast<uint16_t*>(out->untyped_data());
  if (L.n == 0) {  // an empty reduction: y = 0
    if (cudaMemsetAsync(o, 0, L.m * L.nb * kBlock * sizeof(uint16_t), stream) != cudaSuccess) {
      return launch_error("transposed matmul memset");
    }
    return ffi::Error::Success();
  }
  const TArgs a{L.format,
                packed.typed_data(),
                scales.untyped_data(),
                codebook.typed_data(),
                tensor_scale.typed_data(),
                static_cast<const uint16_t*>(g.untyped_data()),
                L.m,
                L.n,
                L.nb,
                d,
                o,
                workspace->typed_data(),
                static_cast<int64_t>(workspace->element_count()),
                L.tiled,
                kPairWords && stores_pairs(L.k, kTiled)};
  const bool bf16 = g.element_type() == ffi::DataType::BF16;
  ffi::Error result = ffi::Error::Success();
  with_k(L.k, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    with_dtype_and_row_tiles(bf16, L.m, [&](auto bf, auto mt) {
      result = run_matmul_t<decltype(bf)::value, K, decltype(mt)::value>(stream, a);
    });
  });
  return result;
}

auto matmul_t_binding() { return matmul_binding().Attr<int64_t>("d"); }

}  // namespace
}  // namespace cuda
}  // namespace kbit

XLA_FFI_DEFINE_HANDLER_SYMBOL(KbitMatmulTCuda, (kbit::cuda::MatmulTImpl<false, false>),
                              kbit::cuda::matmul_t_binding(), {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(KbitMatmulTTiledCuda, (kbit::cuda::MatmulTImpl<true, false>),
                              kbit::cuda::matmul_t_binding(), {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(KbitMatmulTTiledV2Cuda, (kbit::cuda::MatmulTImpl<true, true>),
                              kbit::cuda::matmul_t_binding(), {ffi::Traits::kCmdBufferCompatible});
