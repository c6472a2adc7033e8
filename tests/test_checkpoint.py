"""jax_kbit.checkpoint: safetensors and orbax round trips of trees with QuantizedArray leaves."""

from __future__ import annotations

import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors")
from conftest import BF16, assert_bitwise_equal

import jax_kbit as jk
from jax_kbit import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("cpu")


def _is_qa(x):
    return isinstance(x, (jk.QuantizedArray, jk.QuantizedMatrix))


def _stored(x):
    return x.t if isinstance(x, jk.QuantizedMatrix) else x


def make_tree(rng):
    x = rng.standard_normal((40, 100)).astype(np.float32)
    return {
        "enc": {
            "w4": jk.quantize(x, 4),
            "w2_bf16": jk.quantize(x.astype(BF16), 2, scale_format="f16"),
            "b": jnp.asarray(rng.standard_normal(7), jnp.bfloat16),
        },
        "layers": [
            jk.quantize(
                x[:3, :33].astype(np.float16), 5, scale_format="f32", codebook=jk.codebooks.uniform(5)
            ),
            jk.quantize(x.reshape(2, 20, 100), 3, codebook=jk.codebooks.normal_float(3)),
            jnp.arange(5, dtype=jnp.int32),
        ],
        "scalar": jnp.float32(1.5),
    }


def make_tree_with_matrices(rng):
    w = rng.standard_normal((100, 40)).astype(np.float32)
    return {
        "dense": {"kernel": jk.quantize_matrix(w, 4), "bias": jnp.zeros(40, jnp.float32)},
        "stack": jk.quantize_matrix(w.reshape(2, 50, 40).astype(BF16), 3, scale_format="f16"),
        "table": jk.quantize(w, 5),
    }


def assert_same_tree(a, b):
    la, ta = jax.tree_util.tree_flatten(a, is_leaf=_is_qa)
    lb, tb = jax.tree_util.tree_flatten(b, is_leaf=_is_qa)
    assert ta == tb, f"{ta} != {tb}"
    for x, y in zip(la, lb):
        assert type(x) is type(y) or not (_is_qa(x) or _is_qa(y))
        if _is_qa(x):
            assert x.shape == y.shape
            x, y = _stored(x), _stored(y)
            assert (x.k, x.d, x.dtype, x.scale_format) == (y.k, y.d, y.dtype, y.scale_format)
            for f in ckpt.QUANTIZED_FIELDS:
                assert_bitwise_equal(np.asarray(getattr(y, f)), np.asarray(getattr(x, f)), f, nan_bits=True)
        else:
            assert_bitwise_equal(np.asarray(y), np.asarray(x), nan_bits=True)


