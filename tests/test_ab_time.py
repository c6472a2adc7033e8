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
        {"label": "tiles", "us": {"a": 0.8}, "check": {"order_mismatches": 1}},
    ]
    text = ab.summarize(rows)
    assert text.splitlines()[-1].endswith("in: codec, fast, tiles")
    assert "WRONG" not in ab.summarize([rows[0], rows[3]])


def test_per_product_us_splits_the_trace_into_runs(ab):
    g, s, add = (
        "void gemv_kernel<true, 4, 1, true>(...)",
        "void sum_splits_kernel<true>(...)",
        "loop_add_fusion",
    )
    events = [
        (0, 10, g),  # run 1: two products, one with a split sum
        (10, 12, s),
        (13, 14, add),
        (20, 30, g),
        (40, 45, g),  # run 2: two products with split sums
        (45, 48, s),
        (50, 56, g),
        (56, 59, s),
    ]
    import random

    random.Random(0).shuffle(events)  # start order, not trace order, decides
    one, two = ab.per_product_us(events, [2, 2])
    assert one == pytest.approx((10 + 2 + 10) / 2 / 1e3)  # the add is not a k-bit kernel
    assert two == pytest.approx((5 + 3 + 6 + 3) / 2 / 1e3)


def test_per_product_us_is_nan_for_missing_products(ab):
    import math

    events = [(0, 1000, "matmul_kernel<...>"), (2000, 4000, "matmul_kernel<...>")]
    got = ab.per_product_us(events, [1, 2])
    assert got[0] == pytest.approx(1.0)
    assert math.isnan(got[1])  # one product left where two were asked for
    assert all(math.isnan(x) for x in ab.per_product_us([], [3]))


def test_summary_of_device_times(ab):
    rows = [
        {"label": "base", "us": {"a": 10.0}, "dev_us": {"a": 4.0}},
        {"label": "new", "us": {"a": 9.0}, "dev_us": {"a": 3.0}},
        {"label": "old", "us": {"a": 8.0}},  # a record from before device times: left out of their table
    ]
    lines = ab.summarize(rows, "dev_us").splitlines()
    assert lines[0].startswith("median dev_us") and "old" not in lines[0]
    a = next(line for line in lines if line.split()[0] == "a").split()
    assert a[1:] == ["4.00", "(1.000)", "3.00", "(0.750)"]


def test_quantize_kernel_pattern_skips_the_dequantize_kernels(ab):
    # Both demangled and mangled names: a dequantize kernel's name contains the quantize kernel's.
    quantize = [
        "void kbit::cuda::(anonymous namespace)::quantize_vec_kernel<kbit::BF16, 4>(...)",
        "void kbit::cuda::(anonymous namespace)::quantize_kernel<kbit::F32, 5>(...)",
        "_ZN4kbit4cuda19quantize_vec_kernelINS_4BF16ELi4EEEvv",
    ]
    others = [
        "void kbit::cuda::(anonymous namespace)::dequantize_vec_kernel<kbit::BF16, 4>(...)",
        "_ZN4kbit4cuda21dequantize_kernelINS_3F32ELi2EEEvv",
        "loop_multiply_fusion",
    ]
    assert all(ab.QUANTIZE_KERNEL.search(n) for n in quantize)
    assert not any(ab.QUANTIZE_KERNEL.search(n) for n in others)
