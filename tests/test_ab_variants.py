"""bench/ab_variants.sh with stand-ins for python3 and nvidia-smi: which variants are built, which install and
environment each run gets, and the order of the rounds."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "ab_variants.sh"

FAKE_PYTHON = """#!/usr/bin/env bash
# Records each call; "pip install --target DIR" makes DIR/jax_kbit.
echo "$* | PYTHONPATH=${PYTHONPATH:-} | KNOB=${KNOB:-}" >>"$FAKE_LOG"
prev=
for a in "$@"; do
  [ "$prev" = --target ] && mkdir -p "$a/jax_kbit"
  prev=$a
done
exit 0
"""


def _fake_tools(tmp_path: Path) -> Path:
    """A directory of stand-ins for python3 and nvidia-smi, to put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, text in (("python3", FAKE_PYTHON), ("nvidia-smi", "#!/bin/sh\necho fake GPU\n")):
        (bin_dir / tool).write_text(text)
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def _repo(tmp_path: Path) -> Path:
    """A tree holding the script and an empty bench/ab_time.py (the fake python3 runs nothing)."""
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "bench" / "ab_variants.sh")
    (repo / "bench" / "ab_time.py").write_text("")
    return repo


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None, reason="needs bash and tar")
def test_builds_each_build_once_and_runs_env_variants(tmp_path):
    repo = _repo(tmp_path)
    variants = repo / ".variants"
    for name in ("base", "sweep"):
        (variants / name).mkdir(parents=True)
        (variants / name / ".variant").write_text(name + "\n")
    (variants / "s1").mkdir()
    (variants / "s1" / ".build_as").write_text("sweep\n")
    (variants / "s1" / ".env").write_text("KNOB=1\nnot an assignment\n")
    bin_dir = _fake_tools(tmp_path)
    log = tmp_path / "calls.log"
    work = tmp_path / "work"
    env = dict(
        os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), OUT=str(tmp_path / "out")
    )
    env["AB_WORK"] = str(work)
    env.pop("KNOB", None)
    out = subprocess.run(
        ["bash", "bench/ab_variants.sh", "base", "s1"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    calls = log.read_text().splitlines()
    builds = sorted(c.split("--target ")[1].split()[0] for c in calls if "pip install" in c)
    assert builds == [f"{work}/inst_base", f"{work}/inst_sweep"]  # s1 runs sweep's build, not its own
    runs = [c for c in calls if "ab_time.py --label" in c]
    labels = [c.split("--label ")[1].split()[0] for c in runs]
    assert labels == ["base", "s1", "s1", "base"]  # two rounds, the second in reverse
    for c in runs:
        label = c.split("--label ")[1].split()[0]
        want_inst, want_knob = (f"{work}/inst_sweep", "1") if label == "s1" else (f"{work}/inst_base", "")
        assert f"PYTHONPATH={want_inst} |" in c and c.endswith(f"KNOB={want_knob}"), c
    assert any("--summary" in c for c in calls)
    assert (tmp_path / "out" / "ab_logs.tgz").exists()


def test_no_variants_is_a_clear_error(tmp_path):
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "bench" / "ab_variants.sh")
    env = dict(os.environ, OUT=str(tmp_path / "out"), AB_WORK=str(tmp_path / "work"))
    out = subprocess.run(["bash", "bench/ab_variants.sh"], cwd=repo, env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "no variants" in out.stderr
    assert not (tmp_path / "work").exists()  # stopped before any build


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None, reason="needs bash and tar")
def test_variants_made_against_another_commit_stop_the_run(tmp_path):
    # A variant with no files is the carried tree itself: made against commit A, run on a tree of commit B, it
    # is B, whatever its name says.
    repo = _repo(tmp_path)
    (repo / ".variants" / "base").mkdir(parents=True)
    (repo / ".variants" / "base" / ".variant").write_text("main\n")
    (repo / ".variants" / ".head").write_text("fb40e95" + "0" * 33 + "\n")
    bin_dir = _fake_tools(tmp_path)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_LOG=str(tmp_path / "calls.log"),
        OUT=str(tmp_path / "out"),
        AB_WORK=str(tmp_path / "work"),
        ROUNDS="1",
    )
    env.pop("AB_STALE_OK", None)

    def run(**extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "bench/ab_variants.sh", "base"],
            cwd=repo,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )

    out = run(KBIT_COMMIT="ce85705")
    assert out.returncode == 2 and "made against fb40e95" in out.stderr and "ce85705" in out.stderr
    assert not (tmp_path / "work").exists()  # stopped before any build
    assert run(KBIT_COMMIT="fb40e95").returncode == 0
    assert run(KBIT_COMMIT="ce85705", AB_STALE_OK="1").returncode == 0
