#!/usr/bin/env bash
# One call on the GPU machine for the fused matmul alone: build (sm_90), its GPU tests, its benchmark.
# (bench/gpu_check.sh runs these too, with everything else.)
set -uo pipefail
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/env.txt"
CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90 -DKBIT_CUDA=ON" \
  python3 -m pip install -q --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build ok"
repo=$PWD
cd /tmp
[ -d "$repo/.carry/bnb" ] && export PYTHONPATH="$repo/.carry/bnb${PYTHONPATH:+:$PYTHONPATH}"
python3 -m pytest -q -p no:cacheprovider -m gpu "$repo/tests/test_matmul.py" 2>&1 | tee "$OUT/matmul_tests.log" | tail -8 || status=1
python3 "$repo/bench/bench_matmul.py" --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_matmul.log" | tail -60 || status=1
exit $status
