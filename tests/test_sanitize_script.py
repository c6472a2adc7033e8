"""bench/sanitize.py's section choice (the script itself needs a GPU; gpu_check.sh runs it there)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "sanitize.py"


def test_every_section_can_be_chosen_and_unknown_ones_are_refused():
    text = SCRIPT.read_text()
    declared = re.search(r"SECTIONS = \(([^)]*)\)", text).group(1)
    names = re.findall(r'"(\w+)"', declared)
    used = re.findall(r'^if section\("(\w+)"\):', text, flags=re.M)
    assert used == names and len(names) == 6
    run = subprocess.run([sys.executable, str(SCRIPT), "matmul", "nonsense"], capture_output=True, text=True)
    assert run.returncode != 0 and "unknown sections ['nonsense']" in run.stderr


def test_bit_width_filter_is_checked_before_any_gpu_work():
    text = SCRIPT.read_text()
    # every K loop goes through the filter, so that parallel sanitizer processes can share the cases
    assert "for k in (2, 3, 4, 5):" not in text and text.count("for k in KS:") >= 5
    for bad in ("k=7", "k=two", "k="):
        run = subprocess.run([sys.executable, str(SCRIPT), "matmul", bad], capture_output=True, text=True)
        assert run.returncode != 0 and "k= takes" in run.stderr, (bad, run.stderr)
