// The fused matmul for one or two rows of x at K <= 4 (decode): y = x @ W on the tensor cores with a block-
// diagonal x operand, so that each lane works on whole blocks of W.
//
// In cuda_matmul.cu the 16 k-columns of an mma.sync m16n8k16 are 16 elements of one block, so the four
// lanes of a row quad share every block: each loads the block's K words, rebuilds its own quarter of the
// indices and the quad rescales the partial sums after every two mmas. Here the four lane columns c = 0..3
// take four different blocks (k-columns 2c, 2c + 1, 2c + 8, 2c + 9 of every mma come from block b + c),
// and column n = 2c + m of the x operand holds x row m on the k-rows of block b + c and zeros elsewhere
// (lanes off that diagonal use zeros). Column n of the product is then the partial sum of block
// b + c alone, for x row m, so eight mmas cover 16 rows x 4 blocks and each lane rescales its own block's
// sums once. Pair indices come from the bit planes in a few shifts and masks per 16 pairs (pair_indices),
// and a pair table lookup is one byte permute (which also adds the lane's bank offset) and one shared-memory
// load.
// The weights and scales stream into registers, a double-buffered ring of 2 x kBatch steps (at batch 1 the
// kernel is a race against memory latency, and the steps in flight per SM must cover it); x is copied into
// shared memory once per CTA. Staging the weights through shared memory as well (cp.async) made the
// shared-memory pipe the bottleneck: ncu put half of the stall samples on it at the large shapes.
#include <type_traits>

#include "cuda_gemv.h"
#include "cuda_mma.cuh"

