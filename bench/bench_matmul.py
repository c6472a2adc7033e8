"""GPU benchmark of ``jax_kbit.matmul`` against bf16 matrix products measured in the same run.

For each weight shape ``[in, out]`` and row count M: ``x @ W`` with W stored k-bit (``jax_kbit.matmul``), XLA's
bf16 ``dot``, torch's bf16 ``matmul`` (cuBLAS) when torch sees the GPU, bitsandbytes NF4 ``matmul_4bit``
(its gemv at M = 1) when importable, and ``dequantize`` + bf16 ``dot`` of a row-order matrix (what a user writes
without the fused kernel, with the storage that suits it). W is stored as ``quantize_matrix`` stores it (tiled
where the shape allows); ``jax_kbit.matmul`` of the same codes in row order (``tiled=False``) is timed beside
it, so the two storage orders are compared within the run. For M <= 32 also the fused transposed product ``g @ W.T`` (the backward pass for x; off by default, see
``jax_kbit.matmul.cuda_fused_transposed``). Every JAX timing runs one product per distinct weight copy inside one
``jit`` (``copies_for``: at least 16, and enough that no weight stays in the 50 MB L2); times are per product.

Two times per JAX peer: the wall time per product of back-to-back calls (``timeit``), and on a GPU the device
time per product (``dev``: the union of the call's kernel intervals in a ``jax.profiler`` trace, divided by
its products; launch gaps and the host excluded). They differ where the host's dispatch of a call (a few µs
per argument buffer; a k-bit weight is 4 buffers, a bf16 one 1) outlasts the GPU work of small products:
the twentieth session's 4096² batch-1 figure, 19.1 µs of wall time for 6.9 µs of kernel time, looked like
that. Both ratios to the bf16 peers are printed. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp

import jax_kbit as jk

_MM = importlib.import_module("jax_kbit.matmul")  # the attribute jax_kbit.matmul is the function

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import timeit  # noqa: E402
from profile_decode import busy_ns, kernel_events  # noqa: E402

SHAPES = [(4096, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]
L2_DEFEAT_BYTES = 120 << 20  # the copies of the smallest (K = 2) weight of a shape together
MIN_COPIES, MAX_COPIES = 16, 48
TRACE_CALLS = 3  # calls of each chain in the trace that gives the device times
# Between two chains in one trace the host sleeps this long, so that their kernels fall into separate groups
# (the kernels of one chain's calls are queued back to back: their gaps are microseconds).
TRACE_PAUSE_S = 0.05


def copies_for(din: int, dout: int) -> int:
    """Distinct weight copies per timed call: enough that the K = 2 copies pass 120 MB (no weight is still in
    L2 when its turn comes again) and at least 16, so that a call's GPU work outlasts its dispatch."""
    kbit_bytes = din * dout * 2.25 / 8
    return max(MIN_COPIES, min(MAX_COPIES, math.ceil(L2_DEFEAT_BYTES / kbit_bytes)))


def _weights(key, din, dout, copies):
    return [
        jax.random.normal(jax.random.fold_in(key, i), (din, dout), jnp.bfloat16) * jnp.bfloat16(0.02)
        for i in range(copies)
    ]


def split_groups(events: list[tuple[int, int, str]], groups: int, min_gap_ns: int) -> list[list] | None:
    """The trace's kernel events (start_ns, end_ns, name) in start order, split wherever the GPU idled for at
    least ``min_gap_ns``; None unless that gives exactly ``groups`` groups."""
    out: list[list] = []
    end = None
    for ev in sorted(events):
        if end is None or ev[0] - end >= min_gap_ns:
            out.append([])
        out[-1].append(ev)
        end = ev[1] if end is None else max(end, ev[1])
    return out if len(out) == groups else None


