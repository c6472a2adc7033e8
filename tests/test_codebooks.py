"""Codebook tables and constructors, and how the handler treats codebooks of every shape and order."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    FLOAT_DTYPES,
    KS,
    SCALE_FORMATS,
    SeededRng,
    assert_bitwise_equal,
    check_against_reference,
    codes_of,
    decoded_scales,
    random_array,
)
from scipy.stats import norm

import jax_kbit
from jax_kbit import codebooks

pytestmark = pytest.mark.usefixtures("cpu")

GEN_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gen_codebooks.py"


# ---------------------------------------------------------------- the tables


@pytest.fixture(scope="module")
def gen_codebooks():
    spec = importlib.util.spec_from_file_location("_test_gen_codebooks", GEN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("k", KS)
def test_lloyd_max_regenerates(k, gen_codebooks):
    generated = gen_codebooks.generate(k)
    shipped = codebooks.lloyd_max(k)
    assert generated.shape == shipped.shape == (2**k,)
    np.testing.assert_allclose(shipped.astype(np.float64), generated, rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", KS)
def test_lloyd_max_shape(k):
    cb = codebooks.lloyd_max(k)
    assert cb.dtype == np.float32 and cb.shape == (2**k,)
    assert (np.diff(cb) > 0).all(), "sorted, distinct"
    np.testing.assert_array_equal(cb, -cb[::-1])  # exactly symmetric
    assert np.abs(cb).max() <= 1
    np.testing.assert_array_equal(codebooks.default(k), cb)


@pytest.mark.parametrize("k", KS)
def test_normal_float_matches_scipy(k):
    n = 2**k
    q = norm.ppf(np.linspace(0.5 / n, 1 - 0.5 / n, n))
    want = (q / np.abs(q).max()).astype(np.float32)
    got = codebooks.normal_float(k)
    assert got.dtype == np.float32 and got.shape == (n,)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-7)
    assert got[0] == -1 and got[-1] == 1


@pytest.mark.parametrize("k", KS)
def test_uniform(k):
    got = codebooks.uniform(k)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, -1 + 2 * np.arange(2**k) / (2**k - 1), rtol=0, atol=1e-7)
    assert got[0] == -1 and got[-1] == 1


def test_nf4():
    cb = codebooks.nf4()
    assert cb.dtype == np.float32 and cb.shape == (16,)
    assert (np.diff(cb) > 0).all()
    assert cb[0] == -1 and cb[-1] == 1 and cb[7] == 0
    assert not np.array_equal(cb, -cb[::-1])  # asymmetric


def test_by_name():
    for name, fn in codebooks.BY_NAME.items():
        np.testing.assert_array_equal(fn(3), getattr(codebooks, name)(3))


@pytest.mark.parametrize("bad", [1, 6, 0, -3, 2.0, True, "4"])
def test_constructors_reject_bad_k(bad):
    for fn in (codebooks.lloyd_max, codebooks.normal_float, codebooks.uniform):
        with pytest.raises(ValueError, match="k"):
            fn(bad)


def brute_force_covering_radius(cb: np.ndarray) -> float:
    grid = np.linspace(-1, 1, 400_001)
    return float(np.abs(grid[:, None] - cb.astype(np.float64)[None, :]).min(axis=1).max())


@pytest.mark.parametrize(
    "cb",
    [
        codebooks.lloyd_max(2),
        codebooks.lloyd_max(4),
        codebooks.nf4(),
        codebooks.uniform(3),
        np.array([0.5, 0.25, 0.25, -0.75], np.float32),  # unsorted with a duplicate
        np.array([2.0, 3.0, -5.0, 4.0], np.float32),  # entries outside [-1, 1]
    ],
    ids=["lloyd2", "lloyd4", "nf4", "uniform3", "unsorted-dup", "outside"],
)
def test_covering_radius_brute_force(cb):
    got = codebooks.covering_radius(cb)
    assert abs(got - brute_force_covering_radius(cb)) <= 1e-5


def test_covering_radius_random(rng: SeededRng):
    for _ in range(10):
        cb = rng.uniform(-1.2, 1.2, 2 ** int(rng.integers(2, 6))).astype(np.float32)
        assert abs(codebooks.covering_radius(cb) - brute_force_covering_radius(cb)) <= 1e-5, repr(rng)


# ---------------------------------------------------------------- the handler with various codebooks


def scaled_inputs(rng):
    return random_array(rng, (6, 90), np.float32)


@pytest.mark.parametrize("scale_format", SCALE_FORMATS)
def test_nf4_asymmetric(scale_format, rng: SeededRng):
    x = scaled_inputs(rng)
    x[0, :10] = 0.0
    x[1, :10] = -0.0
    for dtype in FLOAT_DTYPES:
        q, _ = check_against_reference(
            x.astype(dtype), 4, codebook=codebooks.nf4(), scale_format=scale_format, msg=repr(rng)
        )
        c = codes_of(q)
        assert (c[0, :10] == 7).all() and (c[1, :10] == 7).all()  # the exact zero entry


@pytest.mark.parametrize("k", KS)
def test_unsorted_codebook_is_a_relabelling(k, rng: SeededRng):
    """A permuted default codebook gives the same values, and codes that are the permuted indices."""
    cb = codebooks.default(k)
    perm = rng.permutation(2**k)
    cbp = cb[perm]
    x = scaled_inputs(rng)
    for fmt in SCALE_FORMATS:
        q, outs = check_against_reference(x, k, scale_format=fmt, out_dtypes=[np.float32], msg=repr(rng))
        qp, outs_p = check_against_reference(
            x, k, codebook=cbp, scale_format=fmt, out_dtypes=[np.float32], msg=repr(rng)
        )
        assert_bitwise_equal(np.asarray(qp.scales), np.asarray(q.scales))
        c, cp = codes_of(q), codes_of(qp)
        # perm[cp] is the sorted index of the chosen entry; it agrees except on exact float32 ties.
        xn = np.zeros(c.shape, np.float32)
        # A block of tiny values can decode to a zero scale: x / 0 is then inf or NaN on both sides alike.
        with np.errstate(divide="ignore", invalid="ignore"):
            xn[:, : x.shape[1]] = x / np.repeat(decoded_scales(q), 32, axis=-1)[:, : x.shape[1]]
        d_sorted = np.abs(xn - cb[c])
        d_perm = np.abs(xn - cbp[cp])
        np.testing.assert_array_equal(d_sorted, d_perm)
        differ = perm[cp] != c
        assert (d_sorted[differ] == np.abs(xn - cb[perm[cp]])[differ]).all()
        # Inputs with many exact zeros (x / s == 0 sits between -c and +c) can tie often; ties are covered
        # above, so only require that most codes did not need the tie rule at all.
        assert (~differ[:, : x.shape[1]]).mean() > 0.5, repr(rng)
        np.testing.assert_array_equal(
            outs_p[np.dtype(np.float32)][~differ[:, : x.shape[1]]],
            outs[np.dtype(np.float32)][~differ[:, : x.shape[1]]],
        )


@pytest.mark.parametrize("k", KS)
def test_duplicate_entries_take_the_lowest_index(k, rng: SeededRng):
    n = 2**k
    base = codebooks.default(k)
    cb = base.copy()
    # Make some entries copies of others, in both directions of index order.
    dup_pairs = [(0, n - 1), (n // 2, 1)] if n > 4 else [(3, 0)]
    for dst, src in dup_pairs:
        cb[dst] = cb[src]
    x = scaled_inputs(rng)
    for fmt in SCALE_FORMATS:
        q, _ = check_against_reference(x, k, codebook=cb, scale_format=fmt, msg=repr(rng))
        used = np.unique(codes_of(q))
        for dst, src in dup_pairs:
            hi = max(dst, src)
            assert hi not in used, f"code {hi} used although entry {min(dst, src)} has the same value"
    # All entries equal: every code is 0.
    q, _ = check_against_reference(x, k, codebook=np.full(n, 0.5, np.float32))
    assert (codes_of(q) == 0).all()


@pytest.mark.parametrize("k", KS)
def test_random_user_codebooks(k, rng: SeededRng):
    for trial in range(3):
        cb = rng.standard_normal(2**k).astype(np.float32)
        if trial == 1:
            cb /= np.abs(cb).max()
        if trial == 2:
            cb = np.round(cb * 4) / 4  # coarse: duplicates and exact ties are likely
        for dtype in FLOAT_DTYPES:
            x = random_array(rng, (3, 70), dtype)
            fmt = SCALE_FORMATS[int(rng.integers(0, 3))]
            check_against_reference(
                x, k, codebook=cb, scale_format=fmt, out_dtypes=FLOAT_DTYPES, msg=repr(rng)
            )


def test_codebook_with_negative_zero_and_zero(rng: SeededRng):
    cb = np.array([0.5, -0.0, 0.0, -0.5], np.float32)
    x = scaled_inputs(rng)
    x[0, :5] = 0.0
    q, outs = check_against_reference(x, 2, codebook=cb, out_dtypes=[np.float32], msg=repr(rng))
    assert 2 not in np.unique(codes_of(q))  # -0.0 == 0.0: index 1 wins every tie with index 2


@pytest.mark.parametrize(
    "cb",
    [[1e-45, 1e-45, 0.0, 1e-45], [0.5, 1e-40, 0.0, -0.5], [1e-40, 0.0, 0.5, -0.5], [2e-40, 1e-40, 0.5, -0.5]],
    ids=["min-subnormal", "before-zero", "first", "two-subnormals"],
)
def test_subnormal_codebook_entries(cb):
    cb = np.array(cb, np.float32)
    x = np.array([0.0, 1.0, 1.5e-40, -1e-40], np.float32)  # block max 1 and f32 scales: x / s == x
    check_against_reference(x, 2, codebook=cb, scale_format="f32")


def test_quantize_returns_the_codebook_it_used(rng: SeededRng):
    x = scaled_inputs(rng)
    q = jax_kbit.quantize(x, 3)
    np.testing.assert_array_equal(np.asarray(q.codebook), codebooks.default(3))
    cb = rng.uniform(-1, 1, 8).astype(np.float32)
    q = jax_kbit.quantize(x, 3, codebook=cb)
    np.testing.assert_array_equal(np.asarray(q.codebook), cb)