namespace kbit {
namespace cuda {
namespace {

constexpr int kGvWarps = 16;  // one CTA per SM (up to 128 registers a thread) sharing the tables and x
constexpr int kGvThreads = kGvWarps * 32;
constexpr int kStep = 4;  // blocks per warp step, one per lane column; splits are whole pairs of steps
// The tables: 256 rows of 256 bytes. Row e holds pair-table entry e in bytes [0, 128) and the decoded e4m4
// scale e in bytes [128, 256), each replicated once per lane so that lane l always reads bank l. They start
// at a shared address whose low 16 bits are zero, so that one byte permute of (pair index, lane's address)
// is the whole address of a lookup (the space that alignment leaves free holds the copy of x, if it fits).
constexpr int kRowBytes = 256;
constexpr int kTableBytes = 256 * kRowBytes;

template <bool kBf16, int K>
__device__ __forceinline__ void build_gemv_tables(const float* __restrict__ codebook, ScaleFormat fmt,
                                                  float t, uint4* smem) {
  for (int e = threadIdx.x; e < 256; e += kGvThreads) {
    // Bits above 2K are ignored (at K = 2 they hold another pair; at K = 3 they are zero).
    int c0 = 0, c1 = 0;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      c0 |= ((e >> (2 * j)) & 1) << j;
      c1 |= ((e >> (2 * j + 1)) & 1) << j;
    }
    const uint32_t pv =
        to_16<kBf16>(codebook[c0]) | (static_cast<uint32_t>(to_16<kBf16>(codebook[c1])) << 16);
    const uint32_t sv = fmt == ScaleFormat::kE4M4 ? f32_to_bits(decode_scale(fmt, e, t)) : 0u;
    uint4* row = smem + e * (kRowBytes / 16);
#pragma unroll
    for (int u = 0; u < 16; ++u) {
      const int v = (u + e) & 15;  // neighbouring threads store to different banks
      const uint32_t w = v < 8 ? pv : sv;
      row[v] = make_uint4(w, w, w, w);
    }
  }
}

// Entry (byte q of p) of a table row, at the lane's bank. lane_address is the shared address of the lane's
// word in row 0 (bits 8..15 zero); the permute puts the entry number into bits 8..15.
__device__ __forceinline__ uint32_t row_lookup(uint32_t p, uint32_t lane_address, int q) {
  const uint32_t address = __byte_perm(p, lane_address, 0x7604 | (q << 4));
  uint32_t v;
  // volatile: the compiler must not move the load above the barrier that publishes the tables.
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(address));
  return v;
}

// p[c0] byte q indexes the pair of elements 8q + 2 c0, 8q + 2 c0 + 1 (bit 2j + r: bit j of element r's
// code), for c0 = 0..3. Planes are merged two at a time into nibbles (nibble n of a: the pair 2n of planes 0
// and 1, of b: the pair 2n + 1), then nibbles into bytes: 16 pair indices in 6 (K = 2), 12 (K = 3) or 16
// (K = 4: kbit_format.h transpose_pair_fields) shift / logic operations. At K = 2 bits 4..7 of a byte are
// another pair's: the table repeats its 16 entries over all 256 rows so they do not matter. kPairs: the
// words already are these indices (a tiled K = 4 matrix of the _tiled_v2 targets; kbit_format.h).
template <int K, bool kPairs>
__device__ __forceinline__ void pair_indices(const uint32_t (&w)[K], uint32_t (&p)[4]) {
  static_assert(!kPairs || K == 4, "only K = 4 blocks are stored as pair indices");
  if constexpr (kPairs) {
    p[0] = w[0], p[1] = w[1], p[2] = w[2], p[3] = w[3];
  } else if constexpr (K == 4) {
    transpose_pair_fields(w, p);
  } else {
    const uint32_t a = (w[0] & 0x33333333u) | ((w[1] << 2) & 0xccccccccu);
    const uint32_t b = ((w[0] >> 2) & 0x33333333u) | (w[1] & 0xccccccccu);
    if constexpr (K == 2) {
      p[0] = a, p[1] = b, p[2] = a >> 4, p[3] = b >> 4;
    } else {  // K = 3: plane 2 in the same nibble layout
      const uint32_t c = w[2] & 0x33333333u;
      const uint32_t d = (w[2] >> 2) & 0x33333333u;
      p[0] = (a & 0x0f0f0f0fu) | ((c << 4) & 0xf0f0f0f0u);
      p[1] = (b & 0x0f0f0f0fu) | ((d << 4) & 0xf0f0f0f0u);
      p[2] = ((a >> 4) & 0x0f0f0f0fu) | (c & 0xf0f0f0f0u);
      p[3] = ((b >> 4) & 0x0f0f0f0fu) | (d & 0xf0f0f0f0u);
    }
  }
}

// The eight mmas of one step and the rescale of this lane's block sums into acc (row r0: acc[0] for x row 0,
// acc[1] for x row 1; row r1: acc[2], acc[3]). w0, w1: the K words of this lane's block in rows r0, r1;
// s0, s1: their stored scales; xw: the x operand (x on this lane's block, or zeros off the diagonal).
// `valid` is false for a block past the end of the split.
template <bool kBf16, int K, int M, bool kE4M4>
__device__ __forceinline__ void compute_indexed(const uint32_t (&q0)[4], const uint32_t (&q1)[4],
                                                uint32_t s0s, uint32_t s1s, const uint32_t (&xw)[16],
                                                bool valid, ScaleFormat fmt, float t, uint32_t pair_offset,
                                                uint32_t scale_offset, float (&acc)[4]) {
  float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  // Mma j takes the block's elements 4j .. 4j + 3: x words 2j and 2j + 1, which read_x leaves in adjacent
  // registers, as the B operand needs them (no register moves); the same elements' pairs on the A side are
  // byte j / 2 of q[2 (j & 1)] and q[2 (j & 1) + 1].
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int byte = j >> 1;
    const int lo = 2 * (j & 1);
    uint32_t a[4];
    a[0] = row_lookup(q0[lo], pair_offset, byte);      // row r0, elements 4j, 4j + 1
    a[1] = row_lookup(q1[lo], pair_offset, byte);      // row r1
    a[2] = row_lookup(q0[lo + 1], pair_offset, byte);  // row r0, elements 4j + 2, 4j + 3
    a[3] = row_lookup(q1[lo + 1], pair_offset, byte);  // row r1
    mma_16816<kBf16>(part, a, xw[2 * j], xw[2 * j + 1]);
  }
  float s0, s1;
  if constexpr (kE4M4) {
    s0 = __uint_as_float(row_lookup(s0s, scale_offset, 0));
    s1 = __uint_as_float(row_lookup(s1s, scale_offset, 0));
  } else {
    s0 = decode_scale(fmt, s0s, t);
    s1 = decode_scale(fmt, s1s, t);
  }
  if (!valid) s0 = s1 = 0.0f;  // its x columns are zero, but its scale may be NaN
  acc[0] = __fmaf_rn(s0, part[0], acc[0]);
  acc[2] = __fmaf_rn(s1, part[2], acc[2]);
  if constexpr (M == 2) {
    acc[1] = __fmaf_rn(s0, part[1], acc[1]);
    acc[3] = __fmaf_rn(s1, part[3], acc[3]);
  }
}

