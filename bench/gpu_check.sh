#!/usr/bin/env bash
# One call on the GPU machine: build and install with CUDA, then the steps asked for, most important first.
#   bash bench/gpu_check.sh                 every step below (full benchmark sizes)
#   QUICK=1 bash bench/gpu_check.sh         shorter benchmarks (fits a small device budget)
#   bash bench/gpu_check.sh tests sharded   only these steps (after the build)
# Steps: shard_tests (tests/test_sharding.py on every GPU of the machine), tests (every other `gpu`-marked
# test), matmul (fused matmul
# benchmark), decode (Llama-shaped decode tokens/s), profile_decode (a decode step's kernel time by kind
# against its wall time, from a jax.profiler trace), sharded (sharded benchmark over all GPUs), bench
# (quantize/dequantize benchmark), sanitize (compute-sanitizer memcheck + racecheck), selfcheck, cpu (the CPU
# suite on this machine's jax), ncu (profile of the quantize/dequantize kernels), ncu_matmul (full profile of
# the M = 1 fused matmul kernel), ncu_src_quantize / ncu_src_matmul (every section and per-SASS-instruction
# stall samples as CSV, of the quantize kernel / of the matmul at MATMUL_M rows, default 16, of a MATMUL_SHAPE
# weight, default 8192x8192), sass
# (disassembly of the CUDA module), probe_codec (bench/probe_codec_ceiling.cu: what memory allows for
# quantize- and dequantize-shaped traffic against copy), probe_access (bench/probe_gemv_access.cu: the batch-1
# kernel's weight reads per layout and walk), probe_fixed (bench/probe_gemv_fixed.cu: a decode-sized
# batch-1 product's time by part: launch, table build, loads, split sum).
# PYTEST_ARGS: extra arguments for the tests step (e.g. --ignore a file already run on the same kernels);
# PYTEST_K: a -k expression for it (may contain spaces). SANITIZE_PARTS: the arguments of bench/sanitize.py for
# each sanitizer process, separated by ';' (default: the small sections in one, the matmul section's K = 2, 3
# and K = 4, 5 in two more; all run at once under each tool, SANITIZE_TIMEOUT seconds each, default 500).
# KBIT_COMMIT: the commit to print (see below).
# ncu runs jax without preallocation: replaying a kernel saves and restores all the device memory in use, and
# with jax's default (75 % of the GPU preallocated) profiling one small kernel (10 passes) took about 50 s.
# Logs and results go to $OUT/logs (default bench/out/logs), packed into $OUT/logs.tgz at exit (the device tool
# brings back only a few files). DEADLINE=seconds skips the steps that would start after it.
set -uo pipefail
OUT=${OUT:-bench/out}
FINAL_OUT=$OUT
OUT=$FINAL_OUT/logs
mkdir -p "$OUT"
pack() { tar czf "$FINAL_OUT/logs.tgz" -C "$OUT" . && rm -rf "$OUT"; }
trap pack EXIT
trap 'exit 143' TERM INT
deadline=${DEADLINE:-100000}
export PYTHONUNBUFFERED=1
quick=${QUICK:-}
steps="$*"
[ -n "$steps" ] || steps="shard_tests tests matmul decode sharded bench sanitize selfcheck cpu ncu"
status=0
{
  # The device tool copies the working tree with a .git that may be older: KBIT_COMMIT names the real one.
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)  commit: ${KBIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"

t0=$SECONDS
CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90 -DKBIT_CUDA=ON" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  python3 -m pip install -q --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build ok ($((SECONDS - t0)) s)"
repo=$PWD
cd /tmp  # import the installed package, not the source tree
# bitsandbytes for the benchmarks' peer, carried unpacked (its CUDA 13.0 library only) when present.
[ -d "$repo/.carry/bnb" ] && export PYTHONPATH="$repo/.carry/bnb${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, print the tail
  local name=$1; shift
  local t=$SECONDS
  echo "=== $name"
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -${TAIL:-25} "$OUT/$name.log"
  echo "=== $name: rc=$rc ($((SECONDS - t)) s)"
  [ $rc -eq 0 ] || status=1
}

