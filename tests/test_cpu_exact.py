"""The C++ CPU handler against the NumPy reference, bit for bit, plus properties of the format it implements."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    BF16,
    FLOAT_DTYPES,
    KS,
    SCALE_FORMATS,
    SeededRng,
    assert_bitwise_equal,
    bits_of,
    check_against_reference,
    codes_of,
    decoded_scales,
    dtype_id,
    random_array,
)

import jax_kbit
from jax_kbit import codebooks, e4m4, reference

pytestmark = pytest.mark.usefixtures("cpu")

F16, F32 = np.dtype(np.float16), np.dtype(np.float32)


# ---------------------------------------------------------------- full product on a modest shape


@pytest.mark.parametrize("scale_format", SCALE_FORMATS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("k", KS)
def test_all_k_dtypes_formats(k, dtype, scale_format, rng: SeededRng):
    x = random_array(rng, (3, 70), dtype)
    check_against_reference(x, k, scale_format=scale_format, out_dtypes=FLOAT_DTYPES, msg=repr(rng))


# ---------------------------------------------------------------- shapes

SHAPES = [
    (1,),
    (31,),
    (32,),
    (33,),
    (1000,),
    (4, 1),
    (3, 31),
    (2, 32),
    (5, 33),
    (2, 1000),
    (2, 3, 33),
    (2, 1, 3, 31),
    (3, 2, 2, 1000),
    (2, 3, 4, 1),
    (0,),
    (5, 0),
    (0, 7),
    (0, 32),
    (2, 0, 33),
    (3, 2, 0),
    (2, 0, 3, 5),
]
COMBOS = list(itertools.product(KS, FLOAT_DTYPES, SCALE_FORMATS))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes(shape, rng: SeededRng):
    # Each shape gets a few (k, dtype, format) combinations, cycling through the full product.
    i = SHAPES.index(shape)
    for k, dtype, fmt in (COMBOS[(7 * i + j) % len(COMBOS)] for j in range(3)):
        x = random_array(rng, shape, dtype)
        q, outs = check_against_reference(x, k, scale_format=fmt, out_dtypes=FLOAT_DTYPES, msg=repr(rng))
        nb = -(-shape[-1] // 32)
        assert q.packed.shape == shape[:-1] + (nb, k) and q.packed.dtype == np.uint32
        assert q.scales.shape == shape[:-1] + (nb,)
        assert q.scales.dtype == reference.SCALE_DTYPES[fmt]
        assert q.shape == shape and q.dtype == np.dtype(dtype)
        for od, y in outs.items():
            assert y.shape == shape and y.dtype == od


def test_codes_do_not_leak_between_blocks_or_rows(rng: SeededRng):
    """Quantizing each row separately and every block as its own array gives the same bits."""
    x = random_array(rng, (4, 100), np.float32)
    q = jax_kbit.quantize(x, 3, scale_format="f16", tensor_scale=1.0)
    for r in range(4):
        qr = jax_kbit.quantize(x[r], 3, scale_format="f16", tensor_scale=1.0)
        assert_bitwise_equal(np.asarray(qr.packed), np.asarray(q.packed)[r], repr(rng))
        for b in range(4):
            qb = jax_kbit.quantize(x[r, 32 * b : 32 * b + 32], 3, scale_format="f16", tensor_scale=1.0)
            assert_bitwise_equal(np.asarray(qb.packed)[0], np.asarray(q.packed)[r, b], repr(rng))
            assert_bitwise_equal(np.asarray(qb.scales)[0], np.asarray(q.scales)[r, b], repr(rng))


def test_large_array_uses_many_threads(rng: SeededRng):
    """Enough blocks to be split over the thread pool (grain 8192 blocks)."""
    x = random_array(rng, (24, 32 * 1000 + 5), np.float32)
    check_against_reference(x, 4, out_dtypes=[np.float32, BF16], msg=repr(rng))


# ---------------------------------------------------------------- E4M4 through the handler


def test_handler_e4m4_scale_bytes_all_values():
    """A block whose max is v with tensor_scale 1 stores encode(v): every byte, and its neighbours' midpoints."""
    vals = e4m4.all_values().astype(np.float64)
    mids = ((vals[:-1] + vals[1:]) / 2).astype(np.float32)
    v = np.concatenate(
        [
            vals[1:].astype(np.float32),
            mids,
            np.nextafter(mids, np.float32(0)),
            np.nextafter(mids, np.float32(np.inf)),
            np.array([30.0, 30.5, 31.9, 32.0, 1e30, 3.4e38], np.float32),
        ]
    )
    x = np.zeros((v.size, 32), np.float32)
    x[:, 5] = v
    x[::2, 5] *= -1
    q, _ = check_against_reference(x, 4, scale_format="e4m4", tensor_scale=1.0)
    np.testing.assert_array_equal(np.asarray(q.scales)[:, 0], e4m4.encode(v))


