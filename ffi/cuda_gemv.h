// The fused matmul kernel for one or two rows of x at K <= 4 (cuda_gemv.cu), called by the matmul handler
// (cuda_matmul.cu), which takes every other case.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_mma.cuh"
#include "xla/ffi/api/ffi.h"

namespace kbit {
namespace cuda {

// Whether run_gemv takes this product: K <= 4, one or two rows of x of nb blocks each, and a GPU that gives a
// CTA the kernel's shared memory: 64 KB of tables and a copy of x, 128 KB at least (compute capability 9.0:
// up to about 36K elements of x in all; 8.0: about 24K; 8.6 / 8.9 never).
bool gemv_supported(int k, int64_t m, int64_t nb);

// y = x @ W for a.m in {1, 2}, k in 2..4, 16-bit x (bf16 says which); a.n >= 1 and a.nb >= 1.
ffi::Error run_gemv(cudaStream_t stream, const MatmulArgs& a, bool bf16, int k);

}  // namespace cuda
}  // namespace kbit
