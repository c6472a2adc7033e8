"""bench/bench_matmul.py: how its device times split a trace by chain, how many copies it times, and one
small run on the CPU (no timing is asserted; no GPU plane there, so no device times).

Skipped when the bench folder is not next to the tests (an installed package tested elsewhere).
"""

from __future__ import annotations

import json
import sys

import pytest
from conftest import load_bench_script

pytestmark = pytest.mark.usefixtures("cpu")


@pytest.fixture(scope="module")
def bm():
    return load_bench_script("bench_matmul")


def test_split_groups_cuts_at_idle_gaps(bm):
    us = 1000
    events = [  # out of order, one overlapping pair, gaps of 1 µs inside a chain and of 30 ms between
        (60_000 * us, 60_010 * us, "c"),
        (0, 5 * us, "a"),
        (6 * us, 9 * us, "a"),
        (4 * us, 8 * us, "a"),
        (30_000 * us, 30_002 * us, "b"),
    ]
    groups = bm.split_groups(events, 3, 25_000 * us)
    assert [[e[2] for e in g] for g in groups] == [["a", "a", "a"], ["b"], ["c"]]
    assert groups[0][0] == (0, 5 * us, "a")
    assert bm.split_groups(events, 2, 25_000 * us) is None  # a chain count the trace does not show
    assert len(bm.split_groups(events, 1, 40_000 * us)[0]) == 5  # no gap that long: one group
    assert bm.split_groups([], 0, 1) == []


def test_overlap_counts_once_in_busy_time(bm):
    groups = bm.split_groups([(0, 10, "a"), (5, 20, "a"), (30, 35, "a")], 1, 100)
    assert bm.busy_ns(groups[0]) == 25


@pytest.mark.parametrize(
    "din,dout,want",
    [(4096, 4096, 27), (8192, 8192, 16), (8192, 28672, 16), (512, 512, 48)],
)
def test_copies_pass_the_l2_and_bound_the_dispatch(bm, din, dout, want):
    copies = bm.copies_for(din, dout)
    assert copies == want
    assert bm.MIN_COPIES <= copies <= bm.MAX_COPIES
    if copies < bm.MAX_COPIES:
        assert copies * din * dout * 2.25 / 8 >= bm.L2_DEFEAT_BYTES


def test_small_run_writes_every_field(bm, tmp_path, monkeypatch):
    monkeypatch.setattr(bm, "MIN_COPIES", 2)
    monkeypatch.setattr(bm, "MAX_COPIES", 2)
    argv = ["bench_matmul.py", "--out", str(tmp_path), "--quick", "--rows", "1,3", "--shapes", "64x96"]
    monkeypatch.setattr(sys, "argv", argv)
    bm.main()
    rows = json.loads((tmp_path / "bench_matmul.json").read_text())["rows"]
    assert [(r["in"], r["out"], r["m"], r["k"]) for r in rows] == [(64, 96, 1, 4), (64, 96, 3, 4)]
    for r in rows:
        assert r["copies"] == 2
        assert r["kbit_s"] > 0 and r["xla_bf16_s"] > 0 and r["dequant_dot_s"] > 0
        assert r["kbit_dev_s"] is None and r["dev_speedup_vs_xla_bf16"] is None  # no GPU plane on the CPU


def test_device_times_divide_each_chains_busy_time(bm, monkeypatch):
    ms = 1_000_000
    # As a GPU trace would show them: chain a's kernels, a pause, chain b's (overlapping pair counted once).
    events = [
        (0, 600, "gemv"),
        (700, 1300, "add"),
        (100 * ms, 100 * ms + 900, "dot"),
        (100 * ms + 100, 100 * ms + 1000, "dot"),
    ]
    monkeypatch.setattr(bm, "kernel_events", lambda path: (events, []))
    got = bm.device_times({"a": (lambda: 0, 2), "b": (lambda: 0, 5)})
    if not got:
        pytest.skip("this jax wrote no trace file")
    assert got["a"] == pytest.approx(1200 / 1e9 / (bm.TRACE_CALLS * 2))
    assert got["b"] == pytest.approx(1000 / 1e9 / (bm.TRACE_CALLS * 5))
    monkeypatch.setattr(bm, "kernel_events", lambda path: (events[:2], []))  # b's kernels missing
    assert bm.device_times({"a": (lambda: 0, 2), "b": (lambda: 0, 5)}) == {}