def test_handler_e4m4_saturates_to_30():
    x = np.zeros((5, 32), np.float32)
    x[:, 0] = [29.0, 30.0, 31.9, 32.0, 1e30]
    q = jax_kbit.quantize(x, 4, tensor_scale=1.0)
    s = e4m4.decode(np.asarray(q.scales)[:, 0])
    np.testing.assert_array_equal(s[1:], 30.0)
    assert s[0] == 29.0


# ---------------------------------------------------------------- ties and special blocks


def dyadic_codebook(k: int) -> np.ndarray:
    """Evenly spaced +-(2i+1)/n: every midpoint between neighbours is a dyadic rational (exact in float32)."""
    n = 2**k
    return ((2 * np.arange(n) + 1 - n) / n).astype(np.float32)


def expected_codes_exact(xn: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """Nearest entry in exact (float64) arithmetic, ties to the lowest index: for exactly representable data."""
    d = np.abs(xn.astype(np.float64)[..., None] - cb.astype(np.float64))
    return np.argmin(d, axis=-1)


@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
@pytest.mark.parametrize("scale_format", SCALE_FORMATS)
@pytest.mark.parametrize("k", KS)
def test_exact_ties_go_to_lowest_index(k, scale_format, order, rng: SeededRng):
    cb = dyadic_codebook(k)
    if order == "descending":
        cb = cb[::-1].copy()
    elif order == "shuffled":
        cb = cb[rng.permutation(cb.size)]
    n = 2**k
    srt = np.sort(cb.astype(np.float64))
    mids = (srt[:-1] + srt[1:]) / 2  # includes 0 (n even)
    rows = []
    for p in rng.integers(-6, 7, size=8):
        amax = 2.0 ** int(p)  # power of two: the decoded scale is exactly amax in every format
        row = rng.choice(np.concatenate([mids, srt, -mids]), size=32) * amax
        row[rng.integers(16, 32)] = amax * rng.choice([-1, 1])  # the block max, a power of two
        rows.append(row)
    x = np.array(rows, np.float32)
    x[0, :16] = -0.0
    q, _ = check_against_reference(x, k, codebook=cb, scale_format=scale_format, msg=repr(rng))
    s = decoded_scales(q)
    assert (s[:, 0] == np.abs(x).max(axis=1)).all(), repr(rng)
    xn = x / s
    np.testing.assert_array_equal(codes_of(q)[:, :32], expected_codes_exact(xn, cb), err_msg=repr(rng))
    # Sanity: ties were really exercised (0 is always a tie with an even number of entries).
    assert n % 2 == 0 and (xn == 0).any()


@pytest.mark.parametrize("scale_format", SCALE_FORMATS)
def test_all_zero_blocks(scale_format):
    x = np.zeros((3, 70), np.float32)
    x[1, 40] = 3.0  # one non-zero block among zero blocks
    x[2, :] = -0.0
    for k in KS:
        q, outs = check_against_reference(x, k, scale_format=scale_format)
        s = decoded_scales(q)
        assert (s[0] == 0).all() and s[1, 0] == 0 and s[1, 2] == 0 and (s[2] == 0).all()
        y = outs[F32]
        assert (y[0] == 0).all() and (y[2] == 0).all()
        # A zero scale maps every element to 0: the code is the entry nearest to 0 (lowest index on ties).
        cb = codebooks.default(k)
        nearest0 = np.argmin(np.abs(cb))
        assert (codes_of(q)[0] == nearest0).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("scale_format", SCALE_FORMATS)
def test_single_nonzero_per_block(dtype, scale_format, rng: SeededRng):
    x = np.zeros((6, 64), np.float32)
    for r in range(6):
        for b in range(2):
            x[r, 32 * b + rng.integers(0, 32)] = rng.standard_normal() * 10.0 ** rng.uniform(-2, 2)
    x = x.astype(dtype)
    for k in KS:
        q, outs = check_against_reference(x, k, scale_format=scale_format, msg=repr(rng))
        y = outs[np.dtype(dtype)].astype(np.float32)
        xf = x.astype(np.float32)
        # The non-zero element comes back with the right sign (the largest entry is close to 1), unless its
        # block's scale underflowed to zero: the data spans up to ~10**8, beyond the e4m4 range of 2**-14 * t
        # (docs/FORMAT.md, "Range"); such a block decodes to zeros.
        s = np.repeat(decoded_scales(q).reshape(6, 2), 32, axis=1)
        nz = xf != 0
        live = nz & (s > 0)
        assert (np.sign(y[live]) == np.sign(xf[live])).all(), repr(rng)
        assert (y[nz & (s == 0)] == 0).all(), repr(rng)
        if scale_format != "e4m4":  # f16 spans 2**40 and f32 is unlimited: nothing here underflows
            assert live.sum() == nz.sum(), repr(rng)


def test_negative_zero(rng: SeededRng):
    x = random_array(rng, (2, 64), np.float32)
    x[0, ::3] = -0.0
    x[1, :32] = -0.0  # a whole block of -0.0
    for dtype in FLOAT_DTYPES:
        xd = x.astype(dtype)
        for k, fmt in itertools.product(KS, SCALE_FORMATS):
            check_against_reference(xd, k, scale_format=fmt, out_dtypes=FLOAT_DTYPES, msg=repr(rng))


def test_float16_subnormals(rng: SeededRng):
    x = (rng.integers(-1023, 1024, size=(4, 64)) * 2.0**-24).astype(np.float16)  # all subnormal or zero
    x[2] = np.float16(6e-5) * rng.standard_normal(64)  # mix of normal and subnormal float16
    x[3, 1:] = np.float16(2.0**-24)
    for k, fmt in itertools.product(KS, SCALE_FORMATS):
        _, outs = check_against_reference(x, k, scale_format=fmt, out_dtypes=FLOAT_DTYPES, msg=repr(rng))
        assert np.isfinite(outs[F32]).all()


def test_float32_subnormal_block_max():
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 1] = 1e-40, -5e-41
    check_against_reference(x, 4, scale_format="f32")


