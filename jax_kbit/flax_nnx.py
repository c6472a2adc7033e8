"""Flax NNX integration: ``KbitLinear`` and ``quantize_model`` (needs ``pip install flax``).

This module imports flax; ``import jax_kbit`` does not import it. See docs/PARAMS.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jax_kbit.api import dequantize, quantize
from jax_kbit.matmul import matmul, quantize_matrix
from jax_kbit.params import (
    Layout,
    Rule,
    _check_codebook_spec,
    _check_k,
    _check_layout,
    _check_rules,
    _decide,
    _is_fit,
    _quantizable,
    _resolve_codebook,
    _Settings,
)
from jax_kbit.quantized_array import QuantizedArray
from jax_kbit.quantized_matrix import QuantizedMatrix
from jax_kbit.reference import FLOAT_DTYPES, SCALE_FORMATS

__all__ = ["KbitLinear", "QuantizedParam", "quantize_model"]


class QuantizedParam(nnx.Variable):
    """An ``nnx.Variable`` holding a ``QuantizedMatrix`` or ``QuantizedArray`` (read it with ``.get_value()``).

    It is deliberately not an ``nnx.Param``: optimizers and ``nnx.grad`` filtered on ``nnx.Param`` (or on
    ``nnx.LoRAParam``) leave quantized weights frozen, which is what fine-tuning on top of them needs.
    """


def _default_promote(arrays, dtype=None):
    arrays = tuple(a for a in arrays)
    if dtype is None:
        dtype = jnp.result_type(*(a for a in arrays if a is not None))
    return tuple(None if a is None else jnp.asarray(a, dtype) for a in arrays)


def _layer_layout(layout: str, linear: nnx.Linear, name: str) -> str:
    """``"matrix"`` / ``"array"`` for one ``nnx.Linear`` (``"auto"``: matrix unless it has its own dot_general)."""
    custom = getattr(linear, "dot_general", lax.dot_general) is not lax.dot_general
    if layout == "auto":
        return "array" if custom else "matrix"
    if layout == "matrix" and custom:
        raise ValueError(
            f"{name}: the layer has a custom dot_general, which a QuantizedMatrix kernel (multiplied by "
            "jax_kbit.matmul) cannot use; give it layout='array' or 'auto'"
        )
    return layout


class KbitLinear(nnx.Module):
    """A linear layer ``y = x @ W + b`` whose kernel ``W`` ``[in, out]`` is stored with k-bit codes.

    Two kernel layouts:

    - ``QuantizedMatrix`` (``jax_kbit.quantize_matrix``; what ``from_linear`` and ``quantize_model`` build by
      default): ``__call__`` is ``jax_kbit.matmul(x, W)``, which reads the codes directly. At up to
      ``jax_kbit.matmul.FUSED_MAX_ROWS`` rows (decoding) no dequantized weight is materialised; with more
      rows it dequantizes and calls ``dot_general`` by itself. On a GPU the fused kernel needs a float16 /
      bfloat16 computation dtype (set ``dtype=jnp.bfloat16``); float32 takes the dequantize path there.
      ``precision`` has no effect (the products accumulate in float32), ``dot_general`` must be
      ``lax.dot_general``, and ``preferred_element_type`` casts the result (computed in the computation
      dtype).
    - ``QuantizedArray`` (blocks along ``out``, the layout of jax-kbit 0.1): the kernel is dequantized
      straight to the computation dtype inside ``__call__`` and multiplied with ``dot_general``, so under
      ``jit`` one layer's weight is materialised at a time.

    The kernel lives in a ``QuantizedParam`` variable (not an ``nnx.Param``), the bias in an ``nnx.Param``;
    both survive ``nnx.split`` / ``nnx.merge``, ``nnx.jit`` and ``nnx.state``.

    Args:
      kernel: ``QuantizedMatrix`` or ``QuantizedArray`` of logical shape ``[in_features, out_features]``.
      bias: optional array ``[out_features]``.
      dtype: computation dtype (default: promoted from the input, the kernel's original dtype and the bias).
      precision: passed to ``dot_general`` (``QuantizedArray`` kernels only).
      dot_general: the product for ``QuantizedArray`` kernels; must stay ``lax.dot_general`` with a
        ``QuantizedMatrix`` kernel (``ValueError`` otherwise).
      promote_dtype: as in ``nnx.Linear``.
      preferred_element_type: as in ``nnx.Linear``.
    """

    def __init__(
        self,
        kernel: QuantizedMatrix | QuantizedArray,
        bias: Any = None,
        *,
        dtype: Any = None,
        precision: Any = None,
        dot_general: Any = lax.dot_general,
        promote_dtype: Any = None,
        preferred_element_type: Any = None,
    ) -> None:
        if not isinstance(kernel, (QuantizedMatrix, QuantizedArray)):
            raise TypeError(
                f"kernel must be a QuantizedMatrix or QuantizedArray, got {type(kernel).__name__}"
            )
        if kernel.ndim != 2:
            raise ValueError(f"kernel must have logical shape [in, out], got {kernel.shape}")
        if isinstance(kernel, QuantizedMatrix) and dot_general is not lax.dot_general:
            raise ValueError(
                "dot_general: a QuantizedMatrix kernel is multiplied by jax_kbit.matmul, so a custom "
                "dot_general would be ignored; pass a QuantizedArray kernel (layout='array') to keep it"
            )
        self.in_features, self.out_features = kernel.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.kernel = QuantizedParam(kernel)
        self.bias = nnx.Param(bias) if bias is not None else nnx.data(None)
        self.use_bias = bias is not None
        self.dtype = dtype
        self.precision = precision
        self.dot_general = dot_general
        self.promote_dtype = _default_promote if promote_dtype is None else promote_dtype
        self.preferred_element_type = preferred_element_type

    @classmethod
    def from_linear(
        cls,
        linear: nnx.Linear,
        k: int = 4,
        *,
        codebook: Any = None,
        scale_format: str = "e4m4",
        layout: Layout = "auto",
    ) -> KbitLinear:
        """Quantize an ``nnx.Linear``'s kernel (``codebook`` as in ``quantize_params``, ``"fit"`` included).

        ``layout``: ``"matrix"`` stores a ``QuantizedMatrix`` (the fused ``jax_kbit.matmul`` path),
        ``"array"`` a ``QuantizedArray`` (dequantize + ``dot_general``), ``"auto"`` (the default) the matrix
        unless the layer has a custom ``dot_general``, which only the array path can honour.
        """
        if not isinstance(linear, nnx.Linear):
            raise TypeError(f"linear must be an nnx.Linear, got {type(linear).__name__}")
        k = _check_k(k, "from_linear")
        if scale_format not in SCALE_FORMATS:
            raise ValueError(f"scale_format must be one of {SCALE_FORMATS}, got {scale_format!r}")
        _check_codebook_spec(codebook, "from_linear")
        layout = _layer_layout(_check_layout(layout, "from_linear"), linear, "from_linear")
        return cls._from_parts(
            linear, _quantize_kernel(linear.kernel[...], k, codebook, scale_format, layout)
        )

    @classmethod
    def _from_parts(cls, linear: nnx.Linear, q: QuantizedMatrix | QuantizedArray) -> KbitLinear:
        bias = linear.bias[...] if linear.bias is not None else None
        return cls(
            q,
            bias,
            dtype=linear.dtype,
            precision=linear.precision,
            dot_general=getattr(linear, "dot_general", lax.dot_general),
            promote_dtype=getattr(linear, "promote_dtype", None),
            preferred_element_type=getattr(linear, "preferred_element_type", None),
        )

    def __call__(self, inputs: Any) -> Any:
        q = self.kernel.get_value()
        bias = self.bias[...] if self.bias is not None else None
        target = self.dtype
        if target is None:
            target = jnp.result_type(inputs, q.dtype, *(() if bias is None else (bias,)))
        target = jnp.dtype(target)
        if isinstance(q, QuantizedMatrix) and target in FLOAT_DTYPES:
            # The fused path: x @ W straight from the codes, in the computation dtype.
            inputs, bias = self.promote_dtype((inputs, bias), dtype=target)
            y = matmul(inputs, q)
            if self.preferred_element_type is not None:
                y = y.astype(self.preferred_element_type)
            if bias is not None:
                y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
            return y
        # Dequantize straight to the computation dtype when the kernel can produce it.
        if isinstance(q, QuantizedMatrix):  # a computation dtype matmul does not take (float64)
            kernel = q.dequantize(None)
        else:
            kernel = dequantize(q, target if target in FLOAT_DTYPES else None)
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        kwargs = {}
        if self.preferred_element_type is not None:
            kwargs["preferred_element_type"] = self.preferred_element_type
        y = self.dot_general(
            inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision, **kwargs
        )
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


def _quantize_kernel(
    kernel: Any, k: int, codebook: Any, scale_format: str, layout: str, name: str = "kernel"
) -> QuantizedMatrix | QuantizedArray:
    """A Linear kernel ``[in, out]`` quantized in ``layout`` (``"matrix"`` or ``"array"``)."""
    if layout == "matrix":
        # A fitted codebook is fitted to the blocks the matrix stores: along `in`.
        blocked = jnp.swapaxes(kernel, 0, 1) if _is_fit(codebook) else kernel
        cb = _resolve_codebook(codebook, k, blocked, scale_format, name)
        return quantize_matrix(kernel, k, codebook=cb, scale_format=scale_format)
    cb = _resolve_codebook(codebook, k, kernel, scale_format, name)
    return quantize(kernel, k, codebook=cb, scale_format=scale_format)


def _get_child(parent: Any, name: Any) -> Any:
    return parent[name] if isinstance(name, int) else getattr(parent, name)


def _set_child(parent: Any, name: Any, value: Any) -> None:
    if isinstance(name, int):
        parent[name] = value
    else:
        setattr(parent, name, value)


def quantize_model(
    model: nnx.Module,
    rules: Sequence[Rule] | None = None,
    k: int = 4,
    *,
    min_size: int = 4096,
    codebook: Any = None,
    scale_format: str = "e4m4",
    layout: Layout = "auto",
    inplace: bool = True,
) -> nnx.Module:
    """Swap the ``nnx.Linear`` layers of ``model`` for ``KbitLinear``, one layer at a time.

    Each layer's name is its module path joined with ``/`` plus ``/kernel`` (``"blocks/0/mlp/up/kernel"``),
    so the ``Rule`` patterns written for ``quantize_params`` on ``nnx.state(model)`` select the same layers;
    the first matching rule decides (``skip``, ``k``, ``codebook``, ``scale_format``, ``layout``,
    ``min_size``); layers whose kernel has fewer than ``min_size`` elements stay ``nnx.Linear``. Only layers
    of type exactly ``nnx.Linear`` are swapped (subclasses such as ``nnx.LoRALinear`` are left alone).

    ``layout`` (default for layers no rule gives one): ``"auto"`` stores each kernel as a
    ``QuantizedMatrix``, so the layer runs the fused ``jax_kbit.matmul``, except for a layer with a custom
    ``dot_general`` (kept as a ``QuantizedArray``, dequantized + that ``dot_general``); ``"matrix"`` /
    ``"array"`` force one layout (``"matrix"`` raises ``ValueError`` for a layer with a custom
    ``dot_general``).

    The layers are quantized one by one and each original layer is dropped as soon as its replacement is in
    place, so peak memory is the model plus one layer's temporaries, not two full-precision copies. With
    ``inplace=False`` the model is first cloned with ``nnx.clone`` (sharing the unchanged arrays) and the
    original keeps its full-precision kernels.

    Returns:
      The model (the same object when ``inplace``).
    """
    k = _check_k(k, "quantize_model")
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"scale_format must be one of {SCALE_FORMATS}, got {scale_format!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative int, got {min_size!r}")
    _check_codebook_spec(codebook, "quantize_model")
    layout = _check_layout(layout, "quantize_model")
    rules = _check_rules(rules)
    default = _Settings(
        k=k, min_size=int(min_size), min_rank=2, codebook=codebook, scale_format=scale_format, layout=layout
    )
    hits = [0] * len(rules)
    if not inplace:
        model = nnx.clone(model)

    paths = [tuple(p) for p, m in nnx.iter_modules(model) if type(m) is nnx.Linear]
    for path in paths:
        if not path:  # the model itself is a Linear: nothing holds it, so it cannot be swapped in place
            raise TypeError("quantize_model needs a model that contains nnx.Linear layers, not a bare Linear")
        parent = model
        for name in path[:-1]:
            parent = _get_child(parent, name)
        linear = _get_child(parent, path[-1])
        name = "/".join(str(p) for p in path) + "/kernel"
        settings = _decide(name, rules, default, hits)
        if settings is None:
            continue
        kernel = linear.kernel[...]
        if not _quantizable(kernel, settings):
            continue
        layer_layout = _layer_layout(settings.layout, linear, f"quantize_model: {name}")
        q = _quantize_kernel(kernel, settings.k, settings.codebook, settings.scale_format, layer_layout, name)
        _set_child(parent, path[-1], KbitLinear._from_parts(linear, q))
        del kernel, linear, q  # the full-precision kernel is now unreferenced here
    for rule, n in zip(rules, hits):
        if n == 0:
            warnings.warn(f"quantize_model: {rule!r} matched no nnx.Linear layer", UserWarning, stacklevel=2)
    return model
