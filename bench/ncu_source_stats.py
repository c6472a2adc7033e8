"""Where a kernel's time goes, from the per-instruction page of an Nsight Compute report.

    python bench/ncu_source_stats.py FILE.csv [--per N] [--top N]

FILE.csv is `ncu -i REPORT --page source --print-source sass --csv` (gpu_check.sh's ncu_src_* steps write
it). Prints the stall reasons over all warp samples, the opcode mix (share of executed instructions and of
stall samples), the memory instructions grouped by kind with their L1 tag requests, L2 sectors and shared
wavefronts (divided by --per, e.g. the number of tiles, to read them per unit of work), and the --top
instructions with the most stall samples and the reason that dominates each.
"""

from __future__ import annotations

import argparse
import collections
import csv
from dataclasses import dataclass, field

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"
MEMORY_COLUMNS = (
    "L1 Tag Requests Global",
    "L2 Theoretical Sectors Global",
    "L1 Wavefronts Shared",
)
MEMORY_KINDS = ("LDG", "STG", "LDS", "STS", "LDL", "STL", "LDGSTS", "ATOM", "RED")


@dataclass
class Instruction:
    address: str
    text: str
    values: dict[str, float] = field(default_factory=dict)

    @property
    def opcode(self) -> str:
        """Opcode without predicate guard and modifiers: `@!P0 LDG.E.128 ...` -> `LDG`."""
        words = self.text.split()
        if words and words[0].startswith("@"):
            words = words[1:]
        return words[0].split(".")[0] if words else "?"

    def get(self, column: str) -> float:
        return self.values.get(column, 0.0)


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def read_source_page(path: str) -> list[Instruction]:
    """The CSV's instruction rows (the first row names the kernel, the second the columns)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header_at = next((i for i, r in enumerate(rows) if r[:2] == ["Address", "Source"]), None)
    if header_at is None:
        raise SystemExit(f"{path}: no 'Address,Source' header; is it ncu's --page source --csv output?")
    header = rows[header_at]
    out = []
    for row in rows[header_at + 1 :]:
        if len(row) < 2:
            continue
        values = {}
        for name, cell in zip(header[2:], row[2:]):
            v = _number(cell)
            if v is not None:
                values[name] = v
        out.append(Instruction(row[0], row[1].strip(), values))
    return out


def stall_reasons(instrs: list[Instruction]) -> dict[str, float]:
    """Share of all stall samples per reason (columns `stall_*`, issued and not issued together)."""
    totals: collections.Counter[str] = collections.Counter()
    for ins in instrs:
        for name, v in ins.values.items():
            if name.startswith("stall_") and "(Not Issued)" not in name:
                totals[name[len("stall_") :]] += v
    whole = sum(totals.values())
    return {k: v / whole for k, v in totals.most_common()} if whole else {}


def opcode_mix(instrs: list[Instruction]) -> list[tuple[str, float, float]]:
    """(opcode, share of executed instructions, share of stall samples), most executed first."""
    executed: collections.Counter[str] = collections.Counter()
    sampled: collections.Counter[str] = collections.Counter()
    for ins in instrs:
        executed[ins.opcode] += ins.get(EXECUTED)
        sampled[ins.opcode] += ins.get(SAMPLES)
    e, s = sum(executed.values()) or 1.0, sum(sampled.values()) or 1.0
    return [(op, n / e, sampled[op] / s) for op, n in executed.most_common()]


def memory_by_kind(instrs: list[Instruction]) -> dict[str, dict[str, float]]:
    """Executed count and MEMORY_COLUMNS summed per memory opcode."""
    out: dict[str, dict[str, float]] = {}
    for ins in instrs:
        if ins.opcode not in MEMORY_KINDS:
            continue
        row = out.setdefault(ins.opcode, dict.fromkeys((EXECUTED, *MEMORY_COLUMNS), 0.0))
        for column in row:
            row[column] += ins.get(column)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--per", type=float, default=1.0, help="divide counts by this (e.g. tiles or steps)")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    instrs = read_source_page(args.file)
    executed = sum(i.get(EXECUTED) for i in instrs)
    samples = sum(i.get(SAMPLES) for i in instrs)
    print(f"{len(instrs)} instructions, {executed:.0f} warp instructions executed, {samples:.0f} samples")
    print("stall reasons:")
    for reason, share in list(stall_reasons(instrs).items())[:10]:
        print(f"  {reason:16s} {100 * share:5.1f} %")
    print("opcodes (executed %, stall samples %):")
    for op, e, s in opcode_mix(instrs)[:20]:
        print(f"  {op:10s} {100 * e:5.1f} {100 * s:5.1f}")
    print(f"memory instructions per {args.per:g} (executed, L1 tags, L2 sectors, shared wavefronts):")
    for op, row in memory_by_kind(instrs).items():
        print(f"  {op:7s}", " ".join(f"{v / args.per:12.1f}" for v in row.values()))
    stalls = [name for name in {n for i in instrs for n in i.values} if name.startswith("stall_")]
    stalls = [n for n in stalls if "(Not Issued)" not in n]
    print(f"top {args.top} instructions by stall samples:")
    for ins in sorted(instrs, key=lambda i: -i.get(SAMPLES))[: args.top]:
        reason = max(stalls, key=ins.get)[len("stall_") :] if stalls else "-"
        share = 100 * ins.get(SAMPLES) / (samples or 1.0)
        print(f"  {ins.address[-6:]} {share:5.2f} % {reason:13s} x{ins.get(EXECUTED):<9.0f} {ins.text[:70]}")


if __name__ == "__main__":
    main()