template <bool kBf16, int K, int M, bool kE4M4, bool kPairs>
__device__ __forceinline__ void compute_step(const uint32_t (&w0)[K], const uint32_t (&w1)[K], uint32_t s0s,
                                             uint32_t s1s, const uint32_t (&xw)[16], bool valid,
                                             ScaleFormat fmt, float t, uint32_t pair_offset,
                                             uint32_t scale_offset, float (&acc)[4]) {
  uint32_t q0[4], q1[4];
  pair_indices<K, kPairs>(w0, q0);
  pair_indices<K, kPairs>(w1, q1);
  compute_indexed<kBf16, K, M, kE4M4>(q0, q1, s0s, s1s, xw, valid, fmt, t, pair_offset, scale_offset, acc);
}

__device__ __forceinline__ uint32_t load_scale(bool e4m4, ScaleFormat fmt, const void* scales, int64_t i) {
  return e4m4 ? static_cast<const uint8_t*>(scales)[i] : read_scale(fmt, scales, i);
}

// One lane's K words of one block, global -> registers, not kept in L1 (the weights are read once; L1 is
// mostly shared memory here anyway).
template <int K>
__device__ __forceinline__ void load_words_stream(const uint32_t* p, uint32_t (&w)[K]) {
  if constexpr (K == 4) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
                 : "l"(p));
  } else if constexpr (K == 2) {
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(w[0]), "=r"(w[1]) : "l"(p));
  } else {
#pragma unroll
    for (int j = 0; j < K; ++j) {
      asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(w[j]) : "l"(p + j));
    }
  }
}

__device__ __forceinline__ void read_x(const uint4* p, uint32_t (&xw)[16]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 v = p[i];
    xw[4 * i] = v.x, xw[4 * i + 1] = v.y, xw[4 * i + 2] = v.z, xw[4 * i + 3] = v.w;
  }
}

// x in shared memory, once per CTA: the 16-byte chunk q of x (row m's chunks follow row m - 1's) at byte
// 16 (q + q / 8): a 16-byte gap after every 128 bytes, so that the four lanes reading blocks b .. b + 3 of
// one row (64 bytes each, b a multiple of 4) in one instruction hit four different bank groups.
__host__ __device__ constexpr int64_t x_chunk_offset(int64_t q) { return 16 * (q + q / 8); }

// The shared memory besides the tables: the padded copy of x, then one slot of 16 x M partial sums per warp
// (the CTA adds splits up there).
__host__ __device__ constexpr int64_t x_copy_bytes(int64_t m, int64_t nb) {
  return x_chunk_offset(m * nb * 4) + 16;
}
__host__ __device__ constexpr int64_t region_bytes(int64_t m, int64_t nb) {
  return x_copy_bytes(m, nb) + static_cast<int64_t>(kGvWarps) * 16 * m * 4;
}

// Dynamic shared memory the kernel asks for: the 64 KB tables, 64 KB-aligned, and the region below them when
// it fits the gap that alignment leaves, else above them. Whatever the base address, this covers both cases.
__host__ __device__ constexpr int64_t gemv_smem_bytes(int64_t m, int64_t nb) {
  const int64_t r = region_bytes(m, nb);
  return kTableBytes + (2 * r > kTableBytes ? 2 * r : kTableBytes);
}

// Steps of weights per half of the register ring (gemv_item). Three (128 registers, a few spilled at M = 2)
// measured slower than two at every K = 3 and 4 shape, 6-11 % slower at the decode layers (bench/RESULTS.md).
constexpr int kBatch = 2;

