"""Kernel times for A/B comparisons of kernel variants (see ``bench/ab_variants.sh``).

Only jax_kbit's kernels are timed (no peers): the variants are built side by side and run in turns in one
call, so their differences are not call-to-call noise. Suites: ``gemv`` times ``jax_kbit.matmul`` with
``--rows`` rows of x on the issue's shapes and the layers of the 1.1 B decoder of ``bench_decode.py`` (each
timing chains enough distinct weight copies that they do not stay in L2); ``codec`` times quantize
(explicit tensor scale) and dequantize of 2^28 elements, a read+write copy of the same float32 array (the
ceiling, so that a variant's % of copy can be read off) and a column sum (read-only; for a write-only
ceiling see ``bench/probe_codec_ceiling.cu``: XLA's bf16 fill ran at 1.6 TB/s, no ceiling at all). Each run
also checks the variant's results (products against x @ dequantize(w); quantize / dequantize bit for bit
against the CPU handler) and prints WRONG RESULTS where they fail. Prints one line per run and appends it
to ``--out``/ab_time.jsonl.

The ``tiled`` suite times ``dequantize`` of a matrix in tile order (``kbit_dequantize_tiled``, what a tiled
matrix's product above 32 rows runs) beside the same codes in row order, per output dtype and K at the issue's
large shapes, and checks the two bit for bit.

The gemv suite also reads the k-bit kernels' own time per product (``dev_us``: the batch-1 kernel plus its
split sum, from a ``jax.profiler`` trace of a few chained calls): the wall time of a chain of small products
counts the launch gaps and the adds between them, which swung identical kernels by 30 % between processes.
The codec suite reads the quantize kernel's own time per launch at 2^16..2^28 elements the same way (wall
time per call floors at about 50 µs there, 2026-12-02).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jax_kbit as jk

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import timeit  # noqa: E402
from bench_matmul import _chain  # noqa: E402
from profile_decode import kernel_events  # noqa: E402

# (in, out, K): the shapes (K = 2 and 3 at two of them), then the decoder's layers (q/o, k/v, gate/up, down, LM head).
CASES = [
    (4096, 4096, 4),
    (8192, 8192, 2),
    (8192, 8192, 3),
    (8192, 8192, 4),
    (8192, 28672, 4),
    (28672, 8192, 4),
    (8192, 28672, 2),
    (8192, 28672, 3),
    (2048, 2048, 4),
    (2048, 512, 4),
    (2048, 8192, 4),
    (8192, 2048, 4),
    (2048, 32000, 4),
]
L2_DEFEAT_BYTES = 120 << 20
# The fastest of many short samples: variants' differences of a few per cent drowned in the medians of a
# shared GPU's noise (identical kernels 10-21 us apart in one call, 2026-12-01).
TIMING = {"rounds": 15, "min_time": 0.01, "stat": min}


# A variant whose products differ from x @ dequantize(w) by more than this (relative, Frobenius) is broken,
# not fast: bf16 outputs alone are within about 0.4 %.
MAX_REL_ERR = 0.02


# A product is one launch of a kernel matching PRODUCT_KERNEL, then (split reductions) SUM_KERNEL's.
PRODUCT_KERNEL = re.compile(r"gemv_kernel|matmul_kernel")
SUM_KERNEL = re.compile(r"sum_splits")
TRACE_CALLS = 3


def per_product_us(events: list[tuple[int, int, str]], products: list[int]) -> list[float]:
    """Split the trace's kernel events (start_ns, end_ns, name) into consecutive runs of ``products[i]``
    products, in start order, and return each run's k-bit kernel microseconds per product (NaN where the
    trace holds fewer products than asked for). Other kernels (the chain's adds) are ignored."""
    kbit = sorted(e for e in events if PRODUCT_KERNEL.search(e[2]) or SUM_KERNEL.search(e[2]))
    out, i = [], 0
    for want in products:
        total, seen = 0, 0
        while i < len(kbit):
            start, end, name = kbit[i]
            if PRODUCT_KERNEL.search(name):
                if seen == want:
                    break
                seen += 1
            elif seen == 0:  # a split sum before any product of this run: the previous run's
                i += 1
                continue
            total += end - start
            i += 1
        out.append(total / 1e3 / want if seen == want and want > 0 else math.nan)
    return out


def device_us(runs: list[tuple[Callable[[], object], int]]) -> list[float]:
    """Each (compiled call, products per call) called TRACE_CALLS times under one profiler trace: the k-bit
    kernel microseconds per product of each. NaN without a GPU device plane in the trace."""
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir):
            for call, _ in runs:
                for _ in range(TRACE_CALLS):
                    out = call()
                jax.block_until_ready(out)
        files = sorted(Path(log_dir).rglob("*.xplane.pb"))
        events = kernel_events(files[-1])[0] if files else []
    return per_product_us(events, [TRACE_CALLS * n for _, n in runs])


