"""Tiled ``QuantizedMatrix`` storage (docs/FORMAT.md, "Tiled matrices").

A tiled matrix holds the same bits as the plain one with its blocks in another order, so every product must
give the plain matrix's result bit for bit (the kernels sum the same terms in the same order either way), on
the CPU handler, the dense path, the transposed product, the gradients and, where a GPU exists, the CUDA
kernels. The stored order itself is checked against an independent NumPy statement of it.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BF16, GPU, KS, SCALE_FORMATS, dtype_id, needs_cuda

import jax_kbit as jk
from jax_kbit import checkpoint
from jax_kbit.quantized_matrix import can_tile, untile_arrays

matmul_module = importlib.import_module("jax_kbit.matmul")

CPU = jax.devices("cpu")[0]


# (in, out): several tile columns and rows; one tile column (the order is the identity there); a partial
# last block along in (100 -> 4 blocks); many tiles of a decode-sized layer.
TILEABLE = ((256, 64), (100, 32), (512, 16), (2048, 96))


def pair(rng, din, dout, k, scale_format="e4m4", lead=()):
    """The same weight quantized tiled and plain; with ``lead``, a stack of weights (one codebook each)."""
    w = jnp.asarray(rng.standard_normal(lead + (din, dout)).astype(np.float32) * np.float32(0.05))

    def quantize(tiled):
        f = lambda w: jk.quantize_matrix(w, k, scale_format=scale_format, tiled=tiled)  # noqa: E731
        for _ in lead:
            f = jax.vmap(f)
        return f(w)

    return quantize(True), quantize(False)


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def assert_same(a, b, msg=""):
    np.testing.assert_array_equal(bits(a), bits(b), err_msg=msg)


def stored_position(row: int, block: int, nb: int) -> int:
    """Where block ``block`` of row ``row`` lies in the tiled storage, read off the definition: tiles of 16
    rows x 4 blocks, the tiles of a row band one after another, a tile row-major inside."""
    band, r = divmod(row, 16)
    column, b = divmod(block, 4)
    return ((band * (nb // 4) + column) * 16 + r) * 4 + b


def pair_words(planes: np.ndarray) -> np.ndarray:
    """A K = 4 block's stored words in a tiled matrix, from its four bit planes, read off the definition
    (docs/FORMAT.md, "Tiled matrices"): bit 8q + 2j + r of word c is bit j of the code of element
    8q + 2c + r, the bit 8q + 2c + r of plane j."""
    out = [0, 0, 0, 0]
    for c in range(4):
        for q in range(4):
            for j in range(4):
                for r in range(2):
                    out[c] |= ((int(planes[j]) >> (8 * q + 2 * c + r)) & 1) << (8 * q + 2 * j + r)
    return np.array(out, np.uint32)


# ---------------------------------------------------------------- storage


@pytest.mark.parametrize("k", KS)
def test_stored_order_is_the_tile_order(rng, k):
    assert not can_tile(jk.quantize(jnp.ones((48, 300)), k))  # 10 blocks along in: no whole tiles
    tiled, plain = pair(rng, 384, 48, k, scale_format="f16")  # 12 blocks, 3 row bands
    assert tiled.tiled and not plain.tiled
    n, nb = 48, 12
    words = np.asarray(tiled.stored.packed).reshape(n * nb, k)
    scales = np.asarray(tiled.stored.scales).reshape(n * nb)
    pw, ps = np.asarray(plain.t.packed), np.asarray(plain.t.scales)
    for row in range(n):
        for block in range(nb):
            i = stored_position(row, block, nb)
            # K = 4: the block's planes as pair indices; other K: the planes themselves.
            expect = pair_words(pw[row, block]) if k == 4 else pw[row, block]
            np.testing.assert_array_equal(words[i], expect)
            assert scales[i].view(np.uint16) == ps[row, block].view(np.uint16)
    # Same shapes, same metadata, and .t gives the plain array back exactly.
    for a, b in zip(jax.tree.leaves(tiled.t), jax.tree.leaves(plain.t)):
        assert_same(a, b)
    assert tiled.shape == plain.shape and tiled.stored.packed.shape == plain.t.packed.shape
    assert tiled.nbytes == plain.nbytes and tiled.k == k and "tiled=True" in repr(tiled)
    assert_same(tiled.dequantize(), plain.dequantize())
    assert_same(jk.dequantize(tiled), jk.dequantize(plain))


def test_pair_words_are_their_own_inverse(rng):
    """The K = 4 word transform of tile order (jax_kbit and ffi/kbit_format.h implement the same transpose)
    against the bit-by-bit definition, on random words and the all-zero / all-one / single-bit ones, with
    NumPy and with jax.numpy under jit; applying it twice gives the planes back."""
    from jax_kbit.quantized_matrix import _transpose_pair_fields

    words = rng.integers(0, 2**32, (200, 4), dtype=np.uint64).astype(np.uint32)
    single = np.zeros((128, 4), np.uint32)
    single[np.arange(128), np.arange(128) // 32] = np.uint32(1) << (np.arange(128) % 32).astype(np.uint32)
    words = np.concatenate(
        [words, single, np.zeros((1, 4), np.uint32), np.full((1, 4), 2**32 - 1, np.uint32)]
    )
    expect = np.stack([pair_words(w) for w in words])
    got = _transpose_pair_fields(words)
    np.testing.assert_array_equal(got, expect)
    np.testing.assert_array_equal(np.asarray(jax.jit(_transpose_pair_fields)(jnp.asarray(words))), expect)
    np.testing.assert_array_equal(_transpose_pair_fields(got), words)
    # Every bit lands in a distinct place: a permutation of the 128 bits.
    assert sorted(int(np.log2(v)) + 32 * c for w in expect[200:328] for c, v in enumerate(w) if v) == list(
        range(128)
    )


def v1_calls(q, gpu: bool = False):
    """Products and dequantize of the tiled ``QuantizedMatrix`` ``q`` through the ``_tiled`` (v1) targets,
    which modules exported before the pair words call: they take tile order with K = 4 words as planes, so
    the words go in as ``w.t``'s in tile order (the block permutation only)."""
    from jax_kbit.matmul import SCALE_FORMAT_IDS, _workspace
    from jax_kbit.quantized_matrix import _transpose_pair_fields

    s = q.stored
    packed = _transpose_pair_fields(s.packed) if q.k == 4 else s.packed  # pair words -> planes
    attrs = dict(k=np.int32(q.k), scale_format=np.int32(SCALE_FORMAT_IDS[q.scale_format]))
    n, nb = s.packed.shape[0], s.packed.shape[1]

    def call(target, out, *args, **more):
        if not gpu:
            return jax.ffi.ffi_call(target, out)(*args, **attrs, **more)
        ws = _workspace(out.shape[0], out.shape[1])  # the CUDA handlers' second result
        shapes = (out, jax.ShapeDtypeStruct(ws.shape, ws.dtype))
        return jax.ffi.ffi_call(target, shapes)(*args, **attrs, **more)[0]

    def product(x):
        out = jax.ShapeDtypeStruct((x.shape[0], n), x.dtype)
        return call("kbit_matmul_tiled", out, x, packed, s.scales, s.codebook, s.tensor_scale)

    def transposed(g):
        out = jax.ShapeDtypeStruct((g.shape[0], nb * 32), g.dtype)
        operands = (g, packed, s.scales, s.codebook, s.tensor_scale)
        return call("kbit_matmul_t_tiled", out, *operands, d=np.int64(s.d))

    def dequantize(dtype):
        out = jax.ShapeDtypeStruct((n, s.d), dtype)  # in % 32 != 0: the per-element kernel on a GPU
        deq = jax.ffi.ffi_call("kbit_dequantize_tiled", out)  # one result on either platform
        return deq(packed, s.scales, s.codebook, s.tensor_scale, **attrs)

    return product, transposed, dequantize


