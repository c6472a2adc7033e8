"""Saving and loading parameter trees that hold ``QuantizedArray`` and ``QuantizedMatrix`` leaves.

Two containers:

- **safetensors** (``save_safetensors`` / ``load_safetensors``): one file that other tools can read. A
  quantized leaf at path ``p`` is stored as the tensors ``p.packed``, ``p.scales``, ``p.codebook`` and
  ``p.tensor_scale`` (for a ``QuantizedMatrix``, those of its ``QuantizedArray`` ``t`` of ``W^T``); plain
  array leaves are stored under ``p``. The header's ``__metadata__`` holds, under the key ``"jax_kbit"``, a
  JSON object ``{"format": "jax-kbit", "format_version": V, "quantized": {p: {"k", "d", "dtype",
  "scale_format", "shape"[, "layout"]}}}``. ``k``, ``d``, ``dtype`` and ``scale_format`` describe the stored
  format-v1 array; ``shape`` is the leaf's logical shape. Version 1 (written when the tree holds no
  ``QuantizedMatrix``, so older jax-kbit releases read it) has no ``layout``: every entry is a
  ``QuantizedArray``. Version 2 gives every entry a ``layout``: ``"array"``, or ``"matrix"`` for a
  ``QuantizedMatrix`` whose tensors are those of ``W^T`` (``[..., out, in]``, blocks along ``in``) and whose
  ``shape`` is ``W``'s ``[..., in, out]``. A leaf's path is its keys joined with ``"."`` (dict keys,
  sequence indices and attribute names as strings), so a flat dict with dotted names (a Hugging Face
  checkpoint) keeps its tensor names. Files without the ``"jax_kbit"`` entry (ordinary safetensors
  checkpoints) load as plain trees.
- **orbax** (``save_checkpoint`` / ``restore_checkpoint``): a directory written with orbax-checkpoint's
  composite checkpointer: item ``state`` holds every array as a nested dict, item ``kbit`` a JSON record of
  each leaf's path, kind, shape, dtype and (for quantized leaves) ``k``, ``d``, ``dtype``, ``scale_format``
  and (version 2, as above) ``layout``. Restoring with a ``target`` tree gives back the target's containers
  and shardings after checking that the structures agree.

Both round-trip every bit of every leaf. Writes are atomic: a temporary file or directory next to the
destination is renamed into place once complete.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from jax_kbit.quantized_array import QuantizedArray
from jax_kbit.quantized_matrix import QuantizedMatrix, can_tile
from jax_kbit.reference import SCALE_DTYPES

FORMAT_NAME = "jax-kbit"
FORMAT_VERSION = 2
"""The newest container version this release writes (only for trees with ``QuantizedMatrix`` leaves)."""
READABLE_VERSIONS = (1, 2)
LAYOUTS = ("array", "matrix")
METADATA_KEY = "jax_kbit"
QUANTIZED_FIELDS = ("packed", "scales", "codebook", "tensor_scale")

# safetensors dtype tags <-> NumPy dtypes (bfloat16 and the float8 types come from ml_dtypes).
_ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_SPEC_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointFormatError(ValueError):
    """A file or directory is not a (supported) jax-kbit / safetensors checkpoint."""


# ---------------------------------------------------------------- tree paths


def _key_str(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _is_qa(x: Any) -> bool:
    return isinstance(x, (QuantizedArray, QuantizedMatrix))


def _stored(leaf: QuantizedArray | QuantizedMatrix) -> QuantizedArray:
    """The format-v1 array whose four tensors are stored for a quantized leaf (a tiled matrix's in row
    order: files hold plain format v1 whatever the layout in memory, so every reader reads them)."""
    return leaf.t if isinstance(leaf, QuantizedMatrix) else leaf


def _described(leaf: QuantizedArray | QuantizedMatrix) -> QuantizedArray:
    """The ``QuantizedArray`` with the stored tensors' shapes, dtypes and shardings, without reordering a
    tiled matrix's words (the same shapes either way)."""
    return leaf.stored if isinstance(leaf, QuantizedMatrix) else leaf


def _layout(leaf: QuantizedArray | QuantizedMatrix) -> str:
    return "matrix" if isinstance(leaf, QuantizedMatrix) else "array"


