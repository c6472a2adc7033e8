#!/usr/bin/env bash
# A/B of kernel variants in one GPU call: each directory under $VARIANTS (default .variants) holds files that
# replace the working tree's (e.g. .variants/x/ffi/cuda_gemv.cu). Every variant is built and installed into
# its own directory (in parallel), then bench/ab_time.py (AB_SUITE: gemv, the default, codec or tiled) runs for
# each in turns, ROUNDS times, and the medians are printed per case with the ratio to the variant named base.
# AB_DECODE=1 then runs bench/bench_decode.py --quick once per variant.
# A variant directory with a .build_as file (bench/make_variants.sh NAME=@OTHER:VAR=VALUE) is not built: it
# runs that variant's install, with the VAR=VALUE lines of its .env file in the environment.
# KBIT_COMMIT: the tree's commit; with make_variants.sh's record (.variants/.head) of another, nothing runs.
# AB_REUSE=1 keeps the installs of an earlier call on the same (still warm) machine and builds only the missing.
#   VARIANTS=.variants ROUNDS=2 AB_SUITE=gemv AB_ROWS=1 AB_DECODE=1 bash bench/ab_variants.sh [names...]
set -uo pipefail
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # the runs below start in /tmp
rm -f "$OUT/ab_time.jsonl"  # the summary is of this call's runs only
repo=$PWD
variants_dir=$repo/${VARIANTS:-.variants}
names="$*"
[ -n "$names" ] || names=$(ls "$variants_dir" 2>/dev/null)
[ -n "$names" ] || { echo "no variants: name them, or fill $variants_dir (bench/make_variants.sh)" >&2; exit 2; }
# make_variants.sh records the commit its overlays are relative to; a tree of another commit would make them
# (and a variant with no files, such as base=main) mean something else.
if [ -f "$variants_dir/.head" ] && [ -n "${KBIT_COMMIT:-}" ] && [ -z "${AB_STALE_OK:-}" ]; then
  made=$(cat "$variants_dir/.head")
  if [ "${made:0:${#KBIT_COMMIT}}" != "$KBIT_COMMIT" ]; then
    echo "the variants were made against ${made:0:12}, the tree is $KBIT_COMMIT: run make_variants.sh again" \
      "(or AB_STALE_OK=1)" >&2
    exit 2
  fi
fi
work=${AB_WORK:-/tmp/ab}  # builds and installs (AB_WORK: elsewhere)
[ -n "${AB_REUSE:-}" ] || rm -rf "$work"
logs=$work/logs  # tarred into $OUT at the end: a GPU call brings back only a few files
rm -rf "$logs"
mkdir -p "$logs"
trap 'tar -C "$work" -czf "$OUT/ab_logs.tgz" logs' EXIT
trap 'exit 143' TERM
echo "date: $(date -u +%Y-%m-%dT%H:%MZ)  commit: ${KBIT_COMMIT:-?}  variants: $names"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
t0=$SECONDS
build_of() {  # the variant whose build variant $1 runs: its .build_as, or itself
  if [ -f "$variants_dir/$1/.build_as" ]; then cat "$variants_dir/$1/.build_as"; else echo "$1"; fi
}
inst_of() { echo "$work/inst_$(build_of "$1")"; }
env_of() {
  [ -f "$variants_dir/$1/.env" ] && grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$variants_dir/$1/.env"
  return 0
}
# What to build: each variant, or the one its .build_as names, once.
builds=$(for v in $names; do build_of "$v"; done | awk '!seen[$0]++')
jobs=$(( $(nproc) / $(echo $builds | wc -w) + 1 ))
for v in $builds; do
  [ -n "${AB_REUSE:-}" ] && [ -d "$work/inst_$v/jax_kbit" ] && continue
  (
    src=$work/src_$v
    rm -rf "$src" "$work/inst_$v"
    mkdir -p "$src"
    tar -C "$repo" --exclude=./bench/out --exclude=./.carry --exclude=./.variants --exclude=./build \
      --exclude=./.git -cf - . | tar -C "$src" -xf -
    cp -r "$variants_dir/$v/." "$src/"
    CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90 -DKBIT_CUDA=ON" CMAKE_BUILD_PARALLEL_LEVEL=$jobs \
      python3 -m pip install -q --no-build-isolation --no-deps --target "$work/inst_$v" "$src" \
      >"$logs/build_$v.log" 2>&1 || { echo "build of $v failed"; tail -30 "$logs/build_$v.log"; }
  ) &
done
wait
echo "builds done ($((SECONDS - t0)) s)"
cd /tmp
for r in $(seq 1 "${ROUNDS:-2}"); do
  for v in $names; do
    [ -d "$(inst_of "$v")/jax_kbit" ] || { echo "no build for $v"; continue; }
    env $(env_of "$v") PYTHONPATH="$(inst_of "$v")" python3 "$repo/bench/ab_time.py" --label "$v" --rows "${AB_ROWS:-1}" \
      --suite "${AB_SUITE:-gemv}" --out "$OUT" 2>>"$logs/err_$v.log" || { echo "run of $v failed"; tail -5 "$logs/err_$v.log"; }
  done
  names="$(echo $names | awk '{for (i = NF; i > 0; i--) printf "%s ", $i}')"  # reverse the order each round
done
if [ -n "${AB_DECODE:-}" ]; then
  for v in $names; do
    [ -d "$(inst_of "$v")/jax_kbit" ] || continue
    echo "--- decode: $v"
    mkdir -p "$logs/decode_$v"
    env $(env_of "$v") PYTHONPATH="$(inst_of "$v")" python3 "$repo/bench/bench_decode.py" --quick --out "$logs/decode_$v" 2>&1 |
      grep -E "^ +(bf16|K=)" || echo "decode of $v failed"
  done
fi
first=$(echo $names | awk '{print $1}')
PYTHONPATH="$(inst_of "$first")" python3 "$repo/bench/ab_time.py" --summary "$OUT/ab_time.jsonl"  # imports jax_kbit
