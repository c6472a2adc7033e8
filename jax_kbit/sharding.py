"""Shard-local quantize and dequantize under ``jit`` over a device mesh (docs/SHARDING.md).

An FFI custom call is opaque to XLA's partitioner: on its own it makes XLA gather every operand, run the
whole computation on every device and slice the result. Both operations are blockwise, so a shard of rows,
or a shard of whole blocks along the last axis, can be processed where it lives. This module tells XLA so,
through ``jax.experimental.custom_partitioning``:

- a Shardy sharding rule (``sdy.sharding_rule``) per call, for sharding propagation: leading dims pass
  through, the group dims of the codebook and tensor scale follow the data's leading dims, and the last
  axis of ``x`` is the compound factor (blocks, 32) whose block factor maps to the ``nb`` axis of
  ``packed`` / ``scales``;
- a partition callback that picks the shardings the handlers can run on (leading dims as given where the
  mesh axes divide them; the last axis only at block granularity) and lowers the per-shard call, which is
  the ordinary FFI call on shard shapes.

The primitives' lowering rules (``jax_kbit.primitives``) call :func:`lower` when they are lowered for more
than one device; everywhere else (one device, inside a fully manual ``shard_map``, ``jax.export``) they emit
the plain FFI call.

:func:`quantized_sharding` maps an array's sharding to the shardings of a ``QuantizedArray``'s leaves.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax._src import dispatch, sharding_impls
from jax.experimental.custom_partitioning import (
    ArrayMapping,
    CompoundFactor,
    SdyShardingRule,
    custom_partitioning,
)
from jax.interpreters import mlir
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_kbit.quantized_matrix import TILE_ROWS
from jax_kbit.reference import BLOCK

__all__ = ["lower", "lowering_for_export", "quantized_sharding", "register", "wants_partitioning"]

# A PartitionSpec entry: None, a mesh axis name, or a tuple of mesh axis names.
Entry = Any


# ---------------------------------------------------------------- specs


def _entries(sharding: NamedSharding, ndim: int) -> list[Entry]:
    """The sharding's spec as one entry per dim (missing trailing entries are None)."""
    spec = list(sharding.spec)[:ndim]
    spec += [None] * (ndim - len(spec))
    return [None if e is None or (isinstance(e, tuple) and not e) else e for e in spec]


def _ways(mesh_shape: dict, entry: Entry) -> int:
    """How many shards an entry cuts a dim into."""
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh_shape[n] for n in names)


def _layout(
    mesh_shape: dict, entries: Sequence[Entry], lead: Sequence[int], nb: int, d: int
) -> tuple[list[Entry], Entry]:
    """The shardings the handlers can run on: (entries of the leading dims, entry of the blocks axis).

    ``entries`` are the data's leading-dim entries followed by the entry of its last (element or block)
    axis. A leading dim keeps its entry when the mesh axes divide it. The last axis keeps its entry only at
    block granularity: ``d`` a multiple of 32 (no partial block) and the block count divisible by the
    number of shards. Everything else is replicated (XLA gathers it before the call).
    """
    out = [
        e if e is not None and size % _ways(mesh_shape, e) == 0 else None for e, size in zip(entries, lead)
    ]
    last = entries[len(lead)]
    if last is not None and not (d % BLOCK == 0 and nb > 0 and nb % _ways(mesh_shape, last) == 0):
        last = None
    return out, last


def _tile_order_entries(mesh_shape: dict, entries: Sequence[Entry], rows: int) -> list[Entry]:
    """``entries`` ``[..., rows, blocks]`` of tile-ordered words reduced to what tile order allows: the rows
    split only between whole tiles of 16, the blocks (not one run per row in tile order) never."""
    out = list(entries)
    if out[-2] is not None and rows % (_ways(mesh_shape, out[-2]) * TILE_ROWS):
        out[-2] = None
    out[-1] = None
    return out


def _named(mesh: Mesh, entries: Sequence[Entry]) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(*entries))


def _operand_shardings(mesh: Mesh, lead: Sequence[Entry], last: Entry, g: int):
    """(data [..., last], packed, scales, codebook, tensor scale) shardings for a layout."""
    return (
        _named(mesh, [*lead, last]),
        _named(mesh, [*lead, last, None]),
        _named(mesh, [*lead, last]),
        _named(mesh, [*lead[:g], None]),
        _named(mesh, lead[:g]),
    )


