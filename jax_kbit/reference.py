"""The NumPy reference: the executable definition of format v1 (docs/FORMAT.md).

Written for clarity, not speed: every step is a whole-array NumPy operation in float32, in the order the
format specifies. The C++ CPU handler and the CUDA kernels must agree with it bit for bit.
"""

from __future__ import annotations

import math
from typing import Literal

import ml_dtypes
import numpy as np
import numpy.typing as npt

from jax_kbit import e4m4

BLOCK = 32
ScaleFormat = Literal["e4m4", "f16", "f32"]
SCALE_FORMATS: tuple[str, ...] = ("e4m4", "f16", "f32")
SCALE_DTYPES = {"e4m4": np.dtype(np.uint8), "f16": np.dtype(np.float16), "f32": np.dtype(np.float32)}
SCALE_MAX = {"e4m4": 30.0, "f16": 65504.0, "f32": float(np.finfo(np.float32).max)}
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32))
# The canonical quiet NaN each output dtype gets (bit patterns), so outputs compare bit for bit.
CANONICAL_NAN = {
    np.dtype(np.float32): 0x7FC00000,
    np.dtype(np.float16): 0x7E00,
    np.dtype(ml_dtypes.bfloat16): 0x7FC0,
}
_UINT_OF = {2: np.uint16, 4: np.uint32}


def auto_tensor_scale_ref(x: npt.ArrayLike, scale_format: ScaleFormat) -> np.float32:
    """The default per-tensor scale: the smallest power of two t >= 2**-126 with amax <= MAX * t.

    amax is the largest |x| over the finite elements; t = 1 for "f32", for an empty or all-zero tensor and
    for a tensor with no finite non-zero element. Computed exactly (float64 holds amax / MAX without
    crossing a power of two).
    """
    x = np.asarray(x)
    if scale_format == "f32" or x.size == 0:
        return np.float32(1)
    a = np.abs(x.astype(np.float32))
    a = a[np.isfinite(a)]
    amax = float(a.max()) if a.size else 0.0
    if amax == 0.0:
        return np.float32(1)
    frac, exp = math.frexp(amax / SCALE_MAX[scale_format])  # = frac * 2**exp, frac in [0.5, 1)
    e = exp - 1 if frac == 0.5 else exp
    return np.float32(2.0 ** max(e, -126))


def encode_scales(
    amax: np.ndarray, nonfinite: np.ndarray, t: np.float32, scale_format: ScaleFormat
) -> np.ndarray:
    """Stored block scales: encode(min(amax / t, MAX)), NaN for blocks holding NaN or inf."""
    with np.errstate(over="ignore"):
        v = np.minimum(amax / np.float32(t), np.float32(SCALE_MAX[scale_format])).astype(np.float32)
    if scale_format == "e4m4":
        return np.where(nonfinite, np.uint8(e4m4.NAN), e4m4.encode(v)).astype(np.uint8)
    if scale_format == "f16":
        return np.where(nonfinite, np.float16(np.nan), v.astype(np.float16)).astype(np.float16)
    return np.where(nonfinite, np.float32(np.nan), v).astype(np.float32)


def decode_scales(stored: np.ndarray, t: np.float32, scale_format: ScaleFormat) -> np.ndarray:
    """Decoded block scales s = decode(stored) * t, in float32."""
    s = e4m4.decode(stored) if scale_format == "e4m4" else stored.astype(np.float32)
    with np.errstate(over="ignore"):
        s = (s * np.float32(t)).astype(np.float32)
    # Saturate instead of overflowing to inf next to float32's maximum (NaN stays NaN).
    return np.where(s > np.float32(SCALE_MAX["f32"]), np.float32(SCALE_MAX["f32"]), s).astype(np.float32)


