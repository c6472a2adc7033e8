"""Calibrated quantization of weight matrices: GPTQ-style error feedback into ordinary format v1 arrays.

``quantize`` picks each element's code independently (round to nearest) and each block's scale from the
block's absmax. That minimises the error of the weights, but what matters in a network is the error of a
layer's *outputs* on the inputs the layer actually sees. ``quantize_calibrated`` chooses codes and block
scales to make ``||X W^T - X W_q^T||`` small for calibration inputs ``X`` (given directly, or as their
Hessian ``H = X^T X``):

1. **Error feedback** (GPTQ, Frantar et al. 2022): the reduction axis is processed one index at a time; after
   an index is quantized, its rounding error is spread over the indices not yet quantized through the inverse
   Hessian, so that correlated inputs compensate for it. With the upper Cholesky factor ``U`` of ``H^-1`` the
   output error is exactly ``sum_j ||(w_j - q_j) / U_jj||^2`` (``w_j`` as updated by the earlier steps).
2. **Block scales fixed when the block is reached**, from the weights as updated so far. A few candidate scales
   per block (``scale_factors`` times the block's absmax, each rounded to the scale format as it is stored)
   are tried and the one with the smallest ``sum_j ((w_j - q_j) / U_jj)^2`` over the block is kept.
3. **Refinement**: a few sweeps of coordinate descent on the same quadratic objective
   ``(q - w)^T H (q - w)`` (per output row), each code moved to the entry nearest its optimum given all the
   others; a sweep never increases the objective.
4. **Never worse than round to nearest**: damping, the scale search and the greedy passes optimise a proxy, so
   every output row (with blocks along ``out``: every group of 32 rows, which share blocks) whose undamped
   objective is worse than plain round to nearest's (absmax scales, nearest codes) gets those instead.

Codes are always the nearest entries for the **decoded** scale ``s`` and the error is computed with the value
format v1 decodes, ``fl32(C[code] * s)``. The result is an ordinary ``QuantizedArray``: format v1 unchanged,
the same bytes per element, decoded by ``jax_kbit.dequantize`` and ``jax_kbit.reference.dequantize_ref``
like any other. Everything runs in NumPy (float64) on the host and is deterministic.

``H`` is damped: ``H / mean(diag H) + damp * I``. The damping keeps the inverse well conditioned and pulls the
result toward the weights' own squared error where the calibration data says little.

Layouts: format v1 blocks run along the weight's last axis.

- ``layout="out_in"`` (PyTorch ``Linear``, ``y = x @ W.T``, ``W`` is ``[out, in]``): blocks run along the
  reduction axis ``in``; a block's 32 reduction indices share one scale, chosen when the block is reached.
- ``layout="in_out"`` (Flax ``Dense`` kernel, ``y = x @ W``, ``W`` is ``[in, out]``): blocks run along
  ``out``, so all blocks of one reduction index (one row of ``W``) are quantized in the same step, each with
  its own scale chosen from that (updated) row.

``corrected_target`` adds the other half of sequential calibration: when the layer's inputs already carry the
error of earlier quantized layers, it returns weights that map those inputs closer to the float model's
outputs, to be quantized in place of the original weights. docs/COMPRESS.md describes the whole procedure
on all-MiniLM-L6-v2 (``jax_kbit.models.minilm.quantize_calibrated_params``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from jax_kbit.api import _check_codebook, _check_float_dtype, _check_k, _check_scale_format
from jax_kbit.quantized_array import QuantizedArray
from jax_kbit.reference import (
    BLOCK,
    SCALE_DTYPES,
    auto_tensor_scale_ref,
    decode_scales,
    encode_scales,
    pack_codes,
)

__all__ = [
    "DEFAULT_DAMP",
    "DEFAULT_REFINE",
    "DEFAULT_SCALE_FACTORS",
    "corrected_target",
    "hessian",
    "quantize_calibrated",
]

Layout = Literal["out_in", "in_out"]
LAYOUTS: tuple[str, ...] = ("out_in", "in_out")

#: Candidate block scales, as multiples of the block's absmax (each rounded to the scale format). The first,
#: 1.0, is the scale ``quantize`` uses; ties between candidates go to the earliest in this list.
DEFAULT_SCALE_FACTORS: tuple[float, ...] = (
    1.0,
    0.96875,
    0.9375,
    0.90625,
    0.875,
    0.84375,
    0.8125,
    0.78125,
    0.75,
)
#: Damping added to the normalised Hessian's diagonal (``H / mean(diag H) + damp * I``).
DEFAULT_DAMP = 0.03
#: Coordinate-descent sweeps after the error-feedback pass.
DEFAULT_REFINE = 4


# ---------------------------------------------------------------- Hessians


def hessian(
    inputs: npt.ArrayLike, mask: npt.ArrayLike | None = None, weights: npt.ArrayLike | None = None
) -> np.ndarray:
    """``X^T diag(weights) X`` (float64 ``[n, n]``) over the calibration inputs ``inputs`` ``[..., n]``.

    Args:
      inputs: a float array whose last axis is the layer's reduction axis (e.g. ``[batch, tokens, n]``).
      mask: optional array of the leading shape of ``inputs`` (e.g. an attention mask ``[batch, tokens]``);
        only positions where it is non-zero count.
      weights: optional non-negative weights of the leading shape of ``inputs``, one per position (how much
        the output error at that position matters).
    """
    x = _float_array(inputs, "inputs")
    if x.ndim < 1:
        raise ValueError("inputs must have rank >= 1 (positions x reduction axis), got a scalar")
    n = x.shape[-1]
    lead = x.shape[:-1]
    x = x.reshape(-1, n)
    keep = np.ones(x.shape[0], bool)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != lead:
            raise ValueError(f"mask must have the leading shape of inputs {lead}, got {m.shape}")
        keep = m.reshape(-1) != 0
    if weights is not None:
        wt = _float_array(weights, "weights")
        if wt.shape != lead:
            raise ValueError(f"weights must have the leading shape of inputs {lead}, got {wt.shape}")
        wt = wt.reshape(-1)[keep]
        if not (np.isfinite(wt).all() and (wt >= 0).all()):
            raise ValueError("weights must be finite and non-negative")
    x = x[keep]
    if not np.isfinite(x).all():
        raise ValueError("inputs must be finite")
    return (x.T if weights is None else x.T * wt) @ x


def _float_array(a: Any, name: str) -> np.ndarray:
    if not hasattr(a, "dtype") or not hasattr(a, "shape"):
        raise TypeError(f"{name} must be a NumPy or JAX array, got {type(a).__name__}")
    a = np.asarray(a)
    if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
        raise TypeError(f"{name} must be a float array, got {a.dtype.name}")
    return a.astype(np.float64)


def _check_hessian(h: Any, n: int, name: str = "hessian") -> np.ndarray:
    h = _float_array(h, name)
    if h.shape != (n, n):
        raise ValueError(f"{name} must have shape ({n}, {n}) (the weight's reduction axis), got {h.shape}")
    if not np.isfinite(h).all():
        raise ValueError(f"{name} must be finite")
    if np.abs(h - h.T).max(initial=0.0) > 1e-6 * np.abs(h).max(initial=0.0):
        raise ValueError(f"{name} must be symmetric (X^T X of the calibration inputs)")
    if (np.diag(h) < 0).any():
        raise ValueError(f"{name} must be positive semi-definite (it has a negative diagonal entry)")
    return (h + h.T) / 2


def _check_damp(damp: Any) -> float:
    if isinstance(damp, bool) or not isinstance(damp, (int, float, np.integer, np.floating)):
        raise TypeError(f"damp must be a float, got {type(damp).__name__}")
    if not (math.isfinite(damp) and damp > 0):
        raise ValueError(f"damp must be a positive finite float, got {damp}")
    return float(damp)


def _lower_inverse(r: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix, by halves (matrix products instead of a general LU inverse)."""
    n = r.shape[0]
    if n <= 128:
        return np.tril(np.linalg.inv(r))
    h = n // 2
    a, c = _lower_inverse(r[:h, :h]), _lower_inverse(r[h:, h:])
    out = np.zeros_like(r)
    out[:h, :h], out[h:, h:] = a, c
    out[h:, :h] = -(c @ (r[h:, :h] @ a))
    return out


