"""``quantize`` and ``dequantize``: argument checking at trace time, then the primitives."""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_kbit import codebooks, exporting  # noqa: F401  (exporting: QuantizedArray export serialization)
from jax_kbit.primitives import dequantize_p, num_blocks, quantize_p
from jax_kbit.quantized_array import QuantizedArray
from jax_kbit.quantized_matrix import QuantizedMatrix
from jax_kbit.reference import FLOAT_DTYPES, SCALE_DTYPES, SCALE_FORMATS, SCALE_MAX

ScaleFormat = Literal["e4m4", "f16", "f32"]


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int in 2..5, got {type(k).__name__}")
    if not 2 <= int(k) <= 5:
        raise ValueError(f"k must be in 2..5, got {k}")
    return int(k)


def _check_scale_format(scale_format: Any) -> str:
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"scale_format must be one of {SCALE_FORMATS}, got {scale_format!r}")
    return scale_format


def _check_float_dtype(dtype: Any, name: str) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {dtype!r}") from err
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {dt.name}")
    return dt


def _is_concrete(a: Any) -> bool:
    return not isinstance(a, jax.core.Tracer)


def _check_codebook(codebook: Any, k: int) -> jax.Array:
    if codebook is None:
        return jnp.asarray(codebooks.default(k))
    dtype = getattr(codebook, "dtype", None)
    if dtype is None:
        raise TypeError(f"codebook must be a float32 array of {2**k} entries, got {type(codebook).__name__}")
    if np.dtype(dtype) != np.float32:
        raise TypeError(f"codebook must be float32, got {np.dtype(dtype).name} (convert it explicitly)")
    if codebook.ndim != 1:
        raise ValueError(f"codebook must have rank 1, got shape {tuple(codebook.shape)}")
    if codebook.shape[0] != 2**k:
        raise ValueError(f"codebook must have 2**k = {2**k} entries for k={k}, got {codebook.shape[0]}")
    if _is_concrete(codebook) and not np.isfinite(np.asarray(codebook)).all():
        raise ValueError("codebook entries must be finite")
    return jnp.asarray(codebook)


def _check_power_of_two(value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"tensor_scale must be a positive finite power of two, got {value}")
    mant, exp = math.frexp(value)
    if mant != 0.5 or not -126 <= exp - 1 <= 127:
        raise ValueError(f"tensor_scale must be a power of two in [2**-126, 2**127], got {value}")


def auto_tensor_scale(x: jax.Array, scale_format: ScaleFormat) -> jax.Array:
    """The default tensor scale: the smallest power of two ``t >= 2**-126`` with ``amax <= MAX * t``.

    ``amax`` is the largest |x| over finite elements, ``MAX`` 30 (e4m4) or 65504 (f16); ``t = 1`` for "f32"
    and when there is no finite non-zero element. Exact: found from amax's exponent with integer arithmetic.
    """
    if scale_format == "f32" or x.size == 0:
        return jnp.float32(1)
    # Everything on the float32 bit patterns (|x| as uint32 orders like |x|): XLA's CPU backend flushes
    # subnormals to zero in float arithmetic, comparisons and reductions, which would lose a subnormal amax.
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32) & jnp.uint32(0x7FFFFFFF)
    amax_bits = jnp.max(jnp.where(bits < jnp.uint32(0x7F800000), bits, jnp.uint32(0)))  # finite only
    fmt_max = SCALE_MAX[scale_format]
    floor_log2_max = math.floor(math.log2(fmt_max))
    exponent = (amax_bits >> 23).astype(jnp.int32) - 127
    e0 = jnp.maximum(exponent - floor_log2_max, -126)  # the answer is e0 or e0 + 1

    def pow2(e):
        return lax.bitcast_convert_type(((e + 127) << 23).astype(jnp.uint32), jnp.float32)

    limit_bits = lax.bitcast_convert_type(jnp.float32(fmt_max) * pow2(e0), jnp.uint32)  # exact, normal
    e = jnp.where(amax_bits > limit_bits, e0 + 1, e0)
    return jnp.where(amax_bits == 0, jnp.float32(1), pow2(e))


def _check_tensor_scale(tensor_scale: Any, x: jax.Array, scale_format: ScaleFormat) -> jax.Array:
    if isinstance(tensor_scale, str):
        if tensor_scale != "auto":
            raise ValueError(
                f"tensor_scale must be 'auto', a power of two or a float32 scalar, got {tensor_scale!r}"
            )
        return auto_tensor_scale(x, scale_format)
    if isinstance(tensor_scale, bool):
        raise TypeError("tensor_scale must be 'auto' or a power of two, got a bool")
    if isinstance(tensor_scale, (int, float, np.integer, np.floating)):
        _check_power_of_two(float(tensor_scale))
        return jnp.float32(tensor_scale)
    dtype = getattr(tensor_scale, "dtype", None)
    if dtype is None or np.dtype(dtype) != np.float32 or tuple(tensor_scale.shape) != ():
        raise TypeError(
            f"tensor_scale must be 'auto', a Python float or a float32 scalar array, got {tensor_scale!r}"
        )
    if _is_concrete(tensor_scale):
        _check_power_of_two(float(np.asarray(tensor_scale)))
    return jnp.asarray(tensor_scale)