def as_nested_dicts(tree):
    """What a load without target gives: containers as dicts keyed by strings."""
    if isinstance(tree, dict):
        return {str(k): as_nested_dicts(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return {str(i): as_nested_dicts(v) for i, v in enumerate(tree)}
    return tree


# ---------------------------------------------------------------- safetensors


def test_safetensors_round_trip_bit_for_bit(tmp_path, rng):
    tree = make_tree(rng)
    path = ckpt.save_safetensors(tree, tmp_path / "m.safetensors", metadata={"note": "hello"})
    back = ckpt.load_safetensors(path)
    assert_same_tree(back, as_nested_dicts(tree))
    # The dequantized values agree too (same bits in, same kernels).
    np.testing.assert_array_equal(
        np.asarray(back["enc"]["w4"].dequantize()), np.asarray(tree["enc"]["w4"].dequantize())
    )
    assert ckpt.read_metadata(path)["note"] == "hello"
    flat = ckpt.load_safetensors(path, nested=False, as_numpy=True)
    assert "layers.1" in flat and isinstance(flat["layers.1"].packed, np.ndarray)
    assert flat["layers.1"].shape == (2, 20, 100)


def test_safetensors_readable_by_other_tools(tmp_path, rng):
    from safetensors import safe_open

    tree = make_tree(rng)
    path = ckpt.save_safetensors(tree, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="np") as f:
        names = set(f.keys())
        meta = f.metadata()
        packed = f.get_tensor("enc.w4.packed")
    for field in ckpt.QUANTIZED_FIELDS:
        assert f"enc.w4.{field}" in names and f"layers.0.{field}" in names
    assert "layers.2" in names and "scalar" in names
    info = json.loads(meta["jax_kbit"])
    # no QuantizedMatrix: version 1, as jax-kbit 0.1 wrote (and reads)
    assert info["format"] == "jax-kbit" and info["format_version"] == 1
    assert info["quantized"]["enc.w2_bf16"] == {
        "k": 2,
        "d": 100,
        "dtype": "bfloat16",
        "scale_format": "f16",
        "shape": [40, 100],
    }
    assert set(info["quantized"]) == {"enc.w4", "enc.w2_bf16", "layers.0", "layers.1"}
    assert_bitwise_equal(packed, np.asarray(tree["enc"]["w4"].packed))


def test_safetensors_flat_dotted_names_are_kept(tmp_path, rng):
    w = {"encoder.layer.0.dense.weight": rng.standard_normal((8, 64)).astype(np.float32), "a.b": np.ones(3)}
    q = jk.quantize_params(w, 4, min_size=0)
    path = ckpt.save_safetensors(q, tmp_path / "f.safetensors")
    flat = ckpt.load_safetensors(path, nested=False)
    assert set(flat) == {"encoder.layer.0.dense.weight", "a.b"}
    assert _is_qa(flat["encoder.layer.0.dense.weight"])
    nested = ckpt.load_safetensors(path)
    assert _is_qa(nested["encoder"]["layer"]["0"]["dense"]["weight"])


def test_safetensors_user_metadata_checks(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        ckpt.save_safetensors({"a": np.ones(2)}, tmp_path / "x.safetensors", metadata={"jax_kbit": "{}"})
    with pytest.raises(TypeError, match="str to str"):
        ckpt.save_safetensors({"a": np.ones(2)}, tmp_path / "x.safetensors", metadata={"n": 1})
    with pytest.raises(ValueError, match="share the path|stored under"):
        ckpt.save_safetensors({"a.b": np.ones(2), "a": {"b": np.ones(2)}}, tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.save_safetensors({"a": np.ones(2)}, tmp_path / "no" / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_safetensors_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_safetensors(tmp_path / "missing.safetensors")
    with pytest.raises(IsADirectoryError):
        ckpt.load_safetensors(tmp_path)
    junk = tmp_path / "junk.safetensors"
    for content in (b"", b"abc", b"hello world, this is not a checkpoint", struct.pack("<Q", 4) + b"[1,2"):
        junk.write_bytes(content)
        with pytest.raises(ckpt.CheckpointFormatError, match="not a safetensors file"):
            ckpt.load_safetensors(junk)
    # A truncated file: the header promises more data than there is.
    good = ckpt.save_safetensors({"a": np.arange(100, dtype=np.float32)}, tmp_path / "g.safetensors")
    junk.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(ckpt.CheckpointFormatError):
        ckpt.load_safetensors(junk)


def test_safetensors_wrong_format_version(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "v99.safetensors"
    meta = {"jax_kbit": json.dumps({"format": "jax-kbit", "format_version": 99, "quantized": {}})}
    save_file({"a": np.ones(3, np.float32)}, str(path), metadata=meta)
    with pytest.raises(ckpt.CheckpointFormatError, match="version 99 is not supported"):
        ckpt.load_safetensors(path)
    save_file({"a": np.ones(3, np.float32)}, str(path), metadata={"jax_kbit": "not json"})
    with pytest.raises(ckpt.CheckpointFormatError, match="not JSON"):
        ckpt.load_safetensors(path)
    # A plain safetensors file (no jax-kbit entry) loads as plain arrays.
    save_file({"x.y": np.ones(3, np.float32)}, str(path))
    assert ckpt.load_safetensors(path)["x"]["y"].shape == (3,)


def test_safetensors_write_is_atomic(tmp_path, rng, monkeypatch):
    import safetensors

    dest = tmp_path / "m.safetensors"
    ckpt.save_safetensors({"old": np.zeros(4, np.float32)}, dest)
    before = dest.read_bytes()

    def broken(specs, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors, "serialize_file", broken)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_safetensors(make_tree(rng), dest)
    assert dest.read_bytes() == before  # the old file is untouched ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # ... and no temporary is left
    monkeypatch.undo()
    ckpt.save_safetensors({"new": np.ones(2, np.float32)}, dest)  # replacing an existing file works
    assert set(ckpt.load_safetensors(dest)) == {"new"}


def test_safetensors_vmapped_quantized_array(tmp_path, rng):
    xs = rng.standard_normal((3, 16, 64)).astype(np.float32)
    q = jax.vmap(lambda x: jk.quantize(x, 4))(jnp.asarray(xs))
    assert q.codebook.shape == (3, 16)
    back = ckpt.load_safetensors(ckpt.save_safetensors({"q": q}, tmp_path / "v.safetensors"))
    assert_same_tree(back, {"q": q})
    np.testing.assert_array_equal(
        np.asarray(jax.vmap(jk.dequantize)(back["q"])), np.asarray(jax.vmap(jk.dequantize)(q))
    )


def test_safetensors_quantized_matrix_round_trip_and_metadata(tmp_path, rng):
    from safetensors import safe_open

    tree = make_tree_with_matrices(rng)
    path = ckpt.save_safetensors(tree, tmp_path / "m.safetensors")
    back = ckpt.load_safetensors(path)
    assert isinstance(back["dense"]["kernel"], jk.QuantizedMatrix) and isinstance(
        back["table"], jk.QuantizedArray
    )
    assert_same_tree(back, tree)
    x = jnp.asarray(rng.standard_normal((2, 100)), jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(jk.matmul(x, back["dense"]["kernel"])), np.asarray(jk.matmul(x, tree["dense"]["kernel"]))
    )
    with safe_open(str(path), framework="np") as f:
        info = json.loads(f.metadata()["jax_kbit"])
        packed = f.get_tensor("dense.kernel.packed")
    assert info["format_version"] == 2 == ckpt.FORMAT_VERSION
    # the stored tensors are those of W^T ([out, nb, k]); shape is W's logical [in, out]
    assert packed.shape == (40, 4, 4)
    assert info["quantized"]["dense.kernel"] == {
        "k": 4,
        "d": 100,
        "dtype": "float32",
        "scale_format": "e4m4",
        "shape": [100, 40],
        "layout": "matrix",
    }
    assert (
        info["quantized"]["stack"]["shape"] == [2, 50, 40] and info["quantized"]["table"]["layout"] == "array"
    )


def _rewrite_kbit_meta(src, dst, edit):
    """Copy a safetensors file with its jax_kbit metadata changed by ``edit(info)``."""
    from safetensors.numpy import save_file

    with open(src, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    info = json.loads(header["__metadata__"]["jax_kbit"])
    edit(info)
    tensors = ckpt.load_safetensors(src, nested=False, as_numpy=True)
    flat = {}
    for name, leaf in tensors.items():
        if _is_qa(leaf):
            for field in ckpt.QUANTIZED_FIELDS:
                flat[f"{name}.{field}"] = np.asarray(getattr(_stored(leaf), field))
        else:
            flat[name] = np.asarray(leaf)
    save_file(flat, str(dst), metadata={"jax_kbit": json.dumps(info)})


def test_safetensors_bad_layout_metadata(tmp_path, rng):
    src = ckpt.save_safetensors(make_tree_with_matrices(rng), tmp_path / "m.safetensors")
    bad = tmp_path / "bad.safetensors"
    cases = [
        (lambda i: i["quantized"]["dense.kernel"].update(layout="columns"), "unknown layout 'columns'"),
        (lambda i: i["quantized"]["dense.kernel"].pop("layout"), "no 'layout'"),
        (lambda i: i["quantized"]["dense.kernel"].update(shape=[40, 100]), "metadata says"),
        (lambda i: i["quantized"]["table"].update(layout="matrix"), "metadata says"),
    ]
    for edit, match in cases:
        _rewrite_kbit_meta(src, bad, edit)
        with pytest.raises(ckpt.CheckpointFormatError, match=match):
            ckpt.load_safetensors(bad)
    # a version-1 file has no layouts: its entries are arrays
    _rewrite_kbit_meta(src, bad, lambda i: [i.update(format_version=1), i["quantized"].pop("dense.kernel")])
    with pytest.raises(ckpt.CheckpointFormatError, match="metadata says"):  # 'stack' read as an array
        ckpt.load_safetensors(bad)


# ---------------------------------------------------------------- orbax


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    pytest.importorskip("orbax.checkpoint")
    rng = np.random.default_rng(7)
    tree = make_tree(rng)
    path = tmp_path_factory.mktemp("orbax") / "ckpt"
    ckpt.save_checkpoint(path, tree)
    return tree, path


def test_orbax_round_trip_with_target(saved):
    tree, path = saved
    back = ckpt.restore_checkpoint(path, target=tree)
    assert isinstance(back["layers"], list)
    assert_same_tree(back, tree)


def test_orbax_round_trip_with_abstract_target(saved):
    tree, path = saved
    abstract = jax.eval_shape(lambda: tree)
    assert isinstance(abstract["enc"]["w4"].packed, jax.ShapeDtypeStruct)
    back = ckpt.restore_checkpoint(path, target=abstract)
    assert_same_tree(back, tree)


def test_orbax_round_trip_without_target(saved):
    tree, path = saved
    back = ckpt.restore_checkpoint(path)
    assert_same_tree(back, as_nested_dicts(tree))


def test_orbax_target_mismatch_is_a_clear_error(saved, rng):
    tree, path = saved
    other = dict(tree)
    other["enc"] = dict(tree["enc"], w4=jk.quantize(np.ones((40, 100), np.float32), 3))
    with pytest.raises(ValueError, match=r"enc\.w4: checkpoint has QuantizedArray\(shape=\(40, 100\), k=4"):
        ckpt.restore_checkpoint(path, target=other)
    with pytest.raises(ValueError, match=r"in the target but not the checkpoint: \['extra'\]"):
        ckpt.restore_checkpoint(path, target={**tree, "extra": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"in the checkpoint but not the target"):
        ckpt.restore_checkpoint(path, target={"enc": tree["enc"]})
    plain = dict(tree, scalar=jnp.zeros((), jnp.float16))
    with pytest.raises(ValueError, match=r"scalar: checkpoint has array\(shape=\(\), dtype=float32\)"):
        ckpt.restore_checkpoint(path, target=plain)


def test_orbax_quantized_matrix_round_trip(tmp_path, rng):
    pytest.importorskip("orbax.checkpoint")
    tree = make_tree_with_matrices(rng)
    path = ckpt.save_checkpoint(tmp_path / "m", tree)
    assert_same_tree(ckpt.restore_checkpoint(path, target=tree), tree)
    back = ckpt.restore_checkpoint(path, target=jax.eval_shape(lambda: tree))
    assert isinstance(back["dense"]["kernel"], jk.QuantizedMatrix)
    assert_same_tree(back, tree)
    assert_same_tree(ckpt.restore_checkpoint(path), tree)  # all keys are strings already
    # a target that wants a QuantizedArray where the checkpoint has a QuantizedMatrix
    other = dict(tree, dense=dict(tree["dense"], kernel=tree["dense"]["kernel"].t))
    with pytest.raises(ValueError, match=r"dense\.kernel: checkpoint has QuantizedMatrix\(shape=\(100, 40\)"):
        ckpt.restore_checkpoint(path, target=other)


def test_orbax_version_1_checkpoint_and_matrix_target(saved):
    tree, path = saved  # no matrices: written as version 1
    other = dict(tree, enc=dict(tree["enc"], w4=jk.QuantizedMatrix(tree["enc"]["w4"])))
    with pytest.raises(
        ValueError, match=r"enc\.w4: checkpoint has QuantizedArray.*target wants QuantizedMatrix"
    ):
        ckpt.restore_checkpoint(path, target=other)


def test_orbax_save_and_restore_errors(saved, tmp_path):
    tree, path = saved
    with pytest.raises(FileExistsError, match="force=True"):
        ckpt.save_checkpoint(path, tree)
    with pytest.raises(FileNotFoundError):
        ckpt.restore_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointFormatError, match="not a jax-kbit orbax checkpoint"):
        ckpt.restore_checkpoint(tmp_path / "empty")


def test_orbax_force_replaces(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    path = tmp_path / "c"
    ckpt.save_checkpoint(path, {"a": jnp.ones(3)})
    ckpt.save_checkpoint(path, {"b": jk.quantize(np.ones((2, 32), np.float32), 2)}, force=True)
    back = ckpt.restore_checkpoint(path)
    assert set(back) == {"b"} and _is_qa(back["b"])
    assert sorted(os.listdir(tmp_path)) == ["c"]


def test_safetensors_file_mode_follows_umask(tmp_path):
    path = ckpt.save_safetensors({"a": np.ones(2, np.float32)}, tmp_path / "m.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_safetensors_plain_leaf_dtypes(tmp_path):
    import ml_dtypes

    tree = {
        "f8a": np.arange(8).astype(ml_dtypes.float8_e4m3fn),
        "f8b": np.arange(8).astype(ml_dtypes.float8_e5m2),
        "bf": np.linspace(-1, 1, 5).astype(BF16),
        "f64": np.linspace(-1, 1, 5),
        "flag": np.array([True, False]),
        "i8": np.arange(-3, 3, dtype=np.int8),
        "u64": np.array([2**63 + 1], dtype=np.uint64),
    }
    back = ckpt.load_safetensors(ckpt.save_safetensors(tree, tmp_path / "d.safetensors"), as_numpy=True)
    assert set(back) == set(tree)
    for name, a in tree.items():
        assert_bitwise_equal(back[name], a, name)
    with pytest.raises(TypeError, match="cannot be stored"):
        ckpt.save_safetensors({"s": np.array(["text"])}, tmp_path / "s.safetensors")
