// CUDA quantize handler for format v1. Each warp takes 32 consecutive blocks (a tile) at a time and lane i
// owns block i's scale arithmetic, so that work is done once per block, not 32 times; codes come from the
// shortcut of kbit_quantize_fast.h where it applies (almost always) and from the exact threshold table of
// kbit_format.h otherwise (both tables built per CTA in shared memory). Two kernels: rows of whole blocks
// (16-byte aligned) take quantize_vec_kernel, where a lane reads 8 consecutive elements of a block and the
// plane words are gathered from per-lane bytes; other rows take quantize_kernel, where lane l reads element
// l of each block and a block's K plane words are K ballots.
#include "cuda_common.cuh"
#include "cuda_handlers.h"
#include "kbit_quantize_fast.h"

namespace ffi = xla::ffi;

namespace kbit {
namespace cuda {
namespace {

// The exact search for codebooks or values the table does not cover: rare, so kept out of line (inlined into
// the 32-way unrolled loop it would multiply the code size and compile time).
template <int K>
__device__ __noinline__ int nearest_code_slow(float xn, const SortedCodebook& sorted) {
  return nearest_code_sorted<K>(xn, sorted);
}

// The format's code of x in a block of decoded scale s, by the definition: IEEE division, threshold table.
template <int K>
__device__ __forceinline__ uint32_t exact_code(float x, float s, const CodeSearch& cs) {
  if (s != s) return 0;  // codes of a non-finite block stay 0
  const float xn = normalize(x, s);
  if (cs.regular && abs_f32(xn) <= cs.limit) {
    const int p = table_position<K>(xn, cs.tau);
    return static_cast<uint32_t>(cs.identity ? p : cs.label[p]);
  }
  return static_cast<uint32_t>(nearest_code_slow<K>(xn, cs.sorted));
}

// Ballot of (x & bit) != 0. Written as C++ the test becomes shift, mask and compare-with-1 before the vote;
// in PTX it is one and + setp, which ptxas turns into a single LOP3 writing the predicate.
template <uint32_t kBit>
__device__ __forceinline__ uint32_t ballot_bit(uint32_t x) {
  uint32_t r;
  asm("{\n\t.reg .pred p;\n\t.reg .b32 t;\n\tand.b32 t, %1, %2;\n\tsetp.ne.b32 p, t, 0;\n\t"
      "vote.sync.ballot.b32 %0, p, 0xffffffff;\n\t}"
      : "=r"(r)
      : "r"(x), "n"(kBit));
  return r;
}

template <int K, int J = 0>
__device__ __forceinline__ void ballot_planes(uint32_t code, uint32_t (&w)[K]) {
  if constexpr (J < K) {
    w[J] = ballot_bit<1u << J>(code);
    ballot_planes<K, J + 1>(code, w);
  }
}

// Stores a block's K plane words (lanes 0..K-1 each store one).
template <int K>
__device__ __forceinline__ void store_planes(uint32_t code, int lane, uint32_t* block_words) {
  uint32_t w[K];
  ballot_planes<K>(code, w);
  uint32_t mine = 0;
#pragma unroll
  for (int j = 0; j < K; ++j) mine = lane == j ? w[j] : mine;
  if (lane < K) block_words[lane] = mine;
}

// Stores words [J, K) of a block's K plane words, from one lane, at p (word offset o from a 16-byte
// boundary) with the widest stores the alignment allows. o is a constant once the tile loop is unrolled, so
// the branches fold away.
template <int K, int J>
__device__ __forceinline__ void store_words_from(const uint32_t (&w)[K], uint32_t* p, int o) {
  if constexpr (J < K) {
    if constexpr (J + 4 <= K) {
      if ((o + J) % 4 == 0) {
        *reinterpret_cast<uint4*>(p + J) = make_uint4(w[J], w[J + 1], w[J + 2], w[J + 3]);
        store_words_from<K, J + 4>(w, p, o);
        return;
      }
    }
    if constexpr (J + 2 <= K) {
      if ((o + J) % 2 == 0) {
        *reinterpret_cast<uint2*>(p + J) = make_uint2(w[J], w[J + 1]);
        store_words_from<K, J + 2>(w, p, o);
        return;
      }
    }
    p[J] = w[J];
    store_words_from<K, J + 1>(w, p, o);
  }
}

// A tile with a block the shortcut does not cover (a non-finite block, a scale outside [2**-60, 2**60], a
// quotient beyond the bucket range, or a codebook the bucket table does not serve): every block of the tile
// by the definition, re-reading x (rare, so a rolled loop out of line keeps the kernel small).
template <typename In, int K, bool kContiguous>
__device__ __noinline__ void quantize_tile_exact(const typename In::Storage* __restrict__ x, int64_t base,
                                                 int valid_blocks, float my_s, const CodeSearch& cs,
                                                 uint32_t* __restrict__ packed, int64_t d, int64_t nb) {
  const int lane = threadIdx.x & 31;
#pragma unroll 1
  for (int i = 0; i < valid_blocks; ++i) {
    const int64_t blk = base + i;
    float v;
    if constexpr (kContiguous) {
      v = In::load(x[blk * kBlock + lane]);
    } else {
      const int64_t row = blk / nb;
      const int64_t col = (blk - row * nb) * kBlock + lane;
      v = col < d ? In::load(x[row * d + col]) : 0.0f;
    }
    const float s = __shfl_sync(kFull, my_s, i);
    store_planes<K>(exact_code<K>(v, s, cs), lane, packed + blk * K);
  }
}

// Builds group g's search tables in shared memory (every thread of the CTA calls it; it starts and ends with
// a barrier): cs, whether the bucket table serves this codebook (ok), and the bucket table replicated per
// lane, entry j for lane l at [32 j + l] as make_entry(bucket_entry(cs, j)). The entries are computed once
// each (threads < kBuckets, into `entries`) and then replicated by every thread, 32 consecutive entries per
// warp store: a thread storing its entry's 32 copies itself made every store a 32-way bank conflict (about 4
// of the 10 us the whole build took per launch, by ncu's samples).
template <int K, typename Entry, typename MakeEntry>
__device__ __forceinline__ void build_tables(const float* codebook, CodeSearch& cs, Entry* buckets,
                                             Entry* entries, int& ok, MakeEntry make_entry) {
  __syncthreads();  // every warp is done with the previous group's tables
  if (threadIdx.x == 0) build_code_search_values(codebook, 1 << K, &cs);
  __syncthreads();
  // One thread per threshold; the barrier also guarantees every thread has read the distinct values in
  // cs.tau before they are overwritten with the thresholds.
  const float tau = threadIdx.x + 1 < cs.m ? code_search_threshold(cs, threadIdx.x) : 0.0f;
  __syncthreads();
  if (threadIdx.x < 32) cs.tau[threadIdx.x] = threadIdx.x + 1 < cs.m ? tau : bits_to_f32(0x7f800000u);
  __syncthreads();
  static_assert(kBuckets < kThreads, "a thread per bucket and one more for the check");
  if (threadIdx.x == kThreads - 1) ok = bucket_table_ok(cs);
  if (threadIdx.x < kBuckets) entries[threadIdx.x] = make_entry(bucket_entry(cs, threadIdx.x));
  __syncthreads();
#pragma unroll 1
  for (int i = threadIdx.x; i < kBuckets * 32; i += kThreads) buckets[i] = entries[i / 32];
  __syncthreads();
}

// Lane i's part of a tile's scale step for block i (amax_bits: its max |x| as float32 bits): the stored
// scale written, the decoded scale (NaN for a non-finite block) and the shortcut's divisor. Blocks past the
// end hold zeros: scale 0, on the shortcut.
struct TileScale {
  float s;
  FastDivisor div;
};

__device__ __forceinline__ TileScale tile_scale(ScaleFormat fmt, uint32_t amax_bits, float t, void* scales,
                                                int64_t base, int lane, int valid_blocks) {
  const bool nonfinite = amax_bits >= 0x7f800000u;
  const uint32_t stored = encode_scale(fmt, bits_to_f32(amax_bits), nonfinite, t);
  const float s = decode_scale(fmt, stored, t);
  if (lane < valid_blocks) write_scale(fmt, scales, base + lane, stored);
  return {s, fast_divisor(s, bits_to_f32(amax_bits), nonfinite)};
}

// Any rows (the kernel for rows that are not whole blocks, or x not 16-byte aligned; quantize_vec_kernel
// below takes the rest). Per tile of 32 blocks the warp loads element `lane` of each block; lane i finds
// block i's max by a reduction across the lanes and computes its scale (stored, decoded, its reciprocal)
// once. Then, on the shortcut of kbit_quantize_fast.h, each element costs a multiply and two fmas for its
// exact quotient and one shared-memory lookup for its code, and a block's K plane words are K ballots. The
// bucket table is replicated per lane (lane l reads column l), so its lookups never conflict on a bank
// whatever the data.
template <typename In, int K>
__global__ void __launch_bounds__(kThreads, 4)
    quantize_kernel(ScaleFormat fmt, const typename In::Storage* __restrict__ x,
                    const float* __restrict__ codebooks, const float* __restrict__ tensor_scales,
                    uint32_t* __restrict__ packed, void* __restrict__ scales, int64_t d, int64_t nb,
                    int64_t blocks_per_group, int64_t groups, bool packed_aligned) {
  __shared__ CodeSearch cs;
  __shared__ uint2 buckets[kBuckets * 32];  // entry j for lane l at [32 j + l]: {tau bits, codes}
  __shared__ uint2 entries[kBuckets];
  __shared__ float2 divisors[kWarps][32];  // this tile's blocks: (s, 1/s) of block i at [warp][i]
  __shared__ int bucket_ok;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t chunks = (blocks_per_group + 31) / 32;
  // Shared address of (bucket 0, this lane): a quotient's fma result bits times 256 plus it is the address of
  // its entry (32-bit wrap-around drops the bits of 2**23).
  const uint32_t lane_table = shared_address(buckets) + static_cast<uint32_t>(lane) * 8u;
  for (int64_t g = blockIdx.y; g < groups; g += gridDim.y) {
    build_tables<K>(codebooks + g * (1 << K), cs, buckets, entries, bucket_ok,
                    [](BucketEntry e) { return make_uint2(f32_to_bits(e.tau), e.codes); });
    const float t = tensor_scales[g];
    const bool table_ok = bucket_ok != 0;
    const int64_t end = (g + 1) * blocks_per_group;
    for (int64_t chunk = static_cast<int64_t>(blockIdx.x) * kWarps + warp; chunk < chunks;
         chunk += static_cast<int64_t>(gridDim.x) * kWarps) {
      const int64_t base = g * blocks_per_group + chunk * 32;
      const int valid_blocks = static_cast<int>(end - base < 32 ? end - base : 32);
      float v[32];
      int64_t row = base / nb;
      int64_t b = base - row * nb;
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int64_t col = b * kBlock + lane;
        v[i] = i < valid_blocks && col < d ? In::load(x[row * d + col]) : 0.0f;
        if (++b == nb) {
          b = 0;
          ++row;
        }
      }
      // Non-negative floats order like their bit patterns: an unsigned max is the float max, and a max at or
      // above the infinity pattern means the block holds inf or NaN.
      uint32_t amax_bits = 0;
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const uint32_t m = __reduce_max_sync(kFull, f32_to_bits(v[i]) & 0x7fffffffu);
        amax_bits = lane == i ? m : amax_bits;
      }
      const auto [my_s, div] = tile_scale(fmt, amax_bits, t, scales, base, lane, valid_blocks);
      __syncwarp();  // the previous tile's divisors have been read
      divisors[warp][lane] = make_float2(div.s, div.y);
      __syncwarp();
      // The shortcut's stores are 16-byte vectors where a block's words allow: the tile's first word must
      // be 16-byte aligned (always for even K; for odd K when base is a multiple of 4, which only tiles of
      // a group after one whose block count is not a multiple of 4 miss).
      const bool aligned = packed_aligned && (K % 2 == 0 || base % 4 == 0);
      // One vote over all the conditions: the compiler then knows the branch is uniform (with a condition
      // outside the vote it treats the loop as divergent, and the element loop triples in size).
      const bool shortcut = __all_sync(kFull, div.ok && table_ok && aligned);
      uint32_t* pp = packed + base * K;
      if (shortcut) {
        const uint32_t store_mask = lane != 0 ? 0u : valid_blocks == 32 ? kFull : (1u << valid_blocks) - 1u;
#pragma unroll
        for (int i = 0; i < 32; ++i) {
          const float2 sy = divisors[warp][i];
          const float xn = fast_quotient(v[i], sy.x, sy.y);
          const uint32_t key = f32_to_bits(fmaf(xn, kBucketScale, kBucketMagic));
          const uint2 e = load_shared_u64(key * static_cast<uint32_t>(32 * sizeof(uint2)) + lane_table);
          const uint32_t code = bucket_code_bits(xn, BucketEntry{bits_to_f32(e.x), e.y});
          uint32_t w[K];
          ballot_planes<K>(code, w);
          // Lane 0 stores the block's words (the same in every lane); `aligned` made the tile's first word
          // 16-byte aligned.
          if (((store_mask >> i) & 1u) != 0) store_words_from<K, 0>(w, pp + i * K, i * K);
        }
      } else {
        quantize_tile_exact<In, K, false>(x, base, valid_blocks, my_s, cs, packed, d, nb);
      }
    }
  }
}

// ---------------------------------------------------------------- rows of whole blocks, 16-byte aligned

// Bit j (j < 4) of a code at bit 8j: one byte per bit plane.
__device__ __forceinline__ uint32_t spread_planes(uint32_t code) {
  return (code & 1u) | (code & 2u) << 7 | (code & 4u) << 14 | (code & 8u) << 21;
}

// The bucket table as quantize_vec_kernel reads it: {tau bits, planes 0..3 of the code below tau at bits 8j
// and of the code above at bits 8j + 4}, and for K = 5 plane 4 of both at bits 0 and 4 of a third word. The
// code of xn is then the word shifted right by 4 when xn >= tau, in the low half of each byte.
template <int K>
using VecEntry = std::conditional_t<K <= 4, uint2, uint4>;

template <int K>
__device__ __forceinline__ VecEntry<K> vec_entry(BucketEntry e) {
  const uint32_t below = e.codes & 0xffffu, above = e.codes >> 16;
  const uint32_t planes = spread_planes(below) | spread_planes(above) << 4;
  if constexpr (K <= 4) {
    return make_uint2(f32_to_bits(e.tau), planes);
  } else {
    return make_uint4(f32_to_bits(e.tau), planes, (below >> 4 & 1u) | (above >> 4 & 1u) << 4, 0u);
  }
}

template <int K>
__device__ __forceinline__ VecEntry<K> load_vec_entry(uint32_t address) {
  if constexpr (K <= 4) {
    return load_shared_u64(address);
  } else {
    return load_shared_u128(address);
  }
}

// The 32-bit words a lane loads per part of a block (8 elements) and element e of them as float32.
template <typename In>
constexpr int kPartWords = sizeof(typename In::Storage) == 2 ? 4 : 8;

template <typename In>
__device__ __forceinline__ float part_element(const uint32_t* w, int e) {
  if constexpr (sizeof(typename In::Storage) == 2) {
    return In::load(static_cast<uint16_t>(e % 2 != 0 ? w[e / 2] >> 16 : w[e / 2] & 0xffffu));
  } else {
    return bits_to_f32(w[e]);
  }
}

// The largest |x| of a part as the bits of its storage type (magnitudes order like their bit patterns, and
// a 16-bit magnitude converts to float32 keeping the order, inf and NaN).
template <typename In>
__device__ __forceinline__ uint32_t part_max_bits(const uint32_t* w) {
  if constexpr (sizeof(typename In::Storage) == 2) {
    const uint32_t m = __vmaxu2(__vmaxu2(w[0] & 0x7fff7fffu, w[1] & 0x7fff7fffu),
                                __vmaxu2(w[2] & 0x7fff7fffu, w[3] & 0x7fff7fffu));
    return max(m >> 16, m & 0xffffu);
  } else {
    uint32_t m = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) m = max(m, w[i] & 0x7fffffffu);
    return m;
  }
}

