"""Quantizing whole parameter trees: selection rules, mixed precision, fitted codebooks and a report.

``quantize_params`` walks any pytree of arrays (Flax ``params`` dicts, ``nnx.State``, plain dicts and
lists) and replaces the leaves it selects with ``QuantizedArray`` (blocks along the last axis) or, for
weight matrices that ``jax_kbit.matmul`` multiplies, ``QuantizedMatrix`` (blocks along the reduction axis;
the ``layout`` option); ``dequantize_params`` undoes it and ``compression_report`` compares the two trees.
Leaves are named by their key path joined with ``/`` (``"layers/0/attn/q/kernel"``); ``Rule`` patterns are
regular expressions searched in that name. See docs/PARAMS.md.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

from jax_kbit import codebooks as _codebooks
from jax_kbit.api import dequantize, quantize
from jax_kbit.matmul import quantize_matrix
from jax_kbit.quantized_array import QuantizedArray
from jax_kbit.quantized_matrix import QuantizedMatrix
from jax_kbit.reference import (
    BLOCK,
    FLOAT_DTYPES,
    SCALE_FORMATS,
    auto_tensor_scale_ref,
    decode_scales,
    encode_scales,
)

__all__ = [
    "LAYOUTS",
    "Layout",
    "Report",
    "ReportRow",
    "Rule",
    "compression_report",
    "dequantize_params",
    "fit_codebook",
    "key_path_str",
    "quantize_params",
]

_CODEBOOK_NAMES = ("lloyd_max", "normal_float", "uniform", "nf4", "fit")

Layout = Literal["auto", "matrix", "array"]
"""How ``quantize_params`` stores a selected leaf.

- ``"array"``: ``QuantizedArray`` of the leaf, blocks of 32 along its last axis (``jax_kbit.quantize``).
- ``"matrix"``: ``QuantizedMatrix`` of the leaf read as ``[..., in, out]``, blocks along ``in``
  (``jax_kbit.quantize_matrix``): what ``jax_kbit.matmul`` and the Flax layers multiply without
  materialising the weight. Needs rank >= 2.
- ``"auto"``: ``"matrix"`` for a Flax ``Dense`` / ``nnx.Linear`` kernel, i.e. a rank-2 leaf whose last key
  is ``kernel``; ``"array"`` for everything else.