def device_times(chains: dict[str, tuple[Callable[[], object], int]]) -> dict[str, float]:
    """Seconds of GPU work per product for each named (call, products per call): TRACE_CALLS calls of each
    under one profiler trace, a pause between chains. Empty without a GPU plane in the trace, or when the
    kernels do not split into one group per chain (then it says so)."""
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir):
            for call, _ in chains.values():
                time.sleep(TRACE_PAUSE_S)
                for _ in range(TRACE_CALLS):
                    out = call()
                jax.block_until_ready(out)
            time.sleep(TRACE_PAUSE_S)
        files = sorted(Path(log_dir).rglob("*.xplane.pb"))
        events = kernel_events(files[-1])[0] if files else []
    if not events:
        return {}
    groups = split_groups(events, len(chains), int(TRACE_PAUSE_S * 1e9 / 2))
    if groups is None:
        print(
            f"device times skipped: the trace's kernels did not split into {len(chains)} chains",
            file=sys.stderr,
        )
        return {}
    return {
        name: busy_ns(group) / 1e9 / (TRACE_CALLS * products)
        for (name, (_, products)), group in zip(chains.items(), groups)
    }


def _chain(product, **timeit_kw):
    """One jit over all copies: sum of the products (the sum is M x out, negligible). ``timeit_kw`` go to
    ``timeit``."""

    @jax.jit
    def run(x, ws):
        acc = product(x, ws[0]).astype(jnp.float32)
        for w in ws[1:]:
            acc = acc + product(x, w).astype(jnp.float32)
        return acc

    def timed(x, ws):
        return timeit(run, x, ws, **timeit_kw) / len(ws)

    timed.run = run  # the jitted chain itself (bench/ab_time.py traces it)
    return timed


