"""Instruction counts of the CUDA kernels as compiled (SASS), without a GPU.

    python bench/sass_stats.py FILE [--kernel REGEX] [--marker OPCODE] [--top N] [--stream-order]

FILE is a cubin (`nvcc -cubin -arch=sm_90 ...`) or the built module (`_kbit_cuda*.so`). For each kernel
whose mangled name matches REGEX it prints the instruction count and the most frequent opcodes; with
--marker, also the spans between consecutive instructions of that opcode (e.g. R2P, once per element in
the quantize loop; HMMA, eight per step in the batch-1 matmul), the way bench/RESULTS.md counts
instructions per element or per step. Needs `cuobjdump` on PATH, or the PyPI wheel `nvidia-cuda-cuobjdump`
installed (not a dependency of the project).

--stream-order prints, per kernel, the order of its streaming weight loads (`LDG...NA`: L), the waits on the
scoreboard those loads signal (W) and the first mma of each step (`HMMA` with a zero accumulator: H), from
the control word cuobjdump prints beside each instruction (bits 41.. of its second half: stall 4 bits,
yield 1, write barrier 3, read barrier 3, wait mask 6; the layout since Volta). A wait on a scoreboard
lasts until every load that signals it has landed, so a run of loads followed by such a wait with no
arithmetic between them has no latency hidden (`stream_order_gaps`).
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


def sass_text(path: str) -> str:
    """cuobjdump -sass of a cubin or module."""
    return subprocess.run(
        [find_cuobjdump(), "-sass", path], check=True, capture_output=True, text=True
    ).stdout


def kernels(path: str) -> dict[str, list[str]]:
    """Mangled kernel name -> its instructions (opcode with operands, predicate guard dropped)."""
    return parse_sass(sass_text(path))


def parse_sass(text: str) -> dict[str, list[str]]:
    """cuobjdump -sass output -> {kernel: instructions}."""
    return {name: [instr for _, instr, _, _ in body] for name, body in parse_control(text).items()}


def parse_control(text: str) -> dict[str, list[tuple[int, str, int, int]]]:
    """cuobjdump -sass output -> {kernel: [(address, instruction, wait mask, write barrier or 7 for none)]},
    the predicate guard dropped; an instruction whose control word (the line after it) is missing gets no
    wait and no barrier."""
    out: dict[str, list[tuple[int, str, int, int]]] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = out.setdefault(m.group(1), [])
            continue
        if current is None:
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*(/\*.*)?$", line)
        if m:
            current.append((int(m.group(1), 16), re.sub(r"^@!?U?P\w+\s+", "", m.group(2)), 0, 7))
            continue
        m = re.match(r"\s*/\* (0x[0-9a-f]+) \*/\s*$", line)
        if m and current:
            control = int(m.group(1), 16) >> 41
            current[-1] = (*current[-1][:2], (control >> 11) & 0x3F, (control >> 5) & 7)
    return out


def stream_events(body: list[tuple[int, str, int, int]]) -> list[tuple[int, str]]:
    """(address, event) for the kernel's streaming loads (L), waits on their scoreboard (W) and first mmas
    of a step (H); see the module docstring."""
    barriers = {bar for _, instr, _, bar in body if ".NA." in instr.split()[0] and bar != 7}
    events = []
    for address, instr, wait, _ in body:
        op = instr.split()[0]
        if any(wait >> b & 1 for b in barriers):
            events.append((address, "W"))
        if op.startswith("LDG") and ".NA." in op:
            events.append((address, "L"))
        elif op.startswith("HMMA") and re.search(r",\s*RZ\s*$", instr):
            events.append((address, "H"))
    return events


def stream_loops(body: list[tuple[int, str, int, int]]) -> list[str]:
    """The L / W / H events of each innermost loop (a backward branch's range) that streams weights and
    multiplies, in the order the loop runs them."""
    events = stream_events(body)
    loops = []
    for address, instr, _, _ in body:
        m = re.match(r"BRA\S*\s+(?:`\()?(0x[0-9a-f]+)", instr)
        if m and int(m.group(1), 16) <= address:
            order = "".join(e for a, e in events if int(m.group(1), 16) <= a <= address)
            if "L" in order and "H" in order:
                loops.append((int(m.group(1), 16), address, order))
    inner = [
        (lo, hi, o)
        for lo, hi, o in loops
        if not any(lo <= lo2 and hi2 <= hi and (lo2, hi2) != (lo, hi) for lo2, hi2, _ in loops)
    ]
    return [o for _, _, o in sorted(inner)]


def stream_order_gaps(loop: str) -> int:
    """How many runs of streaming loads in a loop's events are waited for before any mma, the loop taken as a
    cycle (its last loads meet its first wait on the next trip): loads with no arithmetic to hide them."""
    if "H" not in loop:
        return 0
    turned = loop[loop.index("H") :] + loop[: loop.index("H")]  # no run of loads across the seam
    return len(re.findall(r"L+W", turned + "H"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--kernel", default=".", help="regex on the mangled kernel name")
    ap.add_argument("--marker", help="opcode prefix whose spacing to report, e.g. R2P or HMMA")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--stream-order", action="store_true", help="streaming loads, their waits, mmas")
    args = ap.parse_args()
    if args.stream_order:
        for name, body in parse_control(sass_text(args.file)).items():
            if not re.search(args.kernel, name):
                continue
            for loop in stream_loops(body):
                print(f"{name}\n  loop {loop}: {stream_order_gaps(loop)} load runs waited for unhidden")
        return
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
