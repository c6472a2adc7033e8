#!/usr/bin/env bash
# Fills .variants/ for bench/ab_variants.sh from git refs: each NAME=REF becomes .variants/NAME holding the
# files in which REF merged into main differs from HEAD (the tree the GPU call will carry), so that
# overlaying them on HEAD gives that merge. REF may be main itself (NAME=main: main's files).
# NAME=@OTHER:VAR=VALUE[,VAR=VALUE...] makes a variant that runs variant OTHER's build (not built again) with
# those environment variables set (e.g. a knob of an experiment branch swept without rebuilding).
#   bash bench/make_variants.sh base=main pdl=next-sum-splits-pdl cap1=next-gemv-split-cap1
#   bash bench/make_variants.sh base=main sweep=next-gemv-split-sweep s1=@sweep:KBIT_GEMV_SPLITS=1
# NAME=FILE.patch (or .diff) makes a variant from a patch against HEAD (bench/variants/ keeps prepared ones:
# a branch does not outlive the session that made it, a file on main does).
#   bash bench/make_variants.sh base=main x=bench/variants/NAME.patch
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
dir=${VARIANTS:-.variants}
grep -qx "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >>.git/info/exclude
# Every variant is an overlay on the tree the GPU call carries, which must be this HEAD: a variant with no
# files (base=main while main is checked out) is whatever that tree holds. ab_variants.sh compares this
# record with KBIT_COMMIT and stops on a mismatch.
mkdir -p "$dir"
git rev-parse HEAD >"$dir/.head"
git diff --quiet HEAD -- . ':!bench/results' ':!bench/variants' ||
  echo "warning: the tree has uncommitted changes; every variant (and base) carries them" >&2
for spec in "$@"; do
  name=${spec%%=*}
  ref=${spec#*=}
  case $ref in
    *.patch | *.diff)  # a patch file (bench/variants/): HEAD's files it touches, with the patch applied
      [ -f "$ref" ] || {
        echo "no patch file $ref" >&2
        exit 1
      }
      rm -rf "${dir:?}/$name"
      mkdir -p "$dir/$name"
      echo "$ref" >"$dir/$name/.variant"
      n=0
      while IFS=$'\t' read -r _ _ path; do
        mkdir -p "$dir/$name/$(dirname "$path")"
        if git cat-file -e "HEAD:$path" 2>/dev/null; then git show "HEAD:$path" >"$dir/$name/$path"; fi
        n=$((n + 1))
      done < <(git apply --numstat "$ref")
      git apply --directory="$dir/$name" "$ref" || {
        echo "$ref does not apply to HEAD" >&2
        exit 1
      }
      echo "$name: $n file(s) from $ref"
      continue
      ;;
  esac
  if [ "${ref:0:1}" = @ ]; then
    other=${ref#@}
    other=${other%%:*}
    case $ref in *:*) assignments=${ref#*:} ;; *) assignments= ;; esac
    rm -rf "${dir:?}/$name"
    mkdir -p "$dir/$name"
    echo "$ref" >"$dir/$name/.variant"
    echo "$other" >"$dir/$name/.build_as"
    [ -z "$assignments" ] || echo "$assignments" | tr ',' '\n' >"$dir/$name/.env"
    echo "$name: the build of $other with ${assignments:-no environment}"
    continue
  fi
  if [ "$(git rev-parse "$ref")" = "$(git rev-parse main)" ]; then
    tree=$(git rev-parse "main^{tree}")
  else
    tree=$(git merge-tree --write-tree main "$ref") || {
      echo "$ref does not merge cleanly into main" >&2
      exit 1
    }
  fi
  rm -rf "${dir:?}/$name"
  mkdir -p "$dir/$name"
  echo "$ref" >"$dir/$name/.variant"  # never an empty directory (a copy may drop those), and says its source
  n=0
  while IFS=$'\t' read -r status path; do
    if [ "$status" = D ]; then
      echo "warning: $name deletes $path; an overlay cannot, the file stays" >&2
      continue
    fi
    mkdir -p "$dir/$name/$(dirname "$path")"
    git show "$tree:$path" >"$dir/$name/$path"
    n=$((n + 1))
  done < <(git diff --name-status --no-renames HEAD "$tree")
  echo "$name: $n file(s) from $ref"
done