for s in $steps; do
  if [ $SECONDS -gt "$deadline" ]; then echo "skipped $s: past DEADLINE=$deadline s"; status=1; continue; fi
  case $s in
    tests) TAIL=12 step gpu_tests python3 -m pytest -q -p no:cacheprovider -m gpu "$repo/tests" \
      --ignore "$repo/tests/test_sharding.py" ${PYTEST_ARGS:-} ${PYTEST_K:+-k "$PYTEST_K"} ;;
    shard_tests) TAIL=8 step shard_tests python3 -m pytest -q -p no:cacheprovider -m gpu "$repo/tests/test_sharding.py" ;;
    matmul) TAIL=70 step bench_matmul python3 "$repo/bench/bench_matmul.py" --out "$OUT" ${quick:+--quick} ;;
    decode) [ -f "$repo/bench/bench_decode.py" ] && step bench_decode python3 "$repo/bench/bench_decode.py" --out "$OUT" ${quick:+--quick} ;;
    profile_decode) TAIL=60 step profile_decode python3 "$repo/bench/profile_decode.py" ;;
    sharded) TAIL=20 step bench_sharded python3 "$repo/bench/bench_sharded.py" --out "$OUT" ${quick:+--ks 4} ;;
    bench) step bench python3 "$repo/bench/bench_gpu.py" --out "$OUT" ${quick:+--quick} ;;
    sanitize)
      # Both tools on every part at once, each part its own process (racecheck of the whole script in one
      # process ran past 220 s, most of it in the matmul section). XLA's autotuning is off under the tools:
      # it runs many of XLA's own kernels while compiling, which is where compute-sanitizer died (rc 139)
      # three times (a guess at the cause, not a finding; our kernels are what this step checks).
      IFS=';' read -ra parts <<<"${SANITIZE_PARTS:-codec dequantize tiled quantize grouped;matmul k=2,3;matmul k=4,5}"
      pids=()
      for tool in memcheck racecheck; do
        for i in "${!parts[@]}"; do
          XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" XLA_PYTHON_CLIENT_MEM_FRACTION=0.12 \
            timeout "${SANITIZE_TIMEOUT:-500}" compute-sanitizer --tool $tool \
            --error-exitcode 3 python3 "$repo/bench/sanitize.py" ${parts[$i]} >"$OUT/sanitize_${tool}_$i.log" 2>&1 &
          pids+=("$tool $i $!")
        done
      done
      for entry in "${pids[@]}"; do
        read -r tool i pid <<<"$entry"
        wait "$pid"
        rc=$?
        log="$OUT/sanitize_${tool}_$i.log"
        echo "compute-sanitizer $tool [${parts[$i]}]: rc=$rc $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)" \
          "$(grep -q 'sanitize run complete' "$log" && echo complete || echo "NOT COMPLETE (last: $(grep '^section' "$log" | tail -1))")"
        [ $rc -eq 0 ] || status=1
      done ;;
    selfcheck) TAIL=12 step selfcheck python3 -P -m jax_kbit ;;
    cpu) TAIL=3 step cpu_suite python3 -m pytest -q -p no:cacheprovider "$repo/tests" -m "not gpu" ;;
    ncu)
      XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --clock-control none --kernel-name regex:'quantize_(vec_)?kernel' --launch-skip 2 --launch-count 2 \
        --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
        python3 "$repo/bench/profile_quantize.py" ${PROFILE_ARGS:-} >"$OUT/ncu.txt" 2>&1
      echo "ncu: rc=$? ($(grep -c 'Duration' "$OUT/ncu.txt") kernels profiled)" ;;
    ncu_matmul)  # every section, with source-level stall counters, of the M = 1 fused matmul kernel
      XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --clock-control none --kernel-name regex:'matmul_kernel|gemv_kernel' --launch-skip 1 --launch-count 1 --set full \
        --import-source no python3 "$repo/bench/profile_matmul.py" >"$OUT/ncu_matmul.txt" 2>&1
      echo "ncu_matmul: rc=$? ($(grep -c 'Duration' "$OUT/ncu_matmul.txt") kernels profiled)" ;;
    ncu_src_quantize|ncu_src_matmul)  # every section plus per-SASS-instruction stall samples (CSV) of one launch
      # ^: the quantize kernel, not the dequantize one (ncu matches the base name, which contains it).
      if [ $s = ncu_src_quantize ]; then what=${NCU_KERNEL:-'^quantize_(vec_)?kernel'}
        prog=("$repo/bench/profile_quantize.py" ${PROFILE_ARGS:-})
      else what='matmul_kernel|gemv_kernel'; prog=("$repo/bench/profile_matmul.py" --m "${MATMUL_M:-16}" --shape "${MATMUL_SHAPE:-8192x8192}"); fi
      XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --clock-control none --kernel-name regex:"$what" --launch-skip 1 --launch-count 1 --set full \
        --import-source no -f -o "$OUT/$s" python3 "${prog[@]}" >"$OUT/$s.log" 2>&1
      echo "$s: rc=$?"
      ncu -i "$OUT/$s.ncu-rep" --page details >"$OUT/$s.txt" 2>&1
      ncu -i "$OUT/$s.ncu-rep" --page source --print-source sass --csv >"$OUT/${s}_sass.csv" 2>&1
      echo "$s: $(wc -l <"$OUT/$s.txt") lines of details, $(wc -l <"$OUT/${s}_sass.csv") of SASS"
      rm -f "$OUT/$s.ncu-rep" ;;
    sass)  # instruction mix of the kernels as built (cuobjdump is on the GPU machine, not here)
      so=$(python3 -c "import jax_kbit._kbit_cuda as m; print(m.__file__)" 2>/dev/null)
      cuobjdump -sass "$so" >"$OUT/sass.txt" 2>&1
      echo "sass: rc=$? ($(wc -l <"$OUT/sass.txt") lines)" ;;
    probe_codec)  # the bandwidth ceiling of quantize- and dequantize-shaped traffic (needs no build)
      TAIL=12 step probe_codec bash -c "nvcc -O3 -arch=sm_90 -o /tmp/probe_codec '$repo/bench/probe_codec_ceiling.cu' && /tmp/probe_codec" ;;
    probe_access)  # the batch-1 kernel's weight reads per layout and walk, nothing computed (needs no build)
      TAIL=16 step probe_access bash -c "nvcc -O3 -arch=sm_90 -o /tmp/probe_access '$repo/bench/probe_gemv_access.cu' && /tmp/probe_access" ;;
    probe_fixed)  # a decode-sized batch-1 product's fixed costs (compiles the library's kernel in; jaxlib headers)
      TAIL=12 step probe_fixed bash -c "nvcc -std=c++17 -O3 -arch=sm_90 --fmad=false -diag-suppress=940,2473 \
        -I '$repo/ffi' -I \"\$(python3 -c 'import jax.ffi as f; print(f.include_dir())')\" \
        -o /tmp/probe_fixed '$repo/bench/probe_gemv_fixed.cu' && /tmp/probe_fixed" ;;
    *) echo "unknown step $s"; status=1 ;;
  esac
done
exit $status