// One work item of one warp: output rows [16 tile, 16 tile + 16), blocks [begin, end) of split `split`.
// xs: the shared address of the CTA's copy of x; slot: this warp's slot of sums (shared, generic pointer).
template <bool kBf16, int K, int M, bool kE4M4, bool kTiled>
__device__ __forceinline__ void gemv_item(const MatmulArgs& a, float t, int64_t tiles, int64_t splits,
                                          int64_t per_split, float* __restrict__ partial, int64_t item,
                                          int lane, uint32_t tables, uint32_t xs, float* slot, bool to_slot) {
  // kTiled: the words and scales are in tile order (a.tiled), known here, so the walk is fixed (below); at
  // K = 4 they are then pair words (the _tiled_v2 targets; the _tiled ones' plane words take kTiled = false).
  constexpr bool kPairs = kTiled && K == 4;
  const int g = lane >> 2;
  const int c = lane & 3;
  const int64_t tile = item % tiles;
  const int64_t split = item / tiles;
  const int64_t r0 = tile * 16 + g;
  const int64_t r1 = r0 + 8;
  // Rows past n read the last row: their sums are never stored.
  const int64_t r0c = r0 < a.n ? r0 : a.n - 1;
  const int64_t r1c = r1 < a.n ? r1 : a.n - 1;
  const int64_t begin = split * per_split;
  const int64_t end = begin + per_split < a.nb ? begin + per_split : a.nb;
  const int mrow = g - 2 * c;  // the x row of this lane's operand column, if it is on the diagonal
  const bool diag = mrow >= 0 && mrow < M;
  const uint32_t pair_offset = tables + static_cast<uint32_t>(lane) * 4u;
  const uint32_t scale_offset = tables + 128u + static_cast<uint32_t>(lane) * 4u;
  const int64_t ldx = a.nb * kBlock;
  // With pair words (kPairs) nothing is computed from the words before the lookups, and ptxas moves their
  // first use below the next half's loads; a branch to those loads that depends on a loaded word (through
  // `zero`: 0 at run time, per_split < 2^62, but not to the compilers) keeps it above them. Elsewhere `zero`
  // is a constant 0 and the code is as before (the same dependency there: 0-4 % slower, bench/RESULTS.md).
  const uint32_t zero = kPairs ? static_cast<uint32_t>(per_split >> 62) : 0u;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};

  // Steps whose four blocks are all in the split. In tile order an int: x's copy in shared memory bounds
  // nb to a few thousand blocks here (gemv_supported), and 64-bit counters cost two instructions per compare
  // or add. (Elsewhere int64_t: with int, ptxas moved 8 of those 48 kernels' first use below the loads.)
  using Step = std::conditional_t<kTiled, int, int64_t>;
  const Step steps = static_cast<Step>((end - begin) / kStep);
  const int64_t b0 = begin + c;
  // Block b0 of both rows, and the distance from a step's blocks to the next step's: 4 blocks along the row,
  // or in tile order (begin is a multiple of 8) the next 16 x 4 blocks, so that the warp's loads of a row
  // half-tile are 512 contiguous bytes (at K = 4) rather than 64 bytes from each of 8 rows.
  int64_t si0 = block_index(r0c, b0, a.nb, kTiled || a.tiled);
  int64_t si1 = block_index(r1c, b0, a.nb, kTiled || a.tiled);
  const int64_t step_blocks = a.tiled ? kTileRows * kTileBlocks : kStep;
  const uint32_t* w0 = a.packed + si0 * K;
  const uint32_t* w1 = a.packed + si1 * K;
  // In tile order (kTiled; n % 16 == 0, so no row is clamped) row r1's block is 8 tile rows of 4 blocks
  // after row r0's, and a step 16 x 4 blocks on, both fixed. Their loads then take one pointer each
  // for words and scales with immediate offsets, and one add a half (the generic walk: 4 pointers, 2 adds
  // each a step, and a select on a.tiled).
  constexpr int64_t kRowOffset = 8 * kTileBlocks;
  constexpr int64_t kTileStep = kTileRows * kTileBlocks;
  const uint8_t* s8 = static_cast<const uint8_t*>(a.scales) + si0;  // (E4M4 scales are bytes)
  // This lane's x block in the shared copy: block (mrow, b0) is chunk 4 (mrow nb + b0); four blocks further
  // on (the next step) is always 18 chunks further, gaps included (x_chunk_offset).
  uint32_t my_x = xs + static_cast<uint32_t>(x_chunk_offset(4 * ((diag ? mrow : 0) * a.nb + b0)));
  constexpr uint32_t kXStep = 16 * (4 * kStep + kStep / 2);
  // Weights and stored scales go through registers in two halves of kBatch steps. Every global load of the
  // warp signals one scoreboard, and the first use of any loaded register waits until all of the warp's loads
  // in flight have landed: so the next half's loads are issued only after the first use of this half's
  // words (its first step's pair indices), and the whole of this half's arithmetic hides their latency.
  uint32_t wr0[2 * kBatch][K], wr1[2 * kBatch][K];
  uint32_t sc0[2 * kBatch], sc1[2 * kBatch];
  auto issue = [&](int i) {
    load_words_stream<K>(w0, wr0[i]);
    load_words_stream<K>(w1, wr1[i]);
    sc0[i] = load_scale(kE4M4, a.fmt, a.scales, si0);
    sc1[i] = load_scale(kE4M4, a.fmt, a.scales, si1);
    w0 += step_blocks * K;
    w1 += step_blocks * K;
    si0 += step_blocks;
    si1 += step_blocks;
  };
  // Step j of the next kBatch into ring slot `slot` (kTiled: the pointers move by a whole half, advance()).
  auto issue_fixed = [&](int slot, int j) {
    const uint32_t* p = w0 + j * kTileStep * K;
    load_words_stream<K>(p, wr0[slot]);
    load_words_stream<K>(p + kRowOffset * K, wr1[slot]);
    if constexpr (kE4M4) {
      sc0[slot] = s8[j * kTileStep];
      sc1[slot] = s8[j * kTileStep + kRowOffset];
    } else {
      sc0[slot] = read_scale(a.fmt, a.scales, si0 + j * kTileStep);
      sc1[slot] = read_scale(a.fmt, a.scales, si0 + j * kTileStep + kRowOffset);
    }
  };
  auto advance = [&] {
    w0 += kBatch * kTileStep * K;
    s8 += kBatch * kTileStep;
    si0 += kBatch * kTileStep;
  };
  if constexpr (kTiled) {
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      if (i < steps) issue_fixed(i, i);
    }
    advance();
  } else {
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      if (i < steps) issue(i);
    }
  }
  uint32_t xw[16];  // the x operand: x on this lane's block, or zeros off the diagonal (set once)
