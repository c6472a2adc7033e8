"""``jax_kbit.matmul`` against ``x @ W`` in float64, with ``W`` dequantized by the NumPy reference.

The CPU tests run everywhere; the ``gpu`` ones run the fused CUDA kernel (skipped without a GPU). Accuracy is
measured as ||y - ref|| / ||ref|| (docs/MATMUL.md says what to expect per dtype).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BF16, GPU, KS, SCALE_FORMATS, dtype_id, needs_cuda

import jax_kbit as jk
from jax_kbit import reference
from jax_kbit.matmul import FUSED_MAX_ROWS

matmul_module = importlib.import_module("jax_kbit.matmul")  # the attribute jax_kbit.matmul is the function

CPU = jax.devices("cpu")[0]


# Relative error bounds: float32 sums; 16-bit outputs are rounded once more (and on the GPU the codebook
# values enter the tensor cores in x's dtype).
TOL = {np.dtype(np.float32): 2e-6, np.dtype(np.float16): 2e-3, BF16: 1e-2}
ROWS = (1, 2, 7, 16, 17, 64, 300)
# A call of the transposed product's kernel, plain or tiled (not "kbit_matmul_tiled", the forward one).
TRANSPOSED_CALL = re.compile(r"kbit_matmul_t(_tiled)?\b")


def weight_ref(q: jk.QuantizedMatrix) -> np.ndarray:
    """W [in, out] in float64, dequantized by the NumPy reference."""
    t = jax.device_get(q.t)
    wt = reference.dequantize_ref(
        np.asarray(t.packed),
        np.asarray(t.scales),
        np.asarray(t.codebook),
        np.float32(t.tensor_scale),
        t.k,
        t.d,
        np.float32,
        t.scale_format,
    )
    return wt.astype(np.float64).T


def rel_err(y, ref, scale=None) -> float:
    """||y - ref|| / ||scale||, with ``scale`` = ``ref`` by default.

    The kernel checks pass ``scale = |x| @ |W|``: a float32 sum's error is bounded relative to the sum of the
    magnitudes of its terms, not to the sum itself, which cancellation can make arbitrarily small (one output
    of 31 terms is a single such sum).
    """
    y = np.asarray(y).astype(np.float64)
    assert y.shape == ref.shape
    assert np.isfinite(y).all(), "unexpected NaN/inf"
    scale = ref if scale is None else scale
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(scale), 1e-300))


def make(rng, m, din, dout, k, dtype, scale_format="e4m4", lead=()):
    w = rng.standard_normal((din, dout)).astype(np.float32) * np.float32(0.05)
    x = rng.standard_normal(lead + (m, din)).astype(dtype)
    q = jk.quantize_matrix(jnp.asarray(w), k, scale_format=scale_format)
    return x, q


def check(x, q, device, msg=""):
    # A fresh function each time: the lowering (and so matmul_module.cuda_fused_transposed) is read per trace.
    y = jax.jit(lambda x, q: jk.matmul(x, q))(jax.device_put(x, device), jax.device_put(q, device))
    assert y.dtype == x.dtype and y.shape == x.shape[:-1] + (q.shape[1],), (y.dtype, y.shape)
    w = weight_ref(q)
    ref = np.asarray(x, np.float64) @ w
    err = rel_err(y, ref, np.abs(np.asarray(x, np.float64)) @ np.abs(w))
    assert err < TOL[np.dtype(x.dtype)], f"relative error {err:.2e} {msg}"
    return np.asarray(y)


# ---------------------------------------------------------------- CPU (and the unfused path)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=dtype_id)
@pytest.mark.parametrize("k", KS)
def test_cpu_matches_reference(rng, k, dtype, m):
    for din, dout in ((96, 40), (100, 33), (31, 1)):
        x, q = make(rng, m, din, dout, k, dtype)
        check(x, q, CPU, f"k={k} m={m} in={din} out={dout} {rng}")


@pytest.mark.parametrize("scale_format", SCALE_FORMATS)
def test_cpu_scale_formats_and_leading_dims(rng, scale_format):
    x, q = make(rng, 3, 130, 70, 3, np.float32, scale_format, lead=(2,))
    check(x, q, CPU, f"{scale_format} {rng}")
    x, q = make(rng, 30, 64, 20, 5, BF16, scale_format, lead=(4,))  # 120 rows: the unfused path
    check(x, q, CPU, f"{scale_format} {rng}")


def test_non_finite_blocks_and_inputs(rng):
    din, dout = 64, 8
    w = rng.standard_normal((din, dout)).astype(np.float32)
    w[3, 2] = np.nan  # block 0 of output column 2
    w[40, 5] = np.inf  # block 1 of output column 5
    q = jk.quantize_matrix(jnp.asarray(w), 4)
    x = rng.standard_normal((5, din)).astype(np.float32)
    x[1, 7] = np.nan
    for device in [CPU] + ([GPU] if GPU is not None and jk.cuda_built() else []):
        for dtype in (np.float32, np.float16, BF16):
            y = np.asarray(jax.jit(jk.matmul)(jax.device_put(x.astype(dtype), device), q)).astype(np.float32)
            nan = np.isnan(y)
            expect = np.zeros_like(nan)
            expect[:, [2, 5]] = True  # non-finite blocks dequantize to NaN
            expect[1, :] = True  # NaN in x
            np.testing.assert_array_equal(nan, expect, err_msg=f"{device} {dtype}")


def test_zero_and_empty(rng):
    q = jk.quantize_matrix(jnp.zeros((64, 16), jnp.float32), 4)
    y = jk.matmul(jnp.asarray(rng.standard_normal((3, 64)), jnp.float32), q)
    np.testing.assert_array_equal(np.asarray(y), 0)
    q = jk.quantize_matrix(jnp.zeros((0, 5), jnp.float32), 2)
    np.testing.assert_array_equal(
        np.asarray(jk.matmul(jnp.ones((2, 0), jnp.bfloat16), q)).astype(np.float32), 0
    )
    q = jk.quantize_matrix(jnp.ones((33, 4), jnp.float32), 2)
    assert jk.matmul(jnp.ones((0, 33), jnp.float16), q).shape == (0, 4)
    assert jk.matmul(jnp.ones((2, 33), jnp.float16), jk.quantize_matrix(jnp.ones((33, 0)), 2)).shape == (2, 0)


def test_rows_select_the_fused_kernel():
    q = jk.quantize_matrix(jnp.ones((64, 32), jnp.float32), 4)
    for m, fused in ((1, True), (FUSED_MAX_ROWS, True), (FUSED_MAX_ROWS + 1, False)):
        text = jax.jit(jk.matmul).lower(jnp.ones((m, 64), jnp.bfloat16), q).as_text()
        assert ("kbit_matmul" in text) == fused, m
        assert ("kbit_dequantize" in text) == (not fused), m


@pytest.mark.parametrize(
    "dtype, gpu_result", [(jnp.bfloat16, "bf16"), (jnp.float16, "f16"), (jnp.float32, "f32")]
)
def test_unfused_gpu_dot_accumulates_in_its_own_result_type(dtype, gpu_result):
    # Above FUSED_MAX_ROWS the GPU runs dequantize + dot: a 16-bit dot there already sums in float32, so
    # it asks for x's dtype (no float32 output and conversion pass); the CPU and float32 x ask for float32.
    from jax_kbit.exporting import DISABLED_CHECKS

    q = jk.quantize_matrix(jnp.ones((64, 32), jnp.float32), 4)
    x = jnp.ones((FUSED_MAX_ROWS + 1, 64), dtype)
    for platform, result in (("cuda", gpu_result), ("cpu", "f32")):
        for fn in (jk.matmul, lambda x, q: jk.matmul(x[:, :32], q, transpose=True)):
            exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=DISABLED_CHECKS)
            text = exported(x, q).mlir_module()
            dots = re.findall(r"stablehlo.dot_general.*-> tensor<[0-9x]+x(\w+)>", text)
            assert dots == [result], (platform, dots)


@pytest.mark.parametrize("rows, dout", [(1, 40), (16, 8192), (3, 50000)])
def test_cuda_lowering_declares_a_workspace_result(rows, dout):
    # The CUDA handlers get their split-reduction partials from a second, float32 result (so that they can
    # be recorded into CUDA graphs); the lowering drops it. The CPU handler has one result.
    from jax_kbit.exporting import DISABLED_CHECKS

    din = 64
    q = jk.quantize_matrix(jnp.ones((din, dout), jnp.float32), 4)
    x = jnp.ones((rows, din), jnp.bfloat16)
    g = jnp.ones((rows, dout), jnp.bfloat16)
    cases = (
        (jk.matmul, "kbit_matmul", (x, q), dout),
        (lambda g, q: jk.matmul(g, q, transpose=True), "kbit_matmul_t", (g, q), din),
    )
    old = matmul_module.cuda_fused_transposed
    matmul_module.cuda_fused_transposed = True
    try:
        for fn, target, args, cols in cases:
            per_row = min(cols * matmul_module.WORKSPACE_SPLITS, matmul_module.WORKSPACE_FLOATS_PER_ROW)
            for platform, expect in (("cuda", [rows * per_row]), ("cpu", [])):
                exported = jax.export.export(
                    jax.jit(fn), platforms=[platform], disabled_checks=DISABLED_CHECKS
                )
                text = exported(*args).mlir_module()
                calls = [line for line in text.splitlines() if f"custom_call @{target}(" in line]
                assert len(calls) == 1, (platform, target, calls)
                results = calls[0].rsplit("->", 1)[1]
                workspace = [int(n) for n in re.findall(r"tensor<(\d+)xf32>", results)]
                assert workspace == expect, (platform, target, results)
    finally:
        matmul_module.cuda_fused_transposed = old


def test_transforms(rng):
    x, q = make(rng, 3, 96, 40, 4, np.float32, lead=(5,))
    wref = weight_ref(q)
    y = jax.vmap(jk.matmul, in_axes=(0, None))(jnp.asarray(x), q)
    assert rel_err(y, np.asarray(x, np.float64) @ wref) < TOL[np.dtype(np.float32)]
    y = jax.vmap(jk.matmul, in_axes=(2, None), out_axes=1)(jnp.asarray(np.moveaxis(x, 1, 2)), q)
    assert rel_err(y, np.asarray(x, np.float64) @ wref) < 1e-5
    # A stack of weights under vmap and scan (layers).
    ws = jnp.asarray(rng.standard_normal((4, 96, 96)).astype(np.float32) * 0.1)
    qs = jax.vmap(lambda w: jk.quantize_matrix(w, 3))(ws)
    assert qs.shape == (4, 96, 96)
    dense = np.stack([weight_ref(jax.tree.map(lambda a, i=i: a[i], qs)) for i in range(4)])
    xs = jnp.asarray(rng.standard_normal((4, 2, 96)).astype(np.float32))
    y = jax.vmap(jk.matmul)(xs, qs)
    assert rel_err(y, np.einsum("bmi,bio->bmo", np.asarray(xs, np.float64), dense)) < 1e-5

    def layer(h, w):
        return jk.matmul(h, w), None

    h, _ = jax.lax.scan(layer, xs[0], qs)
    expect = np.asarray(xs[0], np.float64)
    for i in range(4):
        expect = expect @ dense[i]
    assert rel_err(h, expect) < 1e-4


@pytest.mark.parametrize("m", (1, 7, 100))
def test_grad_wrt_inputs_and_codebook(rng, m):
    x, q = make(rng, m, 100, 33, 3, np.float32)
    x = jnp.asarray(x)
    wref = weight_ref(q)
    g = jax.grad(lambda x: jnp.sum(jnp.sin(jk.matmul(x, q))))(x)
    y = np.asarray(x, np.float64) @ wref
    expect = np.cos(y) @ wref.T
    assert rel_err(g, expect) < 1e-5

    def with_codebook(cb, ts):
        t = q.t
        qq = jk.QuantizedMatrix(
            jk.QuantizedArray(
                t.packed, t.scales, cb, ts, k=t.k, d=t.d, dtype=t.dtype, scale_format=t.scale_format
            )
        )
        return jnp.sum(jnp.sin(jk.matmul(x, qq)))

    def dense(cb, ts):
        t = q.t
        qq = jk.QuantizedArray(
            t.packed, t.scales, cb, ts, k=t.k, d=t.d, dtype=t.dtype, scale_format=t.scale_format
        )
        return jnp.sum(jnp.sin(jnp.matmul(x, jk.dequantize(qq).T, precision="highest")))

    got = jax.grad(with_codebook, argnums=(0, 1))(q.t.codebook, q.t.tensor_scale)
    want = jax.grad(dense, argnums=(0, 1))(q.t.codebook, q.t.tensor_scale)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_bad_input(rng):
    w = jnp.asarray(rng.standard_normal((64, 16)).astype(np.float32))
    q = jk.quantize_matrix(w, 4)
    x = jnp.ones((2, 64), jnp.float32)
    with pytest.raises(TypeError, match="QuantizedMatrix"):
        jk.matmul(x, jk.quantize(w, 4))
    with pytest.raises(TypeError, match="w must be a QuantizedMatrix"):
        jk.matmul(x, w)
    with pytest.raises(TypeError, match="x must be"):
        jk.matmul(jnp.ones((2, 64), jnp.int32), q)
    with pytest.raises(TypeError, match="x must be"):
        jk.matmul([[1.0] * 64], q)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 64\]"):
        jk.matmul(jnp.ones((2, 63), jnp.float32), q)
    with pytest.raises(ValueError, match="x must have shape"):
        jk.matmul(jnp.float32(1.0), q)
    stacked = jax.vmap(lambda w: jk.quantize_matrix(w, 4))(jnp.stack([w, w]))
    with pytest.raises(ValueError, match="one \\[in, out\\] matrix"):
        jk.matmul(x, stacked)
    with pytest.raises(ValueError, match="rank >= 2"):
        jk.quantize_matrix(jnp.ones(64), 4)
    with pytest.raises(TypeError, match="w must be float16"):
        jk.quantize_matrix(jnp.ones((64, 2), jnp.int32), 4)
    with pytest.raises(ValueError, match="k must be in 2..5"):
        jk.quantize_matrix(w, 6)


def test_quantized_matrix_is_format_v1_of_the_transpose(rng):
    w = rng.standard_normal((70, 45)).astype(np.float32)
    q = jk.quantize_matrix(jnp.asarray(w), 5, scale_format="f16")
    direct = jk.quantize(jnp.asarray(w.T), 5, scale_format="f16")
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(direct)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert q.shape == (70, 45) and q.t.shape == (45, 70) and q.dtype == np.float32 and q.k == 5
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(jk.dequantize(direct)).T)
    assert abs(q.bits_per_element - direct.bits_per_element) < 1e-12 and q.nbytes == direct.nbytes
    assert "QuantizedMatrix(shape=(70, 45)" in repr(q)


# ---------------------------------------------------------------- the transposed product g @ W.T


def check_t(g, q, device, msg=""):
    y = jax.jit(lambda g, q: jk.matmul(g, q, transpose=True))(
        jax.device_put(g, device), jax.device_put(q, device)
    )
    assert y.dtype == g.dtype and y.shape == g.shape[:-1] + (q.shape[0],), (y.dtype, y.shape)
    w = weight_ref(q)
    ref = np.asarray(g, np.float64) @ w.T
    err = rel_err(y, ref, np.abs(np.asarray(g, np.float64)) @ np.abs(w.T))
    assert err < TOL[np.dtype(g.dtype)], f"relative error {err:.2e} {msg}"
    return np.asarray(y)


def make_t(rng, m, din, dout, k, dtype, scale_format="e4m4", lead=()):
    x, q = make(rng, m, din, dout, k, dtype, scale_format, lead)
    g = rng.standard_normal(lead + (m, dout)).astype(dtype)
    return g, q


@pytest.mark.parametrize("m", (1, 7, 17, 40))
@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=dtype_id)
@pytest.mark.parametrize("k", KS)
def test_cpu_transposed_matches_reference(rng, k, dtype, m):
    for din, dout in ((96, 40), (100, 33), (31, 1)):
        g, q = make_t(rng, m, din, dout, k, dtype)
        check_t(g, q, CPU, f"k={k} m={m} in={din} out={dout} {rng}")


def test_transposed_kernel_selection_and_zero_padding(rng):
    from jax_kbit.matmul import matmul_t_p

    # The default K = 2 codebook has no zero, so padded codes decode to non-zeros: the kernel must not use them.
    q = jk.quantize_matrix(jnp.asarray(rng.standard_normal((50, 20)).astype(np.float32)), 2)
    t = q.t
    for m in (1, FUSED_MAX_ROWS, FUSED_MAX_ROWS + 1):
        g = jnp.asarray(rng.standard_normal((m, 20)).astype(np.float32))
        text = jax.jit(lambda g: jk.matmul(g, q, transpose=True)).lower(g).as_text()
        assert bool(TRANSPOSED_CALL.search(text)) == (m <= FUSED_MAX_ROWS), m
        y = matmul_t_p.bind(
            g, t.packed, t.scales, t.codebook, t.tensor_scale, k=t.k, scale_format=t.scale_format, d=t.d
        )
        assert y.shape == (m, 64)
        np.testing.assert_array_equal(np.asarray(y[:, 50:]), 0)
        assert rel_err(y[:, :50], np.asarray(g, np.float64) @ weight_ref(q).T) < 2e-6


def test_grad_uses_the_transposed_kernel(rng):
    x, q = make(rng, 3, 100, 33, 4, np.float32)
    f = jax.jit(jax.grad(lambda x: jnp.sum(jk.matmul(x, q) ** 2)))
    assert TRANSPOSED_CALL.search(f.lower(jnp.asarray(x)).as_text())
    # ... and the transposed product differentiates back through the forward kernel.
    g = jnp.asarray(rng.standard_normal((3, 33)).astype(np.float32))
    h = jax.jit(jax.grad(lambda g: jnp.sum(jnp.sin(jk.matmul(g, q, transpose=True)))))
    assert re.search(r"@kbit_matmul\(", h.lower(g).as_text())
    wref = weight_ref(q)
    expect = np.cos(np.asarray(g, np.float64) @ wref.T) @ wref
    assert rel_err(h(g), expect) < 1e-5
    # Forward mode through the transposed product, and a second derivative through both products.
    _, tangent = jax.jvp(lambda g: jk.matmul(g, q, transpose=True), (g,), (g,))
    assert rel_err(tangent, np.asarray(g, np.float64) @ wref.T) < 2e-6
    hess_vec = jax.grad(lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(jk.matmul(x, q) ** 2))(x)))(
        jnp.asarray(x)
    )
    assert rel_err(hess_vec, 2 * np.ones((3, 100)) @ (wref @ wref.T)) < 1e-5


def test_transposed_bad_input(rng):
    q = jk.quantize_matrix(jnp.asarray(rng.standard_normal((64, 16)).astype(np.float32)), 4)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 16\]"):
        jk.matmul(jnp.ones((2, 64), jnp.float32), q, transpose=True)
    with pytest.raises(TypeError, match="transpose must be a bool"):
        jk.matmul(jnp.ones((2, 64), jnp.float32), q, transpose="yes")


# ---------------------------------------------------------------- GPU: the fused kernel


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32], ids=dtype_id)
@pytest.mark.parametrize("k", KS)
@pytest.mark.gpu
@needs_cuda
def test_gpu_matches_reference(rng, k, dtype, m):
    # (1000, 300): a partial chunk / stage of blocks and a partial tile of 16 rows; (8192, 64): split
    # reduction; (4000, 50): blocks not a multiple of the stage, odd scale offsets.
    for din, dout in ((96, 40), (100, 33), (1000, 300), (8192, 64), (4000, 50)):
        x, q = make(rng, m, din, dout, k, dtype)
        check(x, q, GPU, f"k={k} m={m} in={din} out={dout} {rng}")


@pytest.mark.parametrize("scale_format", SCALE_FORMATS)
@pytest.mark.gpu
@needs_cuda
def test_gpu_scale_formats_large_and_deterministic(rng, scale_format):
    for k, din, dout in ((4, 4096, 3000), (3, 1000, 77), (2, 1000, 77), (5, 1000, 77)):
        x, q = make(rng, 5, din, dout, k, BF16, scale_format)
        y = check(x, q, GPU, f"{scale_format} k={k} {rng}")
        again = np.asarray(
            jax.jit(lambda x, q: jk.matmul(x, q))(jax.device_put(x, GPU), jax.device_put(q, GPU))
        )
        np.testing.assert_array_equal(y.view(np.uint16), again.view(np.uint16))  # no atomics: same bits


@pytest.mark.parametrize("m", (1, 2))
@pytest.mark.gpu
@needs_cuda
def test_gpu_decode_kernel_wide_output_one_split(rng, m):
    # 1600 tiles of 16 outputs: at least half the resident warps of a 132-SM GPU, so the batch-1 kernel takes
    # one split of all 64 blocks (choose_split would have taken three); still the reference's products.
    din, dout = 2048, 25600
    for k in (2, 3, 4):
        x, q = make(rng, m, din, dout, k, BF16)
        y = check(x, q, GPU, f"k={k} m={m} in={din} out={dout} {rng}")
        again = np.asarray(jax.jit(jk.matmul)(jax.device_put(x, GPU), jax.device_put(q, GPU)))
        np.testing.assert_array_equal(y.view(np.uint16), again.view(np.uint16))


@pytest.mark.parametrize("m", (1, 2))
@pytest.mark.gpu
@needs_cuda
def test_gpu_decode_kernel_long_x(rng, m):
    # The batch-1 kernel keeps a copy of x in shared memory beside its 64 KB of tables: below them while it
    # fits the gap their 64 KB alignment leaves (16000 inputs, one row), above them otherwise (16000 x two
    # rows, 28672 x one), and products whose x does not fit at all (28672 x two rows, 40000) go to the
    # 16-row kernel. Every one is the reference's product, with the same bits on a second call.
    for din, dout in ((16000, 24), (28672, 20), (40000, 20)):
        for k in (2, 3, 4):
            x, q = make(rng, m, din, dout, k, BF16)
            y = check(x, q, GPU, f"k={k} m={m} in={din} out={dout} {rng}")
            again = np.asarray(jax.jit(jk.matmul)(jax.device_put(x, GPU), jax.device_put(q, GPU)))
            np.testing.assert_array_equal(y.view(np.uint16), again.view(np.uint16))


@pytest.mark.parametrize("scale_format", SCALE_FORMATS)
@pytest.mark.parametrize("m", (1, 2))
@pytest.mark.gpu
@needs_cuda
def test_gpu_decode_kernel(rng, m, scale_format):
    # One or two rows at K <= 4 take the block-diagonal kernel (ffi/cuda_gemv.cu): four blocks per step, so
    # sizes around multiples of 4 blocks (a lone partial step, one step plus a tail), a partial tile of 16
    # rows, split reductions, more work items than resident warps (51200 and 52000 outputs: some warps
    # take a second item), non-finite blocks and inputs, and the same bits on a second call.
    # Split reductions are added up inside the CTA (8192 x 64: 16 splits, one tile a CTA; 1024 x 2200: two
    # splits, two tiles a CTA on a 132-SM GPU) unless they have more splits than a CTA has warps
    # (16384 x 40: 32 splits, through the workspace and the sum kernel).
    shapes = (
        (32, 1),
        (96, 40),
        (160, 17),
        (256, 16),
        (4000, 50),
        (8192, 64),
        (1000, 300),
        (32, 51200),
        (72, 52000),
        (1024, 2200),
        (16384, 40),
    )
    for k in (2, 3, 4):
        for dtype in (np.float16, BF16):
            for din, dout in shapes:
                x, q = make(rng, m, din, dout, k, dtype, scale_format)
                y = check(x, q, GPU, f"k={k} m={m} in={din} out={dout} {scale_format} {rng}")
                again = np.asarray(jax.jit(jk.matmul)(jax.device_put(x, GPU), jax.device_put(q, GPU)))
                np.testing.assert_array_equal(y.view(np.uint16), again.view(np.uint16))
        din, dout = 200, 20
        w = rng.standard_normal((din, dout)).astype(np.float32)
        w[3, 2] = np.nan  # block 0 of output 2
        w[170, 5] = np.inf  # block 5 (a tail step) of output 5
        q = jk.quantize_matrix(jnp.asarray(w), k, scale_format=scale_format)
        x = rng.standard_normal((m, din)).astype(np.float32)
        x[m - 1, 100] = np.nan
        for dtype in (np.float16, BF16):
            y = np.asarray(jax.jit(jk.matmul)(jax.device_put(x.astype(dtype), GPU), q)).astype(np.float32)
            expect = np.zeros((m, dout), bool)
            expect[:, [2, 5]] = True
            expect[m - 1, :] = True
            np.testing.assert_array_equal(np.isnan(y), expect, err_msg=f"k={k} m={m} {dtype}")


# Run in a subprocess whose XLA_FLAGS make XLA record every command-buffer-compatible call into CUDA graphs
# (the matmul handlers are marked so: their split reductions use the call's own workspace result, nothing is
# allocated per call). Each round feeds new x and new weights, so the recorded graphs must follow the new
# buffers; every result is checked against the same jitted function on the CPU handlers.
_GRAPH_SCRIPT = r"""
import sys
import numpy as np, jax, jax.numpy as jnp
import importlib
import jax_kbit as jk
importlib.import_module("jax_kbit.matmul").cuda_fused_transposed = True
gpu, cpu = jax.devices("gpu")[0], jax.devices("cpu")[0]