def quantize(
    x: Any,
    k: int = 4,
    *,
    codebook: Any = None,
    scale_format: ScaleFormat = "e4m4",
    tensor_scale: float | jax.Array | Literal["auto"] = "auto",
) -> QuantizedArray:
    """Quantize ``x`` to ``k`` bits per element in blocks of 32 along the last axis (format v1).

    Args:
      x: float16, bfloat16 or float32 array of rank >= 1 (a jax or NumPy array; never converted silently).
      k: bits per element, 2..5.
      codebook: float32 array of ``2**k`` entries (any order, duplicates allowed); default
        ``jax_kbit.codebooks.lloyd_max(k)``.
      scale_format: how block scales are stored: ``"e4m4"`` (1 byte, default), ``"f16"`` or ``"f32"``.
      tensor_scale: ``"auto"`` (fit the largest finite |x| into the scale format's range) or a power of two.

    Returns:
      A ``QuantizedArray``; ``dequantize`` turns it back into an array. Works under ``jit``, ``vmap`` and
      ``grad``-free transformations; blocks holding NaN or inf come back as all-NaN.
    """
    k = _check_k(k)
    scale_format = _check_scale_format(scale_format)
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"x must be a jax or NumPy array, got {type(x).__name__}")
    dtype = _check_float_dtype(x.dtype, "x")
    if len(x.shape) < 1:
        raise ValueError("x must have rank >= 1 (blocks run along the last axis), got a scalar")
    x = jnp.asarray(x)
    cb = _check_codebook(codebook, k)
    ts = _check_tensor_scale(tensor_scale, x, scale_format)
    packed, scales = quantize_p.bind(x, cb, ts, k=k, scale_format=scale_format)
    return QuantizedArray(packed, scales, cb, ts, k=k, d=x.shape[-1], dtype=dtype, scale_format=scale_format)


def dequantize(q: QuantizedArray | QuantizedMatrix, dtype: Any = None) -> jax.Array:
    """Reconstruct the array from a ``QuantizedArray``: ``codebook[code] * scale`` in float32, then cast.

    Args:
      q: the quantized array; a ``QuantizedMatrix`` gives its logical ``[..., in, out]`` weight (the
        transpose of ``dequantize(q.t)``), as ``q.dequantize(dtype)`` does.
      dtype: float16, bfloat16 or float32; default: the dtype ``q`` was quantized from.
    """
    if isinstance(q, QuantizedMatrix):
        return q.dequantize(dtype)
    if not isinstance(q, QuantizedArray):
        raise TypeError(f"q must be a QuantizedArray or QuantizedMatrix, got {type(q).__name__}")
    return dequantize_stored(q, dtype)


def dequantize_stored(q: QuantizedArray, dtype: Any = None, *, tiled: bool = False) -> jax.Array:
    """``dequantize`` of checked leaves; ``tiled``: ``q``'s words and scales are in the tile order of a
    ``QuantizedMatrix`` (``q`` is its ``stored``), and the result is in row order all the same."""
    out_dtype = q.dtype if dtype is None else _check_float_dtype(dtype, "dtype")
    k = _check_k(q.k)
    scale_format = _check_scale_format(q.scale_format)
    packed, scales = q.packed, q.scales
    if (
        np.dtype(packed.dtype) != np.uint32
        or packed.ndim < 2
        or tuple(packed.shape[-2:]) != (num_blocks(q.d), k)
    ):
        raise ValueError(
            f"packed must be uint32 [..., {num_blocks(q.d)}, {k}] for d={q.d}, k={k}; "
            f"got {np.dtype(packed.dtype).name}{list(packed.shape)}"
        )
    if np.dtype(scales.dtype) != SCALE_DTYPES[scale_format] or tuple(scales.shape) != tuple(
        packed.shape[:-1]
    ):
        raise ValueError(
            f"scales must be {SCALE_DTYPES[scale_format].name}{list(packed.shape[:-1])}; "
            f"got {np.dtype(scales.dtype).name}{list(scales.shape)}"
        )
    cb, ts = q.codebook, q.tensor_scale
    if np.dtype(cb.dtype) != np.float32 or cb.ndim < 1 or cb.shape[-1] != 2**k:
        raise ValueError(
            f"codebook must be float32 [..., {2**k}], got {np.dtype(cb.dtype).name}{list(cb.shape)}"
        )
    g = cb.ndim - 1
    if tuple(cb.shape[:-1]) != tuple(packed.shape[:g]) or tuple(ts.shape) != tuple(cb.shape[:-1]):
        raise ValueError(
            f"codebook {list(cb.shape)} and tensor_scale {list(ts.shape)} do not match packed {list(packed.shape)}"
        )
    if np.dtype(ts.dtype) != np.float32:
        raise ValueError(f"tensor_scale must be float32, got {np.dtype(ts.dtype).name}")
    return dequantize_p.bind(
        jnp.asarray(packed),
        jnp.asarray(scales),
        jnp.asarray(cb),
        jnp.asarray(ts),
        k=k,
        scale_format=scale_format,
        d=q.d,
        dtype=out_dtype,
        tiled=tiled,
    )
