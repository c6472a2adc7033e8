"""Calibrated quantization of weight matrices: GPTQ-style error feedback into ordinary format v1 arrays.

``quantize`` picks each element's code independently (round to nearest) and each block's scale from the
block's absmax. That minimises the error of the weights, but what matters in a network is the error of a
layer's *outputs* ``X @ W^T`` on the inputs ``X`` the layer actually sees. ``quantize_calibrated`` chooses
codes and block scales to minimise that output error, given calibration inputs ``X`` (or their Hessian
``H = X^T X``):

- The reduction axis is processed one index at a time. After an index is quantized, its rounding error is
  spread over the indices not yet quantized, weighted by the inverse Hessian, so that correlated inputs
  compensate for it (the optimal-brain-surgeon update used by GPTQ, Frantar et al. 2022). With the upper
  Cholesky factor ``U`` of ``H^-1`` the output error is exactly ``sum_j ||(w_j - q_j) / U_jj||^2`` over the
  reduction indices ``j`` (``w_j`` already updated by the earlier steps), which is what every choice below
  minimises greedily.
- A block's scale is fixed when the block is reached, from the weights as updated so far. Several candidate
  scales are tried per block (the absmax scale and smaller and larger ones, each rounded to the scale
  format as it is stored) and the one with the smallest output error for that block is kept.
- Codes are the nearest codebook entries to ``w / s`` with the **decoded** scale ``s``, and the error fed
  back is computed with the value format v1 decodes, ``fl32(C[code] * s)``.

The result is an ordinary ``QuantizedArray``: format v1 unchanged, the same bytes per element, decoded by
``jax_kbit.dequantize`` and ``jax_kbit.reference.dequantize_ref`` like any other. Only the choice of codes,
block scales and tensor scale differs from ``quantize``. Everything runs in NumPy (float64) on the host and is
deterministic.

Layouts. Format v1 blocks run along the weight's last axis:

- ``layout="out_in"`` (PyTorch ``Linear``, ``y = x @ W.T``, ``W`` is ``[out, in]``): blocks run along the
  reduction axis ``in``. Blocks of 32 reduction indices are processed in order; all 32 indices of a block share
  its scale, chosen when the block is reached.
- ``layout="in_out"`` (Flax ``Dense`` kernel, ``y = x @ W``, ``W`` is ``[in, out]``): blocks run along
  ``out``, so all blocks of one reduction index (one row of ``W``) are quantized in the same step, each
  with its own scale chosen from that (updated) row.

See docs/COMPRESS.md for the results on all-MiniLM-L6-v2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from jax_kbit import codebooks as _codebooks
from jax_kbit.quantized_array import QuantizedArray
from jax_kbit.reference import (
    BLOCK,
    SCALE_DTYPES,
    SCALE_FORMATS,
    auto_tensor_scale_ref,
    decode_scales,
    encode_scales,
)

__all__ = ["DEFAULT_SCALE_FACTORS", "hessian", "quantize_calibrated"]

Layout = Literal["out_in", "in_out"]
LAYOUTS: tuple[str, ...] = ("out_in", "in_out")

# Candidate block scales, as multiples of the block's absmax (each is rounded to the scale format). The first
# one, 1.0, is the scale ``quantize`` uses; ties between candidates go to the earliest in this list.
DEFAULT_SCALE_FACTORS: tuple[float, ...] = (1.0, 0.96875, 0.9375, 0.90625, 0.875, 0.84375, 0.8125, 0.78125, 0.75)


def hessian(inputs: npt.ArrayLike, mask: npt.ArrayLike | None = None) -> np.ndarray:
    """``X^T X`` (float64 ``[n, n]``) over the calibration inputs ``inputs`` ``[..., n]``.

    Args:
      inputs: a real array whose last axis is the layer's reduction axis (e.g. ``[batch, tokens, n]``).
      mask: optional array of the leading shape of ``inputs`` (e.g. an attention mask ``[batch, tokens]``);
        only positions where it is non-zero count.
    """
    x = np.asarray(inputs)
    if x.ndim < 1 or not (np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16"):
        raise TypeError(f"inputs must be a float array of rank >= 1, got {x.dtype.name}{list(x.shape)}")
    x = x.astype(np.float64).reshape(-1, x.shape[-1])
    if mask is not None:
        m = np.asarray(mask)
        if m.size != x.shape[0]:
            raise ValueError(
                f"mask must have the leading shape of inputs ({x.shape[0]} positions), got shape {m.shape}"
            )
        x = x[m.reshape(-1) != 0]
    if not np.isfinite(x).all():
        raise ValueError("inputs must be finite")
    return x.T @ x


_gram = hessian  # quantize_calibrated's `hessian` argument shadows the function


def _check_hessian(h: Any, n: int) -> np.ndarray:
    if not hasattr(h, "shape") or not hasattr(h, "dtype"):
        raise TypeError(f"hessian must be an array, got {type(h).__name__}")
    h = np.asarray(h)
    if not np.issubdtype(h.dtype, np.floating):
        raise TypeError(f"hessian must be a float array, got {h.dtype.name}")
    if h.shape != (n, n):
        raise ValueError(f"hessian must have shape ({n}, {n}) (the weight's reduction axis), got {h.shape}")
    h = h.astype(np.float64)
    if not np.isfinite(h).all():
        raise ValueError("hessian must be finite")
    if not np.allclose(h, h.T, rtol=1e-5, atol=1e-8 * max(float(np.abs(h).max()), 1e-300)):
        raise ValueError("hessian must be symmetric (X^T X of the calibration inputs)")
    if (np.diag(h) < 0).any():
        raise ValueError("hessian must be positive semi-definite (it has a negative diagonal entry)")
    return (h + h.T) / 2


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper ``U`` with ``U^T U = (H + damp * mean(diag H) * I)^-1``; more damping if H is too ill-conditioned."""
    n = h.shape[0]
    mean_diag = float(np.mean(np.diag(h))) if n else 0.0
    if not mean_diag > 0:
        return np.eye(n)
    lam = damp * mean_diag
    for _ in range(8):
        try:
            lower = np.linalg.cholesky(h + lam * np.eye(n))
            lower_inv = np.linalg.inv(lower)
            return np.linalg.cholesky(lower_inv.T @ lower_inv).T
        except np.linalg.LinAlgError:
            lam = max(lam * 10, 1e-12 * mean_diag)
    raise ValueError("hessian is too ill-conditioned even with damping")  # pragma: no cover


