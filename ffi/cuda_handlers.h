// The CUDA XLA FFI handlers, handed to Python as capsules by cuda_module.cc.
#pragma once

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(KbitQuantizeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(KbitDequantizeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(KbitDequantizeTiledCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(KbitDequantizeTiledV2Cuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(KbitMatmulCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(KbitMatmulTCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(KbitMatmulTiledCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(KbitMatmulTiledV2Cuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(KbitMatmulTTiledCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(KbitMatmulTTiledV2Cuda);
