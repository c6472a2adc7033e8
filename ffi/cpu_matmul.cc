// CPU handler for the fused k-bit matmul y = x @ W (W [in, out] stored as format v1 of W^T, see
// kbit_layout.h). Output rows are spread over the thread pool; for each output row the codebook values of its
// codes are looked up once into a buffer (a dequantized tile, scales left out), then every row of x takes a
// float32 dot product with it block by block and the block's decoded scale multiplies each 32-element
// partial sum, the same association as the CUDA kernel.
#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_common.h"
#include "cpu_handlers.h"
#include "kbit_format.h"
#include "kbit_layout.h"

namespace ffi = xla::ffi;

namespace kbit {
namespace {

// Eight independent partial sums make the 32-element dot product vectorisable without reassociation flags.
inline float dot32(const float* a, const float* b) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int i = 0; i < kBlock; i += 8) {
    for (int l = 0; l < 8; ++l) s[l] += a[i + l] * b[i + l];
  }
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <typename X, int K>
void matmul_rows(const MatmulLayout& L, const float* xf, const uint32_t* packed, const void* scales,
                 const float* cb, float t, typename X::Storage* out, int64_t begin, int64_t end) {
  std::vector<float> values(static_cast<size_t>(L.nb * kBlock));
  std::vector<float> block_scales(static_cast<size_t>(L.nb));
  const int64_t ldx = L.nb * kBlock;
  for (int64_t n = begin; n < end; ++n) {
    const int64_t row = block_index(n, 0, L.nb, L.tiled);
    for (int64_t b = 0; b < L.nb; ++b) {
      const int64_t i = row + block_offset(b, L.tiled);
      uint32_t w[K];
      for (int j = 0; j < K; ++j) w[j] = packed[i * K + j];
      stored_to_planes<K>(w, L.pairs);
      block_scales[b] = decode_scale(L.format, read_scale(scales, i, L.format), t);
      float* v = values.data() + b * kBlock;
      for (int i = 0; i < kBlock; ++i) {
        uint32_t code = 0;
        for (int j = 0; j < K; ++j) code |= ((w[j] >> i) & 1u) << j;
        v[i] = cb[code];
      }
    }
    for (int64_t m = 0; m < L.m; ++m) {
      const float* xr = xf + m * ldx;
      float acc = 0.0f;
      for (int64_t b = 0; b < L.nb; ++b) {
        acc += block_scales[b] * dot32(values.data() + b * kBlock, xr + b * kBlock);
      }
      out[m * L.n + n] = X::store(acc);
    }
  }
}

// y = g @ W^T for g [m, out]: y[:, 32 b + i] = sum over o of g[:, o] * W^T[o, 32 b + i]. Each task owns
// whole columns of blocks, so every output element is summed over o in order by one thread; positions past
// d (the padding of the last block) are written as zeros.
template <typename X, int K>
void matmul_t_blocks(const MatmulLayout& L, int64_t d, const float* gf, const uint32_t* packed,
                     const void* scales, const float* cb, float t, typename X::Storage* out, int64_t begin,
                     int64_t end) {
  std::vector<float> acc(static_cast<size_t>(L.m * kBlock));
  const int64_t ldy = L.nb * kBlock;
  float v[kBlock];
  for (int64_t b = begin; b < end; ++b) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    const int64_t column = block_offset(b, L.tiled);
    for (int64_t o = 0; o < L.n; ++o) {
      const int64_t bi = block_index(o, 0, L.nb, L.tiled) + column;
      uint32_t w[K];
      for (int j = 0; j < K; ++j) w[j] = packed[bi * K + j];
      stored_to_planes<K>(w, L.pairs);
      const float s = decode_scale(L.format, read_scale(scales, bi, L.format), t);
      for (int i = 0; i < kBlock; ++i) {
        uint32_t code = 0;
        for (int j = 0; j < K; ++j) code |= ((w[j] >> i) & 1u) << j;
        v[i] = cb[code] * s;
      }
      for (int64_t m = 0; m < L.m; ++m) {
        const float gv = gf[m * L.n + o];
        float* a = acc.data() + m * kBlock;
        for (int i = 0; i < kBlock; ++i) a[i] += gv * v[i];
      }
    }
    for (int64_t m = 0; m < L.m; ++m) {
      for (int i = 0; i < kBlock; ++i) {
        const int64_t col = b * kBlock + i;
        out[m * ldy + col] = X::store(col < d ? acc[m * kBlock + i] : 0.0f);
      }
    }
  }
}

constexpr int64_t kRowGrain = 16;

