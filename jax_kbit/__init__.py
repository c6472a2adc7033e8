"""jax-kbit: k-bit (K = 2..5) blockwise codebook quantization for JAX.

``quantize`` turns a float array into a ``QuantizedArray`` (2..5-bit codes in blocks of 32 with one scale per
block); ``dequantize`` turns it back. Both are JAX primitives lowered to C++ (CPU) and CUDA XLA FFI handlers,
so they compose with ``jit`` and ``vmap``. ``quantize_calibrated`` chooses the codes and scales of a
weight matrix for a small error of the layer's outputs on calibration inputs (GPTQ-style, NumPy on the host);
its result is an ordinary ``QuantizedArray``. The format is defined in docs/FORMAT.md and executably in
``jax_kbit.reference``.
"""

from jax_kbit import autodiff, calibrate, codebooks, e4m4, reference  # autodiff: registers the JVP rules
from jax_kbit._ffi import cuda_architectures, cuda_built
from jax_kbit.api import auto_tensor_scale, dequantize, quantize
from jax_kbit.calibrate import quantize_calibrated
from jax_kbit.matmul import matmul, quantize_matrix
from jax_kbit.params import Rule, compression_report, dequantize_params, fit_codebook, quantize_params
from jax_kbit.quantized_array import QuantizedArray
from jax_kbit.quantized_matrix import QuantizedMatrix

__version__ = "0.1.0"
__all__ = [
    "QuantizedArray",
    "QuantizedMatrix",
    "Rule",
    "auto_tensor_scale",
    "autodiff",
    "calibrate",
    "codebooks",
    "compression_report",
    "cuda_architectures",
    "cuda_built",
    "dequantize",
    "dequantize_params",
    "e4m4",
    "fit_codebook",
    "matmul",
    "quantize",
    "quantize_calibrated",
    "quantize_matrix",
    "quantize_params",
    "reference",
]
