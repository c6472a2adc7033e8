// The CPU XLA FFI handlers, handed to Python as capsules by cpu_module.cc.
#pragma once

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(KbitQuantizeCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(KbitDequantizeCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(KbitDequantizeTiledCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(KbitDequantizeTiledV2Cpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(KbitMatmulCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(KbitMatmulTCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(KbitMatmulTiledCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(KbitMatmulTiledV2Cpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(KbitMatmulTTiledCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(KbitMatmulTTiledV2Cpu);