// Calls fn(X{}, operand as float32, out storage) for the dtype of the small operand (x or g) and the output:
// the operand is converted once, since it is small next to the weight.
template <typename Fn>
void with_float_operand(const ffi::AnyBuffer& a, int64_t count, ffi::Result<ffi::AnyBuffer>& out,
                        const Fn& fn) {
  auto run = [&](auto tag) {
    using X = decltype(tag);
    std::vector<float> af(static_cast<size_t>(count));
    const auto* as = static_cast<const typename X::Storage*>(a.untyped_data());
    {
      IeeeSubnormals ieee;
      for (int64_t i = 0; i < count; ++i) af[i] = X::load(as[i]);
    }
    fn(tag, af.data(), static_cast<typename X::Storage*>(out->untyped_data()));
  };
  switch (a.element_type()) {
    case ffi::DataType::F32: run(F32{}); break;
    case ffi::DataType::F16: run(F16{}); break;
    default: run(BF16{}); break;
  }
}

// kTiled: the words and scales in tile order (kbit_format.h); kPairWords: K = 4 words as pair indices (the
// _tiled_v2 names) rather than planes (the _tiled names). Separate handler names rather than attributes, so
// that modules exported before tiled matrices, or before pair words, existed still bind and read as before.
template <bool kTiled, bool kPairWords>
ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::U32> packed,
                      ffi::AnyBuffer scales, ffi::Buffer<ffi::F32> codebook,
                      ffi::Buffer<ffi::F32> tensor_scale, ffi::Result<ffi::AnyBuffer> out, int32_t k,
                      int32_t scale_format) {
  MatmulLayout L;
  if (ffi::Error e =
          matmul_layout_of(x, packed, scales, codebook, tensor_scale, *out, k, scale_format, kTiled, &L);
      e.failure()) {
    return e;
  }
  L.pairs = kPairWords && stores_pairs(L.k, kTiled);
  if (L.m == 0 || L.n == 0) return ffi::Error::Success();
  const uint32_t* p = packed.typed_data();
  const void* sc = scales.untyped_data();
  const float* cb = codebook.typed_data();
  const float t = tensor_scale.typed_data()[0];
  with_float_operand(x, L.m * L.nb * kBlock, out, [&](auto tag, const float* xf, auto* o) {
    using X = decltype(tag);
    with_k(L.k, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      parallel_for(pool, L.n, kRowGrain,
                   [&](int64_t b, int64_t e) { matmul_rows<X, K>(L, xf, p, sc, cb, t, o, b, e); });
    });
  });
  return ffi::Error::Success();
}

template <bool kTiled, bool kPairWords>
ffi::Error MatmulTImpl(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::Buffer<ffi::U32> packed,
                       ffi::AnyBuffer scales, ffi::Buffer<ffi::F32> codebook,
                       ffi::Buffer<ffi::F32> tensor_scale, ffi::Result<ffi::AnyBuffer> out, int32_t k,
                       int32_t scale_format, int64_t d) {
  MatmulLayout L;
  if (ffi::Error e =
          matmul_t_layout_of(g, packed, scales, codebook, tensor_scale, *out, k, scale_format, kTiled, d, &L);
      e.failure()) {
    return e;
  }
  L.pairs = kPairWords && stores_pairs(L.k, kTiled);
  if (L.m == 0 || L.nb == 0) return ffi::Error::Success();
  const uint32_t* p = packed.typed_data();
  const void* sc = scales.untyped_data();
  const float* cb = codebook.typed_data();
  const float t = tensor_scale.typed_data()[0];
  with_float_operand(g, L.m * L.n, out, [&](auto tag, const float* gf, auto* o) {
    using X = decltype(tag);
    with_k(L.k, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      parallel_for(pool, L.nb, 1,
                   [&](int64_t b, int64_t e) { matmul_t_blocks<X, K>(L, d, gf, p, sc, cb, t, o, b, e); });
    });
  });
  return ffi::Error::Success();
}

// The bindings, shared by the plain and the tiled handler of each product.
auto matmul_binding() {
  return matmul_operands_binding<ffi::ThreadPool>().Attr<int32_t>("k").Attr<int32_t>("scale_format");
}

auto matmul_t_binding() { return matmul_binding().Attr<int64_t>("d"); }

}  // namespace
}  // namespace kbit

XLA_FFI_DEFINE_HANDLER_SYMBOL(KbitMatmulCpu, (kbit::MatmulImpl<false, false>), kbit::matmul_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(KbitMatmulTiledCpu, (kbit::MatmulImpl<true, false>), kbit::matmul_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(KbitMatmulTiledV2Cpu, (kbit::MatmulImpl<true, true>), kbit::matmul_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(KbitMatmulTCpu, (kbit::MatmulTImpl<false, false>), kbit::matmul_t_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(KbitMatmulTTiledCpu, (kbit::MatmulTImpl<true, false>),
                              kbit::matmul_t_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(KbitMatmulTTiledV2Cpu, (kbit::MatmulTImpl<true, true>),
                              kbit::matmul_t_binding());
