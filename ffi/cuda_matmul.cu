// CUDA handler for the fused k-bit matmul y = x @ W at small batch (M rows of x, M <= 32).
//
// W [in, out] is stored as format v1 of its transpose ([out, in], blocks of 32 along `in`), so each
// 32-wide slice of the reduction is one block of one output row, with one scale. The products run on the
// tensor cores (mma.sync m16n8k16): a warp owns 16 output rows and a range of blocks; for each block it
// rebuilds the 16x16 A fragments straight from the bit planes. For K <= 4 the reduction index inside a
// block is permuted (a sum does not care about its order) so that lane column c owns elements 8c..8c+7:
// its x operand is then one 16-byte load per row of x, and its weights are byte c of each bit plane, which
// three byte permutes and a 4x4 transpose of 2-bit fields turn into the 2K-bit indices of its four pairs of
// codes, one per byte. One shared-memory load per pair returns both codebook values already packed as the
// fragment register wants them (the table is replicated 32 times so that every lane reads its own bank: no
// conflicts). For K = 5 codes are rebuilt one per byte and looked up with __shfl_sync from the lane that
// holds each codebook entry. The block's float32 partial sums are multiplied by the two rows' decoded scales
// once per block, so no dequantized weight is ever written. The reduction is split over warps when `out`
// alone would not fill the GPU; the float32 partials then go to the call's workspace (a second result) and a
// second kernel adds them in a fixed order (deterministic, no atomics).
#include "cuda_common.cuh"
#include "cuda_gemv.h"
#include "cuda_handlers.h"
#include "cuda_mma.cuh"

namespace ffi = xla::ffi;

