// Python module `jax_kbit._kbit_cuda`: hands the CUDA handlers to
// jax.ffi.register_ffi_target as capsules. The CUDA runtime is linked
// statically, so importing this needs no GPU and no CUDA libraries.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>

#include "cuda_handlers.h"

namespace nb = nanobind;

#ifndef KBIT_CUDA_ARCHITECTURES
#define KBIT_CUDA_ARCHITECTURES ""
#endif

NB_MODULE(_kbit_cuda, m) {
  m.def("registrations", []() {
    nb::dict d;
    d["kbit_quantize"] = nb::capsule(reinterpret_cast<void*>(KbitQuantizeCuda));
    d["kbit_dequantize"] = nb::capsule(reinterpret_cast<void*>(KbitDequantizeCuda));
    d["kbit_dequantize_tiled"] = nb::capsule(reinterpret_cast<void*>(KbitDequantizeTiledCuda));
    d["kbit_dequantize_tiled_v2"] = nb::capsule(reinterpret_cast<void*>(KbitDequantizeTiledV2Cuda));
    d["kbit_matmul"] = nb::capsule(reinterpret_cast<void*>(KbitMatmulCuda));
    d["kbit_matmul_t"] = nb::capsule(reinterpret_cast<void*>(KbitMatmulTCuda));
    d["kbit_matmul_tiled"] = nb::capsule(reinterpret_cast<void*>(KbitMatmulTiledCuda));
    d["kbit_matmul_tiled_v2"] = nb::capsule(reinterpret_cast<void*>(KbitMatmulTiledV2Cuda));
    d["kbit_matmul_t_tiled"] = nb::capsule(reinterpret_cast<void*>(KbitMatmulTTiledCuda));
    d["kbit_matmul_t_tiled_v2"] = nb::capsule(reinterpret_cast<void*>(KbitMatmulTTiledV2Cuda));
    return d;
  });
  m.def("architectures", []() { return std::string(KBIT_CUDA_ARCHITECTURES); });
}