def test_float32_subnormal_inputs(rng: SeededRng):
    x = (rng.standard_normal((4, 64)) * 1e-40).astype(np.float32)
    for k, fmt in itertools.product(KS, SCALE_FORMATS):
        check_against_reference(x, k, scale_format=fmt, out_dtypes=FLOAT_DTYPES, msg=repr(rng))


def test_bfloat16_subnormal_inputs(rng: SeededRng):
    x = (rng.standard_normal((4, 64)) * 1e-39).astype(BF16)
    for k, fmt in itertools.product(KS, SCALE_FORMATS):
        check_against_reference(x, k, scale_format=fmt, out_dtypes=FLOAT_DTYPES, msg=repr(rng))


def test_subnormals_on_the_thread_pool(rng: SeededRng):
    """Enough blocks for several pool tasks: every worker thread must see IEEE subnormals too."""
    x = (rng.standard_normal((40, 32 * 512)) * 1e-39).astype(np.float32)
    x[::3] *= 1e-3
    check_against_reference(x, 3, scale_format="f32", out_dtypes=[np.float32], msg=repr(rng))
    check_against_reference(x, 5, scale_format="e4m4", out_dtypes=[np.float32, BF16], msg=repr(rng))


def test_f32_scales_subnormal_after_tensor_scale(rng: SeededRng):
    x = random_array(rng, (4, 70), np.float32)
    check_against_reference(x, 4, scale_format="f32", tensor_scale=2.0**127, msg=repr(rng))


