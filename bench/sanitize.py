"""A small run of every CUDA kernel variant, for compute-sanitizer (memcheck, racecheck); see gpu_check.sh."""

import functools
import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_kbit as jk

# Sections to run (all without arguments): `python sanitize.py matmul` runs that one alone, e.g. for racecheck,
# which takes minutes over the matmul section by itself. `k=2,3` keeps only those K in every section, so
# that several sanitizer processes can share the matmul section's cases (gpu_check.sh runs them side by side).
ARGS = sys.argv[1:]
KS = (2, 3, 4, 5)
for arg in [a for a in ARGS if a.startswith("k=")]:
    ARGS.remove(arg)
    try:
        KS = tuple(sorted({int(v) for v in arg[2:].split(",")}))
    except ValueError:
        sys.exit(f"k= takes comma-separated bit widths, got {arg!r}")
    if not KS or set(KS) - {2, 3, 4, 5}:
        sys.exit(f"k= takes bit widths 2..5, got {arg!r}")
CHOSEN = set(ARGS)
SECTIONS = ("codec", "dequantize", "tiled", "quantize", "grouped", "matmul")
if CHOSEN - set(SECTIONS):
    sys.exit(f"unknown sections {sorted(CHOSEN - set(SECTIONS))}; choose from {SECTIONS}")


def section(name: str) -> bool:
    """Whether to run the part `name`; printed as it starts, so that a crash of the sanitizer itself shows
    where it happened."""
    if CHOSEN and name not in CHOSEN:
        return False
    print(f"section: {name}", flush=True)
    return True


rng = np.random.default_rng(0)
gpu = jax.devices("gpu")[0]
if section("codec"):
    for k in KS:
        for fmt in ("e4m4", "f16", "f32"):
            for dtype in (jnp.float32, jnp.float16, jnp.bfloat16):
                for shape in ((5, 96), (3, 45)):  # vector path (d % 32 == 0) and general path
                    x = jax.device_put(rng.standard_normal(shape).astype(np.float32), gpu).astype(dtype)
                    q = jk.quantize(x, k, scale_format=fmt)
                    y = jk.dequantize(q)
                    jax.block_until_ready(y)
if section("dequantize"):
    for k in KS:  # a grid of many CTAs for the vector dequantize kernel
        xb = jax.device_put(rng.standard_normal((257, 4096)).astype(np.float32), gpu).astype(jnp.bfloat16)
        jax.block_until_ready(jk.dequantize(jk.quantize(xb, k)))
# dequantize from tile order (a tiled QuantizedMatrix): the vector kernel (in % 32 == 0, several CTAs), the
# per-element kernel (in = 100), and a stack with a codebook per matrix (groups)
if section("tiled"):
    for k in KS:
        for dtype in (jnp.float32, jnp.bfloat16):
            for lead, din, dout in (((), 4096, 512), ((), 100, 48), ((3,), 256, 32)):
                w = jax.device_put(rng.standard_normal(lead + (din, dout)).astype(np.float32), gpu)
                qm = functools.partial(jk.quantize_matrix, k=k, tiled=True)
                for _ in lead:
                    qm = jax.vmap(qm)
                jax.block_until_ready(qm(w).dequantize(dtype))
# quantize's exact tile path: a non-finite block, and a codebook the bucket table declines
if section("quantize"):
    for k in KS:
        for shape in ((5, 96), (3, 45)):
            xh = rng.standard_normal(shape).astype(np.float32)
            xh[1, 3] = np.nan
            jax.block_until_ready(jk.quantize(jax.device_put(xh, gpu), k).packed)
            dense = jax.device_put(np.linspace(-0.1, 0.1, 2**k, dtype=np.float32), gpu)
            jax.block_until_ready(
                jk.quantize(jax.device_put(np.nan_to_num(xh), gpu), k, codebook=dense).packed
            )
# grouped codebooks (vmap) with several CTAs per group, and (odd K, 39 blocks a group) misaligned tiles
if section("grouped"):
    for k, shape in ((4, (3, 70, 64)), (3, (3, 13, 81)), (5, (3, 13, 81))):
        if k not in KS:
            continue
        xs = jax.device_put(rng.standard_normal(shape).astype(np.float32), gpu)
        cbs = jax.device_put(np.stack([rng.permutation(jk.codebooks.default(k)) for _ in range(3)]), gpu)
        jax.block_until_ready(
            jax.vmap(lambda x, c, k=k: jk.dequantize(jk.quantize(x, k, codebook=c)))(xs, cbs)
        )
# fused matmul and the fused transposed product (on for this run; off by default): every K and x dtype,
# each row-tile variant (M <= 8, 16, 32), a partial tile of output rows, a partial chunk of blocks, a split
# reduction (in = 4096 forward, out = 4096 transposed) and f16 / f32 scales; one and two rows take the
# batch-1 kernel (K <= 4; its register ring over many steps and x copied into shared memory, a tail step,
# split reductions added in the CTA and, at 32 splits, through the workspace)
if section("matmul"):
    importlib.import_module("jax_kbit.matmul").cuda_fused_transposed = True
    for k in KS:
        for dtype in (jnp.float16, jnp.bfloat16):
            for m, din, dout, fmt in (
                (1, 100, 33, "e4m4"),
                (16, 4096, 40, "e4m4"),
                (30, 96, 17, "f16"),
                (8, 200, 24, "f32"),
                (3, 1000, 4096, "e4m4"),
                (1, 4096, 40, "e4m4"),
                (2, 1000, 24, "f16"),
                (1, 256, 25600, "e4m4"),  # enough tiles for the batch-1 kernel's one-split path
                (1, 1024, 2200, "e4m4"),  # its splits added in the CTA, two tiles per CTA
                (2, 16384, 40, "f16"),  # 32 splits: more than a CTA's warps, so the workspace and sum kernel
                # tiled storage (quantize_matrix tiles these: out % 16 == 0, blocks % 4 == 0), the same paths
                (3, 1000, 4096, "f32"),
                (1, 1024, 2208, "e4m4"),
                (2, 16384, 48, "f16"),
                (16, 4096, 48, "e4m4"),
                (1, 4096, 64, "e4m4"),
            ):
                w = jax.device_put(rng.standard_normal((din, dout)).astype(np.float32), gpu)
                x = jax.device_put(rng.standard_normal((m, din)).astype(np.float32), gpu).astype(dtype)
                g = jax.device_put(rng.standard_normal((m, dout)).astype(np.float32), gpu).astype(dtype)
                q = jk.quantize_matrix(w, k, scale_format=fmt)
                jax.block_until_ready(jax.jit(lambda x, q: jk.matmul(x, q))(x, q))
                jax.block_until_ready(jax.jit(lambda g, q: jk.matmul(g, q, transpose=True))(g, q))
print("sanitize run complete")
