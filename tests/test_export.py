"""jax.export of functions that call quantize / dequantize (docs/SHARDING.md, "Export").

Every test exports for both platforms, ``("cpu", "cuda")``, serializes, deserializes and calls the result
on this process's default device (the CPU here, the GPU on a GPU machine), and compares bit for bit with
the same function run directly. Tests that need several devices are in test_sharding.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_kbit as jk
from jax_kbit.exporting import DISABLED_CHECKS

try:  # jax.export's serialization needs flatbuffers, which neither jax nor jaxlib requires
    import flatbuffers  # noqa: F401

    HAVE_FLATBUFFERS = True
except ImportError:
    HAVE_FLATBUFFERS = False
needs_flatbuffers = pytest.mark.skipif(
    not HAVE_FLATBUFFERS, reason="serialization needs `pip install flatbuffers`"
)

BF16 = np.dtype(ml_dtypes.bfloat16)
PLATFORMS = ("cpu", "cuda")


def data(shape, dtype=np.float32, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 2, size=tuple(shape[:-1]) + (1,))
    return x.astype(np.float32).astype(dtype)


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def assert_same(got, want) -> None:
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(got_leaves, want_leaves):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, g.shape, w.dtype, w.shape)
        np.testing.assert_array_equal(bits(g), bits(w))


def round_trip(fn, *args):
    """export -> serialize -> deserialize of jit(fn) for both platforms.

    Without flatbuffers the in-memory ``Exported`` is returned (test_serialization says so by skipping).
    """
    exported = jax.export.export(jax.jit(fn), platforms=PLATFORMS, disabled_checks=DISABLED_CHECKS)(*args)
    assert exported.platforms == PLATFORMS
    if not HAVE_FLATBUFFERS:
        return exported
    blob = exported.serialize()
    assert isinstance(blob, (bytes, bytearray)) and len(blob) > 0
    return jax.export.deserialize(blob)


@pytest.mark.parametrize(
    "dtype, k, scale_format, shape",
    [
        (np.float32, 4, "e4m4", (8, 512)),
        (BF16, 3, "f16", (3, 5, 100)),
        (np.float16, 5, "f32", (64,)),
        (BF16, 2, "e4m4", (2, 33)),
    ],
)
def test_round_trip(dtype, k, scale_format, shape):
    x = data(shape, dtype, seed=k)

    def fn(v):
        return jk.dequantize(jk.quantize(v, k, scale_format=scale_format))

    loaded = round_trip(fn, x)
    assert_same(loaded.call(x), jax.jit(fn)(x))
    assert_same(jax.jit(loaded.call)(x), jax.jit(fn)(x))  # also callable inside another jit


def test_quantized_array_in_and_out():
    """QuantizedArray is a pytree that export can serialize (jax_kbit registers it)."""
    x = data((4, 96), BF16)

    def quantize(v):
        return jk.quantize(v, 4, scale_format="f16")

    loaded_q = round_trip(quantize, x)
    q = loaded_q.call(x)
    assert isinstance(q, jk.QuantizedArray)
    assert (q.k, q.d, q.dtype, q.scale_format) == (4, 96, BF16, "f16")
    assert_same(q, jax.jit(quantize)(x))

    def dequantize(q):
        return jk.dequantize(q, jnp.float32)

    loaded_d = round_trip(dequantize, q)
    assert_same(loaded_d.call(q), jax.jit(dequantize)(q))


@pytest.mark.parametrize("tiled", [True, False])
def test_quantized_matrix_in_and_out(tiled):
    """QuantizedMatrix (tiled or not) is a pytree that export serializes, and matmul exports with it."""
    w = data((256, 64), np.float32) * np.float32(0.05)

    def quantize(w):
        return jk.quantize_matrix(w, 4, tiled=tiled)

    loaded_q = round_trip(quantize, w)
    q = loaded_q.call(w)
    assert isinstance(q, jk.QuantizedMatrix) and q.tiled == tiled and q.shape == (256, 64)
    assert_same(q, jax.jit(quantize)(w))
    x = data((3, 256), BF16, seed=1)
    loaded_m = round_trip(jk.matmul, x, q)
    assert_same(loaded_m.call(x, q), jax.jit(jk.matmul)(x, q))
    assert ("@kbit_matmul_tiled" in loaded_m.mlir_module()) == tiled
    loaded_d = round_trip(jk.dequantize, q)  # a tiled matrix's dequantize reads the tiles in place
    assert_same(loaded_d.call(q), jax.jit(jk.dequantize)(q))
    assert ("@kbit_dequantize_tiled" in loaded_d.mlir_module()) == tiled


def test_vmap():
    """A vmapped function (one tensor scale per example: group dims) exports like any other."""
    x = data((3, 4, 64))

    def fn(v):
        return jax.vmap(lambda r: jk.dequantize(jk.quantize(r, 3)))(v)

    loaded = round_trip(fn, x)
    assert_same(loaded.call(x), jax.jit(fn)(x))


def test_vmap_over_codebooks():
    x = data((2, 4, 64))
    cbs = np.stack([jk.codebooks.default(4), jk.codebooks.uniform(4)]).astype(np.float32)

    def fn(v, c):
        return jax.vmap(lambda r, cb: jk.dequantize(jk.quantize(r, 4, codebook=cb, tensor_scale=1.0)))(v, c)

    loaded = round_trip(fn, x, cbs)
    assert_same(loaded.call(x, cbs), jax.jit(fn)(x, cbs))


@needs_flatbuffers
def test_serialization():
    """The round trips above go through bytes (they fall back to the in-memory Exported without it)."""
    x = data((2, 64))
    loaded = round_trip(lambda v: jk.dequantize(jk.quantize(v)), x)
    assert isinstance(loaded, jax.export.Exported)
    assert_same(loaded.call(x), jax.jit(lambda v: jk.dequantize(jk.quantize(v)))(x))


def test_symbolic_leading_dims():
    """Leading dims may be symbolic (shape polymorphism); the last one fixes the block count."""
    fn = jax.jit(lambda v: jk.dequantize(jk.quantize(v, 4)))
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 256"), jnp.float32)
    loaded = round_trip(lambda v: jk.dequantize(jk.quantize(v, 4)), spec)
    for rows in (1, 6):
        x = data((rows, 256), seed=rows)
        assert_same(loaded.call(x), fn(x))


def test_needs_disabled_checks():
    """The kernels are not on JAX's list of stable custom calls: export refuses them by default."""
    with pytest.raises(ValueError, match="custom call"):
        jax.export.export(jax.jit(lambda v: jk.quantize(v)), platforms=PLATFORMS)(data((2, 32)))
    names = {str(c) for c in DISABLED_CHECKS}
    assert any("kbit_quantize" in n for n in names) and any("kbit_dequantize" in n for n in names)


