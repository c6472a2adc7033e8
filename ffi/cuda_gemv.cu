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
// The weights, scales and x stream in kStages steps ahead of the arithmetic (cp.async into a shared-memory
// buffer per warp): at batch 1 the kernel is a race against memory latency, and the steps in flight per SM
// must cover it.
#include "cuda_gemv.h"
#include "cuda_mma.cuh"

namespace kbit {
namespace cuda {
namespace {

constexpr int kGvWarps = 24;  // one CTA per SM (80 registers a thread) sharing one copy of the tables
constexpr int kGvThreads = kGvWarps * 32;
constexpr int kStep = 4;  // blocks per warp step, one per lane column; splits are whole pairs of steps
// The tables: 256 rows of 256 bytes. Row e holds pair-table entry e in bytes [0, 128) and the decoded e4m4
// scale e in bytes [128, 256), each replicated once per lane so that lane l always reads bank l. They start
// at a shared address whose low 16 bits are zero, so that one byte permute of (pair index, lane's address)
// is the whole address of a lookup (the space that alignment leaves free holds the warps' staging buffers).
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
// (K = 4) shift / logic operations. At K = 2 bits 4..7 of a byte are another pair's: the table repeats its
// 16 entries over all 256 rows so they do not matter.
template <int K>
__device__ __forceinline__ void pair_indices(const uint32_t (&w)[K], uint32_t (&p)[4]) {
  const uint32_t a = (w[0] & 0x33333333u) | ((w[1] << 2) & 0xccccccccu);
  const uint32_t b = ((w[0] >> 2) & 0x33333333u) | (w[1] & 0xccccccccu);
  if constexpr (K == 2) {
    p[0] = a, p[1] = b, p[2] = a >> 4, p[3] = b >> 4;
  } else {
    uint32_t c, d;  // planes 2 (and 3) in the same nibble layout
    if constexpr (K == 3) {
      c = w[2] & 0x33333333u;
      d = (w[2] >> 2) & 0x33333333u;
    } else {
      c = (w[2] & 0x33333333u) | ((w[3] << 2) & 0xccccccccu);
      d = ((w[2] >> 2) & 0x33333333u) | (w[3] & 0xccccccccu);
    }
    p[0] = (a & 0x0f0f0f0fu) | ((c << 4) & 0xf0f0f0f0u);
    p[1] = (b & 0x0f0f0f0fu) | ((d << 4) & 0xf0f0f0f0u);
    p[2] = ((a >> 4) & 0x0f0f0f0fu) | (c & 0xf0f0f0f0u);
    p[3] = ((b >> 4) & 0x0f0f0f0fu) | (d & 0xf0f0f0f0u);
  }
}

// The eight mmas of one step and the rescale of this lane's block sums into acc (row r0: acc[0] for x row 0,
// acc[1] for x row 1; row r1: acc[2], acc[3]). w0, w1: the K words of this lane's block in rows r0, r1;
// s0, s1: their stored scales; xw: the x operand (x on this lane's block, or zeros off the diagonal).
// `valid` is false for a block past the end of the split.
template <bool kBf16, int K, int M, bool kE4M4>
__device__ __forceinline__ void compute_step(const uint32_t (&w0)[K], const uint32_t (&w1)[K], uint32_t s0s,
                                             uint32_t s1s, const uint32_t (&xw)[16], bool valid,
                                             ScaleFormat fmt, float t, uint32_t pair_offset,
                                             uint32_t scale_offset, float (&acc)[4]) {
  float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  uint32_t q0[4], q1[4];
  pair_indices<K>(w0, q0);
  pair_indices<K>(w1, q1);
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

__device__ __forceinline__ uint32_t load_scale(bool e4m4, ScaleFormat fmt, const void* scales, int64_t i) {
  return e4m4 ? static_cast<const uint8_t*>(scales)[i] : read_scale(fmt, scales, i);
}

// Asynchronous global -> shared copies (cp.async, sm_80+): the weights bypass L1 (read once), x stays in it
// (every warp of the SM reads the same x).
__device__ __forceinline__ void copy_16_global(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void copy_16_cached(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void copy_8(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void copy_4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void copy_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void copy_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

// One lane's K words of one block, global -> shared.
template <int K>
__device__ __forceinline__ void copy_words(uint32_t dst, const uint32_t* src) {
  if constexpr (K == 4) {
    copy_16_global(dst, src);
  } else if constexpr (K == 2) {
    copy_8(dst, src);
  } else {
#pragma unroll
    for (int j = 0; j < K; ++j) copy_4(dst + 4 * j, src + j);
  }
}

__device__ __forceinline__ void read_x(const uint4* p, uint32_t (&xw)[16]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 v = p[i];
    xw[4 * i] = v.x, xw[4 * i + 1] = v.y, xw[4 * i + 2] = v.z, xw[4 * i + 3] = v.w;
  }
}

// The staging of one warp step in shared memory: the K words of every lane's block in rows r0 (lane order),
// then in rows r1, then x on the step's four blocks (block c, x row m at (c M + m) 64 bytes). Each lane reads
// back only what it copied itself, so waiting for its own copies is all the synchronisation needed.
template <int K, int M>
struct Stage {
  static constexpr int kWords1 = 32 * K * 4;  // bytes: rows r1 start here
  static constexpr int kX = 2 * kWords1;
  static constexpr int kBytes = kX + 4 * M * kBlock * 2;
};
constexpr int kStages = 4;  // steps in flight per warp: enough bytes in flight to cover the memory latency

__host__ __device__ constexpr int warp_buffer_bytes(int k, int m) {
  return kStages * (2 * 32 * k * 4 + 4 * m * kBlock * 2);
}

// Dynamic shared memory the kernel asks for: the 64 KB tables, 64 KB-aligned, and one warp buffer per warp in
// the space around them. Whatever the base address, the gaps below and above the tables hold at least
// kGvWarps whole buffers when they sum to (kGvWarps + 2) buffers (and the upper gap is never negative).
__host__ __device__ constexpr int gemv_smem_bytes(int k, int m) {
  const int buffers = (kGvWarps + 2) * warp_buffer_bytes(k, m);
  return kTableBytes + (buffers > kTableBytes ? buffers : kTableBytes);
}
static_assert(kStages * Stage<4, 2>::kBytes == warp_buffer_bytes(4, 2), "warp buffer layout");

// One work item of one warp: output rows [16 tile, 16 tile + 16), blocks [begin, end) of split `split`.
// buffer: the shared address of this warp's kStages stages; local: the same, as a generic pointer.
template <bool kBf16, int K, int M, bool kE4M4>
__device__ __forceinline__ void gemv_item(const MatmulArgs& a, float t, int64_t tiles, int64_t splits,
                                          int64_t per_split, float* __restrict__ partial, int64_t item,
                                          int lane, uint32_t tables, uint32_t buffer, char* local, bool wide,
                                          bool to_slot) {
  using St = Stage<K, M>;
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
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};

  const int64_t steps = (end - begin) / kStep;  // steps whose four blocks are all in the split
  const int64_t b0 = begin + c;
  const uint32_t* w0 = a.packed + (r0c * a.nb + b0) * K;
  const uint32_t* w1 = a.packed + (r1c * a.nb + b0) * K;
  int64_t si0 = r0c * a.nb + b0;
  int64_t si1 = r1c * a.nb + b0;
  const uint16_t* xg = a.x + (diag ? mrow * ldx + b0 * kBlock : 0);
  const uint32_t my_w0 = static_cast<uint32_t>(lane) * K * 4;
  const uint32_t my_w1 = St::kWords1 + my_w0;
  const uint32_t my_x = St::kX + static_cast<uint32_t>(c * M + (diag ? mrow : 0)) * kBlock * 2;
  // The stored scales go through registers, a ring of kStages loaded as far ahead as the stages.
  uint32_t sc0[kStages], sc1[kStages];
  // Step `s` of this item into stage `i` (s's copies are one commit group; x only by lanes on the diagonal).
  auto issue = [&](int i) {
    const uint32_t stage = buffer + i * St::kBytes;
    if (K == 3 && wide) {
      // A quad's four blocks are 48 contiguous bytes (16-byte aligned: see launch_gemv), in its lanes' order
      // in the stage too: three 16-byte copies instead of twelve 4-byte ones. Lane c copies bytes
      // [16c, 16c + 16) of the quad's run, which start at its own words + 4c bytes.
      if (c < 3) {
        copy_16_global(stage + my_w0 + 4 * c, w0 + c);
        copy_16_global(stage + my_w1 + 4 * c, w1 + c);
      }
    } else {
      copy_words<K>(stage + my_w0, w0);
      copy_words<K>(stage + my_w1, w1);
    }
    if (diag) {
#pragma unroll
      for (int v = 0; v < 4; ++v) copy_16_cached(stage + my_x + 16 * v, xg + 8 * v);
    }
    sc0[i] = load_scale(kE4M4, a.fmt, a.scales, si0);
    sc1[i] = load_scale(kE4M4, a.fmt, a.scales, si1);
    w0 += kStep * K;
    w1 += kStep * K;
    si0 += kStep;
    si1 += kStep;
    xg += kStep * kBlock;
  };
#pragma unroll
  for (int i = 0; i < kStages; ++i) {
    if (i < steps) issue(i);
    copy_commit();  // empty groups too: the wait below counts groups
  }
  uint32_t xw[16];  // the x operand: x on this lane's block, or zeros off the diagonal (set once)
#pragma unroll
  for (int v = 0; v < 16; ++v) xw[v] = 0u;
  for (int64_t base = 0; base < steps; base += kStages) {
#pragma unroll
    for (int i = 0; i < kStages; ++i) {
      if (base + i >= steps) break;
      copy_wait<kStages - 1>();          // step base + i has landed
      if (K == 3 && wide) __syncwarp();  // and its quad neighbours' copies of this lane's words too
      const char* stage = local + i * St::kBytes;
      uint32_t u0[K], u1[K];
      load_words<K>(reinterpret_cast<const uint32_t*>(stage + my_w0), u0);
      load_words<K>(reinterpret_cast<const uint32_t*>(stage + my_w1), u1);
      // Lanes off the diagonal load nothing (a predicated-off lane costs no wavefront) and keep zeros.
      if (diag) read_x(reinterpret_cast<const uint4*>(stage + my_x), xw);
      compute_step<kBf16, K, M, kE4M4>(u0, u1, sc0[i], sc1[i], xw, true, a.fmt, t, pair_offset, scale_offset,
                                       acc);
      // The stage is free once its words are in registers and used (the mmas above consumed them).
      if (K == 3 && wide) __syncwarp();  // the quad has read the stage before any lane refills it
      if (base + i + kStages < steps) issue(i);
      copy_commit();
    }
  }
  copy_wait<0>();
  const int64_t rest = end - begin - steps * kStep;
  if (rest > 0) {  // a last step with blocks past `end`: those lanes read a valid block, scale 0, x zeros
    const bool valid = c < rest;
    const int64_t b = valid ? begin + steps * kStep + c : end - 1;
    uint32_t u0[K], u1[K], xw[16];  // (its own xw: x of a partial step is zeros past `end`)
    load_words<K>(a.packed + (r0c * a.nb + b) * K, u0);
    load_words<K>(a.packed + (r1c * a.nb + b) * K, u1);
    if (valid && diag) {
      read_x(reinterpret_cast<const uint4*>(a.x + mrow * ldx + b * kBlock), xw);
    } else {
#pragma unroll
      for (int v = 0; v < 16; ++v) xw[v] = 0u;
    }
    compute_step<kBf16, K, M, kE4M4>(u0, u1, load_scale(kE4M4, a.fmt, a.scales, r0c * a.nb + b),
                                     load_scale(kE4M4, a.fmt, a.scales, r1c * a.nb + b), xw, valid, a.fmt, t,
                                     pair_offset, scale_offset, acc);
  }
  // The four lanes of a quad hold four different blocks of the same rows: add them (fixed order).
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    acc[e] += __shfl_xor_sync(kFull, acc[e], 1);
    acc[e] += __shfl_xor_sync(kFull, acc[e], 2);
  }
  if (to_slot) {
    // The CTA adds the splits up (add_group): this item's 16 x M sums go to the start of the warp's own
    // buffer, free once every lane's copies have landed (copy_wait above) and every lane has passed here.
    __syncwarp();
    if (c == 0) {
      float* slot = reinterpret_cast<float*>(local);
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
// its split s computed by warp j * splits + s, whose sums are at the start of that warp's buffer. Thread i
// adds output i's splits in split order, which is sum_splits_kernel's order: the same bits either way.
template <bool kBf16, int M>
__device__ __noinline__ void add_group(const MatmulArgs a, const char* smem, uint32_t below,
                                       uint32_t buf_bytes, uint32_t table_end, int64_t first_tile,
                                       int tiles_here, int splits) {
  const int i = threadIdx.x;
  if (i >= tiles_here * 16 * M) return;
  const int j = i / (16 * M);
  const int within = i % (16 * M);  // row * M + m, the slot layout of gemv_item
  const int64_t r = (first_tile + j) * 16 + within / M;
  const int m = within % M;
  float s = 0.0f;
  for (int p = 0; p < splits; ++p) {
    const uint32_t w = static_cast<uint32_t>(j * splits + p);
    // The kernel's placement of warp w's buffer (gemv_kernel: below the tables, then above them).
    const uint32_t offset = w < below ? w * buf_bytes : table_end + (w - below) * buf_bytes;
    const float v = reinterpret_cast<const float*>(smem + offset)[within];
    s = p == 0 ? v : s + v;  // partial 0 itself, not 0 + partial 0 (-0 stays -0)
  }
  if (m < a.m && r < a.n) a.out[m * a.n + r] = to_16<kBf16>(s);
}

// Persistent CTAs: each builds its tables once, then its warps take (tile, split) items. With
// tiles_per_cta == 0 item w * gridDim.x + blockIdx.x is warp w's first and partial sums, if any, go to the
// workspace. Otherwise CTA b takes the groups of tiles_per_cta tiles b, b + gridDim.x, ...: warp w computes
// split w % splits of the group's tile w / splits and the CTA adds the splits (add_group), with no workspace
// round trip and no second kernel. The two ways are two kernels (kInCta), so that each inlines gemv_item once
// and the first keeps the registers and prologue it had before the second existed.
template <bool kBf16, int K, int M, bool kE4M4, bool kInCta>
__global__ void __launch_bounds__(kGvThreads, 1)
    gemv_kernel(MatmulArgs a, int64_t tiles, int64_t splits, int64_t per_split, float* __restrict__ partial,
                bool wide, int tiles_per_cta) {
  extern __shared__ uint4 gv_smem[];
  constexpr uint32_t kSize = gemv_smem_bytes(K, M);
  constexpr uint32_t kBuf = warp_buffer_bytes(K, M);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const float t = a.tensor_scale[0];
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(gv_smem));
  const uint32_t tables = (base + 0xffffu) & ~0xffffu;
  // This warp's buffer: below the tables while whole buffers fit there, else above them.
  const uint32_t below = (tables - base) / kBuf;
  const uint32_t buffer =
      static_cast<uint32_t>(warp) < below ? base + warp * kBuf : tables + kTableBytes + (warp - below) * kBuf;
  if (buffer + kBuf > base + kSize) __trap();  // impossible by gemv_smem_bytes' arithmetic
  build_gemv_tables<kBf16, K>(a.codebook, a.fmt, t, gv_smem + (tables - base) / 16);
  char* smem = reinterpret_cast<char*>(gv_smem);
  char* local = smem + (buffer - base);
  __syncthreads();
  if constexpr (!kInCta) {
    for (int64_t item = static_cast<int64_t>(warp) * gridDim.x + blockIdx.x; item < tiles * splits;
         item += static_cast<int64_t>(gridDim.x) * kGvWarps) {
      gemv_item<kBf16, K, M, kE4M4>(a, t, tiles, splits, per_split, partial, item, lane, tables, buffer,
                                    local, wide, false);
    }
  } else {
    // The loop's exit depends on the block alone: every thread reaches the same barriers.
    const int64_t groups = (tiles + tiles_per_cta - 1) / tiles_per_cta;
    for (int64_t group = blockIdx.x; group < groups; group += gridDim.x) {
      const int64_t tile = group * tiles_per_cta + warp / splits;
      if (warp < tiles_per_cta * splits && tile < tiles) {
        gemv_item<kBf16, K, M, kE4M4>(a, t, tiles, splits, per_split, partial, (warp % splits) * tiles + tile,
                                      lane, tables, buffer, local, wide, true);
      }
      __syncthreads();  // every split's sums are in place
      const int64_t first = group * tiles_per_cta;
      const int here = static_cast<int>(tiles - first < tiles_per_cta ? tiles - first : tiles_per_cta);
      add_group<kBf16, M>(a, smem, below, kBuf, tables + kTableBytes - base, first, here,
                          static_cast<int>(splits));
      __syncthreads();  // and read before the buffers take the next group's steps
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
  // hundred items) runs on every SM rather than packed 24 to an SM on a few of them.
  const int64_t units = tiles_per_cta > 0 ? (tiles + tiles_per_cta - 1) / tiles_per_cta : tiles * splits;
  return {tiles, splits, per_split, tiles_per_cta,
          static_cast<unsigned>(std::min<int64_t>(units, resident_ctas))};
}

template <bool kBf16, int K, int M, bool kE4M4>
ffi::Error launch_gemv(cudaStream_t stream, const MatmulArgs& a) {
  auto* kernel = gemv_kernel<kBf16, K, M, kE4M4, false>;
  auto* cta_kernel = gemv_kernel<kBf16, K, M, kE4M4, true>;
  constexpr int kGvSmem = gemv_smem_bytes(K, M);
  static DeviceCache cache{}, cta_cache{};
  const int per_sm = occupancy(cache, kernel, kGvThreads, kGvSmem);  // opts in to kGvSmem (> 48 KB) first
  if (per_sm < 1 || occupancy(cta_cache, cta_kernel, kGvThreads, kGvSmem) != per_sm) {
    return launch_error("gemv shared memory attribute or occupancy query");
  }
  const int64_t sms = sm_count() > 0 ? sm_count() : 132;
  const int64_t count = a.m * a.n;
  const GemvPlan p = plan_gemv(a.n, a.nb, count, a.workspace_floats, sms * per_sm);
  float* partial = p.splits > 1 && p.tiles_per_cta == 0 ? a.workspace : nullptr;
  // K = 3: a quad's blocks start 16-byte aligned when every row and split does (nb and the splits' starts
  // multiples of 4 blocks: choose_split's parts are whole chunks of 8) and the weights do.
  const bool wide = K == 3 && a.nb % 4 == 0 && reinterpret_cast<uintptr_t>(a.packed) % 16 == 0;
  (p.tiles_per_cta > 0 ? cta_kernel : kernel)<<<p.ctas, kGvThreads, kGvSmem, stream>>>(
      a, p.tiles, p.splits, p.per_split, partial, wide, p.tiles_per_cta);
  if (partial != nullptr) launch_sum_splits<kBf16>(stream, partial, p.splits, count, a.out);
  return launch_error("gemv");
}

}  // namespace

bool gemv_supported(int k, int64_t m) {
  if (k < 2 || k > 4 || m < 1 || m > 2) return false;
  static DeviceCache cache{};
  const int optin = per_device(cache, [] {
    int device = 0, bytes = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
      return 0;
    }
    return bytes;
  });
  return optin >= gemv_smem_bytes(k, static_cast<int>(m));
}

ffi::Error run_gemv(cudaStream_t stream, const MatmulArgs& a, bool bf16, int k) {
  ffi::Error result = ffi::Error::Success();
  const bool e4m4 = a.fmt == ScaleFormat::kE4M4;
  auto go = [&](auto bf, auto kc, auto mc) {
    constexpr bool B = decltype(bf)::value;
    constexpr int K = decltype(kc)::value;
    constexpr int M = decltype(mc)::value;
    result = e4m4 ? launch_gemv<B, K, M, true>(stream, a) : launch_gemv<B, K, M, false>(stream, a);
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