def test_subnormal_products_in_dequantize(rng: SeededRng):
    """Normal inputs around 1e-37: the auto tensor scale is 2**-126 and codebook * scale is subnormal."""
    x = (rng.standard_normal((2, 64)) * 3e-38).astype(np.float32)
    assert np.abs(x).min() >= 0 and (np.abs(x[x != 0]) > 1.18e-38).any()
    check_against_reference(x, 5, scale_format="e4m4", out_dtypes=[np.float32], msg=repr(rng))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_subnormal_elements_in_normal_blocks(dtype, rng: SeededRng):
    """Tiny elements next to a normal-sized block max: their normalised value x/s is normal or zero."""
    finfo_tiny = {F16: 2.0**-24, BF16: 1e-39, F32: 1e-40}[np.dtype(dtype)]
    x = (rng.standard_normal((4, 64)) * finfo_tiny).astype(dtype)
    x[:, ::16] = 1.0
    for k, fmt in itertools.product(KS, SCALE_FORMATS):
        check_against_reference(x, k, scale_format=fmt, out_dtypes=FLOAT_DTYPES, msg=repr(rng))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_tiny_magnitudes(dtype, rng: SeededRng):
    scale = {F16: 1e-4, BF16: 1e-30, F32: 1e-30}[np.dtype(dtype)]
    x = (rng.standard_normal((3, 64)) * scale).astype(dtype)
    for k, fmt in itertools.product(KS, SCALE_FORMATS):
        _, outs = check_against_reference(x, k, scale_format=fmt, out_dtypes=FLOAT_DTYPES, msg=repr(rng))
        assert np.isfinite(outs[F32]).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_huge_values(dtype, rng: SeededRng):
    top = {F16: 65504.0, BF16: 3.3e38, F32: 3.4028235e38}[np.dtype(dtype)]
    x = (rng.uniform(-1, 1, (4, 64)) * top).astype(dtype)
    x[0, 0] = top
    x[1, 3] = -top
    x[2, :] = top
    for k, fmt in itertools.product(KS, SCALE_FORMATS):
        check_against_reference(x, k, scale_format=fmt, out_dtypes=FLOAT_DTYPES, msg=repr(rng))


@pytest.mark.parametrize("scale_format", ["e4m4", "f16"])
def test_finite_near_float32_max_stays_finite(scale_format):
    # float32 max / 30 -> t = 2**124, amax / t = 15.99.. rounds to 16: 16 * t = 2**128 would be inf; the
    # decoded scale saturates at float32 max instead, so the block keeps its sign and stays finite.
    x = np.full((1, 32), np.finfo(np.float32).max, np.float32)
    y = np.asarray(jax_kbit.dequantize(jax_kbit.quantize(x, 4, scale_format=scale_format)))
    assert np.isfinite(y).all() and (y > 0).all(), y


@pytest.mark.xfail(
    strict=True,
    reason="known limitation of format v1 (docs/FORMAT.md): a float16 block max of 65504 gets an e4m4 scale "
    "of 65536, so a codebook entry of 1.0 overflows the float16 output to inf",
)
@pytest.mark.parametrize("name", ["uniform", "normal_float"])
def test_float16_max_with_unit_codebook_stays_finite(name):
    x = np.full((1, 32), 65504, np.float16)
    cb = codebooks.BY_NAME[name](4)
    y = np.asarray(jax_kbit.dequantize(jax_kbit.quantize(x, 4, codebook=cb)))
    assert np.isfinite(y.astype(np.float32)).all(), y


NONFINITE = [np.nan, np.inf, -np.inf]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("scale_format", SCALE_FORMATS)
@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "+inf", "-inf"])
def test_non_finite_blocks(bad, scale_format, dtype, rng: SeededRng):
    x = random_array(rng, (3, 100), np.float32).astype(dtype)
    x[0, 5] = bad  # block (0, 0)
    x[1, 99] = bad  # the padded last block (1, 3)
    x[2, 64:96] = bad  # a whole block (2, 2)
    bad_blocks = [(0, 0), (1, 3), (2, 2)]
    for k in KS:
        q, outs = check_against_reference(
            x, k, scale_format=scale_format, out_dtypes=FLOAT_DTYPES, msg=repr(rng)
        )
        scales = np.asarray(q.scales)
        s = decoded_scales(q)
        for r, b in itertools.product(range(3), range(4)):
            if (r, b) in bad_blocks:
                assert np.isnan(s[r, b]), (r, b)
                assert (codes_of(q)[r, 32 * b : 32 * b + 32] == 0).all()
                for y in outs.values():
                    assert np.isnan(y[r, 32 * b : 32 * b + 32].astype(np.float32)).all(), (r, b)
            else:
                assert np.isfinite(s[r, b]), (r, b)
                for y in outs.values():
                    assert np.isfinite(y[r, 32 * b : 32 * b + 32].astype(np.float32)).all(), (r, b)
        # Stored NaN encodings.
        nan_bits = {"e4m4": 0xFF, "f16": 0x7E00, "f32": 0x7FC00000}[scale_format]
        assert bits_of(scales)[0, 0] == nan_bits
        # The finite blocks are exactly what they would be without the non-finite ones (same tensor scale).
        clean = np.where(np.isfinite(x.astype(np.float32)), x, 0).astype(dtype)
        q2 = jax_kbit.quantize(clean, k, scale_format=scale_format)
        assert_bitwise_equal(np.asarray(q2.tensor_scale), np.asarray(q.tensor_scale))
        keep = np.ones((3, 4), bool)
        for r, b in bad_blocks:
            keep[r, b] = False
        assert_bitwise_equal(scales[keep], np.asarray(q2.scales)[keep], repr(rng))
        assert_bitwise_equal(np.asarray(q.packed)[keep], np.asarray(q2.packed)[keep], repr(rng))


