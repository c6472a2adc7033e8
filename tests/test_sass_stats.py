"""bench/sass_stats.py parses cuobjdump's SASS listing and measures loop iterations by a marker opcode."""

from __future__ import annotations

import pytest
from conftest import load_bench_script

LISTING = """
	code for sm_90
		Function : _Z6kernelPf
	.headerflags	@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
                                                                          /* 0x000fe20000000800 */
        /*0010*/                   R2P PR, R12, 0xf ;                     /* 0x0000000f0c007804 */
        /*0020*/               @P0 STG.E.128 desc[UR10][R12.64], R16 ;  /* 0x0000001000007986 */
        /*0030*/                   FFMA R1, R2, R3, R4 ;                  /* 0x0000000302017223 */
        /*0040*/                   R2P PR, R13, 0xf ;                     /* 0x0000000f0d007804 */
        /*0050*/              @!P1 FMUL R1, R2, R3 ;                      /* 0x0000000302017220 */
        /*0060*/                   FFMA R1, R2, R3, R4 ;                  /* 0x0000000302017223 */
        /*0070*/                   R2P PR, R14, 0xf ;                     /* 0x0000000f0e007804 */
        /*0080*/                   R2P PR, R15, 0xf ;                     /* 0x0000000f0f007804 */
        /*0090*/                   EXIT ;                                 /* 0x000000000000794d */
		Function : _Z5otherv
        /*0000*/                   EXIT ;                                 /* 0x000000000000794d */
"""


@pytest.fixture(scope="module")
def ss():
    return load_bench_script("sass_stats")


def test_parse_sass_drops_guards_and_encodings(ss):
    k = ss.parse_sass(LISTING)
    assert list(k) == ["_Z6kernelPf", "_Z5otherv"]
    ops = [i.split()[0] for i in k["_Z6kernelPf"]]
    assert ops == ["LDC", "R2P", "STG.E.128", "FFMA", "R2P", "FMUL", "FFMA", "R2P", "R2P", "EXIT"]
    assert k["_Z5otherv"] == ["EXIT"]


def test_marker_spacing_is_the_mean_over_the_middle_half(ss):
    ops = [i.split()[0] for i in ss.parse_sass(LISTING)["_Z6kernelPf"]]
    count, mean = ss.marker_spacing(ops, "R2P")  # R2P at 1, 4, 7, 8: middle half from index 1 to 3
    assert count == 4 and mean == pytest.approx((8 - 4) / 2)
    assert ss.marker_spacing(ops, "HMMA") == (0, None)
