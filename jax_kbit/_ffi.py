"""Loads the compiled handlers and registers them with XLA under one target name per operation."""

from __future__ import annotations

import jax

try:
    from jax_kbit import _kbit_cpu
except ImportError as err:  # the source tree has no compiled module
    raise ImportError(
        "jax_kbit's compiled module is missing: this is probably the source tree shadowing the installed "
        "package. Install with `pip install .` and run from another directory, or use `python -P`."
    ) from err

TARGETS = (
    "kbit_quantize",
    "kbit_dequantize",
    "kbit_dequantize_tiled",
    "kbit_dequantize_tiled_v2",
    "kbit_matmul",
    "kbit_matmul_t",
    "kbit_matmul_tiled",
    "kbit_matmul_tiled_v2",
    "kbit_matmul_t_tiled",
    "kbit_matmul_t_tiled_v2",
)
"""Every target registered. The ``_tiled`` ones read tile order with K = 4 words as bit planes (modules
exported before the pair words existed call them); what jax_kbit lowers to today is the ``_tiled_v2`` ones,
which read K = 4 words as pair indices (docs/FORMAT.md section 14)."""

for _name, _capsule in _kbit_cpu.registrations().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")

try:  # The CUDA module is optional: it is built only where nvcc was found.
    from jax_kbit import _kbit_cuda
except ImportError as _err:  # pragma: no cover - depends on the build
    _kbit_cuda = None
    CUDA_IMPORT_ERROR: str | None = str(_err)
else:
    CUDA_IMPORT_ERROR = None
    for _name, _capsule in _kbit_cuda.registrations().items():
        jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")


def cuda_built() -> bool:
    """Whether this installation has the CUDA handlers (it may still run on a machine without a GPU)."""
    return _kbit_cuda is not None


def cuda_architectures() -> tuple[str, ...]:
    """The GPU architectures the CUDA handlers were compiled for (empty without the CUDA module)."""
    return tuple(_kbit_cuda.architectures().split(",")) if _kbit_cuda is not None else ()
