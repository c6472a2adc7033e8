#!/usr/bin/env bash
# one-off call script (untracked): A/B main (plain) vs HEAD (tiled) + bench_matmul quick on HEAD
set -u
cd "$(dirname "$0")/.."
KBIT_COMMIT=$(cat .kbit_commit) AB_SUITE=gemv ROUNDS=1 AB_DECODE=1 bash bench/ab_variants.sh base tiled > $OUT/ab.txt 2>&1
tail -45 $OUT/ab.txt
cd /tmp
export PYTHONPATH=/tmp/ab/inst_tiled
python3 -c "import jax_kbit, jax; print(jax_kbit.__file__)"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu $OLDPWD/tests/test_tiled.py > $OUT/tiled_tests.txt 2>&1; echo "tiled tests rc=$?"; tail -5 $OUT/tiled_tests.txt
timeout 150 python3 $OLDPWD/bench/bench_matmul.py --out $OUT --quick > $OUT/bench_matmul.txt 2>&1; echo "bench rc=$?"; tail -45 $OUT/bench_matmul.txt
