"""Shard-local quantize / dequantize under jit over device meshes (docs/SHARDING.md).

The checks need several devices, and the CPU backend only has them when ``XLA_FLAGS`` asks for them before
JAX starts, which is too late in this pytest process. So each test reads its result from a worker: this
file run as a script (``python -P tests/test_sharding.py cpu``) in a subprocess whose environment sets
``--xla_force_host_platform_device_count=8``. The worker runs every case once and prints one JSON line of
results; the tests below are one per case and platform. On a machine with a GPU the same cases also run on
the GPUs that machine has (with one GPU, every mesh is 1 x 1).

Cases compare bit for bit with the unsharded result on one device, check the outputs' shardings and shard
shapes, and look in the compiled HLO for communication of the data: no all-gather, all-to-all,
collective-permute or reduce-scatter, and all-reduces only of scalars (the automatic tensor scale).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_kbit as jk
from jax_kbit.exporting import DISABLED_CHECKS
from jax_kbit.sharding import quantized_sharding

VIRTUAL_CPU_DEVICES = 8
RESULT_MARKER = "KBIT_SHARDING_RESULTS "
BF16 = np.dtype(ml_dtypes.bfloat16)

# ================================================================ worker side

CASES: dict[str, Callable[[str], None]] = {}


class Skip(Exception):
    """Raised by a case that does not apply to this device count."""


def case(name: str):
    def register(fn):
        CASES[name] = fn
        return fn

    return register


def devices(platform: str):
    return jax.devices(platform)


def make_mesh(platform: str, kind: str, axis_type=AxisType.Auto) -> Mesh:
    """Meshes ``rows`` (1 x n), ``grid`` (2 x n/2) and ``cols`` (n x 1), axes ('a', 'b')."""
    devs = devices(platform)
    n = len(devs)
    shape = {"rows": (1, n), "grid": (2, n // 2), "cols": (n, 1)}[kind]
    if shape[0] * shape[1] != n or 0 in shape:
        raise Skip(f"a {kind} mesh needs an even device count, have {n}")
    return Mesh(np.asarray(devs).reshape(shape), ("a", "b"), axis_types=(axis_type, axis_type))


def any_mesh(platform: str, axis_type=AxisType.Auto) -> Mesh:
    """The 2 x n/2 mesh where the device count allows it, else 1 x n."""
    try:
        return make_mesh(platform, "grid", axis_type)
    except Skip:
        return make_mesh(platform, "rows", axis_type)


def data(shape, dtype=np.float32, seed=0) -> np.ndarray:
    """N(0, 1) times a power of ten per row in 1e-2..1e2, so blocks get different scales."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 2, size=tuple(shape[:-1]) + (1,))
    return x.astype(np.float32).astype(dtype)


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def assert_bits(got, want, what: str) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (
        f"{what}: {got.dtype}{got.shape} != {want.dtype}{want.shape}"
    )
    diff = np.flatnonzero(bits(got) != bits(want))
    assert diff.size == 0, f"{what}: {diff.size} of {got.size} elements differ (first flat index {diff[:5]})"


def leaves(q):
    return [q.packed, q.scales, q.codebook, q.tensor_scale]


def assert_same_q(q, ref, what: str) -> None:
    assert (q.k, q.d, q.dtype, q.scale_format) == (ref.k, ref.d, ref.dtype, ref.scale_format), what
    for name, a, b in zip(("packed", "scales", "codebook", "tensor_scale"), leaves(q), leaves(ref)):
        assert_bits(a, b, f"{what}: {name}")


def assert_sharded_like(arr, sharding, what: str) -> None:
    """The array has ``sharding`` (up to equivalence) and every local shard has that sharding's shape."""
    assert arr.sharding.is_equivalent_to(sharding, arr.ndim), f"{what}: {arr.sharding} is not {sharding}"
    want = sharding.shard_shape(arr.shape)
    shapes = {s.data.shape for s in arr.addressable_shards}
    assert shapes == {want}, f"{what}: shard shapes {shapes} != {want}"


_COLLECTIVE = re.compile(
    r"=\s*(.*?)\s(all-gather|all-to-all|collective-permute|reduce-scatter|all-reduce)(-start)?\("
)


