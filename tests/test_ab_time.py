"""bench/ab_time.py: the A/B summary (medians over rounds, ratios to the variant labelled base)."""

from __future__ import annotations

import pytest
from conftest import load_bench_script


@pytest.fixture(scope="module")
def ab():
    return load_bench_script("ab_time")


def test_summary_takes_medians_and_ratios_to_base(ab):
    rows = [
        {"label": "base", "rows": 1, "us": {"a": 10.0, "b": 4.0}},
        {"label": "new", "rows": 1, "us": {"a": 5.0, "b": 6.0}},
        {"label": "new", "rows": 1, "us": {"a": 9.0, "b": 2.0}},
        {"label": "base", "rows": 1, "us": {"a": 30.0, "b": 8.0}},
        {"label": "new", "rows": 1, "us": {"a": 7.0, "b": 100.0}},
        {"label": "base", "rows": 1, "us": {"a": 20.0, "b": 5.0}},
    ]
    text = ab.summarize(rows)
    lines = text.splitlines()
    assert "base 3" in lines[0] and "new 3" in lines[0]
    a = next(line for line in lines if line.split()[0] == "a").split()
    assert a[1:] == ["20.00", "(1.000)", "7.00", "(0.350)"]  # medians 20 and 7
    b = next(line for line in lines if line.split()[0] == "b").split()
    assert b[1:] == ["5.00", "(1.000)", "6.00", "(1.200)"]


def test_summary_without_base_or_with_missing_cases(ab):
    rows = [
        {"label": "x", "rows": 1, "us": {"a": 1.5}},
        {"label": "y", "rows": 1, "us": {"a": 2.5, "b": 3.0}},
    ]
    lines = ab.summarize(rows).splitlines()
    a = next(line for line in lines if line.split()[0] == "a").split()
    assert a[1:] == ["1.50", "2.50"]  # no base: no ratios
    b = next(line for line in lines if line.split()[0] == "b").split()
    assert b[1:] == ["-", "3.00"]


def test_summary_names_variants_whose_results_failed_their_check(ab):
    rows = [
        {"label": "base", "us": {"a": 1.0}, "check": {"max_rel_err": 0.004}},
        {"label": "fast", "us": {"a": 0.5}, "check": {"max_rel_err": 0.5}},
        {"label": "codec", "us": {"a": 0.7}, "check": {"cpu_mismatches": 2}},
        {"label": "old", "us": {"a": 0.9}},
    ]
    text = ab.summarize(rows)
    assert text.splitlines()[-1].endswith("in: codec, fast")
    assert "WRONG" not in ab.summarize([rows[0], rows[3]])
