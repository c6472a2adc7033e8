"""Sharded quantize / dequantize / matmul over every GPU of one host, against one GPU, in one run.

For a 2^30-element bfloat16 array (rows of 4096) sharded along its rows over all N devices, it times
``jit(quantize)`` (explicit tensor scale, and ``"auto"``, whose global absmax is the one scalar all-reduce) and
``jit(dequantize)`` for K = 2..5, and the same calls on one device for the whole array and for one shard
(2^30 / N elements). Scaling efficiency = t(1 device, whole array) / (N * t(N devices, whole array)): 100 %
means each device runs as fast as a lone one. It also times ``jax_kbit.matmul`` at batch 1 with the weight
sharded along ``out`` (tensor-parallel decode). Every sharded function's compiled HLO is searched for
communication: anything but an all-reduce of one scalar is reported (and fails the run).

Usage: ``python bench/bench_sharded.py [--out DIR] [--log2n 30] [--ks 2,3,4,5] [--matmul 8192x28672,...]``;
prints a table and writes ``bench_sharded.json``. It runs on any device count (a check of the script:
``XLA_FLAGS=--xla_force_host_platform_device_count=2 python bench/bench_sharded.py --log2n 20 --ks 4
--matmul 512x1024`` on a CPU).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_kbit as jk
from jax_kbit.sharding import quantized_sharding

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import timeit  # noqa: E402

ROW = 4096
_COLLECTIVE = re.compile(
    r"=\s*(.*?)\s(all-gather|all-to-all|collective-permute|reduce-scatter|all-reduce)(-start)?\("
)


def communication(hlo: str) -> list[str]:
    """Collectives in compiled HLO, as 'op shapes' strings."""
    found = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if m:
            found.append(f"{m.group(2)} {m.group(1).strip()}")
    return found


def only_scalars(found: list[str]) -> bool:
    """True when every collective is an all-reduce of scalars (f32[] and tuples of them)."""
    for c in found:
        op, shapes = c.split(" ", 1)
        dims = re.findall(r"\w+\[([\d,]*)\]", shapes)
        if op != "all-reduce" or any(d.strip() for d in dims):
            return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--log2n", type=int, default=30)
    ap.add_argument("--ks", default="2,3,4,5")
    ap.add_argument(
        "--matmul", default="8192x28672,28672x8192", help="weight shapes in x out, comma-separated"
    )
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    devs = jax.devices()
    n_dev = len(devs)
    n = 1 << args.log2n
    rows = n // ROW
    if rows % n_dev:
        raise SystemExit(f"{rows} rows do not split over {n_dev} devices")
    mesh = Mesh(np.asarray(devs), ("d",))
    row_sharded = NamedSharding(mesh, P("d", None))
    print(
        f"devices: {n_dev} x {devs[0].device_kind}; jax {jax.__version__}; 2^{args.log2n} bfloat16 elements"
    )

    key = jax.random.key(0)
    make = jax.jit(lambda key: jax.random.normal(key, (rows, ROW), jnp.bfloat16), out_shardings=row_sharded)
    x_all = make(key)
    x_one = jax.device_put(x_all, devs[0])
    x_shard = x_one[: rows // n_dev]
    jax.block_until_ready((x_all, x_one, x_shard))

    results = []
    failures = []
    print(
        f"{'op':<16} {'K':>2} {'1 dev, all ms':>13} {'1 dev, shard ms':>15} {f'{n_dev} dev ms':>9} "
        f"{'per-dev GB/s':>12} {'1-dev GB/s':>10} {'scaling %':>9} {'vs shard %':>10}  communication"
    )
    for k in ks:
        ops = {
            "quantize t=1": lambda x, k=k: jk.quantize(x, k, tensor_scale=1.0),
            "quantize auto": lambda x, k=k: jk.quantize(x, k),
        }
        q_ref = jax.jit(ops["quantize t=1"])(x_one)
        nbytes_q = q_ref.packed.size * 4 + q_ref.scales.size
        for name, fn in ops.items():
            f = jax.jit(fn)
            _measure(name, k, f, (x_one,), (x_shard,), (x_all,), n * 2 + nbytes_q, n_dev, results, failures)
        q_one = q_ref
        q_shard = jax.jit(ops["quantize t=1"])(x_shard)
        q_all = jax.device_put(q_ref, quantized_sharding(row_sharded, q_ref))
        _measure(
            "dequantize",
            k,
            jax.jit(jk.dequantize),
            (q_one,),
            (q_shard,),
            (q_all,),
            n * 2 + nbytes_q,
            n_dev,
            results,
            failures,
        )
        del q_one, q_shard, q_all, q_ref

    # Tensor-parallel decode: x [1, in] replicated, W [in, out] sharded along out.
    for din, dout in (tuple(int(v) for v in shape.split("x")) for shape in args.matmul.split(",")):
        w = jax.random.normal(jax.random.fold_in(key, din), (din, dout), jnp.bfloat16) * jnp.bfloat16(0.02)
        qw = jax.jit(lambda w: jk.quantize_matrix(w, 4))(jax.device_put(w, devs[0]))
        del w
        out_sharded = quantized_sharding(NamedSharding(mesh, P(None, "d")), qw)  # W [in, out]: along out
        qw_all = jax.device_put(qw, out_sharded)
        x1 = jax.random.normal(jax.random.fold_in(key, 7), (1, din), jnp.bfloat16)
        shard_out = dout // n_dev
        qw_shard = jk.QuantizedMatrix(
            jk.QuantizedArray(
                qw.t.packed[:shard_out],
                qw.t.scales[:shard_out],
                qw.t.codebook,
                qw.t.tensor_scale,
                k=4,
                d=din,
                dtype=qw.t.dtype,
                scale_format=qw.t.scale_format,
            )
        )
        f = jax.jit(jk.matmul)
        _measure(
            f"matmul {din}x{dout}",
            4,
            f,
            (x1, qw),
            (x1, qw_shard),
            (jax.device_put(x1, NamedSharding(mesh, P())), qw_all),
            qw.nbytes,
            n_dev,
            results,
            failures,
        )
        del qw, qw_all, qw_shard

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_sharded.json").write_text(
        json.dumps(
            {"devices": n_dev, "device_kind": devs[0].device_kind, "log2n": args.log2n, "rows": results},
            indent=1,
        )
    )
    print(f"wrote {out / 'bench_sharded.json'}")
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


def _measure(name, k, f, one_args, shard_args, all_args, nbytes, n_dev, results, failures) -> None:
    t_one = timeit(f, *one_args)
    t_shard = timeit(f, *shard_args)
    t_all = timeit(f, *all_args)
    comm = communication(f.lower(*all_args).compile().as_text())
    ok = only_scalars(comm)
    if not ok:
        failures.append(f"{name} K={k}: communicates {comm}")
    row = {
        "op": name,
        "k": k,
        "one_device_all_s": t_one,
        "one_device_shard_s": t_shard,
        "all_devices_s": t_all,
        "bytes": nbytes,
        "per_device_GBps": nbytes / n_dev / t_all / 1e9,
        "one_device_GBps": nbytes / t_one / 1e9,
        "scaling_efficiency": t_one / (n_dev * t_all),
        "vs_one_shard": t_shard / t_all,
        "communication": comm,
    }
    results.append(row)
    print(
        f"{name:<16} {k:>2} {t_one * 1e3:>13.3f} {t_shard * 1e3:>15.3f} {t_all * 1e3:>9.3f} "
        f"{row['per_device_GBps']:>12.0f} {row['one_device_GBps']:>10.0f} {100 * row['scaling_efficiency']:>9.1f} "
        f"{100 * row['vs_one_shard']:>10.1f}  {'; '.join(comm) if comm else 'none'}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