class _Quantizer:
    """Nearest-entry search and decoding against decoded scales, exactly as format v1 decodes."""

    def __init__(self, codebook: np.ndarray, t: np.float32, scale_format: str, factors: np.ndarray):
        self.cb32 = codebook
        self.cb = codebook.astype(np.float64)
        order = np.argsort(self.cb, kind="stable")
        self.sorted = self.cb[order]
        self.order = order
        self.t = np.float32(t)
        self.fmt = scale_format
        self.factors = factors
        self.zero_code = int(np.argmin(np.abs(self.cb)))  # first index of the smallest |C|, like quantize(0)

    def scales(self, amax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate stored and decoded scales ``[F, ...]`` for block absmaxes ``amax`` (float64)."""
        v = (amax[None] * self.factors.reshape((-1,) + (1,) * amax.ndim)).astype(np.float32)
        stored = encode_scales(v, np.zeros(v.shape, bool), np.float32(1), self.fmt)
        # encode_scales divides by t; the candidate value is given in units of t already.
        decoded = decode_scales(stored, self.t, self.fmt).astype(np.float64)
        return stored, decoded

    def codes(self, w: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest codes for ``w / s`` (ties to the lowest index) and the decoded values ``fl32(C[c] * s)``."""
        with np.errstate(divide="ignore", invalid="ignore"):
            xn = np.where(s == 0, 0.0, w / np.where(s == 0, 1.0, s))
        d = np.abs(xn[..., None] - self.cb)
        c = np.argmin(d, axis=-1)
        q = (self.cb32[c] * s.astype(np.float32)).astype(np.float64)
        return c, q


def _pack(codes: np.ndarray, k: int) -> np.ndarray:
    """codes ``[..., nb, 32]`` -> packed uint32 ``[..., nb, k]`` (bit planes, docs/FORMAT.md section 8)."""
    codes = codes.astype(np.uint32)
    bits = (codes[..., None, :] >> np.arange(k, dtype=np.uint32)[:, None]) & np.uint32(1)
    return (bits << np.arange(BLOCK, dtype=np.uint32)).sum(axis=-1, dtype=np.uint64).astype(np.uint32)


def _run_out_in(
    w: np.ndarray, u: np.ndarray, qz: _Quantizer, t: np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ with blocks along the reduction axis (the last one). Returns codes [R, nb, 32], stored [R, nb]."""
    rows, n = w.shape
    nb = -(-n // BLOCK)
    w = w.copy()
    codes = np.full((rows, nb, BLOCK), qz.zero_code, np.int64)
    stored = np.zeros((rows, nb), SCALE_DTYPES[qz.fmt])
    nf = len(qz.factors)
    ar = np.arange(rows)
    for b in range(nb):
        c0, c1 = b * BLOCK, min((b + 1) * BLOCK, n)
        m = c1 - c0
        ub = u[c0:c1, c0:c1]
        amax = np.abs(w[:, c0:c1]).max(axis=1) / np.float64(t)
        st, s = qz.scales(amax)  # [F, R]
        wc = np.broadcast_to(w[:, c0:c1], (nf, rows, m)).copy()
        err = np.empty((nf, rows, m))
        cc = np.empty((nf, rows, m), np.int64)
        for j in range(m):
            c, q = qz.codes(wc[:, :, j], s)
            e = (wc[:, :, j] - q) / ub[j, j]
            cc[:, :, j] = c
            err[:, :, j] = e
            if j + 1 < m:
                wc[:, :, j + 1 :] -= e[:, :, None] * ub[j, j + 1 :]
        best = np.argmin(np.sum(err * err, axis=2), axis=0)  # [R]; ties to the first candidate
        codes[:, b, :m] = cc[best, ar]
        stored[:, b] = st[best, ar]
        if c1 < n:
            w[:, c1:] -= err[best, ar] @ u[c0:c1, c1:]
    return codes, stored


def _run_in_out(
    w: np.ndarray, u: np.ndarray, qz: _Quantizer, t: np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ with blocks across the reduction axis: ``w`` is [in, out], blocks of 32 along ``out``.

    Returns codes [in, nb, 32] and stored scales [in, nb].
    """
    n, cols = w.shape
    nb = -(-cols // BLOCK)
    pad = nb * BLOCK - cols
    w = np.concatenate([w, np.zeros((n, pad))], axis=1) if pad else w.copy()
    codes = np.empty((n, nb, BLOCK), np.int64)
    stored = np.empty((n, nb), SCALE_DTYPES[qz.fmt])
    ar = np.arange(nb)
    step = 4 * BLOCK  # lazy batch: feed errors forward to the rest of the rows every `step` rows
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        errs = np.empty((r1 - r0, nb * BLOCK))
        for i in range(r0, r1):
            row = w[i].reshape(nb, BLOCK)
            amax = np.abs(row).max(axis=1) / np.float64(t)
            st, s = qz.scales(amax)  # [F, nb]
            c, q = qz.codes(np.broadcast_to(row, (len(qz.factors), nb, BLOCK)), s[..., None])
            e2 = np.sum((row - q) ** 2, axis=2)  # [F, nb]; the same 1/U_ii^2 weight for every block
            best = np.argmin(e2, axis=0)
            codes[i] = c[best, ar]
            stored[i] = st[best, ar]
            e = ((row - q[best, ar]) / u[i, i]).reshape(-1)
            if pad:
                e[cols:] = 0.0
            errs[i - r0] = e
            if i + 1 < r1:
                w[i + 1 : r1] -= np.outer(u[i, i + 1 : r1], e)
        if r1 < n:
            w[r1:] -= u[r0:r1, r1:].T @ errs
    if pad:
        codes[:, -1, BLOCK - pad :] = qz.zero_code
    return codes, stored


def quantize_calibrated(
    w: Any,
    k: int = 4,
    *,
    inputs: npt.ArrayLike | None = None,
    hessian: npt.ArrayLike | None = None,
    layout: Layout = "out_in",
    codebook: npt.ArrayLike | None = None,
    scale_format: str = "e4m4",
    damp: float = 0.01,
    scale_factors: Sequence[float] | None = DEFAULT_SCALE_FACTORS,
) -> QuantizedArray:
    """Quantize a weight matrix to format v1, choosing codes and block scales for a small output error.

    Minimises ``||X W^T - X W_q^T||`` (``layout="out_in"``) or ``||X W - X W_q||`` (``"in_out"``) over the
    calibration inputs ``X`` greedily, with GPTQ-style error feedback and a search over candidate block
    scales (module docstring). Without ``inputs`` and ``hessian`` the Hessian is the identity: no error
    feedback, only the scale search, which then minimises the weights' own squared error (useful for
    embedding tables, whose "inputs" are one-hot).

    Args:
      w: float16, bfloat16 or float32 matrix (NumPy or JAX), finite.
      k: bits per element, 2..5.
      inputs: calibration inputs ``[..., n]`` with ``n`` the reduction axis length (``w.shape[1]`` for
        ``"out_in"``, ``w.shape[0]`` for ``"in_out"``). Give either ``inputs`` or ``hessian``, not both.
      hessian: ``X^T X`` ``[n, n]`` (see ``hessian()``); any positive scale factor gives the same result.
      layout: ``"out_in"`` (PyTorch ``Linear``, blocks along the reduction axis) or ``"in_out"`` (Flax
        ``Dense``, blocks along the output axis).
      codebook: float32 array of ``2**k`` finite entries; default ``jax_kbit.codebooks.lloyd_max(k)``.
      scale_format: ``"e4m4"``, ``"f16"`` or ``"f32"``.
      damp: Tikhonov damping added to the Hessian's diagonal, as a fraction of its mean diagonal (> 0).
      scale_factors: candidate block scales as positive multiples of each block's absmax (rounded to the
        scale format); ``None`` or ``(1.0,)`` uses the absmax scale, as ``quantize`` does.

    Returns:
      A ``QuantizedArray`` of ``w``'s shape and dtype (valid format v1). Its tensor scale is the automatic
      one for ``2 * max|w|``, leaving room for weights that the error feedback makes larger than ``max|w|``.
    """
    # -------- arguments
    from jax_kbit.api import _check_float_dtype, _check_k  # the same messages as quantize

    k = _check_k(k)
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"scale_format must be one of {SCALE_FORMATS}, got {scale_format!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not hasattr(w, "dtype") or not hasattr(w, "shape"):
        raise TypeError(f"w must be a jax or NumPy array, got {type(w).__name__}")
    dtype = _check_float_dtype(w.dtype, "w")
    if len(w.shape) != 2:
        raise ValueError(f"w must be a matrix (rank 2), got shape {tuple(w.shape)}")
    w64 = np.asarray(w).astype(np.float32).astype(np.float64)
    if not np.isfinite(w64).all():
        raise ValueError("w must be finite (calibrated quantization has no rule for NaN or inf)")
    if isinstance(damp, bool) or not isinstance(damp, (int, float, np.integer, np.floating)):
        raise TypeError(f"damp must be a float, got {type(damp).__name__}")
    if not (np.isfinite(damp) and damp > 0):
        raise ValueError(f"damp must be a positive finite float, got {damp}")
    if scale_factors is None:
        factors = np.ones(1)
    else:
        try:
            factors = np.asarray(list(scale_factors), dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"scale_factors must be a sequence of floats, got {scale_factors!r}") from err
        if factors.ndim != 1 or factors.size == 0 or not (np.isfinite(factors).all() and (factors > 0).all()):
            raise ValueError(f"scale_factors must be a non-empty sequence of positive floats, got {scale_factors!r}")
    if codebook is None:
        cb = _codebooks.default(k)
    else:
        if not hasattr(codebook, "dtype") or not hasattr(codebook, "shape"):
            raise TypeError(f"codebook must be a float32 array of {2**k} entries, got {type(codebook).__name__}")
        cb = np.asarray(codebook)
        if cb.dtype != np.float32:
            raise TypeError(f"codebook must be float32, got {cb.dtype.name} (convert it explicitly)")
        if cb.shape != (2**k,):
            raise ValueError(f"codebook must have shape ({2**k},) for k={k}, got {cb.shape}")
        if not np.isfinite(cb).all():
            raise ValueError("codebook entries must be finite")
    cb = np.asarray(cb, np.float32)
    n = w64.shape[1] if layout == "out_in" else w64.shape[0]
    if inputs is not None and hessian is not None:
        raise ValueError("give either inputs or hessian, not both")
    if inputs is not None:
        x = np.asarray(inputs)
        if x.ndim < 1 or x.shape[-1] != n:
            raise ValueError(f"inputs must have last axis {n} (the weight's reduction axis), got shape {x.shape}")
        h = _gram(x)
    elif hessian is not None:
        h = _check_hessian(hessian, n)
    else:
        h = None

    # -------- quantization
    t = auto_tensor_scale_ref(np.float32(2) * w64.astype(np.float32), scale_format)
    qz = _Quantizer(cb, t, scale_format, factors)
    u = np.eye(n) if h is None else _inverse_cholesky(h, float(damp))
    if w64.size == 0:
        codes = np.zeros(w64.shape[:-1] + (-(-w64.shape[-1] // BLOCK), BLOCK), np.int64)
        stored = np.zeros(codes.shape[:-1], SCALE_DTYPES[scale_format])
    elif layout == "out_in":
        codes, stored = _run_out_in(w64, u, qz, t)
    else:
        codes, stored = _run_in_out(w64, u, qz, t)
    import jax.numpy as jnp

    return QuantizedArray(
        jnp.asarray(_pack(codes, k)),
        jnp.asarray(stored),
        jnp.asarray(cb),
        jnp.asarray(np.float32(t)),
        k=k,
        d=w64.shape[-1],
        dtype=dtype,
        scale_format=scale_format,
    )
