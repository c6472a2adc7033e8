"""Where a decode step's time goes: GPU kernel time per token, by kind of kernel, against wall time.

Runs bench_decode's model (bf16 and K-bit weights), decodes ``--tokens`` tokens once to compile, then once
more under ``jax.profiler.trace`` and reads the device plane of the trace (CUPTI kernel records): per token,
the wall time of the call, the time at least one kernel was running (the union of kernel intervals), and the
kernel time summed per group (the k-bit matmul kernels, cuBLAS / cuDNN / Triton gemms, XLA fusions,
copies, the rest). Wall time well above the busy time means the step waits between kernels (launch gaps,
the loop's per-iteration sync), which no matmul kernel can win back.

    python bench/profile_decode.py [--tiny] [--tokens 16] [--k 4] [--top 12]

No GPU: the trace has no device plane; the script says so and prints the host planes it found.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode as bd  # noqa: E402

# Order matters: the first pattern that matches a kernel's name names its group.
GROUPS = (
    ("kbit matmul", re.compile(r"gemv_kernel|matmul_kernel|matmul_t_kernel|sum_splits")),
    ("kbit other", re.compile(r"kbit")),
    ("gemm (cuBLAS/cutlass/triton)", re.compile(r"gemm|cutlass|nvjet|sm90_xmma|triton|cublas", re.I)),
    ("copy / memset", re.compile(r"memcpy|memset|copy", re.I)),
    ("XLA fusion", re.compile(r"fusion|reduce|loop_|input_|wrapped_|convert|concatenate|transpose", re.I)),
)


def group_of(name: str) -> str:
    for label, pattern in GROUPS:
        if pattern.search(name):
            return label
    return "other"


def kernel_events(xspace_path: Path) -> tuple[list[tuple[int, int, str]], list[str]]:
    """(start_ns, end_ns, name) of every event on the GPU plane's stream lines, and all plane names."""
    data = jax.profiler.ProfileData.from_file(str(xspace_path))
    names = [plane.name for plane in data.planes]
    events: list[tuple[int, int, str]] = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU:"):
            continue
        names += [f"{plane.name} line {line.name!r}" for line in plane.lines]
        for line in plane.lines:
            # "Stream #N(...)" lines hold the kernels and copies; "XLA Ops" / "XLA Modules" summarise them.
            if not line.name.startswith("Stream"):
                continue
            for ev in line.events:
                events.append((int(ev.start_ns), int(ev.start_ns + ev.duration_ns), ev.name))
    return events, names


def busy_ns(events: list[tuple[int, int, str]]) -> int:
    """Length of the union of the intervals (kernels on several streams may overlap)."""
    total, end = 0, None
    for s, e, _ in sorted(events):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def profile_variant(name: str, params: Any, cfg: bd.Config, n: int, top: int) -> dict[str, Any]:
    prompt = np.random.default_rng(1).integers(0, cfg.vocab, 16, dtype=np.int32)
    padded = np.zeros((16 + n,), np.int32)
    padded[:16] = prompt
    logits, cache = bd.prefill(params, bd.init_cache(cfg), padded, cfg)
    first = np.int32(np.argmax(np.asarray(logits)[15]))
    run = partial(bd.generate, n=n, cfg=cfg)
    jax.block_until_ready(run(params, cache, first, np.int32(16)))  # compile and warm up
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir):
            t0 = time.perf_counter()
            jax.block_until_ready(run(params, cache, first, np.int32(16)))
            wall = time.perf_counter() - t0
        files = sorted(Path(log_dir).rglob("*.xplane.pb"))
        if not files:
            raise SystemExit("the profiler wrote no .xplane.pb file")
        events, planes = kernel_events(files[-1])
    result: dict[str, Any] = {"variant": name, "wall_us_per_token": 1e6 * wall / n, "kernels": len(events)}
    if not events:
        print(f"{name}: no kernels on a device plane of the trace (planes and lines: {', '.join(planes)})")
        return result
    per_group: dict[str, int] = defaultdict(int)
    per_name: dict[str, list[int]] = defaultdict(list)
    for s, e, kname in events:
        per_group[group_of(kname)] += e - s
        per_name[kname].append(e - s)
    span = max(e for _, e, _ in events) - min(s for s, _, _ in events)
    result.update(
        busy_us_per_token=busy_ns(events) / 1e3 / n,
        span_us_per_token=span / 1e3 / n,
        kernels_per_token=len(events) / n,
        groups_us_per_token={g: t / 1e3 / n for g, t in sorted(per_group.items(), key=lambda x: -x[1])},
    )
    print(
        f"{name}: wall {result['wall_us_per_token']:.1f} us/token (traced), first-to-last kernel "
        f"{result['span_us_per_token']:.1f}, GPU busy {result['busy_us_per_token']:.1f}, "
        f"{result['kernels_per_token']:.1f} kernels/token"
    )
    for g, t in result["groups_us_per_token"].items():
        print(f"    {g:<30} {t:8.1f} us/token")
    print(f"  top {top} kernels (us per token, calls per token, mean us):")
    for kname, ds in sorted(per_name.items(), key=lambda x: -sum(x[1]))[:top]:
        print(f"    {sum(ds) / 1e3 / n:8.1f} {len(ds) / n:6.1f} {np.mean(ds) / 1e3:8.2f}  {kname[:100]}")
    return result


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the 0.8M-parameter model (runs on a CPU)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--k", type=int, default=4, choices=(2, 3, 4, 5))
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    cfg = bd.TINY if args.tiny else bd.LLAMA_1B
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}; {args.tokens} tokens per call")
    params = bd.init_params(cfg, 0)
    rows = [profile_variant("bf16", params, cfg, args.tokens, args.top)]
    qparams = jax.jit(partial(bd.quantize_weights, k=args.k))(params)
    rows.append(profile_variant(f"K={args.k}", qparams, cfg, args.tokens, args.top))
    return rows


if __name__ == "__main__":
    main()