def _torch_times(din, dout, rows, copies: int, bnb_too: bool):
    try:
        import torch

        if not torch.cuda.is_available():
            return {}
    except Exception:  # noqa: BLE001 - torch missing or broken: no peer
        return {}
    out = {}
    ws = [torch.randn(dout, din, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]

    def time_torch(fn) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(5):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(4):
                fn()
            stop.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(stop) / 1e3 / (4 * copies))
        return statistics.median(samples)

    for m in rows:
        x = torch.randn(m, din, device="cuda", dtype=torch.bfloat16)
        out[("torch_bf16", m)] = time_torch(lambda x=x, ws=ws: [torch.nn.functional.linear(x, w) for w in ws])
    if bnb_too:
        try:
            import bitsandbytes as bnb
            import bitsandbytes.functional as bnbf

            qs = [bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4") for w in ws]
            for m in rows:
                x = torch.randn(m, din, device="cuda", dtype=torch.bfloat16)
                out[("bnb_nf4", m)] = time_torch(
                    lambda x=x, qs=qs: [bnb.matmul_4bit(x, q.t(), quant_state=s) for q, s in qs]
                )
        except Exception as err:  # noqa: BLE001 - report and go on without the peer
            print(f"bitsandbytes peer unavailable: {type(err).__name__}: {err}", file=sys.stderr)
    ws.clear()
    torch.cuda.empty_cache()
    return out


def _measure(product, x, ws) -> tuple[float, tuple[Callable[[], object], int]]:
    """Wall seconds per product of ``product`` chained over ``ws``, and the chain as a call with its number of
    products (for ``device_times``)."""
    chain = _chain(product)
    return chain(x, ws), (partial(chain.run, x, ws), len(ws))


def _shape(text: str) -> tuple[int, int]:
    din, dout = text.lower().split("x")
    return int(din), int(dout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--quick", action="store_true", help="K = 4 only for the large shapes")
    ap.add_argument("--rows", default="1,16,64,256")
    ap.add_argument(
        "--shapes",
        default=",".join(f"{a}x{b}" for a, b in SHAPES),
        help="weight shapes IN x OUT, comma-separated",
    )
    ap.add_argument("--no-device-times", action="store_true", help="wall times only (no profiler traces)")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    shapes = [_shape(t) for t in args.shapes.split(",")]
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}; jax {jax.__version__}")
    key = jax.random.key(0)
    results = []
    header = (
        f"{'shape':>12} {'M':>4} {'K':>2} {'kbit us':>8} {'rows us':>8} {'xla bf16':>8} {'torch bf16':>10} "
        f"{'bnb nf4':>7} {'deq+dot':>8} {'x best bf16':>11} {'kbit dev':>8} {'xla dev':>7} {'x xla dev':>9} "
        f"{'GB/s':>5} {'fused g@W.T':>11}"
    )
    print(header)
    for din, dout in shapes:
        copies = copies_for(din, dout)
        ws = _weights(key, din, dout, copies)
        peers = _torch_times(din, dout, rows, copies, bnb_too=True)
        xla, xla_chain = {}, {}
        for m in rows:
            x = jax.random.normal(jax.random.fold_in(key, 1000 + m), (m, din), jnp.bfloat16)
            xla[m], xla_chain[m] = _measure(jnp.dot, x, ws)
        ks = (2, 3, 4, 5) if not args.quick or (din, dout) == (8192, 8192) else (4,)
        for k in ks:
            qs = [jk.quantize_matrix(w, k) for w in ws]
            rows_order = [q.with_tiles(False) for q in qs]  # the same codes in row order
            jax.block_until_ready((qs, rows_order))
            for m in rows:
                x = jax.random.normal(jax.random.fold_in(key, 1000 + m), (m, din), jnp.bfloat16)
                chains = {"xla_bf16": xla_chain[m]}
                t_k, chains["kbit"] = _measure(jk.matmul, x, qs)
                if qs[0].tiled:
                    t_rows, chains["kbit_rows"] = _measure(jk.matmul, x, rows_order)
                else:
                    t_rows = t_k
                t_grad = None
                if m <= 32:  # the fused transposed kernel (off by default) against deq + dot
                    _MM.cuda_fused_transposed = True
                    g = jax.random.normal(jax.random.fold_in(key, 2000 + m), (m, dout), jnp.bfloat16)
                    t_grad = _chain(lambda g, q: jk.matmul(g, q, transpose=True))(g, qs)
                    _MM.cuda_fused_transposed = False
                t_dd, chains["dequant_dot"] = _measure(
                    lambda x, q: jnp.dot(x, q.dequantize(jnp.bfloat16)), x, rows_order
                )
                dev_s = {} if args.no_device_times else device_times(chains)
                t_torch = peers.get(("torch_bf16", m))
                t_bnb = peers.get(("bnb_nf4", m))
                best = min(t for t in (xla[m], t_torch) if t is not None)
                wbytes = qs[0].nbytes
                dev_ratio = dev_s["xla_bf16"] / dev_s["kbit"] if "kbit" in dev_s else None
                row = {
                    "in": din,
                    "out": dout,
                    "m": m,
                    "k": k,
                    "copies": copies,
                    "kbit_s": t_k,
                    "tiled": bool(qs[0].tiled),
                    "kbit_rows_s": t_rows,
                    "kbit_fused_transposed_s": t_grad,
                    "xla_bf16_s": xla[m],
                    "torch_bf16_s": t_torch,
                    "bnb_nf4_s": t_bnb,
                    "dequant_dot_s": t_dd,
                    "speedup_vs_best_bf16": best / t_k,
                    # GPU work per product from a profiler trace (None without a GPU): no host, no gaps.
                    "kbit_dev_s": dev_s.get("kbit"),
                    "kbit_rows_dev_s": dev_s.get("kbit_rows"),
                    "xla_bf16_dev_s": dev_s.get("xla_bf16"),
                    "dequant_dot_dev_s": dev_s.get("dequant_dot"),
                    "dev_speedup_vs_xla_bf16": dev_ratio,
                    "weight_bytes": wbytes,
                    "weight_GBps": wbytes / t_k / 1e9,
                }
                results.append(row)

                def us(t):
                    return f"{t * 1e6:.1f}" if t is not None else "-"

                ratio = f"{dev_ratio:.2f}x" if dev_ratio is not None else "-"
                print(
                    f"{din:>5}x{dout:<6} {m:>4} {k:>2} {us(t_k):>8} {us(t_rows):>8} {us(xla[m]):>8} {us(t_torch):>10} "
                    f"{us(t_bnb):>7} {us(t_dd):>8} {best / t_k:>10.2f}x {us(dev_s.get('kbit')):>8} "
                    f"{us(dev_s.get('xla_bf16')):>7} {ratio:>9} {wbytes / t_k / 1e9:>5.0f} {us(t_grad):>11}",
                    flush=True,
                )
            del qs, rows_order
        del ws
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_matmul.json").write_text(json.dumps({"device": dev.device_kind, "rows": results}, indent=1))
    print(f"wrote {out / 'bench_matmul.json'}")


if __name__ == "__main__":
    main()
