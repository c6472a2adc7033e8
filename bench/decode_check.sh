#!/usr/bin/env bash
# One call on the GPU machine for the layers and end-to-end decoding: build (sm_90), the GPU tests of the
# Flax layers (batch-1 KbitLinear holds no dequantized weight) and bench/bench_decode.py (arguments are
# passed on to it, e.g. --ks 4 for a short run).
set -uo pipefail
OUT=$(realpath -m "${OUT:-bench/out}")
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/env.txt"
CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90 -DKBIT_CUDA=ON" \
  python3 -m pip install -q --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build ok"
repo=$PWD
cd /tmp
python3 -m pytest -q -p no:cacheprovider -m gpu "$repo/tests/test_flax.py" 2>&1 | tee "$OUT/layers_tests.log" | tail -8 || status=1
python3 "$repo/bench/bench_decode.py" --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_decode.log" | tail -30 || status=1
exit $status
