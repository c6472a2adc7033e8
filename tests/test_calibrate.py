"""``jax_kbit.quantize_calibrated``: valid format v1, never worse than round to nearest, deterministic, errors.

The MiniLM targets it exists for are checked in test_minilm.py.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from conftest import dtype_id

import jax_kbit as jk
from jax_kbit import calibrate, reference

pytestmark = pytest.mark.usefixtures("cpu")

LAYOUTS = ("out_in", "in_out")


def problem(seed: int, out: int, n: int, layout: str, dtype=np.float32):
    """A weight (``[out, n]`` or ``[n, out]``) and the Hessian of correlated calibration inputs ``[n, n]``."""
    g = np.random.default_rng(seed)
    mix = g.standard_normal((n, n)) / np.sqrt(n)  # correlated inputs, the case error feedback is for
    x = g.standard_normal((4 * n, n)) @ mix + 0.3 * g.standard_normal((4 * n, n))
    w = g.standard_normal((out, n) if layout == "out_in" else (n, out)).astype(dtype)
    return w, x.T @ x, x


def output_error(q, w, h, layout: str) -> np.ndarray:
    """``(w_q - w) H (w_q - w)^T`` per output (the squared output error on the calibration inputs)."""
    d = np.asarray(q.dequantize(np.float32), np.float64) - np.asarray(w, np.float64)
    d = d if layout == "out_in" else d.T
    return np.einsum("rn,rn->r", d @ h, d)


def raises(exc, name: str):
    return pytest.raises(exc, match=rf"\b{name}\b")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize(
    "dtype, scale_format",
    [(np.float32, "e4m4"), (np.dtype(ml_dtypes.bfloat16), "f16"), (np.float16, "f32")],
    ids=lambda v: dtype_id(v) if not isinstance(v, str) else v,
)
def test_result_is_format_v1_and_decodes_with_the_reference(layout, k, dtype, scale_format):
    # 70 and 45: a partial last block along either axis.
    w, h, _ = problem(k, 45, 70, layout, dtype)
    q = jk.quantize_calibrated(w, k, hessian=h, layout=layout, scale_format=scale_format)
    plain = jk.quantize(w, k, scale_format=scale_format)
    assert isinstance(q, jk.QuantizedArray)
    assert (q.shape, q.dtype, q.k, q.scale_format) == (w.shape, np.dtype(dtype), k, scale_format)
    for name in ("packed", "scales", "codebook", "tensor_scale"):
        a, b = getattr(q, name), getattr(plain, name)
        assert (a.shape, a.dtype) == (b.shape, b.dtype), name
    assert q.nbytes == plain.nbytes  # same bytes per element as plain quantization
    ref = reference.dequantize_ref(
        np.asarray(q.packed), np.asarray(q.scales), np.asarray(q.codebook), float(q.tensor_scale),
        k=k, d=q.d, dtype=np.float32, scale_format=scale_format,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(jk.dequantize(q, np.float32)), ref)
    # The padding of a partial last block gets the code quantize gives it (that of a zero).
    pad = q.packed.shape[-2] * 32 - q.d
    codes, codes_plain = (reference.unpack_codes(np.asarray(a.packed), k) for a in (q, plain))
    np.testing.assert_array_equal(codes[..., -1, 32 - pad :], codes_plain[..., -1, 32 - pad :])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", [2, 3, 4])
def test_output_error_never_worse_than_round_to_nearest(layout, k):
    w, h, _ = problem(10 + k, 64, 96, layout)
    q = jk.quantize_calibrated(w, k, hessian=h, layout=layout)
    e_cal, e_rtn = output_error(q, w, h, layout), output_error(jk.quantize(w, k), w, h, layout)
    # Per output row with blocks along `in`; per group of 32 outputs (which share blocks) along `out`.
    group = 1 if layout == "out_in" else 32
    e_cal, e_rtn = e_cal.reshape(-1, group).sum(1), e_rtn.reshape(-1, group).sum(1)
    assert (e_cal <= e_rtn * (1 + 1e-9)).all()
    assert e_cal.sum() < 0.7 * e_rtn.sum()  # measured about 0.42 to 0.44 on these problems


def test_without_calibration_data_the_weight_error_is_no_worse():
    w, _, _ = problem(3, 64, 128, "out_in")
    for k in (2, 4):
        err = np.sum((np.asarray(jk.quantize_calibrated(w, k).dequantize(np.float32)) - w) ** 2)
        assert err <= np.sum((np.asarray(jk.quantize(w, k).dequantize(np.float32)) - w) ** 2)


def test_deterministic_and_inputs_equal_their_hessian():
    w, h, x = problem(5, 40, 64, "out_in")
    a = jk.quantize_calibrated(w, 3, inputs=x)
    b = jk.quantize_calibrated(w, 3, inputs=x)
    c = jk.quantize_calibrated(w, 3, hessian=calibrate.hessian(x))
    for name in ("packed", "scales", "tensor_scale"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(c, name)))


def test_jax_inputs_and_a_custom_codebook():
    import jax.numpy as jnp

    w, h, _ = problem(6, 32, 64, "out_in")
    cb = jk.codebooks.uniform(3)
    q = jk.quantize_calibrated(jnp.asarray(w), 3, hessian=jnp.asarray(h, jnp.float32), codebook=cb)
    np.testing.assert_array_equal(np.asarray(q.codebook), cb)
    plain = jk.quantize(w, 3, codebook=cb)
    assert output_error(q, w, h, "out_in").sum() < output_error(plain, w, h, "out_in").sum()


def test_hessian_mask_and_weights():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    wt = np.array([[1.0, 2.0, 5.0], [0.5, 9.0, 9.0]])
    keep = x.reshape(-1, 4)[[0, 1, 3]].astype(np.float64)
    np.testing.assert_allclose(calibrate.hessian(x, mask), keep.T @ keep)
    np.testing.assert_allclose(calibrate.hessian(x, mask, wt), (keep.T * [1.0, 2.0, 0.5]) @ keep)


def test_corrected_target():
    w, h, x = problem(7, 16, 32, "out_in")
    np.testing.assert_array_equal(calibrate.corrected_target(w, h, h, strength=0.0), w)
    # Inputs without error (C == H): nothing to correct.
    np.testing.assert_allclose(calibrate.corrected_target(w, h, h), w, atol=1e-5)
    # Inputs that carry an error: with a small ridge, the full correction is the least-squares map from them
    # to the float outputs.
    xq = x + 0.2 * np.random.default_rng(0).standard_normal(x.shape)
    v = calibrate.corrected_target(w, xq.T @ xq, x.T @ xq, strength=1.0, damp=1e-7)
    np.testing.assert_allclose(v.T, np.linalg.lstsq(xq, x @ w.T.astype(np.float64), rcond=None)[0], atol=1e-4)
    assert np.linalg.norm(xq @ v.T - x @ w.T) < 0.9 * np.linalg.norm(xq @ w.T - x @ w.T)


W = np.ones((8, 64), np.float32)
H = np.eye(64)


@pytest.mark.parametrize(
    "args, kwargs, exc, name",
    [
        ((np.ones(64, np.float32),), {}, ValueError, "w"),
        ((np.ones((2, 8, 64), np.float32),), {}, ValueError, "w"),
        ((np.ones((8, 64), np.int32),), {}, TypeError, "w"),
        ((np.ones((8, 64), np.float64),), {}, TypeError, "w"),
        (([[1.0] * 64] * 8,), {}, TypeError, "w"),
        ((np.full((8, 64), np.nan, np.float32),), {}, ValueError, "w"),
        ((W, 6), {}, ValueError, "k"),
        ((W, 4.0), {}, TypeError, "k"),
        ((W,), {"hessian": np.eye(63)}, ValueError, "hessian"),
        ((W,), {"hessian": np.ones((64, 8))}, ValueError, "hessian"),
        ((W,), {"hessian": np.eye(8)}, ValueError, "hessian"),  # in_out's reduction axis, not out_in's
        ((W,), {"hessian": np.eye(64, dtype=np.int32)}, TypeError, "hessian"),
        ((W,), {"hessian": np.triu(np.ones((64, 64)))}, ValueError, "hessian"),  # not symmetric
        ((W,), {"hessian": -H}, ValueError, "hessian"),
        ((W,), {"hessian": H * np.nan}, ValueError, "hessian"),
        ((W,), {"hessian": [[1.0]]}, TypeError, "hessian"),
        ((W,), {"inputs": np.ones((10, 63))}, ValueError, "inputs"),
        ((W,), {"inputs": np.ones((10, 64), np.int64)}, TypeError, "inputs"),
        ((W,), {"inputs": np.ones((10, 64)), "hessian": H}, ValueError, "inputs"),
        ((W,), {"layout": "in-out"}, ValueError, "layout"),
        ((W,), {"codebook": np.zeros(8, np.float32)}, ValueError, "codebook"),
        ((W,), {"codebook": np.zeros(16)}, TypeError, "codebook"),
        ((W,), {"scale_format": "e5m2"}, ValueError, "scale_format"),
        ((W,), {"hessian": H, "damp": 0.0}, ValueError, "damp"),
        ((W,), {"hessian": H, "damp": "a"}, TypeError, "damp"),
        ((W,), {"scale_factors": ()}, ValueError, "scale_factors"),
        ((W,), {"scale_factors": (1.0, -0.5)}, ValueError, "scale_factors"),
        ((W,), {"scale_factors": ("a",)}, TypeError, "scale_factors"),
        ((W,), {"refine": -1}, ValueError, "refine"),
        ((W,), {"refine": 1.5}, TypeError, "refine"),
    ],
)
def test_bad_arguments_name_the_argument(args, kwargs, exc, name):
    with raises(exc, name):
        jk.quantize_calibrated(*args, **kwargs)


def test_bad_corrected_target_and_hessian_arguments():
    with raises(ValueError, "cross"):
        calibrate.corrected_target(W, H, np.eye(8))
    with raises(ValueError, "strength"):
        calibrate.corrected_target(W, H, H, strength=1.5)
    with raises(ValueError, "mask"):
        calibrate.hessian(np.ones((3, 4, 8)), mask=np.ones((4, 3)))
    with raises(ValueError, "weights"):
        calibrate.hessian(np.ones((3, 8)), weights=-np.ones(3))