@pytest.mark.parametrize("k", KS)
def test_v1_targets_still_read_plane_words(rng, k):
    """The ``_tiled`` targets keep their meaning for modules exported before the pair words (K = 4 words as
    planes): through them, the same matrix's products and dequantize give the plain matrix's bits."""
    from jax_kbit.quantized_matrix import _transpose_pair_fields

    tiled, plain = pair(rng, 256, 48, k)
    product, transposed, dequantize = v1_calls(tiled)
    x = jnp.asarray(rng.standard_normal((3, 256)).astype(np.float32))
    g = jnp.asarray(rng.standard_normal((3, 48)).astype(np.float32))
    assert_same(jax.jit(product)(x), jax.jit(jk.matmul)(x, plain))
    assert_same(jax.jit(transposed)(g), jax.jit(lambda g: jk.matmul(g, plain, transpose=True))(g))
    assert_same(jax.jit(lambda: dequantize(jnp.float32))(), plain.t.dequantize())
    if k == 4:  # the layouts do differ there: pair words read as planes would be other codes
        planes = np.asarray(_transpose_pair_fields(tiled.stored.packed))
        assert not np.array_equal(np.asarray(tiled.stored.packed), planes)


def test_kernel_addressing_matches_the_stored_order(rng, tmp_path):
    """ffi/kbit_format.h's block_index / block_offset (what every kernel reads by) against the order
    ``QuantizedMatrix`` stores, including offsets beyond 2**31."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    root = Path(__file__).resolve().parents[1]
    exe = tmp_path / "print_block_index"
    subprocess.run(
        [cxx, "-O2", "-std=c++17", "-Wall", f"-I{root / 'ffi'}", str(root / "tests/cpp/print_block_index.cc"),
         "-o", str(exe)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    cases = []
    for n, nb in ((16, 4), (48, 12), (32, 8), (160, 36)):
        # The stored order as quantized_matrix builds it: position of every (row, block) after to_tiles.
        ids = np.arange(n * nb, dtype=np.int64).reshape(n, nb)
        where = np.empty(n * nb, np.int64)
        where[np.asarray(_permute_for_test(ids)).reshape(-1)] = np.arange(n * nb)
        for row in range(n):
            for b in range(nb):
                cases.append((n, nb, row, b, row * nb + b, int(where[row * nb + b])))
    big_n, big_nb = 1 << 20, 1 << 12  # 2**32 blocks: 64-bit offsets
    for _ in range(200):
        row, b = int(rng.integers(0, big_n)), int(rng.integers(0, big_nb))
        cases.append((big_n, big_nb, row, b, row * big_nb + b, stored_position(row, b, big_nb)))
    text = "".join(f"{n} {nb} {r} {b}\n" for n, nb, r, b, _, _ in cases)
    out = subprocess.run([str(exe)], input=text, capture_output=True, text=True, check=True).stdout.split(
        "\n"
    )
    for case, line in zip(cases, out):
        plain, tiled, plain2, tiled2 = map(int, line.split())
        assert (plain, tiled) == case[4:] and (plain2, tiled2) == (plain, tiled), (case, line)
    assert len([line for line in out if line]) == len(cases)


def _permute_for_test(ids: np.ndarray) -> np.ndarray:
    """``ids`` [n, nb] put in tile order the way ``to_tiles`` orders the scales."""
    from jax_kbit.quantized_matrix import _permute

    return _permute(ids, False, True)


def test_default_tiles_where_it_can(rng):
    for din, dout, expect in (
        (256, 64, True),
        (100, 32, True),
        (96, 64, False),
        (256, 40, False),
        (16, 16, False),  # one block along in
        (128, 16, True),
    ):
        q = jk.quantize_matrix(jnp.ones((din, dout), jnp.float32), 4)
        assert q.tiled == expect, (din, dout)
    q = jk.quantize_matrix(jnp.ones((0, 16), jnp.float32), 4)  # no blocks: nothing to tile
    assert not q.tiled


def test_conversions_and_errors(rng):
    tiled, plain = pair(rng, 256, 32, 4)
    assert plain.with_tiles() is not plain and plain.with_tiles().tiled
    assert tiled.with_tiles(True) is tiled
    assert_same(plain.with_tiles().stored.packed, tiled.stored.packed)
    assert_same(tiled.with_tiles(False).stored.packed, plain.stored.packed)
    assert_same(jk.QuantizedMatrix(plain.t, tiled=True).stored.scales, tiled.stored.scales)
    w = jnp.ones((96, 40), jnp.float32)
    with pytest.raises(ValueError, match="out % 16 == 0"):
        jk.quantize_matrix(w, 4, tiled=True)
    with pytest.raises(ValueError, match="tiled=True needs"):
        jk.QuantizedMatrix(jk.quantize(w.T, 4), tiled=True)
    with pytest.raises(TypeError, match="tiled must be None or a bool"):
        jk.quantize_matrix(w, 4, tiled="yes")
    with pytest.raises(TypeError, match="tiled must be a bool"):
        jk.QuantizedMatrix(plain.t, tiled=1)
    # The primitive itself refuses tile order on a shape that has none (a hand-built call).
    t = jk.quantize(w.T, 4)
    with pytest.raises(ValueError, match="tiled storage needs"):
        matmul_module.matmul_p.bind(
            jnp.ones((1, 96), jnp.float32), t.packed, t.scales, t.codebook, t.tensor_scale,
            k=4, scale_format="e4m4", d=96, tiled=True,
        )  # fmt: skip


def test_pytree_jit_and_stack(rng):
    tiled, plain = pair(rng, 256, 32, 3, lead=(3,))
    assert tiled.tiled and tiled.shape == (3, 256, 32)
    leaves, treedef = jax.tree.flatten(tiled)
    again = jax.tree.unflatten(treedef, leaves)
    assert again.tiled and isinstance(again, jk.QuantizedMatrix)
    through = jax.jit(lambda q: q)(tiled)
    assert through.tiled and all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(through), leaves))
    one = jax.tree.map(lambda a: a[1], tiled)  # a layer of the stack, still tiled
    assert_same(one.dequantize(), plain.dequantize()[1])


# ---------------------------------------------------------------- products on the CPU


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=dtype_id)
@pytest.mark.parametrize("k", KS)
def test_cpu_products_match_plain(rng, k, dtype):
    for din, dout in TILEABLE:
        tiled, plain = pair(rng, din, dout, k)
        for m in (1, 2, 17, 40):  # 40 rows: dequantize + dot
            x = jnp.asarray(rng.standard_normal((m, din)).astype(dtype))
            g = jnp.asarray(rng.standard_normal((m, dout)).astype(dtype))
            what = f"k={k} m={m} {din}x{dout}"
            f = jax.jit(jk.matmul)
            assert_same(f(x, tiled), f(x, plain), what)
            ft = jax.jit(lambda g, q: jk.matmul(g, q, transpose=True))
            assert_same(ft(g, tiled), ft(g, plain), what + " transposed")


@pytest.mark.parametrize("scale_format", SCALE_FORMATS)
def test_cpu_grads_and_vmap_match_plain(rng, scale_format):
    tiled, plain = pair(rng, 256, 48, 4, scale_format=scale_format)
    x = jnp.asarray(rng.standard_normal((3, 256)).astype(np.float32))

    def loss(x, q):
        return jnp.sum(jnp.sin(jk.matmul(x, q)))

    assert_same(jax.grad(loss)(x, tiled), jax.grad(loss)(x, plain))

    def with_parts(cb, ts, scales, q):  # tangents of the codebook, tensor scale and (float) block scales
        s = q.stored
        qq = jax.tree.unflatten(
            jax.tree.structure(q),
            [s.packed, scales, cb, ts],
        )
        return loss(x, qq)

    float_scales = scale_format != "e4m4"
    argnums = (0, 1, 2) if float_scales else (0, 1)
    got = jax.grad(with_parts, argnums=argnums)(
        tiled.stored.codebook, tiled.stored.tensor_scale, tiled.stored.scales, tiled
    )
    want = jax.grad(with_parts, argnums=argnums)(
        plain.stored.codebook, plain.stored.tensor_scale, plain.stored.scales, plain
    )
    for a, b in zip(got[:2], want[:2]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    if float_scales:  # the scales' gradient, in each one's own storage order
        back = np.asarray(untile_arrays(None, got[2])[1])
        np.testing.assert_allclose(
            back.astype(np.float32), np.asarray(want[2], np.float32), rtol=1e-3, atol=1e-6
        )
    # vmap over x (one weight) and over a stack of weights (the dense path, per weight).
    xs = jnp.asarray(rng.standard_normal((5, 2, 256)).astype(np.float32))
    assert_same(
        jax.vmap(jk.matmul, in_axes=(0, None))(xs, tiled), jax.vmap(jk.matmul, in_axes=(0, None))(xs, plain)
    )
    ts, ps = pair(rng, 256, 48, 2, lead=(5,))
    assert_same(jax.vmap(jk.matmul)(xs, ts), jax.vmap(jk.matmul)(xs, ps))


def test_tiled_targets_are_called(rng):
    """A tiled matrix lowers to the tiled handlers (forward and transposed), a plain one to the plain ones."""
    tiled, plain = pair(rng, 256, 32, 4)
    x = jnp.ones((2, 256), jnp.float32)

    def targets(q):
        f = jax.jit(jax.grad(lambda x: jnp.sum(jk.matmul(x, q) ** 2)))
        return set(re.findall(r"kbit_matmul\w*", f.lower(x).as_text()))

    assert targets(tiled) == {"kbit_matmul_tiled_v2", "kbit_matmul_t_tiled_v2"}
    assert targets(plain) == {"kbit_matmul", "kbit_matmul_t"}


# ---------------------------------------------------------------- dequantize from tile order

# A transpose of 32-bit words in the lowered module: the permutation back to row order that reading the
# tiles in place avoids.
WORD_TRANSPOSE = re.compile(r"transpose[^\n]*xui32>")


def nonfinite_pair(rng, din, dout, k, scale_format):
    w = rng.standard_normal((din, dout)).astype(np.float32) * np.float32(0.05)
    w[3, 5] = np.nan
    w[din - 1, dout - 2] = -np.inf
    w[din // 2, 0] = np.float32(1e-40)  # a subnormal block maximum
    w = jnp.asarray(w)
    return tuple(jk.quantize_matrix(w, k, scale_format=scale_format, tiled=t) for t in (True, False))


@pytest.mark.parametrize("scale_format", SCALE_FORMATS)
@pytest.mark.parametrize("k", KS)
def test_cpu_dequantize_reads_tile_order(rng, k, scale_format):
    """``dequantize`` of a tiled matrix reads the stored order (target ``kbit_dequantize_tiled``, no
    permutation of the words) and gives the plain matrix's result bit for bit: every output dtype, partial
    last blocks (in = 100), non-finite and subnormal blocks."""
    cases = [pair(rng, din, dout, k, scale_format) for din, dout in TILEABLE]
    cases.append(nonfinite_pair(rng, 100, 48, k, scale_format))
    for tiled, plain in cases:
        assert tiled.tiled and not plain.tiled
        for dtype in (np.float32, np.float16, BF16):
            f = jax.jit(lambda q, dtype=dtype: q.dequantize(dtype))
            assert_same(f(tiled), f(plain), f"k={k} {tiled.shape} {np.dtype(dtype).name}")
        text = jax.jit(lambda q: jk.dequantize(q)).lower(tiled).as_text()
        assert "@kbit_dequantize_tiled" in text and not WORD_TRANSPOSE.search(text)


def test_cpu_dequantize_tiled_stacks_vmap_and_grads(rng):
    """A stack of tiled matrices with a codebook each (the handler's codebook groups), vmap over the stack
    (the batching rule), and the gradients of the codebook, tensor scale and float block scales."""
    ts, ps = pair(rng, 256, 32, 3, lead=(3,))
    assert ts.stored.codebook.shape == (3, 8)
    assert_same(jax.jit(lambda q: q.dequantize())(ts), jax.jit(lambda q: q.dequantize())(ps))
    assert_same(jax.vmap(lambda q: q.dequantize(BF16))(ts), jax.vmap(lambda q: q.dequantize(BF16))(ps))
    cbs = jnp.asarray(rng.standard_normal((4, 8)).astype(np.float32))  # a codebook batch of its own
    one_t, one_p = pair(rng, 128, 16, 3)

    def with_codebook(cb, q):
        s = q.stored
        return jax.tree.unflatten(
            jax.tree.structure(q), [s.packed, s.scales, cb, s.tensor_scale]
        ).dequantize()

    assert_same(
        jax.vmap(with_codebook, (0, None))(cbs, one_t), jax.vmap(with_codebook, (0, None))(cbs, one_p)
    )

    tiled, plain = pair(rng, 256, 48, 4, scale_format="f32")

    def loss(cb, t, scales, q):
        s = q.stored
        qq = jax.tree.unflatten(jax.tree.structure(q), [s.packed, scales, cb, t])
        return jnp.sum(jnp.sin(qq.dequantize()))

    def grads(q):
        return jax.grad(loss, argnums=(0, 1, 2))(q.stored.codebook, q.stored.tensor_scale, q.stored.scales, q)

    got, want = grads(tiled), grads(plain)
    for a, b in zip(got[:2], want[:2]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    back = np.asarray(untile_arrays(None, got[2])[1])  # the scales' gradient is in the stored (tile) order
    np.testing.assert_allclose(back, np.asarray(want[2]), rtol=1e-5, atol=1e-7)
    assert not np.array_equal(np.asarray(got[2]), np.asarray(want[2]))  # so the order did matter


def test_dense_path_reads_tile_order(rng):
    """Above FUSED_MAX_ROWS a tiled matrix's product is dequantize (from the tiles) + dot: no permutation
    of the words per call, and the plain matrix's result bit for bit (forward and transposed)."""
    tiled, plain = pair(rng, 512, 64, 4)
    x = jnp.asarray(rng.standard_normal((40, 512)).astype(np.float32))
    f = jax.jit(jax.value_and_grad(lambda x, q: jnp.sum(jnp.sin(jk.matmul(x, q)))))
    for a, b in zip(f(x, tiled), f(x, plain)):
        assert_same(a, b)
    text = f.lower(x, tiled).as_text()
    assert "@kbit_dequantize_tiled" in text and "@kbit_matmul" not in text
    assert not WORD_TRANSPOSE.search(text)


def test_dequantize_tiled_errors():
    """The tiled option needs whole tiles: a ValueError at trace time from the primitive, and an error (not
    a read out of bounds) from the handler when called directly with a partial tile."""
    from jax_kbit.primitives import dequantize_p

    packed = jnp.zeros((8, 4, 4), jnp.uint32)  # 8 rows: half a tile
    scales = jnp.zeros((8, 4), jnp.uint8)
    cb, t = jnp.zeros(16, jnp.float32), jnp.ones((), jnp.float32)
    params = dict(k=4, scale_format="e4m4", d=128, dtype=np.dtype(np.float32), tiled=True)
    with pytest.raises(ValueError, match="tile-ordered packed"):
        jax.jit(lambda *a: dequantize_p.bind(*a, **params))(packed, scales, cb, t)
    with pytest.raises(ValueError, match="tile-ordered packed"):
        dequantize_p.bind(packed[:, :3, :], scales[:, :3], cb, t, **{**params, "d": 96})
    p16, s16 = jnp.zeros((16, 4, 4), jnp.uint32), jnp.zeros((16, 4), jnp.uint8)
    cbs, ts = jnp.zeros((16, 16), jnp.float32), jnp.ones(16, jnp.float32)
    with pytest.raises(ValueError, match="codebook per row"):
        dequantize_p.bind(p16, s16, cbs, ts, **params)
    call = jax.ffi.ffi_call("kbit_dequantize_tiled", jax.ShapeDtypeStruct((8, 128), jnp.float32))
    with pytest.raises(Exception, match="rows % 16 == 0"):
        jax.block_until_ready(call(packed, scales, cb, t, k=np.int32(4), scale_format=np.int32(0)))
    call = jax.ffi.ffi_call("kbit_dequantize_tiled", jax.ShapeDtypeStruct((16, 128), jnp.float32))
    with pytest.raises(Exception, match="rows % 16 == 0 per codebook group"):  # one row per group
        jax.block_until_ready(call(p16, s16, cbs, ts, k=np.int32(4), scale_format=np.int32(0)))
    ok = jax.ffi.ffi_call("kbit_dequantize_tiled", jax.ShapeDtypeStruct((16, 128), jnp.float32))
    out = ok(jnp.zeros((16, 4, 4), jnp.uint32), jnp.zeros((16, 4), jnp.uint8), cb, t, k=np.int32(4),
             scale_format=np.int32(0))  # fmt: skip
    assert out.shape == (16, 128)


def test_quantize_params_tiles_kernels_where_it_can(rng):
    params = {
        "dense": {"kernel": jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)},
        "odd": {"kernel": jnp.asarray(rng.standard_normal((96, 40)), jnp.float32)},
    }
    q = jk.quantize_params(params, 4, min_size=1)
    assert q["dense"]["kernel"].tiled and not q["odd"]["kernel"].tiled
    assert jk.quantize_params(params, 4, min_size=1, tiled=True)["dense"]["kernel"].tiled
    rows = jk.quantize_params(params, 4, min_size=1, tiled=False)
    assert not rows["dense"]["kernel"].tiled
    assert_same(rows["dense"]["kernel"].stored.packed, q["dense"]["kernel"].t.packed)
    report = jk.compression_report(params, q)
    assert {r.layout for r in report.rows} == {"matrix"}
    with pytest.raises(TypeError, match="tiled must be None or a bool"):
        jk.quantize_params(params, 4, tiled="no")