#pragma unroll
  for (int v = 0; v < 16; ++v) xw[v] = 0u;
  // The steps of one half (h: ring slots kBatch h ..), the first of which is step s.
  auto run_half = [&](int h, Step s) {
    uint32_t q0[4], q1[4];
    pair_indices<K, kPairs>(wr0[kBatch * h], q0);  // the first use: waits for this half's loads only
    pair_indices<K, kPairs>(wr1[kBatch * h], q1);
    // An empty statement that takes the indices in and out, kept before the (volatile) loads: without it
    // the compiler moves the first use below them (or, with input-only operands, recomputes the indices
    // there at K = 2), and the wait then covers the next half's loads too (tests/test_gemv_schedule.py).
    asm volatile(""
                 : "+r"(q0[0]), "+r"(q0[1]), "+r"(q0[2]), "+r"(q0[3]), "+r"(q1[0]), "+r"(q1[1]), "+r"(q1[2]),
                   "+r"(q1[3]));
    if (s + kBatch + static_cast<Step>(q0[0] & zero) < steps) {  // a branch: the loads stay below the wait
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        if (s + kBatch + i < steps) {
          if constexpr (kTiled) {
            issue_fixed(kBatch * (1 - h) + i, i);
          } else {
            issue(kBatch * (1 - h) + i);
          }
        }
      }
      if constexpr (kTiled) advance();
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      if (s + i >= steps) break;
      const int slot = kBatch * h + i;
      // Lanes off the diagonal load nothing (a predicated-off lane costs no wavefront) and keep zeros.
      if (diag) {
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const uint4 q = load_shared_u128(my_x + 16 * v);
          xw[4 * v] = q.x, xw[4 * v + 1] = q.y, xw[4 * v + 2] = q.z, xw[4 * v + 3] = q.w;
        }
      }
      my_x += kXStep;
      if (i == 0) {
        compute_indexed<kBf16, K, M, kE4M4>(q0, q1, sc0[slot], sc1[slot], xw, true, a.fmt, t, pair_offset,
                                            scale_offset, acc);
      } else {
        compute_step<kBf16, K, M, kE4M4, kPairs>(wr0[slot], wr1[slot], sc0[slot], sc1[slot], xw, true, a.fmt,
                                                 t, pair_offset, scale_offset, acc);
      }
    }
  };
  for (Step base = 0; base < steps; base += 2 * kBatch) {
    run_half(0, base);
    if (base + kBatch < steps) run_half(1, base + kBatch);
  }
  const int64_t rest = end - begin - static_cast<int64_t>(steps) * kStep;
  if (rest > 0) {  // a last step with blocks past `end`: those lanes read a valid block, scale 0, x zeros
    // (never in tile order: nb is a multiple of 4 there, and so is every split's length)
    const bool valid = c < rest;
    const int64_t b = valid ? begin + static_cast<int64_t>(steps) * kStep + c : end - 1;
    uint32_t u0[K], u1[K], xw[16];  // (its own xw: x of a partial step is zeros past `end`)
    const int64_t i0 = block_index(r0c, b, a.nb, a.tiled), i1 = block_index(r1c, b, a.nb, a.tiled);
    load_words<K>(a.packed + i0 * K, u0);
    load_words<K>(a.packed + i1 * K, u1);
    if (valid && diag) {
      read_x(reinterpret_cast<const uint4*>(a.x + mrow * ldx + b * kBlock), xw);
    } else {
#pragma unroll
      for (int v = 0; v < 16; ++v) xw[v] = 0u;
    }
    compute_step<kBf16, K, M, kE4M4, kPairs>(u0, u1, load_scale(kE4M4, a.fmt, a.scales, i0),
                                             load_scale(kE4M4, a.fmt, a.scales, i1), xw, valid, a.fmt, t,
                                             pair_offset, scale_offset, acc);
  }
  // The four lanes of a quad hold four different blocks of the same rows: add them (fixed order).
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    acc[e] += __shfl_xor_sync(kFull, acc[e], 1);
    acc[e] += __shfl_xor_sync(kFull, acc[e], 2);
  }
  if (to_slot) {
    // The CTA adds the splits up (add_group): this item's 16 x M sums go to the warp's slot.
    if (c == 0) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if ((e & 1) < M) slot[(e < 2 ? g : g + 8) * M + (e & 1)] = acc[e];
      }
    }
    return;
  }
  if (c != 0) return;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int m = e & 1;
    const int64_t r = e < 2 ? r0 : r1;
    if (m >= M || m >= a.m || r >= a.n) continue;
    if (splits == 1) {
      a.out[m * a.n + r] = to_16<kBf16>(acc[e]);
    } else {
      partial[(split * a.m + m) * a.n + r] = acc[e];
    }
  }
}

