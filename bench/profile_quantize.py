"""Two warm launches of quantize and of dequantize, for ncu (see gpu_check.sh's ncu and ncu_src_* steps).

    python bench/profile_quantize.py [--k K] [--dtype bfloat16|float16|float32] [--log2n 26]

ncu skips the first launch of each kernel (--launch-skip 1), so the profiled one runs with warm caches.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jax_kbit as jk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--log2n", type=int, default=26)
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    x = jax.random.normal(jax.random.key(0), (2 ** (args.log2n - 12), 2**12), dtype)
    q = jax.jit(lambda x: jk.quantize(x, args.k, tensor_scale=1.0))
    d = jax.jit(lambda qa: jk.dequantize(qa, dtype=dtype))
    for _ in range(2):
        jax.block_until_ready(d(q(x)))


if __name__ == "__main__":
    main()