# ---------------------------------------------------------------- checkpoints


def test_checkpoints_store_row_order_and_restore_tiles(rng, tmp_path):
    pytest.importorskip("safetensors")
    tiled, plain = pair(rng, 256, 32, 4)
    tree = {"layer": {"kernel": tiled}, "other": {"kernel": plain}}
    path = checkpoint.save_safetensors(tree, tmp_path / "w.safetensors")
    from safetensors.numpy import load_file

    raw = load_file(str(path))  # what any reader sees: plain format v1
    np.testing.assert_array_equal(raw["layer.kernel.packed"], np.asarray(plain.t.packed))
    back = checkpoint.load_safetensors(path)
    assert back["layer"]["kernel"].tiled and not back["other"]["kernel"].tiled
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        assert_same(a, b)
    back_np = checkpoint.load_safetensors(path, as_numpy=True)
    assert_same(back_np["layer"]["kernel"].stored.packed, tiled.stored.packed)


def test_orbax_restores_into_the_targets_order(rng, tmp_path):
    pytest.importorskip("orbax.checkpoint")
    tiled, plain = pair(rng, 256, 32, 4)
    checkpoint.save_checkpoint(tmp_path / "c", {"w": tiled})
    back = checkpoint.restore_checkpoint(tmp_path / "c")
    assert back["w"].tiled
    assert_same(back["w"].stored.packed, tiled.stored.packed)
    as_plain = checkpoint.restore_checkpoint(tmp_path / "c", target={"w": plain})
    assert not as_plain["w"].tiled
    assert_same(as_plain["w"].stored.packed, plain.stored.packed)
    abstract = jax.eval_shape(lambda: {"w": tiled})
    assert abstract["w"].tiled
    restored = checkpoint.restore_checkpoint(tmp_path / "c", target=abstract)
    assert restored["w"].tiled
    assert_same(restored["w"].stored.scales, tiled.stored.scales)


