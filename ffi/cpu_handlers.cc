// CPU handlers for format v1: one pass over the data, blocks spread over XLA's
// intra-op thread pool.
#include "cpu_handlers.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "kbit_format.h"
#include "kbit_layout.h"

namespace ffi = xla::ffi;

namespace kbit {
namespace {

void write_scale(void* scales, int64_t i, ScaleFormat fmt, uint32_t stored) {
  if (fmt == ScaleFormat::kE4M4) {
    static_cast<uint8_t*>(scales)[i] = static_cast<uint8_t>(stored);
  } else if (fmt == ScaleFormat::kF16) {
    static_cast<uint16_t*>(scales)[i] = static_cast<uint16_t>(stored);
  } else {
    static_cast<uint32_t*>(scales)[i] = stored;
  }
}

std::vector<CodeSearch> build_searches(const float* codebooks, int64_t groups, int n) {
  IeeeSubnormals ieee;  // subnormal codebook entries must sort and compare as themselves
  std::vector<CodeSearch> searches(static_cast<size_t>(groups));
  for (int64_t g = 0; g < groups; ++g) build_code_search(codebooks + g * n, n, &searches[g]);
  return searches;
}

// The block loops are written as fixed-length loops over the 32 elements so the compiler vectorises them;
// on x86-64 a copy built for AVX2 is picked at run time (no FMA: contraction would change results).
#define KBIT_ALWAYS_INLINE inline __attribute__((always_inline))

template <typename In, int K>
KBIT_ALWAYS_INLINE void quantize_blocks_impl(const Layout& L, const typename In::Storage* x,
                                             const CodeSearch* codebooks, const float* tensor_scales,
                                             uint32_t* packed, void* scales, int64_t begin, int64_t end) {
  alignas(64) float v[kBlock];
  alignas(64) float xn[kBlock];
  alignas(64) uint32_t code[kBlock];
  for (int64_t blk = begin; blk < end; ++blk) {
    const int64_t row = blk / L.nb;
    const int64_t b = blk - row * L.nb;
    const int64_t group = row / L.rows_per_group;
    const float t = tensor_scales[group];
    const CodeSearch& cb = codebooks[group];
    const typename In::Storage* src = x + row * L.d + b * kBlock;
    const int count = static_cast<int>(std::min<int64_t>(kBlock, L.d - b * kBlock));
    if (count == kBlock) {
      for (int i = 0; i < kBlock; ++i) v[i] = In::load(src[i]);
    } else {
      for (int i = 0; i < kBlock; ++i) v[i] = i < count ? In::load(src[i]) : 0.0f;
    }
    // Non-negative floats order like their bit patterns; a max at or above inf's pattern means inf or NaN.
    uint32_t amax_bits = 0;
    for (int i = 0; i < kBlock; ++i) {
      const uint32_t a = f32_to_bits(v[i]) & 0x7fffffffu;
      amax_bits = a > amax_bits ? a : amax_bits;
    }
    const bool nonfinite = amax_bits >= 0x7f800000u;
    const uint32_t stored = encode_scale(L.format, bits_to_f32(amax_bits), nonfinite, t);
    write_scale(scales, blk, L.format, stored);
    uint32_t* dst = packed + blk * K;
    if (nonfinite) {
      for (int j = 0; j < K; ++j) dst[j] = 0;
      continue;
    }
    const float s = decode_scale(L.format, stored, t);
    if (s == 0.0f) {
      for (int i = 0; i < kBlock; ++i) xn[i] = 0.0f;
    } else {
      for (int i = 0; i < kBlock; ++i) xn[i] = v[i] / s;
    }
    uint32_t in_range = 1;
    for (int i = 0; i < kBlock; ++i) in_range &= abs_f32(xn[i]) <= cb.limit ? 1u : 0u;
    if (cb.regular && in_range) {
      // The table search as a count of thresholds <= xn: branch-free, one compare per threshold.
      for (int i = 0; i < kBlock; ++i) code[i] = 0;
      for (int j = 0; j + 1 < cb.m; ++j) {
        const float tj = cb.tau[j];
        for (int i = 0; i < kBlock; ++i) code[i] += xn[i] >= tj ? 1u : 0u;
      }
      if (!cb.identity) {
        for (int i = 0; i < kBlock; ++i) code[i] = static_cast<uint32_t>(cb.label[code[i]]);
      }
    } else {
      for (int i = 0; i < kBlock; ++i) code[i] = static_cast<uint32_t>(nearest_code<K>(xn[i], cb));
    }
    for (int j = 0; j < K; ++j) {
      uint32_t w = 0;
      for (int i = 0; i < kBlock; ++i) w |= ((code[i] >> j) & 1u) << i;
      dst[j] = w;
    }
  }
}

// Tiled: the words and scales are in tile order (kbit_format.h, block_index); the output is in row order.
template <typename Out, int K, bool Tiled>
KBIT_ALWAYS_INLINE void dequantize_blocks_impl(const Layout& L, const uint32_t* packed, const void* scales,
                                               const float* codebooks, const float* tensor_scales,
                                               typename Out::Storage* out, int64_t begin, int64_t end) {
  constexpr int n = 1 << K;
  alignas(64) float value[kBlock];
  for (int64_t blk = begin; blk < end; ++blk) {
    const int64_t row = blk / L.nb;
    const int64_t b = blk - row * L.nb;
    const int64_t group = row / L.rows_per_group;
    const float* cb = codebooks + group * n;
    const int64_t src = block_index(row, b, L.nb, Tiled);
    const float s = decode_scale(L.format, read_scale(scales, src, L.format), tensor_scales[group]);
    uint32_t words[K];
    for (int j = 0; j < K; ++j) words[j] = packed[src * K + j];
    stored_to_planes<K>(words, L.pairs);
    // Two passes over the block: the code rebuild and lookup vectorise on their own, and so does the cast.
    for (int i = 0; i < kBlock; ++i) {
      uint32_t code = 0;
      for (int j = 0; j < K; ++j) code |= ((words[j] >> i) & 1u) << j;
      value[i] = cb[code] * s;
    }
    typename Out::Storage* dst = out + row * L.d + b * kBlock;
    const int count = static_cast<int>(std::min<int64_t>(kBlock, L.d - b * kBlock));
    if (count == kBlock) {
      for (int i = 0; i < kBlock; ++i) dst[i] = Out::store(value[i]);
    } else {
      for (int i = 0; i < count; ++i) dst[i] = Out::store(value[i]);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define KBIT_AVX2 __attribute__((target("avx2")))
#define KBIT_AVX512 __attribute__((target("avx2,avx512f,avx512bw,avx512dq,avx512vl,prefer-vector-width=512")))
const bool kHasAvx2 = __builtin_cpu_supports("avx2");
const bool kHasAvx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
#define KBIT_AVX2
#define KBIT_AVX512
const bool kHasAvx2 = false;
const bool kHasAvx512 = false;
#endif

template <typename In, int K>
KBIT_AVX2 void quantize_blocks_avx2(const Layout& L, const typename In::Storage* x, const CodeSearch* cb,
                                    const float* ts, uint32_t* packed, void* scales, int64_t begin,
                                    int64_t end) {
  quantize_blocks_impl<In, K>(L, x, cb, ts, packed, scales, begin, end);
}

template <typename In, int K>
KBIT_AVX512 void quantize_blocks_avx512(const Layout& L, const typename In::Storage* x, const CodeSearch* cb,
                                        const float* ts, uint32_t* packed, void* scales, int64_t begin,
                                        int64_t end) {
  quantize_blocks_impl<In, K>(L, x, cb, ts, packed, scales, begin, end);
}

template <typename In, int K>
void quantize_blocks(const Layout& L, const typename In::Storage* x, const CodeSearch* cb, const float* ts,
                     uint32_t* packed, void* scales, int64_t begin, int64_t end) {
  if (kHasAvx512) return quantize_blocks_avx512<In, K>(L, x, cb, ts, packed, scales, begin, end);
  if (kHasAvx2) return quantize_blocks_avx2<In, K>(L, x, cb, ts, packed, scales, begin, end);
  quantize_blocks_impl<In, K>(L, x, cb, ts, packed, scales, begin, end);
}

template <typename Out, int K, bool Tiled>
KBIT_AVX2 void dequantize_blocks_avx2(const Layout& L, const uint32_t* packed, const void* scales,
                                      const float* cb, const float* ts, typename Out::Storage* out,
                                      int64_t begin, int64_t end) {
  dequantize_blocks_impl<Out, K, Tiled>(L, packed, scales, cb, ts, out, begin, end);
}

template <typename Out, int K, bool Tiled>
KBIT_AVX512 void dequantize_blocks_avx512(const Layout& L, const uint32_t* packed, const void* scales,
                                          const float* cb, const float* ts, typename Out::Storage* out,
                                          int64_t begin, int64_t end) {
  dequantize_blocks_impl<Out, K, Tiled>(L, packed, scales, cb, ts, out, begin, end);
}

template <typename Out, int K, bool Tiled>
void dequantize_blocks(const Layout& L, const uint32_t* packed, const void* scales, const float* cb,
                       const float* ts, typename Out::Storage* out, int64_t begin, int64_t end) {
  if (kHasAvx512) return dequantize_blocks_avx512<Out, K, Tiled>(L, packed, scales, cb, ts, out, begin, end);
  if (kHasAvx2) return dequantize_blocks_avx2<Out, K, Tiled>(L, packed, scales, cb, ts, out, begin, end);
  dequantize_blocks_impl<Out, K, Tiled>(L, packed, scales, cb, ts, out, begin, end);
}

// Blocks per task: large enough that scheduling is noise, small enough to
// balance two to dozens of threads.
constexpr int64_t kGrain = 8192;

ffi::Error QuantizeImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> codebook,
                        ffi::Buffer<ffi::F32> tensor_scale, ffi::Result<ffi::Buffer<ffi::U32>> packed,
                        ffi::Result<ffi::AnyBuffer> scales, int32_t k, int32_t scale_format) {
  Layout L;
  if (ffi::Error e = layout_of(x, *packed, *scales, codebook, tensor_scale, k, scale_format, &L);
      e.failure()) {
    return e;
  }
  const int64_t total = L.rows * L.nb;
  if (total == 0) return ffi::Error::Success();
  const std::vector<CodeSearch> searches = build_searches(codebook.typed_data(), L.groups, 1 << L.k);
  const float* ts = tensor_scale.typed_data();
  uint32_t* p = packed->typed_data();
  void* sc = scales->untyped_data();
  auto run = [&](auto tag) {
    using In = decltype(tag);
    const auto* xs = static_cast<const typename In::Storage*>(x.untyped_data());
    with_k(L.k, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      parallel_for(pool, total, kGrain, [&](int64_t b, int64_t e) {
        quantize_blocks<In, K>(L, xs, searches.data(), ts, p, sc, b, e);
      });
    });
  };
  switch (x.element_type()) {
    case ffi::DataType::F32: run(F32{}); break;
    case ffi::DataType::F16: run(F16{}); break;
    default: run(BF16{}); break;  // make_layout admitted only the three float types
  }
  return ffi::Error::Success();
}

// PairWords: tiled K = 4 words are pair indices (kbit_dequantize_tiled_v2; kbit_dequantize_tiled reads
// planes).
template <bool Tiled, bool PairWords>
ffi::Error DequantizeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> packed, ffi::AnyBuffer scales,
                          ffi::Buffer<ffi::F32> codebook, ffi::Buffer<ffi::F32> tensor_scale,
                          ffi::Result<ffi::AnyBuffer> out, int32_t k, int32_t scale_format) {
  Layout L;
  if (ffi::Error e = layout_of(*out, packed, scales, codebook, tensor_scale, k, scale_format, &L);
      e.failure()) {
    return e;
  }
  if (ffi::Error e = check_tiled_rows(L, Tiled, packed.dimensions()); e.failure()) return e;
  L.pairs = PairWords && stores_pairs(L.k, Tiled);
  const int64_t total = L.rows * L.nb;
  if (total == 0) return ffi::Error::Success();
  const uint32_t* p = packed.typed_data();
  const void* sc = scales.untyped_data();
  const float* cb = codebook.typed_data();
  const float* ts = tensor_scale.typed_data();
  auto run = [&](auto tag) {
    using Out = decltype(tag);
    auto* o = static_cast<typename Out::Storage*>(out->untyped_data());
    with_k(L.k, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      parallel_for(pool, total, kGrain, [&](int64_t b, int64_t e) {
        dequantize_blocks<Out, K, Tiled>(L, p, sc, cb, ts, o, b, e);
      });
    });
  };
  switch (out->element_type()) {
    case ffi::DataType::F32: run(F32{}); break;
    case ffi::DataType::F16: run(F16{}); break;
    default: run(BF16{}); break;
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace kbit

XLA_FFI_DEFINE_HANDLER_SYMBOL(KbitQuantizeCpu, kbit::QuantizeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("k")
                                  .Attr<int32_t>("scale_format"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KbitDequantizeCpu, (kbit::DequantizeImpl<false, false>),
                              kbit::dequantize_binding<ffi::ThreadPool>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(KbitDequantizeTiledCpu, (kbit::DequantizeImpl<true, false>),
                              kbit::dequantize_binding<ffi::ThreadPool>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(KbitDequantizeTiledV2Cpu, (kbit::DequantizeImpl<true, true>),
                              kbit::dequantize_binding<ffi::ThreadPool>());