"""
LAYOUTS: tuple[str, ...] = get_args(Layout)


def _is_qa(x: Any) -> bool:
    """A quantized leaf: ``QuantizedArray`` or ``QuantizedMatrix`` (both are kept whole when flattening)."""
    return isinstance(x, (QuantizedArray, QuantizedMatrix))


def _check_layout(layout: Any, what: str) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"{what}: layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def key_path_str(path: Sequence[Any]) -> str:
    """A ``jax.tree_util`` key path as the ``/``-joined name rules match against (``"dense/kernel"``).

    A trailing ``.value`` attribute (how ``flax.nnx`` variables flatten) is dropped, so the leaves of
    ``nnx.state(model)`` are named like the module attributes (``"layers/0/kernel"``).
    """
    path = tuple(path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return "/".join(_key_str(k) for k in path)


def _check_k(k: Any, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= int(k) <= 5:
        raise ValueError(f"{what}: k must be an int in 2..5, got {k!r}")
    return int(k)


def _check_codebook_spec(codebook: Any, what: str) -> None:
    if codebook is None:
        return
    if isinstance(codebook, str):
        if codebook not in _CODEBOOK_NAMES:
            raise ValueError(
                f"{what}: codebook must be an array or one of {_CODEBOOK_NAMES}, got {codebook!r}"
            )
        return
    if not hasattr(codebook, "shape"):
        raise TypeError(f"{what}: codebook must be an array, a name or None, got {type(codebook).__name__}")


@dataclass(frozen=True)
class Rule:
    """How to treat the leaves whose ``/``-joined path matches ``pattern`` (``re.search``).

    The first rule that matches a leaf decides for it; fields left at ``None`` fall back to the arguments
    of ``quantize_params``. ``skip=True`` keeps matching leaves in full precision (embeddings, norms...).

    Attributes:
      pattern: regular expression searched in the path (anchor it with ``^``/``$`` for exact names).
      k: bits per element, 2..5.
      min_size: quantize only leaves with at least this many elements.
      min_rank: quantize only leaves of at least this rank.
      codebook: a float32 array of ``2**k`` entries, a name (``"lloyd_max"``, ``"normal_float"``,
        ``"uniform"``, ``"nf4"``) or ``"fit"`` (``fit_codebook`` per tensor).
      scale_format: ``"e4m4"``, ``"f16"`` or ``"f32"``.
      skip: leave matching leaves untouched.
      layout: ``"auto"``, ``"matrix"`` (``QuantizedMatrix``, blocks along the reduction axis of a weight
        ``[..., in, out]``) or ``"array"`` (``QuantizedArray``, blocks along the last axis); see ``Layout``.
    """

    pattern: str
    k: int | None = None
    min_size: int | None = None
    min_rank: int | None = None
    codebook: Any = field(default=None, compare=False)
    scale_format: str | None = None
    skip: bool = False
    layout: Layout | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str):
            raise TypeError(f"Rule.pattern must be a str, got {type(self.pattern).__name__}")
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(
                f"Rule.pattern {self.pattern!r} is not a valid regular expression: {err}"
            ) from err
        if self.k is not None:
            _check_k(self.k, repr(self))
        if self.scale_format is not None and self.scale_format not in SCALE_FORMATS:
            raise ValueError(f"Rule.scale_format must be one of {SCALE_FORMATS}, got {self.scale_format!r}")
        for name in ("min_size", "min_rank"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0):
                raise ValueError(f"Rule.{name} must be a non-negative int, got {v!r}")
        _check_codebook_spec(self.codebook, f"Rule({self.pattern!r})")
        if self.layout is not None:
            _check_layout(self.layout, f"Rule({self.pattern!r})")

    def matches(self, path: str) -> bool:
        return re.search(self.pattern, path) is not None


@dataclass(frozen=True)
class _Settings:
    k: int
    min_size: int
    min_rank: int
    codebook: Any
    scale_format: str
    layout: str = "auto"


def _check_rules(rules: Any) -> tuple[Rule, ...]:
    if rules is None:
        return ()
    if isinstance(rules, Rule):
        return (rules,)
    rules = tuple(rules)
    for r in rules:
        if not isinstance(r, Rule):
            raise TypeError(f"rules must be Rule objects, got {type(r).__name__}: {r!r}")
    return rules


def _decide(path: str, rules: tuple[Rule, ...], default: _Settings, hits: list[int]) -> _Settings | None:
    """Settings for a leaf, or None when a skip rule matches."""
    for i, rule in enumerate(rules):
        if rule.matches(path):
            hits[i] += 1
            if rule.skip:
                return None
            return _Settings(
                k=default.k if rule.k is None else int(rule.k),
                min_size=default.min_size if rule.min_size is None else int(rule.min_size),
                min_rank=default.min_rank if rule.min_rank is None else int(rule.min_rank),
                codebook=default.codebook if rule.codebook is None else rule.codebook,
                scale_format=default.scale_format if rule.scale_format is None else rule.scale_format,
                layout=default.layout if rule.layout is None else rule.layout,
            )
    return default


def _resolve_layout(layout: str, path: str, leaf: Any) -> str:
    """``"matrix"`` or ``"array"`` for a leaf that will be quantized (``"auto"`` decided from name and rank)."""
    ndim = len(leaf.shape)
    if layout == "auto":
        return "matrix" if ndim == 2 and path.rsplit("/", 1)[-1] == "kernel" else "array"
    if layout == "matrix" and ndim < 2:
        raise ValueError(
            f"{path}: layout='matrix' needs a weight of rank >= 2 ([..., in, out]), got shape "
            f"{tuple(leaf.shape)}; use layout='array' (e.g. in a Rule) for this leaf"
        )
    return layout


def _is_fit(codebook: Any) -> bool:
    return isinstance(codebook, str) and codebook == "fit"


def _quantize_leaf(
    leaf: Any, settings: _Settings, path: str, tiled: bool | None = None
) -> QuantizedArray | QuantizedMatrix:
    """One selected leaf, quantized with ``settings`` in its resolved layout."""
    layout = _resolve_layout(settings.layout, path, leaf)
    # A fitted codebook is fitted to the values as they are blocked: along `in` for a matrix.
    blocked = _swap_last_two(leaf) if layout == "matrix" and _is_fit(settings.codebook) else leaf
    cb = _resolve_codebook(settings.codebook, settings.k, blocked, settings.scale_format, path)
    if layout == "matrix":
        # True tiles where the shape allows it, as the default does (quantize_matrix's None), never raising
        tile = None if tiled is None or tiled else False
        return quantize_matrix(leaf, settings.k, codebook=cb, scale_format=settings.scale_format, tiled=tile)
    return quantize(leaf, settings.k, codebook=cb, scale_format=settings.scale_format)


def _swap_last_two(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return np.swapaxes(x, -1, -2)
    return jnp.swapaxes(x, -1, -2)


def _quantizable(leaf: Any, s: _Settings) -> bool:
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None or _is_qa(leaf):
        return False
    try:
        if np.dtype(dtype) not in FLOAT_DTYPES:
            return False
    except TypeError:
        return False
    size = math.prod(shape)
    return len(shape) >= max(s.min_rank, 1) and size >= s.min_size and size > 0


def _resolve_codebook(spec: Any, k: int, leaf: Any, scale_format: str, path: str) -> Any:
    if spec is None or (isinstance(spec, str) and spec == "lloyd_max"):
        return None
    if isinstance(spec, str):
        if spec == "fit":
            if isinstance(leaf, jax.core.Tracer):
                raise ValueError(
                    f"{path}: codebook='fit' needs the concrete tensor (it runs NumPy); call quantize_params "
                    "outside jax.jit, or fit_codebook first and pass the array"
                )
            return fit_codebook(leaf, k, scale_format=scale_format)
        if spec == "nf4":
            if k != 4:
                raise ValueError(f"{path}: codebook 'nf4' needs k=4, got k={k}")
            return _codebooks.nf4()
        return _codebooks.BY_NAME[spec](k)
    cb = np.asarray(spec, dtype=np.float32) if not isinstance(spec, jax.Array) else spec
    if cb.shape != (2**k,):
        raise ValueError(f"{path}: codebook has shape {tuple(cb.shape)}, but k={k} needs ({2**k},)")
    return cb


def quantize_params(
    params: Any,
    k: int = 4,
    *,
    rules: Sequence[Rule] | None = None,
    min_size: int = 4096,
    codebook: Any = None,
    scale_format: str = "e4m4",
    layout: Layout = "auto",
    tiled: bool | None = None,
) -> Any:
    """Replace selected float leaves of a pytree with ``QuantizedMatrix`` or ``QuantizedArray``.

    By default every float16 / bfloat16 / float32 leaf of rank >= 2 with at least ``min_size`` elements is
    quantized to ``k`` bits with ``codebook`` and ``scale_format``: Flax ``Dense`` / ``nnx.Linear`` kernels
    (rank-2 leaves whose last key is ``kernel``) as ``QuantizedMatrix`` (blocks along ``in``, ready for
    ``jax_kbit.matmul``; the transpose happens here, once), everything else as ``QuantizedArray`` (blocks
    along the last axis). ``rules`` refine that per leaf: the first ``Rule`` whose pattern matches the leaf's
    ``/``-joined path decides (skip it, or quantize it with its own k / codebook / scale format / layout /
    thresholds); leaves no rule matches use the defaults. A rule that decides for no leaf triggers a
    ``UserWarning`` naming it. Leaves that cannot be quantized (integer or bool dtypes, scalars, non-arrays)
    and leaves that already are ``QuantizedArray`` / ``QuantizedMatrix`` are returned as they are.

    Args:
      params: any pytree.
      k: default bits per element, 2..5.
      rules: ``Rule`` objects, first match wins.
      min_size: default minimum number of elements.
      codebook: default codebook: ``None`` (``lloyd_max(k)``), a name (``"lloyd_max"``, ``"normal_float"``,
        ``"uniform"``, ``"nf4"``), ``"fit"`` (``fit_codebook`` on each tensor) or a float32 array of ``2**k``.
      scale_format: default block scale format (``"e4m4"``, ``"f16"`` or ``"f32"``).
      layout: default storage (``Layout``): ``"auto"`` (matrices for Flax kernels, arrays otherwise),
        ``"matrix"`` (every selected leaf, read as ``[..., in, out]``; rank >= 2) or ``"array"`` (every
        selected leaf, blocks along its last axis: the layout of jax-kbit 0.1).
      tiled: storage order of the ``QuantizedMatrix`` leaves (docs/MATMUL.md): ``None`` (the default) and
        ``True`` tile every matrix whose shape allows it (``out % 16 == 0``, a multiple of 4 blocks along
        ``in``), ``False`` keeps row order (e.g. to shard ``out`` into pieces that are not whole tiles).

    Returns:
      A pytree of the same structure with some leaves replaced by ``QuantizedMatrix`` / ``QuantizedArray``.
    """
    k = _check_k(k, "quantize_params")
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"scale_format must be one of {SCALE_FORMATS}, got {scale_format!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative int, got {min_size!r}")
    _check_codebook_spec(codebook, "quantize_params")
    layout = _check_layout(layout, "quantize_params")
    if tiled is not None and not isinstance(tiled, (bool, np.bool_)):
        raise TypeError(f"tiled must be None or a bool, got {type(tiled).__name__}")
    rules = _check_rules(rules)
    default = _Settings(
        k=k, min_size=int(min_size), min_rank=2, codebook=codebook, scale_format=scale_format, layout=layout
    )
    hits = [0] * len(rules)

    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_qa)
    out = []
    for key_path, leaf in leaves:
        path = key_path_str(key_path)
        if _is_qa(leaf):
            out.append(leaf)
            continue
        settings = _decide(path, rules, default, hits)
        if settings is None or not _quantizable(leaf, settings):
            out.append(leaf)
            continue
        out.append(_quantize_leaf(leaf, settings, path, tiled))
    for rule, n in zip(rules, hits):
        if n == 0:
            warnings.warn(
                f"quantize_params: {rule!r} matched no leaf (or only leaves an earlier rule claimed)",
                UserWarning,
                stacklevel=2,
            )
    return jax.tree_util.tree_unflatten(treedef, out)


def _dequantize_leaf(x: QuantizedArray | QuantizedMatrix, dtype: Any = None) -> jax.Array:
    """The dense array a quantized leaf stands for (``[..., in, out]`` for a ``QuantizedMatrix``)."""
    return x.dequantize(dtype) if isinstance(x, QuantizedMatrix) else dequantize(x, dtype)


def dequantize_params(tree: Any, dtype: Any = None) -> Any:
    """Replace every ``QuantizedArray`` / ``QuantizedMatrix`` leaf with the dense array it stands for.

    ``dtype``: default the original dtype. A ``QuantizedMatrix`` comes back in its logical ``[..., in, out]``
    shape, so the result has the same shapes as the tree that was quantized.
    """
    return jax.tree_util.tree_map(
        lambda x: _dequantize_leaf(x, dtype) if _is_qa(x) else x, tree, is_leaf=_is_qa
    )


# ---------------------------------------------------------------- report


@dataclass(frozen=True)
class ReportRow:
    """One leaf of a ``compression_report``.

    ``k``, ``sqnr_db`` and ``layout`` are None for leaves kept as they were; ``layout`` is ``"matrix"``
    (``QuantizedMatrix``) or ``"array"`` (``QuantizedArray``) for quantized ones. ``shape`` is the original
    leaf's shape in both layouts.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    k: int | None
    bits_per_element: float
    bytes_before: int
    bytes_after: int
    sqnr_db: float | None
    layout: str | None = None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


