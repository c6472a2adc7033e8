#!/usr/bin/env bash
# one-off call script (untracked)
set -u
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
(time nvcc -O3 -arch=sm_90 -o /tmp/probe_access bench/probe_gemv_access.cu && /tmp/probe_access) > $OUT/probe.txt 2>&1
cat $OUT/probe.txt
KBIT_COMMIT=$(cat .kbit_commit) AB_SUITE=gemv ROUNDS=1 AB_DECODE=1 bash bench/ab_variants.sh base ring2 tiled > $OUT/ab.txt 2>&1
cat $OUT/ab.txt | tail -60
