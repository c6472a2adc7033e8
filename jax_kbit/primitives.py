"""The JAX primitives behind ``quantize`` and ``dequantize``: abstract evaluation, batching and lowering.

Operands are plain arrays; the codebook has shape ``[*G, 2**k]`` and the tensor scale ``[*G]``, where the
group dims ``G`` are the leading dims of the data. Users always see ``G = ()``; groups appear when ``vmap``
batches the codebook or the tensor scale, and let the batching rule fold every vmapped axis into one call
instead of a loop.

``dequantize``'s ``tiled=True`` reads words and scales stored in the tile order of a ``QuantizedMatrix``
(``packed [..., n, nb, k]`` with ``n % 16 == 0``, ``nb % 4 == 0``; docs/FORMAT.md section 14) and writes the
result in row order, under the FFI target ``kbit_dequantize_tiled_v2`` (K = 4 words as pair indices;
``kbit_dequantize_tiled``, which reads them as planes, stays registered for modules exported before).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax._src import dispatch
from jax.interpreters import batching, mlir

from jax_kbit import _ffi, sharding
from jax_kbit.quantized_matrix import TILE_BLOCKS, TILE_ROWS, tileable
from jax_kbit.reference import BLOCK, SCALE_DTYPES

TILED_DEQUANTIZE_TARGET = "kbit_dequantize_tiled_v2"
"""The FFI target of a tiled dequantize (docs/FORMAT.md section 14)."""

SCALE_FORMAT_IDS = {"e4m4": 0, "f16": 1, "f32": 2}

quantize_p = jex.core.Primitive("kbit_quantize")
quantize_p.multiple_results = True
dequantize_p = jex.core.Primitive("kbit_dequantize")

quantize_p.def_impl(partial(dispatch.apply_primitive, quantize_p))
dequantize_p.def_impl(partial(dispatch.apply_primitive, dequantize_p))


def num_blocks(d: int) -> int:
    return -(-d // BLOCK)


def _check_groups(data_lead: tuple[int, ...], codebook: Any, tensor_scale: Any, k: int) -> None:
    g = codebook.ndim - 1
    if codebook.ndim < 1 or codebook.shape[-1] != 2**k or codebook.dtype != np.float32:
        raise ValueError(
            f"codebook must be float32 [..., {2**k}], got {codebook.dtype}{list(codebook.shape)}"
        )
    if tuple(tensor_scale.shape) != tuple(codebook.shape[:-1]) or tensor_scale.dtype != np.float32:
        raise ValueError(
            f"tensor_scale must be float32 {list(codebook.shape[:-1])}, got {tensor_scale.dtype}{list(tensor_scale.shape)}"
        )
    if g > len(data_lead) or tuple(data_lead[:g]) != tuple(codebook.shape[:-1]):
        raise ValueError(
            f"codebook group dims {list(codebook.shape[:-1])} must be leading dims of the data {list(data_lead)}"
        )


def _quantize_abstract(x, codebook, tensor_scale, *, k: int, scale_format: str):
    if x.ndim < 1:
        raise ValueError("x must have rank >= 1")
    _check_groups(x.shape[:-1], codebook, tensor_scale, k)
    lead, nb = x.shape[:-1], num_blocks(x.shape[-1])
    return (
        jax.core.ShapedArray(lead + (nb, k), jnp.uint32),
        jax.core.ShapedArray(lead + (nb,), SCALE_DTYPES[scale_format]),
    )


def _dequantize_abstract(
    packed, scales, codebook, tensor_scale, *, k: int, scale_format: str, d: int, dtype, tiled: bool = False
):
    lead = packed.shape[:-2]
    if (
        packed.ndim < 2
        or packed.dtype != np.uint32
        or packed.shape[-2:] != (num_blocks(d), k)
        or scales.shape != packed.shape[:-1]
        or scales.dtype != SCALE_DTYPES[scale_format]
    ):
        raise ValueError(
            f"packed {packed.dtype}{list(packed.shape)} and scales {scales.dtype}{list(scales.shape)} do not "
            f"match k={k}, d={d}, scale_format={scale_format!r}"
        )
    _check_groups(lead, codebook, tensor_scale, k)
    if tiled and (packed.ndim < 3 or not tileable(packed.shape[-3], packed.shape[-2])):
        raise ValueError(
            f"tile-ordered packed must be [..., n, nb, {k}] with n % {TILE_ROWS} == 0 and nb % {TILE_BLOCKS} == 0, "
            f"got {list(packed.shape)}"
        )
    if tiled and codebook.ndim - 1 > packed.ndim - 3:
        raise ValueError(
            f"a codebook per row of tile-ordered words is not supported: codebook {list(codebook.shape)}, "
            f"packed {list(packed.shape)} (one codebook per matrix of a stack at most)"
        )
    return jax.core.ShapedArray(lead + (d,), dtype)


quantize_p.def_abstract_eval(_quantize_abstract)
dequantize_p.def_abstract_eval(_dequantize_abstract)


def _lowering(target: str, tiled_target: str | None = None):
    """The lowering to ``target``, or to ``tiled_target`` for a call with ``tiled=True`` (dequantize only)."""
    rule = jax.ffi.ffi_lowering(target)
    tiled_rule = jax.ffi.ffi_lowering(tiled_target) if tiled_target else None

    def lower(ctx, *args, k: int, scale_format: str, **params):
        if sharding.wants_partitioning(ctx):  # several devices: shard-local calls (docs/SHARDING.md)
            prim = quantize_p if target == "kbit_quantize" else dequantize_p
            return sharding.lower(prim, ctx, *args, k=k, scale_format=scale_format, **params)
        chosen = tiled_rule if params.get("tiled", False) else rule
        return chosen(ctx, *args, k=np.int32(k), scale_format=np.int32(SCALE_FORMAT_IDS[scale_format]))

    return lower


def _cuda_lowering(target: str, tiled_target: str | None = None):
    rule = _lowering(target, tiled_target)

    def lower(ctx, *args, **params):
        # jax.export only names the target: exporting for CUDA needs no CUDA build here (the loader does).
        if not _ffi.cuda_built() and not sharding.lowering_for_export(ctx):
            raise RuntimeError(
                "jax_kbit was built without its CUDA handlers (nvcc was not found at install time, or "
                f"KBIT_CUDA=OFF): {_ffi.CUDA_IMPORT_ERROR}. Reinstall on a machine with nvcc, or run on CPU."
            )
        return rule(ctx, *args, **params)

    return lower


for _p, _targets in (
    (quantize_p, ("kbit_quantize",)),
    (dequantize_p, ("kbit_dequantize", TILED_DEQUANTIZE_TARGET)),
):
    mlir.register_lowering(_p, _lowering(*_targets), platform="cpu")
    mlir.register_lowering(_p, _cuda_lowering(*_targets), platform="cuda")
sharding.register(quantize_p, dequantize_p)


# ---------------------------------------------------------------- batching


def _to_front(x, bdim, size: int):
    """Batch axis of x moved to 0, broadcasting an unbatched x."""
    if bdim is None:
        return jnp.broadcast_to(x, (size,) + x.shape)
    return jnp.moveaxis(x, bdim, 0)


def _batch_size(args, dims) -> int:
    return next(a.shape[d] for a, d in zip(args, dims) if d is not None)


def _fold(data_args, data_dims, codebook, cb_dim, tensor_scale, ts_dim):
    """Places every batched axis so that one primitive call covers the whole batch.

    Returns the moved data operands, codebook, tensor scale and the output batch axis. With one codebook
    for the whole batch the batch axis goes right after the group dims (it becomes an ordinary leading dim);
    with a batched codebook or tensor scale it becomes a new leading group dim.
    """
    size = _batch_size((*data_args, codebook, tensor_scale), (*data_dims, cb_dim, ts_dim))
    if cb_dim is None and ts_dim is None:
        g = codebook.ndim - 1
        moved = []
        for a, dim in zip(data_args, data_dims):
            if dim is None:
                a = jnp.expand_dims(a, g)
                a = jnp.broadcast_to(a, a.shape[:g] + (size,) + a.shape[g + 1 :])
            else:
                a = jnp.moveaxis(a, dim, g)
            moved.append(a)
        return moved, codebook, tensor_scale, g
    moved = [_to_front(a, dim, size) for a, dim in zip(data_args, data_dims)]
    return moved, _to_front(codebook, cb_dim, size), _to_front(tensor_scale, ts_dim, size), 0


def _quantize_batch(args, dims, *, k: int, scale_format: str):
    x, codebook, tensor_scale = args
    (x,), codebook, tensor_scale, out_dim = _fold([x], [dims[0]], codebook, dims[1], tensor_scale, dims[2])
    outs = quantize_p.bind(x, codebook, tensor_scale, k=k, scale_format=scale_format)
    return outs, (out_dim, out_dim)


def _dequantize_batch(args, dims, **params):
    packed, scales, codebook, tensor_scale = args
    (packed, scales), codebook, tensor_scale, out_dim = _fold(
        [packed, scales], dims[:2], codebook, dims[2], tensor_scale, dims[3]
    )
    return dequantize_p.bind(packed, scales, codebook, tensor_scale, **params), out_dim


batching.primitive_batchers[quantize_p] = _quantize_batch
batching.primitive_batchers[dequantize_p] = _dequantize_batch