// K = 5 with 16-bit inputs: a warp's next tile is copied into shared memory (cp.async, sm_80+) while it works
// on the current one, so its loads are in flight for a whole tile's arithmetic instead of being waited for at
// the tile's start (there the loads held in registers also spill 72 bytes): 0.90x the time. Staging every
// input and K measured 1.01-1.03x at K = 2..4 and float32 K = 4 (whose loads the other resident warps
// already cover), so only these kernels stage. The stage holds the tile in x's order: 16-byte piece 32 r + l
// (part l % 4 of block 8 r + l / 4) is copied and read by lane l alone, so a lane waits for its own copies
// only.
template <typename In, int K>
constexpr bool kStagedTile = K == 5 && sizeof(typename In::Storage) == 2;

constexpr int kStageBytes = 32 * kBlock * 2;  // one tile of 16-bit elements

__device__ __forceinline__ void copy_piece(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}

// Issues this lane's copies of the tile of blocks [base, base + valid_blocks) (zeros past them) into stage.
template <typename In>
__device__ __forceinline__ void copy_tile(const typename In::Storage* __restrict__ x, int64_t base,
                                          int valid_blocks, uint32_t stage, int lane) {
  const uint4* tile = reinterpret_cast<const uint4*>(x + base * kBlock);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int piece = 32 * r + lane;
    const bool valid = piece / 4 < valid_blocks;
    copy_piece(stage + 16u * static_cast<uint32_t>(piece), tile + (valid ? piece : 0), valid);
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
}

