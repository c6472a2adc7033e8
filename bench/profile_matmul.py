"""Warm launches of the fused matmul kernel for ncu (see gpu_check.sh's ncu_matmul step).

M rows of bfloat16 x times an [in, out] weight stored K-bit (``jax_kbit.matmul``). Two launches: ncu skips the
first (compilation, first touch).
"""

import argparse

import jax
import jax.numpy as jnp

import jax_kbit as jk

ap = argparse.ArgumentParser()
ap.add_argument("--m", type=int, default=1)
ap.add_argument("--shape", default="8192x8192", help="in x out")
ap.add_argument("--k", type=int, default=4)
args = ap.parse_args()
din, dout = (int(v) for v in args.shape.split("x"))
w = jax.random.normal(jax.random.key(0), (din, dout), jnp.bfloat16) * jnp.bfloat16(0.02)
qw = jk.quantize_matrix(w, args.k)
x = jax.random.normal(jax.random.key(1), (args.m, din), jnp.bfloat16)
f = jax.jit(jk.matmul)
for _ in range(2):
    jax.block_until_ready(f(x, qw))