def test_non_finite_never_comes_back_finite(rng: SeededRng):
    x = random_array(rng, (8, 96), np.float32)
    mask = rng.random(x.shape) < 0.03
    x[mask] = rng.choice(NONFINITE, size=int(mask.sum()))
    for dtype in FLOAT_DTYPES:
        xd = x.astype(dtype)
        for k, fmt in itertools.product(KS, SCALE_FORMATS):
            _, outs = check_against_reference(xd, k, scale_format=fmt, out_dtypes=FLOAT_DTYPES, msg=repr(rng))
            for y in outs.values():
                assert not np.isfinite(y[mask].astype(np.float32)).any(), repr(rng)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_canonical_nan_outputs(dtype):
    x = np.zeros((1, 64), np.float32)
    x[0, 3] = np.nan
    x[0, 40] = -np.inf
    x = x.astype(dtype)
    q = jax_kbit.quantize(x, 4)
    for od in FLOAT_DTYPES:
        y = np.asarray(jax_kbit.dequantize(q, od))
        assert (bits_of(y) == reference.CANONICAL_NAN[od]).all(), bits_of(y)


# ---------------------------------------------------------------- tensor scales


@pytest.mark.parametrize("scale_format", SCALE_FORMATS)
@pytest.mark.parametrize("magnitude", [1e-30, 1e-12, 1e12, 1e30])
def test_global_amax_far_from_one(magnitude, scale_format, rng: SeededRng):
    x = (rng.standard_normal((4, 80)) * magnitude).astype(np.float32)
    for k in KS:
        q, outs = check_against_reference(
            x, k, scale_format=scale_format, out_dtypes=[np.float32], msg=repr(rng)
        )
        y, xf = outs[F32].astype(np.float64), x.astype(np.float64)
        rel = np.sqrt(np.mean((y - xf) ** 2) / np.mean(xf**2))
        assert rel < 0.5, (k, rel, repr(rng))


@pytest.mark.parametrize("scale_format", SCALE_FORMATS)
@pytest.mark.parametrize("tensor_scale", [1.0, 2.0**-20, 2.0**20, 2.0**-126, 2.0**127])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_explicit_tensor_scales(tensor_scale, scale_format, dtype, rng: SeededRng):
    x = random_array(rng, (4, 70), np.float32, spread=4).astype(dtype)
    if dtype == F16:
        x = random_array(rng, (4, 70), dtype)
    for k in KS:
        q, _ = check_against_reference(
            x, k, scale_format=scale_format, tensor_scale=tensor_scale, out_dtypes=FLOAT_DTYPES, msg=repr(rng)
        )
        assert float(np.asarray(q.tensor_scale)) == tensor_scale


def test_explicit_tensor_scale_saturates_scales():
    """amax / t beyond the format's maximum saturates at the maximum (never wraps or becomes inf)."""
    x = np.zeros((3, 32), np.float32)
    x[:, 0] = [1e3, 1e9, 3e38]
    for fmt, top in (("e4m4", 30.0), ("f16", 65504.0), ("f32", float(np.finfo(np.float32).max))):
        q, _ = check_against_reference(x, 4, scale_format=fmt, tensor_scale=2.0**-20)
        stored = np.asarray(q.scales)[:, 0]
        raw = e4m4.decode(stored) if fmt == "e4m4" else stored.astype(np.float32)
        assert (raw <= np.float32(top)).all() and np.isfinite(raw).all()
        if fmt != "f32":
            assert (raw == np.float32(top)).all(), raw


