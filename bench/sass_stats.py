"""Instruction counts of the CUDA kernels as compiled (SASS), without a GPU.

    python bench/sass_stats.py FILE [--kernel REGEX] [--marker OPCODE] [--top N]

FILE is a cubin (`nvcc -cubin -arch=sm_90 ...`) or the built module (`_kbit_cuda*.so`). For each kernel
whose mangled name matches REGEX it prints the instruction count and the most frequent opcodes; with
--marker, also the spans between consecutive instructions of that opcode (e.g. R2P, once per element in
the quantize loop; HMMA, eight per step in the batch-1 matmul), the way bench/RESULTS.md counts
instructions per element or per step. Needs `cuobjdump` on PATH, or the PyPI wheel `nvidia-cuda-cuobjdump`
installed (not a dependency of the project).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path


def find_cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("nvidia")
    for root in spec.submodule_search_locations if spec else []:
        for candidate in Path(root).glob("*/bin/cuobjdump"):
            return str(candidate)
    raise SystemExit("cuobjdump not found: put it on PATH or `pip install nvidia-cuda-cuobjdump`")


def kernels(path: str) -> dict[str, list[str]]:
    """Mangled kernel name -> its instructions (opcode with operands, predicate guard dropped)."""
    text = subprocess.run(
        [find_cuobjdump(), "-sass", path], check=True, capture_output=True, text=True
    ).stdout
    return parse_sass(text)


def parse_sass(text: str) -> dict[str, list[str]]:
    """cuobjdump -sass output -> {kernel: instructions}."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = out.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;?\s*(/\*.*)?$", line)
        if current is not None and m:
            current.append(re.sub(r"^@!?U?P\w+\s+", "", m.group(1)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--kernel", default=".", help="regex on the mangled kernel name")
    ap.add_argument("--marker", help="opcode prefix whose spacing to report, e.g. R2P or HMMA")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    for name, body in kernels(args.file).items():
        if not re.search(args.kernel, name):
            continue
        ops = [instr.split()[0] for instr in body if instr]
        common = ", ".join(f"{op} {n}" for op, n in collections.Counter(ops).most_common(args.top))
        print(f"{name}\n  {len(ops)} instructions; {common}")
        if args.marker:
            count, mean = marker_spacing(ops, args.marker)
            if mean is not None:
                print(f"  {count} x {args.marker}; {mean:.1f} instructions per marker (middle half)")


def marker_spacing(ops: list[str], marker: str) -> tuple[int, float | None]:
    """How many opcodes start with `marker`, and their mean distance over the middle half of them (the
    compiler interleaves neighbouring iterations of an unrolled loop, so single spans vary)."""
    at = [i for i, op in enumerate(ops) if op.startswith(marker)]
    if len(at) < 4:
        return len(at), None
    lo, hi = len(at) // 4, 3 * len(at) // 4
    return len(at), (at[hi] - at[lo]) / (hi - lo)


if __name__ == "__main__":
    main()
