"""The batch-1 kernel's weight loads stay hidden behind arithmetic, as compiled (nvcc and cuobjdump, no GPU).

Every global load of a warp signals one scoreboard, and a wait on it lasts until all of them have landed
(ffi/cuda_gemv.cu, gemv_item). The ring therefore works only if each half's loads are issued after the
first use of the previous half's words: a compiler that moved that use below the loads would make every
step wait for loads it had just issued (bench/RESULTS.md, seventeenth session: 8-10 % of the kernel's time).
The kernel variants prepared for later GPU sessions (bench/variants/*.patch) are compiled here too.
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


def _tools(ss):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    try:
        ss.find_cuobjdump()
    except SystemExit:
        pytest.skip("cuobjdump is not on PATH")
    return nvcc, pytest.importorskip("jax.ffi")


def _cubin(nvcc, jax_ffi, ffi_dir: Path, source: str, arch: str, out: Path) -> Path:
    """ffi_dir/source compiled for sm_arch with the flags of CMakeLists.txt's CUDA build."""
    subprocess.run(
        [nvcc, "-std=c++17", "-O3", "--fmad=false", "-prec-div=true", "-ftz=false", f"-arch=sm_{arch}",
         "-diag-suppress=940,2473", f"-I{ffi_dir}", f"-I{jax_ffi.include_dir()}", "-cubin",
         str(ffi_dir / source), "-o", str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    return out


def _check_batch1_schedule(ss, cubin: Path, count: int | None) -> None:
    """Every batch-1 kernel of ``cubin`` (``count`` of them, where given) keeps the register ring's order."""
    control = ss.parse_control(ss.sass_text(str(cubin)))
    kernels = {name: body for name, body in control.items() if "gemv_kernel" in name}
    assert kernels and (count is None or len(kernels) == count), sorted(kernels)
    for name, body in kernels.items():
        loops = ss.stream_loops(body)
        assert len(loops) == 1, (name, loops)
        (loop,) = loops
        # one wait per half of the ring, each right before that half's loads of the other half
        assert loop.count("W") == 2 and loop.count("H") >= 2, (name, loop)
        assert ss.stream_order_gaps(loop) == 0, (name, loop)


@pytest.mark.parametrize("arch", ["90", "80"])  # CMakeLists.txt's default architectures
def test_batch1_kernels_wait_only_for_loads_issued_half_a_ring_earlier(ss, tmp_path, arch):
    nvcc, jax_ffi = _tools(ss)
    # bf16 / f16 x (K = 2, 3, 4) x (any order, or tile order with its fixed walk: at K = 4 pair words) x one
    # or two rows x e4m4 or not x in-CTA or not
    _check_batch1_schedule(
        ss, _cubin(nvcc, jax_ffi, ROOT / "ffi", "cuda_gemv.cu", arch, tmp_path / "g.cubin"), 96
    )


# The prepared variants that change CUDA sources (bench/variants/; the others change Python or scripts).
PREPARED = sorted(
    p
    for p in (ROOT / "bench" / "variants").glob("*.patch")
    if any(line.startswith("+++ b/ffi/") and line.endswith(".cu") for line in p.read_text().splitlines())
)


@pytest.mark.parametrize("patch", PREPARED, ids=[p.stem for p in PREPARED])
def test_prepared_variants_compile(ss, tmp_path, patch):
    """A kernel variant kept for a later GPU session (bench/variants/) still compiles on today's tree (sm_90),
    and a batch-1 kernel variant keeps the register ring's schedule, so that device time is not spent on one
    that cannot build or that carries the known slowdown."""
    nvcc, jax_ffi = _tools(ss)
    if shutil.which("git") is None:
        pytest.skip("needs git apply")
    touched = subprocess.run(
        ["git", "apply", "--numstat", str(patch)], check=True, capture_output=True, text=True
    ).stdout.split()[2::3]
    sources = [Path(t).name for t in touched if t.startswith("ffi/") and t.endswith(".cu")]
    assert sources, patch.name
    shutil.copytree(ROOT / "ffi", tmp_path / "ffi")  # (a patch's other files are not needed to compile)
    subprocess.run(
        ["git", "apply", "--include=ffi/*", str(patch)], cwd=tmp_path, check=True, capture_output=True
    )
    for source in sources:
        cubin = _cubin(nvcc, jax_ffi, tmp_path / "ffi", source, "90", tmp_path / f"{source}.cubin")
        if source == "cuda_gemv.cu":
            _check_batch1_schedule(ss, cubin, None)  # a variant may add kernels
