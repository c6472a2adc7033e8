// Buffer-shape checks shared by the CPU and CUDA handlers: a handler called
// with inconsistent buffers returns an ffi::Error instead of reading or writing
// out of bounds.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "kbit_format.h"
#include "xla/ffi/api/ffi.h"

namespace kbit {

namespace ffi = xla::ffi;

// Where everything lives, in elements. Rows are the flattened leading
// dimensions of the data; rows are split into `groups` equal runs, each with
// its own codebook and tensor scale (vmap over codebooks lands here).
struct Layout {
  int64_t rows = 0;
  int64_t d = 0;   // elements per row
  int64_t nb = 0;  // blocks per row
  int64_t groups = 0;
  int64_t rows_per_group = 0;
  int k = 0;
  ScaleFormat format = ScaleFormat::kE4M4;
  bool pairs = false;  // tiled K = 4 words are pair indices (a _tiled_v2 dequantize; kbit_format.h)
};

inline std::string dims_str(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

inline ffi::DataType scale_dtype(ScaleFormat f) {
  return f == ScaleFormat::kE4M4  ? ffi::DataType::U8
         : f == ScaleFormat::kF16 ? ffi::DataType::F16
                                  : ffi::DataType::F32;
}

inline ffi::Error invalid(const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_kbit: " + msg);
}

// `data` is x for quantize and the output for dequantize.
inline ffi::Error make_layout(ffi::Span<const int64_t> data, ffi::DataType data_type,
                              ffi::Span<const int64_t> packed, ffi::DataType packed_type,
                              ffi::Span<const int64_t> scales, ffi::DataType scales_type,
                              ffi::Span<const int64_t> codebook, ffi::Span<const int64_t> tensor_scale,
                              int32_t k, int32_t format, Layout* out) {
  if (k < kMinK || k > kMaxK) return invalid("k must be in 2..5, got " + std::to_string(k));
  if (format < 0 || format > 2) return invalid("unknown scale format " + std::to_string(format));
  if (data_type != ffi::DataType::F16 && data_type != ffi::DataType::BF16 && data_type != ffi::DataType::F32)
    return invalid("data must be float16, bfloat16 or float32");
  if (packed_type != ffi::DataType::U32) return invalid("packed must be uint32");
  const ScaleFormat fmt = static_cast<ScaleFormat>(format);
  if (scales_type != scale_dtype(fmt)) return invalid("scales dtype does not match the scale format");
  const size_t r = data.size();
  if (r < 1) return invalid("data must have rank >= 1");
  const int64_t d = data[r - 1];
  const int64_t nb = (d + kBlock - 1) / kBlock;
  bool ok = packed.size() == r + 1 && packed[r - 1] == nb && packed[r] == k && scales.size() == r &&
            scales[r - 1] == nb;
  for (size_t i = 0; ok && i + 1 < r; ++i) ok = packed[i] == data[i] && scales[i] == data[i];
  if (!ok) {
    return invalid("inconsistent buffers: data " + dims_str(data) + ", packed " + dims_str(packed) +
                   ", scales " + dims_str(scales) + " for k=" + std::to_string(k));
  }
  const size_t g = codebook.size();
  if (g < 1 || codebook[g - 1] != (int64_t{1} << k) || g > r || tensor_scale.size() != g - 1) {
    return invalid("codebook " + dims_str(codebook) + " / tensor_scale " + dims_str(tensor_scale) +
                   " do not match data " + dims_str(data) + " for k=" + std::to_string(k));
  }
  int64_t rows = 1, groups = 1;
  for (size_t i = 0; i + 1 < r; ++i) rows *= data[i];
  for (size_t i = 0; i + 1 < g; ++i) {
    if (codebook[i] != data[i] || tensor_scale[i] != data[i])
      return invalid("codebook/tensor_scale group dims must be leading dims of the data");
    groups *= codebook[i];
  }
  out->rows = rows;
  out->d = d;
  out->nb = nb;
  out->groups = groups;
  out->rows_per_group = groups > 0 ? rows / groups : 0;
  out->k = k;
  out->format = fmt;
  return ffi::Error::Success();
}

// make_layout on the buffers themselves (ffi::AnyBuffer / ffi::Buffer<...>, results dereferenced), so each
// handler names its buffers once and the argument order lives here only.
template <typename Data, typename Packed, typename Scales, typename Codebook, typename TensorScale>
ffi::Error layout_of(const Data& data, const Packed& packed, const Scales& scales, const Codebook& codebook,
                     const TensorScale& tensor_scale, int32_t k, int32_t format, Layout* out) {
  return make_layout(data.dimensions(), data.element_type(), packed.dimensions(), packed.element_type(),
                     scales.dimensions(), scales.element_type(), codebook.dimensions(),
                     tensor_scale.dimensions(), k, format, out);
}

// The FFI binding of dequantize (packed, scales, codebook, tensor scale -> out), for the CPU (Ctx =
// ffi::ThreadPool) and CUDA (ffi::PlatformStream<cudaStream_t>) handlers, row-order and tiled alike.
template <typename Ctx>
auto dequantize_binding() {
  return ffi::Ffi::Bind()
      .template Ctx<Ctx>()
      .template Arg<ffi::Buffer<ffi::U32>>()
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Ret<ffi::AnyBuffer>()
      .template Attr<int32_t>("k")
      .template Attr<int32_t>("scale_format");
}

// The operands of the fused products (x, packed, scales, codebook, tensor scale -> y), the same for the CPU
// and CUDA handlers, plain and tiled; each platform adds what only it has (CUDA: a workspace result) and
// the attributes (k, scale_format; the transposed product also d).
template <typename Ctx>
auto matmul_operands_binding() {
  return ffi::Ffi::Bind()
      .template Ctx<Ctx>()
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::Buffer<ffi::U32>>()
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Ret<ffi::AnyBuffer>();
}

// A dequantize of tile-ordered words and scales (a stack of tiled matrices, kbit_format.h block_index) needs
// whole tiles in every codebook group: rows per group a multiple of 16, blocks per row a multiple of 4.
inline ffi::Error check_tiled_rows(const Layout& L, bool tiled, ffi::Span<const int64_t> packed) {
  if (!tiled || (L.rows_per_group % kTileRows == 0 && L.nb % kTileBlocks == 0)) return ffi::Error::Success();
  return invalid(
      "tile-ordered words need rows % 16 == 0 per codebook group and a multiple of 4 blocks per "
      "row, got packed " +
      dims_str(packed));
}

// The fused matmul y = x @ W with W [in, out] stored as format v1 of W^T: x [..., nb * 32] (padded with
// zeros to whole blocks), packed [out, nb, k], scales [out, nb], codebook [2**k], tensor_scale [],
// y [..., out] in x's dtype.
struct MatmulLayout {
  int64_t m = 0;   // rows of x (its leading dims flattened)
  int64_t n = 0;   // out
  int64_t nb = 0;  // blocks along in
  int k = 0;
  ScaleFormat format = ScaleFormat::kE4M4;
  bool tiled = false;  // the words and scales in tile order (kbit_format.h, block_index)
  bool pairs = false;  // and K = 4 words as pair indices (the _tiled_v2 handlers; kbit_format.h stores_pairs)
};

template <typename X, typename Packed, typename Scales, typename Codebook, typename TensorScale, typename Out>
ffi::Error matmul_layout_of(const X& x, const Packed& packed, const Scales& scales, const Codebook& codebook,
                            const TensorScale& tensor_scale, const Out& out, int32_t k, int32_t format,
                            bool tiled, MatmulLayout* L) {
  if (k < kMinK || k > kMaxK) return invalid("k must be in 2..5, got " + std::to_string(k));
  if (format < 0 || format > 2) return invalid("unknown scale format " + std::to_string(format));
  const ffi::DataType xt = x.element_type();
  if (xt != ffi::DataType::F16 && xt != ffi::DataType::BF16 && xt != ffi::DataType::F32)
    return invalid("x must be float16, bfloat16 or float32");
  if (out.element_type() != xt) return invalid("the matmul output must have x's dtype");
  const ScaleFormat fmt = static_cast<ScaleFormat>(format);
  if (packed.element_type() != ffi::DataType::U32) return invalid("packed must be uint32");
  if (scales.element_type() != scale_dtype(fmt))
    return invalid("scales dtype does not match the scale format");
  const auto xd = x.dimensions(), pd = packed.dimensions(), sd = scales.dimensions(), od = out.dimensions();
  const size_t r = xd.size();
  bool ok = r >= 1 && pd.size() == 3 && pd[2] == k && sd.size() == 2 && sd[0] == pd[0] && sd[1] == pd[1] &&
            xd[r - 1] == pd[1] * kBlock && od.size() == r && od[r - 1] == pd[0];
  for (size_t i = 0; ok && i + 1 < r; ++i) ok = od[i] == xd[i];
  if (!ok) {
    return invalid("inconsistent matmul buffers: x " + dims_str(xd) + ", packed " + dims_str(pd) +
                   ", scales " + dims_str(sd) + ", out " + dims_str(od) + " for k=" + std::to_string(k));
  }
  if (codebook.dimensions().size() != 1 || codebook.dimensions()[0] != (int64_t{1} << k) ||
      tensor_scale.dimensions().size() != 0) {
    return invalid("matmul takes one codebook [" + std::to_string(1 << k) + "] and a scalar tensor_scale");
  }
  int64_t m = 1;
  for (size_t i = 0; i + 1 < r; ++i) m *= xd[i];
  L->m = m;
  L->n = pd[0];
  L->nb = pd[1];
  L->k = k;
  L->format = fmt;
  L->tiled = tiled;
  if (tiled && (L->n % kTileRows != 0 || L->nb % kTileBlocks != 0)) {
    return invalid("a tiled matrix needs out % 16 == 0 and a multiple of 4 blocks along in, got packed " +
                   dims_str(pd));
  }
  return ffi::Error::Success();
}

// The transposed product y = g @ W^T: g [..., out], y [..., nb * 32] (zeros past d). Its buffers are those of
// the forward product with the roles of x and y exchanged, so the same check applies; L->m counts g's rows.
template <typename G, typename Packed, typename Scales, typename Codebook, typename TensorScale, typename Out>
ffi::Error matmul_t_layout_of(const G& g, const Packed& packed, const Scales& scales,
                              const Codebook& codebook, const TensorScale& tensor_scale, const Out& out,
                              int32_t k, int32_t format, bool tiled, int64_t d, MatmulLayout* L) {
  if (ffi::Error e = matmul_layout_of(out, packed, scales, codebook, tensor_scale, g, k, format, tiled, L);
      e.failure()) {
    return e;
  }
  if (d < 0 || d > L->nb * kBlock || (L->nb > 0 && d <= (L->nb - 1) * kBlock)) {
    return invalid("d=" + std::to_string(d) + " does not match " + std::to_string(L->nb) + " blocks");
  }
  return ffi::Error::Success();
}

// Turns the run-time k into a template argument: fn(std::integral_constant<int, K>{}).
template <typename Fn>
void with_k(int k, const Fn& fn) {
  switch (k) {
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    default: fn(std::integral_constant<int, 5>{}); break;
  }
}

}  // namespace kbit