def _replicated_mesh(sharding: Any) -> Mesh:
    """A one-axis mesh over a sharding's devices, for the replicated fallback."""
    return Mesh(np.asarray(sharding._device_assignment, dtype=object), ("kbit_devices",))


def _decode(sharding: Any, mesh: Mesh | None, ndim: int) -> tuple[Mesh, list[Entry]]:
    """(mesh, one spec entry per dim) for the sharding XLA chose for a data operand.

    XLA hands the partitioner an HLO sharding. It maps back to a ``PartitionSpec`` on the computation's
    mesh in the usual cases; where it does not (no mesh, or Shardy split a mesh axis into sub-axes), the
    operand is treated as replicated, which is always correct (XLA gathers it before the call).
    """
    if isinstance(sharding, NamedSharding):
        return sharding.mesh, _entries(sharding, ndim)
    if mesh is not None and not mesh.empty:
        try:
            spec = sharding_impls.parse_flatten_op_sharding(sharding._to_xla_hlo_sharding(ndim), mesh)[0]
            named = NamedSharding(mesh, spec)
            if named.is_equivalent_to(sharding, ndim):
                return mesh, _entries(named, ndim)
        except Exception:  # noqa: BLE001 - any undecodable sharding takes the replicated path
            pass
        return mesh, [None] * ndim
    return _replicated_mesh(sharding), [None] * ndim


def _names(e: Entry) -> tuple:
    """The mesh axis names of a spec entry."""
    return () if e is None else (e if isinstance(e, tuple) else (e,))


def _merge(primary: list[Entry], secondary: list[Entry] | None) -> list[Entry]:
    """``primary``'s entries, plus ``secondary``'s on the dims ``primary`` leaves replicated.

    The partitioner passes the operand shardings and the result shardings it wants. Where the operand is
    replicated on a dim but the result is sharded (e.g. ``out_shardings`` on a replicated input), each
    device slicing its own part of the operand costs no communication, and the call then runs on that
    part only instead of on the whole array.
    """
    if secondary is None:
        return primary

    used = {n for e in primary for n in _names(e)}
    out = []
    for p, q in zip(primary, secondary):
        if p is None and q is not None and not used & set(_names(q)):
            used |= set(_names(q))
            p = q
        out.append(p)
    return out


def _result_entries(result: Any, mesh: Mesh, ndim: int, keep: int) -> list[Entry] | None:
    """The first ``keep`` entries of a result's sharding, or None if it has none that maps to ``mesh``."""
    sharding = getattr(result, "sharding", None)
    if sharding is None:
        return None
    result_mesh, entries = _decode(sharding, mesh, ndim)
    return entries[:keep] if result_mesh is mesh else None


# ---------------------------------------------------------------- sharding rules


def _rule(lead_rank: int, g: int, d: int, nb: int, *, quantize: bool, tiled: bool = False) -> SdyShardingRule:
    """The Shardy sharding rule for one call.

    Factors: ``l0..`` the leading dims (shared by data, packed and scales; the first ``g`` also by the
    codebook and tensor scale), ``nb`` the blocks, ``kb`` the packed words, ``cb`` the codebook entries.
    With ``d`` a whole number of blocks the data's last axis is the compound factor (``nb``, ``blk``) with
    ``blk`` = 32, so sharding it at block granularity is sharding ``nb``; otherwise (and for tile-ordered
    words, whose row is not one run of blocks) it is its own factor ``dd``, which must stay replicated.
    """
    lead = tuple(f"l{i}" for i in range(lead_rank))
    whole_blocks = d % BLOCK == 0 and nb > 1 and not tiled
    last = CompoundFactor("nb", "blk") if whole_blocks else "dd"
    need_replication = ("blk",) if whole_blocks else ("dd", "nb")
    data = ArrayMapping(*lead, last)
    packed = ArrayMapping(*lead, "nb", "kb")
    scales = ArrayMapping(*lead, "nb")
    codebook = ArrayMapping(*lead[:g], "cb")
    tensor_scale = ArrayMapping(*lead[:g])
    sizes = {"blk": BLOCK} if whole_blocks else {}
    if quantize:
        operands, results = (data, codebook, tensor_scale), (packed, scales)
    else:
        operands, results = (packed, scales, codebook, tensor_scale), (data,)
    # Shardy wants the special factors in the order the factors first appear in the rule.
    order: list[str] = []
    for mapping in operands + results:
        for dim in mapping:
            order += [f for f in (dim if isinstance(dim, CompoundFactor) else (dim,)) if f not in order]
    replicated = sorted(need_replication + ("kb", "cb"), key=order.index)
    return SdyShardingRule(operands, results, need_replication_factors=tuple(replicated), **sizes)