# ---------------------------------------------------------------- GPU


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=dtype_id)
@pytest.mark.gpu
@needs_cuda
def test_gpu_products_match_plain(rng, k, dtype):
    # (8192, 64): split reductions added up in the CTA; (16384, 32): through the workspace; (2048, 25600):
    # one split, more than half the resident warps; (1024, 2208): two splits, tiles grouped per CTA.
    shapes = TILEABLE + ((8192, 64), (16384, 32), (2048, 25600), (1024, 2208))
    for din, dout in shapes:
        tiled, plain = pair(rng, din, dout, k)
        tiled, plain = jax.device_put(tiled, GPU), jax.device_put(plain, GPU)
        for m in (1, 2, 7, 16, 32):  # the batch-1 kernel (K <= 4), the 16-row kernel
            x = jax.device_put(jnp.asarray(rng.standard_normal((m, din)).astype(dtype)), GPU)
            f = jax.jit(jk.matmul)
            assert_same(f(x, tiled), f(x, plain), f"k={k} m={m} {din}x{dout}")


@pytest.mark.parametrize("k", KS)
@pytest.mark.gpu
@needs_cuda
def test_gpu_v1_targets_still_read_plane_words(rng, k, monkeypatch):
    """The CUDA ``_tiled`` (v1) handlers read K = 4 words as planes, as modules exported before the pair
    words expect: the batch-1 kernel (1, 2 rows), the 16-row kernel (9 rows), the transposed kernel and
    dequantize (the vector kernel at in = 256, the per-element one at in = 100), against the plain matrix."""
    monkeypatch.setattr(matmul_module, "cuda_fused_transposed", True)  # the plain peer's kernel too
    for din in (256, 100):
        tiled, plain = pair(rng, din, 48, k)
        want_deq = np.asarray(plain.t.dequantize())  # CPU; dequantize is bit-exact across platforms
        tiled, plain = jax.device_put(tiled, GPU), jax.device_put(plain, GPU)
        product, transposed, dequantize = v1_calls(tiled, gpu=True)
        forward = jax.jit(jk.matmul)
        backward = jax.jit(lambda g, q: jk.matmul(g, q, transpose=True))
        for m in (1, 2, 9):
            what = f"k={k} m={m} in={din}"
            x = jax.device_put(jnp.asarray(rng.standard_normal((m, din)).astype(BF16)), GPU)
            xp = jnp.pad(x, ((0, 0), (0, tiled.stored.packed.shape[1] * 32 - din)))
            assert_same(jax.jit(product)(xp), forward(x, plain), what)
            g = jax.device_put(jnp.asarray(rng.standard_normal((m, 48)).astype(BF16)), GPU)
            assert_same(jax.jit(transposed)(g)[:, :din], backward(g, plain), what + " transposed")
        got = jax.jit(dequantize, static_argnums=0)(jnp.float32)
        assert_same(got, want_deq, f"k={k} in={din} dequantize")