def data_collectives(hlo: str, max_reduced: int = 1) -> list[str]:
    """Communication in compiled HLO other than all-reduces of values of at most ``max_reduced`` elements.

    One element is the automatic tensor scale's max; under vmap there is one per example.
    """
    bad = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        shapes = re.findall(r"\w+\[([\d,]*)\]", m.group(1))
        sizes = [int(np.prod([int(d) for d in s.split(",") if d], dtype=np.int64)) for s in shapes]
        if m.group(2) == "all-reduce" and sizes and max(sizes) <= max_reduced:
            continue
        bad.append(line.strip()[:200])
    return bad


def assert_no_data_collectives(compiled, what: str, max_reduced: int = 1) -> None:
    bad = data_collectives(compiled.as_text(), max_reduced)
    assert not bad, f"{what}: the compiled HLO moves data between devices:\n" + "\n".join(bad)


def kernel_shapes(hlo: str, target: str) -> list[tuple[int, ...]]:
    """The first result shape of every call of a jax_kbit kernel in compiled HLO (what one device runs)."""
    out = []
    for line in hlo.splitlines():
        if f'custom_call_target="{target}"' not in line:
            continue
        m = re.search(r"=\s*(.*?)\s+custom-call\(", line)
        dims = re.findall(r"\w+\[([\d,]*)\]", m.group(1))[0]
        out.append(tuple(int(d) for d in dims.split(",") if d))
    return out


def assert_kernel_runs_on_shard(compiled, target: str, arr, what: str) -> None:
    """Each device's kernel call produces exactly its shard of ``arr``."""
    want = [tuple(arr.sharding.shard_shape(arr.shape))]
    got = kernel_shapes(compiled.as_text(), target)
    assert got == want, f"{what}: {target} runs on {got}, the shard is {want}"


def shard_bytes(arrays) -> int:
    return int(
        sum(
            np.prod(a.sharding.shard_shape(a.shape), dtype=np.int64) * np.dtype(a.dtype).itemsize
            for a in arrays
        )
    )


def assert_memory(compiled, args, outs, what: str) -> None:
    """Per-device argument and output buffers are the shards' sizes (where the backend reports them).

    Several outputs come back as a tuple, whose index table takes a pointer per output.
    """
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return
    if stats is None:
        return
    for kind, got, arrays in (
        ("argument", stats.argument_size_in_bytes, args),
        ("output", stats.output_size_in_bytes, outs),
    ):
        want = shard_bytes(arrays)
        slack = 8 * len(arrays) if len(arrays) > 1 else 0
        assert want <= got <= want + slack, f"{what}: {kind} bytes {got}, shards hold {want}"


def reference(platform, x, **kw):
    """quantize and dequantize on one device, unsharded."""
    x1 = jax.device_put(x, devices(platform)[0])
    q = jax.jit(functools.partial(jk.quantize, **kw))(x1)
    return q, jax.jit(jk.dequantize)(q)


def check_round_trip(platform, mesh, spec, x, *, shard_local=True, **kw) -> None:
    """jit(quantize) and jit(dequantize) on ``x`` sharded by ``spec``: same bits as unsharded, outputs
    sharded like the input (``quantized_sharding``), and with ``shard_local`` no data communication and
    shard-sized buffers."""
    what = f"{dict(mesh.shape)} {spec} x={x.dtype}{list(x.shape)} {kw}"
    ref_q, ref_y = reference(platform, x, **kw)
    sharding = NamedSharding(mesh, spec)
    xs = jax.device_put(x, sharding)
    fq = jax.jit(functools.partial(jk.quantize, **kw))
    q = fq(xs)
    assert_same_q(q, ref_q, "quantize " + what)
    for name, leaf, want in zip(
        ("packed", "scales", "codebook", "tensor_scale"), leaves(q), leaves(quantized_sharding(sharding, q))
    ):
        assert_sharded_like(leaf, want, f"quantize {what}: {name}")
    fd = jax.jit(jk.dequantize)
    y = fd(q)
    assert_bits(y, ref_y, "dequantize " + what)
    if shard_local:
        assert_sharded_like(y, sharding, "dequantize " + what)
        compiled = fq.lower(xs).compile()
        assert_no_data_collectives(compiled, "quantize " + what)
        assert_memory(compiled, [xs], leaves(q), "quantize " + what)
        assert_kernel_runs_on_shard(compiled, "kbit_quantize", q.packed, "quantize " + what)
        compiled = fd.lower(q).compile()
        assert_no_data_collectives(compiled, "dequantize " + what)
        assert_memory(compiled, leaves(q), [y], "dequantize " + what)
        assert_kernel_runs_on_shard(compiled, "kbit_dequantize", y, "dequantize " + what)


