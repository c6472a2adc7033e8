"""Differentiation rules for the k-bit primitives (imported by ``jax_kbit``; nothing to call here).

``dequantize`` is differentiable. Its output is ``cast(C[c] * S)`` with the codes ``c`` fixed by ``packed``
and the block scale ``S = decode(stored) * t``, so it is linear in the codebook ``C`` and, separately, in
the decoded scale. The JVP rule registered on ``dequantize_p`` gives

    d out = cast(dC[c] * S + C[c] * dS),   dS = decode(d stored) * t + decode(stored) * dt

where ``d stored`` is zero for the uint8 (E4M4) scale format (and ``packed`` never has a tangent: codes
are integers). The tangent is written with ordinary ``jax.numpy`` operations (a gather from the codebook
tangent and products with constants), so JAX transposes it by itself: reverse mode needs no hand-written
transpose, and the codebook's cotangent is the per-code sum ``sum_{i: c_i = j} ct_i * S_i``. Tangents that
are symbolically zero cost nothing: for the QLoRA pattern (gradients wrt activations or adapters, weights
frozen) the rule only ever computes the primal, through the FFI kernel.

Why a rule on the primitive rather than ``jax.custom_jvp`` on the public ``dequantize``: the primitive rule
sees JAX's symbolic zeros directly, so nothing is materialised for frozen weights; it also covers every way
the primitive is bound (``vmap``-grouped codebooks, exported or sharded calls) without wrapping the
``QuantizedArray`` pytree, whose integer leaves would need float0 tangents in a ``custom_jvp``.

``quantize`` is not differentiable: rounding to a code has derivative zero almost everywhere, and quietly
returning zeros would let a training loop run without learning anything. Differentiating through it raises
``QuantizeNotDifferentiableError`` (a ``TypeError``) at trace time. Quantize ``jax.lax.stop_gradient(x)``
for an explicit zero gradient, or use a straight-through estimator, quantizing the stopped value so that
``quantize`` never sees a tangent::

    xs = jax.lax.stop_gradient(x)
    x_ste = x - xs + dequantize(quantize(xs))   # forward: the quantized value; backward: identity

(The idiom ``x + stop_gradient(dequantize(quantize(x)) - x)`` still traces ``quantize`` with a tangent and
raises.)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad

from jax_kbit import e4m4
from jax_kbit.primitives import dequantize_p, quantize_p
from jax_kbit.quantized_matrix import untile_arrays
from jax_kbit.reference import BLOCK, SCALE_MAX

_E4M4_TABLE = np.asarray(e4m4.decode(np.arange(256, dtype=np.uint8)), dtype=np.float32)
_FLT_MAX = np.float32(SCALE_MAX["f32"])


class QuantizeNotDifferentiableError(TypeError):
    """Raised when JAX differentiates through ``jax_kbit.quantize``."""


def _is_zero(t) -> bool:
    return type(t) is ad.Zero


def unpack_codes(packed, k: int):
    """packed uint32 ``[..., nb, k]`` -> int32 codes ``[..., nb, 32]`` (plain ``jax.numpy``)."""
    lanes = jnp.arange(BLOCK, dtype=jnp.uint32)
    bits = (packed[..., :, None] >> lanes) & jnp.uint32(1)  # [..., nb, k, 32]
    planes = jnp.arange(k, dtype=jnp.uint32)[:, None]
    return jnp.sum(bits << planes, axis=-2, dtype=jnp.uint32).astype(jnp.int32)


def decode_block_scales(scales, scale_format: str):
    """Stored block scales -> float32 values before the tensor scale (E4M4 through a 256-entry table)."""
    if scale_format == "e4m4":
        return jnp.asarray(_E4M4_TABLE)[scales.astype(jnp.int32)]
    return scales.astype(jnp.float32)


def _group_broadcast(t, ndim: int):
    """Tensor scale ``[*G]`` shaped to broadcast against an array of rank ``ndim`` with leading dims G."""
    return jnp.reshape(t, t.shape + (1,) * (ndim - t.ndim))


def _gather_codebook(codebook, codes):
    """``codebook[..., codes]`` for a codebook ``[*G, n]`` and codes ``[*G, ...]``."""
    g = codebook.ndim - 1
    flat = codes.reshape(codes.shape[:g] + (-1,))
    return jnp.take_along_axis(codebook, flat, axis=-1).reshape(codes.shape)


def _dequantize_jvp(primals, tangents, *, k: int, scale_format: str, d: int, dtype, tiled: bool = False):
    packed, scales, codebook, tensor_scale = primals
    _, d_scales, d_codebook, d_tensor_scale = tangents
    out = dequantize_p.bind(
        packed, scales, codebook, tensor_scale, k=k, scale_format=scale_format, d=d, dtype=dtype, tiled=tiled
    )
    scale_tangent = not _is_zero(d_scales) and scale_format != "e4m4"
    if _is_zero(d_codebook) and _is_zero(d_tensor_scale) and not scale_tangent:
        return out, jnp.zeros_like(out)  # unreachable in practice: integer tangents are symbolic
    if tiled:  # the tangent is built in row order: the words, scales and scale tangents leave tile order
        packed, scales = untile_arrays(packed, scales)
        if not _is_zero(d_scales):
            d_scales = untile_arrays(None, d_scales)[1]

    codes = unpack_codes(packed, k)  # [..., nb, 32]
    dec = decode_block_scales(scales, scale_format)  # [..., nb]
    t = _group_broadcast(tensor_scale, dec.ndim)
    terms = []
    if not _is_zero(d_codebook):
        s = dec * t
        s = jnp.where(s > _FLT_MAX, _FLT_MAX, s)  # the decoded scale saturates like the kernel's
        terms.append(_gather_codebook(d_codebook, codes) * s[..., None])
    ds = None
    if not _is_zero(d_tensor_scale):
        ds = dec * _group_broadcast(d_tensor_scale, dec.ndim)
    if scale_tangent:
        part = d_scales.astype(jnp.float32) * t
        ds = part if ds is None else ds + part
    if ds is not None:
        terms.append(_gather_codebook(codebook, codes) * ds[..., None])
    y = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    y = y.reshape(y.shape[:-2] + (y.shape[-2] * BLOCK,))[..., :d]
    return out, y.astype(dtype)


def _quantize_jvp(primals, tangents, **params):
    raise QuantizeNotDifferentiableError(
        "jax_kbit.quantize is not differentiable: rounding to a k-bit code has zero derivative almost "
        "everywhere, and a silent zero gradient would hide a bug. Quantize jax.lax.stop_gradient(x) for an "
        "explicit zero gradient, or use a straight-through estimator that quantizes the stopped value: "
        "xs = jax.lax.stop_gradient(x); x - xs + jax_kbit.dequantize(jax_kbit.quantize(xs)). Gradients "
        "through dequantize (wrt the codebook, tensor_scale, or anything downstream) are supported."
    )


ad.primitive_jvps[dequantize_p] = _dequantize_jvp
ad.primitive_jvps[quantize_p] = _quantize_jvp

__all__ = ["QuantizeNotDifferentiableError", "decode_block_scales", "unpack_codes"]