namespace kbit {
namespace cuda {
namespace {

constexpr int kMmWarps = 8;  // one pair table (32 KB at K = 4) serves 8 warps
constexpr int kMmThreads = kMmWarps * 32;
constexpr int kChunk = 4;  // blocks whose loads are issued together, to keep memory busy
constexpr int kMaxRows = 32;

// Codes of the 8 elements 8q + 2c + r (q = 0..3) of a block, for r = 0 in e0 and r = 1 in e1: byte q holds
// the code. Rotating plane j right by 2c + r - j brings bit 8q + 2c + r to bit 8q + j for every q at once.
template <int K>
__device__ __forceinline__ void spread_codes(const uint32_t (&w)[K], int c, uint32_t& e0, uint32_t& e1) {
  e0 = 0;
  e1 = 0;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    e0 |= __funnelshift_r(w[j], w[j], 2 * c - j) & (0x01010101u << j);
    e1 |= __funnelshift_r(w[j], w[j], 2 * c + 1 - j) & (0x01010101u << j);
  }
}

// Byte q (0..3) of the result indexes the pair of elements 8c + 2q and 8c + 2q + 1 (bit 2j + r: bit j of
// element r's code), all taken from byte c of the planes. Byte j of the gathered word m holds byte c of
// plane j, so field (j, q) of m (2 bits at 8j + 2q) must move to 8q + 2j: two delta swaps transpose the 4x4
// matrix of 2-bit fields. pairs: the words are a tiled K = 4 block's pair indices (kbit_format.h
// stores_pairs), whose byte c already is that of the transposed planes, so m is the result.
template <int K>
__device__ __forceinline__ uint32_t byte_pair_index(const uint32_t (&w)[K], uint32_t sel, bool pairs) {
  static_assert(K >= 2 && K <= 4, "pair indices fit a byte for K <= 4");
  uint32_t m;
  if constexpr (K == 4) {
    m = __byte_perm(__byte_perm(w[0], w[1], sel), __byte_perm(w[2], w[3], sel), 0x5410);
  } else if constexpr (K == 3) {
    m = __byte_perm(__byte_perm(w[0], w[1], sel), w[2], 0x0010 | ((sel & 0xf0) << 4) | ((sel & 0xf0) << 8)) &
        0x00ffffffu;
  } else {
    m = __byte_perm(w[0], w[1], sel) & 0xffffu;
  }
  // Masks of zero make the swaps no-ops: no branch, no second copy of the loop (which spilled at K = 4).
  const uint32_t keep = pairs ? 0u : ~0u;
  uint32_t t = (m ^ (m >> 12)) & (0x0000f0f0u & keep);
  m ^= t ^ (t << 12);
  t = (m ^ (m >> 6)) & (0x00cc00ccu & keep);
  return m ^ t ^ (t << 6);
}

// The byte_pair_index selector of lane column c: byte c of the first and of the second word.
__device__ __forceinline__ uint32_t byte_selector(int c) { return static_cast<uint32_t>(c | ((c + 4) << 4)); }

// Table entry i, replicated in words 32 i .. 32 i + 31: lane l reads word 32 i + l, always in bank l.
__device__ __forceinline__ uint32_t pair_value(const uint32_t* table_lane, uint32_t p, int q) {
  return table_lane[__byte_perm(p, 0, 0x4440 + q) << 5];  // byte q of p, zero-extended
}

template <int K>
__host__ __device__ constexpr int table_bytes() {
  return K <= 4 ? (1 << (2 * K)) * 32 * 4 : 0;
}

// The 16-bit codebook value of the code in byte q of e (shfl uses only the low 5 bits of the lane index).
__device__ __forceinline__ uint32_t lookup(uint32_t entry, uint32_t e, int q) {
  return __shfl_sync(kFull, entry, static_cast<int>(e >> (8 * q)));
}

__device__ __forceinline__ uint32_t pack(uint32_t lo, uint32_t hi) { return __byte_perm(lo, hi, 0x5410); }

// The pair table (K <= 4) at the start of shared memory: entry i holds the 16-bit codebook values of the pair
// of codes whose bits interleave in i, replicated in words 32 i .. 32 i + 31 (see pair_value).
template <bool kBf16, int K>
__device__ __forceinline__ void build_pair_table(const float* __restrict__ codebook, uint4* smem) {
  if constexpr (K <= 4) {
    for (int i = threadIdx.x; i < (1 << (2 * K)); i += kMmThreads) {
      int c0 = 0, c1 = 0;
#pragma unroll
      for (int j = 0; j < K; ++j) {
        c0 |= ((i >> (2 * j)) & 1) << j;
        c1 |= ((i >> (2 * j + 1)) & 1) << j;
      }
      const uint32_t v =
          to_16<kBf16>(codebook[c0]) | (static_cast<uint32_t>(to_16<kBf16>(codebook[c1])) << 16);
#pragma unroll
      for (int r = 0; r < 8; ++r) smem[i * 8 + r] = make_uint4(v, v, v, v);
    }
  }
}

// Shared memory: the pair table (K <= 4, table_bytes<K>()), then the e4m4 scale table: decode_scale of each
// of the 256 stored bytes, so that a block's scale is one shared-memory load instead of a dozen instructions.
constexpr int kScaleTableBytes = 256 * sizeof(float);

template <int K>
__host__ __device__ constexpr int smem_bytes() {
  return table_bytes<K>() + kScaleTableBytes;
}

__device__ __forceinline__ void build_scale_table(ScaleFormat fmt, float t, float* table) {
  if (fmt == ScaleFormat::kE4M4) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x)
      table[i] = decode_scale(fmt, static_cast<uint32_t>(i), t);
  }
}