# ---------------------------------------------------------------- layouts x meshes

LAYOUTS = {
    # x [8, 16, 512]: leading axes, the last axis at block granularity (16 blocks), and both.
    "lead": P("a", "b", None),
    "last": P(None, None, ("a", "b")),
    "both": P(None, "a", "b"),
}
MESHES = ("rows", "grid", "cols")


def _layout_case(layout: str, kind: str):
    def run(platform: str) -> None:
        mesh = make_mesh(platform, kind)
        check_round_trip(platform, mesh, LAYOUTS[layout], data((8, 16, 512)), k=4)

    return run


for _layout in LAYOUTS:
    for _kind in MESHES:
        case(f"{_layout}-{_kind}")(_layout_case(_layout, _kind))


@case("dtypes-formats")
def _(platform):
    mesh = any_mesh(platform)
    for dtype, k, fmt in (
        (BF16, 3, "f16"),
        (np.float16, 5, "f32"),
        (np.float32, 2, "e4m4"),
        (BF16, 4, "e4m4"),
    ):
        check_round_trip(platform, mesh, P("a", "b"), data((16, 1024), dtype, seed=k), k=k, scale_format=fmt)


@case("explicit-axes")
def _(platform):
    mesh = any_mesh(platform, AxisType.Explicit)
    check_round_trip(platform, mesh, P("a", "b"), data((16, 512)), k=4)


@case("given-tensor-scale-and-codebook")
def _(platform):
    mesh = any_mesh(platform)
    cb = np.linspace(-1, 1, 8, dtype=np.float32)
    check_round_trip(platform, mesh, P("b", "a"), data((8, 256)), k=3, codebook=cb, tensor_scale=4.0)


@case("dequantize-other-dtype")
def _(platform):
    mesh = any_mesh(platform)
    x = data((8, 512), BF16)
    sharding = NamedSharding(mesh, P("a", "b"))
    q = jax.jit(jk.quantize)(jax.device_put(x, sharding))
    f = jax.jit(lambda q: jk.dequantize(q, jnp.float32))
    y = f(q)
    assert_bits(
        y, jax.jit(lambda q: jk.dequantize(q, jnp.float32))(reference(platform, x)[0]), "dequantize to f32"
    )
    assert_sharded_like(y, sharding, "dequantize to f32")
    assert_no_data_collectives(f.lower(q).compile(), "dequantize to f32")


# ---------------------------------------------------------------- vmap groups


@case("vmap-groups")
def _(platform):
    """vmap gives one tensor scale per example: group dims, sharded with the data's leading axis."""
    mesh = any_mesh(platform)
    x = data((4, 6, 256))
    sharding = NamedSharding(mesh, P("a", None, "b"))
    xs = jax.device_put(x, sharding)
    fq = jax.jit(jax.vmap(lambda v: jk.quantize(v, 4)))
    q = fq(xs)
    ref = jax.jit(jax.vmap(lambda v: jk.quantize(v, 4)))(jax.device_put(x, devices(platform)[0]))
    assert_same_q(q, ref, "vmap quantize")
    assert q.tensor_scale.shape == (4,)
    for name in ("packed", "scales", "tensor_scale"):
        assert_sharded_like(getattr(q, name), getattr(quantized_sharding(sharding, q), name), "vmap " + name)
    assert_no_data_collectives(fq.lower(xs).compile(), "vmap quantize", max_reduced=4)
    fd = jax.jit(jax.vmap(jk.dequantize))
    y = fd(q)
    assert_bits(y, jax.jit(jax.vmap(jk.dequantize))(ref), "vmap dequantize")
    assert_sharded_like(y, sharding, "vmap dequantize")
    compiled = fd.lower(q).compile()
    assert_no_data_collectives(compiled, "vmap dequantize")
    assert_kernel_runs_on_shard(compiled, "kbit_dequantize", y, "vmap dequantize")


