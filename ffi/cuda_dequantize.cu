// CUDA dequantize handler for format v1. Values are looked up from the codebook held one entry per lane
// with __shfl_sync. Rows of whole blocks take the vector kernel (32 blocks per warp step; each lane rebuilds
// 4 or 8 codes at once from adjacent bits of every plane and writes them with one 16-byte store); other
// rows take one element per lane. Tiled (the `_tiled` target): the words and scales are in tile order
// (kbit_format.h, block_index), read from there; the output is in row order either way.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_common.cuh"
#include "cuda_handlers.h"
#include "cuda_mma.cuh"

namespace ffi = xla::ffi;

namespace kbit {
namespace cuda {
namespace {

// XLA hands out buffers at least this aligned; the vector kernel checks it anyway.
constexpr uintptr_t kVectorAlign = 16;
// Resident CTAs per SM asked of the register allocator for the vector kernel: 48 of 64 warp slots (40
// registers a thread; K = 5 asks one CTA fewer, or it spills), for enough loads in flight.
constexpr int kVecMinBlocks = 6;

// Any row length: one element per lane. Pairs: tiled K = 4 words are pair indices (kbit_format.h).
template <typename Out, int K, bool Tiled, bool Pairs>
__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(ScaleFormat fmt, const uint32_t* __restrict__ packed, const void* __restrict__ scales,
                      const float* __restrict__ codebooks, const float* __restrict__ tensor_scales,
                      typename Out::Storage* __restrict__ out, int64_t d, int64_t nb,
                      int64_t blocks_per_group, int64_t groups) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int64_t g = blockIdx.y; g < groups; g += gridDim.y) {
    const float entry = lane < (1 << K) ? codebooks[g * (1 << K) + lane] : 0.0f;
    const float t = tensor_scales[g];
    const int64_t end = (g + 1) * blocks_per_group;
    for (int64_t blk = g * blocks_per_group + static_cast<int64_t>(blockIdx.x) * kWarps + warp; blk < end;
         blk += static_cast<int64_t>(gridDim.x) * kWarps) {
      const int64_t row = blk / nb;
      const int64_t src = block_index(row, blk - row * nb, nb, Tiled);
      const float s = decode_scale(fmt, read_scale(fmt, scales, src), t);
      const uint32_t word = lane < K ? packed[src * K + lane] : 0u;
      uint32_t code = 0;
      if constexpr (Pairs) {
        // Bit j of this lane's code is bit 8q + 2j + r of pair word c (lane = 8q + 2c + r; kbit_format.h).
        const uint32_t pw = __shfl_sync(kFull, word, (lane >> 1) & 3) >> ((lane & ~7) | (lane & 1));
#pragma unroll
        for (int j = 0; j < K; ++j) code |= ((pw >> (2 * j)) & 1u) << j;
      } else {
#pragma unroll
        for (int j = 0; j < K; ++j) code |= ((__shfl_sync(kFull, word, j) >> lane) & 1u) << j;
      }
      const float value = __shfl_sync(kFull, entry, static_cast<int>(code)) * s;
      const int64_t col = (blk - row * nb) * kBlock + lane;
      if (col < d) out[row * d + col] = Out::store(value);
    }
  }
}

// The canonical NaN of an output format, twice, as one word of two 16-bit elements.
template <typename Out>
__device__ __forceinline__ uint32_t nan_pair() {
  if constexpr (std::is_same_v<Out, kbit::F16>) {
    return kF16NaN * 0x00010001u;
  } else {
    return kBF16NaN * 0x00010001u;
  }
}

// Two values as one word of 16-bit elements (lo first in memory), with one hardware round-to-nearest-even
// conversion: the same bits as Out::store for every non-NaN value.
template <typename Out>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  if constexpr (std::is_same_v<Out, kbit::F16>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// A 16-byte store if `write`, predicated: a branch around it lets the compiler re-derive the 64-bit
// address inside the branch (a dozen instructions per store) instead of keeping it. Streaming (.cs,
// evict-first): the output is written once and, at the sizes where bandwidth matters, far larger than L2.
__device__ __forceinline__ void store16_if(bool write, void* p, const uint32_t (&w)[4]) {
  asm volatile(
      "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %5, 0;\n\t@p st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};\n\t}" ::
          "l"(p),
      "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3]), "r"(static_cast<int>(write))
      : "memory");
}

// Codes of 4 consecutive elements, one per byte, from the 4-bit nibble of each plane that holds them:
// multiplying a nibble by 0x00204081 puts copies of it 7 bits apart, so bit e of copy e lands on bit 8e (the
// copies do not overlap, hence no carries); the plane's shift j is folded into the multiplier and the mask.
template <int K>
__device__ __forceinline__ uint32_t nibble_codes(const uint32_t (&w)[K], int pos) {
  uint32_t acc = 0;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const uint32_t nibble = (w[j] >> pos) & 0xfu;
    acc |= (nibble * (0x00204081u << j)) & (0x01010101u << j);
  }
  return acc;
}

// Rows that are whole blocks (d % 32 == 0): blocks are contiguous in memory. A warp takes 32 consecutive
// blocks at a time ("a tile"): lane l loads block l's K plane words and scale with one coalesced load each
// and decodes that scale; then, for each 16-byte slice of the tile's output, the lanes writing it fetch
// their block's words and scale with __shfl_sync, rebuild E codes, look the values up from the codebook
// held one entry per lane, and write 16 contiguous bytes, so every store instruction of the warp covers 512
// contiguous bytes. The launch gives every tile its own warp (full_grid_for), so loads in flight come from
// the resident warps; the next tile's loads are issued before the current tile is decoded only where the
// grid is capped (beyond 2^31 - 1 CTAs or 65535 groups). Dropping that prefetch measured no faster.
// Tiled: the warp walks the blocks in stored order, so its loads are the same contiguous runs as in row
// order, and its 32 blocks are half of one tile (8 rows x 4 blocks; a group is whole tiles, which the handler
// checks): each store instruction then writes two rows' runs of 4 blocks (256 bytes each at 16-bit output)
// instead of one run of 512. Reading in row order from tile order measured slower (bench/RESULTS.md).
template <typename Out, int K, bool Tiled, bool Pairs>
__global__ void __launch_bounds__(kThreads, K == 5 ? kVecMinBlocks - 1 : kVecMinBlocks)
    dequantize_vec_kernel(ScaleFormat fmt, const uint32_t* __restrict__ packed,
                          const void* __restrict__ scales, const float* __restrict__ codebooks,
                          const float* __restrict__ tensor_scales, typename Out::Storage* __restrict__ out,
                          int64_t nb, int64_t blocks_per_group, int64_t groups) {
  using Storage = typename Out::Storage;
  constexpr int E = 16 / sizeof(Storage);  // elements per lane per store
  constexpr int kLanesPerBlock = kBlock / E;
  constexpr int kSlices = kLanesPerBlock;  // 16-byte stores per lane per tile
  constexpr bool k16 = sizeof(Storage) == 2;
  static_assert(E == 4 || E == 8, "16-byte vectors of 4- or 2-byte elements");
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int pos = (lane % kLanesPerBlock) * E;  // first element of the block this lane writes
  const int64_t tiles = (blocks_per_group + kBlock - 1) / kBlock;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t g = blockIdx.y; g < groups; g += gridDim.y) {
    const float entry = lane < (1 << K) ? codebooks[g * (1 << K) + lane] : 0.0f;
    const float t = tensor_scales[g];
    const int64_t first = g * blocks_per_group;
    // Block `tile * 32 + lane` of the group, or zeros past its end.
    auto load = [&](int64_t tile, uint32_t (&w)[K], uint32_t& st) {
      const int64_t b = tile * kBlock + lane;
      if (tile < tiles && b < blocks_per_group) {
        load_words<K>(packed + (first + b) * K, w);
        stored_to_planes<K>(w, Pairs);
        st = read_scale(fmt, scales, first + b);
      } else {
#pragma unroll
        for (int j = 0; j < K; ++j) w[j] = 0;
        st = 0;
      }
    };
    int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
    uint32_t w[K], st;
    load(tile, w, st);
    for (; tile < tiles; tile += stride) {
      uint32_t next_w[K], next_st;
      load(tile + stride, next_w, next_st);
      const float s_own = decode_scale(fmt, st, t);
      // This lane's first output of the tile (slice 0); slice n is n * E blocks further (in tile order, E / 4
      // rows further). Blocks at or past `valid` (the group's end) are not written.
      Storage* lane_out;
      int64_t slice_step;
      if constexpr (Tiled) {
        constexpr int kTile = kTileRows * kTileBlocks;
        const int64_t q0 = first + tile * kBlock;  // stored index of the warp's block 0
        const int64_t cols = nb / kTileBlocks;     // tiles per band of 16 rows
        const int64_t t = q0 / kTile;
        const int64_t band = udiv(t, cols);
        const int64_t row0 = band * kTileRows + (q0 % kTile) / kTileBlocks;
        const int64_t col0 = (t - band * cols) * kTileBlocks;
        const int b = lane / kLanesPerBlock;  // the warp's block in slice 0: row b / 4, column b % 4
        lane_out = out + (row0 + b / kTileBlocks) * (nb * kBlock) + (col0 + b % kTileBlocks) * kBlock + pos;
        slice_step = (E / kTileBlocks) * nb * kBlock;
      } else {
        lane_out = out + (first + tile * kBlock + lane / kLanesPerBlock) * kBlock + pos;
        slice_step = E * kBlock;
      }
      const int64_t left = blocks_per_group - tile * kBlock;
      const int valid = static_cast<int>(left < kBlock ? left : kBlock);
#pragma unroll
      for (int slice = 0; slice < kSlices; ++slice) {
        const int src = slice * E + lane / kLanesPerBlock;  // the tile's block this lane writes now
        uint32_t v[K];
#pragma unroll
        for (int j = 0; j < K; ++j) v[j] = __shfl_sync(kFull, w[j], src);
        const float s = __shfl_sync(kFull, s_own, src);
        uint32_t codes[E / 4];
#pragma unroll
        for (int h = 0; h < E / 4; ++h) codes[h] = nibble_codes<K>(v, pos + 4 * h);
        // shfl reads only the low 5 bits of the lane index, and a code byte's bits 5..7 are 0.
        auto value = [&](int i) {
          return __shfl_sync(kFull, entry, static_cast<int>(codes[i / 4] >> (8 * (i % 4)))) * s;
        };
        uint32_t words[4];
        if constexpr (k16) {
#pragma unroll
          for (int i = 0; i < 4; ++i) words[i] = pack_pair<Out>(value(2 * i), value(2 * i + 1));
          if (s != s) {  // a NaN block (the only NaN outputs: codebook entries are finite)
#pragma unroll
            for (int i = 0; i < 4; ++i) words[i] = nan_pair<Out>();
          }
        } else {
#pragma unroll
          for (int i = 0; i < 4; ++i) words[i] = f32_to_bits(Out::store(value(i)));
        }
        // One 16-byte store (st.global.v4): stores split into 4-byte pieces would each write partial sectors.
        store16_if(src < valid, lane_out + slice * slice_step, words);
      }
#pragma unroll
      for (int j = 0; j < K; ++j) w[j] = next_w[j];
      st = next_st;
    }
  }
}