def test_tensor_scale_as_array_and_numpy_scalar(rng: SeededRng):
    x = random_array(rng, (2, 40), np.float32)
    q1 = jax_kbit.quantize(x, 4, tensor_scale=2.0**-3)
    q2 = jax_kbit.quantize(x, 4, tensor_scale=jnp.float32(2.0**-3))
    q3 = jax_kbit.quantize(x, 4, tensor_scale=np.float32(2.0**-3))
    for q in (q2, q3):
        assert_bitwise_equal(np.asarray(q.packed), np.asarray(q1.packed))
        assert_bitwise_equal(np.asarray(q.scales), np.asarray(q1.scales))


# ---------------------------------------------------------------- auto tensor scale


def tensor_scale_cases(rng: SeededRng, fmt_max: float) -> list[np.ndarray]:
    cases = []
    for a in (10.0 ** rng.uniform(-44, 38.5, 60)).astype(np.float32):
        cases.append(np.array([a, -a / 3, 0.0], np.float32))
    for e in list(range(-135, -120)) + list(range(-20, 20, 3)) + list(range(100, 124)):
        a = fmt_max * 2.0**e
        if a >= 3.4e38:
            continue
        a = np.float32(a)
        for v in (a, np.nextafter(a, np.float32(0)), np.nextafter(a, np.float32(np.inf))):
            cases.append(np.array([v / 2, -v, np.nan], np.float32))
    cases += [
        np.zeros(5, np.float32),
        np.array([-0.0], np.float32),
        np.array([np.nan, np.inf], np.float32),
        np.array([np.nan, np.nan, np.nan], np.float32),
        np.array([1e-45], np.float32),
        np.array([np.finfo(np.float32).max, -np.inf], np.float32),
    ]
    return cases


@pytest.mark.parametrize("scale_format,fmt_max", [("e4m4", 30.0), ("f16", 65504.0), ("f32", 0.0)])
def test_auto_tensor_scale_matches_reference(scale_format, fmt_max, rng: SeededRng):
    cases = tensor_scale_cases(rng, fmt_max or 30.0)
    got = jax.jit(jax.vmap(lambda v: jax_kbit.auto_tensor_scale(v, scale_format)))(
        jnp.asarray(np.stack([np.resize(c, 3) for c in cases]))
    )
    for c, g in zip(cases, np.asarray(got)):
        want = reference.auto_tensor_scale_ref(np.resize(c, 3), scale_format)
        assert_bitwise_equal(np.float32(g), want, f"amax input {c!r}; {rng!r}")
    # Eagerly, on a few, plus shapes the batched form cannot hold.
    for c in cases[::10] + [np.zeros((0,), np.float32), np.zeros((3, 0), np.float32)]:
        assert_bitwise_equal(
            np.asarray(jax_kbit.auto_tensor_scale(jnp.asarray(c), scale_format)),
            reference.auto_tensor_scale_ref(c, scale_format),
            repr(c),
        )


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["f16", "bf16"])
def test_auto_tensor_scale_low_precision_inputs(dtype, rng: SeededRng):
    for fmt in ("e4m4", "f16"):
        for _ in range(5):
            x = random_array(rng, (3, 40), dtype)
            assert_bitwise_equal(
                np.asarray(jax_kbit.auto_tensor_scale(jnp.asarray(x), fmt)),
                reference.auto_tensor_scale_ref(x, fmt),
                repr(rng),
            )
        sub = np.array([2.0**-24, -(2.0**-20), 1e-39 if dtype == BF16 else 0.0], np.float32).astype(dtype)
        assert_bitwise_equal(
            np.asarray(jax_kbit.auto_tensor_scale(jnp.asarray(sub), fmt)),
            reference.auto_tensor_scale_ref(sub, fmt),
        )