@case("vmap-codebooks")
def _(platform):
    """A batch of codebooks (group dims of the codebook) sharded like the data's batch axis."""
    mesh = any_mesh(platform)
    x = data((4, 6, 256))
    cbs = np.stack([jk.codebooks.default(3) * s for s in (1.0, 0.5, 0.25, 0.75)]).astype(np.float32)
    f = jax.jit(jax.vmap(lambda v, c: jk.quantize(v, 3, codebook=c, tensor_scale=1.0)))
    xs = jax.device_put(x, NamedSharding(mesh, P("a", None, "b")))
    cs = jax.device_put(cbs, NamedSharding(mesh, P("a")))
    q = f(xs, cs)
    one = devices(platform)[0]
    ref = f(jax.device_put(x, one), jax.device_put(cbs, one))
    assert_same_q(q, ref, "vmap over codebooks")
    assert_no_data_collectives(f.lower(xs, cs).compile(), "vmap over codebooks")
    fd = jax.jit(jax.vmap(jk.dequantize))
    assert_bits(fd(q), fd(ref), "vmap over codebooks, dequantize")
    assert_no_data_collectives(fd.lower(q).compile(), "vmap over codebooks, dequantize")


# ---------------------------------------------------------------- fallbacks on the last axis


@case("last-axis-partial-blocks")
def _(platform):
    """d % 32 != 0: the last axis cannot be split at block granularity; XLA gathers it (documented)."""
    mesh = make_mesh(platform, "rows")
    n = mesh.shape["b"]
    x = data((4, 25 * n))  # 25n is never a multiple of 32 ... for n < 32
    check_round_trip(platform, mesh, P(None, "b"), x, k=4, shard_local=False)
    q = jax.jit(jk.quantize)(jax.device_put(x, NamedSharding(mesh, P(None, "b"))))
    assert q.packed.sharding.is_equivalent_to(NamedSharding(mesh, P()), 3)


@case("last-axis-blocks-not-divisible")
def _(platform):
    """5 blocks over n > 1 shards: not at block granularity either; replicated blocks axis."""
    mesh = make_mesh(platform, "rows")
    x = data((4, 160))
    if 160 % mesh.shape["b"]:
        raise Skip("160 is not divisible by the device count")
    check_round_trip(platform, mesh, P(None, "b"), x, k=4, shard_local=False)


@case("leading-and-partial-blocks")
def _(platform):
    """The leading axis stays sharded (no gather of it) while the partial-block last axis is gathered."""
    mesh = any_mesh(platform)
    x = data((8, 50 * mesh.shape["b"]))
    sharding = NamedSharding(mesh, P("a", "b"))
    xs = jax.device_put(x, sharding)
    q = jax.jit(jk.quantize)(xs)
    assert_same_q(q, reference(platform, x)[0], "leading + partial blocks")
    assert_sharded_like(q.packed, NamedSharding(mesh, P("a", None, None)), "leading + partial blocks: packed")
    y = jax.jit(jk.dequantize)(q)
    assert_bits(y, reference(platform, x)[1], "leading + partial blocks: dequantize")


# ---------------------------------------------------------------- shardings in and out


@case("replicated-in-sharded-out")
def _(platform):
    """Output shardings propagate back through the rule: each device quantizes only its slice."""
    mesh = any_mesh(platform)
    x = data((8, 512))
    xr = jax.device_put(x, NamedSharding(mesh, P()))
    ref = reference(platform, x)[0]
    want = quantized_sharding(NamedSharding(mesh, P("a", "b")), ref)
    f = jax.jit(lambda v: jk.quantize(v, tensor_scale=1.0), out_shardings=want)
    q = f(xr)
    ref1 = jax.jit(lambda v: jk.quantize(v, tensor_scale=1.0))(jax.device_put(x, devices(platform)[0]))
    assert_same_q(q, ref1, "replicated in, sharded out")
    assert_sharded_like(q.packed, want.packed, "replicated in, sharded out")
    compiled = f.lower(xr).compile()
    assert_no_data_collectives(compiled, "replicated in, sharded out")
    assert_kernel_runs_on_shard(compiled, "kbit_quantize", q.packed, "replicated in, sharded out")
    qr = jax.device_put(ref1, NamedSharding(mesh, P()))
    g = jax.jit(jk.dequantize, out_shardings=NamedSharding(mesh, P("a", "b")))
    y = g(qr)
    assert_bits(y, jax.jit(jk.dequantize)(ref1), "replicated in, sharded out: dequantize")
    compiled = g.lower(qr).compile()
    assert_no_data_collectives(compiled, "replicated in, sharded out: dequantize")
    assert_kernel_runs_on_shard(compiled, "kbit_dequantize", y, "replicated in, sharded out: dequantize")