@dataclass(frozen=True)
class _Prepared:
    """The normalised Hessian ``hn = H / mean(diag H)``, the damped ``hd = hn + damp * I`` and ``U`` with
    ``U^T U = hd^-1``."""

    hn: np.ndarray
    hd: np.ndarray
    u: np.ndarray


def _prepare(h: np.ndarray, damp: float) -> _Prepared:
    """Normalise and damp ``h`` and factor its inverse: ``U = J R^-1 J`` with ``J hd J = R R^T`` (``J``
    reverses the order), so one Cholesky factorisation and one triangular inverse suffice. More damping is
    added (x10 at a time) if the factorisation fails."""
    n = h.shape[0]
    mean_diag = float(np.mean(np.diag(h))) if n else 0.0
    hn = h / mean_diag if mean_diag > 0 else np.zeros_like(h)
    lam = damp
    for _ in range(12):
        hd = hn + lam * np.eye(n)
        try:
            r = np.linalg.cholesky(hd[::-1, ::-1])
        except np.linalg.LinAlgError:
            lam *= 10
            continue
        return _Prepared(hn, hd, np.ascontiguousarray(_lower_inverse(r)[::-1, ::-1]))
    raise ValueError("hessian is too ill-conditioned even with damping")  # pragma: no cover


# ---------------------------------------------------------------- the quantizer