def f(x1, x16, g, q1, q16, w):
    y1 = jk.matmul(x1, q1)                      # batch-1 kernel, split reduction
    y16 = jk.matmul(x16, q16)                   # M = 16 kernel, split reduction
    yt = jk.matmul(g, q16, transpose=True)      # fused transposed kernel
    qw = jk.quantize(w, 4)
    return y1, y16 * 2, yt, jk.dequantize(qw)

rng = np.random.default_rng(int(sys.argv[1]))
run_gpu, run_cpu = jax.jit(f), jax.jit(f)
for round_ in range(3):
    w1 = jnp.asarray(rng.standard_normal((8192, 40)).astype(np.float32))
    w16 = jnp.asarray(rng.standard_normal((4096, 48)).astype(np.float32))
    q1, q16 = jk.quantize_matrix(w1, 3), jk.quantize_matrix(w16, 4)
    args = (
        rng.standard_normal((1, 8192)).astype(jnp.bfloat16),
        rng.standard_normal((16, 4096)).astype(jnp.float16),
        rng.standard_normal((4, 48)).astype(jnp.bfloat16),
        q1, q16,
        rng.standard_normal((3, 1000)).astype(np.float32),
    )
    got = run_gpu(*jax.device_put(args, gpu))
    want = run_cpu(*jax.device_put(args, cpu))
    for i, (a, b) in enumerate(zip(got, want)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        err = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert np.isfinite(a).all() and err < 2e-2, (round_, i, err)
print("ok")
"""


@pytest.mark.gpu
@needs_cuda
def test_gpu_matmul_in_cuda_graphs(rng):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL"
        " --xla_gpu_graph_min_graph_size=1"
    ).strip()
    seed = str(int(rng.integers(1 << 30)))
    proc = subprocess.run(
        [sys.executable, "-P", "-c", _GRAPH_SCRIPT, seed],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        proc.stdout[-2000:] + proc.stderr[-4000:]
    )


@pytest.mark.gpu
@needs_cuda
def test_gpu_transforms_and_grad(rng):
    with jax.default_device(GPU):
        x, q = make(rng, 4, 512, 256, 4, BF16, lead=(3,))
        wref = weight_ref(q)
        y = jax.jit(jax.vmap(jk.matmul, in_axes=(0, None)))(jnp.asarray(x), q)
        assert rel_err(y, np.asarray(x, np.float64) @ wref) < TOL[BF16]
        xf = jnp.asarray(x[0], jnp.float32)
        g = jax.jit(
            jax.grad(lambda x: jnp.sum(jk.matmul(x.astype(jnp.bfloat16), q).astype(jnp.float32) ** 2))
        )(xf)
        expect = 2 * (np.asarray(xf, np.float64) @ wref) @ wref.T
        assert rel_err(g, expect) < 3e-2


@pytest.fixture(params=[True, False], ids=["fused", "dequantize"])
def cuda_transposed(request, monkeypatch):
    """The fused CUDA transposed kernel (off by default: slower than dequantize + dot) and the default path."""
    monkeypatch.setattr(matmul_module, "cuda_fused_transposed", request.param)
    return request.param


@pytest.fixture
def fused_transposed(monkeypatch):
    monkeypatch.setattr(matmul_module, "cuda_fused_transposed", True)


@pytest.mark.parametrize("m", (1, 2, 7, 16, 17, 32, 64))
@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32], ids=dtype_id)
@pytest.mark.parametrize("k", KS)
@pytest.mark.gpu
@needs_cuda
def test_gpu_transposed_matches_reference(rng, k, dtype, m, cuda_transposed):
    # (1000, 300): partial steps of 16 rows; (64, 8192): a split reduction; (100, 33): zero padding past d.
    for din, dout in ((96, 40), (100, 33), (1000, 300), (64, 8192)):
        g, q = make_t(rng, m, din, dout, k, dtype)
        check_t(g, q, GPU, f"k={k} m={m} in={din} out={dout} {rng}")


@pytest.mark.gpu
@needs_cuda
def test_gpu_transposed_padding_nonfinite_and_deterministic(rng, fused_transposed):
    from jax_kbit.matmul import matmul_t_p

    w = rng.standard_normal((50, 3000)).astype(np.float32)
    w[40, 7] = np.nan  # block 1 of stored row 7
    q = jk.quantize_matrix(jnp.asarray(w), 2)
    t = jax.device_put(q.t, GPU)
    g = rng.standard_normal((5, 3000)).astype(np.float32)
    g[:, 7] = 0.0
    for dtype in (np.float16, BF16):
        gg = jax.device_put(g.astype(dtype), GPU)
        f = jax.jit(
            lambda g: matmul_t_p.bind(
                g, t.packed, t.scales, t.codebook, t.tensor_scale, k=2, scale_format="e4m4", d=50
            )
        )
        y = np.asarray(f(gg)).astype(np.float32)
        assert y.shape == (5, 64)
        np.testing.assert_array_equal(y[:, 50:], 0)  # padding: zeros although the K = 2 codebook has none
        assert np.isnan(y[:, 32:50]).all() and np.isfinite(y[:, :32]).all()  # NaN block times 0 is NaN
        again = np.asarray(f(gg)).astype(np.float32)
        np.testing.assert_array_equal(y.view(np.uint32), again.view(np.uint32))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fused", [True, False])
def test_gpu_grad_runs_the_transposed_kernel(rng, monkeypatch, fused):
    monkeypatch.setattr(matmul_module, "cuda_fused_transposed", fused)
    x, q = make(rng, 4, 512, 384, 3, BF16)
    with jax.default_device(GPU):
        f = jax.jit(jax.grad(lambda x: jnp.sum(jk.matmul(x, q).astype(jnp.float32) ** 2)))
        text = f.lower(jnp.asarray(x)).compile().as_text()
        assert bool(TRANSPOSED_CALL.search(text)) == fused and ("kbit_dequantize" in text) == (not fused)
        gx = f(jnp.asarray(x))
    wref = weight_ref(q)
    y = np.asarray(x, np.float64) @ wref
    assert rel_err(gx, 2 * y @ wref.T) < 3e-2