@case("device-put-quantized")
def _(platform):
    """jax.device_put(q, quantized_sharding(...)) and a shard-local dequantize of the result."""
    mesh = any_mesh(platform)
    x = data((8, 16, 256))
    ref_q, ref_y = reference(platform, x)
    sharding = NamedSharding(mesh, P("a", None, "b"))
    q = jax.device_put(ref_q, quantized_sharding(sharding, ref_q))
    assert_same_q(q, ref_q, "device_put")
    assert_sharded_like(q.packed, NamedSharding(mesh, P("a", None, "b", None)), "device_put packed")
    assert_sharded_like(q.scales, NamedSharding(mesh, P("a", None, "b")), "device_put scales")
    f = jax.jit(jk.dequantize)
    y = f(q)
    assert_bits(y, ref_y, "dequantize after device_put")
    assert_sharded_like(y, sharding, "dequantize after device_put")
    assert_no_data_collectives(f.lower(q).compile(), "dequantize after device_put")


@case("quantize-params")
def _(platform):
    """Quantizing a sharded parameter tree keeps every parameter sharded."""
    mesh = any_mesh(platform)
    params = {
        "w1": (data((64, 256), BF16, 1), P("a", "b")),
        "w2": (data((256, 64), BF16, 2), P("b", None)),
        "emb": (data((8, 32, 128), np.float32, 3), P(None, "a", "b")),
        "bias": (data((256,), np.float32, 4), P("b")),
    }
    shardings = {k: NamedSharding(mesh, s) for k, (_, s) in params.items()}
    host = {k: v for k, (v, _) in params.items()}
    placed = jax.device_put(host, shardings)
    f = jax.jit(lambda p: jax.tree.map(lambda w: jk.quantize(w, 4), p))
    qs = f(placed)
    # One scalar per tensor (its automatic tensor scale); XLA's GPU backend combines them into one all-reduce.
    assert_no_data_collectives(f.lower(placed).compile(), "quantize_params", max_reduced=len(params))
    one = jax.device_put(host, devices(platform)[0])
    refs = jax.jit(lambda p: jax.tree.map(lambda w: jk.quantize(w, 4), p))(one)
    for name in params:
        assert_same_q(qs[name], refs[name], f"quantize_params {name}")
        want = quantized_sharding(shardings[name], qs[name])
        for leaf_name, leaf, s in zip(
            ("packed", "scales", "codebook", "tensor_scale"), leaves(qs[name]), leaves(want)
        ):
            assert_sharded_like(leaf, s, f"quantize_params {name}.{leaf_name}")
    g = jax.jit(
        lambda qs: jax.tree.map(jk.dequantize, qs, is_leaf=lambda a: isinstance(a, jk.QuantizedArray))
    )
    ys = g(qs)
    assert_no_data_collectives(g.lower(qs).compile(), "dequantize params")
    for name in params:
        assert_sharded_like(ys[name], shardings[name], f"dequantized {name}")


@case("eager")
def _(platform):
    """Outside jit the primitives run as one-op jits: same sharding behaviour."""
    mesh = any_mesh(platform)
    x = data((8, 512))
    ref_q, ref_y = reference(platform, x)
    sharding = NamedSharding(mesh, P("a", "b"))
    q = jk.quantize(jax.device_put(x, sharding))
    assert_same_q(q, ref_q, "eager quantize")
    assert_sharded_like(q.packed, quantized_sharding(sharding, q).packed, "eager quantize")
    y = jk.dequantize(q)
    assert_bits(y, ref_y, "eager dequantize")
    assert_sharded_like(y, sharding, "eager dequantize")


@case("auto-tensor-scale-all-reduce")
def _(platform):
    """tensor_scale='auto' is a global max: scalar all-reduces, never a gather of the data."""
    mesh = any_mesh(platform)
    x = data((16, 1024))
    x[3, 700] = 4.0e4  # one large element on one shard decides the scale for all of them
    xs = jax.device_put(x, NamedSharding(mesh, P("a", "b")))
    f = jax.jit(lambda v: jk.auto_tensor_scale(v, "e4m4"))
    assert_bits(f(xs), jk.auto_tensor_scale(jax.device_put(x, devices(platform)[0]), "e4m4"), "auto scale")
    hlo = f.lower(xs).compile().as_text()
    assert not data_collectives(hlo), data_collectives(hlo)
    if len(mesh.devices.flat) > 1:
        assert "all-reduce" in hlo, "expected the max to be all-reduced"