// One block (32 terms of the reduction) of rows r0 = tile + g and r1 = r0 + 8 for every row tile of x: the A
// fragments rebuilt from the K words of each row, the tensor-core products with the x words xw (for row tile
// i and half h, in the order chunk_step describes), and the block's float32
// partial sums scaled by the rows' decoded scales s0, s1 into acc.
template <bool kBf16, int K, int MT>
__device__ __forceinline__ void block_step(const uint32_t (&w0)[K], const uint32_t (&w1)[K], float s0,
                                           float s1, uint32_t entry, const uint32_t* table,
                                           const uint32_t (&xw)[MT][2][2], int lane, bool pairs,
                                           float (&acc)[MT][4]) {
  constexpr bool kTable = K <= 4;
  const int c = lane & 3;
  uint32_t e00 = 0, e01 = 0, e10 = 0, e11 = 0;
  if constexpr (kTable) {
    e00 = byte_pair_index<K>(w0, byte_selector(c), pairs);
    e10 = byte_pair_index<K>(w1, byte_selector(c), pairs);
  } else {
    spread_codes<K>(w0, c, e00, e01);
    spread_codes<K>(w1, c, e10, e11);
  }
  float part[MT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i) part[i][0] = part[i][1] = part[i][2] = part[i][3] = 0.0f;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    uint32_t a[4];
    if constexpr (kTable) {
      a[0] = pair_value(table, e00, 2 * h);      // row g, elements 8c + 4h, + 1
      a[1] = pair_value(table, e10, 2 * h);      // row g+8
      a[2] = pair_value(table, e00, 2 * h + 1);  // row g, elements 8c + 4h + 2, + 3
      a[3] = pair_value(table, e10, 2 * h + 1);  // row g+8
    } else {
      a[0] = pack(lookup(entry, e00, 2 * h), lookup(entry, e01, 2 * h));
      a[1] = pack(lookup(entry, e10, 2 * h), lookup(entry, e11, 2 * h));
      a[2] = pack(lookup(entry, e00, 2 * h + 1), lookup(entry, e01, 2 * h + 1));
      a[3] = pack(lookup(entry, e10, 2 * h + 1), lookup(entry, e11, 2 * h + 1));
    }
#pragma unroll
    for (int i = 0; i < MT; ++i) mma_16816<kBf16>(part[i], a, xw[i][h][0], xw[i][h][1]);
  }
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    acc[i][0] = __fmaf_rn(s0, part[i][0], acc[i][0]);
    acc[i][1] = __fmaf_rn(s0, part[i][1], acc[i][1]);
    acc[i][2] = __fmaf_rn(s1, part[i][2], acc[i][2]);
    acc[i][3] = __fmaf_rn(s1, part[i][3], acc[i][3]);
  }
}

// acc[i]: (row r0, x rows 8i + 2c, 8i + 2c + 1) and (row r1, the same x rows), stored or written as one
// split's partial sums.
template <bool kBf16, int MT>
__device__ __forceinline__ void store_tile(const float (&acc)[MT][4], int64_t r0, int64_t r1, int c,
                                           int64_t m_rows, int64_t n_out, int64_t splits, int64_t split,
                                           float* __restrict__ partial, uint16_t* __restrict__ out) {
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t m = 8 * i + 2 * c + (e & 1);
      const int64_t r = e < 2 ? r0 : r1;
      if (m >= m_rows || r >= n_out) continue;
      if (splits == 1) {
        out[m * n_out + r] = to_16<kBf16>(acc[i][e]);
      } else {
        partial[(split * m_rows + m) * n_out + r] = acc[i][e];
      }
    }
  }
}

// What one lane reads for one work item: its two weight rows (clamped to the last row, so every load is in
// bounds; a row past n_out gets scale 0 and is never stored) and its x rows, as base pointers that each
// block offsets by a small constant.
struct ItemPointers {
  const uint32_t* w0;
  const uint32_t* w1;
  int64_t s0, s1;  // scale index of block 0 of each row
  const uint32_t* x[4];
  bool v0, v1;
  bool scale_words;  // e4m4 bytes of a row's chunk of 4 blocks are one aligned 32-bit word
  bool tiled;        // blocks in tile order: a row's blocks 4j .. 4j + 3 are adjacent, 64 blocks apart
  bool pairs;        // and K = 4 words as pair indices (kbit_format.h stores_pairs; the _tiled_v2 target)
};