// Rows of whole blocks with x 16-byte aligned (every array JAX hands over). A tile is 32 blocks in 4 rounds
// of 8: in round r lane l holds part l % 4 (elements 8(l % 4) .. + 7) of block 8r + l / 4, read with one or
// two 16-byte loads. Lane i then owns block i's scale arithmetic as in quantize_kernel. An element's code is
// that kernel's shortcut (same quotient, same bucket, same comparison: the same code), but it lands in the
// lane's plane bytes by a shift and an add (the table holds the codes' planes spread one per byte), and the
// four lanes of a block swap bytes so that lane j holds plane j's word: no ballot per plane and element.
template <typename In, int K>
__global__ void __launch_bounds__(kThreads, 4)
    quantize_vec_kernel(ScaleFormat fmt, const typename In::Storage* __restrict__ x,
                        const float* __restrict__ codebooks, const float* __restrict__ tensor_scales,
                        uint32_t* __restrict__ packed, void* __restrict__ scales, int64_t blocks_per_group,
                        int64_t groups) {
  using Entry = VecEntry<K>;
  constexpr int kWords = kPartWords<In>;
  constexpr bool kStaged = kStagedTile<In, K>;
  __shared__ CodeSearch cs;
  __shared__ Entry static_buckets[kStaged ? 1 : kBuckets * 32];
  __shared__ int bucket_ok;
  __shared__ Entry entries[kBuckets];
  // Staged: the bucket table (kBuckets * 32 entries), then one tile's stage per warp (over 48 KB: dynamic).
  extern __shared__ __align__(16) unsigned char dynamic_shared[];
  Entry* const buckets = kStaged ? reinterpret_cast<Entry*>(dynamic_shared) : static_buckets;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int part = lane & 3;
  const int slot = lane >> 2;  // the block of a round this lane works on
  const int64_t chunks = (blocks_per_group + 31) / 32;
  // As in quantize_kernel: a quotient's fma result bits times the row size plus this is its entry's address.
  const uint32_t lane_table = shared_address(buckets) + static_cast<uint32_t>(lane * sizeof(Entry));
  const uint32_t stage = shared_address(dynamic_shared) +
                         static_cast<uint32_t>(kBuckets * 32 * sizeof(Entry)) +
                         static_cast<uint32_t>(warp * kStageBytes);
  // Byte swaps of the plane transpose (lanes xor 2, then xor 1): afterwards lane `part` holds plane `part`.
  const uint32_t swap2 = part < 2 ? 0x5410u : 0x3276u;
  const uint32_t swap1 = part % 2 == 0 ? 0x6240u : 0x3715u;
  const int64_t chunk_stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t g = blockIdx.y; g < groups; g += gridDim.y) {
    const int64_t end = (g + 1) * blocks_per_group;
    auto tile_blocks = [&](int64_t base) { return static_cast<int>(end - base < 32 ? end - base : 32); };
    const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
    // The first tile's copies overlap the table build.
    if (kStaged && first < chunks)
      copy_tile<In>(x, g * blocks_per_group + first * 32, tile_blocks(g * blocks_per_group + first * 32),
                    stage, lane);
    build_tables<K>(codebooks + g * (1 << K), cs, buckets, entries, bucket_ok, vec_entry<K>);
    const float t = tensor_scales[g];
    const bool table_ok = bucket_ok != 0;
    for (int64_t chunk = first; chunk < chunks; chunk += chunk_stride) {
      const int64_t base = g * blocks_per_group + chunk * 32;
      const int valid_blocks = tile_blocks(base);
      uint32_t w[4][kWords];
      if constexpr (kStaged) {
        asm volatile("cp.async.wait_group 0;" ::: "memory");
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const uint4 q = load_shared_u128(stage + 16u * static_cast<uint32_t>(32 * r + lane));
          w[r][0] = q.x;
          w[r][1] = q.y;
          w[r][2] = q.z;
          w[r][3] = q.w;
        }
      } else {
        const uint4* xp = reinterpret_cast<const uint4*>(x + (base + slot) * kBlock + part * 8);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
#pragma unroll
          for (int v = 0; v < kWords / 4; ++v) {
            constexpr int kRoundVecs = 8 * kBlock * sizeof(typename In::Storage) / 16;
            const uint4 q =
                8 * r + slot < valid_blocks ? __ldg(xp + r * kRoundVecs + v) : make_uint4(0, 0, 0, 0);
            w[r][4 * v] = q.x;
            w[r][4 * v + 1] = q.y;
            w[r][4 * v + 2] = q.z;
            w[r][4 * v + 3] = q.w;
          }
        }
      }
      // Block maxima: the four parts' by shuffles, then lane i fetches block i's from its round.
      uint32_t amax_raw = 0;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        uint32_t m = part_max_bits<In>(w[r]);
        m = max(m, __shfl_xor_sync(kFull, m, 1));
        m = max(m, __shfl_xor_sync(kFull, m, 2));
        m = __shfl_sync(kFull, m, (lane & 7) * 4);
        amax_raw = lane >> 3 == r ? m : amax_raw;
      }
      // The maxima used every word this lane read from its stage: the next tile's copies may go in.
      if (kStaged && chunk + chunk_stride < chunks) {
        copy_tile<In>(x, base + chunk_stride * 32, tile_blocks(base + chunk_stride * 32), stage, lane);
      }
      const uint32_t amax_bits = sizeof(typename In::Storage) == 2
                                     ? f32_to_bits(In::load(static_cast<uint16_t>(amax_raw)))
                                     : amax_raw;
      const auto [my_s, div] = tile_scale(fmt, amax_bits, t, scales, base, lane, valid_blocks);
      if (!__all_sync(kFull, div.ok && table_ok)) {
        quantize_tile_exact<In, K, true>(x, base, valid_blocks, my_s, cs, packed, 0, 0);
        continue;
      }
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const float s = __shfl_sync(kFull, div.s, 8 * r + slot);
        const float y = __shfl_sync(kFull, div.y, 8 * r + slot);
        // Elements 0..3 and 4..7 of the part in bits 0..3 of each byte of lo and hi; bits 4..7 collect the
        // unselected codes' bits, never carrying into the next byte.
        uint32_t lo = 0, hi = 0, lo4 = 0, hi4 = 0;