@case("gspmd-partitioner")
def _(platform):
    """With Shardy switched off, the GSPMD callbacks give the same shard-local calls."""
    if not hasattr(jax.config, "jax_use_shardy_partitioner"):
        raise Skip("this JAX has no GSPMD partitioner switch")
    previous = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", False)
    try:
        mesh = any_mesh(platform)
        check_round_trip(platform, mesh, P("a", "b"), data((8, 512), seed=5), k=5)
    finally:
        jax.config.update("jax_use_shardy_partitioner", previous)


# ---------------------------------------------------------------- shard_map and export


def serialized(exported):
    """export's serialize -> deserialize, or the in-memory Exported where flatbuffers is missing
    (test_export.py::test_serialization reports that as a skip)."""
    try:
        import flatbuffers  # noqa: F401
    except ImportError:
        return exported
    return jax.export.deserialize(exported.serialize())


def _sharded_body(v, t):
    return jk.dequantize(jk.quantize(v, 4, tensor_scale=t))


@case("inside-shard-map")
def _(platform):
    """Inside shard_map the call already sees one shard; a global tensor scale is computed outside."""
    mesh = any_mesh(platform)
    x = data((8, 512))
    spec = P("a", "b")

    def f(v):
        t = jk.auto_tensor_scale(v, "e4m4")
        return jax.shard_map(_sharded_body, mesh=mesh, in_specs=(spec, P()), out_specs=spec)(v, t)

    xs = jax.device_put(x, NamedSharding(mesh, spec))
    y = jax.jit(f)(xs)
    assert_bits(y, reference(platform, x, k=4)[1], "shard_map")
    assert_no_data_collectives(jax.jit(f).lower(xs).compile(), "shard_map")


@case("export-sharded-jit")
def _(platform):
    """A jit with shardings exports, reloads and gives the same bits (XLA gathers around the call)."""
    mesh = any_mesh(platform)
    x = data((8, 512))
    sharding = NamedSharding(mesh, P("a", "b"))
    f = jax.jit(lambda v: jk.dequantize(jk.quantize(v, 4)), in_shardings=sharding, out_shardings=sharding)
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    exported = jax.export.export(f, platforms=("cpu", "cuda"), disabled_checks=DISABLED_CHECKS)(spec)
    loaded = serialized(exported)
    assert loaded.nr_devices == len(mesh.devices.flat)
    y = loaded.call(jax.device_put(x, sharding))
    assert_bits(y, reference(platform, x, k=4)[1], "exported sharded jit")
    assert y.sharding.is_equivalent_to(sharding, 2)


@case("export-shard-map")
def _(platform):
    """Exporting a shard_map keeps the reloaded computation shard-local."""
    mesh = any_mesh(platform)
    x = data((8, 512))
    spec = P("a", "b")
    sharding = NamedSharding(mesh, spec)

    def f(v):
        t = jk.auto_tensor_scale(v, "e4m4")
        return jax.shard_map(_sharded_body, mesh=mesh, in_specs=(spec, P()), out_specs=spec)(v, t)

    arg = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    exported = jax.export.export(jax.jit(f), platforms=("cpu", "cuda"), disabled_checks=DISABLED_CHECKS)(arg)
    loaded = serialized(exported)
    xs = jax.device_put(x, sharding)
    call = jax.jit(loaded.call)
    y = call(xs)
    assert_bits(y, reference(platform, x, k=4)[1], "exported shard_map")
    assert_no_data_collectives(call.lower(xs).compile(), "exported shard_map")


# ---------------------------------------------------------------- fused matmul