// C blocks starting at block b: all loads first (weights, scales, x), then the products.
template <bool kBf16, int K, int MT, int C>
__device__ __forceinline__ void chunk_step(ScaleFormat fmt, const void* __restrict__ scales, float t,
                                           const float* scale_table, const ItemPointers& P, int64_t b,
                                           uint32_t entry, const uint32_t* table, int lane,
                                           float (&acc)[MT][4]) {
  const int c = lane & 3;
  // Block b relative to the rows' block 0 (w0 / s0 point there). Chunks of 4 start at multiples of 4, so in
  // tile order too their blocks are adjacent (kbit_format.h).
  const int64_t o = block_offset(b, P.tiled);
  uint32_t w0[C][K], w1[C][K];
#pragma unroll
  for (int u = 0; u < C; ++u) {
    load_words<K>(P.w0 + (o + u) * K, w0[u]);
    load_words<K>(P.w1 + (o + u) * K, w1[u]);
  }
  float s0[C], s1[C];
  if (fmt == ScaleFormat::kE4M4) {  // uniform across the grid
    const uint8_t* sc = static_cast<const uint8_t*>(scales);
    uint32_t st0[C], st1[C];
    // One 32-bit load per row instead of four byte loads: each load of the warp touches 8 rows, so the
    // byte loads cost as many L1 tag look-ups as the weights (ncu, 16 rows of x).
    if (C == 4 && P.scale_words) {
      const uint32_t q0 = *reinterpret_cast<const uint32_t*>(sc + P.s0 + o);
      const uint32_t q1 = *reinterpret_cast<const uint32_t*>(sc + P.s1 + o);
#pragma unroll
      for (int u = 0; u < C; ++u) {
        st0[u] = (q0 >> (8 * u)) & 0xffu;
        st1[u] = (q1 >> (8 * u)) & 0xffu;
      }
    } else {
#pragma unroll
      for (int u = 0; u < C; ++u) {
        st0[u] = sc[P.s0 + o + u];
        st1[u] = sc[P.s1 + o + u];
      }
    }
#pragma unroll
    for (int u = 0; u < C; ++u) {
      s0[u] = P.v0 ? scale_table[st0[u]] : 0.0f;
      s1[u] = P.v1 ? scale_table[st1[u]] : 0.0f;
    }
  } else {
#pragma unroll
    for (int u = 0; u < C; ++u) {
      s0[u] = P.v0 ? decode_scale(fmt, read_scale(fmt, scales, P.s0 + o + u), t) : 0.0f;
      s1[u] = P.v1 ? decode_scale(fmt, read_scale(fmt, scales, P.s1 + o + u), t) : 0.0f;
    }
  }
  // x words, as pairs of 16-bit values, in the order of the A fragments (block_step): for K <= 4 words
  // 4c .. 4c + 3 of the block (elements 8c .. 8c + 7, one 16-byte load); for K = 5 words c + 8h and
  // c + 8h + 4 (columns 16h + 2c and 16h + 2c + 8).
  uint32_t xw[C][MT][2][2];
#pragma unroll
  for (int u = 0; u < C; ++u) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      if constexpr (K <= 4) {
        const uint4 v = reinterpret_cast<const uint4*>(P.x[i])[(b + u) * (kBlock / 8) + c];
        xw[u][i][0][0] = v.x;
        xw[u][i][0][1] = v.y;
        xw[u][i][1][0] = v.z;
        xw[u][i][1][1] = v.w;
      } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t o = (b + u) * (kBlock / 2) + 8 * h + c;
          xw[u][i][h][0] = P.x[i][o];
          xw[u][i][h][1] = P.x[i][o + 4];
        }
      }
    }
  }
#pragma unroll
  for (int u = 0; u < C; ++u) {
    block_step<kBf16, K, MT>(w0[u], w1[u], s0[u], s1[u], entry, table, xw[u], lane, P.pairs, acc);
  }
}

// One work item of one warp: output rows [16 * tile, 16 * tile + 16), blocks [split * per_split, ...),
// MT tiles of 8 rows of x.
template <bool kBf16, int K, int MT>
__device__ __forceinline__ void matmul_item(ScaleFormat fmt, const uint32_t* __restrict__ packed,
                                            const void* __restrict__ scales,
                                            const float* __restrict__ codebook, float t,
                                            const uint16_t* __restrict__ x, int64_t m_rows, int64_t n_out,
                                            int64_t nb, int64_t tiles, int64_t splits, int64_t per_split,
                                            float* __restrict__ partial, uint16_t* __restrict__ out,
                                            const uint32_t* table, const float* scale_table, int lane,
                                            int64_t item, bool tiled, bool pairs) {
  constexpr bool kTable = K <= 4;
  const int64_t tile = item % tiles;
  const int64_t split = item / tiles;
  const int g = lane >> 2;
  const int c = lane & 3;
  const int64_t r0 = tile * 16 + g;
  const int64_t r1 = r0 + 8;
  ItemPointers P;
  P.v0 = r0 < n_out;
  P.v1 = r1 < n_out;
  const int64_t r0c = P.v0 ? r0 : n_out - 1;
  const int64_t r1c = P.v1 ? r1 : n_out - 1;
  P.tiled = tiled;
  P.pairs = pairs;
  P.s0 = block_index(r0c, 0, nb, tiled);
  P.s1 = block_index(r1c, 0, nb, tiled);
  P.w0 = packed + P.s0 * K;
  P.w1 = packed + P.s1 * K;
  // Chunks start at multiples of kChunk (choose_split rounds the splits to it), so with nb % 4 == 0 and an
  // aligned base every chunk's 4 scale bytes of a row are one aligned word (in tile order too).
  static_assert(kChunk == 4 && kTileBlocks == 4, "scale words hold the bytes of one chunk");
  P.scale_words = nb % 4 == 0 && reinterpret_cast<uintptr_t>(scales) % 4 == 0;
  const int64_t ldx = nb * kBlock;  // x is padded with zeros to whole blocks
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = 8 * i + g;
    // Rows past m_rows read row m_rows - 1: their products land in outputs that are never stored.
    P.x[i] = reinterpret_cast<const uint32_t*>(x + (m < m_rows ? m : m_rows - 1) * ldx);
  }
  const uint32_t entry = !kTable && lane < (1 << K) ? to_16<kBf16>(codebook[lane]) : 0u;
  const int64_t begin = split * per_split;
  const int64_t end = begin + per_split < nb ? begin + per_split : nb;

  float acc[MT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
  int64_t b = begin;
  for (; b + kChunk <= end; b += kChunk) {
    chunk_step<kBf16, K, MT, kChunk>(fmt, scales, t, scale_table, P, b, entry, table, lane, acc);
  }
  for (; b < end; ++b)
    chunk_step<kBf16, K, MT, 1>(fmt, scales, t, scale_table, P, b, entry, table, lane, acc);
  store_tile<kBf16, MT>(acc, r0, r1, c, m_rows, n_out, splits, split, partial, out);
}

