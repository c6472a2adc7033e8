"""bench/profile_decode.py: the kernel grouping and the busy-time union it reports per decode token."""

from __future__ import annotations

import pytest
from conftest import load_bench_script


@pytest.fixture(scope="module")
def pd():
    return load_bench_script("profile_decode")


def test_busy_time_is_the_union_of_kernel_intervals(pd):
    # Two overlapping kernels on different streams, one nested inside another, a gap, a touching pair.
    events = [(0, 10, "a"), (5, 20, "b"), (6, 8, "c"), (30, 40, "d"), (40, 45, "e")]
    assert pd.busy_ns(events) == 20 + 15
    assert pd.busy_ns(list(reversed(events))) == 35
    assert pd.busy_ns([]) == 0


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("void kbit::cuda::(anonymous namespace)::gemv_kernel<true, 4, 1, true>(...)", "kbit matmul"),
        (
            "void kbit::cuda::sum_splits_kernel<true>(float const*, long, long, unsigned short*)",
            "kbit matmul",
        ),
        ("void kbit::cuda::dequantize_vec_kernel<4>(...)", "kbit other"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64", "gemm (cuBLAS/cutlass/triton)"),
        ("nvjet_tst_64x8_64x16_4x1_v_bz_TNT", "gemm (cuBLAS/cutlass/triton)"),
        ("loop_multiply_fusion_3", "XLA fusion"),
        ("MemcpyD2D", "copy / memset"),
        ("some_custom_kernel", "other"),
    ],
)
def test_kernel_groups(pd, name, group):
    assert pd.group_of(name) == group
