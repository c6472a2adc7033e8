#!/usr/bin/env bash
# One call on the GPU machine: build and install with CUDA, GPU tests, benchmark, compute-sanitizer.
#   bash bench/gpu_check.sh          everything, plus the self-check, the CPU suite on this machine's jax and ncu
#   bash bench/gpu_check.sh quick    build, GPU tests, a shorter benchmark, sanitizers (fits a small budget)
# Logs and results go to $OUT (default bench/out), most important first in case the call is cut short.
set -uo pipefail
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
mode=${1:-full}
quick=""; [ "$mode" = quick ] && quick=1
status=0
{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"

CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90 -DKBIT_CUDA=ON" \
  python3 -m pip install -q --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build ok"
repo=$PWD
cd /tmp  # import the installed package, not the source tree
# bitsandbytes for the benchmark's peer, carried unpacked (its CUDA 13.0 library only) when present.
[ -d "$repo/.carry/bnb" ] && export PYTHONPATH="$repo/.carry/bnb${PYTHONPATH:+:$PYTHONPATH}"

python3 -m pytest -q -p no:cacheprovider -m gpu "$repo/tests" 2>&1 | tee "$OUT/gpu_tests.log" | tail -6 || status=1
python3 "$repo/bench/bench_matmul.py" --out "$OUT" ${quick:+--quick} 2>&1 | tee "$OUT/bench_matmul.log" | tail -60 || status=1
if [ "$mode" = quick ]; then
  python3 "$repo/bench/bench_gpu.py" --out "$OUT" --quick 2>&1 | tee "$OUT/bench.log" | tail -20 || status=1
else
  python3 "$repo/bench/bench_gpu.py" --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -20 || status=1
fi
for tool in memcheck racecheck; do
  compute-sanitizer --tool $tool --error-exitcode 3 python3 "$repo/bench/sanitize.py" >"$OUT/sanitize_$tool.log" 2>&1
  rc=$?
  echo "compute-sanitizer $tool: rc=$rc $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -1)"
  [ $rc -eq 0 ] || status=1
done
if [ "$mode" != quick ]; then
  python3 -P -m jax_kbit 2>&1 | tee "$OUT/selfcheck.log" | tail -12 || status=1
  python3 "$repo/bench/jnp_format.py" 2>&1 | tail -1 || status=1
  python3 -m pytest -q -p no:cacheprovider "$repo/tests" -m "not gpu" 2>&1 | tail -3 | tee "$OUT/cpu_suite.log" || status=1
  ncu --clock-control none --kernel-name regex:'quantize_kernel|dequantize' --launch-skip 1 --launch-count 2 \
    --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
    python3 "$repo/bench/profile_quantize.py" >"$OUT/ncu.txt" 2>&1
  echo "ncu: rc=$? ($(grep -c 'Duration' "$OUT/ncu.txt") kernels profiled)"
fi
exit $status