def check_matmul(platform, mesh, x_spec, w_spec, lead, rows, din, dout, dtype=BF16, k=4, tiled=None) -> None:
    """jit(matmul) with ``x`` [*lead, rows, din] and ``W`` [din, dout] sharded as given (``w_spec`` is W's
    spec, mapped to the stored W^T by ``quantized_sharding``): the result is sharded
    along the batch dims of x and the `out` axis of W, no data moves between devices, each device's kernel
    computes its shard, and the values match the unsharded product (bit for bit on the CPU, whose handler
    computes each output element on its own; on a GPU the split of the reduction depends on the shard
    width, so to float32-summation accuracy)."""
    what = f"{dict(mesh.shape)} x{x_spec} w{w_spec} {dtype.__name__ if hasattr(dtype, '__name__') else dtype}"
    x = data((*lead, rows, din), dtype, seed=din)
    w = data((din, dout), np.float32, seed=dout) * np.float32(0.05)
    one = devices(platform)[0]
    q1 = jax.jit(lambda w: jk.quantize_matrix(w, k, tiled=tiled))(jax.device_put(w, one))
    want = np.asarray(jax.jit(jk.matmul)(jax.device_put(x, one), q1)).astype(np.float64)
    qs = jax.device_put(q1, quantized_sharding(NamedSharding(mesh, w_spec), q1))
    xs = jax.device_put(x, NamedSharding(mesh, x_spec))
    f = jax.jit(jk.matmul)
    y = f(xs, qs)
    if platform == "cpu":
        assert_bits(y, want.astype(y.dtype), "matmul " + what)
    else:
        err = np.linalg.norm(np.asarray(y, np.float64) - want) / np.linalg.norm(want)
        assert err < 1e-2, f"matmul {what}: relative difference {err:.2e} from the unsharded product"
    out_entry = list(w_spec)[1] if len(w_spec) > 1 else None
    x_entries = (list(x_spec) + [None] * (len(lead) + 2))[: len(lead) + 1]
    want_sharding = NamedSharding(mesh, P(*x_entries, out_entry))
    assert_sharded_like(y, want_sharding, "matmul " + what)
    compiled = f.lower(xs, qs).compile()
    assert_no_data_collectives(compiled, "matmul " + what, max_reduced=0)
    if platform == "gpu" and np.dtype(dtype) == np.float32:  # float32 x: dequantize + dot on each shard
        w_shard = NamedSharding(mesh, P(out_entry, None)).shard_shape((dout, din))
        got = kernel_shapes(compiled.as_text(), "kbit_dequantize")
        assert got == [tuple(w_shard)], (
            f"matmul {what}: kbit_dequantize runs on {got}, the shard is {w_shard}"
        )
    else:
        target = "kbit_matmul_tiled_v2" if q1.tiled else "kbit_matmul"
        assert_kernel_runs_on_shard(compiled, target, y, "matmul " + what)


@case("matmul-out-sharded")
def _(platform):
    """Tensor-parallel decode: x replicated, W sharded along `out` (W^T's rows), tiled (shards of whole
    tiles of 16 outputs) and plain."""
    mesh = make_mesh(platform, "rows")
    for tiled in (True, False):
        check_matmul(platform, mesh, P(), P(None, "b"), (), 1, 256, 16 * len(devices(platform)), tiled=tiled)
    check_matmul(platform, mesh, P(), P(None, "b"), (), 5, 300, 64, dtype=np.float32, k=3)


@case("matmul-batch-and-out")
def _(platform):
    """x sharded along a batch dim and W along `out` on the other mesh axis."""
    mesh = any_mesh(platform)
    # 48 outputs over the mesh's `b` axis are not whole tiles of 16: plain storage.
    check_matmul(
        platform, mesh, P("a", None, None), P(None, "b"), (2,), 4, 128, 48, dtype=np.float16, k=5, tiled=False
    )