@pytest.mark.parametrize("scale_format", SCALE_FORMATS)
@pytest.mark.gpu
@needs_cuda
def test_gpu_scale_formats_transposed_and_nonfinite(rng, scale_format, monkeypatch):
    monkeypatch.setattr(matmul_module, "cuda_fused_transposed", True)
    w = rng.standard_normal((512, 48)).astype(np.float32)
    w[40, 17] = np.nan
    w[300, 33] = np.inf
    for k in KS:
        tiled = jax.device_put(
            jk.quantize_matrix(jnp.asarray(w), k, scale_format=scale_format, tiled=True), GPU
        )
        plain = jax.device_put(
            jk.quantize_matrix(jnp.asarray(w), k, scale_format=scale_format, tiled=False), GPU
        )
        for m in (1, 2, 9):
            x = rng.standard_normal((m, 512)).astype(BF16)
            x[0, 5] = np.inf if m > 1 else x[0, 5]
            x = jax.device_put(jnp.asarray(x), GPU)
            g = jax.device_put(jnp.asarray(rng.standard_normal((m, 48)).astype(BF16)), GPU)
            what = f"{scale_format} k={k} m={m}"
            assert_same(jax.jit(jk.matmul)(x, tiled), jax.jit(jk.matmul)(x, plain), what)
            ft = jax.jit(lambda g, q: jk.matmul(g, q, transpose=True))
            assert_same(ft(g, tiled), ft(g, plain), what + " transposed")