#pragma unroll
        for (int e = 7; e >= 0; --e) {
          const float xn = fast_quotient(part_element<In>(w[r], e), s, y);
          const uint32_t key = f32_to_bits(fmaf(xn, kBucketScale, kBucketMagic));
          const Entry entry = load_vec_entry<K>(key * static_cast<uint32_t>(32 * sizeof(Entry)) + lane_table);
          const bool above = xn >= bits_to_f32(entry.x);
          const uint32_t code = above ? entry.y >> 4 : entry.y;
          if (e >= 4) {
            hi = hi * 2 + code;
          } else {
            lo = lo * 2 + code;
          }
          if constexpr (K == 5) {
            const uint32_t code4 = above ? entry.z >> 4 : entry.z;
            if (e >= 4) {
              hi4 = hi4 * 2 + code4;
            } else {
              lo4 = lo4 * 2 + code4;
            }
          }
        }
        uint32_t planes = (lo & 0x0f0f0f0fu) | (hi << 4 & 0xf0f0f0f0u);
        planes = __byte_perm(planes, __shfl_xor_sync(kFull, planes, 2), swap2);
        planes = __byte_perm(planes, __shfl_xor_sync(kFull, planes, 1), swap1);
        const bool valid = 8 * r + slot < valid_blocks;
        uint32_t* block_words = packed + (base + 8 * r + slot) * K;
        if (part < K && valid) block_words[part] = planes;
        if constexpr (K == 5) {
          uint32_t plane4 = ((lo4 & 0xfu) | (hi4 << 4 & 0xf0u)) << (8 * part);
          plane4 |= __shfl_xor_sync(kFull, plane4, 1);
          plane4 |= __shfl_xor_sync(kFull, plane4, 2);
          if (part == 0 && valid) block_words[4] = plane4;
        }
      }
    }
  }
}

