"""``matmul``: ``x @ W`` with ``W`` read straight from its k-bit codes, and ``quantize_matrix`` to store ``W``.

The primitive ``kbit_matmul`` takes ``x`` padded with zeros to whole blocks along its last axis and the four
leaves of the ``QuantizedArray`` of ``W^T``. How it runs (docs/MATMUL.md):

- at most ``FUSED_MAX_ROWS`` rows of ``x`` (its leading dims flattened), float16 / bfloat16 ``x`` on a GPU:
  the fused CUDA kernel (tensor cores, no dequantized weight in memory);
- the same row counts on the CPU, any float ``x``: the C++ handler (a dequantized row tile, then dot
  products);
- everything else (more rows, float32 ``x`` on a GPU): ``dequantize`` followed by ``dot_general`` with
  float32 accumulation, which is the faster way there.

Under ``jit`` over several devices the call is partitioned along the batch dims of ``x`` and the ``out``
axis of ``W`` (``jax_kbit.sharding``); each device then takes one of the paths above for its shard.

Differentiation: the primitive is linear in ``x``; its transpose is the second primitive,
``kbit_matmul_t`` (``g @ W^T``, the backward pass for the inputs, also ``matmul(g, w, transpose=True)``),
which has its own fused CPU and CUDA kernels under the same row and dtype conditions (dequantize + dot
otherwise, and when partitioned over several devices); each primitive's transpose is the other. Tangents of
the codebook, the tensor scale and float16 / float32 block scales go through ``dequantize``'s JVP rule
(module ``autodiff``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import dispatch
from jax.interpreters import ad, batching, mlir

from jax_kbit import _ffi, sharding
from jax_kbit.api import _check_float_dtype, _check_k, _check_scale_format, quantize
from jax_kbit.primitives import SCALE_FORMAT_IDS, dequantize_p, num_blocks
from jax_kbit.quantized_array import QuantizedArray
from jax_kbit.quantized_matrix import (
    TILE_BLOCKS,
    TILE_ROWS,
    QuantizedMatrix,
    can_tile,
    tileable,
)
from jax_kbit.reference import BLOCK, SCALE_DTYPES

__all__ = ["FUSED_MAX_ROWS", "matmul", "matmul_p", "matmul_t_p", "quantize_matrix"]

FUSED_MAX_ROWS = 32
"""Rows of ``x`` up to which the fused kernels run; above it ``dequantize`` + ``dot_general`` is used."""

cuda_fused_transposed = False
"""Whether ``g @ W.T`` (``transpose=True``, and the backward pass of ``x @ W``) runs its fused CUDA kernel.
Off by default: on the H200 dequantize + cuBLAS-backed dot measured faster at every shape benchmarked
(bench/RESULTS.md). The CPU handler is used either way."""

matmul_p = jex.core.Primitive("kbit_matmul")
matmul_p.def_impl(partial(dispatch.apply_primitive, matmul_p))


def _abstract(
    x, packed, scales, codebook, tensor_scale, *, k: int, scale_format: str, d: int, tiled: bool = False
):
    nb = num_blocks(d)
    if (
        x.ndim < 1
        or x.shape[-1] != nb * BLOCK
        or packed.ndim != 3
        or packed.dtype != np.uint32
        or packed.shape[1:] != (nb, k)
        or scales.shape != packed.shape[:2]
        or scales.dtype != SCALE_DTYPES[scale_format]
        or codebook.shape != (2**k,)
        or codebook.dtype != np.float32
        or tensor_scale.shape != ()
        or tensor_scale.dtype != np.float32
    ):
        raise ValueError(
            f"kbit_matmul operands do not match k={k}, d={d}, scale_format={scale_format!r}: x "
            f"{x.dtype}{list(x.shape)}, packed {packed.dtype}{list(packed.shape)}, scales "
            f"{scales.dtype}{list(scales.shape)}, codebook {codebook.dtype}{list(codebook.shape)}, "
            f"tensor_scale {tensor_scale.dtype}{list(tensor_scale.shape)}"
        )
    if tiled and not tileable(packed.shape[0], nb):
        raise ValueError(
            f"kbit_matmul: tiled storage needs out % {TILE_ROWS} == 0 and a multiple of {TILE_BLOCKS} blocks, "
            f"got packed {list(packed.shape)}"
        )
    return jax.core.ShapedArray(x.shape[:-1] + (packed.shape[0],), x.dtype)


matmul_p.def_abstract_eval(_abstract)

matmul_t_p = jex.core.Primitive("kbit_matmul_t")
matmul_t_p.def_impl(partial(dispatch.apply_primitive, matmul_t_p))


def _abstract_t(
    g, packed, scales, codebook, tensor_scale, *, k: int, scale_format: str, d: int, tiled: bool = False
):
    """``g [..., out] @ W^T`` -> ``[..., nb * 32]`` (zero-padded past ``d``, like ``x`` of ``kbit_matmul``)."""
    nb = num_blocks(d)
    y = _abstract(
        jax.core.ShapedArray(g.shape[:-1] + (nb * BLOCK,), g.dtype),
        packed,
        scales,
        codebook,
        tensor_scale,
        k=k,
        scale_format=scale_format,
        d=d,
        tiled=tiled,
    )
    if y.shape[-1] != g.shape[-1]:
        raise ValueError(f"kbit_matmul_t: g has {g.shape[-1]} features, W has {packed.shape[0]} outputs")
    return jax.core.ShapedArray(g.shape[:-1] + (nb * BLOCK,), g.dtype)


matmul_t_p.def_abstract_eval(_abstract_t)


def _accumulation(dtype, gpu: bool):
    """``dot_general``'s result type: float32, or on a GPU 16-bit ``x``'s own type.

    The GPU's 16-bit matrix products accumulate in float32 and round once at the end either way; asking for a
    float32 result there only adds a float32 output and a conversion pass (measured 4-6 % of the product at
    256 rows). Elsewhere float32 is asked for explicitly.
    """
    return dtype if gpu and np.dtype(dtype).itemsize == 2 else jnp.float32


def _dequantized_dot(
    x,
    packed,
    scales,
    codebook,
    tensor_scale,
    *,
    k: int,
    scale_format: str,
    d: int,
    tiled: bool = False,
    gpu: bool = False,
):
    """The unfused path: ``x[..., :d] @ dequantize(W^T).T`` with float32 accumulation."""
    dtype = x.dtype
    wt = dequantize_p.bind(  # W^T [out, d] in row order, from either storage order
        packed, scales, codebook, tensor_scale, k=k, scale_format=scale_format, d=d, dtype=dtype, tiled=tiled
    )
    y = lax.dot_general(
        x[..., :d],
        wt,
        (((x.ndim - 1,), (1,)), ((), ())),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=_accumulation(dtype, gpu),
    )
    return y.astype(dtype)


def _dequantized_dot_t(
    g,
    packed,
    scales,
    codebook,
    tensor_scale,
    *,
    k: int,
    scale_format: str,
    d: int,
    tiled: bool = False,
    gpu: bool = False,
):
    """The unfused transposed product: ``g @ dequantize(W^T)``, padded with zeros to whole blocks."""
    dtype = g.dtype
    wt = dequantize_p.bind(  # W^T [out, d] in row order, from either storage order
        packed, scales, codebook, tensor_scale, k=k, scale_format=scale_format, d=d, dtype=dtype, tiled=tiled
    )
    y = lax.dot_general(
        g,
        wt,
        (((g.ndim - 1,), (0,)), ((), ())),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=_accumulation(dtype, gpu),
    ).astype(dtype)
    pad = num_blocks(d) * BLOCK - d
    if pad:
        y = jnp.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, pad)])
    return y


def _rows(aval) -> int:
    return int(np.prod(aval.shape[:-1], dtype=np.int64))


# The CUDA kernels' split reductions keep float32 partial sums in a workspace that the call returns as a
# second result (dropped here) instead of allocating scratch memory per call, so that XLA can record the
# call into a CUDA graph (ffi/cuda_mma.cuh). Per row of the product it holds up to WORKSPACE_SPLITS partial
# rows, at most WORKSPACE_FLOATS_PER_ROW floats (512 KB); the kernels split no further than it holds.
WORKSPACE_SPLITS = 64
WORKSPACE_FLOATS_PER_ROW = 1 << 17


def _workspace(rows: int, cols: int) -> jax.core.ShapedArray:
    """The float32 workspace of a CUDA matmul call whose product is ``rows x cols``."""
    per_row = min(cols * WORKSPACE_SPLITS, WORKSPACE_FLOATS_PER_ROW)
    return jax.core.ShapedArray((max(1, rows * per_row),), np.float32)


def _lowering(platform: str, transposed: bool = False):
    name = "kbit_matmul_t" if transposed else "kbit_matmul"
    # Tile-ordered weights have handlers of their own (the same kernels), so that modules exported before
    # they existed keep the plain handlers' signature; the _v2 ones read K = 4 pair words (docs/FORMAT.md
    # section 14), while the _tiled ones keep reading planes for modules exported before those.
    kernels = {tiled: jax.ffi.ffi_lowering(name + ("_tiled_v2" if tiled else "")) for tiled in (False, True)}
    dense = partial(_dequantized_dot_t if transposed else _dequantized_dot, gpu=platform == "cuda")
    fallback = mlir.lower_fun(dense, multiple_results=False)

    def lower(ctx, *args, k: int, scale_format: str, d: int, tiled: bool = False):
        params = dict(k=k, scale_format=scale_format, d=d, tiled=tiled)
        if sharding.wants_partitioning(ctx):
            if transposed:  # the dense product partitions well (W sharded along `out` needs a psum)
                return fallback(ctx, *args, **params)
            # per-shard calls along the batch dims of x and `out`
            return sharding.lower(matmul_p, ctx, *args, **params)
        x = ctx.avals_in[0]
        fused = _rows(x) <= FUSED_MAX_ROWS
        if platform == "cuda":
            fused = fused and np.dtype(x.dtype) in (np.dtype(jnp.float16), np.dtype(jnp.bfloat16))
            fused = fused and (cuda_fused_transposed or not transposed)
            if fused and not _ffi.cuda_built() and not sharding.lowering_for_export(ctx):
                raise RuntimeError(
                    "jax_kbit was built without its CUDA handlers (nvcc was not found at install time, or "
                    f"KBIT_CUDA=OFF): {_ffi.CUDA_IMPORT_ERROR}. Reinstall on a machine with nvcc, or run on CPU."
                )
        if not fused:
            return fallback(ctx, *args, **params)
        kernel = kernels[bool(tiled)]
        attrs = dict(k=np.int32(k), scale_format=np.int32(SCALE_FORMAT_IDS[scale_format]))
        if transposed:
            attrs["d"] = np.int64(d)  # the kernel writes zeros past d (padded codes may decode to non-zeros)
        if platform != "cuda":
            return kernel(ctx, *args, **attrs)
        cols = num_blocks(d) * BLOCK if transposed else int(ctx.avals_in[1].shape[0])
        workspace = _workspace(_rows(x), cols)
        return kernel(ctx.replace(avals_out=[*ctx.avals_out, workspace]), *args, **attrs)[:1]

    return lower


mlir.register_lowering(matmul_p, _lowering("cpu"), platform="cpu")
mlir.register_lowering(matmul_p, _lowering("cuda"), platform="cuda")
mlir.register_lowering(matmul_t_p, _lowering("cpu", transposed=True), platform="cpu")
mlir.register_lowering(matmul_t_p, _lowering("cuda", transposed=True), platform="cuda")
sharding.register(matmul_p, matmul_t_p)


def _batcher(prim, dense):
    def batch(args, dims, **params):
        x, *weight = args
        if all(dim is None for dim in dims[1:]):
            # One weight for the whole batch: the batch axis is just another row dim of x.
            return prim.bind(jnp.moveaxis(x, dims[0], 0), *weight, **params), 0
        # A batch of weights (vmap over stacked layers): one dequantize per weight, then a batched dot.
        return jax.vmap(partial(dense, **params), in_axes=tuple(dims))(*args), 0

    return batch


batching.primitive_batchers[matmul_p] = _batcher(matmul_p, _dequantized_dot)
batching.primitive_batchers[matmul_t_p] = _batcher(matmul_t_p, _dequantized_dot_t)


def _is_zero(t) -> bool:
    return type(t) is ad.Zero


def _jvp_rule(prim, transposed: bool):
    def jvp(primals, tangents, *, k: int, scale_format: str, d: int, tiled: bool = False):
        from jax_kbit.autodiff import _dequantize_jvp  # autodiff imports primitives; avoid a cycle

        x, packed, scales, codebook, tensor_scale = primals
        dx, d_packed, d_scales, d_codebook, d_tensor_scale = tangents
        params = dict(k=k, scale_format=scale_format, d=d, tiled=tiled)
        y = prim.bind(*primals, **params)
        terms = []
        if not _is_zero(dx):
            terms.append(prim.bind(dx, packed, scales, codebook, tensor_scale, **params))
        if not (_is_zero(d_scales) and _is_zero(d_codebook) and _is_zero(d_tensor_scale)):
            _, d_wt = _dequantize_jvp(  # dW^T, in row order from either storage order
                (packed, scales, codebook, tensor_scale),
                (d_packed, d_scales, d_codebook, d_tensor_scale),
                k=k,
                scale_format=scale_format,
                d=d,
                dtype=np.dtype(np.float32),
                tiled=tiled,
            )
            if transposed:  # g @ dW^T, padded like y
                part = lax.dot_general(
                    x.astype(jnp.float32),
                    d_wt,
                    (((x.ndim - 1,), (0,)), ((), ())),
                    precision=lax.Precision.HIGHEST,
                )
                pad = y.shape[-1] - d
                if pad:
                    part = jnp.pad(part, [(0, 0)] * (part.ndim - 1) + [(0, pad)])
            else:  # x @ dW
                part = lax.dot_general(
                    x[..., :d].astype(jnp.float32),
                    d_wt,
                    (((x.ndim - 1,), (1,)), ((), ())),
                    precision=lax.Precision.HIGHEST,
                )
            terms.append(part.astype(x.dtype))
        if not terms:
            return y, ad.Zero.from_primal_value(y)
        return y, terms[0] if len(terms) == 1 else terms[0] + terms[1]

    return jvp


def _transpose_rule(other):
    """Both products are linear in their first operand; each one's transpose is the other product."""

    def transpose(
        ct,
        x,
        packed,
        scales,
        codebook,
        tensor_scale,
        *,
        k: int,
        scale_format: str,
        d: int,
        tiled: bool = False,
    ):
        if not ad.is_undefined_primal(x) or any(
            ad.is_undefined_primal(a) for a in (packed, scales, codebook, tensor_scale)
        ):
            raise NotImplementedError("kbit_matmul is linear in x only")
        if _is_zero(ct):
            return [ad.Zero(x.aval), None, None, None, None]
        ct = ct.astype(x.aval.dtype)
        pad = ct.shape[-1] - d if other is matmul_p else 0
        if pad:  # the padding of y = g @ W^T is zero whatever W's padded codes hold: no gradient flows there
            ct = jnp.pad(ct[..., :d], [(0, 0)] * (ct.ndim - 1) + [(0, pad)])
        g = other.bind(
            ct, packed, scales, codebook, tensor_scale, k=k, scale_format=scale_format, d=d, tiled=tiled
        )
        return [g, None, None, None, None]

    return transpose