// The last step of a split reduction summed inside the CTA: tile j of the group (tiles_per_cta at most) had
// its split s computed by warp j * splits + s, whose sums are in that warp's slot. Thread i adds output i's
// splits in split order, which is sum_splits_kernel's order: the same bits either way.
template <bool kBf16, int M>
__device__ __noinline__ void add_group(const MatmulArgs a, const float* slots, int64_t first_tile,
                                       int tiles_here, int splits) {
  const int i = threadIdx.x;
  if (i >= tiles_here * 16 * M) return;
  const int j = i / (16 * M);
  const int within = i % (16 * M);  // row * M + m, the slot layout of gemv_item
  const int64_t r = (first_tile + j) * 16 + within / M;
  const int m = within % M;
  float s = 0.0f;
  for (int p = 0; p < splits; ++p) {
    const float v = slots[(j * splits + p) * 16 * M + within];
    s = p == 0 ? v : s + v;  // partial 0 itself, not 0 + partial 0 (-0 stays -0)
  }
  if (m < a.m && r < a.n) a.out[m * a.n + r] = to_16<kBf16>(s);
}

// Persistent CTAs: each copies x and builds its tables once, then its warps take (tile, split) items. With
// tiles_per_cta == 0 item w * gridDim.x + blockIdx.x is warp w's first and partial sums, if any, go to the
// workspace. Otherwise CTA b takes the groups of tiles_per_cta tiles b, b + gridDim.x, ...: warp w computes
// split w % splits of the group's tile w / splits and the CTA adds the splits (add_group), with no workspace
// round trip and no second kernel. The two ways are two kernels (kInCta), so that each inlines gemv_item
// once.
template <bool kBf16, int K, int M, bool kE4M4, bool kTiled, bool kInCta>
__global__ void __launch_bounds__(kGvThreads, 1)
    gemv_kernel(MatmulArgs a, int64_t tiles, int64_t splits, int64_t per_split, float* __restrict__ partial,
                int tiles_per_cta, uint32_t smem_bytes) {
  extern __shared__ uint4 gv_smem[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const float t = a.tensor_scale[0];
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(gv_smem));
  const uint32_t tables = (base + 0xffffu) & ~0xffffu;
  // The region (x, then the slots): below the tables if it fits there, else above them.
  const uint32_t region_size = static_cast<uint32_t>(region_bytes(M, a.nb));
  const uint32_t region = tables - base >= region_size ? base : tables + kTableBytes;
  if (region + region_size > base + smem_bytes) __trap();  // impossible by gemv_smem_bytes' arithmetic
  char* smem = reinterpret_cast<char*>(gv_smem);
  {
    // The copy of x: chunk q of M rows of nb blocks (4 chunks a block), x_chunk_offset apart.
    const uint4* xg = reinterpret_cast<const uint4*>(a.x);
    const int64_t chunks = M * a.nb * 4;
    for (int64_t q = threadIdx.x; q < chunks; q += kGvThreads) {
      *reinterpret_cast<uint4*>(smem + (region - base) + x_chunk_offset(q)) = xg[q];
    }
  }
  build_gemv_tables<kBf16, K>(a.codebook, a.fmt, t, gv_smem + (tables - base) / 16);
  float* slots = reinterpret_cast<float*>(smem + (region - base) + x_copy_bytes(M, a.nb));
  float* slot = slots + warp * 16 * M;
  __syncthreads();
  if constexpr (!kInCta) {
    for (int64_t item = static_cast<int64_t>(warp) * gridDim.x + blockIdx.x; item < tiles * splits;
         item += static_cast<int64_t>(gridDim.x) * kGvWarps) {
      gemv_item<kBf16, K, M, kE4M4, kTiled>(a, t, tiles, splits, per_split, partial, item, lane, tables,
                                            region, slot, false);
    }
  } else {
    // The loop's exit depends on the block alone: every thread reaches the same barriers.
    const int64_t groups = (tiles + tiles_per_cta - 1) / tiles_per_cta;
    for (int64_t group = blockIdx.x; group < groups; group += gridDim.x) {
      const int64_t tile = group * tiles_per_cta + warp / splits;
      if (warp < tiles_per_cta * splits && tile < tiles) {
        gemv_item<kBf16, K, M, kE4M4, kTiled>(a, t, tiles, splits, per_split, partial,
                                              (warp % splits) * tiles + tile, lane, tables, region, slot,
                                              true);
      }
      __syncthreads();  // every split's sums are in place
      const int64_t first = group * tiles_per_cta;
      const int here = static_cast<int>(tiles - first < tiles_per_cta ? tiles - first : tiles_per_cta);
      add_group<kBf16, M>(a, slots, first, here, static_cast<int>(splits));
      __syncthreads();  // and read before the slots take the next group's sums
    }
  }
}

