// A shortcut through format v1's quantize arithmetic for the CUDA kernel, where the exact path (an IEEE
// division and a K-step threshold search per element) is the whole cost. It gives the same codes as
// kbit_format.h's definition wherever its preconditions hold, and says where they do not, so the caller
// takes the exact path there:
//
// - Division. With y = 1/s correctly rounded (once per block), q0 = x*y is within an ulp of x/s, the
//   remainder r = fma(-q0, s, x) is exact and fma(r, y, q0) is the correctly rounded x/s (Markstein's
//   theorem), as long as nothing underflows or overflows: s in [2**-60, 2**60] and |x/s| >= 2**-40 keep
//   x, q0 and r normal (r's grid is 2**(e(s) + e(q) - 46) >= 2**-147). Smaller quotients can be off by an
//   ulp but stay below 2**-39 in magnitude, and the codebook is only accepted if no threshold lies within
//   2**-38 of zero, so their code is that of any tiny value. A zero scale uses y = 0, which maps every
//   finite x to a signed zero, as normalize() does.
// - Search. The quotient of an accepted block lies in [-kBucketRange, kBucketRange] (checked on the block's
//   max). bucket_of() maps it monotonically to one of kBuckets buckets; a codebook is accepted when no bucket
//   holds two thresholds, and then each bucket stores its threshold (or +inf) with the codes on either side:
//   one lookup and one compare per element, instead of K dependent lookups.
//
// fma is correctly rounded on both sides (fmaf in CUDA, the C library's fmaf on the host), so the host
// builds the same tables and tests can run this code on the CPU.
#pragma once

#include <math.h>

#include "kbit_format.h"

namespace kbit {

constexpr float kFastScaleMin = 8.673617379884035e-19f;     // 2**-60
constexpr float kFastScaleMax = 1.152921504606846976e+18f;  // 2**60
constexpr float kTinyQuotient = 1.818989403545856e-12f;     // 2**-39: bound on quotients that may be off
constexpr float kTinyThreshold = 3.637978807091713e-12f;    // 2**-38: no threshold closer to zero

// ---------------------------------------------------------------- division by a block's scale

// The block's divisor: s and its reciprocal, and whether the shortcut applies to the block.
struct FastDivisor {
  float s, y;
  bool ok;
};

KBIT_HD float fast_quotient(float x, float s, float y) {
  const float q0 = x * y;
  return fmaf(fmaf(-q0, s, x), y, q0);
}

constexpr float kBucketRange = 1.0625f;  // covers normal e4m4/f16 scales, which round by at most 1/32
constexpr float kBucketScale = 32.0f;    // buckets of width 1/32: power of two, so xn * 32 is exact
constexpr int kBucketOffset = 34;        // bucket_of(-kBucketRange) == 0
// fma(xn, 32, 2**23 + 34) lies in [2**23, 2**23 + 68], where the ulp is 1: it rounds 32 xn to an integer,
// and its bits minus those of 2**23 are the bucket. (2**23's bits are 0 modulo 2**24, so a kernel that
// multiplies the bits by 256 for an address needs no subtraction.)
constexpr float kBucketMagic = 8388642.0f;         // 2**23 + kBucketOffset
constexpr uint32_t kBucketBaseBits = 0x4b000000u;  // bits of 2**23
constexpr int kBuckets = 2 * kBucketOffset + 1;

// amax: the block's max |x|, s its decoded scale, nonfinite: whether it holds inf or NaN.
KBIT_HD FastDivisor fast_divisor(float s, float amax, bool nonfinite) {
  if (nonfinite) return {s, 0.0f, false};
  if (s == 0.0f) return {0.0f, 0.0f, true};
  if (!(s >= kFastScaleMin && s <= kFastScaleMax)) return {s, 0.0f, false};
  const float y = 1.0f / s;
  return {s, y, fast_quotient(amax, s, y) <= kBucketRange};
}

// ---------------------------------------------------------------- bucket search

// Monotone in xn, exact in IEEE arithmetic: round-half-even(32 * xn) + kBucketOffset, for |xn| <= the range.
KBIT_HD int bucket_of(float xn) {
  return static_cast<int>(f32_to_bits(fmaf(xn, kBucketScale, kBucketMagic)) - kBucketBaseBits);
}

// Bucket of a threshold anywhere on the line: -1 below the range, kBuckets above.
KBIT_HD int threshold_bucket(float tau) {
  if (tau < -kBucketRange) return -1;
  if (tau > kBucketRange) return kBuckets;
  return bucket_of(tau);
}

// One bucket: xn >= tau ? above : below is the code (tau = +inf when no threshold falls in the bucket).
struct BucketEntry {
  float tau;
  uint32_t codes;  // below | above << 16
};

// The code in the low 16 bits (the kernel tests only the low K bits, so it skips the mask).
KBIT_HD uint32_t bucket_code_bits(float xn, BucketEntry e) { return e.codes >> (xn >= e.tau ? 16 : 0); }

KBIT_HD uint32_t bucket_code(float xn, BucketEntry e) { return bucket_code_bits(xn, e) & 0xffffu; }

// Whether the bucket table is exact for this codebook (cs built by build_code_search_values and the
// thresholds): the threshold table itself must be exact over the range, and no threshold may be tiny or
// share a bucket with another.
KBIT_HD bool bucket_table_ok(const CodeSearch& cs) {
  if (!cs.regular || !(cs.limit >= kBucketRange)) return false;
  int last = -2;
  for (int i = 0; i + 1 < cs.m; ++i) {
    const float tau = cs.tau[i];
    if (abs_f32(tau) < kTinyThreshold) return false;
    const int b = threshold_bucket(tau);
    if (b >= 0 && b < kBuckets && b == last) return false;
    last = b;
  }
  return true;
}

// Entry j of the table (any thread, after the thresholds are in cs.tau).
KBIT_HD BucketEntry bucket_entry(const CodeSearch& cs, int j) {
  int below = 0;  // thresholds in buckets before j: every xn of bucket j is above them
  float tau = bits_to_f32(0x7f800000u);
  for (int i = 0; i + 1 < cs.m; ++i) {
    const int b = threshold_bucket(cs.tau[i]);
    below += b < j ? 1 : 0;
    if (b == j) tau = cs.tau[i];
  }
  const int lo = cs.identity ? below : cs.label[below];
  const int hi = is_finite(tau) ? (cs.identity ? below + 1 : cs.label[below + 1]) : lo;
  return {tau, static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16};
}

}  // namespace kbit