ad.primitive_jvps[matmul_p] = _jvp_rule(matmul_p, transposed=False)
ad.primitive_jvps[matmul_t_p] = _jvp_rule(matmul_t_p, transposed=True)
ad.primitive_transposes[matmul_p] = _transpose_rule(matmul_t_p)
ad.primitive_transposes[matmul_t_p] = _transpose_rule(matmul_p)


# ---------------------------------------------------------------- public API


def quantize_matrix(
    w: Any,
    k: int = 4,
    *,
    codebook: Any = None,
    scale_format: str = "e4m4",
    tensor_scale: Any = "auto",
    tiled: bool | None = None,
) -> QuantizedMatrix:
    """Quantize a weight ``w`` ``[..., in, out]`` for ``jax_kbit.matmul`` (format v1 of ``w``'s transpose).

    Arguments as in ``jax_kbit.quantize``; blocks of 32 run along ``in``, the reduction axis of ``x @ w``.
    ``tiled``: store the blocks in tile order (``QuantizedMatrix``; the batch-1 GPU kernel reads it faster).
    ``None`` (the default) tiles whenever the shape allows it (``out % 16 == 0`` and a multiple of 4 blocks
    along ``in``); ``True`` raises ``ValueError`` where it does not. The codes are the same either way.
    """
    if tiled is not None and not isinstance(tiled, (bool, np.bool_)):
        raise TypeError(f"tiled must be None or a bool, got {type(tiled).__name__}")
    if not hasattr(w, "dtype") or not hasattr(w, "shape"):
        raise TypeError(f"w must be a jax or NumPy array, got {type(w).__name__}")
    if len(w.shape) < 2:
        raise ValueError(f"w must have rank >= 2 ([..., in, out]), got shape {tuple(w.shape)}")
    _check_float_dtype(w.dtype, "w")
    wt = jnp.swapaxes(jnp.asarray(w), -1, -2)
    t = quantize(wt, k, codebook=codebook, scale_format=scale_format, tensor_scale=tensor_scale)
    return QuantizedMatrix(t, tiled=can_tile(t) if tiled is None else bool(tiled))