def test_module_names_the_kernels():
    exported = jax.export.export(
        jax.jit(lambda v: jk.dequantize(jk.quantize(v))), platforms=PLATFORMS, disabled_checks=DISABLED_CHECKS
    )(data((2, 64)))
    text = exported.mlir_module()
    assert "@kbit_quantize" in text and "@kbit_dequantize" in text


_LOADER = """
import sys
import numpy as np
if sys.argv[2] == "import":
    import jax_kbit  # registers the handlers and the QuantizedArray serialization
import jax
loaded = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
x = np.load(sys.argv[1] + ".x.npy")
np.save(sys.argv[1] + ".y.npy", np.asarray(loaded.call(x)))
"""


def _load_in_fresh_process(tmp_path, mode: str):
    return subprocess.run(
        [sys.executable, "-P", "-c", textwrap.dedent(_LOADER), str(tmp_path / "f.bin"), mode],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )


@needs_flatbuffers
def test_loading_process_must_import_jax_kbit(tmp_path):
    x = data((4, 128))
    fn = jax.jit(lambda v: jk.dequantize(jk.quantize(v, 4)))
    exported = jax.export.export(fn, platforms=PLATFORMS, disabled_checks=DISABLED_CHECKS)(x)
    (tmp_path / "f.bin").write_bytes(exported.serialize())
    np.save(tmp_path / "f.bin.x.npy", x)

    ok = _load_in_fresh_process(tmp_path, "import")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert_same(np.load(tmp_path / "f.bin.y.npy"), fn(x))

    missing = _load_in_fresh_process(tmp_path, "no-import")
    assert missing.returncode != 0
    assert "kbit_quantize" in missing.stderr, missing.stderr[-3000:]
