"""CUDA handlers against the CPU handler and the NumPy reference, bit for bit (skipped without a GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import GPU, needs_cuda

import jax_kbit as jk
from jax_kbit import reference as ref

CPU = jax.devices("cpu")[0]
pytestmark = [pytest.mark.gpu, needs_cuda]

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]
FORMATS = ["e4m4", "f16", "f32"]


def bits_equal(a, b) -> None:
    """Equal bit patterns, NaNs included (every path writes its format's canonical NaN)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    if a.dtype.kind == "f" or a.dtype == ml_dtypes.bfloat16:
        a = a.view(np.uint32 if a.dtype.itemsize == 4 else np.uint16)
        b = b.view(np.uint32 if b.dtype.itemsize == 4 else np.uint16)
    mismatch = np.flatnonzero(a.reshape(-1) != b.reshape(-1))
    assert mismatch.size == 0, f"{mismatch.size} mismatches, first at {mismatch[:5]}"


def roundtrip(device, x, k, fmt, out_dtype, codebook=None, tensor_scale="auto"):
    x = jax.device_put(x, device)
    cb = None if codebook is None else jax.device_put(codebook, device)

    def f(x, cb):
        q = jk.quantize(x, k, codebook=cb, scale_format=fmt, tensor_scale=tensor_scale)
        return q, jk.dequantize(q, out_dtype)

    q, y = jax.jit(f)(x, cb)
    return jax.device_get(q), np.asarray(y)


def gpu_equals_cpu(x, k, fmt, out_dtype):
    """Round trip on the GPU and on the CPU, the same bits both ways; returns the GPU's (q, y)."""
    qg, yg = roundtrip(GPU, x, k, fmt, out_dtype)
    qc, yc = roundtrip(CPU, x, k, fmt, out_dtype)
    bits_equal(qg.packed, qc.packed)
    bits_equal(qg.scales, qc.scales)
    bits_equal(yg, yc)
    return qg, yg


def adversarial(rng, shape, dtype):
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1)
    n = flat.size
    if n >= 256:
        flat[:32] = 0.0  # zero block
        flat[32:64] = np.float32(1e-40)  # subnormal block
        flat[64] = np.nan
        flat[100] = np.inf
        flat[140] = -np.inf
        flat[160:192] = rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], 32)  # ties
        flat[200] = -0.0
        flat[224:256] *= 1e4 if dtype == np.float16 else 1e30
    return x.astype(dtype)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(7, 1000), (64, 256), (3, 33), (1,), (2, 0)])
def test_cuda_equals_cpu_and_reference(k, dtype, fmt, shape):
    rng = np.random.default_rng()
    x = adversarial(rng, shape, dtype)
    cb = jk.codebooks.default(k)
    for out_dtype in DTYPES:
        qg, yg = gpu_equals_cpu(x, k, fmt, out_dtype)
    packed, scales, t = ref.quantize_ref(x, k, cb, fmt)
    bits_equal(qg.packed, packed)
    bits_equal(qg.scales, scales)
    bits_equal(yg, ref.dequantize_ref(packed, scales, cb, t, k, shape[-1], out_dtype, fmt))


@pytest.mark.parametrize("codebook", ["nf4", "unsorted", "duplicates", "random"])
def test_cuda_codebooks(codebook):
    rng = np.random.default_rng()
    k = 4
    cb = {
        "nf4": jk.codebooks.nf4(),
        "unsorted": rng.permutation(jk.codebooks.default(k)),
        "duplicates": np.repeat(np.linspace(-1, 1, 8, dtype=np.float32), 2)[rng.permutation(16)],
        "random": rng.uniform(-1.2, 1.2, 16).astype(np.float32),
    }[codebook]
    x = adversarial(rng, (33, 160), np.float32)
    qg, yg = roundtrip(GPU, x, k, "e4m4", np.float32, codebook=cb)
    packed, scales, t = ref.quantize_ref(x, k, cb)
    bits_equal(qg.packed, packed)
    bits_equal(qg.scales, scales)
    bits_equal(yg, ref.dequantize_ref(packed, scales, cb, t, k, 160, np.float32))


