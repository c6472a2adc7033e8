// Python module `jax_kbit._kbit_cpu`: hands the CPU handlers to
// jax.ffi.register_ffi_target as capsules.
#include <nanobind/nanobind.h>

#include "cpu_handlers.h"

namespace nb = nanobind;

NB_MODULE(_kbit_cpu, m) {
  m.def("registrations", []() {
    nb::dict d;
    d["kbit_quantize"] = nb::capsule(reinterpret_cast<void*>(KbitQuantizeCpu));
    d["kbit_dequantize"] = nb::capsule(reinterpret_cast<void*>(KbitDequantizeCpu));
    d["kbit_dequantize_tiled"] = nb::capsule(reinterpret_cast<void*>(KbitDequantizeTiledCpu));
    d["kbit_dequantize_tiled_v2"] = nb::capsule(reinterpret_cast<void*>(KbitDequantizeTiledV2Cpu));
    d["kbit_matmul"] = nb::capsule(reinterpret_cast<void*>(KbitMatmulCpu));
    d["kbit_matmul_t"] = nb::capsule(reinterpret_cast<void*>(KbitMatmulTCpu));
    d["kbit_matmul_tiled"] = nb::capsule(reinterpret_cast<void*>(KbitMatmulTiledCpu));
    d["kbit_matmul_tiled_v2"] = nb::capsule(reinterpret_cast<void*>(KbitMatmulTiledV2Cpu));
    d["kbit_matmul_t_tiled"] = nb::capsule(reinterpret_cast<void*>(KbitMatmulTTiledCpu));
    d["kbit_matmul_t_tiled_v2"] = nb::capsule(reinterpret_cast<void*>(KbitMatmulTTiledV2Cpu));
    return d;
  });
}
