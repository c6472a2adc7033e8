"""The standalone CUDA probes under bench/ (run by hand or by gpu_check.sh on the GPU machine) compile."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize(
    "probe, with_library",
    [("probe_codec_ceiling.cu", False), ("probe_gemv_access.cu", False), ("probe_gemv_fixed.cu", True)],
)
def test_probe_compiles_for_sm90(tmp_path, probe, with_library):
    flags = []
    if with_library:
        # probe_gemv_fixed.cu includes ffi/cuda_gemv.cu itself (launch_gemv, plan_gemv), so a change of the
        # library's batch-1 kernel that the probe no longer fits fails here rather than on the GPU machine.
        import jax.ffi

        flags = ["-std=c++17", "--fmad=false", "-I", str(BENCH.parent / "ffi"), "-I", jax.ffi.include_dir()]
    out = subprocess.run(
        ["nvcc", "-O3", "-arch=sm_90", *flags, "-c", str(BENCH / probe), "-o", str(tmp_path / "probe.o")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "probe.o").stat().st_size > 0