@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_grouped_codebooks_with_odd_block_counts(k, dtype):
    """Per-group codebooks whose groups hold an odd number of blocks: tiles start at every alignment (the
    quantize kernel's vector stores need 16 bytes for odd K and take the exact path otherwise), and a tile
    never mixes groups. One group's codebook is one the bucket table declines."""
    rng = np.random.default_rng()
    groups = 7
    cbs = np.stack([rng.permutation(jk.codebooks.default(k)) for _ in range(groups)]).astype(np.float32)
    cbs[3] = np.sort(rng.uniform(-1, 1, 2**k)).astype(np.float32) * 1e-30  # thresholds near 0: declined
    # 13 rows of 3 blocks (the last partial): 39 blocks a group; 45 rows of one whole block each.
    for shape in [(groups, 13, 81), (groups, 45, 32)]:
        scale = rng.uniform(0.01, 100, (groups, 1, 1))
        x = (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)
        for fmt in FORMATS:

            def rt(x, cb, fmt=fmt):
                q = jk.quantize(x, k, codebook=cb, scale_format=fmt)
                return q.packed, q.scales, jk.dequantize(q, np.float32)

            gpu = jax.jit(jax.vmap(rt))(jax.device_put(x, GPU), jax.device_put(cbs, GPU))
            cpu = jax.jit(jax.vmap(rt))(jax.device_put(x, CPU), jax.device_put(cbs, CPU))
            for a, b in zip(gpu, cpu, strict=True):
                bits_equal(a, b)
            for g in (0, 3, groups - 1):
                packed, scales, _ = ref.quantize_ref(x[g], k, cbs[g], fmt)
                bits_equal(gpu[0][g], packed)
                bits_equal(gpu[1][g], scales)


@pytest.mark.parametrize("k", [3, 5])
def test_codebooks_the_bucket_table_declines(k):
    """Codebooks whose thresholds are closer than a bucket (1/32) or near zero: the exact path, every tile."""
    rng = np.random.default_rng()
    declined = [
        np.linspace(-0.2, 0.2, 2**k),  # dense
        jk.codebooks.default(k) * 1e-30,  # tiny
        np.concatenate([[-1.0, -(2.0**-15), 2.0**-15 + 2.0**-38], np.linspace(0.2, 1, 2**k - 3)]),  # near 0
    ]
    x = adversarial(rng, (33, 160), np.float32)
    for cb in declined:
        cb = np.asarray(cb, np.float32)
        qg, _ = roundtrip(GPU, x, k, "e4m4", np.float32, codebook=cb)
        packed, scales, _ = ref.quantize_ref(x, k, cb)
        bits_equal(qg.packed, packed)
        bits_equal(qg.scales, scales)