def test_quantize_uses_auto_tensor_scale(rng: SeededRng):
    x = (rng.standard_normal((2, 50)) * 1e-39).astype(np.float32)  # subnormal amax
    for fmt in SCALE_FORMATS:
        q = jax_kbit.quantize(x, 4, scale_format=fmt)
        assert_bitwise_equal(np.asarray(q.tensor_scale), reference.auto_tensor_scale_ref(x, fmt), repr(rng))


# ---------------------------------------------------------------- error bound and SQNR


def error_bound_check(x, q, y, codebook, out_dtype):
    """|x - y| <= h * s + max(0, amax - s) + rounding slack, block by block (finite blocks only)."""
    h = codebooks.covering_radius(codebook)
    xf = x.astype(np.float64)
    d = x.shape[-1]
    nb = -(-d // 32)
    pad = np.zeros(x.shape[:-1] + (nb * 32,))
    pad[..., :d] = xf
    blocks = pad.reshape(x.shape[:-1] + (nb, 32))
    amax = np.abs(blocks).max(axis=-1)
    s = decoded_scales(q).astype(np.float64)
    cmax = float(np.abs(codebook).max())
    bound = h * s + np.maximum(0, amax - s) + 2.0**-21 * np.maximum(amax, s * cmax)
    eps_out = {F16: 2.0**-11, BF16: 2.0**-8, F32: 2.0**-24}[np.dtype(out_dtype)]
    yb = np.zeros_like(pad)
    yb[..., :d] = y.astype(np.float64)
    err = np.abs(blocks - yb.reshape(blocks.shape)).max(axis=-1)
    bound = bound + eps_out * (amax + s * cmax) + 2.0**-24  # the output cast (and float16 subnormal spacing)
    return err, bound


@pytest.mark.parametrize("scale_format", SCALE_FORMATS)
@pytest.mark.parametrize("k", KS)
def test_error_bound(k, scale_format, rng: SeededRng):
    cbs = {
        "default": codebooks.default(k),
        "uniform": codebooks.uniform(k),
        "normal_float": codebooks.normal_float(k),
        "random": np.sort(rng.uniform(-1, 1, 2**k)).astype(np.float32),
    }
    for name, cb in cbs.items():
        x = random_array(rng, (16, 200), np.float32, spread=5)
        for out in FLOAT_DTYPES:
            xi = x if out != F16 else random_array(rng, (16, 200), np.float32, spread=1.5)
            q = jax_kbit.quantize(xi, k, codebook=cb, scale_format=scale_format)
            y = np.asarray(jax_kbit.dequantize(q, out))
            err, bound = error_bound_check(xi, q, y, cb, out)
            worst = np.unravel_index(np.argmax(err - bound), err.shape)
            assert (err <= bound).all(), (
                f"codebook {name}, out {out}: block {worst} error {err[worst]} > bound {bound[worst]}; {rng!r}"
            )


def test_error_bound_is_tight_for_saturated_scales():
    """With t = 1 and e4m4, a block max of 1000 saturates the scale to 30: the error is amax - s scale."""
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = 1000.0
    cb = codebooks.uniform(4)
    q = jax_kbit.quantize(x, 4, codebook=cb, tensor_scale=1.0)
    y = np.asarray(jax_kbit.dequantize(q))
    assert y[0, 0] == 30.0
    err, bound = error_bound_check(x, q, y, cb, F32)
    assert err[0, 0] <= bound[0, 0] and err[0, 0] > 0.9 * bound[0, 0]


def sqnr_db(x, y) -> float:
    x = x.astype(np.float64)
    return 10 * np.log10(np.sum(x**2) / np.sum((x - y.astype(np.float64)) ** 2))


SQNR_FLOOR = {2: 9.3, 3: 15.3, 4: 21.6, 5: 27.5}


def test_sqnr_floors(rng: SeededRng):
    x = rng.standard_normal(2**22, dtype=np.float32).reshape(2**10, 2**12)
    for k in KS:
        y = np.asarray(jax_kbit.dequantize(jax_kbit.quantize(x, k)))
        default = sqnr_db(x, y)
        assert default >= SQNR_FLOOR[k], (k, default, repr(rng))
        y_nf = np.asarray(jax_kbit.dequantize(jax_kbit.quantize(x, k, codebook=codebooks.normal_float(k))))
        nf = sqnr_db(x, y_nf)
        assert nf < default, (k, nf, default, repr(rng))
