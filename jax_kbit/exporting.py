"""``jax.export`` support: the safety-check exemptions for the kernels and the pytree serialization of
``QuantizedArray`` and ``QuantizedMatrix``.

A function that calls ``quantize`` / ``dequantize`` exports like any other, with two things to know
(docs/SHARDING.md, "Export"):

- Its module calls custom call targets (``kbit_quantize``, ``kbit_dequantize``, the matmul ones). They are not on
  JAX's list of custom calls with a compatibility guarantee, so ``jax.export.export`` refuses them unless
  told otherwise: pass ``disabled_checks=jax_kbit.exporting.DISABLED_CHECKS``. The exemption is the
  promise that the loading process has the same format (docs/FORMAT.md) behind those names.
- The loading process must ``import jax_kbit`` before it calls the deserialized function: the import
  registers the handlers under those names (and this module's pytree serialization of ``QuantizedArray``
  and ``QuantizedMatrix``, so either may be an argument or a result of the exported function).
"""

from __future__ import annotations

import json

import jax
import numpy as np

from jax_kbit._ffi import TARGETS
from jax_kbit.quantized_array import QuantizedArray
from jax_kbit.quantized_matrix import QuantizedMatrix
from jax_kbit.reference import FLOAT_DTYPES

__all__ = ["DISABLED_CHECKS", "SERIALIZED_MATRIX_NAME", "SERIALIZED_NAME"]

DISABLED_CHECKS: tuple[jax.export.DisabledSafetyCheck, ...] = tuple(
    jax.export.DisabledSafetyCheck.custom_call(target) for target in TARGETS
)
"""``disabled_checks`` for ``jax.export.export`` of a function that calls the jax_kbit kernels."""

SERIALIZED_NAME = "jax_kbit.QuantizedArray"
SERIALIZED_MATRIX_NAME = "jax_kbit.QuantizedMatrix"
_DTYPES = {np.dtype(dt).name: np.dtype(dt) for dt in FLOAT_DTYPES}


def _serialize_aux(aux) -> bytes:
    k, d, dtype, scale_format = aux
    return json.dumps({"k": k, "d": d, "dtype": np.dtype(dtype).name, "scale_format": scale_format}).encode()


def _deserialize_aux(data: bytes):
    aux = json.loads(data.decode())
    return aux["k"], aux["d"], _DTYPES[aux["dtype"]], aux["scale_format"]


jax.export.register_pytree_node_serialization(
    QuantizedArray,
    serialized_name=SERIALIZED_NAME,
    serialize_auxdata=_serialize_aux,
    deserialize_auxdata=_deserialize_aux,
)


def _serialize_matrix_aux(tiled) -> bytes:
    return json.dumps({"tiled": bool(tiled)}).encode()


def _deserialize_matrix_aux(data: bytes) -> bool:
    tiled = json.loads(data.decode()).get("tiled", False)
    if not isinstance(tiled, bool):
        raise ValueError(f"{SERIALIZED_MATRIX_NAME}: 'tiled' must be a bool, got {tiled!r}")
    return tiled


jax.export.register_pytree_node_serialization(
    QuantizedMatrix,
    serialized_name=SERIALIZED_MATRIX_NAME,
    serialize_auxdata=_serialize_matrix_aux,
    deserialize_auxdata=_deserialize_matrix_aux,
)