@pytest.mark.parametrize("log2n", [0, 5, 10, 16, 20, 24, 28])
def test_sizes_against_cpu(log2n):
    n = 2**log2n + (3 if log2n < 28 else 0)
    rng = np.random.default_rng()
    x = rng.standard_normal(n, dtype=np.float32).astype(ml_dtypes.bfloat16)
    shape = (n // 1024, 1024) if n % 1024 == 0 else (n,)
    x = x.reshape(shape)
    for k in (3, 5):
        gpu_equals_cpu(x, k, "e4m4", ml_dtypes.bfloat16)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("fmt", FORMATS)
def test_whole_block_rows_against_cpu(k, fmt):
    """Rows of whole blocks take the vector dequantize kernel: tiles of 32 blocks, a partial last tile, a
    NaN block, and more tiles than resident warps."""
    rng = np.random.default_rng()
    for shape in [(37, 4128), (2**21 // 96, 96)]:
        x = adversarial(rng, shape, np.float32)
        for out_dtype in DTYPES:
            gpu_equals_cpu(x, k, fmt, out_dtype)


def mixed_tiles(rng, shape, dtype):
    """Rows of whole blocks whose 32-block tiles differ: block magnitudes over a wide range (2**-20 to
    2**20, float16: 2**-8 to 2**8), zero blocks, blocks of ties, and NaN / inf in a few random blocks, so
    that some tiles of the quantize kernel take its shortcut and others its exact path."""
    n = shape[0] * shape[1] // 32
    x = rng.standard_normal((n, 32)).astype(np.float32)
    e = 8 if dtype == np.float16 else 20
    x *= np.exp2(rng.integers(-e, e + 1, (n, 1))).astype(np.float32)
    blocks = rng.permutation(n)
    x[blocks[:5]] = 0.0
    x[blocks[5:10]] = rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], (5, 32))
    for i, v in zip(blocks[10:13], (np.nan, np.inf, -np.inf), strict=True):
        x[i, rng.integers(32)] = v
    return x.reshape(shape).astype(dtype)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_whole_block_rows_mixed_tiles(k, dtype):
    """The quantize kernel for rows of whole blocks (16-byte parts per lane, codes gathered into plane
    bytes): every input dtype and scale format, shortcut and exact tiles side by side, a partial last tile
    (37 rows of 33 blocks: 38 tiles, the last of 5 blocks), against the CPU handler and the reference."""
    rng = np.random.default_rng()
    x = mixed_tiles(rng, (37, 33 * 32), dtype)
    cb = jk.codebooks.default(k)
    for fmt in FORMATS:
        qg, _ = gpu_equals_cpu(x, k, fmt, np.float32)
        packed, scales, _ = ref.quantize_ref(x, k, cb, fmt)
        bits_equal(qg.packed, packed)
        bits_equal(qg.scales, scales)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_whole_block_rows_many_tiles_per_warp(k, dtype):
    """2**23 elements of mixed tiles: 8192 tiles, more than the resident warps, so that warps take several
    tiles each and copy the next tile while working on the current one (an exact tile among them too)."""
    rng = np.random.default_rng()
    x = mixed_tiles(rng, (8192, 1024), dtype)
    gpu_equals_cpu(x, k, "e4m4", dtype)


def test_more_than_2_to_31_elements():
    n = 2**31 + 100  # one row: element offsets and block indices pass 2**31
    x = jax.random.normal(jax.random.key(np.random.randint(1 << 30)), (n,), jnp.bfloat16)
    x = jax.device_put(x, GPU)
    f = jax.jit(lambda x: jk.quantize(x, 4, tensor_scale=1.0))
    q = f(x)
    y = jax.jit(jk.dequantize)(q)
    # Slice on the host: NumPy indexes with 64 bits whatever jax's index width.
    xh, yh, ph, sh = (np.asarray(a) for a in (x, y, q.packed, q.scales))
    cut = (n // 32 - 200) * 32
    cb = jk.codebooks.default(4)
    for lo, hi in ((0, 6400), (2**31 - 3200, 2**31 + 64), (cut, n)):  # windows stay inside the array
        p, s, t = ref.quantize_ref(xh[lo:hi], 4, cb, "e4m4", 1.0)
        bits_equal(ph[lo // 32 : lo // 32 + p.shape[0]], p)
        bits_equal(sh[lo // 32 : lo // 32 + s.shape[0]], s)
        bits_equal(yh[lo:hi], ref.dequantize_ref(p, s, cb, t, 4, hi - lo, ml_dtypes.bfloat16))


def test_vmap_scan_donation_on_gpu():
    rng = np.random.default_rng()
    xs = jax.device_put(rng.standard_normal((6, 40, 96)).astype(np.float32), GPU)
    cbs = jax.device_put(np.stack([rng.permutation(jk.codebooks.default(3)) for _ in range(6)]), GPU)

    def rt(x, cb):
        return jk.dequantize(jk.quantize(x, 3, codebook=cb))

    expected = np.stack([np.asarray(jax.jit(rt)(xs[i], cbs[i])) for i in range(6)])
    bits_equal(jax.jit(jax.vmap(rt))(xs, cbs), expected)
    bits_equal(
        jax.vmap(rt, in_axes=(1, None))(xs, cbs[0]).transpose(1, 0, 2),
        np.stack([np.asarray(rt(xs[i], cbs[0])) for i in range(6)]),
    )

    def body(carry, args):
        x, cb = args
        y = rt(x, cb)
        return carry + y.sum(), y

    _, ys = jax.jit(lambda a, b: jax.lax.scan(body, jnp.float32(0), (a, b)))(xs, cbs)
    bits_equal(ys, expected)

    donated = jax.jit(lambda x: jk.dequantize(jk.quantize(x, 3)), donate_argnums=0)
    x0 = jax.device_put(np.asarray(xs[0]), GPU)
    want = np.asarray(jax.jit(lambda x: jk.dequantize(jk.quantize(x, 3)))(x0))
    bits_equal(donated(x0), want)


def test_gpu_rejects_inconsistent_buffers():
    x = jax.device_put(np.ones((4, 64), np.float32), GPU)
    call = jax.ffi.ffi_call(
        "kbit_quantize",
        (jax.ShapeDtypeStruct((4, 3, 4), jnp.uint32), jax.ShapeDtypeStruct((4, 2), jnp.uint8)),
    )
    with pytest.raises(Exception, match="jax_kbit"):
        jax.block_until_ready(
            jax.jit(
                lambda x: call(
                    x, jnp.zeros(16, jnp.float32), jnp.float32(1), k=np.int32(4), scale_format=np.int32(0)
                )
            )(x)
        )
