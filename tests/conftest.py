"""Shared helpers for the CPU test suite.

Nothing here is autouse: test modules that must run on the CPU opt in with
``pytestmark = pytest.mark.usefixtures("cpu")``, so GPU test modules in this directory are not affected.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

import jax_kbit
from jax_kbit import reference

BF16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = (np.dtype(np.float16), BF16, np.dtype(np.float32))
DTYPE_IDS = {np.dtype(np.float16): "f16", BF16: "bf16", np.dtype(np.float32): "f32"}
SCALE_FORMATS = ("e4m4", "f16", "f32")
KS = (2, 3, 4, 5)
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench_script(name: str):
    """bench/NAME.py as a module (registered in sys.modules, where dataclasses look their module up, and
    with bench/ on sys.path while it loads, for its own imports); skips where bench/ is not there."""
    path = BENCH / f"{name}.py"
    if not path.exists():
        pytest.skip(f"bench/{name}.py is not next to the tests")
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def dtype_id(dt) -> str:
    return DTYPE_IDS[np.dtype(dt)]


# ---------------------------------------------------------------- devices


def _first_gpu():
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        return None


GPU = _first_gpu()
"""The first GPU device, or None where JAX has none."""
needs_cuda = pytest.mark.skipif(
    GPU is None or not jax_kbit.cuda_built(), reason="needs a CUDA GPU and the CUDA build"
)
"""Skips a test unless a GPU and jax_kbit's CUDA build are both there (mark it ``gpu`` as well)."""


@pytest.fixture
def cpu():
    """Pins every computation of the test to the CPU device (also on a machine with a GPU)."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


# ---------------------------------------------------------------- randomness


class SeededRng:
    """A fresh NumPy generator whose seed is kept so that a failure can be reproduced."""

    def __init__(self, seed: int | None = None):
        self.seed = int(np.random.SeedSequence().entropy if seed is None else seed)
        self.gen = np.random.default_rng(self.seed)

    def __getattr__(self, name):
        return getattr(self.gen, name)

    def __repr__(self) -> str:
        return f"np.random.default_rng({self.seed})"


@pytest.fixture
def rng() -> SeededRng:
    return SeededRng()


def random_array(rng, shape, dtype, *, spread: float = 3.0) -> np.ndarray:
    """N(0, 1) samples times a random power of ten per row (10**-spread .. 10**spread), cast to dtype.

    The row magnitudes stay inside float16's range for float16 and keep float32/bfloat16 data away from
    the subnormal range.
    """
    dtype = np.dtype(dtype)
    shape = tuple(shape)
    x = rng.standard_normal(shape)
    if len(shape) >= 1 and x.size:
        lo, hi = (-2.0, 2.0) if dtype == np.float16 else (-spread, spread)
        x = x * 10.0 ** rng.uniform(lo, hi, size=shape[:-1] + (1,))
    return x.astype(np.float32).astype(dtype)


# ---------------------------------------------------------------- comparisons


def bits_of(a) -> np.ndarray:
    """The raw bits of a numeric array as unsigned integers of the same width (bfloat16 included)."""
    a = np.asarray(a)
    if a.dtype.kind in "fiu" or a.dtype == BF16:
        return a.view(_UINT[a.dtype.itemsize])
    return a


def _is_nan(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "f" or a.dtype == BF16:
        return np.isnan(a.astype(np.float32))
    return np.zeros(a.shape, bool)


def assert_bitwise_equal(actual, expected, msg: str = "", *, nan_bits: bool = False) -> None:
    """Same dtype, shape and bits. Any NaN equals any NaN unless ``nan_bits``; -0.0 differs from 0.0."""
    a, e = np.asarray(actual), np.asarray(expected)
    assert a.dtype == e.dtype, f"dtype {a.dtype} != {e.dtype}. {msg}"
    assert a.shape == e.shape, f"shape {a.shape} != {e.shape}. {msg}"
    ab, eb = bits_of(a), bits_of(e)
    same = ab == eb
    if not nan_bits:
        same |= _is_nan(a) & _is_nan(e)
    if not same.all():
        bad = np.argwhere(~same)
        first = [tuple(int(i) for i in idx) for idx in bad[:5]]
        detail = ", ".join(f"{i}: {a[i]!r} (0x{int(ab[i]):x}) != {e[i]!r} (0x{int(eb[i]):x})" for i in first)
        raise AssertionError(f"{len(bad)} of {a.size} elements differ; first {detail}. {msg}")


# ---------------------------------------------------------------- handler vs reference


def run_reference(x, k, codebook, scale_format, tensor_scale, out_dtype):
    """(packed, scales, tensor_scale, dequantized) from the NumPy reference."""
    x = np.asarray(x)
    packed, scales, t = reference.quantize_ref(x, k, codebook, scale_format, tensor_scale)
    y = reference.dequantize_ref(packed, scales, codebook, t, k, x.shape[-1], out_dtype, scale_format)
    return packed, scales, t, y


def run_handler(x, k, codebook, scale_format, tensor_scale, out_dtype):
    q = jax_kbit.quantize(x, k, codebook=codebook, scale_format=scale_format, tensor_scale=tensor_scale)
    y = jax_kbit.dequantize(q, out_dtype)
    return q, np.asarray(q.packed), np.asarray(q.scales), np.asarray(q.tensor_scale), np.asarray(y)


def check_against_reference(
    x, k, *, codebook=None, scale_format="e4m4", tensor_scale="auto", out_dtypes=None, msg=""
):
    """Quantizes and dequantizes ``x`` with the handler and the reference; all outputs must match bitwise.

    Returns (QuantizedArray, {out_dtype: dequantized}) from the handler.
    """
    x = np.asarray(x)
    cb = jax_kbit.codebooks.default(k) if codebook is None else np.asarray(codebook, np.float32)
    out_dtypes = [x.dtype] if out_dtypes is None else [np.dtype(d) for d in out_dtypes]
    q = jax_kbit.quantize(x, k, codebook=codebook, scale_format=scale_format, tensor_scale=tensor_scale)
    packed, scales, t = reference.quantize_ref(x, k, cb, scale_format, tensor_scale)
    ctx = (
        f"k={k} x={x.dtype}{list(x.shape)} scale_format={scale_format} tensor_scale={tensor_scale!r} "
        f"codebook={cb.tolist()} {msg}"
    )
    assert_bitwise_equal(np.asarray(q.tensor_scale), t, "tensor_scale; " + ctx)
    assert_bitwise_equal(np.asarray(q.scales), scales, "scales; " + ctx, nan_bits=True)
    assert_bitwise_equal(np.asarray(q.packed), packed, "packed; " + ctx)
    assert q.shape == x.shape, ctx
    outs = {}
    for od in out_dtypes:
        y = np.asarray(jax_kbit.dequantize(q, od))
        yr = reference.dequantize_ref(packed, scales, cb, t, k, x.shape[-1], od, scale_format)
        assert_bitwise_equal(y, yr, f"dequantized to {od}; " + ctx, nan_bits=True)
        outs[od] = y
    return q, outs


def codes_of(q) -> np.ndarray:
    """Codes [..., nb*32] of a QuantizedArray (padding included), unpacked with the reference."""
    codes = reference.unpack_codes(np.asarray(q.packed), q.k)
    return codes.reshape(codes.shape[:-2] + (codes.shape[-2] * 32,))  # not -1: lead dims may hold a 0


def decoded_scales(q) -> np.ndarray:
    return reference.decode_scales(np.asarray(q.scales), np.asarray(q.tensor_scale), q.scale_format)
