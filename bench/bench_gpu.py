"""GPU benchmark: effective bandwidth of quantize / dequantize against copy bandwidth and a plain-jax.numpy
implementation of the same format, measured in the same run. Prints a table, writes JSON and a PNG plot.

Effective bytes follow the format: quantize reads n * itemsize and writes n * K / 8 + n / 32 scale bytes;
dequantize the reverse. Times are medians of rounds of back-to-back calls (dispatch overlapped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import jax_kbit as jk

sys.path.insert(0, str(Path(__file__).parent))
try:
    import jnp_format  # the plain jax.numpy peer
except ImportError:  # pragma: no cover
    jnp_format = None


def timeit(fn, *args, rounds: int = 5, min_time: float = 0.03, stat=statistics.median) -> float:
    """Seconds per call: ``stat`` (median by default) over ``rounds`` samples of about ``min_time`` each.
    A/B runs pass ``stat=min``: other work on a shared GPU only ever adds time."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, min(200, int(min_time / once)))
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / reps)
    return stat(samples)


def bench_bitsandbytes(n: int, copy_bw: float) -> dict | None:
    """bitsandbytes NF4 (blocksize 64, fp32 absmax) on the same number of bf16 elements, timed with CUDA
    events; None when bitsandbytes or torch cannot be imported or run."""
    try:
        import bitsandbytes.functional as bnbf
        import torch
    except Exception as err:  # noqa: BLE001 - any import failure means "not available"
        print(f"bitsandbytes not available: {err!r}")
        return None
    x = torch.randn(n // 4096, 4096, device="cuda", dtype=torch.bfloat16)
    q, state = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4")

    def time_torch(fn) -> float:
        fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(7):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                fn()
            stop.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(stop) / 10 / 1e3)
        return statistics.median(samples)

    tq = time_torch(lambda: bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4"))
    td = time_torch(lambda: bnbf.dequantize_4bit(q, state, quant_type="nf4"))
    nbytes = n * 2 + n // 2 + n // 64 * 4
    row = {
        "bnb_version": getattr(__import__("bitsandbytes"), "__version__", "?"),
        "quantize_ms": tq * 1e3,
        "dequantize_ms": td * 1e3,
        "quantize_pct_copy": 100 * nbytes / tq / copy_bw,
        "dequantize_pct_copy": 100 * nbytes / td / copy_bw,
    }
    torch.cuda.empty_cache()
    return row


def fmt_bytes(k: int, n: int, itemsize: int) -> int:
    return n * itemsize + n * k // 8 + n // 32


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--quick", action="store_true", help="only 2**28 and fewer sizes")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}  jax {jax.__version__}  jax_kbit {jk.__version__}")
    n = 2**28
    key = jax.random.key(0)
    results: dict = {
        "device": dev.device_kind,
        "date": time.strftime("%Y-%m-%d"),
        "n": n,
        "rows": [],
        "curve": [],
    }

    x32 = jax.random.normal(key, (n // 4096, 4096), jnp.float32)
    copy = jax.jit(lambda x: x + 1)
    t_copy = timeit(copy, x32)
    copy_bw = 2 * x32.nbytes / t_copy
    results["copy_GBps"] = copy_bw / 1e9
    print(f"copy (f32 x+1, read+write): {copy_bw / 1e9:.0f} GB/s")

    rows = []
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        x = x32.astype(dtype)
        itemsize = jnp.dtype(dtype).itemsize
        for k in (2, 3, 4, 5):
            nbytes = fmt_bytes(k, n, itemsize)
            qf = jax.jit(lambda x, k=k: jk.quantize(x, k, tensor_scale=1.0))
            qa = jax.jit(lambda x, k=k: jk.quantize(x, k))
            q = qf(x)
            df = jax.jit(lambda q, dtype=dtype: jk.dequantize(q, dtype))
            tq, tqa, td = timeit(qf, x), timeit(qa, x), timeit(df, q)
            row = {
                "dtype": jnp.dtype(dtype).name,
                "k": k,
                "quantize_ms": tq * 1e3,
                "quantize_auto_ms": tqa * 1e3,
                "dequantize_ms": td * 1e3,
                "quantize_pct_copy": 100 * nbytes / tq / copy_bw,
                "dequantize_pct_copy": 100 * nbytes / td / copy_bw,
            }
            if jnp_format is not None:
                cb = jnp.asarray(jk.codebooks.default(k))
                jq = jax.jit(lambda x, k=k, cb=cb: jnp_format.quantize_jnp(x, k, cb, "e4m4", jnp.float32(1)))
                p, s = jq(x)
                jd = jax.jit(
                    lambda p, s, k=k, cb=cb, dtype=dtype: jnp_format.dequantize_jnp(
                        p, s, cb, jnp.float32(1), k, 4096, dtype, "e4m4"
                    )
                )
                row["jnp_quantize_ms"] = timeit(jq, x, rounds=3) * 1e3
                row["jnp_dequantize_ms"] = timeit(jd, p, s, rounds=3) * 1e3
            rows.append(row)
            print(json.dumps(row))
    results["rows"] = rows
    results["bitsandbytes_nf4_bf16"] = bnb = bench_bitsandbytes(n, copy_bw)
    if bnb is not None:
        print("bitsandbytes NF4 (bf16, blocksize 64):", json.dumps(bnb))

    sizes = [2**e for e in (range(16, 31, 2) if not args.quick else (20, 24, 28))]
    for size in sizes:
        x = jax.random.normal(key, (size // 1024, 1024), jnp.bfloat16)
        for k in (2, 3, 4, 5):
            nbytes = fmt_bytes(k, size, 2)
            qf = jax.jit(lambda x, k=k: jk.quantize(x, k, tensor_scale=1.0))
            q = qf(x)
            df = jax.jit(jk.dequantize)
            tq, td = timeit(qf, x), timeit(df, q)
            results["curve"].append(
                {"n": size, "k": k, "quantize_GBps": nbytes / tq / 1e9, "dequantize_GBps": nbytes / td / 1e9}
            )
        del x, q

    (out / "bench_gpu.json").write_text(json.dumps(results, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, op in zip(axes, ("quantize", "dequantize")):
            for k in (2, 3, 4, 5):
                pts = [c for c in results["curve"] if c["k"] == k]
                ax.plot([c["n"] for c in pts], [c[f"{op}_GBps"] for c in pts], marker="o", label=f"K={k}")
            ax.axhline(copy_bw / 1e9, color="k", ls="--", label="copy (2^28 f32)")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op}, bfloat16, {dev.device_kind}")
            ax.set_xlabel("elements")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("effective GB/s")
        axes[1].legend()
        fig.tight_layout()
        fig.savefig(out / "bench_gpu.png", dpi=110)
    except ImportError:
        print("matplotlib missing: no plot")

    print(
        f"\n{'dtype':9} {'K':>2} {'quant ms':>9} {'%copy':>6} {'auto ms':>8} {'deq ms':>8} {'%copy':>6} {'jnp q ms':>9} {'jnp dq ms':>9}"
    )
    for r in rows:
        print(
            f"{r['dtype']:9} {r['k']:>2} {r['quantize_ms']:9.3f} {r['quantize_pct_copy']:6.1f} {r['quantize_auto_ms']:8.3f} "
            f"{r['dequantize_ms']:8.3f} {r['dequantize_pct_copy']:6.1f} {r.get('jnp_quantize_ms', float('nan')):9.3f} "
            f"{r.get('jnp_dequantize_ms', float('nan')):9.3f}"
        )
    if bnb is not None:
        print(
            f"bitsandbytes {bnb['bnb_version']} NF4 bf16: quantize {bnb['quantize_ms']:.3f} ms "
            f"({bnb['quantize_pct_copy']:.1f}% copy), dequantize {bnb['dequantize_ms']:.3f} ms "
            f"({bnb['dequantize_pct_copy']:.1f}% copy)"
        )
    print(f"copy: {copy_bw / 1e9:.0f} GB/s, n = 2**28")


if __name__ == "__main__":
    main()
