"""The batch-1 kernel's weight loads stay hidden behind arithmetic, as compiled (nvcc and cuobjdump, no GPU).

Every global load of a warp signals one scoreboard, and a wait on it lasts until all of them have landed
(ffi/cuda_gemv.cu, gemv_item). The ring therefore works only if each half's loads are issued after the
first use of the previous half's words: a compiler that moved that use below the loads would make every
step wait for loads it had just issued (bench/RESULTS.md, seventeenth session: 8-10 % of the kernel's time).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import load_bench_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ss():
    return load_bench_script("sass_stats")


def test_stream_order_gaps_count_loads_waited_for_before_any_mma(ss):
    assert ss.stream_order_gaps("WLLLLHHWLLLLHH") == 0  # each half's loads hidden by the other half's mmas
    assert ss.stream_order_gaps("WLLLLWHHWLLLLHH") == 1  # a wait right after the first half's loads
    assert ss.stream_order_gaps("WHLLHLLHLLHLL") == 1  # the last loads meet the next trip's first wait
    assert ss.stream_order_gaps("WLLHH") == 0 and ss.stream_order_gaps("LLW") == 0  # no mma: not a loop


@pytest.mark.parametrize("arch", ["90", "80"])  # CMakeLists.txt's default architectures
def test_batch1_kernels_wait_only_for_loads_issued_half_a_ring_earlier(ss, tmp_path, arch):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    try:
        ss.find_cuobjdump()
    except SystemExit:
        pytest.skip("cuobjdump is not on PATH")
    jax_ffi = pytest.importorskip("jax.ffi")
    cubin = tmp_path / "gemv.cubin"
    # The flags of CMakeLists.txt's CUDA build.
    subprocess.run(
        [nvcc, "-std=c++17", "-O3", "--fmad=false", "-prec-div=true", "-ftz=false", f"-arch=sm_{arch}",
         "-diag-suppress=940,2473", f"-I{ROOT / 'ffi'}", f"-I{jax_ffi.include_dir()}", "-cubin",
         str(ROOT / "ffi" / "cuda_gemv.cu"), "-o", str(cubin)],
        check=True, capture_output=True,
    )  # fmt: skip
    text = subprocess.run(
        [ss.find_cuobjdump(), "-sass", str(cubin)], check=True, capture_output=True, text=True
    ).stdout
    kernels = {name: body for name, body in ss.parse_control(text).items() if "gemv_kernel" in name}
    assert len(kernels) == 48  # bf16 / f16 x K = 2, 3, 4 x one or two rows x e4m4 or not x in-CTA or not
    for name, body in kernels.items():
        loops = ss.stream_loops(body)
        assert len(loops) == 1, (name, loops)
        (loop,) = loops
        # one wait per half of the ring, each right before that half's loads of the other half
        assert loop.count("W") == 2 and loop.count("H") >= 2, (name, loop)
        assert ss.stream_order_gaps(loop) == 0, (name, loop)
