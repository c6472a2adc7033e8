"""``python -m jax_kbit``, the installation self-check: it passes on a good install and reports failures."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import numpy as np

import jax_kbit

selfcheck = importlib.import_module("jax_kbit.__main__")


def test_self_check_passes_on_the_cpu():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(
        [sys.executable, "-P", "-m", "jax_kbit"], capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert out.rstrip().splitlines()[-1].startswith("PASS")
    assert "kbit_dequantize_tiled" in out  # the registered targets are listed
    tiled = out[out.index("tiled matrices vs row order") :].splitlines()[1:5]
    assert [line.split(":")[0].strip() for line in tiled] == ["K=2", "K=3", "K=4", "K=5"]
    assert all(line.endswith("PASS") for line in tiled), tiled


def test_self_check_reports_wrong_results(monkeypatch, capsys):
    real = selfcheck.reference.dequantize_ref
    monkeypatch.setattr(selfcheck.reference, "dequantize_ref", lambda *a, **k: real(*a, **k) + np.float32(1))
    assert not selfcheck._exactness_check()
    assert not selfcheck._tiled_check()
    out = capsys.readouterr().out
    assert "dequantized differ" in out and "FAIL: dequantize differ" in out


def test_self_check_reports_a_tiled_product_that_differs(monkeypatch, capsys):
    real = jax_kbit.matmul

    def off_by_one_when_tiled(x, w, **kw):
        y = real(x, w, **kw)
        return y + 1 if w.tiled else y

    monkeypatch.setattr(jax_kbit, "matmul", off_by_one_when_tiled)
    assert not selfcheck._tiled_check()
    out = capsys.readouterr().out
    assert "FAIL: matmul of 1 rows, matmul of 16 rows differ" in out