@case("matmul-tiled-partial-tiles")
def _(platform):
    """A tiled W whose `out` shards would cut its tiles of 16 outputs: ``quantized_sharding`` leaves `out`
    (and `in`) whole, and the product is still the unsharded one, bit for bit on the CPU."""
    mesh = make_mesh(platform, "rows")
    n = len(devices(platform))
    if n < 2:
        raise Skip("needs two devices")
    din, dout = 256, 16 * (n // 2) if n > 2 else 16  # n shards of 8 (or fewer) outputs: not whole tiles
    w = data((din, dout), np.float32, seed=3) * np.float32(0.05)
    one = devices(platform)[0]
    q1 = jax.jit(lambda w: jk.quantize_matrix(w, 4))(jax.device_put(w, one))
    assert q1.tiled
    spec = quantized_sharding(NamedSharding(mesh, P("a", "b")), q1)
    assert spec.tiled and spec.stored.packed.spec == P(None, None, None), spec.stored.packed.spec
    x = data((1, din), BF16, seed=4)
    want = np.asarray(jax.jit(jk.matmul)(jax.device_put(x, one), q1))
    qs = jax.device_put(q1, quantized_sharding(NamedSharding(mesh, P(None, "b")), q1))
    y = jax.jit(jk.matmul)(jax.device_put(x, NamedSharding(mesh, P())), qs)
    if platform == "cpu":
        assert_bits(y, want, "tiled, partial tiles")
    else:
        np.testing.assert_allclose(np.asarray(y, np.float32), want.astype(np.float32), rtol=1e-2, atol=1e-2)


@case("dequantize-tiled")
def _(platform):
    """Dequantize of a tiled W (from its tile order) under jit: sharded along `out` in whole tiles of 16,
    each device's kernel dequantizes its own rows with no data moving. Words sharded so that the shards
    would cut tiles (placed by hand: ``quantized_sharding`` never does it) are dequantized whole instead.
    Bit for bit the unsharded result either way."""
    mesh = make_mesh(platform, "rows")
    n = len(devices(platform))
    if n < 2:
        raise Skip("needs two devices")
    one = devices(platform)[0]
    f = jax.jit(lambda q: jk.dequantize(q))
    for dout in (16 * n, 8 * n):
        w = data((256, dout), np.float32, seed=dout) * np.float32(0.05)
        q1 = jax.jit(lambda w: jk.quantize_matrix(w, 3))(jax.device_put(w, one))
        assert q1.tiled
        want = np.asarray(f(q1))
        # W^T's rows split n ways, as for row order; for 8 * n outputs that cuts every tile in two.
        rows_split = quantized_sharding(NamedSharding(mesh, P(None, "b")), q1.with_tiles(False))
        qs = jax.device_put(q1, type(q1).tree_unflatten(True, [rows_split.stored]))
        y = f(qs)
        what = f"dequantize tiled 256x{dout}"
        assert_bits(y, want, what)
        compiled = f.lower(qs).compile()
        whole = dout % (16 * n) == 0
        rows = dout // n if whole else dout
        assert kernel_shapes(compiled.as_text(), "kbit_dequantize_tiled_v2") == [(rows, 256)], what
        if whole:
            assert_no_data_collectives(compiled, what, max_reduced=0)
            assert_sharded_like(y, NamedSharding(mesh, P(None, "b")), what)


@case("matmul-batch-sharded")
def _(platform):
    """x sharded along its rows, W replicated: every device multiplies its rows by the whole W."""
    mesh = make_mesh(platform, "cols")
    n = len(devices(platform))
    check_matmul(platform, mesh, P("a", None), P(), (), 2 * n, 96, 40, k=2)


def worker(platform: str) -> int:
    """Runs every case; prints {case: null | 'skip: reason' | traceback} on one marked line."""
    results: dict[str, str | None] = {}
    for name, fn in CASES.items():
        try:
            fn(platform)
            results[name] = None
        except Skip as err:
            results[name] = f"skip: {err}"
        except Exception:  # noqa: BLE001 - reported to the test that owns the case
            results[name] = traceback.format_exc()
    info = {"devices": len(devices(platform)), "jax": jax.__version__}
    print(RESULT_MARKER + json.dumps({"results": results, "info": info}), flush=True)
    return 0


# ================================================================ pytest side


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@functools.cache
def worker_results(platform: str) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={VIRTUAL_CPU_DEVICES}"
    ).strip()
    with tempfile.TemporaryDirectory() as cwd:  # away from the source tree: import the installed package
        proc = subprocess.run(
            [sys.executable, "-P", os.path.abspath(__file__), platform],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=1200,
        )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    raise AssertionError(
        f"the sharding worker ({platform}) exited with {proc.returncode} without results:\n"
        f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )


PLATFORMS = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("platform", PLATFORMS)
def test_sharding(platform: str, name: str):
    if platform == "gpu" and not _has_gpu():
        pytest.skip("no GPU")
    out = worker_results(platform)
    if platform == "cpu":
        assert out["info"]["devices"] == VIRTUAL_CPU_DEVICES, out["info"]
    result = out["results"][name]
    if result is not None and result.startswith("skip: "):
        pytest.skip(result[len("skip: ") :])
    assert result is None, f"[{out['info']}]\n{result}"


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1]))
