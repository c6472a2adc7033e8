"""``QuantizedMatrix``: a weight matrix stored for ``jax_kbit.matmul``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_kbit.quantized_array import QuantizedArray


@jax.tree_util.register_pytree_node_class
class QuantizedMatrix:
    """A weight ``W`` of logical shape ``[..., in, out]`` stored as format v1 of its transpose.

    ``t`` is the ``QuantizedArray`` of ``W^T`` (``[..., out, in]``, blocks of 32 along ``in``), so every block
    of 32 consecutive terms of a dot product ``x @ W`` shares one scale: that is the layout the fused
    ``jax_kbit.matmul`` kernels read, and it is still plain format v1 (docs/FORMAT.md), so everything that
    takes a ``QuantizedArray`` takes ``t``. Build one with ``jax_kbit.quantize_matrix``; the transpose
    happens once, at quantization time, never per call. Leading dims (a stack of layers) are allowed; a
    ``matmul`` call takes one ``[in, out]`` matrix (index the stack, or ``lax.scan`` over it).
    """

    __slots__ = ("t",)

    def __init__(self, t: QuantizedArray) -> None:
        if not isinstance(t, QuantizedArray):
            raise TypeError(f"t must be the QuantizedArray of W^T, got {type(t).__name__}")
        if t.ndim < 2:
            raise ValueError(f"t must have logical shape [..., out, in], got {t.shape}")
        self.t = t

    def tree_flatten(self):
        return (self.t,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)  # leaves may be placeholders (tree utilities), so no checks here
        obj.t = children[0]
        return obj

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape ``[..., in, out]`` of ``W``."""
        s = self.t.shape
        return tuple(s[:-2]) + (s[-1], s[-2])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return self.t.size

    @property
    def dtype(self) -> np.dtype:
        return self.t.dtype

    @property
    def k(self) -> int:
        return self.t.k

    @property
    def scale_format(self) -> str:
        return self.t.scale_format

    @property
    def nbytes(self) -> int:
        return self.t.nbytes

    @property
    def bits_per_element(self) -> float:
        return self.t.bits_per_element

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """``W`` as a dense ``[..., in, out]`` array (a transpose of ``dequantize(self.t)``)."""
        from jax_kbit.api import dequantize

        return jnp.swapaxes(dequantize(self.t, dtype), -1, -2)

    def __repr__(self) -> str:
        try:
            bpe = f"{self.bits_per_element:.3f}"
        except (TypeError, AttributeError):
            bpe = "?"
        return (
            f"QuantizedMatrix(shape={self.shape}, dtype={self.dtype.name}, k={self.k}, "
            f"scale_format={self.scale_format!r}, bits_per_element={bpe})"
        )
