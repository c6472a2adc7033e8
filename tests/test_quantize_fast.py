"""The CUDA quantize kernel's shortcut (ffi/kbit_quantize_fast.h), checked on the host.

The header's arithmetic is IEEE float32 with correctly rounded fma on both sides, so compiling it for the
CPU and comparing it with format v1's definition (ffi/kbit_format.h) checks the same code the kernel runs:
Markstein division against a true division, the bucket table against the exact nearest-code search, and
whole random blocks through the kernel's per-element path. Driver: tests/cpp/check_quantize_fast.cc.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import SeededRng

from jax_kbit import codebooks

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "cpp" / "check_quantize_fast.cc"


@pytest.fixture(scope="module")
def checker(tmp_path_factory) -> Path:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    exe = tmp_path_factory.mktemp("cpp") / "check_quantize_fast"
    cmd = [
        cxx,
        "-O2",
        "-std=c++17",
        "-ffp-contract=off",  # the header's fmas are explicit; nothing else may fuse
        "-Wall",
        "-Wno-unknown-pragmas",
        f"-I{ROOT / 'ffi'}",
        str(SOURCE),
        "-o",
        str(exe),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def codebook_lines(rng: SeededRng) -> tuple[str, int]:
    """The library's codebooks and adversarial ones (unsorted, duplicates, wide, narrow, one-sided, tiny)."""
    books = []
    for k in range(2, 6):
        for make in (codebooks.default, codebooks.lloyd_max, codebooks.normal_float, codebooks.uniform):
            books.append((k, make(k)))
        n = 2**k
        books.append((k, rng.uniform(-1, 1, n)))
        books.append((k, np.sort(rng.uniform(-1, 1, n))[::-1]))
        dup = np.array(codebooks.default(k), np.float32)
        dup[1] = dup[2]
        books.append((k, dup))
        books.append((k, np.asarray(codebooks.default(k)) * rng.uniform(1.5, 4.0)))
        books.append((k, np.asarray(codebooks.default(k)) * 0.25))
        books.append((k, np.linspace(0, 1, n)))
        books.append((k, np.asarray(codebooks.default(k)) * 1e-30))  # thresholds near zero: not accepted
    books.append((4, codebooks.nf4()))
    # Regular (entries far apart), but the threshold between the middle two lies near 2**-39.
    books.append((2, np.array([-1.0, -(2.0**-15), 2.0**-15 + 2.0**-38, 1.0])))
    lines = [f"{k} " + " ".join(float(v).hex() for v in np.asarray(cb, np.float32)) for k, cb in books]
    return "\n".join(lines) + "\n", len(books)


def test_shortcut_matches_format_definition(checker: Path, rng: SeededRng):
    text, count = codebook_lines(rng)
    seed = int(rng.integers(0, 2**63))
    run = subprocess.run(
        [str(checker), "4000000", "4000", str(seed)], input=text, capture_output=True, text=True, timeout=600
    )
    out = run.stdout
    assert run.returncode == 0 and "PASSED: 0 mismatches" in out, f"{rng!r} seed={seed}\n{out}\n{run.stderr}"
    # Every codebook was read and either checked or declined, and the checks did run.
    assert out.count("codebook ") >= count, out
    exact = int(out.split("division: ")[1].split(" exact-range")[0])
    assert exact > 1_000_000, out
    # The library's own codebooks all take the shortcut (the kernel's fast path serves them).
    for i in range(4):
        for k in range(4):
            assert f"codebook {k * 11 + i} (K={k + 2}): search exact" in out, out
    assert f"codebook {count - 2} (K=4): search exact" in out, out  # nf4
    # Codebooks with thresholds within 2**-38 of zero are declined.
    for k in range(4):
        assert f"codebook {k * 11 + 10} (K={k + 2}): bucket table not applicable" in out, out
    assert f"codebook {count - 1} (K=2): bucket table not applicable" in out, out