// One wave of CTAs (each builds the code tables once per group, then loops over tiles).
template <typename In, int K>
void launch_quantize(cudaStream_t stream, const Layout& L, const void* x, const float* cb, const float* ts,
                     uint32_t* packed, void* scales) {
  const auto* xs = static_cast<const typename In::Storage*>(x);
  const int64_t bpg = L.rows_per_group * L.nb;
  if (L.d % kBlock == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    static DeviceCache cache{};
    constexpr int smem = kStagedTile<In, K> ? kBuckets * 32 * sizeof(VecEntry<K>) + kWarps * kStageBytes : 0;
    const int occupied = occupancy(cache, quantize_vec_kernel<In, K>, kThreads, smem);
    const dim3 grid = grid_for((bpg + 31) / 32, L.groups, occupied > 0 ? occupied : 8);
    quantize_vec_kernel<In, K>
        <<<grid, kThreads, smem, stream>>>(L.format, xs, cb, ts, packed, scales, bpg, L.groups);
  } else {
    static DeviceCache cache{};
    const int per_sm = resident_ctas(cache, quantize_kernel<In, K>);
    const dim3 grid = grid_for((bpg + 31) / 32, L.groups, per_sm);
    quantize_kernel<In, K><<<grid, kThreads, 0, stream>>>(L.format, xs, cb, ts, packed, scales, L.d, L.nb,
                                                          bpg, L.groups,
                                                          reinterpret_cast<uintptr_t>(packed) % 16 == 0);
  }
}