def _version_for(leaves: list[tuple[str, Any]]) -> int:
    """1 when no leaf is a ``QuantizedMatrix`` (readable by jax-kbit 0.1), else 2."""
    return 2 if any(isinstance(leaf, QuantizedMatrix) for _, leaf in leaves) else 1


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """``[(path, leaf)]`` with ``QuantizedArray`` / ``QuantizedMatrix`` kept whole, paths joined with ``"."``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_qa)
    out, seen = [], set()
    for path, leaf in flat:
        name = ".".join(_key_str(k) for k in path)
        if not name:
            raise ValueError("the tree must be a container (a dict of arrays, ...), not a single array")
        if name in seen:
            raise ValueError(f"two leaves share the path {name!r} (keys that contain '.' are ambiguous)")
        seen.add(name)
        out.append((name, leaf))
    return out


def _host(a: Any, name: str) -> np.ndarray:
    if isinstance(a, jax.ShapeDtypeStruct):
        raise TypeError(f"leaf {name!r} is abstract (jax.ShapeDtypeStruct); save concrete arrays")
    arr = np.asarray(a)
    if arr.dtype not in _ST_NAMES:
        raise TypeError(f"leaf {name!r} has dtype {arr.dtype}, which cannot be stored")
    return arr if arr.flags.c_contiguous else arr.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)


def _quantized_meta(leaf: QuantizedArray | QuantizedMatrix, version: int) -> dict[str, Any]:
    q = _described(leaf)
    meta = {
        "k": int(q.k),
        "d": int(q.d),
        "dtype": np.dtype(q.dtype).name,
        "scale_format": str(q.scale_format),
        "shape": [int(s) for s in leaf.shape],
    }
    if version >= 2:
        meta["layout"] = _layout(leaf)
        if isinstance(leaf, QuantizedMatrix) and leaf.tiled:
            meta["tiled"] = True  # re-tiled when loaded; the tensors are in row order
    return meta


def _rebuild(
    parts: Mapping[str, Any], meta: Mapping[str, Any], version: int, where: str
) -> QuantizedArray | QuantizedMatrix:
    """The quantized leaf described by ``meta`` (one entry of the metadata) over its four stored tensors.

    Raises CheckpointFormatError for inconsistent metadata (unknown layout, shape that the tensors do not
    have, a version-2 entry without a layout).
    """
    layout = meta.get("layout", "array") if version >= 2 else "array"
    if version >= 2 and "layout" not in meta:
        raise CheckpointFormatError(f"{where}: no 'layout' in a version {version} record")
    if layout not in LAYOUTS:
        raise CheckpointFormatError(f"{where}: unknown layout {layout!r} (expected one of {LAYOUTS})")
    scale_format = meta["scale_format"]
    if scale_format not in SCALE_DTYPES or np.dtype(parts["scales"].dtype) != SCALE_DTYPES[scale_format]:
        raise CheckpointFormatError(f"{where}: scales do not match scale_format {scale_format!r}")
    q = QuantizedArray(
        **parts, k=meta["k"], d=meta["d"], dtype=np.dtype(meta["dtype"]), scale_format=scale_format
    )
    tiled = meta.get("tiled", False)
    if not isinstance(tiled, bool):
        raise CheckpointFormatError(f"{where}: 'tiled' must be true or false, got {tiled!r}")
    leaf = QuantizedMatrix(q) if layout == "matrix" else q
    if "shape" in meta and list(leaf.shape) != list(meta["shape"]):
        raise CheckpointFormatError(
            f"{where}: the tensors give a {type(leaf).__name__} of shape {leaf.shape}, the metadata says "
            f"{tuple(meta['shape'])}"
        )
    if tiled and isinstance(leaf, QuantizedMatrix):
        if not can_tile(q):
            raise CheckpointFormatError(f"{where}: 'tiled' is set, but shape {leaf.shape} cannot be tiled")
        leaf = leaf.with_tiles(True)
    return leaf


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for name, value in flat.items():
        parts = name.split(".")
        node = root
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(
                    f"cannot nest {name!r}: {'.'.join(parts[: i + 1])!r} is also a tensor; "
                    "load with nested=False"
                )
            node = child
        if parts[-1] in node:
            raise ValueError(
                f"cannot nest {name!r}: it is also a prefix of other names; load with nested=False"
            )
        node[parts[-1]] = value
    return root


def _atomic_target(path: Path) -> Path:
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"directory {str(parent)!r} does not exist")
    return parent


# ---------------------------------------------------------------- safetensors


def save_safetensors(tree: Any, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tree`` (arrays, ``QuantizedArray`` and ``QuantizedMatrix`` leaves) to a safetensors file, atomically.

    Args:
      tree: a pytree (usually a dict) of arrays, ``QuantizedArray`` s and ``QuantizedMatrix`` es.
      path: destination file; its directory must exist. Written to a temporary file in the same directory
        and renamed into place, so a reader never sees a half-written file.
      metadata: extra ``str -> str`` entries for the header (the key ``"jax_kbit"`` is reserved).

    Returns:
      The path written.
    """
    path = Path(path)
    parent = _atomic_target(path)
    user_meta = dict(metadata or {})
    for key, value in user_meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {type(value).__name__}")
    if METADATA_KEY in user_meta:
        raise ValueError(f"metadata key {METADATA_KEY!r} is reserved")

    tensors: dict[str, np.ndarray] = {}
    quantized: dict[str, dict[str, Any]] = {}

    def put(name: str, arr: np.ndarray) -> None:
        if name in tensors:
            raise ValueError(f"two tensors would be stored under the name {name!r}")
        tensors[name] = arr

    leaves = named_leaves(tree)
    version = _version_for(leaves)
    for name, leaf in leaves:
        if _is_qa(leaf):
            quantized[name] = _quantized_meta(leaf, version)
            stored = _stored(leaf)
            for field in QUANTIZED_FIELDS:
                put(f"{name}.{field}", _host(getattr(stored, field), f"{name}.{field}"))
        else:
            put(name, _host(leaf, name))

    header_meta = dict(user_meta)
    header_meta[METADATA_KEY] = json.dumps(
        {"format": FORMAT_NAME, "format_version": version, "quantized": quantized}, sort_keys=True
    )
    from safetensors import TensorSpec, serialize_file

    specs = {
        name: TensorSpec(
            dtype=_SPEC_NAMES[_ST_NAMES[arr.dtype]],
            shape=list(arr.shape),
            data_ptr=arr.ctypes.data,
            data_len=arr.nbytes,
        )
        for name, arr in tensors.items()
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        serialize_file(specs, tmp, metadata=header_meta)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        del specs  # the arrays in ``tensors`` had to stay alive until here
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a directory, not a safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFormatError(f"{str(path)!r} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > _MAX_HEADER or 8 + n > size:
            raise CheckpointFormatError(f"{str(path)!r} is not a safetensors file (bad header length)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointFormatError(f"{str(path)!r} is not a safetensors file (header is not JSON)") from err
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{str(path)!r} is not a safetensors file (header is not an object)")
    return header, 8 + n


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header's ``__metadata__`` (``str -> str``) of a safetensors file, without reading tensors."""
    header, _ = _read_header(Path(path))
    return dict(header.get("__metadata__") or {})


def _kbit_meta(meta: Mapping[str, str], where: str) -> dict[str, Any] | None:
    if METADATA_KEY not in meta:
        return None
    try:
        info = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointFormatError(f"{where}: the {METADATA_KEY!r} metadata is not JSON") from err
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise CheckpointFormatError(f"{where}: the {METADATA_KEY!r} metadata is not a jax-kbit record")
    version = info.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise CheckpointFormatError(
            f"{where}: jax-kbit format version {version!r} is not supported (this jax-kbit reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}); use the jax-kbit release that wrote it"
        )
    return info


def load_safetensors(path: str | os.PathLike, *, nested: bool = True, as_numpy: bool = False) -> Any:
    """Read a safetensors file written by ``save_safetensors`` (or any safetensors file).

    Args:
      path: the file.
      nested: return a nested dict (names split at ``"."``, the default) or a flat ``{name: leaf}`` dict.
      as_numpy: leave leaves as NumPy arrays instead of ``jax.Array`` s.

    Returns:
      A dict whose quantized leaves are ``QuantizedArray`` s and ``QuantizedMatrix`` es (rebuilt from the
      jax-kbit metadata) and whose other leaves are arrays.

    Raises:
      FileNotFoundError: the path does not exist. CheckpointFormatError (a ValueError): not a safetensors
      file, a corrupt one, or a jax-kbit format version this release does not read.
    """
    path = Path(path)
    header, _ = _read_header(path)
    meta = dict(header.get("__metadata__") or {})
    info = _kbit_meta(meta, str(path))
    from safetensors import SafetensorError, deserialize

    try:
        entries = deserialize(path.read_bytes())
    except SafetensorError as err:
        raise CheckpointFormatError(f"{str(path)!r} is not a valid safetensors file: {err}") from err
    conv = (lambda a: a) if as_numpy else jax.numpy.asarray
    tensors: dict[str, np.ndarray] = {}
    for name, entry in entries:
        dt = _ST_DTYPES.get(entry["dtype"])
        if dt is None:
            raise CheckpointFormatError(
                f"{str(path)!r}: tensor {name!r} has unsupported dtype {entry['dtype']}"
            )
        tensors[name] = np.frombuffer(entry["data"], dtype=dt).reshape(entry["shape"])

    flat: dict[str, Any] = {}
    quantized = (info or {}).get("quantized", {})
    version = (info or {}).get("format_version", 1)
    used: set[str] = set()
    for name, q in sorted(quantized.items()):
        parts = {}
        for field in QUANTIZED_FIELDS:
            key = f"{name}.{field}"
            if key not in tensors:
                raise CheckpointFormatError(f"{str(path)!r}: quantized leaf {name!r} has no tensor {key!r}")
            parts[field] = conv(tensors[key])
            used.add(key)
        try:
            flat[name] = _rebuild(parts, q, version, f"{str(path)!r}: quantized leaf {name!r}")
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, CheckpointFormatError):
                raise
            raise CheckpointFormatError(f"{str(path)!r}: bad metadata for quantized leaf {name!r}") from err
    for name, arr in tensors.items():
        if name not in used:
            flat[name] = conv(arr)
    flat = {name: flat[name] for name in sorted(flat)}  # a stable order (the file's is unspecified)
    return _nest(flat) if nested else flat


# ---------------------------------------------------------------- orbax


def _records(tree: Any, version: int | None = None) -> list[dict[str, Any]]:
    leaves = named_leaves(tree)
    version = _version_for(leaves) if version is None else version
    recs = []
    for name, leaf in leaves:
        if _is_qa(leaf):
            rec = {"path": name, "kind": "quantized", **_quantized_meta(leaf, version)}
            stored = _described(leaf)
            rec["fields"] = {
                f: {
                    "shape": [int(s) for s in getattr(stored, f).shape],
                    "dtype": np.dtype(getattr(stored, f).dtype).name,
                }
                for f in QUANTIZED_FIELDS
            }
        else:
            shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
            rec = {"path": name, "kind": "array", "shape": [int(s) for s in shape]}
            dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
            rec["dtype"] = np.dtype(jax.dtypes.canonicalize_dtype(dtype)).name  # as restored into jax
        recs.append(rec)
    return recs


def _state_of(tree: Any) -> dict[str, Any]:
    """The tree as ``{path: array | {field: array}}`` (flat at the top: orbax needs no nesting)."""
    state: dict[str, Any] = {}
    for name, leaf in named_leaves(tree):
        if _is_qa(leaf):
            state[name] = {f: getattr(_stored(leaf), f) for f in QUANTIZED_FIELDS}
        else:
            state[name] = leaf if hasattr(leaf, "dtype") else np.asarray(leaf)
    return state


def _escape(name: str) -> str:
    # orbax joins nested keys with "." in its own parameter names; keep ours unambiguous.
    return name.replace("%", "%25").replace(".", "%2E").replace("/", "%2F")


def save_checkpoint(directory: str | os.PathLike, tree: Any, *, force: bool = False) -> Path:
    """Save ``tree`` (arrays, ``QuantizedArray`` and ``QuantizedMatrix`` leaves) as an orbax checkpoint directory.

    Args:
      directory: destination; must not exist unless ``force`` (then it is replaced once the new one is
        complete).
      tree: any pytree of arrays, ``QuantizedArray`` s and ``QuantizedMatrix`` es.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    parent = _atomic_target(directory)
    if directory.exists() and not force:
        raise FileExistsError(f"{str(directory)!r} exists; pass force=True to replace it")
    version = _version_for(named_leaves(tree))
    recs = _records(tree, version)
    state = {_escape(k): v for k, v in _state_of(tree).items()}
    meta = {"format": FORMAT_NAME, "format_version": version, "leaves": recs}
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=parent))
    shutil.rmtree(tmp)
    try:
        ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
        ckptr.save(tmp, ocp.args.Composite(state=ocp.args.StandardSave(state), kbit=ocp.args.JsonSave(meta)))
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=parent))
            os.replace(directory, old / "x")
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _describe(rec: dict[str, Any]) -> str:
    if rec["kind"] == "quantized":
        cls = "QuantizedMatrix" if rec.get("layout", "array") == "matrix" else "QuantizedArray"
        return (
            f"{cls}(shape={tuple(rec['shape'])}, k={rec['k']}, dtype={rec['dtype']}, "
            f"scale_format={rec['scale_format']})"
        )
    return f"array(shape={tuple(rec['shape'])}, dtype={rec['dtype']})"


def _compare(saved: list[dict[str, Any]], target: list[dict[str, Any]], where: str) -> None:
    s = {r["path"]: r for r in saved}
    t = {r["path"]: r for r in target}
    problems = []
    missing = [p for p in t if p not in s]
    extra = [p for p in s if p not in t]
    if missing:
        problems.append(
            f"in the target but not the checkpoint: {missing[:8]}{' ...' if len(missing) > 8 else ''}"
        )
    if extra:
        problems.append(
            f"in the checkpoint but not the target: {extra[:8]}{' ...' if len(extra) > 8 else ''}"
        )
    keys = ("kind", "shape", "dtype", "k", "d", "scale_format")

    def layout(rec: dict[str, Any]) -> str | None:
        return rec.get("layout", "array") if rec["kind"] == "quantized" else None

    for p in t:
        if p in s and (any(s[p].get(key) != t[p].get(key) for key in keys) or layout(s[p]) != layout(t[p])):
            problems.append(f"{p}: checkpoint has {_describe(s[p])}, target wants {_describe(t[p])}")
    if problems:
        raise ValueError(
            f"{where}: the target tree does not match the checkpoint:\n  " + "\n  ".join(problems[:20])
        )


def _abstract(shape: list[int], dtype: str, like: Any = None) -> jax.ShapeDtypeStruct:
    sharding = getattr(like, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=sharding)


def restore_checkpoint(directory: str | os.PathLike, target: Any = None) -> Any:
    """Restore a tree saved by ``save_checkpoint``, bit for bit.

    Args:
      directory: the checkpoint directory.
      target: optional tree of the expected structure (concrete arrays, ``jax.ShapeDtypeStruct`` s, or
        ``QuantizedArray`` s / ``QuantizedMatrix`` es of either, e.g. from ``jax.eval_shape``). With it, the result has the target's
        containers and its leaves' shardings; without it, a nested dict (paths split at ``"."``).

    Raises:
      FileNotFoundError: no such directory. CheckpointFormatError: not a jax-kbit orbax checkpoint or an
      unsupported format version. ValueError: ``target`` differs in structure, shapes, dtypes or quantization
      metadata (the message lists the differences).
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if not directory.exists():
        raise FileNotFoundError(f"{str(directory)!r} does not exist")
    if not (directory / "kbit").is_dir() or not (directory / "state").is_dir():
        raise CheckpointFormatError(f"{str(directory)!r} is not a jax-kbit orbax checkpoint")
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    meta = ckptr.restore(directory, ocp.args.Composite(kbit=ocp.args.JsonRestore()))["kbit"]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointFormatError(f"{str(directory)!r} is not a jax-kbit orbax checkpoint")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise CheckpointFormatError(
            f"{str(directory)!r}: jax-kbit format version {version!r} is not supported "
            f"(this jax-kbit reads versions {', '.join(map(str, READABLE_VERSIONS))})"
        )
    saved = meta["leaves"]
    likes: dict[str, Any] = {}
    if target is not None:
        # The target's records always name their layout (a version-1 checkpoint's lack one: "array").
        _compare(saved, _records(target, 2), str(directory))
        likes = {name: _described(v) if _is_qa(v) else v for name, v in named_leaves(target)}

    abstract: dict[str, Any] = {}
    for rec in saved:
        like = likes.get(rec["path"])
        if rec["kind"] == "quantized":
            abstract[_escape(rec["path"])] = {
                f: _abstract(fr["shape"], fr["dtype"], getattr(like, f, None))
                for f, fr in rec["fields"].items()
            }
        else:
            abstract[_escape(rec["path"])] = _abstract(rec["shape"], rec["dtype"], like)
    state = ckptr.restore(directory, ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]

    flat: dict[str, Any] = {}
    for rec in saved:
        value = state[_escape(rec["path"])]
        if rec["kind"] == "quantized":
            where = f"{str(directory)!r}: quantized leaf {rec['path']!r}"
            try:
                value = _rebuild({f: value[f] for f in QUANTIZED_FIELDS}, rec, version, where)
            except (KeyError, TypeError) as err:
                raise CheckpointFormatError(f"{where}: bad metadata") from err
        flat[rec["path"]] = value
    if target is None:
        return _nest(flat)
    treedef = jax.tree_util.tree_structure(target, is_leaf=_is_qa)
    leaves = []
    for name, like in named_leaves(target):
        value = flat[name]
        if isinstance(like, QuantizedMatrix):  # the target's storage order, whichever was saved
            value = value.with_tiles(like.tiled)
        leaves.append(value)
    return jax.tree_util.tree_unflatten(treedef, leaves)
