"""bench/make_variants.sh: a variant directory holds the files in which a branch merged into main differs
from HEAD, so that overlaying them on HEAD's tree gives that merge."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "make_variants.sh"


def _git_version() -> tuple[int, ...]:
    if shutil.which("git") is None:
        return (0,)
    out = subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.split()[-1]
    return tuple(int(p) for p in out.split(".")[:2] if p.isdigit())


# git merge-tree --write-tree came with git 2.38.
pytestmark = pytest.mark.skipif(_git_version() < (2, 38), reason="needs git >= 2.38")


def _git(repo: Path, *args: str) -> str:
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    out = subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True, env=env)
    return out.stdout


def _one_file_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    (repo / "f").write_text("1\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "one")
    return repo


def test_variants_from_branches(tmp_path):
    repo = tmp_path / "repo"
    (repo / "ffi").mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    (repo / "ffi" / "a.cu").write_text("a main\n")
    (repo / "ffi" / "b.cu").write_text("b main\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "main")
    _git(repo, "checkout", "-qb", "feature")
    (repo / "ffi" / "a.cu").write_text("a feature\n")
    (repo / "ffi" / "new.h").write_text("new\n")
    _git(repo, "commit", "-qam", "feature")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "new file")
    _git(repo, "checkout", "-q", "main")
    (repo / "ffi" / "b.cu").write_text("b main 2\n")  # main moves on after the branch
    _git(repo, "commit", "-qam", "main 2")

    out = subprocess.run(
        ["bash", str(SCRIPT), "base=main", "feat=feature"],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "base: 0 file(s)" in out and "feat: 2 file(s)" in out
    feat = repo / ".variants" / "feat"
    assert (feat / "ffi" / "a.cu").read_text() == "a feature\n"
    assert (feat / "ffi" / "new.h").read_text() == "new\n"
    assert (feat / ".variant").read_text() == "feature\n"  # its source; base is never an empty directory
    assert (repo / ".variants" / "base" / ".variant").read_text() == "main\n"
    assert not (feat / "ffi" / "b.cu").exists()  # the merge keeps main's b.cu, which HEAD already has
    assert "/.variants/" in (repo / ".git" / "info" / "exclude").read_text()
    assert _git(repo, "status", "--porcelain") == ""  # the variants are not part of the tree
    # the commit the overlays are relative to, for ab_variants.sh to check against the carried tree
    assert (repo / ".variants" / ".head").read_text().strip() == _git(repo, "rev-parse", "HEAD").strip()


def test_a_branch_that_conflicts_with_main_is_refused(tmp_path):
    repo = _one_file_repo(tmp_path)
    _git(repo, "checkout", "-qb", "other")
    (repo / "f").write_text("2\n")
    _git(repo, "commit", "-qam", "two")
    _git(repo, "checkout", "-q", "main")
    (repo / "f").write_text("3\n")
    _git(repo, "commit", "-qam", "three")
    run = subprocess.run(["bash", str(SCRIPT), "x=other"], cwd=repo, capture_output=True, text=True)
    assert run.returncode != 0 and "does not merge cleanly" in run.stderr


def test_environment_variants_reuse_another_build(tmp_path):
    repo = _one_file_repo(tmp_path)
    out = subprocess.run(
        ["bash", str(SCRIPT), "sweep=main", "s4=@sweep:KNOB=4,OTHER=x", "plain=@sweep"],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "s4: the build of sweep with KNOB=4,OTHER=x" in out
    s4 = repo / ".variants" / "s4"
    assert (s4 / ".build_as").read_text() == "sweep\n"
    assert (s4 / ".env").read_text() == "KNOB=4\nOTHER=x\n"
    assert sorted(p.name for p in s4.iterdir()) == [".build_as", ".env", ".variant"]  # no files of its own
    plain = repo / ".variants" / "plain"
    assert (plain / ".build_as").read_text() == "sweep\n" and not (plain / ".env").exists()


def test_variant_from_a_patch_file(tmp_path):
    repo = _one_file_repo(tmp_path)
    (repo / "f").write_text("2\n")
    (repo / "g").write_text("new\n")
    _git(repo, "add", "-N", "g")
    (repo / "p.patch").write_text(
        "What this variant is for, above the diff (git apply skips it).\n\n" + _git(repo, "diff")
    )
    _git(repo, "checkout", "-q", "f")
    _git(repo, "rm", "-q", "--cached", "g")
    (repo / "g").unlink()
    out = subprocess.run(
        ["bash", str(SCRIPT), "v=p.patch"], cwd=repo, check=True, capture_output=True, text=True
    ).stdout
    assert "v: 2 file(s) from p.patch" in out
    v = repo / ".variants" / "v"
    assert (v / "f").read_text() == "2\n" and (v / "g").read_text() == "new\n"
    assert (repo / "f").read_text() == "1\n" and not (repo / "g").exists()  # HEAD's tree untouched
    (repo / "f").write_text("3\n")
    _git(repo, "commit", "-qam", "f moves on")  # the patch no longer applies
    run = subprocess.run(["bash", str(SCRIPT), "v=p.patch"], cwd=repo, capture_output=True, text=True)
    assert run.returncode != 0 and "does not apply to HEAD" in run.stderr
    run = subprocess.run(["bash", str(SCRIPT), "v=missing.patch"], cwd=repo, capture_output=True, text=True)
    assert run.returncode != 0 and "no patch file missing.patch" in run.stderr


def test_prepared_variants_still_apply_to_the_tree():
    root = SCRIPT.parent.parent
    patches = sorted((root / "bench" / "variants").glob("*.patch"))
    if not patches or not (root / ".git").exists():
        pytest.skip("no prepared variants, or not a git checkout")
    for patch in patches:
        run = subprocess.run(
            ["git", "apply", "--check", str(patch)], cwd=root, capture_output=True, text=True
        )
        assert run.returncode == 0, f"{patch.name} no longer applies (refresh or delete it): {run.stderr}"
