#!/usr/bin/env bash
# bitsandbytes for the GPU benchmarks' peer (bench_gpu.py, bench_matmul.py): downloads its wheel here (the GPU
# machine has no network) and unpacks it into .carry/bnb with only the CUDA 13.0 library (the wheel's dozen
# libraries for other CUDA, ROCm and XPU versions would pass the 64 MiB a device call may carry). gpu_check.sh
# puts .carry/bnb on PYTHONPATH when it is there; name ".carry" in the call's carry list.
#   bash bench/fetch_bnb.sh [VERSION]      (default 0.50.2, the version of the figures in bench/RESULTS.md)
set -euo pipefail
ver=${1:-0.50.2}
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qx "/.carry/" .git/info/exclude 2>/dev/null || echo "/.carry/" >>.git/info/exclude
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  -d "$tmp" "bitsandbytes==$ver"
rm -rf .carry/bnb
mkdir -p .carry/bnb
python3 -m zipfile -e "$tmp"/bitsandbytes-*.whl .carry/bnb
find .carry/bnb/bitsandbytes -maxdepth 1 -name 'libbitsandbytes_*.so' ! -name 'libbitsandbytes_cuda130.so' -delete
echo "bitsandbytes $ver in .carry/bnb ($(du -sh .carry/bnb | cut -f1)); carry \".carry\" in the GPU call"