def matmul(x: Any, w: QuantizedMatrix, *, transpose: bool = False) -> jax.Array:
    """``x @ W`` (or ``x @ W.T``) for a k-bit weight ``W`` ``[in, out]``, read from its codes.

    Args:
      x: float16, bfloat16 or float32 array ``[..., in]`` (``[..., out]`` with ``transpose=True``).
      w: a ``QuantizedMatrix`` of logical shape ``[in, out]`` (from ``quantize_matrix``).
      transpose: multiply by ``W.T`` instead: ``[..., out] -> [..., in]``, the product the backward pass
        of ``x @ W`` needs for ``x`` (``jax.grad`` through ``matmul`` uses it by itself).

    Returns:
      ``[..., out]`` (``[..., in]``) in ``x``'s dtype, accumulated in float32. With at most
      ``FUSED_MAX_ROWS`` rows (and float16 / bfloat16 ``x`` on a GPU) the fused kernels run, with no
      dequantized weight in memory; otherwise ``dequantize`` + ``dot_general``. On a GPU the codebook
      values enter the tensor cores in ``x``'s dtype, so the result is as close to ``x @ dequantize(W)``
      as a 16-bit matrix product is (docs/MATMUL.md).
    """
    if isinstance(w, QuantizedArray):
        raise TypeError(
            "w must be a QuantizedMatrix (jax_kbit.quantize_matrix(w)): a QuantizedArray of W has its blocks "
            "along `out`, and reading it here would need a transpose per call. Quantize the weight with "
            "quantize_matrix, or use x @ jax_kbit.dequantize(q)."
        )
    if not isinstance(w, QuantizedMatrix):
        raise TypeError(f"w must be a QuantizedMatrix, got {type(w).__name__}")
    if not isinstance(transpose, (bool, np.bool_)):
        raise TypeError(f"transpose must be a bool, got {type(transpose).__name__}")
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"x must be a jax or NumPy array, got {type(x).__name__}")
    _check_float_dtype(x.dtype, "x")
    t = w.stored  # in tile order if w.tiled: the kernels read it as it is
    k = _check_k(t.k)
    scale_format = _check_scale_format(t.scale_format)
    if t.packed.ndim != 3 or t.codebook.ndim != 1:
        raise ValueError(
            f"w must be one [in, out] matrix, got logical shape {w.shape} (index a stacked weight, or "
            "lax.scan / jax.vmap over it)"
        )
    d = t.d
    want = w.shape[1] if transpose else d
    if len(x.shape) < 1 or x.shape[-1] != want:
        raise ValueError(
            f"x must have shape [..., {want}] to multiply w{'.T' if transpose else ''} of shape "
            f"{w.shape[::-1] if transpose else w.shape}, got {tuple(x.shape)}"
        )
    x = jnp.asarray(x)
    operands = (
        jnp.asarray(t.packed),
        jnp.asarray(t.scales),
        jnp.asarray(t.codebook),
        jnp.asarray(t.tensor_scale),
    )
    if transpose:
        y = matmul_t_p.bind(x, *operands, k=k, scale_format=scale_format, d=d, tiled=w.tiled)
        return y[..., :d] if y.shape[-1] != d else y
    pad = num_blocks(d) * BLOCK - d
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return matmul_p.bind(x, *operands, k=k, scale_format=scale_format, d=d, tiled=w.tiled)