# ---------------------------------------------------------------- partitioned calls


@functools.lru_cache(maxsize=512)
def _quantize_call(prim, lead: tuple[int, ...], d: int, g: int, k: int, scale_format: str):
    nb = -(-d // BLOCK)

    def per_shard(x, codebook, tensor_scale):
        return tuple(prim.bind(x, codebook, tensor_scale, k=k, scale_format=scale_format))

    def layout(mesh, arg_shapes, packed=None):
        mesh, entries = _decode(arg_shapes[0].sharding, mesh, len(lead) + 1)
        entries = _merge(entries, _result_entries(packed, mesh, len(lead) + 2, len(lead) + 1))
        lead_entries, last = _layout(mesh.shape, entries, lead, nb, d)
        return mesh, _operand_shardings(mesh, lead_entries, last, g)

    def partition(mesh, arg_shapes, result_shape):
        mesh, (x_s, packed_s, scales_s, cb_s, ts_s) = layout(mesh, arg_shapes, result_shape[0])
        return mesh, per_shard, (packed_s, scales_s), (x_s, cb_s, ts_s)

    def infer(mesh, arg_shapes, result_shape):
        _, (_, packed_s, scales_s, _, _) = layout(mesh, arg_shapes)
        return (packed_s, scales_s)

    call = custom_partitioning(per_shard)
    call.def_partition(
        partition,
        infer_sharding_from_operands=infer,
        decode_shardings=False,  # decoded by _decode, which also copes with Shardy's sub-axes
        sharding_rule=_rule(len(lead), g, d, nb, quantize=True),
    )
    return call


@functools.lru_cache(maxsize=512)
def _dequantize_call(
    prim, lead: tuple[int, ...], d: int, g: int, k: int, scale_format: str, dtype, tiled: bool = False
):
    nb = -(-d // BLOCK)

    def make_per_shard(local_d: int):
        def per_shard(packed, scales, codebook, tensor_scale):
            return prim.bind(
                packed,
                scales,
                codebook,
                tensor_scale,
                k=k,
                scale_format=scale_format,
                d=local_d,
                dtype=dtype,
                tiled=tiled,
            )

        return per_shard

    def layout(mesh, arg_shapes, y=None):
        mesh, entries = _decode(arg_shapes[0].sharding, mesh, len(lead) + 2)
        entries = entries[: len(lead) + 1]  # packed's k axis is never sharded
        entries = _merge(entries, _result_entries(y, mesh, len(lead) + 1, len(lead) + 1))
        if tiled:  # the rows are the last leading dim
            entries = _tile_order_entries(mesh.shape, entries, lead[-1])
        lead_entries, last = _layout(mesh.shape, entries, lead, nb, d)
        return mesh, last, _operand_shardings(mesh, lead_entries, last, g)

    def partition(mesh, arg_shapes, result_shape):
        mesh, last, (y_s, packed_s, scales_s, cb_s, ts_s) = layout(mesh, arg_shapes, result_shape)
        local_d = d if last is None else d // _ways(mesh.shape, last)
        return mesh, make_per_shard(local_d), y_s, (packed_s, scales_s, cb_s, ts_s)

    def infer(mesh, arg_shapes, result_shape):
        return layout(mesh, arg_shapes)[2][0]

    call = custom_partitioning(make_per_shard(d))
    call.def_partition(
        partition,
        infer_sharding_from_operands=infer,
        decode_shardings=False,  # decoded by _decode, which also copes with Shardy's sub-axes
        sharding_rule=_rule(len(lead), g, d, nb, quantize=False, tiled=tiled),
    )
    return call


def _matmul_rule(lead_rank: int) -> SdyShardingRule:
    """Shardy rule for ``y = x @ W``: batch dims ``l*`` and the output features ``o`` may be sharded; the
    reduction (``x``'s padded last axis ``xi``, ``packed`` / ``scales``' blocks ``nb``) stays whole."""
    lead = tuple(f"l{i}" for i in range(lead_rank))
    operands = (
        ArrayMapping(*lead, "xi"),
        ArrayMapping("o", "nb", "kb"),
        ArrayMapping("o", "nb"),
        ArrayMapping("cb"),
        ArrayMapping(),
    )
    results = (ArrayMapping(*lead, "o"),)
    return SdyShardingRule(operands, results, need_replication_factors=("xi", "nb", "kb", "cb"))


@functools.lru_cache(maxsize=512)
def _matmul_call(
    prim, lead: tuple[int, ...], n_out: int, k: int, scale_format: str, d: int, tiled: bool = False
):
    r = len(lead)
    # Tile-ordered weights split along `out` only between whole tiles of 16 outputs.
    unit = TILE_ROWS if tiled else 1

    def per_shard(x, packed, scales, codebook, tensor_scale):
        return prim.bind(
            x, packed, scales, codebook, tensor_scale, k=k, scale_format=scale_format, d=d, tiled=tiled
        )

    def layout(mesh, arg_shapes, y=None):
        mesh, x_entries = _decode(arg_shapes[0].sharding, mesh, r + 1)
        w_mesh, w_entries = _decode(arg_shapes[1].sharding, mesh, 3)
        out = w_entries[0] if w_mesh == mesh else None
        entries = _merge([*x_entries[:r], out], _result_entries(y, mesh, r + 1, r + 1))
        lead_entries, out = entries[:r], entries[r]
        lead_entries = [
            e if e is not None and size % _ways(mesh.shape, e) == 0 else None
            for e, size in zip(lead_entries, lead)
        ]
        used = {n for e in lead_entries for n in _names(e)}
        if out is not None and (used & set(_names(out)) or n_out % (_ways(mesh.shape, out) * unit) != 0):
            out = None
        return mesh, (
            _named(mesh, [*lead_entries, None]),
            _named(mesh, [out, None, None]),
            _named(mesh, [out, None]),
            _named(mesh, [None]),
            _named(mesh, []),
            _named(mesh, [*lead_entries, out]),
        )

    def partition(mesh, arg_shapes, result_shape):
        mesh, (*args_s, y_s) = layout(mesh, arg_shapes, result_shape)
        return mesh, per_shard, y_s, tuple(args_s)

    def infer(mesh, arg_shapes, result_shape):
        return layout(mesh, arg_shapes)[1][-1]

    call = custom_partitioning(per_shard)
    call.def_partition(
        partition,
        infer_sharding_from_operands=infer,
        decode_shardings=False,
        sharding_rule=_matmul_rule(r),
    )
    return call


# ---------------------------------------------------------------- lowering


def register(*prims) -> None:
    """Marks the primitives as needing the device assignment while they are lowered.

    ``custom_partitioning`` builds its mesh from it; JAX passes it to lowering only for such primitives.
    """
    dispatch.prim_requires_devices_during_lowering.update(prims)


def lowering_for_export(ctx: mlir.LoweringRuleContext) -> bool:
    """Whether this lowering is for ``jax.export`` (a serialized module, compiled elsewhere)."""
    params = getattr(ctx.module_context, "lowering_parameters", None)
    return bool(getattr(params, "for_export", False))


def wants_partitioning(ctx: mlir.LoweringRuleContext) -> bool:
    """Whether a lowering runs for several devices that XLA's partitioner will split the call across.

    False on one device, inside a ``shard_map`` whose mesh axes are all manual (the call already sees a
    shard), in a partially manual ``shard_map`` (custom partitioning is not supported there; XLA replicates
    the call over the automatic axes) and for ``jax.export`` (the partitioning callbacks live in this
    process and cannot be serialized).
    """
    if lowering_for_export(ctx):
        return False
    axis_context = ctx.module_context.axis_context
    if isinstance(axis_context, sharding_impls.ShardingContext):
        return axis_context.num_devices > 1 and axis_context.device_assignment is not None
    return False


def lower(prim, ctx: mlir.LoweringRuleContext, *args, **params):
    """Lowers one quantize, dequantize or matmul call as a custom-partitioned call (module docstring)."""
    if prim.name == "kbit_matmul":
        x, packed = ctx.avals_in[:2]
        call = _matmul_call(
            prim,
            tuple(x.shape[:-1]),
            int(packed.shape[0]),
            params["k"],
            params["scale_format"],
            params["d"],
            bool(params.get("tiled", False)),
        )
        return mlir.lower_fun(lambda *a: [call(*a)], multiple_results=True)(ctx, *args)
    if prim.multiple_results:  # quantize
        x, codebook = ctx.avals_in[:2]
        lead, d, g = tuple(x.shape[:-1]), int(x.shape[-1]), codebook.ndim - 1
        call = _quantize_call(prim, lead, d, g, params["k"], params["scale_format"])
        return mlir.lower_fun(lambda *a: list(call(*a)), multiple_results=True)(ctx, *args)
    packed, _, codebook, _ = ctx.avals_in
    lead, d, g = tuple(packed.shape[:-2]), int(params["d"]), codebook.ndim - 1
    call = _dequantize_call(
        prim,
        lead,
        d,
        g,
        params["k"],
        params["scale_format"],
        np.dtype(params["dtype"]),
        bool(params.get("tiled", False)),
    )
    return mlir.lower_fun(lambda *a: [call(*a)], multiple_results=True)(ctx, *args)


# ---------------------------------------------------------------- public helper


def quantized_sharding(sharding: jax.sharding.Sharding, q: Any):
    """The shardings of a ``QuantizedArray``'s leaves that match ``sharding`` of the original array.

    Args:
      sharding: a sharding of the original (dequantized) array, shape ``q.shape``. A ``NamedSharding``
        is mapped dim by dim; any other sharding gives replicated leaves on its devices.
      q: the ``QuantizedArray`` (or one from ``jax.eval_shape``) whose leaves the shardings are for, or a
        ``QuantizedMatrix``: then ``sharding`` is that of ``W`` ``[..., in, out]``, and the result a
        ``QuantizedMatrix`` of shardings (``P(None, "x")`` shards ``out``, what ``matmul`` runs on locally).

    Returns:
      A ``QuantizedArray`` with the same static metadata as ``q`` whose leaves are ``NamedSharding``s:
      ``packed`` / ``scales`` take the leading dims' entries and, on the blocks axis, the last axis's entry
      when that axis is sharded at block granularity (``d`` a multiple of 32 and the block count divisible
      by the shard count; otherwise the blocks axis is replicated); the ``codebook`` and ``tensor_scale``
      take the entries of their group dims (none outside ``vmap``: replicated). Pass it to
      ``jax.device_put(q, ...)`` or use it as ``out_shardings`` / ``in_shardings``.
    """
    from jax_kbit.quantized_array import QuantizedArray
    from jax_kbit.quantized_matrix import QuantizedMatrix

    if isinstance(q, QuantizedMatrix):
        # ``sharding`` is W's ([..., in, out]); the stored array is W^T's, so the last two entries swap.
        if isinstance(sharding, NamedSharding):
            entries = _entries(sharding, q.ndim)
            entries[-2], entries[-1] = entries[-1], entries[-2]
            if q.tiled:  # W^T's rows are `out`, its blocks run along `in`
                entries = _tile_order_entries(sharding.mesh.shape, entries, int(q.stored.packed.shape[-3]))
            sharding = NamedSharding(sharding.mesh, PartitionSpec(*entries))
        return QuantizedMatrix.tree_unflatten(q.tiled, [quantized_sharding(sharding, q.stored)])
    if not isinstance(q, QuantizedArray):
        raise TypeError(f"q must be a QuantizedArray or QuantizedMatrix, got {type(q).__name__}")
    lead = tuple(q.packed.shape[:-2])
    g = len(q.codebook.shape) - 1
    nb = int(q.packed.shape[-2])
    if isinstance(sharding, NamedSharding):
        mesh = sharding.mesh
        entries = _entries(sharding, len(lead) + 1)
    elif isinstance(sharding, jax.sharding.Sharding):
        mesh = _replicated_mesh(sharding) if len(sharding.device_set) > 1 else None
        entries = [None] * (len(lead) + 1)
        if mesh is None:  # one device: keep that sharding for every leaf
            return QuantizedArray(
                sharding,
                sharding,
                sharding,
                sharding,
                k=q.k,
                d=q.d,
                dtype=q.dtype,
                scale_format=q.scale_format,
            )
    else:
        raise TypeError(f"sharding must be a jax.sharding.Sharding, got {type(sharding).__name__}")
    lead_entries, last = _layout(mesh.shape, entries, lead, nb, q.d)
    _, packed_s, scales_s, cb_s, ts_s = _operand_shardings(mesh, lead_entries, last, g)
    return QuantizedArray(
        packed_s, scales_s, cb_s, ts_s, k=q.k, d=q.d, dtype=q.dtype, scale_format=q.scale_format
    )
