"""``QuantizedMatrix``: a weight matrix stored for ``jax_kbit.matmul``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_kbit.quantized_array import QuantizedArray

TILE_ROWS = 16
"""Rows of ``W^T`` (outputs) per tile of the tiled storage (docs/FORMAT.md, "Tiled matrices")."""
TILE_BLOCKS = 4
"""Blocks of 32 along ``in`` per tile column of the tiled storage."""


def tileable(n: int, nb: int) -> bool:
    """Whether ``n`` rows (outputs) of ``nb`` blocks make whole tiles: ``n % 16 == 0``, ``nb % 4 == 0``."""
    return n > 0 and nb > 0 and n % TILE_ROWS == 0 and nb % TILE_BLOCKS == 0


def can_tile(t: QuantizedArray) -> bool:
    """Whether the ``QuantizedArray`` ``t`` of ``W^T`` (``[..., out, in]``) can be stored tiled.

    It can when ``out`` is a multiple of 16 and the number of blocks along ``in`` (``ceil(in / 32)``) a
    multiple of 4: the tiles are then whole.
    """
    shape = getattr(t.packed, "shape", None)
    if shape is None or len(shape) < 3:
        return False
    return tileable(int(shape[-3]), int(shape[-2]))


def _permute(a: Any, blocks_axis_last: bool, to_tiles: bool) -> Any:
    """``a`` (``packed [..., n, nb, k]`` or ``scales [..., n, nb]``) with its blocks moved between row order
    ``[n / 16, 16, nb / 4, 4]`` and tile order ``[n / 16, nb / 4, 16, 4]``; the shape stays the same. At
    ``k == 4`` the words of each block also change between bit planes and pair indices.

    Abstract leaves (``jax.ShapeDtypeStruct``, placeholders) are returned as they are: only the order of the
    elements changes, never a shape or dtype.
    """
    if not hasattr(a, "reshape") or isinstance(a, jax.ShapeDtypeStruct):
        return a
    tail = a.shape[-1:] if blocks_axis_last else ()
    lead = a.shape[: a.ndim - 2 - len(tail)]
    n, nb = a.shape[len(lead)], a.shape[len(lead) + 1]
    xp = np if isinstance(a, np.ndarray) else jnp
    if to_tiles:
        split = (*lead, n // TILE_ROWS, TILE_ROWS, nb // TILE_BLOCKS, TILE_BLOCKS, *tail)
    else:
        split = (*lead, n // TILE_ROWS, nb // TILE_BLOCKS, TILE_ROWS, TILE_BLOCKS, *tail)
    axis = len(lead) + 1  # the second of the four tile axes trades places with the third
    out = xp.swapaxes(a.reshape(split), axis, axis + 1).reshape(a.shape)
    # K = 4 words also change between planes and pair indices (per block, so before or after the move).
    return _transpose_pair_fields(out) if blocks_axis_last and tail == (PAIR_K,) else out


PAIR_K = 4
"""The K whose tiled words hold pair indices instead of bit planes (docs/FORMAT.md, "Tiled matrices")."""


def _transpose_pair_fields(packed: Any) -> Any:
    """Each K = 4 block's four words (``packed [..., 4]``, uint32) between bit planes and pair indices.

    Bit ``8q + 2j + r`` of pair word ``c`` is bit ``j`` of the code of element ``8q + 2c + r``: in every byte
    position the 4 x 4 matrix of 2-bit fields (word, field) is transposed, so this is its own inverse. The
    same function as ``transpose_pair_fields`` in ``ffi/kbit_format.h``.
    """
    xp = np if isinstance(packed, np.ndarray) else jnp
    u = packed.dtype.type if xp is np else jnp.uint32
    w0, w1, w2, w3 = (packed[..., j] for j in range(4))
    m33, mcc, m0f, mf0 = (u(v) for v in (0x33333333, 0xCCCCCCCC, 0x0F0F0F0F, 0xF0F0F0F0))
    two, four = u(2), u(4)
    a = (w0 & m33) | ((w1 << two) & mcc)
    b = ((w0 >> two) & m33) | (w1 & mcc)
    c = (w2 & m33) | ((w3 << two) & mcc)
    d = ((w2 >> two) & m33) | (w3 & mcc)
    return xp.stack(
        [
            (a & m0f) | ((c << four) & mf0),
            (b & m0f) | ((d << four) & mf0),
            ((a >> four) & m0f) | (c & mf0),
            ((b >> four) & m0f) | (d & mf0),
        ],
        axis=-1,
    )


def _with_arrays(t: QuantizedArray, packed: Any, scales: Any) -> QuantizedArray:
    return QuantizedArray(
        packed, scales, t.codebook, t.tensor_scale, k=t.k, d=t.d, dtype=t.dtype, scale_format=t.scale_format
    )


def untile_arrays(packed: Any, scales: Any) -> tuple[Any, Any]:
    """Tile-ordered ``packed [..., n, nb, k]`` and ``scales [..., n, nb]`` (or scales-shaped tangents) back in
    row order; either may be ``None``, which comes back as ``None``."""
    return _permute(packed, True, False), _permute(scales, False, False)


def to_tiles(t: QuantizedArray) -> QuantizedArray:
    """``t`` with its blocks' words and scales in tile order (exact: a permutation of the stored bits, within
    each block too at K = 4)."""
    return _with_arrays(t, _permute(t.packed, True, True), _permute(t.scales, False, True))


def from_tiles(t: QuantizedArray) -> QuantizedArray:
    """The inverse of :func:`to_tiles`: plain format v1 again."""
    return _with_arrays(t, _permute(t.packed, True, False), _permute(t.scales, False, False))


@jax.tree_util.register_pytree_node_class
class QuantizedMatrix:
    """A weight ``W`` of logical shape ``[..., in, out]`` stored as format v1 of its transpose.

    ``t`` is the ``QuantizedArray`` of ``W^T`` (``[..., out, in]``, blocks of 32 along ``in``), so every block
    of 32 consecutive terms of a dot product ``x @ W`` shares one scale: that is what the fused
    ``jax_kbit.matmul`` kernels read, and it is plain format v1 (docs/FORMAT.md), so everything that takes a
    ``QuantizedArray`` takes ``t``. Build one with ``jax_kbit.quantize_matrix``; the transpose happens once,
    at quantization time, never per call. Leading dims (a stack of layers) are allowed; a ``matmul`` call
    takes one ``[in, out]`` matrix (index the stack, or ``lax.scan`` over it).

    ``tiled=True`` stores the same bits with the blocks of every 16 outputs x 4 blocks side by side (tile
    order, docs/FORMAT.md "Tiled matrices"), which cuts the batch-1 GPU kernel's time by 16–29 % at large
    shapes. Then ``stored`` (the pytree leaf) holds the tile-ordered arrays and ``t`` rebuilds the plain
    ones (a permutation of the words, computed on access: use ``stored`` where only metadata is needed).
    """

    __slots__ = ("stored", "tiled")

    def __init__(self, t: QuantizedArray, *, tiled: bool = False) -> None:
        """Wrap the plain ``QuantizedArray`` ``t`` of ``W^T``; ``tiled=True`` converts it to tile order
        (``ValueError`` unless ``can_tile(t)``)."""
        if not isinstance(t, QuantizedArray):
            raise TypeError(f"t must be the QuantizedArray of W^T, got {type(t).__name__}")
        if t.ndim < 2:
            raise ValueError(f"t must have logical shape [..., out, in], got {t.shape}")
        if not isinstance(tiled, (bool, np.bool_)):
            raise TypeError(f"tiled must be a bool, got {type(tiled).__name__}")
        if tiled and not can_tile(t):
            raise ValueError(
                f"tiled=True needs out % {TILE_ROWS} == 0 and a multiple of {TILE_BLOCKS} blocks of 32 along "
                f"in; W^T has logical shape {t.shape}"
            )
        self.tiled = bool(tiled)
        self.stored = to_tiles(t) if self.tiled else t

    def tree_flatten(self):
        return (self.stored,), self.tiled

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)  # leaves may be placeholders (tree utilities), so no checks here
        obj.stored = children[0]
        obj.tiled = bool(aux)
        return obj

    @property
    def t(self) -> QuantizedArray:
        """The plain format-v1 ``QuantizedArray`` of ``W^T`` (for a tiled matrix, rebuilt from the tiles)."""
        return from_tiles(self.stored) if self.tiled else self.stored

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape ``[..., in, out]`` of ``W``."""
        s = self.stored.shape
        return tuple(s[:-2]) + (s[-1], s[-2])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return self.stored.size

    @property
    def dtype(self) -> np.dtype:
        return self.stored.dtype

    @property
    def k(self) -> int:
        return self.stored.k

    @property
    def scale_format(self) -> str:
        return self.stored.scale_format

    @property
    def nbytes(self) -> int:
        return self.stored.nbytes

    @property
    def bits_per_element(self) -> float:
        return self.stored.bits_per_element

    def with_tiles(self, tiled: bool = True) -> QuantizedMatrix:
        """The same matrix stored tiled (or plain, ``tiled=False``); ``self`` if it already is."""
        if bool(tiled) == self.tiled:
            return self
        return QuantizedMatrix(self.t, tiled=bool(tiled))

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """``W`` as a dense ``[..., in, out]`` array (a transpose of ``dequantize(self.t)``, read from the
        stored order: no permutation of the words)."""
        from jax_kbit.api import dequantize_stored

        return jnp.swapaxes(dequantize_stored(self.stored, dtype, tiled=self.tiled), -1, -2)

    def __repr__(self) -> str:
        try:
            bpe = f"{self.bits_per_element:.3f}"
        except (TypeError, AttributeError):
            bpe = "?"
        return (
            f"QuantizedMatrix(shape={self.shape}, dtype={self.dtype.name}, k={self.k}, "
            f"scale_format={self.scale_format!r}, bits_per_element={bpe}, tiled={self.tiled})"
        )
