"""``python -m jax_kbit``: a self-check of the installation.

Prints the versions, the platforms JAX sees and which handlers are built and registered; then, on the
default device, a table of bits per element, SQNR and round-trip time for K = 2..5 on a 4096 x 4096 N(0, 1)
float32 tensor, a bit-exactness check of the handlers against ``jax_kbit.reference``, and a check that tiled
matrices (``quantize_matrix``'s default storage) dequantize to the reference and multiply exactly as row order
does. Exits with status 1 if any check fails.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import jax_kbit
from jax_kbit import _ffi, codebooks, reference

KS = (2, 3, 4, 5)
SHAPE = (4096, 4096)  # 2**24 elements
REPEATS = 5


def _print_environment() -> None:
    print(f"jax       {jax.__version__}")
    print(f"jax_kbit  {jax_kbit.__version__}")
    print(f"devices   {', '.join(str(d) for d in jax.devices())} (default backend: {jax.default_backend()})")
    archs = ", ".join(jax_kbit.cuda_architectures()) or "-"
    print(f"cuda      built: {'yes' if jax_kbit.cuda_built() else 'no'}; architectures: {archs}")
    print("kernels (XLA FFI targets, by platform):")
    print(f"  cpu   {', '.join(sorted(_ffi._kbit_cpu.registrations()))}")
    if _ffi._kbit_cuda is not None:
        print(f"  cuda  {', '.join(sorted(_ffi._kbit_cuda.registrations()))}")
    elif importlib.util.find_spec("jax_kbit._kbit_cuda") is None:
        print("  cuda  none (not built: nvcc was not found at install time, or KBIT_CUDA=OFF)")
    else:
        print(f"  cuda  none (the CUDA module failed to load: {_ffi.CUDA_IMPORT_ERROR})")


def _round_trip_table() -> None:
    device = jax.devices()[0]
    print(f"\nround trip on {device}: N(0, 1) float32 {SHAPE[0]}x{SHAPE[1]}, default codebook, E4M4 scales")
    x = jax.random.normal(jax.random.key(0), SHAPE, jnp.float32)
    signal = float(jnp.sum(jnp.square(x)))
    print(f"{'K':>2} {'bits/elem':>9} {'SQNR dB':>8} {'round trip ms':>13}")
    for k in KS:
        q = jax_kbit.quantize(x, k)
        bits = q.bits_per_element
        del q
        fn = jax.jit(lambda x, k=k: jax_kbit.dequantize(jax_kbit.quantize(x, k)))
        y = fn(x).block_until_ready()  # warm-up (compiles)
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            y = fn(x).block_until_ready()
            times.append(time.perf_counter() - t0)
        noise = float(jnp.sum(jnp.square(x - y)))
        sqnr = 10 * np.log10(signal / noise)
        print(f"{k:>2} {bits:>9.3f} {sqnr:>8.2f} {statistics.median(times) * 1e3:>13.1f}")
        del y


def _same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _exactness_cases(k: int, rng: np.random.Generator):
    shuffled = codebooks.uniform(k)[rng.permutation(2**k)].copy()
    shuffled[1] = shuffled[0]  # a duplicate: ties go to the lower index
    default = codebooks.default(k)
    #      dtype              scale format codebook  tensor scale
    yield np.float32, "e4m4", default, "auto"
    yield np.float32, "f16", shuffled, "auto"
    yield np.float32, "f32", default, "auto"
    yield np.float16, "e4m4", shuffled, 1.0
    yield ml_dtypes.bfloat16, "e4m4", default, 2.0**-2


def _exactness_check() -> bool:
    print(f"\nbit-exactness vs jax_kbit.reference on {jax.devices()[0]}:")
    rng = np.random.default_rng(2024)
    all_ok = True
    for k in KS:
        failures = []
        n = 0
        for dtype, scale_format, cb, ts in _exactness_cases(k, rng):
            n += 1
            x = (rng.standard_normal((6, 77)) * 3).astype(dtype)
            x[0, 40] = np.nan  # a non-finite block
            x[1, 70] = -np.inf
            x[2, :32] = 0  # an all-zero block
            x[3, 5] = 50  # an outlier that dominates its block
            x[4, 32:64] *= 1e-3  # a block far below the tensor's amax
            try:
                q = jax_kbit.quantize(
                    jnp.asarray(x), k, codebook=jnp.asarray(cb), scale_format=scale_format, tensor_scale=ts
                )
                y = jax_kbit.dequantize(q)
                p_ref, s_ref, t_ref = reference.quantize_ref(x, k, cb, scale_format, ts)
                y_ref = reference.dequantize_ref(p_ref, s_ref, cb, t_ref, k, x.shape[-1], dtype, scale_format)
                checks = {
                    "tensor_scale": _same_bits(q.tensor_scale, t_ref),
                    "packed": _same_bits(q.packed, p_ref),
                    "scales": _same_bits(q.scales, s_ref),
                    "dequantized": _same_bits(y, y_ref),
                }
            except Exception as err:  # noqa: BLE001 - a self-check reports, it does not crash
                checks = {f"{type(err).__name__}: {err}": False}
            bad = [name for name, ok in checks.items() if not ok]
            if bad:
                failures.append(f"{np.dtype(dtype).name}/{scale_format}/t={ts}: {', '.join(bad)} differ")
        all_ok &= not failures
        print(f"  K={k}: {'PASS' if not failures else 'FAIL'} ({n} cases)")
        for f in failures:
            print(f"    {f}")
    return all_ok


def _tiled_check() -> bool:
    print(f"\ntiled matrices vs row order on {jax.devices()[0]}:")
    rng = np.random.default_rng(7)
    all_ok = True
    for k in KS:
        w = rng.standard_normal((256, 64)).astype(np.float32) * np.float32(0.05)
        w[3, 7] = np.nan  # a non-finite block
        try:
            tiled = jax_kbit.quantize_matrix(jnp.asarray(w), k, tiled=True)
            plain = jax_kbit.quantize_matrix(jnp.asarray(w), k, tiled=False)
            t = plain.t
            leaves = (np.asarray(a) for a in (t.packed, t.scales, t.codebook, t.tensor_scale))
            wt_ref = reference.dequantize_ref(*leaves, k, t.d, np.float32, t.scale_format)
            checks = {"dequantize": _same_bits(tiled.dequantize(jnp.float32), wt_ref.T)}
            product = jax.jit(jax_kbit.matmul)
            for rows in (1, 16):  # the fused kernels' row counts
                x = jnp.asarray(rng.standard_normal((rows, 256)), jnp.bfloat16)
                checks[f"matmul of {rows} rows"] = _same_bits(product(x, tiled), product(x, plain))
        except Exception as err:  # noqa: BLE001 - a self-check reports, it does not crash
            checks = {f"{type(err).__name__}: {err}": False}
        bad = [name for name, ok in checks.items() if not ok]
        all_ok &= not bad
        print(f"  K={k}: {'PASS' if not bad else 'FAIL: ' + ', '.join(bad) + ' differ'}")
    return all_ok


def main() -> int:
    t0 = time.perf_counter()
    _print_environment()
    _round_trip_table()
    ok = _exactness_check()
    ok &= _tiled_check()
    print(f"\n{'PASS' if ok else 'FAIL'} ({time.perf_counter() - t0:.1f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
