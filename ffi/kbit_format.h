// The k-bit format v1 (docs/FORMAT.md): every piece of arithmetic that decides
// a stored bit lives here, shared by the CPU and CUDA handlers so the two
// cannot drift. Only integer tricks and IEEE float32 operations that are
// correctly rounded on both sides are used (no intrinsics whose rounding might
// differ, no fused multiply-add).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

#if defined(__CUDACC__)
#define KBIT_HD __host__ __device__ __forceinline__
#else
#define KBIT_HD inline
#endif

namespace kbit {

constexpr int kBlock = 32;
constexpr int kMinK = 2;
constexpr int kMaxK = 5;

enum class ScaleFormat : int32_t { kE4M4 = 0, kF16 = 1, kF32 = 2 };

// The tiled storage of a matrix (docs/FORMAT.md, "Tiled matrices"): the blocks of W^T [n, nb] in the order
// [n / 16, nb / 4, 16, 4], so that the 16 rows x 4 blocks that the batch-1 kernel reads in one warp step are
// one contiguous run (1 KB at K = 4) instead of 16 pieces 4 KB apart. Words and scales follow their blocks.
// Only for n % 16 == 0 and nb % 4 == 0 (the matmul handlers check).
constexpr int kTileRows = 16;
constexpr int kTileBlocks = 4;

// Where block b of a row is stored relative to the row's block 0 (block_index(row, 0, ...)): the same for
// every row, so a loop over blocks or rows can add the two parts instead of dividing per block.
KBIT_HD int64_t block_offset(int64_t b, bool tiled) {
  const uint64_t u = static_cast<uint64_t>(b);  // b >= 0: unsigned division is a shift
  return tiled ? static_cast<int64_t>((u / kTileBlocks) * (kTileRows * kTileBlocks) + u % kTileBlocks) : b;
}

// Where block b of row `row` is stored: its index into the [n, nb] scales (times K: into the words).
KBIT_HD int64_t block_index(int64_t row, int64_t b, int64_t nb, bool tiled) {
  if (!tiled) return row * nb + b;
  return ((row / kTileRows) * (nb / kTileBlocks) + b / kTileBlocks) * (kTileRows * kTileBlocks) +
         (row % kTileRows) * kTileBlocks + b % kTileBlocks;
}

// At K = 4 a tiled block's four words are not bit planes but pair indices (docs/FORMAT.md, "Tiled
// matrices"; the handlers of the `_tiled_v2` targets; the `_tiled` ones, which modules exported earlier call,
// read plane words): bit 8q + 2j + r of word c holds bit j of the code of element 8q + 2c + r. Byte q of word
// c is then the 8-bit index of the pair of elements 8q + 2c, 8q + 2c + 1, which is what the kernels look
// values up by, so the batch-1 kernel skips rebuilding them from the planes (32 shift / mask operations of
// its step; 5-13 % of its time at the large shapes, bench/RESULTS.md, nineteenth session). Other K keep plane
// words.
KBIT_HD constexpr bool stores_pairs(int k, bool tiled) { return tiled && k == 4; }

// Planes <-> pair indices of one K = 4 block: in every byte position, the 4 x 4 matrix of 2-bit fields
// (word, field) is transposed, so the function is its own inverse.
KBIT_HD void transpose_pair_fields(const uint32_t* w, uint32_t* p) {
  const uint32_t a = (w[0] & 0x33333333u) | ((w[1] << 2) & 0xccccccccu);
  const uint32_t b = ((w[0] >> 2) & 0x33333333u) | (w[1] & 0xccccccccu);
  const uint32_t c = (w[2] & 0x33333333u) | ((w[3] << 2) & 0xccccccccu);
  const uint32_t d = ((w[2] >> 2) & 0x33333333u) | (w[3] & 0xccccccccu);
  p[0] = (a & 0x0f0f0f0fu) | ((c << 4) & 0xf0f0f0f0u);
  p[1] = (b & 0x0f0f0f0fu) | ((d << 4) & 0xf0f0f0f0u);
  p[2] = ((a >> 4) & 0x0f0f0f0fu) | (c & 0xf0f0f0f0u);
  p[3] = ((b >> 4) & 0x0f0f0f0fu) | (d & 0xf0f0f0f0u);
}

// A block's K stored words as bit planes (in place): what every reader of format v1 words expects. pairs:
// the words are pair indices (a layout's `pairs`, true only where stores_pairs holds for a _v2 target).
template <int K>
KBIT_HD void stored_to_planes(uint32_t* w, bool pairs) {
  if constexpr (K == 4) {
    if (pairs) {
      uint32_t p[4];
      transpose_pair_fields(w, p);
      w[0] = p[0], w[1] = p[1], w[2] = p[2], w[3] = p[3];
    }
  }
}

// a / b for a, b >= 0, with a 32-bit division where both fit (a fraction of the 64-bit sequence on the GPU).
KBIT_HD int64_t udiv(int64_t a, int64_t b) {
  const uint64_t ua = static_cast<uint64_t>(a), ub = static_cast<uint64_t>(b);
  return static_cast<int64_t>(((ua | ub) >> 32) == 0 ? static_cast<uint32_t>(ua) / static_cast<uint32_t>(ub)
                                                     : ua / ub);
}

// ---------------------------------------------------------------- bit casts

KBIT_HD uint32_t f32_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

KBIT_HD float bits_to_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// 2**e for a normal float32 exponent, e in [-126, 127].
KBIT_HD float pow2(int e) { return bits_to_f32(static_cast<uint32_t>(e + 127) << 23); }

KBIT_HD bool is_finite(float f) { return (f32_to_bits(f) & 0x7f800000u) != 0x7f800000u; }

KBIT_HD float abs_f32(float f) { return bits_to_f32(f32_to_bits(f) & 0x7fffffffu); }

// Round half to even of a non-negative float32 below 2**23, returned as an
// integer.
KBIT_HD uint32_t round_half_even(float v) {
  uint32_t r = static_cast<uint32_t>(v);         // truncation == floor for v >= 0
  const float frac = v - static_cast<float>(r);  // exact: v and r share the binade or r == 0
  if (frac > 0.5f || (frac == 0.5f && (r & 1u))) ++r;
  return r;
}

// ---------------------------------------------------------------- float16 /
// bfloat16 conversions

constexpr uint16_t kF16NaN = 0x7e00;
constexpr uint16_t kF16Max = 0x7bff;  // 65504
constexpr uint16_t kBF16NaN = 0x7fc0;
constexpr float kF16MaxValue = 65504.0f;
constexpr float kF32MaxValue = 3.40282346638528859812e+38f;

KBIT_HD float f16_to_f32(uint16_t h) {
#if defined(__CUDA_ARCH__)
  // float16 -> float32 is exact, so the hardware conversion gives the same value as the code below.
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t m = h & 0x3ffu;
  if (e == 0x1f) return bits_to_f32(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-08f;  // m * 2**-24, exact
    return bits_to_f32(f32_to_bits(v) | sign);
  }
  return bits_to_f32(sign | ((e + 112u) << 23) | (m << 13));
#endif
}

// IEEE round-to-nearest-even float32 -> float16; overflow gives inf, NaN gives
// the canonical quiet NaN.
KBIT_HD uint16_t f32_to_f16(float f) {
  uint32_t x = f32_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return kF16NaN;
  if (x >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf (and inf stays inf)
  if (x >= 0x38800000u) {                       // normal float16 range, >= 2**-14
    x += 0xc8000fffu + ((x >> 13) & 1u);        // rebias exponent by -112 and round at bit 13
    return static_cast<uint16_t>(sign | (x >> 13));
  }
  if (x < 0x33000000u) return sign;  // <= 2**-25 rounds to zero (the tie at 2**-25 goes to even 0)
  // Subnormal float16: count units of 2**-24.
  const uint32_t e = x >> 23;
  const uint32_t mant = (x & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;
  uint32_t r = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (r & 1u))) ++r;
  return static_cast<uint16_t>(sign | r);
}

KBIT_HD float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

KBIT_HD uint16_t f32_to_bf16(float f) {
  const uint32_t x = f32_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return kBF16NaN;
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// ---------------------------------------------------------------- element
// types

// Tag types that say how an element is stored and converted; the handlers are
// templated on them.
struct F32 {
  using Storage = float;
  static KBIT_HD float load(Storage v) { return v; }
  static KBIT_HD Storage store(float v) { return v != v ? bits_to_f32(0x7fc00000u) : v; }  // canonical NaN
};
struct F16 {
  using Storage = uint16_t;
  static KBIT_HD float load(Storage v) { return f16_to_f32(v); }
  static KBIT_HD Storage store(float v) { return f32_to_f16(v); }
};
struct BF16 {
  using Storage = uint16_t;
  static KBIT_HD float load(Storage v) { return bf16_to_f32(v); }
  static KBIT_HD Storage store(float v) { return f32_to_bf16(v); }
};

// ---------------------------------------------------------------- E4M4 scales

constexpr uint8_t kE4M4NaN = 0xff;
constexpr uint8_t kE4M4Max = 0xfe;  // 2**4 * (1 + 14/16) = 30.0
constexpr float kE4M4MaxValue = 30.0f;

KBIT_HD float e4m4_decode(uint8_t b) {
  if (b == kE4M4NaN) return bits_to_f32(0x7fc00000u);
  const int e = b >> 4;
  const int m = b & 15;
  if (e == 0) return static_cast<float>(m) * 6.103515625e-05f;  // m * 2**-14
  return static_cast<float>(16 + m) * pow2(e - 15);             // 2**(e-11) * (1 + m/16)
}

// Nearest E4M4 value, ties to even mantissa, saturating at 30.0; NaN and +-inf
// encode as NaN (0xFF). Negative inputs are encoded by magnitude: a block scale
// is never negative.
KBIT_HD uint8_t e4m4_encode(float v) {
  if (!is_finite(v)) return kE4M4NaN;
  v = abs_f32(v);
  if (v >= kE4M4MaxValue) return kE4M4Max;
  const int exp_field = static_cast<int>(f32_to_bits(v) >> 23);
  if (exp_field < 127 - 10) {  // below 2**-10: the subnormal range, steps of
                               // 2**-14; 16 carries into e=1
    return static_cast<uint8_t>(round_half_even(v * 16384.0f));
  }
  const int e = exp_field - 127;                       // v in [2**e, 2**(e+1)), e in -10..4
  const float frac16 = (v * pow2(-e) - 1.0f) * 16.0f;  // exact in float32
  const uint32_t code = (static_cast<uint32_t>(e + 11) << 4) + round_half_even(frac16);  // m=16 carries
  return static_cast<uint8_t>(code > kE4M4Max ? kE4M4Max : code);
}

// ---------------------------------------------------------------- block scales

// What one block's scale is stored as, in the bits of the stored type (u8, f16
// or f32 bits). `amax` is the block's max |x|; `nonfinite` says whether the
// block holds NaN or +-inf.
KBIT_HD uint32_t encode_scale(ScaleFormat fmt, float amax, bool nonfinite, float tensor_scale) {
  if (nonfinite) {
    if (fmt == ScaleFormat::kE4M4) return kE4M4NaN;
    if (fmt == ScaleFormat::kF16) return kF16NaN;
    return 0x7fc00000u;
  }
  // amax / t can overflow only for a tensor_scale below 1 chosen by the user:
  // it then saturates like any other value above the format's maximum.
  const float v = amax / tensor_scale;
  if (fmt == ScaleFormat::kE4M4) return e4m4_encode(v < kE4M4MaxValue ? v : kE4M4MaxValue);
  if (fmt == ScaleFormat::kF16) return f32_to_f16(v < kF16MaxValue ? v : kF16MaxValue);
  return f32_to_bits(v < kF32MaxValue ? v : kF32MaxValue);
}

KBIT_HD float decode_scale(ScaleFormat fmt, uint32_t stored, float tensor_scale) {
  float s;
  if (fmt == ScaleFormat::kE4M4) {
    s = e4m4_decode(static_cast<uint8_t>(stored));
  } else if (fmt == ScaleFormat::kF16) {
    s = f16_to_f32(static_cast<uint16_t>(stored));
  } else {
    s = bits_to_f32(stored);
  }
  // A scale rounded up next to float32's maximum would overflow to inf and turn its block into 0 * inf:
  // it saturates instead, like the stored scale itself.
  s = s * tensor_scale;
  return s > kF32MaxValue ? kF32MaxValue : s;
}

// ---------------------------------------------------------------- codes

// The element normalised by its block's decoded scale; a zero scale maps every
// element to 0.
KBIT_HD float normalize(float x, float s) { return s == 0.0f ? 0.0f : x / s; }

// Index of the codebook entry nearest to xn: distance |xn - c| in float32, ties
// to the lowest index. This is the definition; the handlers use
// nearest_code_sorted, which gives the same answer faster.
KBIT_HD int nearest_code_linear(float xn, const float* codebook, int n) {
  int best = 0;
  float best_d = abs_f32(xn - codebook[0]);
  for (int c = 1; c < n; ++c) {
    const float d = abs_f32(xn - codebook[c]);
    if (d < best_d) {
      best_d = d;
      best = c;
    }
  }
  return best;
}

// The codebook sorted ascending by value (stable, so equal values keep
// ascending original indices).
struct SortedCodebook {
  float value[32];
  int index[32];
  int n;
};

KBIT_HD void sort_codebook(const float* codebook, int n, SortedCodebook* out) {
  out->n = n;
  for (int i = 0; i < n; ++i) {  // insertion sort: n <= 32 and done once per call
    const float v = codebook[i];
    int j = i;
    while (j > 0 && out->value[j - 1] > v) {
      out->value[j] = out->value[j - 1];
      out->index[j] = out->index[j - 1];
      --j;
    }
    out->value[j] = v;
    out->index[j] = i;
  }
}

// Same result as nearest_code_linear. Rounded distances fl(|xn - v|) are
// monotone in v on each side of xn, so the minimum sits at the two neighbours
// of xn's insertion point, and every entry that ties with it is in a contiguous
// run next to them: scan outwards while the distance equals the best one,
// keeping the lowest original index. K is the codebook's bit width (n = 2**K
// entries), fixed so the search unrolls.
template <int K>
KBIT_HD int nearest_code_sorted(float xn, const SortedCodebook& cb) {
  constexpr int n = 1 << K;
  int p = 0;  // binary lifting to the number of entries <= xn, capped at n - 1 ...
#pragma unroll
  for (int step = n >> 1; step > 0; step >>= 1) p += cb.value[p + step - 1] <= xn ? step : 0;
  p += cb.value[p] <= xn ? 1 : 0;  // ... then the last step to n
  const float inf = bits_to_f32(0x7f800000u);
  const float d_below = p > 0 ? abs_f32(xn - cb.value[p - 1]) : inf;
  const float d_above = p < n ? abs_f32(xn - cb.value[p]) : inf;
  const float best_d = d_below < d_above ? d_below : d_above;
  int best = n;
  for (int i = p - 1; i >= 0 && abs_f32(xn - cb.value[i]) == best_d; --i) {
    best = cb.index[i] < best ? cb.index[i] : best;
  }
  for (int i = p; i < n && abs_f32(xn - cb.value[i]) == best_d; ++i) {
    best = cb.index[i] < best ? cb.index[i] : best;
  }
  return best < n ? best : 0;  // only a NaN xn finds nothing; its block's codes are 0 anyway
}

// ---------------------------------------------------------------- fast exact code search

// For most codebooks the nearest entry is decided by comparing xn with one float32 threshold per pair of
// neighbouring distinct values: a table lookup instead of distance arithmetic. It is exact when no two
// distinct entries can have equal rounded distances to xn except neighbours, which holds when the smallest
// gap between distinct values exceeds the rounding error of any distance (4 ulps of the largest, with margin)
// and |xn| is within `limit`. Otherwise (and for |xn| > limit, NaN) the sorted search above decides.
struct CodeSearch {
  SortedCodebook sorted;
  float tau[32];  // tau[i]: first float32 at which distinct value i + 1 beats value i; +inf past m - 1
  int label[32];  // lowest original index of distinct value i
  float limit;    // the table is exact for |xn| <= limit
  int m;          // number of distinct values
  bool regular;   // the table may be used at all
  bool identity;  // label[i] == i for every i: the codebook is sorted with no duplicates
};

KBIT_HD uint32_t order_key(float f) {
  const uint32_t b = f32_to_bits(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

KBIT_HD float from_order_key(uint32_t k) { return bits_to_f32((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k); }

// Unit in the last place of a finite positive normal float.
KBIT_HD float ulp_of(float v) { return pow2(static_cast<int>((f32_to_bits(v) >> 23) & 0xffu) - 127 - 23); }

// Phase 1 (one thread): sort, merge duplicates, decide whether the table is exact for this codebook.
KBIT_HD void build_code_search_values(const float* codebook, int n, CodeSearch* cs) {
  sort_codebook(codebook, n, &cs->sorted);
  int m = 0;
  float max_abs = 0.0f;
  for (int i = 0; i < n; ++i) {
    const float v = cs->sorted.value[i];
    if (m == 0 || v != cs->sorted.value[i - 1]) {
      cs->label[m] = cs->sorted.index[i];  // the stable sort puts the lowest index of equal values first
      cs->tau[m] = v;                      // holds the distinct value until phase 2 replaces it
      ++m;
    }
    const float a = abs_f32(v);
    max_abs = a > max_abs ? a : max_abs;
  }
  cs->m = m;
  bool identity = m == n;
  for (int i = 0; i < m; ++i) identity = identity && cs->label[i] == i;
  cs->identity = identity;
  float gap = bits_to_f32(0x7f800000u);
  for (int i = 0; i + 1 < m; ++i) {
    const float g = cs->tau[i + 1] - cs->tau[i];
    gap = g < gap ? g : gap;
  }
  const float limit = 2.0f * max_abs + 1.0f;
  const float reach = 3.0f * max_abs + 1.0f;  // >= any |xn - c| with |xn| <= limit
  cs->limit = limit;
  cs->regular = is_finite(reach) && (m == 1 || gap > 4.0f * ulp_of(reach));
}

// Whether value b (label lb) beats its lower neighbour a (label la) at xn, by the format's rule.
KBIT_HD bool upper_wins(float xn, float a, float b, int la, int lb) {
  const float da = abs_f32(xn - a);
  const float db = abs_f32(xn - b);
  return db < da || (db == da && lb < la);
}

// Phase 2 (any thread, once per i < m - 1, after phase 1): the threshold between distinct values i and i + 1.
// upper_wins is false at a, true at b and monotone in between, so bisect over the floats of [a, b] in their
// order-key space. (Walking from the midpoint is not enough: around a midpoint the two rounded distances can
// stay equal for millions of floats, e.g. near 0 between -c and +c.)
KBIT_HD float code_search_threshold(const CodeSearch& cs, int i) {
  const float a = cs.tau[i], b = cs.tau[i + 1];
  const int la = cs.label[i], lb = cs.label[i + 1];
  uint32_t lo = order_key(a), hi = order_key(b);
  while (hi - lo > 1u) {
    const uint32_t mid = lo + (hi - lo) / 2u;
    if (upper_wins(from_order_key(mid), a, b, la, lb)) {
      hi = mid;
    } else {
      lo = mid;
    }
  }
  return from_order_key(hi);
}

// Host-side whole build (the CUDA kernels split phase 2 over threads).
inline void build_code_search(const float* codebook, int n, CodeSearch* cs) {
  build_code_search_values(codebook, n, cs);
  float tau[32];
  for (int i = 0; i + 1 < cs->m; ++i) tau[i] = code_search_threshold(*cs, i);
  for (int i = 0; i + 1 < cs->m; ++i) cs->tau[i] = tau[i];
  for (int i = cs->m > 0 ? cs->m - 1 : 0; i < 32; ++i) cs->tau[i] = bits_to_f32(0x7f800000u);
}

// Number of thresholds <= xn: binary lifting; tau[n - 1] is +inf, so n - 1 steps cover 0..n-1.
template <int K>
KBIT_HD int table_position(float xn, const float* tau) {
  int p = 0;
#pragma unroll
  for (int step = (1 << K) >> 1; step > 0; step >>= 1) p += tau[p + step - 1] <= xn ? step : 0;
  return p;
}

// The format's code for xn (same as nearest_code_linear).
template <int K>
KBIT_HD int nearest_code(float xn, const CodeSearch& cs) {
  if (cs.regular && abs_f32(xn) <= cs.limit) {
    const int p = table_position<K>(xn, cs.tau);
    return cs.identity ? p : cs.label[p];
  }
  return nearest_code_sorted<K>(xn, cs.sorted);
}

}  // namespace kbit
