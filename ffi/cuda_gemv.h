// The fused matmul kernel for one or two rows of x at K <= 4 (cuda_gemv.cu), called by the matmul handler
// (cuda_matmul.cu), which takes every other case.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_mma.cuh"
#include "xla/ffi/api/ffi.h"

namespace kbit {
namespace cuda {

// Whether run_gemv takes this product: K <= 4, one or two rows of x, and a GPU that gives a CTA the kernel's
// 144-222 KB of shared memory (tables and staging buffers): compute capability 9.0 always, 8.0 only for
// K = 2 with one row, 8.6 / 8.9 never.
bool gemv_supported(int k, int64_t m);

// y = x @ W for a.m in {1, 2}, k in 2..4, 16-bit x (bf16 says which); a.n >= 1 and a.nb >= 1.
ffi::Error run_gemv(cudaStream_t stream, const MatmulArgs& a, bool bf16, int k);

}  // namespace cuda
}  // namespace kbit