// CTAs per SM asked of the register allocator (more row tiles of x and K = 5 need more registers).
template <int K, int MT>
__host__ __device__ constexpr int min_ctas() {
  return MT == 1 && K <= 4 ? 3 : MT <= 2 ? 2 : 1;
}

// Persistent CTAs: each builds its tables once, then its warps take (tile, split) items in turn.
template <bool kBf16, int K, int MT>
__global__ void __launch_bounds__(kMmThreads, min_ctas<K, MT>())
    matmul_kernel(ScaleFormat fmt, const uint32_t* __restrict__ packed, const void* __restrict__ scales,
                  const float* __restrict__ codebook, const float* __restrict__ tensor_scale,
                  const uint16_t* __restrict__ x, int64_t m_rows, int64_t n_out, int64_t nb, int64_t tiles,
                  int64_t splits, int64_t per_split, float* __restrict__ partial, uint16_t* __restrict__ out,
                  bool tiled, bool pairs) {
  extern __shared__ uint4 smem[];
  const int lane = threadIdx.x & 31;
  const float t = tensor_scale[0];
  float* scale_table = reinterpret_cast<float*>(reinterpret_cast<char*>(smem) + table_bytes<K>());
  build_scale_table(fmt, t, scale_table);
  build_pair_table<kBf16, K>(codebook, smem);
  __syncthreads();
  const uint32_t* table = reinterpret_cast<const uint32_t*>(smem) + lane;  // this lane's copy of entry 0
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kMmWarps + (threadIdx.x >> 5); item < tiles * splits;
       item += static_cast<int64_t>(gridDim.x) * kMmWarps) {
    matmul_item<kBf16, K, MT>(fmt, packed, scales, codebook, t, x, m_rows, n_out, nb, tiles, splits,
                              per_split, partial, out, table, scale_table, lane, item, tiled, pairs);
  }
}

// Persistent CTAs, as many as fit on the GPU at once.
template <bool kBf16, int K, int MT>
ffi::Error run_matmul(cudaStream_t stream, const MatmulArgs& a) {
  auto* kernel = matmul_kernel<kBf16, K, MT>;
  constexpr int smem = smem_bytes<K>();
  static DeviceCache cache{};
  const int per_sm = occupancy(cache, kernel, kMmThreads, smem);
  if (per_sm < 1) return launch_error("matmul occupancy query");
  const int64_t sms = sm_count() > 0 ? sm_count() : 132;
  const int64_t resident_warps = sms * per_sm * kMmWarps;
  const int64_t tiles = (a.n + 15) / 16;
  const int64_t count = a.m * a.n;
  const auto [splits, per_split] =
      choose_split(a.nb, tiles, resident_warps, kChunk, splits_that_fit(a.workspace_floats, count));
  float* partial = splits > 1 ? a.workspace : nullptr;
  const int64_t items = tiles * splits;
  const unsigned ctas =
      static_cast<unsigned>(std::min<int64_t>((items + kMmWarps - 1) / kMmWarps, sms * per_sm));
  kernel<<<ctas, kMmThreads, smem, stream>>>(a.fmt, a.packed, a.scales, a.codebook, a.tensor_scale, a.x, a.m,
                                             a.n, a.nb, tiles, splits, per_split, partial, a.out, a.tiled,
                                             a.pairs);
  launch_sum_splits<kBf16>(stream, partial, splits, count, a.out);
  return launch_error("matmul");
}

