"""Flax Linen integration: ``KbitDense`` (needs ``pip install flax``).

``KbitDense`` is a drop-in for ``nn.Dense`` whose ``params`` hold the kernel as a ``QuantizedMatrix`` (or
a ``QuantizedArray``), laid out exactly as ``quantize_params`` leaves an ``nn.Dense``'s params (``kernel``
[in, out], ``bias``), so a model written with ``KbitDense`` applies ``quantize_params(dense_params)``
directly: each layer multiplies with ``jax_kbit.matmul`` straight from the codes (a ``QuantizedMatrix``,
the default for ``kernel`` leaves) or dequantizes its own kernel (a ``QuantizedArray``). A model that keeps
``nn.Dense`` applies them through ``dequantize_params``::

    model.apply({"params": jax_kbit.dequantize_params(qparams)}, x)   # inside jax.jit

which materialises all weights at the start of the call (simplest; use ``KbitDense`` to avoid it).
This module imports flax; ``import jax_kbit`` does not import it. See docs/PARAMS.md.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from jax_kbit.api import dequantize, quantize
from jax_kbit.matmul import matmul, quantize_matrix
from jax_kbit.params import _check_layout
from jax_kbit.quantized_array import QuantizedArray
from jax_kbit.quantized_matrix import QuantizedMatrix
from jax_kbit.reference import FLOAT_DTYPES

__all__ = ["KbitDense"]


class KbitDense(nn.Module):
    """``y = x @ W + b`` with ``W`` ``[in, features]`` read from ``params["kernel"]`` in k-bit codes.

    ``params["kernel"]`` is a ``QuantizedMatrix`` (multiplied with ``jax_kbit.matmul``, which reads the codes
    directly: no dequantized weight at up to ``FUSED_MAX_ROWS`` rows; on a GPU only in a float16 / bfloat16
    computation ``dtype``), a ``QuantizedArray`` (dequantized to
    the computation dtype, then ``lax.dot_general``), or a plain array (a layer ``quantize_params`` left in
    full precision, e.g. below ``min_size``; used as is). ``init`` draws a full-precision kernel with
    ``kernel_init`` and stores it quantized with ``k`` / ``codebook`` / ``scale_format`` / ``layout``; when
    applying existing params those attributes are ignored (the stored kernel carries its own).

    Attributes:
      features: output size.
      use_bias: whether to add ``params["bias"]``.
      dtype: computation dtype (default: promoted from the input, the kernel's original dtype and the bias).
      param_dtype: dtype of freshly initialised parameters.
      precision: passed to ``lax.dot_general`` (not used with a ``QuantizedMatrix`` kernel, whose products
        accumulate in float32).
      k, codebook, scale_format: how ``init`` quantizes the kernel.
      layout: how ``init`` stores it: ``"auto"`` (the default) and ``"matrix"`` give a ``QuantizedMatrix``,
        ``"array"`` a ``QuantizedArray``.
    """

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    k: int = 4
    codebook: Any = None
    scale_format: str = "e4m4"
    layout: str = "auto"

    def _quantize_init(self, w: Any) -> QuantizedMatrix | QuantizedArray:
        layout = _check_layout(self.layout, f"KbitDense {self.name}")
        kwargs = dict(codebook=self.codebook, scale_format=self.scale_format)
        if layout == "array":
            return quantize(w, self.k, **kwargs)
        return quantize_matrix(w, self.k, **kwargs)

    @nn.compact
    def __call__(self, inputs: Any) -> Any:
        in_features = inputs.shape[-1]
        shape = (in_features, self.features)
        if self.has_variable("params", "kernel"):
            # Read directly: self.param would compare the stored leaves with a fresh init's, and a stored
            # kernel may use another k or layout than this module's attributes (mixed precision).
            kernel = self.get_variable("params", "kernel")
        else:
            kernel = self.param(
                "kernel", lambda rng: self._quantize_init(self.kernel_init(rng, shape, self.param_dtype))
            )
        if tuple(kernel.shape) != shape:
            raise ValueError(
                f"KbitDense {self.name}: kernel has shape {tuple(kernel.shape)}, expected {shape}"
            )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        )

        dtype = self.dtype
        if dtype is None:
            dtype = jnp.result_type(inputs, kernel.dtype, *(() if bias is None else (bias,)))
        dtype = jnp.dtype(dtype)
        if isinstance(kernel, QuantizedMatrix) and dtype in FLOAT_DTYPES:
            y = matmul(jnp.asarray(inputs, dtype), kernel)
            if bias is not None:
                y = y + jnp.reshape(jnp.asarray(bias, dtype), (1,) * (y.ndim - 1) + (-1,))
            return y
        if isinstance(kernel, QuantizedMatrix):  # a computation dtype matmul does not take (float64)
            kernel = kernel.dequantize(None)
        elif isinstance(kernel, QuantizedArray):
            kernel = dequantize(kernel, dtype if dtype in FLOAT_DTYPES else None)
        inputs, kernel = jnp.asarray(inputs, dtype), jnp.asarray(kernel, dtype)
        y = lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        if bias is not None:
            y = y + jnp.reshape(jnp.asarray(bias, dtype), (1,) * (y.ndim - 1) + (-1,))
        return y
