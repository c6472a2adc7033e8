// Host check of ffi/kbit_quantize_fast.h against format v1's definition (ffi/kbit_format.h), run by
// tests/test_quantize_fast.py. Reads codebooks from stdin, one per line: "K v0 v1 ... v(2**K - 1)".
//   check_quantize_fast DIVISIONS BLOCKS SEED [exhaustive]
// DIVISIONS random (x, s) pairs for the division claims, BLOCKS random blocks per codebook and scale format
// through the whole per-element path; "exhaustive" also compares every float in the bucket range per
// codebook (about 2.1e9 values each: minutes). Prints one line per check and exits 1 on any mismatch.
#include <algorithm>
#include <cfenv>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kbit_quantize_fast.h"

namespace {

using namespace kbit;

int failures = 0;

void fail(const char* what, float a, float b, float got, float want) {
  if (++failures <= 20) {
    std::printf("MISMATCH %s: a=%a b=%a got=%a want=%a\n", what, a, b, got, want);
  }
}

// A float with a random mantissa and an exponent in [lo, hi], random sign; a quarter of the mantissas are
// all-ones or all-zeros patterns near the binade edges, where reciprocal and division roundings are hardest.
float random_float(std::mt19937_64& g, int lo, int hi, bool sign = true) {
  const uint32_t e =
      static_cast<uint32_t>(lo + static_cast<int>(g() % static_cast<uint64_t>(hi - lo + 1)) + 127);
  uint32_t m = static_cast<uint32_t>(g()) & 0x7fffffu;
  switch (g() % 8) {
    case 0: m = 0x7fffffu - (m & 0xffu); break;
    case 1: m = m & 0xffu; break;
    default: break;
  }
  const uint32_t s = sign && (g() & 1u) ? 0x80000000u : 0u;
  return bits_to_f32(s | e << 23 | m);
}

// Claim A: fast_quotient == x / s for s in [2**-60, 2**60] and 2**-40 <= |x/s| <= 2.
// Claim B: |fast_quotient| < 2**-39 when |x / s| < 2**-40 (x finite, any sign, subnormal included).
void check_division(uint64_t n, std::mt19937_64& g) {
  uint64_t exact = 0, tiny = 0;
  for (uint64_t i = 0; i < n; ++i) {
    const float s = random_float(g, -60, 59, false);
    const float y = 1.0f / s;
    float x;
    if (i % 4 != 3) {
      // A quotient in [2**-40, 2): x = s * q rounded, or a neighbour of it.
      const float q = random_float(g, -40, 0);
      x = s * q;
      const int nudge = static_cast<int>(g() % 5) - 2;
      x = bits_to_f32(f32_to_bits(x) + static_cast<uint32_t>(nudge));
      if (!std::isfinite(x) || x == 0.0f) continue;
    } else {
      // Tiny quotients, down to subnormal x.
      const int e = -149 + static_cast<int>(g() % 150);
      x = std::ldexp(static_cast<float>((g() % 0xffffffu) + 1) / 16777216.0f, e) * ((g() & 1) ? -1.0f : 1.0f);
    }
    const float want = x / s;
    const float got = fast_quotient(x, s, y);
    if (std::fabs(want) >= 0x1p-40f) {
      if (std::fabs(want) > 2.0f) continue;
      ++exact;
      if (f32_to_bits(got) != f32_to_bits(want)) fail("division", x, s, got, want);
    } else {
      ++tiny;
      if (!(std::fabs(got) < kTinyQuotient)) fail("tiny quotient", x, s, got, want);
    }
  }
  std::printf("division: %" PRIu64 " exact-range pairs, %" PRIu64 " tiny-quotient pairs\n", exact, tiny);
}

struct Codebook {
  int k;
  std::vector<float> v;
};

template <int K>
bool table_for(const Codebook& cb, CodeSearch* cs, std::vector<BucketEntry>* table) {
  build_code_search(cb.v.data(), 1 << K, cs);
  if (!bucket_table_ok(*cs)) return false;
  table->resize(kBuckets);
  for (int j = 0; j < kBuckets; ++j) (*table)[j] = bucket_entry(*cs, j);
  return true;
}

// Every float in [-range, range] (exhaustive) or a sample: bucket code == nearest_code.
template <int K>
void check_search(const Codebook& cb, int index, bool exhaustive, uint64_t samples, std::mt19937_64& g) {
  CodeSearch cs;
  std::vector<BucketEntry> table;
  if (!table_for<K>(cb, &cs, &table)) {
    std::printf("codebook %d (K=%d): bucket table not applicable (the exact path serves it)\n", index, K);
    return;
  }
  uint64_t checked = 0;
  auto one = [&](float xn) {
    const int j = bucket_of(xn);
    if (j < 0 || j >= kBuckets) {
      fail("bucket index", xn, 0.0f, static_cast<float>(j), 0.0f);
      return;
    }
    const int got = static_cast<int>(bucket_code(xn, table[j]));
    const int want = nearest_code<K>(xn, cs);
    ++checked;
    if (got != want)
      fail("search", xn, static_cast<float>(index), static_cast<float>(got), static_cast<float>(want));
  };
  if (exhaustive) {
    const uint32_t top = f32_to_bits(kBucketRange);
    for (uint32_t u = 0; u <= top; ++u) {
      one(bits_to_f32(u));
      one(bits_to_f32(u | 0x80000000u));
    }
  } else {
    for (uint64_t i = 0; i < samples; ++i) {
      const uint32_t u = static_cast<uint32_t>(g() % (static_cast<uint64_t>(f32_to_bits(kBucketRange)) + 1));
      one(bits_to_f32(u | ((g() & 1) ? 0x80000000u : 0u)));
    }
    for (int i = 0; i + 1 < cs.m; ++i) {  // each threshold and its neighbours
      for (int d = -2; d <= 2; ++d) {
        const float t = bits_to_f32(f32_to_bits(cs.tau[i]) + static_cast<uint32_t>(d));
        if (std::fabs(t) <= kBucketRange) one(t);
      }
    }
  }
  std::printf("codebook %d (K=%d): search exact on %" PRIu64 " values\n", index, K, checked);
}

// The kernel's whole per-element path on random blocks: scale, divisor, quotient, bucket code, against
// normalize() and nearest_code().
template <int K>
void check_blocks(const Codebook& cb, int index, uint64_t blocks, std::mt19937_64& g) {
  CodeSearch cs;
  std::vector<BucketEntry> table;
  if (!table_for<K>(cb, &cs, &table)) return;
  uint64_t fast = 0, total = 0;
  std::normal_distribution<float> normal;
  for (uint64_t b = 0; b < blocks; ++b) {
    const auto fmt = static_cast<ScaleFormat>(b % 3);
    float t = std::ldexp(1.0f + static_cast<float>(g() % 1024) / 1024.0f, static_cast<int>(g() % 80) - 40);
    float x[kBlock];
    const int kind = static_cast<int>(g() % 6);
    const float mag = std::ldexp(1.0f, static_cast<int>(g() % 100) - 50);
    for (float& v : x) {
      switch (kind) {
        case 0: v = normal(g) * mag; break;
        case 1: v = normal(g) * std::ldexp(1.0f, static_cast<int>(g() % 60) - 30) * mag; break;  // wide range
        case 2: v = (g() % 3 == 0) ? 0.0f : normal(g) * mag; break;                              // zeros
        case 3: v = random_float(g, -149 + 23, 127); break;                          // any exponent
        case 4: v = static_cast<float>(static_cast<int>(g() % 9) - 4) * mag; break;  // ties and repeats
        default: v = std::ldexp(normal(g), -140); break;                             // subnormal
      }
    }
    uint32_t amax_bits = 0;
    for (float v : x) amax_bits = std::max(amax_bits, f32_to_bits(v) & 0x7fffffffu);
    const bool nonfinite = amax_bits >= 0x7f800000u;
    const float amax = bits_to_f32(amax_bits);
    const bool realistic = b % 2 == 1 && kind != 3 && amax > 0.0f;
    if (realistic) {
      // The auto tensor scale of a tensor whose max is 1 to 2**8 times this block's: the common case.
      const double tensor_amax = std::ldexp(static_cast<double>(amax), static_cast<int>(g() % 9));
      const double max = fmt == ScaleFormat::kE4M4 ? 30.0 : fmt == ScaleFormat::kF16 ? 65504.0 : 0.0;
      t = max == 0.0 ? 1.0f
                     : static_cast<float>(std::ldexp(1.0, std::max(-126, std::ilogb(tensor_amax / max) + 1)));
    }
    const uint32_t stored = encode_scale(fmt, amax, nonfinite, t);
    const float s = decode_scale(fmt, stored, t);
    const FastDivisor d = fast_divisor(s, amax, nonfinite);
    total += realistic ? 1 : 0;
    if (!d.ok) continue;
    fast += realistic ? 1 : 0;
    for (float v : x) {
      const float xn = fast_quotient(v, d.s, d.y);
      const int j = bucket_of(xn);
      if (j < 0 || j >= kBuckets) {
        fail("block bucket index", v, s, static_cast<float>(j), 0.0f);
        continue;
      }
      const int got = static_cast<int>(bucket_code(xn, table[j]));
      const int want = nearest_code<K>(normalize(v, s), cs);
      if (got != want) fail("block code", v, s, static_cast<float>(got), static_cast<float>(want));
    }
  }
  std::printf("codebook %d (K=%d): %" PRIu64 " random blocks checked; %" PRIu64 " of %" PRIu64
              " with an auto tensor scale took the shortcut\n",
              index, K, blocks, fast, total);
}

template <int K>
void check_codebook(const Codebook& cb, int index, bool exhaustive, uint64_t blocks, std::mt19937_64& g) {
  check_search<K>(cb, index, exhaustive, blocks * 8, g);
  check_blocks<K>(cb, index, blocks, g);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s DIVISIONS BLOCKS SEED [exhaustive] < codebooks\n", argv[0]);
    return 2;
  }
  std::fesetround(FE_TONEAREST);
  const uint64_t divisions = std::strtoull(argv[1], nullptr, 10);
  const uint64_t blocks = std::strtoull(argv[2], nullptr, 10);
  std::mt19937_64 g(std::strtoull(argv[3], nullptr, 10));
  const bool exhaustive = argc > 4 && std::string(argv[4]) == "exhaustive";
  check_division(divisions, g);
  int k, index = 0;
  while (std::scanf("%d", &k) == 1) {
    Codebook cb{k, std::vector<float>(static_cast<size_t>(1) << k)};
    for (float& v : cb.v) {
      if (std::scanf("%a", &v) != 1) {
        std::fprintf(stderr, "bad codebook line %d\n", index);
        return 2;
      }
    }
    switch (k) {
      case 2: check_codebook<2>(cb, index, exhaustive, blocks, g); break;
      case 3: check_codebook<3>(cb, index, exhaustive, blocks, g); break;
      case 4: check_codebook<4>(cb, index, exhaustive, blocks, g); break;
      case 5: check_codebook<5>(cb, index, exhaustive, blocks, g); break;
      default: std::fprintf(stderr, "bad K %d\n", k); return 2;
    }
    ++index;
  }
  std::printf("%s: %d mismatches\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