ffi::Error QuantizeImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> codebook,
                        ffi::Buffer<ffi::F32> tensor_scale, ffi::Result<ffi::Buffer<ffi::U32>> packed,
                        ffi::Result<ffi::AnyBuffer> scales, int32_t k, int32_t scale_format) {
  Layout L;
  if (ffi::Error e = layout_of(x, *packed, *scales, codebook, tensor_scale, k, scale_format, &L);
      e.failure()) {
    return e;
  }
  if (L.rows * L.nb == 0) return ffi::Error::Success();
  const float* cb = codebook.typed_data();
  const float* ts = tensor_scale.typed_data();
  uint32_t* p = packed->typed_data();
  void* sc = scales->untyped_data();
  const void* xs = x.untyped_data();
  with_k(L.k, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    switch (x.element_type()) {
      case ffi::DataType::F32: launch_quantize<kbit::F32, K>(stream, L, xs, cb, ts, p, sc); break;
      case ffi::DataType::F16: launch_quantize<kbit::F16, K>(stream, L, xs, cb, ts, p, sc); break;
      default: launch_quantize<kbit::BF16, K>(stream, L, xs, cb, ts, p, sc); break;
    }
  });
  return launch_error("quantize");
}

}  // namespace
}  // namespace cuda
}  // namespace kbit

XLA_FFI_DEFINE_HANDLER_SYMBOL(KbitQuantizeCuda, kbit::cuda::QuantizeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("k")
                                  .Attr<int32_t>("scale_format"),
                              {ffi::Traits::kCmdBufferCompatible});