@dataclass(frozen=True)
class Report:
    """Per-leaf comparison of a parameter tree and its quantized version (``compression_report``)."""

    rows: tuple[ReportRow, ...]

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows)

    @property
    def ratio(self) -> float:
        """bytes before / bytes after."""
        return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")

    @property
    def num_quantized(self) -> int:
        return sum(r.k is not None for r in self.rows)

    @property
    def quantized_fraction(self) -> float:
        """Fraction of all elements that are stored quantized."""
        total = sum(math.prod(r.shape) for r in self.rows)
        q = sum(math.prod(r.shape) for r in self.rows if r.k is not None)
        return q / total if total else 0.0

    @property
    def bits_per_element(self) -> float:
        """Average storage bits per element over all leaves."""
        total = sum(math.prod(r.shape) for r in self.rows)
        return 8.0 * self.bytes_after / total if total else float("nan")

    def totals(self) -> dict[str, Any]:
        return {
            "leaves": len(self.rows),
            "quantized_leaves": self.num_quantized,
            "quantized_fraction": self.quantized_fraction,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "ratio": self.ratio,
            "bits_per_element": self.bits_per_element,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain data: ``{"rows": [...], "totals": {...}}`` (shapes as lists; JSON-serialisable)."""
        rows = []
        for r in self.rows:
            d = asdict(r)
            d["shape"] = list(r.shape)
            rows.append(d)
        return {"rows": rows, "totals": self.totals()}

    def __str__(self) -> str:
        # The layout column appears only when some leaf is a QuantizedMatrix (trees quantized with the
        # layout of jax-kbit 0.1 print as they always did).
        with_layout = any(r.layout == "matrix" for r in self.rows)
        head = ("path", "shape", "dtype", "k", "bits/el", "before", "after", "SQNR dB")
        head += ("layout",) if with_layout else ()
        body = [
            (
                r.path,
                "x".join(map(str, r.shape)) or "()",
                r.dtype,
                "-" if r.k is None else str(r.k),
                f"{r.bits_per_element:.2f}",
                _fmt_bytes(r.bytes_before),
                _fmt_bytes(r.bytes_after),
                "-" if r.sqnr_db is None else f"{r.sqnr_db:.2f}",
            )
            + ((r.layout or "-",) if with_layout else ())
            for r in self.rows
        ]
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
        right = {1, 3, 4, 5, 6, 7}

        def line(cells):
            return "  ".join(
                c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )

        out = [line(head), "  ".join("-" * w for w in widths)]
        out += [line(b) for b in body]
        out.append(
            f"total: {self.num_quantized}/{len(self.rows)} leaves quantized "
            f"({100 * self.quantized_fraction:.1f}% of elements), {_fmt_bytes(self.bytes_before)} -> "
            f"{_fmt_bytes(self.bytes_after)} ({self.ratio:.2f}x, {self.bits_per_element:.2f} bits/element)"
        )
        return "\n".join(out)


@jax.jit
def _sqnr_db(x, y):
    x = x.astype(jnp.float32)
    err = jnp.sum(jnp.square(x - y.astype(jnp.float32)))
    sig = jnp.sum(jnp.square(x))
    return 10.0 * jnp.log10(sig / err)


def compression_report(original: Any, quantized: Any) -> Report:
    """Compare ``original`` with ``quantize_params(original, ...)``: one row per array leaf, plus totals.

    SQNR is ``10 log10(sum x^2 / sum (x - x_hat)^2)`` over the leaf (``inf`` when exact); byte counts are
    the array bytes (``QuantizedArray.nbytes`` / ``QuantizedMatrix.nbytes``: codes, scales, codebook and
    tensor scale). A ``QuantizedMatrix`` is compared in its logical ``[..., in, out]`` shape.
    """
    orig, _ = jax.tree_util.tree_flatten_with_path(original, is_leaf=_is_qa)
    quant, _ = jax.tree_util.tree_flatten_with_path(quantized, is_leaf=_is_qa)
    if len(orig) != len(quant):
        raise ValueError(f"original has {len(orig)} leaves but quantized has {len(quant)}: not the same tree")
    rows = []
    for (path, a), (path_q, b) in zip(orig, quant):
        name = key_path_str(path)
        if key_path_str(path_q) != name:
            raise ValueError(f"tree structures differ: {name!r} vs {key_path_str(path_q)!r}")
        if _is_qa(a):
            raise ValueError(f"{name}: the original tree already holds a {type(a).__name__}")
        if not (hasattr(a, "shape") and hasattr(a, "dtype")):
            continue
        shape = tuple(int(s) for s in a.shape)
        n = math.prod(shape)
        before = n * np.dtype(a.dtype).itemsize
        if _is_qa(b):
            if b.shape != shape:
                raise ValueError(f"{name}: quantized shape {b.shape} != original {shape}")
            after = b.nbytes
            sqnr = float(_sqnr_db(jnp.asarray(a), _dequantize_leaf(b, jnp.float32))) if n else None
            if sqnr is not None and math.isnan(sqnr):
                sqnr = None
            rows.append(
                ReportRow(
                    name,
                    shape,
                    np.dtype(a.dtype).name,
                    b.k,
                    8.0 * after / n if n else 0.0,
                    before,
                    after,
                    sqnr,
                    "matrix" if isinstance(b, QuantizedMatrix) else "array",
                )
            )
        else:
            after = math.prod(getattr(b, "shape", ())) * np.dtype(getattr(b, "dtype", a.dtype)).itemsize
            bpe = 8.0 * np.dtype(a.dtype).itemsize
            rows.append(ReportRow(name, shape, np.dtype(a.dtype).name, None, bpe, before, after, None))
    return Report(tuple(rows))


# ---------------------------------------------------------------- fitted codebooks


def _sample_blocks(x: np.ndarray, sample: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(blocks float32 [m, 32], valid mask [m, 32]): whole 32-blocks along the last axis, subsampled."""
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    nb = -(-d // BLOCK)
    total = rows.shape[0] * nb
    m = max(1, sample // BLOCK)
    if total > m:
        idx = np.sort(np.random.default_rng(seed).choice(total, size=m, replace=False))
    else:
        idx = np.arange(total)
    r, b = np.divmod(idx, nb)
    cols = b[:, None] * BLOCK + np.arange(BLOCK)[None, :]
    valid = cols < d
    blocks = rows[r[:, None], np.minimum(cols, d - 1)].astype(np.float32)
    return np.where(valid, blocks, np.float32(0)), valid


def _weighted_distortion(y: np.ndarray, w: np.ndarray, c: np.ndarray) -> float:
    """sum w * (y - nearest(c))^2 for sorted y and sorted c."""
    bounds = (c[:-1] + c[1:]) / 2
    cell = np.searchsorted(bounds, y)
    return float(np.sum(w * (y - c[cell]) ** 2))


def fit_codebook(
    x: Any,
    k: int,
    *,
    iters: int = 50,
    sample: int = 2**20,
    seed: int = 0,
    scale_format: str = "e4m4",
) -> np.ndarray:
    """A codebook fitted to one tensor: weighted Lloyd-Max on its block-normalized values.

    The tensor is cut into 32-blocks along the last axis like ``quantize`` does; each value becomes
    ``y = x / s`` with ``s`` the block's decoded scale (its absmax after the scale format's rounding and the
    auto tensor scale), weighted by ``s**2`` so that the error is minimised in the tensor's own units (the
    same weighting as scripts/gen_codebooks.py). Lloyd's algorithm starts from ``codebooks.lloyd_max(k)`` and
    runs at most ``iters`` iterations; it never increases the weighted error, and the starting codebook is
    returned if nothing better is found. Tensors with more than ``sample`` elements are subsampled by whole
    blocks with a fixed-seed generator, so the result is deterministic.

    Returns:
      float32 array of ``2**k`` entries, sorted ascending (pass it as ``codebook=`` to ``quantize``).
    """
    k = _check_k(k, "fit_codebook")
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"scale_format must be one of {SCALE_FORMATS}, got {scale_format!r}")
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters!r}")
    if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or sample < BLOCK:
        raise ValueError(f"sample must be an int >= {BLOCK}, got {sample!r}")
    init = _codebooks.lloyd_max(k).astype(np.float64)
    x = np.asarray(x)
    if x.ndim < 1 or x.size == 0:
        return init.astype(np.float32)
    if np.dtype(x.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {np.dtype(x.dtype).name}")

    t = auto_tensor_scale_ref(x, scale_format)
    blocks, valid = _sample_blocks(x, sample, seed)
    a = np.abs(blocks)
    nonfinite = ~np.isfinite(a).all(axis=-1)
    amax = np.where(np.isfinite(a), a, np.float32(0)).max(axis=-1).astype(np.float32)
    s = decode_scales(encode_scales(amax, nonfinite, t, scale_format), t, scale_format).astype(np.float64)
    keep = ~nonfinite & (s > 0) & np.isfinite(s)
    blocks, valid, s = blocks[keep].astype(np.float64), valid[keep], s[keep]
    y = (blocks / s[:, None])[valid]
    w = np.broadcast_to((s * s)[:, None], blocks.shape)[valid]
    if y.size == 0:
        return init.astype(np.float32)
    order = np.argsort(y, kind="stable")
    y, w = y[order], w[order]
    cw = np.concatenate(([0.0], np.cumsum(w)))
    cwy = np.concatenate(([0.0], np.cumsum(w * y)))

    c = init.copy()
    for _ in range(int(iters)):
        bounds = (c[:-1] + c[1:]) / 2
        # Cell j holds y in (bounds[j-1], bounds[j]]: the nearest entry, ties to the lower one.
        edges = np.concatenate(([0], np.searchsorted(y, bounds, side="right"), [y.size]))
        mass = cw[edges[1:]] - cw[edges[:-1]]
        moment = cwy[edges[1:]] - cwy[edges[:-1]]
        new = np.where(mass > 0, moment / np.where(mass > 0, mass, 1.0), c)
        new = np.sort(new)
        delta = float(np.max(np.abs(new - c)))
        c = new
        if delta < 1e-9:
            break
    c32 = np.sort(c.astype(np.float32))
    if _weighted_distortion(y, w, c32.astype(np.float64)) > _weighted_distortion(y, w, init):
        return init.astype(np.float32)
    return c32