template <typename Out, int K, bool Tiled, bool Pairs>
void launch_dequantize(cudaStream_t stream, const Layout& L, const uint32_t* packed, const void* scales,
                       const float* cb, const float* ts, void* out) {
  using Storage = typename Out::Storage;
  const int64_t bpg = L.rows_per_group * L.nb;
  auto* o = static_cast<Storage*>(out);
  if (L.d % kBlock == 0 && reinterpret_cast<uintptr_t>(out) % kVectorAlign == 0 &&
      reinterpret_cast<uintptr_t>(packed) % kWordsAlign<K> == 0) {
    const dim3 grid = full_grid_for((bpg + kBlock - 1) / kBlock, L.groups);
    dequantize_vec_kernel<Out, K, Tiled, Pairs>
        <<<grid, kThreads, 0, stream>>>(L.format, packed, scales, cb, ts, o, L.nb, bpg, L.groups);
  } else {
    const dim3 grid = grid_for(bpg, L.groups);
    dequantize_kernel<Out, K, Tiled, Pairs>
        <<<grid, kThreads, 0, stream>>>(L.format, packed, scales, cb, ts, o, L.d, L.nb, bpg, L.groups);
  }
}

// PairWords: tiled K = 4 words are pair indices (kbit_dequantize_tiled_v2; kbit_dequantize_tiled reads
// planes).
template <bool Tiled, bool PairWords>
ffi::Error DequantizeImpl(cudaStream_t stream, ffi::Buffer<ffi::U32> packed, ffi::AnyBuffer scales,
                          ffi::Buffer<ffi::F32> codebook, ffi::Buffer<ffi::F32> tensor_scale,
                          ffi::Result<ffi::AnyBuffer> out, int32_t k, int32_t scale_format) {
  Layout L;
  if (ffi::Error e = layout_of(*out, packed, scales, codebook, tensor_scale, k, scale_format, &L);
      e.failure()) {
    return e;
  }
  if (ffi::Error e = check_tiled_rows(L, Tiled, packed.dimensions()); e.failure()) return e;
  if (L.rows * L.nb == 0) return ffi::Error::Success();
  const uint32_t* p = packed.typed_data();
  const void* sc = scales.untyped_data();
  const float* cb = codebook.typed_data();
  const float* ts = tensor_scale.typed_data();
  void* o = out->untyped_data();
  with_k(L.k, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    constexpr bool P = PairWords && stores_pairs(K, Tiled);
    switch (out->element_type()) {
      case ffi::DataType::F32: launch_dequantize<kbit::F32, K, Tiled, P>(stream, L, p, sc, cb, ts, o); break;
      case ffi::DataType::F16: launch_dequantize<kbit::F16, K, Tiled, P>(stream, L, p, sc, cb, ts, o); break;
      default: launch_dequantize<kbit::BF16, K, Tiled, P>(stream, L, p, sc, cb, ts, o); break;
    }
  });
  return launch_error("dequantize");
}

}  // namespace
}  // namespace cuda
}  // namespace kbit

XLA_FFI_DEFINE_HANDLER_SYMBOL(KbitDequantizeCuda, (kbit::cuda::DequantizeImpl<false, false>),
                              kbit::dequantize_binding<ffi::PlatformStream<cudaStream_t>>(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(KbitDequantizeTiledCuda, (kbit::cuda::DequantizeImpl<true, false>),
                              kbit::dequantize_binding<ffi::PlatformStream<cudaStream_t>>(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(KbitDequantizeTiledV2Cuda, (kbit::cuda::DequantizeImpl<true, true>),
                              kbit::dequantize_binding<ffi::PlatformStream<cudaStream_t>>(),
                              {ffi::Traits::kCmdBufferCompatible});
