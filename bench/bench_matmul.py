"""GPU benchmark of ``jax_kbit.matmul`` against bf16 matrix products measured in the same run.

For each weight shape ``[in, out]`` and row count M: ``x @ W`` with W stored k-bit (``jax_kbit.matmul``), XLA's
bf16 ``dot``, torch's bf16 ``matmul`` (cuBLAS) when torch sees the GPU, bitsandbytes NF4 ``matmul_4bit``
(its gemv at M = 1) when importable, and ``dequantize`` + bf16 ``dot`` of a row-order matrix (what a user writes
without the fused kernel, with the storage that suits it). W is stored as ``quantize_matrix`` stores it (tiled
where the shape allows); ``jax_kbit.matmul`` of the same codes in row order (``tiled=False``) is timed beside
it, so the two storage orders are compared within the run. For M <= 32 also the fused transposed product ``g @ W.T`` (the backward pass for x; off by default, see
``jax_kbit.matmul.cuda_fused_transposed``). Every JAX timing runs ``COPIES`` products over distinct weights inside one ``jit`` so that no weight
stays in the 50 MB L2 and dispatch is amortised; times are per product. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

import jax_kbit as jk

_MM = importlib.import_module("jax_kbit.matmul")  # the attribute jax_kbit.matmul is the function

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import timeit  # noqa: E402

COPIES = 6
SHAPES = [(4096, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]


def _weights(key, din, dout):
    return [
        jax.random.normal(jax.random.fold_in(key, i), (din, dout), jnp.bfloat16) * jnp.bfloat16(0.02)
        for i in range(COPIES)
    ]


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


def _torch_times(din, dout, rows, bnb_too: bool):
    try:
        import torch

        if not torch.cuda.is_available():
            return {}
    except Exception:  # noqa: BLE001 - torch missing or broken: no peer
        return {}
    out = {}
    ws = [torch.randn(dout, din, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]

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
            samples.append(start.elapsed_time(stop) / 1e3 / (4 * COPIES))
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--quick", action="store_true", help="K = 4 only for the large shapes")
    ap.add_argument("--rows", default="1,16,64,256")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}; jax {jax.__version__}")
    key = jax.random.key(0)
    results = []
    header = (
        f"{'shape':>12} {'M':>4} {'K':>2} {'kbit us':>9} {'rows us':>8} {'xla bf16':>9} {'torch bf16':>10} "
        f"{'bnb nf4':>8} {'deq+dot':>8} {'x best bf16':>11} {'GB/s':>6} {'fused g@W.T':>11}"
    )
    print(header)
    for din, dout in SHAPES:
        ws = _weights(key, din, dout)
        peers = _torch_times(din, dout, rows, bnb_too=True)
        xla = {}
        for m in rows:
            x = jax.random.normal(jax.random.fold_in(key, 1000 + m), (m, din), jnp.bfloat16)
            xla[m] = _chain(lambda x, w: jnp.dot(x, w))(x, ws)
        ks = (2, 3, 4, 5) if not args.quick or (din, dout) == (8192, 8192) else (4,)
        for k in ks:
            qs = [jk.quantize_matrix(w, k) for w in ws]
            rows_order = [q.with_tiles(False) for q in qs]  # the same codes in row order
            jax.block_until_ready((qs, rows_order))
            for m in rows:
                x = jax.random.normal(jax.random.fold_in(key, 1000 + m), (m, din), jnp.bfloat16)
                t_k = _chain(lambda x, q: jk.matmul(x, q))(x, qs)
                t_rows = _chain(lambda x, q: jk.matmul(x, q))(x, rows_order) if qs[0].tiled else t_k
                t_grad = None
                if m <= 32:  # the fused transposed kernel (off by default) against deq + dot
                    _MM.cuda_fused_transposed = True
                    g = jax.random.normal(jax.random.fold_in(key, 2000 + m), (m, dout), jnp.bfloat16)
                    t_grad = _chain(lambda g, q: jk.matmul(g, q, transpose=True))(g, qs)
                    _MM.cuda_fused_transposed = False
                t_dd = _chain(lambda x, q: jnp.dot(x, q.dequantize(jnp.bfloat16)))(x, rows_order)
                t_torch = peers.get(("torch_bf16", m))
                t_bnb = peers.get(("bnb_nf4", m))
                best = min(t for t in (xla[m], t_torch) if t is not None)
                wbytes = qs[0].nbytes
                row = {
                    "in": din,
                    "out": dout,
                    "m": m,
                    "k": k,
                    "kbit_s": t_k,
                    "tiled": bool(qs[0].tiled),
                    "kbit_rows_s": t_rows,
                    "kbit_fused_transposed_s": t_grad,
                    "xla_bf16_s": xla[m],
                    "torch_bf16_s": t_torch,
                    "bnb_nf4_s": t_bnb,
                    "dequant_dot_s": t_dd,
                    "speedup_vs_best_bf16": best / t_k,
                    "weight_bytes": wbytes,
                    "weight_GBps": wbytes / t_k / 1e9,
                }
                results.append(row)

                def us(t):
                    return f"{t * 1e6:.1f}" if t is not None else "-"

                print(
                    f"{din:>5}x{dout:<6} {m:>4} {k:>2} {us(t_k):>9} {us(t_rows):>8} {us(xla[m]):>9} {us(t_torch):>10} "
                    f"{us(t_bnb):>8} {us(t_dd):>8} {best / t_k:>10.2f}x {wbytes / t_k / 1e9:>6.0f} "
                    f"{us(t_grad):>11}",
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
