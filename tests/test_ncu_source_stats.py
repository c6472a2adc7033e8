"""bench/ncu_source_stats.py reads ncu's per-instruction CSV page and sums it the way RESULTS.md quotes it."""

from __future__ import annotations

import pytest
from conftest import load_bench_script

HEADER = (
    '"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed",'
    '"L1 Tag Requests Global","L2 Theoretical Sectors Global","L1 Wavefronts Shared",'
    '"stall_long_sb","stall_mio","stall_long_sb (Not Issued)"'
)
ROWS = [
    '"0x7f0000000000","      LDG.E.128.CONSTANT R4, desc[UR4][R2.64]","10","100","800","1600","0","2","8","1"',
    '"0x7f0000000010","      IMAD.U32 R4, R4, 0x10000, RZ","30","100","0","0","0","27","3","20"',
    '"0x7f0000000020","@!P0   LDS R5, [R6]","20","300","0","0","600","5","15","4"',
    '"0x7f0000000030","      LDS.64 R8, [R6+0x10]","0","100","0","0","200","0","0","0"',
    '"0x7f0000000040","      EXIT","0","n/a","0","0","0","0","0","0"',
]


@pytest.fixture(scope="module")
def ns():
    return load_bench_script("ncu_source_stats")


@pytest.fixture
def page(tmp_path):
    path = tmp_path / "page.csv"
    path.write_text('"Kernel Name","void k(float *)",\n' + HEADER + "\n" + "\n".join(ROWS) + "\n")
    return str(path)


def test_reads_rows_and_opcodes(ns, page):
    instrs = ns.read_source_page(page)
    assert [i.opcode for i in instrs] == ["LDG", "IMAD", "LDS", "LDS", "EXIT"]
    assert instrs[2].get("Instructions Executed") == 300
    assert "Instructions Executed" not in instrs[4].values  # "n/a" is not a number, not a zero


def test_stall_reasons_ignore_not_issued_columns(ns, page):
    reasons = ns.stall_reasons(ns.read_source_page(page))
    assert reasons == pytest.approx({"long_sb": 34 / 60, "mio": 26 / 60})
    assert list(reasons) == ["long_sb", "mio"]


def test_opcode_mix_and_memory(ns, page):
    instrs = ns.read_source_page(page)
    mix = {op: (e, s) for op, e, s in ns.opcode_mix(instrs)}
    assert mix["LDS"] == pytest.approx((400 / 600, 20 / 60))
    assert mix["IMAD"] == pytest.approx((100 / 600, 30 / 60))
    mem = ns.memory_by_kind(instrs)
    assert set(mem) == {"LDG", "LDS"}
    assert mem["LDS"]["L1 Wavefronts Shared"] == 800
    assert mem["LDG"]["L2 Theoretical Sectors Global"] == 1600


def test_rejects_other_csv(ns, tmp_path):
    path = tmp_path / "other.csv"
    path.write_text('"ID","Kernel Name"\n"0","k"\n')
    with pytest.raises(SystemExit, match="Address,Source"):
        ns.read_source_page(str(path))


def test_main_prints_summary(ns, page, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["ncu_source_stats.py", page, "--per", "2", "--top", "2"])
    ns.main()
    out = capsys.readouterr().out
    assert "long_sb" in out and "56.7 %" in out
    assert "IMAD.U32 R4" in out  # the most sampled instruction is listed first
    memory = out.split("memory instructions per 2")[1].split("top 2 instructions")[0]
    lds_line = next(line for line in memory.splitlines() if line.strip().startswith("LDS "))
    assert lds_line.split()[1:] == ["200.0", "0.0", "0.0", "400.0"]