// How launch_gemv lays a product of n outputs (count = m n of them in all) over nb blocks out on
// resident_ctas CTAs (one per SM): the split of the reduction, whether the CTAs add the splits up, the grid.
struct GemvPlan {
  int64_t tiles, splits, per_split;
  int tiles_per_cta;  // > 0: each CTA adds its tiles' splits up (gemv_kernel<..., true>)
  unsigned ctas;
};

inline GemvPlan plan_gemv(int64_t n, int64_t nb, int64_t count, int64_t workspace_floats,
                          int64_t resident_ctas) {
  const int64_t resident_warps = resident_ctas * kGvWarps;
  const int64_t tiles = (n + 15) / 16;
  // Once the tiles alone keep half the resident warps busy, one split (no partial sums, no second kernel,
  // one pipeline fill per tile) beats choose_split's latency model, which counts only rounds of items:
  // on the H200 (bench/RESULTS.md, eighth and ninth sessions) the kernel time fell 8 % at 8192 x 28672 and
  // 20 % at 2048 x 32000, while with a sixth of the warps (8192 x 8192, 28672 x 8192) splitting still pays.
  constexpr int64_t kChunk = 2 * kStep;
  const auto [splits, per_split] =
      2 * tiles >= resident_warps
          ? Split{1, (nb + kChunk - 1) / kChunk * kChunk}
          : choose_split(nb, tiles, resident_warps, kChunk, splits_that_fit(workspace_floats, count));
  // A split reduction whose tiles, a few per CTA, fit one round of CTAs is added up inside each CTA (the
  // tenth session's probe put the workspace round trip and second kernel at 1.3 of a decode product's
  // 5.5 µs); the rest, split into more parts than a CTA has warps or with too many tiles, keep them.
  int tiles_per_cta = 0;
  if (splits > 1 && splits <= kGvWarps) {
    const int64_t per_cta = std::max<int64_t>(
        1, std::min<int64_t>(kGvWarps / splits, (tiles + resident_ctas - 1) / resident_ctas));
    if ((tiles + per_cta - 1) / per_cta <= resident_ctas) tiles_per_cta = static_cast<int>(per_cta);
  }
  // Items go round the CTAs (item i to CTA i % ctas), so that a small product (a decode layer: a few
  // hundred items) runs on every SM rather than packed kGvWarps to an SM on a few of them.
  const int64_t units = tiles_per_cta > 0 ? (tiles + tiles_per_cta - 1) / tiles_per_cta : tiles * splits;
  return {tiles, splits, per_split, tiles_per_cta,
          static_cast<unsigned>(std::min<int64_t>(units, resident_ctas))};
}