def nearest_codes(xn: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest codebook entry: distance |xn - c| in float32, ties to the lowest index."""
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(xn[..., None] - codebook.astype(np.float32))
    d = np.where(np.isnan(d), np.float32(np.inf), d)
    return np.argmin(d, axis=-1).astype(np.uint32)  # argmin returns the first of equal minima


def _blocks(x: np.ndarray) -> np.ndarray:
    """[..., D] -> float32 [..., nb, 32], the last block zero-padded."""
    d = x.shape[-1]
    nb = -(-d // BLOCK)
    xf = np.zeros(x.shape[:-1] + (nb * BLOCK,), np.float32)
    xf[..., :d] = x.astype(np.float32)
    return xf.reshape(x.shape[:-1] + (nb, BLOCK))


def quantize_ref(
    x: npt.ArrayLike,
    k: int,
    codebook: npt.ArrayLike,
    scale_format: ScaleFormat = "e4m4",
    tensor_scale: float | Literal["auto"] = "auto",
) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """Quantize ``x`` [..., D] (float16, bfloat16 or float32) to format v1.

    Returns ``(packed, scales, tensor_scale)``: packed uint32 [..., nb, k] (bit i of word j of block b is bit j
    of the code of element 32*b + i), scales [..., nb] in the scale format's storage dtype, and the float32
    tensor scale used.
    """
    x = np.asarray(x)
    codebook = np.asarray(codebook, dtype=np.float32)
    if codebook.shape != (2**k,):
        raise ValueError(f"codebook must have shape ({2**k},), got {codebook.shape}")
    t = auto_tensor_scale_ref(x, scale_format) if isinstance(tensor_scale, str) else np.float32(tensor_scale)
    v = _blocks(x)
    a = np.abs(v)
    nonfinite = ~np.isfinite(a).all(axis=-1)
    amax = np.where(np.isfinite(a), a, np.float32(0)).max(axis=-1, initial=np.float32(0)).astype(np.float32)
    stored = encode_scales(amax, nonfinite, t, scale_format)
    s = decode_scales(stored, t, scale_format)[..., None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        xn = np.where(s == 0, np.float32(0), v / np.where(s == 0, np.float32(1), s)).astype(np.float32)
    codes = nearest_codes(xn, codebook)
    codes = np.where(nonfinite[..., None], np.uint32(0), codes)
    return pack_codes(codes, k), stored, t


def pack_codes(codes: np.ndarray, k: int) -> np.ndarray:
    """codes [..., nb, 32] -> packed uint32 [..., nb, k]: bit i of word j of a block is bit j of code i."""
    codes = np.asarray(codes).astype(np.uint32)
    bits = (codes[..., None, :] >> np.arange(k, dtype=np.uint32)[:, None]) & np.uint32(1)  # [..., nb, k, 32]
    return (bits << np.arange(BLOCK, dtype=np.uint32)).sum(axis=-1, dtype=np.uint64).astype(np.uint32)


def unpack_codes(packed: np.ndarray, k: int) -> np.ndarray:
    """packed uint32 [..., nb, k] -> codes uint32 [..., nb, 32]."""
    bits = (packed[..., :, None] >> np.arange(BLOCK, dtype=np.uint32)) & np.uint32(1)  # [..., nb, k, 32]
    return (bits << np.arange(k, dtype=np.uint32)[:, None]).sum(axis=-2, dtype=np.uint32)


def cast_output(y: np.ndarray, dtype: npt.DTypeLike) -> np.ndarray:
    """float32 -> dtype with round-to-nearest-even; NaN becomes the dtype's canonical quiet NaN."""
    dtype = np.dtype(dtype)
    with np.errstate(over="ignore"):  # overflow to inf is the IEEE cast's answer
        out = y.astype(dtype)
    uint = _UINT_OF[dtype.itemsize]
    bits = out.view(uint)
    bits[np.isnan(y)] = CANONICAL_NAN[dtype]
    return bits.view(dtype)


def dequantize_ref(
    packed: npt.ArrayLike,
    scales: npt.ArrayLike,
    codebook: npt.ArrayLike,
    tensor_scale: float,
    k: int,
    d: int,
    dtype: npt.DTypeLike,
    scale_format: ScaleFormat = "e4m4",
) -> np.ndarray:
    """Dequantize to [..., d]: ``cast(codebook[c] * s)`` computed in float32, padding dropped."""
    packed = np.asarray(packed, dtype=np.uint32)
    codebook = np.asarray(codebook, dtype=np.float32)
    s = decode_scales(np.asarray(scales), np.float32(tensor_scale), scale_format)
    codes = unpack_codes(packed, k)
    with np.errstate(invalid="ignore", over="ignore"):
        y = (codebook[codes] * s[..., None]).astype(np.float32)
    y = y.reshape(y.shape[:-2] + (y.shape[-2] * BLOCK,))[..., :d]  # not -1: the lead dims may hold a 0
    return cast_output(y, dtype)