class _Grid:
    """Candidate scales, nearest-entry search and decoding, exactly as format v1 decodes."""

    def __init__(self, codebook: np.ndarray, t: np.float32, scale_format: str, factors: np.ndarray):
        self.cb32 = codebook
        self.order = np.argsort(codebook.astype(np.float64), kind="stable")  # sorted position -> code
        self.sorted32 = codebook[self.order]
        s64 = self.sorted32.astype(np.float64)
        self.mid = (s64[1:] + s64[:-1]) / 2
        self.t = np.float32(t)
        self.fmt = scale_format
        self.factors = factors
        # The code quantize gives 0.0 (first index of the smallest |C|), for padding.
        self.zero_pos = int(np.flatnonzero(self.order == np.argmin(np.abs(codebook.astype(np.float64))))[0])

    def scales(self, amax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate stored and decoded scales ``[F, ...]`` for block absmaxes ``amax`` (float64)."""
        v = (amax[None] / np.float64(self.t)) * self.factors.reshape((-1,) + (1,) * amax.ndim)
        v = v.astype(np.float32)
        stored = encode_scales(v, np.zeros(v.shape, bool), np.float32(1), self.fmt)  # v is already / t
        return stored, decode_scales(stored, self.t, self.fmt).astype(np.float64)

    def nearest(self, x: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sorted positions of the entries nearest ``x / s`` and their decoded values ``fl32(C * s)``."""
        with np.errstate(divide="ignore", invalid="ignore"):
            pos = np.searchsorted(self.mid, x / np.where(s == 0, 1.0, s))
        return pos, (self.sorted32[pos] * np.broadcast_to(s, pos.shape).astype(np.float32)).astype(np.float64)


def _pick_scales(grid: _Grid, blocks: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per block (last axis of ``blocks`` is the block), the candidate scale with the smallest weighted
    squared rounding error. Returns stored and decoded scales of ``blocks.shape[:-1]``."""
    st, s = grid.scales(np.abs(blocks).max(axis=-1))
    if len(grid.factors) == 1:
        return st[0], s[0]
    _, q = grid.nearest(blocks[None], s[..., None])
    best = np.argmin(np.sum((blocks - q) ** 2 * weight, axis=-1), axis=0)[None]  # ties: first candidate
    return np.take_along_axis(st, best, axis=0)[0], np.take_along_axis(s, best, axis=0)[0]


def _gptq(w: np.ndarray, u: np.ndarray, grid: _Grid, blocks_along_in: bool, real: np.ndarray):
    """The error-feedback pass on ``w`` ``[R, n]`` (``R`` outputs, ``n`` the reduction axis).

    Blocks of 32 run along ``n`` (``blocks_along_in``) or along ``R``; that axis is a multiple of 32 and
    ``real`` (bool, ``[nb, 32]``) marks the elements that are not padding (padding is left out of the scale
    choice). Works on the transpose (a reduction index is a contiguous row). Returns, all transposed
    (``[n, R]``), the sorted-codebook positions, the decoded values and the decoded scale of every element,
    and the stored scales (``[R, n / 32]`` or ``[R / 32, n]``).
    """
    wt = w.T.copy()
    n, rows = wt.shape
    pos = np.empty((n, rows), np.int64)
    vals = np.empty((n, rows))
    s_el = np.empty((n, rows))
    inv_d = 1.0 / np.diag(u)
    if blocks_along_in:
        stored = np.empty((rows, n // BLOCK), SCALE_DTYPES[grid.fmt])
    else:
        stored = np.empty((rows // BLOCK, n), SCALE_DTYPES[grid.fmt])
    for c0 in range(0, n, BLOCK):
        c1 = min(c0 + BLOCK, n)
        ub = u[c0:c1, c0:c1]
        if blocks_along_in:  # one scale per output row for these 32 indices, from the updated weights
            st, s = _pick_scales(grid, wt[c0:c1].T, inv_d[c0:c1] ** 2 * real[c0 // BLOCK])
            stored[:, c0 // BLOCK] = st
            s_el[c0:c1] = s
        err = np.empty((c1 - c0, rows))
        for j in range(c0, c1):
            x = wt[j]
            if not blocks_along_in:  # one scale per 32 outputs of this reduction index
                st, s = _pick_scales(grid, x.reshape(-1, BLOCK), real)
                stored[:, j] = st
                s_el[j] = np.repeat(s, BLOCK)
            pos[j], vals[j] = p, q = grid.nearest(x, s_el[j])
            err[j - c0] = e = (x - q) * inv_d[j]
            if j + 1 < c1:
                wt[j + 1 : c1] -= ub[j - c0, j - c0 + 1 :, None] * e
        if c1 < n:
            wt[c1:] -= u[c0:c1, c1:].T @ err
    return pos, stored, vals, s_el


def _refine(wt: np.ndarray, hd: np.ndarray, grid: _Grid, pos, vals, s_el, sweeps: int) -> None:
    """Coordinate descent on ``(q - w)^T hd (q - w)`` per output, in place on ``pos`` and ``vals``.

    All arrays are transposed (``[n, R]``). Each code moves to the entry nearest its optimum given the others
    (its block scale stays) when that lowers the objective. Reduction indices are visited in order, 32 at a
    time, the gradient of the others updated by one matrix product per 32.
    """
    n, rows = wt.shape
    if sweeps <= 0 or n == 0:
        return
    g = hd @ (vals - wt)  # half the gradient
    diag = np.diag(hd)
    s_div = np.where(s_el == 0, 1.0, s_el)
    s32 = s_el.astype(np.float32)
    for _ in range(sweeps):
        for c0 in range(0, n, BLOCK):
            c1 = min(c0 + BLOCK, n)
            hb = hd[c0:c1, c0:c1]
            gb = g[c0:c1].copy()
            dq = np.zeros((c1 - c0, rows))
            moved = False
            for j in range(c0, c1):
                i = j - c0
                q = vals[j]
                p = np.searchsorted(grid.mid, (q - gb[i] / diag[j]) / s_div[j])
                d = (grid.sorted32[p] * s32[j]).astype(np.float64) - q
                better = d * (2 * gb[i] + d * diag[j]) < 0
                if not better.any():
                    continue
                moved = True
                d = np.where(better, d, 0.0)
                pos[j] = np.where(better, p, pos[j])
                vals[j] = q + d
                dq[i] = d
                gb += hb[:, i, None] * d
            if moved:
                g += hd[:, c0:c1] @ dq


def _check_common(
    w: Any, k: Any, layout: Any, codebook: Any, scale_format: Any, scale_factors: Any, refine: Any
):
    k = _check_k(k)
    _check_scale_format(scale_format)
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
    if scale_factors is None:
        factors = np.ones(1)
    else:
        try:
            factors = np.asarray([float(f) for f in scale_factors], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"scale_factors must be a sequence of floats, got {scale_factors!r}") from err
        if factors.size == 0 or not (np.isfinite(factors).all() and (factors > 0).all()):
            raise ValueError(
                f"scale_factors must be a non-empty sequence of positive floats, got {scale_factors!r}"
            )
    if isinstance(refine, bool) or not isinstance(refine, (int, np.integer)):
        raise TypeError(f"refine must be an int (coordinate-descent sweeps), got {type(refine).__name__}")
    if refine < 0:
        raise ValueError(f"refine must be >= 0 (coordinate-descent sweeps), got {refine}")
    cb = np.asarray(_check_codebook(codebook, k), np.float32)
    return k, dtype, w64, factors, cb, int(refine)


def quantize_calibrated(
    w: Any,
    k: int = 4,
    *,
    inputs: npt.ArrayLike | None = None,
    hessian: npt.ArrayLike | None = None,
    layout: Layout = "out_in",
    codebook: npt.ArrayLike | None = None,
    scale_format: str = "e4m4",
    damp: float = DEFAULT_DAMP,
    scale_factors: Sequence[float] | None = DEFAULT_SCALE_FACTORS,
    refine: int = DEFAULT_REFINE,
) -> QuantizedArray:
    """Quantize a weight matrix to format v1, choosing codes and block scales for a small output error.

    Minimises ``||X W^T - X W_q^T||`` (``layout="out_in"``) or ``||X W - X W_q||`` (``"in_out"``) over the
    calibration inputs ``X`` (module docstring: error feedback, scale search, coordinate-descent refinement).
    Without ``inputs`` and ``hessian`` the Hessian is the identity: no error feedback, and the scale search
    minimises the weights' own squared error (useful for embedding tables, whose inputs are one-hot).

    Args:
      w: float16, bfloat16 or float32 matrix (NumPy or JAX), finite.
      k: bits per element, 2..5.
      inputs: calibration inputs ``[..., n]``, ``n`` the reduction axis length (``w.shape[1]`` for
        ``"out_in"``, ``w.shape[0]`` for ``"in_out"``). Give ``inputs`` or ``hessian``, not both.
      hessian: ``X^T X`` ``[n, n]`` (see ``hessian()``, which also takes a mask and per-position weights).
        Only its shape matters, not its scale.
      layout: ``"out_in"`` (PyTorch ``Linear``: blocks along the reduction axis) or ``"in_out"`` (Flax
        ``Dense``: blocks along the output axis).
      codebook: float32 array of ``2**k`` finite entries; default ``jax_kbit.codebooks.lloyd_max(k)``.
      scale_format: ``"e4m4"``, ``"f16"`` or ``"f32"``.
      damp: added to the diagonal of ``H / mean(diag H)`` (> 0).
      scale_factors: candidate block scales as positive multiples of each block's absmax (rounded to the
        scale format); ``None`` or ``(1.0,)`` uses the absmax scale, as ``quantize`` does.
      refine: coordinate-descent sweeps after the error-feedback pass (0 for plain GPTQ).

    Returns:
      A ``QuantizedArray`` of ``w``'s shape and dtype (valid format v1), whose output error on ``H`` is no
      larger than round to nearest's, row by row. Its tensor scale is the automatic one for ``2 * max|w|``,
      which leaves room for weights that error feedback makes larger than ``max|w|``.

    Raises:
      TypeError: ``w``, ``inputs``, ``hessian`` or ``codebook`` is not a float array of the accepted dtypes,
        or ``k``, ``damp``, ``refine``, ``scale_factors`` has the wrong type.
      ValueError: a shape does not match (``w`` not a matrix, ``hessian`` not ``[n, n]`` for the reduction
        axis, ``inputs``' last axis not ``n``), ``hessian`` not symmetric / finite / PSD on its diagonal,
        non-finite ``w``, both ``inputs`` and ``hessian`` given, or a value out of range.
    """
    k, dtype, w64, factors, cb, refine = _check_common(
        w, k, layout, codebook, scale_format, scale_factors, refine
    )
    damp = _check_damp(damp)
    n = w64.shape[1] if layout == "out_in" else w64.shape[0]
    if inputs is not None and hessian is not None:
        raise ValueError("give either inputs or hessian, not both")
    if inputs is not None:
        x = _float_array(inputs, "inputs")
        if x.ndim < 1 or x.shape[-1] != n:
            raise ValueError(
                f"inputs must have last axis {n} (the weight's reduction axis), got shape {x.shape}"
            )
        h = _hessian(x)
    elif hessian is not None:
        h = _check_hessian(hessian, n)
    else:
        h = None
    prep = None if h is None else _prepare(h, damp)
    return _quantize(w64, dtype, k, cb, scale_format, factors, layout, prep, refine)


_hessian = hessian  # quantize_calibrated's `hessian` argument shadows the function


def _rtn(wp: np.ndarray, grid: _Grid, along_in: bool, real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every block on its own (the identity Hessian): the scale search of ``grid`` and nearest codes.

    ``wp`` is the padded ``[rows, n]`` weight. Returns the sorted-codebook positions ``[rows, n]`` and the
    stored scales (``[rows, nb]`` with blocks along ``n``, ``[nb, n]`` with blocks along ``rows``).
    """
    rows, n = wp.shape
    nb = real.shape[0]
    bl = wp.reshape(-1, BLOCK) if along_in else wp.T.reshape(-1, BLOCK)
    step = nb * max(1, 2**16 // (nb * len(grid.factors)))  # bounds the [factors, blocks, 32] temporaries
    pos_b = np.empty(bl.shape, np.int64)
    st_b = np.empty(bl.shape[0], SCALE_DTYPES[grid.fmt])
    for r0 in range(0, bl.shape[0], step):
        chunk = bl[r0 : r0 + step]
        weight = np.tile(real, (len(chunk) // nb, 1))  # block i of a row is the row's (i % nb)-th
        st, s = _pick_scales(grid, chunk, weight)
        st_b[r0 : r0 + step] = st
        pos_b[r0 : r0 + step] = grid.nearest(chunk, s[:, None])[0]
    if along_in:
        return pos_b.reshape(rows, n), st_b.reshape(rows, nb)
    return pos_b.reshape(n, rows).T, st_b.reshape(n, nb).T


def _decoded(grid: _Grid, pos: np.ndarray, stored: np.ndarray, along_in: bool) -> np.ndarray:
    """The values format v1 decodes (float64 ``[rows, n]``) from sorted positions and stored scales."""
    s = decode_scales(stored, grid.t, grid.fmt)
    s = np.repeat(s, BLOCK, axis=1) if along_in else np.repeat(s, BLOCK, axis=0)
    return (grid.sorted32[pos] * s.astype(np.float32)).astype(np.float64)


def _row_objective(err: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``e_r^T h e_r`` for every row ``e_r`` of ``err`` ``[rows, n]``."""
    return np.einsum("rn,rn->r", err @ h, err)


def _quantize(
    w64: np.ndarray,
    dtype: np.dtype,
    k: int,
    cb: np.ndarray,
    scale_format: str,
    factors: np.ndarray,
    layout: str,
    prep: _Prepared | None,
    refine: int,
) -> QuantizedArray:
    """``quantize_calibrated`` after argument checking (``prep`` None: the identity Hessian)."""
    import jax.numpy as jnp

    t = auto_tensor_scale_ref(np.float32(2) * w64.astype(np.float32), scale_format)
    grid = _Grid(cb, t, scale_format, factors)
    wo = w64 if layout == "out_in" else w64.T  # [out, in]: rows are outputs, columns the reduction axis
    rows, n = wo.shape
    along_in = layout == "out_in"
    nb = -(-n // BLOCK) if along_in else -(-rows // BLOCK)
    if along_in:  # pad the reduction axis (padding columns: zero weights and zero inputs)
        wp = np.zeros((rows, nb * BLOCK))
    else:  # pad the outputs (padding rows: zero weights, independent of the others)
        wp = np.zeros((nb * BLOCK, n))
    wp[:rows, :n] = wo
    real = (np.arange(nb * BLOCK) < (n if along_in else rows)).reshape(nb, BLOCK)
    if wp.size == 0:
        pos = np.zeros(wp.shape, np.int64)
        stored = np.zeros((rows, nb) if along_in else (nb, n), SCALE_DTYPES[scale_format])
    elif prep is None:
        pos, stored = _rtn(wp, grid, along_in, real)
    else:
        u, hd, hn = prep.u, prep.hd, prep.hn
        if along_in and wp.shape[1] != n:  # padding columns: independent, zero inputs
            u, hd, hn = (_pad_eye(a, wp.shape[1]) for a in (u, hd, hn))
        pos, stored, vals, s_el = _gptq(wp, u, grid, along_in, real)
        _refine(wp.T, hd, grid, pos, vals, s_el, refine)
        pos = pos.T
        # Damping, the scale search and the greedy passes optimise a proxy; keep round to nearest (absmax
        # scales, what `quantize` does) wherever it is better on the undamped objective, so the result is
        # never worse than it. Rows are independent with blocks along `in`; with blocks along `out`, groups
        # of 32 rows share their blocks and are compared together.
        plain = _Grid(cb, t, scale_format, np.ones(1))
        pos0, stored0 = _rtn(wp, plain, along_in, real)
        e1 = _row_objective(vals.T - wp, hn)
        e0 = _row_objective(_decoded(plain, pos0, stored0, along_in) - wp, hn)
        if along_in:
            worse = e1 > e0
            pos[worse], stored[worse] = pos0[worse], stored0[worse]
        else:
            worse = e1.reshape(nb, BLOCK).sum(axis=1) > e0.reshape(nb, BLOCK).sum(axis=1)
            rw = np.repeat(worse, BLOCK)
            pos[rw], stored[worse] = pos0[rw], stored0[worse]
    codes = grid.order[pos]
    if along_in:
        codes[:, n:] = grid.order[grid.zero_pos]
        codes = codes.reshape(rows, nb, BLOCK)
    else:  # back to [in, out] and blocks along out
        codes[rows:, :] = grid.order[grid.zero_pos]
        codes = codes.T.reshape(n, nb, BLOCK)
        stored = stored.T
    return QuantizedArray(
        jnp.asarray(pack_codes(codes, k)),
        jnp.asarray(np.ascontiguousarray(stored)),
        jnp.asarray(cb),
        jnp.asarray(np.float32(t)),
        k=k,
        d=w64.shape[-1],
        dtype=dtype,
        scale_format=scale_format,
    )


def _pad_eye(a: np.ndarray, m: int) -> np.ndarray:
    """``a`` in the top-left corner of an ``m x m`` identity."""
    out = np.eye(m)
    out[: a.shape[0], : a.shape[1]] = a
    return out


def corrected_target(
    w: Any,
    hessian: npt.ArrayLike,
    cross: npt.ArrayLike,
    *,
    strength: float = 0.5,
    damp: float = 0.1,
    layout: Layout = "out_in",
) -> np.ndarray:
    """Weights that map a quantized model's inputs closer to the float model's outputs (float32).

    In a sequentially quantized model a layer sees inputs ``Xq`` that already carry the error of earlier
    layers, while the float model's layer saw ``X``. The weights ``V`` minimising
    ``||Xq V^T - X W^T||^2 + lam ||V - W||^2`` (``lam = damp * mean(diag H)``) are
    ``W (C + lam I)(H + lam I)^-1`` with ``H = Xq^T Xq`` and ``C = X^T Xq``; this returns
    ``W + strength * (V - W)``, to be passed to ``quantize_calibrated`` with ``hessian=H`` in place of ``W``.
    ``strength`` < 1 shrinks the correction, which is estimated from the calibration data and overfits it
    when taken in full.

    Args:
      w: the float weights (``[out, in]`` for ``layout="out_in"``, ``[in, out]`` for ``"in_out"``).
      hessian: ``H = Xq^T Xq`` ``[n, n]`` (optionally with per-position weights, as ``hessian()``).
      cross: ``C = X^T Xq`` ``[n, n]``, with the same positions and weights.
      strength: in ``[0, 1]``; 0 returns ``w`` unchanged.
      damp: the ridge, relative to the mean diagonal of ``H`` (> 0).
      layout: as in ``quantize_calibrated``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    wf = _float_array(w, "w")
    if wf.ndim != 2:
        raise ValueError(f"w must be a matrix (rank 2), got shape {wf.shape}")
    n = wf.shape[1] if layout == "out_in" else wf.shape[0]
    h = _check_hessian(hessian, n)
    c = _float_array(cross, "cross")
    if c.shape != (n, n):
        raise ValueError(f"cross must have shape ({n}, {n}), got {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError("cross must be finite")
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.integer, np.floating)):
        raise TypeError(f"strength must be a float, got {type(strength).__name__}")
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    damp = _check_damp(damp)
    wo = wf if layout == "out_in" else wf.T
    lam = damp * float(np.mean(np.diag(h))) if n else 0.0
    if strength == 0 or lam == 0:  # nothing to correct, or no calibration data
        return wf.astype(np.float32)
    eye = np.eye(n)
    v = np.linalg.solve(h + lam * eye, (wo @ (c + lam * eye)).T).T  # h symmetric
    out = wo + strength * (v - wo)
    return (out if layout == "out_in" else out.T).astype(np.float32)