def time_case(din: int, dout: int, k: int, rows: int) -> tuple[float, float, Callable[[], object], int]:
    """Seconds per product, the relative error of one product against x @ dequantize(w) in float32, and the
    compiled chain as a call with its number of products (for ``device_us``)."""
    key = jax.random.key(din * 7 + dout + k)
    w = jax.random.normal(key, (din, dout), jnp.bfloat16) * jnp.bfloat16(0.02)
    q = jk.quantize_matrix(w, k)
    nbytes = din * dout * (k + 0.25) / 8
    # At least 16 products per timed call: with 4, the host's dispatch of the call (one buffer per leaf per
    # copy) outlasted a large product's GPU time, and the timing was the host's.
    copies = max(16, min(48, math.ceil(L2_DEFEAT_BYTES / nbytes)))
    qs = [jax.tree.map(lambda a: jnp.array(a, copy=True), q) for _ in range(copies)]
    x = jax.random.normal(jax.random.fold_in(key, 1), (rows, din), jnp.bfloat16)
    y = jk.matmul(x, q).astype(jnp.float32)
    ref = jnp.dot(x.astype(jnp.float32), q.dequantize(jnp.float32), precision="highest")
    err = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
    chain = _chain(lambda x, q: jk.matmul(x, q), **TIMING)
    seconds = chain(x, qs)
    return seconds, err, lambda: chain.run(x, qs), copies


def codec_mismatches(n: int = 1 << 20) -> int:
    """Leaves of quantize and of dequantize (K = 2..5, bf16 and f32) on the GPU that differ in any bit from
    the CPU handler's, on n random elements with a few zero blocks and huge / tiny magnitudes."""
    cpu = jax.devices("cpu")[0]
    rng = np.random.default_rng(1)
    x = rng.standard_normal(n).astype(np.float32) * np.exp2(rng.integers(-30, 30, n)).astype(np.float32)
    x[: 64 * 32] = 0.0
    bad = 0
    for dtype in (jnp.bfloat16, jnp.float32):
        xd = jnp.asarray(x).astype(dtype).reshape(-1, 1024)
        for k in (2, 3, 4, 5):
            on_gpu = jk.quantize(xd, k)
            on_cpu = jk.quantize(jax.device_put(xd, cpu), k)
            outs = [(on_gpu, on_cpu), (jk.dequantize(on_gpu, dtype), jk.dequantize(on_cpu, dtype))]
            for a, b in outs:
                for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
                    bad += not np.array_equal(
                        np.atleast_1d(np.asarray(la)).view(np.uint8),
                        np.atleast_1d(np.asarray(lb)).view(np.uint8),
                    )
    return bad