// The most dynamic shared memory a CTA may ask for on this device (0 if the query fails).
int smem_optin() { return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(); }

template <bool kBf16, int K, int M, bool kE4M4, bool kTiled>
ffi::Error launch_gemv(cudaStream_t stream, const MatmulArgs& a) {
  auto* kernel = gemv_kernel<kBf16, K, M, kE4M4, kTiled, false>;
  auto* cta_kernel = gemv_kernel<kBf16, K, M, kE4M4, kTiled, true>;
  // Both kernels are opted in to the most the device allows once; each launch asks for what x's size needs.
  const int optin = smem_optin();
  const int64_t smem = gemv_smem_bytes(M, a.nb);
  static DeviceCache cache{}, cta_cache{};
  const int per_sm = occupancy(cache, kernel, kGvThreads, optin);
  if (smem > optin) {  // gemv_supported said no: the matmul handler does not call this then
    return ffi::Error(ffi::ErrorCode::kInternal, "jax_kbit: gemv: x does not fit the kernel's shared memory");
  }
  if (per_sm < 1 || occupancy(cta_cache, cta_kernel, kGvThreads, optin) != per_sm) {
    return launch_error("gemv shared memory attribute or occupancy query");
  }
  const int64_t sms = sm_count() > 0 ? sm_count() : 132;
  const int64_t count = a.m * a.n;
  const GemvPlan p = plan_gemv(a.n, a.nb, count, a.workspace_floats, sms * per_sm);
  float* partial = p.splits > 1 && p.tiles_per_cta == 0 ? a.workspace : nullptr;
  (p.tiles_per_cta > 0 ? cta_kernel : kernel)<<<p.ctas, kGvThreads, static_cast<size_t>(smem), stream>>>(
      a, p.tiles, p.splits, p.per_split, partial, p.tiles_per_cta, static_cast<uint32_t>(smem));
  if (partial != nullptr) launch_sum_splits<kBf16>(stream, partial, p.splits, count, a.out);
  return launch_error("gemv");
}

}  // namespace

bool gemv_supported(int k, int64_t m, int64_t nb) {
  if (k < 2 || k > 4 || m < 1 || m > 2) return false;
  return smem_optin() >= gemv_smem_bytes(m, nb);
}

ffi::Error run_gemv(cudaStream_t stream, const MatmulArgs& a, bool bf16, int k) {
  ffi::Error result = ffi::Error::Success();
  const bool e4m4 = a.fmt == ScaleFormat::kE4M4;
  auto go = [&](auto bf, auto kc, auto mc) {
    constexpr bool B = decltype(bf)::value;
    constexpr int K = decltype(kc)::value;
    constexpr int M = decltype(mc)::value;
    // Tile order takes the kernels with the fixed walk, except K = 4 plane words (the _tiled targets of
    // modules exported before pair words), which the kTiled kernels would read as pair words.
    if (a.tiled && (K != 4 || a.pairs)) {
      result =
          e4m4 ? launch_gemv<B, K, M, true, true>(stream, a) : launch_gemv<B, K, M, false, true>(stream, a);
      return;
    }
    result =
        e4m4 ? launch_gemv<B, K, M, true, false>(stream, a) : launch_gemv<B, K, M, false, false>(stream, a);
  };
  auto by_k = [&](auto bf, auto mc) {
    switch (k) {
      case 2: go(bf, std::integral_constant<int, 2>{}, mc); break;
      case 3: go(bf, std::integral_constant<int, 3>{}, mc); break;
      default: go(bf, std::integral_constant<int, 4>{}, mc); break;
    }
  };
  auto by_m = [&](auto bf) {
    if (a.m == 1) {
      by_k(bf, std::integral_constant<int, 1>{});
    } else {
      by_k(bf, std::integral_constant<int, 2>{});
    }
  };
  if (bf16) {
    by_m(std::true_type{});
  } else {
    by_m(std::false_type{});
  }
  return result;
}

}  // namespace cuda
}  // namespace kbit