// kTiled: the words and scales in tile order (kbit_format.h); kPairWords: K = 4 words as pair indices (the
// _tiled_v2 name) rather than planes (_tiled). Separate handler names (as on the CPU), so that modules
// exported before tiled matrices, or before pair words, existed still bind and read as before.
template <bool kTiled, bool kPairWords>
ffi::Error MatmulImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::U32> packed,
                      ffi::AnyBuffer scales, ffi::Buffer<ffi::F32> codebook,
                      ffi::Buffer<ffi::F32> tensor_scale, ffi::Result<ffi::AnyBuffer> out,
                      ffi::Result<ffi::Buffer<ffi::F32>> workspace, int32_t k, int32_t scale_format) {
  MatmulLayout L;
  if (ffi::Error e =
          matmul_layout_of(x, packed, scales, codebook, tensor_scale, *out, k, scale_format, kTiled, &L);
      e.failure()) {
    return e;
  }
  if (x.element_type() == ffi::DataType::F32) {
    return invalid("the CUDA matmul takes float16 or bfloat16 x (float32 x is lowered to dequantize + dot)");
  }
  if (L.m > kMaxRows) {
    return invalid("the CUDA matmul takes at most " + std::to_string(kMaxRows) + " rows of x, got " +
                   std::to_string(L.m));
  }
  if (L.m == 0 || L.n == 0) return ffi::Error::Success();
  // 16-byte loads of x and of the words (XLA aligns every buffer to at least 16 bytes; a caller that does
  // not gets an error, not a misaligned-address fault).
  if (reinterpret_cast<uintptr_t>(x.untyped_data()) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(packed.typed_data()) % 16 != 0) {
    return invalid("the CUDA matmul needs x and the packed words 16-byte aligned");
  }
  auto* o = static_cast<uint16_t*>(out->untyped_data());
  if (L.nb == 0) {  // an empty reduction: y = 0
    if (cudaMemsetAsync(o, 0, L.m * L.n * sizeof(uint16_t), stream) != cudaSuccess) {
      return launch_error("matmul memset");
    }
    return ffi::Error::Success();
  }
  const MatmulArgs a{L.format,
                     packed.typed_data(),
                     scales.untyped_data(),
                     codebook.typed_data(),
                     tensor_scale.typed_data(),
                     static_cast<const uint16_t*>(x.untyped_data()),
                     L.m,
                     L.n,
                     L.nb,
                     o,
                     workspace->typed_data(),
                     static_cast<int64_t>(workspace->element_count()),
                     L.tiled,
                     kPairWords && stores_pairs(L.k, kTiled)};
  const bool bf16 = x.element_type() == ffi::DataType::BF16;
  if (gemv_supported(L.k, L.m, L.nb)) return run_gemv(stream, a, bf16, L.k);
  ffi::Error result = ffi::Error::Success();
  with_k(L.k, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    with_dtype_and_row_tiles(bf16, L.m, [&](auto bf, auto mt) {
      result = run_matmul<decltype(bf)::value, K, decltype(mt)::value>(stream, a);
    });
  });
  return result;
}

}  // namespace
}  // namespace cuda
}  // namespace kbit

XLA_FFI_DEFINE_HANDLER_SYMBOL(KbitMatmulCuda, (kbit::cuda::MatmulImpl<false, false>),
                              kbit::cuda::matmul_binding(), {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(KbitMatmulTiledCuda, (kbit::cuda::MatmulImpl<true, false>),
                              kbit::cuda::matmul_binding(), {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(KbitMatmulTiledV2Cuda, (kbit::cuda::MatmulImpl<true, true>),
                              kbit::cuda::matmul_binding(), {ffi::Traits::kCmdBufferCompatible});