def time_codec() -> dict[str, float]:
    """Microseconds per call: copy, then quantize / dequantize per (dtype, K) at 2^28 elements, and bfloat16
    K = 4 quantize at 2^20 and 2^24."""
    n = 2**28
    x32 = jax.random.normal(jax.random.key(0), (n // 4096, 4096), jnp.float32)
    times = {
        "copy f32": timeit(jax.jit(lambda x: x + 1), x32, **TIMING),
        # A read-only ceiling (quantize is mostly reads).
        "sum f32": timeit(jax.jit(lambda x: jnp.sum(x, axis=0)), x32, **TIMING),
    }
    for dtype, ks in ((jnp.bfloat16, (2, 3, 4, 5)), (jnp.float32, (4,))):
        x = x32.astype(dtype)
        name = jnp.dtype(dtype).name
        for k in ks:
            qf = jax.jit(lambda x, k=k: jk.quantize(x, k, tensor_scale=1.0))
            q = qf(x)
            df = jax.jit(lambda q, dtype=dtype: jk.dequantize(q, dtype))
            times[f"quant {name} K{k}"] = timeit(qf, x, **TIMING)
            times[f"deq {name} K{k}"] = timeit(df, q, **TIMING)
            del q
        del x
    # Smaller arrays, where a launch's fixed costs (the code tables' build) weigh more.
    for log2n in (20, 24):
        x = x32.reshape(-1)[: 2**log2n].reshape(-1, 4096).astype(jnp.bfloat16)
        qf = jax.jit(lambda x: jk.quantize(x, 4, tensor_scale=1.0))
        times[f"quant bf16 K4 2^{log2n}"] = timeit(qf, x, **TIMING)
    return {c: t * 1e6 for c, t in times.items()}


TILED_SHAPES = ((8192, 28672), (28672, 8192), (8192, 8192))


def time_tiled() -> tuple[dict[str, float], int]:
    """Microseconds per dequantize of W (``[in, out]``, stored as W^T) from tile order (``t ...``) and from
    row order (``r ...``), K = 2..5 at 8192², K = 4 at the other shapes, bfloat16 and float32 output; and the
    number of cases whose two results differ in any bit."""
    times, mismatches = {}, 0
    for din, dout in TILED_SHAPES:
        w = jax.random.normal(jax.random.key(din + dout), (din, dout), jnp.float32)
        for k in (2, 3, 4, 5) if din == dout else (4,):
            tiled = jk.quantize_matrix(w, k, tiled=True)
            rows = tiled.with_tiles(False)
            for dtype in (jnp.bfloat16, jnp.float32):
                f = jax.jit(lambda q, dtype=dtype: q.dequantize(dtype))
                name = f"{din}x{dout} K{k} {jnp.dtype(dtype).name}"
                mismatches += int(not np.array_equal(np.asarray(f(tiled)), np.asarray(f(rows))))
                times[f"t {name}"] = timeit(f, tiled, **TIMING) * 1e6
                times[f"r {name}"] = timeit(f, rows, **TIMING) * 1e6
            del tiled, rows
    return times, mismatches


# The quantize kernels (not the dequantize ones, whose names contain theirs).
QUANTIZE_KERNEL = re.compile(r"(?<!de)quantize_(vec_)?kernel")
QUANTIZE_DEV_CASES = [(log2n, k) for log2n in (16, 20, 24, 28) for k in (4, 5)]


def quantize_device_us(calls: int = 5) -> dict[str, float]:
    """The quantize kernel's own microseconds per launch (bfloat16, explicit tensor scale; the median of
    ``calls`` launches per size, all under one profiler trace): at small sizes the kernel's fixed costs (the
    code tables' build), which per-call wall times cannot see under the host's dispatch. NaN without a GPU
    device plane in the trace."""
    jobs = []
    for log2n, k in QUANTIZE_DEV_CASES:
        x = jax.random.normal(jax.random.key(log2n), (2 ** (log2n - 8), 256), jnp.bfloat16)
        qf = jax.jit(lambda x, k=k: jk.quantize(x, k, tensor_scale=1.0))
        jax.block_until_ready(qf(x))
        jobs.append((f"quant bf16 K{k} 2^{log2n}", qf, x))
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir):
            for _, qf, x in jobs:
                for _ in range(calls):
                    jax.block_until_ready(qf(x))
        files = sorted(Path(log_dir).rglob("*.xplane.pb"))
        events = kernel_events(files[-1])[0] if files else []
    # One launch per call, in call order.
    times = [(end - start) / 1e3 for start, end, n in sorted(events) if QUANTIZE_KERNEL.search(n)]
    if len(times) != calls * len(jobs):
        return {name: math.nan for name, _, _ in jobs}
    return {
        name: statistics.median(times[i * calls : (i + 1) * calls]) for i, (name, _, _) in enumerate(jobs)
    }


def check_ok(check: dict) -> bool:
    """Whether a run's check record (see main) passed; runs without one pass."""
    return (
        check.get("max_rel_err", 0.0) <= MAX_REL_ERR
        and check.get("cpu_mismatches", 0) == 0
        and check.get("order_mismatches", 0) == 0
    )


def summarize(rows: list[dict], key: str = "us") -> str:
    """Median time per variant and case over the rounds in ``rows`` (ab_time.jsonl records; ``key``: "us"
    for the chains' wall time, "dev_us" for the kernels' own), with the ratio to the variant labelled
    ``base`` when there is one."""
    rows = [r for r in rows if key in r]
    by: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        for case, us in r[key].items():
            by.setdefault(r["label"], {}).setdefault(case, []).append(us)
    cases = list(dict.fromkeys(c for r in rows for c in r[key]))
    base = by.get("base", {})
    lines = [
        f"median {key} (ratio to base) over rounds: "
        + ", ".join(f"{v} {len(next(iter(t.values())))}" for v, t in by.items()),
        f"{'case':>16} " + " ".join(f"{v:>15}" for v in by),
    ]
    for c in cases:
        cells = []
        for times in by.values():
            if c not in times:
                cells.append("-")
                continue
            m = statistics.median(times[c])
            ratio = f" ({m / statistics.median(base[c]):.3f})" if c in base else ""
            cells.append(f"{m:7.2f}{ratio}")
        lines.append(f"{c:>16} " + " ".join(f"{x:>15}" for x in cells))
    wrong = sorted({r["label"] for r in rows if not check_ok(r.get("check", {}))})
    if wrong:
        lines.append("WRONG RESULTS (see the runs' check fields) in: " + ", ".join(wrong))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--summary", metavar="JSONL", help="print the medians of an ab_time.jsonl and exit")
    ap.add_argument("--label")
    ap.add_argument("--suite", choices=("gemv", "codec", "tiled"), default="gemv")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    if args.summary:
        with open(args.summary) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        print(summarize(rows))
        if any("dev_us" in r for r in rows):
            print(summarize(rows, "dev_us"))
        return
    if not args.label:
        ap.error("--label is required unless --summary is given")
    record: dict = {"label": args.label, "suite": args.suite, "rows": args.rows}
    if args.suite == "tiled":
        tiled_times, mismatches = time_tiled()
        check = {"order_mismatches": mismatches}
        times = {c: round(t, 2) for c, t in tiled_times.items()}
    elif args.suite == "codec":
        check = {"cpu_mismatches": codec_mismatches()}
        times = {c: round(t, 2) for c, t in time_codec().items()}
        try:
            dev_codec = quantize_device_us()
        except Exception as err:  # noqa: BLE001 - a failed trace must not cost the run's wall times
            print(f"no device times: the profiler trace failed: {err!r}", file=sys.stderr)
            dev_codec = {}
        if dev_codec and not all(math.isnan(d) for d in dev_codec.values()):
            record["dev_us"] = {c: round(d, 2) for c, d in dev_codec.items()}
    else:
        times, errs, runs = {}, {}, []
        for i, o, k in CASES:
            t, err, call, products = time_case(i, o, k, args.rows)
            times[f"{i}x{o} K{k}"] = round(t * 1e6, 2)
            errs[f"{i}x{o} K{k}"] = err
            runs.append((call, products))
        check = {"max_rel_err": max(errs.values())}
        try:
            dev = device_us(runs)
        except Exception as err:  # noqa: BLE001 - a failed trace must not cost the run's wall times
            print(f"no device times: the profiler trace failed: {err!r}", file=sys.stderr)
            dev = [math.nan]
        if not all(math.isnan(d) for d in dev):
            record["dev_us"] = {c: round(d, 2) for c, d in zip(times, dev)}
    verdict = "" if check_ok(check) else f"  WRONG RESULTS: {check}"
    print(
        f"{args.label:>8} {args.suite} " + " ".join(f"{n}={t}" for n, t in times.items()) + verdict,
        flush=True,
    )
    if "dev_us" in record:
        print(f"{'':>8} dev_us " + " ".join(f"{n}={t}" for n, t in record["dev_us"].items()), flush=True)
    with open(Path(args.out) / "ab_time.jsonl", "a") as f:
        record.update(us=times, check=check)
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