@pytest.mark.parametrize("k", KS)
@pytest.mark.gpu
@needs_cuda
def test_gpu_dequantize_reads_tile_order(rng, k):
    """The CUDA dequantize of tile-ordered words (vector kernel for whole-block rows, the per-element kernel
    for in = 100) against the plain matrix on the GPU and the CPU handler, bit for bit, every output dtype
    and scale format, non-finite blocks, and a stack with a codebook per matrix; and the dense matmul path
    (40 rows) of a tiled matrix."""
    for scale_format in SCALE_FORMATS:
        cases = [pair(rng, din, dout, k, scale_format) for din, dout in ((4096, 1024), (256, 64), (2048, 96))]
        cases.append(nonfinite_pair(rng, 100, 48, k, scale_format))
        cases.append(pair(rng, 512, 32, k, scale_format, lead=(3,)))
        for tiled, plain in cases:
            for dtype in (np.float32, np.float16, BF16):
                f = jax.jit(lambda q, dtype=dtype: q.dequantize(dtype))
                want = np.asarray(f(jax.device_put(plain, CPU)))
                what = f"{scale_format} k={k} {tiled.shape} {np.dtype(dtype).name}"
                assert_same(f(jax.device_put(tiled, GPU)), want, what)
                assert_same(f(jax.device_put(plain, GPU)), want, what + " plain")
    tiled, plain = pair(rng, 1024, 256, k)
    x = jax.device_put(jnp.asarray(rng.standard_normal((40, 1024)).astype(BF16)), GPU)
    f = jax.jit(jk.matmul)
    a, b = f(x, jax.device_put(tiled, GPU)), f(x, jax.device_put(plain, GPU))
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-2)
    assert "kbit_dequantize_tiled" in f.lower(x, jax.device_put(tiled, GPU)).compile().as_text()
