"""Flax NNX (KbitLinear, quantize_model) and Linen (KbitDense, quantize_params + apply) integration."""

from __future__ import annotations

import gc
import re
import subprocess
import sys
import warnings
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GPU, assert_bitwise_equal, needs_cuda

pytest.importorskip("flax")

import flax.linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

import jax_kbit as jk  # noqa: E402
from jax_kbit import flax_nnx  # noqa: E402
from jax_kbit.flax_linen import KbitDense  # noqa: E402
from jax_kbit.flax_nnx import KbitLinear, QuantizedParam, quantize_model  # noqa: E402
from jax_kbit.matmul import FUSED_MAX_ROWS  # noqa: E402

# Every test runs on the CPU; the GPU ones switch to the GPU inside (jax.default_device nests).
pytestmark = [
    pytest.mark.usefixtures("cpu"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


KERNEL_TYPES = {"matrix": jk.QuantizedMatrix, "array": jk.QuantizedArray}


def test_import_jax_kbit_does_not_import_flax():
    code = "import sys, jax_kbit; assert 'flax' not in sys.modules, 'flax imported'; print('ok')"
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# ---------------------------------------------------------------- NNX


class Block(nnx.Module):
    def __init__(self, d, rngs):
        self.attn = nnx.Linear(d, d, rngs=rngs)
        self.mlp = nnx.Dict(
            up=nnx.Linear(d, 2 * d, rngs=rngs), down=nnx.Linear(2 * d, d, use_bias=False, rngs=rngs)
        )
        self.norm = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, x):
        x = self.norm(x + self.attn(x))
        return x + self.mlp["down"](jax.nn.gelu(self.mlp["up"](x)))


class Net(nnx.Module):
    def __init__(self, d, rngs, n=2):
        self.blocks = nnx.List([Block(d, rngs) for _ in range(n)])
        self.head = nnx.Linear(d, 10, rngs=rngs)

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _reference_net(model_q, seed, d):
    """A full-precision Net whose Linear kernels are the dequantized kernels of model_q."""
    ref = Net(d, nnx.Rngs(seed))
    for path, m in nnx.iter_modules(model_q):
        if isinstance(m, KbitLinear):
            target = ref
            for p in path:
                target = target[p] if isinstance(p, int) else getattr(target, p)
            target.kernel[...] = m.kernel.get_value().dequantize()
    return ref


@pytest.mark.parametrize("layout", ["matrix", "array"])
def test_kbit_linear_matches_dequantized_dense(rng, layout):
    seed = int(rng.integers(1 << 30))
    lin = nnx.Linear(96, 64, rngs=nnx.Rngs(seed))
    lin.bias[...] = jnp.asarray(rng.standard_normal(64), jnp.float32)
    q = KbitLinear.from_linear(lin, 4, layout=layout)
    kern = q.kernel.get_value()
    assert isinstance(q.kernel, QuantizedParam) and kern.shape == (96, 64)
    assert type(kern) is KERNEL_TYPES[layout]
    x = jnp.asarray(rng.standard_normal((5, 3, 96)), jnp.float32)
    want = jnp.matmul(x, kern.dequantize(), precision="highest") + lin.bias[...]
    np.testing.assert_allclose(np.asarray(q(x)), np.asarray(want), rtol=1e-5, atol=1e-5)
    # split / merge / jit keep the quantized kernel
    graphdef, state = nnx.split(q)
    q2 = nnx.merge(graphdef, state)
    assert type(q2.kernel.get_value()) is KERNEL_TYPES[layout]
    y = nnx.jit(lambda m, x: m(x))(q2, x)
    assert_bitwise_equal(np.asarray(y), np.asarray(q(x)))
    # the kernel is not an nnx.Param (optimizers over Params leave it frozen)
    params = nnx.state(q, nnx.Param)
    names = {"/".join(map(str, p)) for p, _ in params.flat_state()}
    assert names == {"bias"}
    # bf16 computation dtype: the kernel is dequantized straight to bf16
    qb = KbitLinear(q.kernel.get_value(), None, dtype=jnp.bfloat16)
    yb = qb(x)
    assert yb.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(yb, np.float32), np.asarray(want - lin.bias[...]), rtol=0.05, atol=0.05
    )
    qp = KbitLinear(q.kernel.get_value(), None, dtype=jnp.bfloat16, preferred_element_type=jnp.float32)
    assert qp(x).dtype == jnp.float32
    with pytest.raises(TypeError, match="QuantizedMatrix or QuantizedArray"):
        KbitLinear(lin.kernel[...])


def test_quantize_model_rules_and_equivalence(rng):
    d, seed = 128, int(rng.integers(1 << 30))
    model = Net(d, nnx.Rngs(seed))
    x = jnp.asarray(rng.standard_normal((4, d)), jnp.float32)
    rules = [jk.Rule(r"attn", k=5), jk.Rule(r"mlp/up", k=3), jk.Rule(r"blocks/1/mlp/down", skip=True)]
    rules.insert(0, jk.Rule(r"blocks/0/mlp/up", k=3, layout="array"))
    copy = quantize_model(model, rules, k=4, inplace=False)
    assert type(model.blocks[0].attn) is nnx.Linear  # the original is untouched
    b0, b1 = copy.blocks[0], copy.blocks[1]
    assert b0.attn.kernel.get_value().k == 5 and b0.mlp["up"].kernel.get_value().k == 3
    assert b0.mlp["down"].kernel.get_value().k == 4  # default
    # default layout: QuantizedMatrix (jax_kbit.matmul); a rule can keep the 0.1 layout
    assert isinstance(b0.attn.kernel.get_value(), jk.QuantizedMatrix)
    assert isinstance(b0.mlp["up"].kernel.get_value(), jk.QuantizedArray)
    assert isinstance(b1.mlp["up"].kernel.get_value(), jk.QuantizedMatrix)
    assert type(b1.mlp["down"]) is nnx.Linear  # skipped
    assert type(copy.head) is nnx.Linear  # 128 x 10 < min_size
    y = nnx.jit(lambda m, x: m(x))(copy, x)
    want = _reference_net(copy, seed, d)(x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
    # in place: the same object, same result
    same = quantize_model(model, rules, k=4)
    assert same is model and isinstance(model.blocks[0].attn, KbitLinear)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(y), rtol=1e-6, atol=1e-6)
    graphdef, state = nnx.split(model)
    np.testing.assert_allclose(np.asarray(nnx.merge(graphdef, state)(x)), np.asarray(y), rtol=1e-6, atol=1e-6)


def test_quantize_model_warns_and_min_size(rng):
    model = Net(64, nnx.Rngs(0), n=1)
    with pytest.warns(UserWarning, match="decoder"):
        quantize_model(model, [jk.Rule("decoder", k=2)], min_size=0)
    assert isinstance(model.head, KbitLinear)  # min_size=0 takes the 64 x 10 head too
    model = Net(64, nnx.Rngs(0), n=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        quantize_model(model, min_size=10**9)
    assert all(type(m) is not KbitLinear for _, m in nnx.iter_modules(model))


def test_quantize_model_frees_each_kernel_before_the_next(rng, monkeypatch):
    """One layer at a time: when layer i is quantized, the kernels of layers < i are already gone."""
    model = Net(64, nnx.Rngs(1), n=3)
    refs = [weakref.ref(m.kernel[...]) for _, m in nnx.iter_modules(model) if type(m) is nnx.Linear]
    alive_at_call = []
    real = flax_nnx._quantize_kernel

    def spy(x, *args, **kwargs):
        gc.collect()
        alive_at_call.append(sum(r() is not None for r in refs))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(flax_nnx, "_quantize_kernel", spy)
    quantize_model(model, min_size=0)
    gc.collect()
    n = len(refs)
    assert alive_at_call == list(range(n, 0, -1)), alive_at_call
    assert all(r() is None for r in refs)


@pytest.mark.parametrize("layout", ["matrix", "array"])
def test_nnx_lora_finetune_on_frozen_quantized_weights(rng, layout):
    d = 64

    class Adapted(nnx.Module):
        def __init__(self, rngs):
            self.base = KbitLinear.from_linear(nnx.Linear(d, d, rngs=rngs), 3, layout=layout)
            self.lora = nnx.LoRA(d, 8, d, rngs=rngs)

        def __call__(self, x):
            return self.base(x) + self.lora(x)

    model = Adapted(nnx.Rngs(int(rng.integers(1 << 30))))
    kern = model.base.kernel.get_value()
    assert type(kern) is KERNEL_TYPES[layout]
    frozen = np.asarray(jax.tree.leaves(kern)[0])  # the packed codes
    x = jnp.asarray(rng.standard_normal((32, d)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((32, d)), jnp.float32)

    def loss(m):
        return jnp.mean((m(x) - y) ** 2)

    @nnx.jit
    def step(m):
        lval, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
        nnx.update(m, jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(m, nnx.LoRAParam), grads))
        return lval

    first = float(step(model))
    for _ in range(20):
        last = float(step(model))
    assert last < first
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(model.base.kernel.get_value())[0]), frozen)


def test_quantize_params_on_nnx_state_names(rng):
    model = Net(64, nnx.Rngs(0), n=1)
    state = nnx.state(model, nnx.Param)
    q = jk.quantize_params(state, 4, min_size=0, rules=[jk.Rule(r"kernel$", k=2), jk.Rule(r".", skip=True)])
    rep = jk.compression_report(state, q)
    quantized = sorted(r.path for r in rep.rows if r.k is not None)
    assert quantized == [
        "blocks/0/attn/kernel",
        "blocks/0/mlp/down/kernel",
        "blocks/0/mlp/up/kernel",
        "head/kernel",
    ]
    assert all(r.k == 2 for r in rep.rows if r.k is not None)


# ---------------------------------------------------------------- Linen


class MLP(nn.Module):
    dense: type = nn.Dense

    @nn.compact
    def __call__(self, x):
        x = nn.relu(self.dense(256, name="up")(x))
        x = nn.relu(self.dense(128, name="mid")(x))
        return self.dense(8, name="out")(x)


def test_linen_apply_with_quantized_params(rng):
    x = jnp.asarray(rng.standard_normal((3, 96)), jnp.float32)
    params = MLP().init(jax.random.key(int(rng.integers(1 << 30))), x)["params"]
    # up: QuantizedMatrix (the default for kernels), mid: QuantizedArray, out: 128 x 8 stays float
    qparams = jk.quantize_params(params, 4, rules=[jk.Rule("mid", k=3, layout="array")])
    assert isinstance(qparams["up"]["kernel"], jk.QuantizedMatrix)
    assert isinstance(qparams["mid"]["kernel"], jk.QuantizedArray) and qparams["mid"]["kernel"].k == 3
    assert not isinstance(qparams["out"]["kernel"], (jk.QuantizedArray, jk.QuantizedMatrix))
    # 1) unchanged nn.Dense model: dequantize the tree inside apply
    y_dense = jax.jit(lambda qp, x: MLP().apply({"params": jk.dequantize_params(qp)}, x))(qparams, x)
    # 2) KbitDense: same param layout, dequantized layer by layer
    y_kbit = jax.jit(lambda qp, x: MLP(dense=KbitDense).apply({"params": qp}, x))(qparams, x)
    np.testing.assert_allclose(np.asarray(y_kbit), np.asarray(y_dense), rtol=1e-5, atol=1e-5)
    y_full = MLP().apply({"params": params}, x)
    assert float(jnp.max(jnp.abs(y_kbit - y_full))) < 0.5 * float(jnp.max(jnp.abs(y_full))) + 1e-3


def test_kbit_dense_init_and_errors(rng):
    x = jnp.ones((2, 64), jnp.float32)
    variables = MLP(dense=lambda f, name: KbitDense(f, k=3, name=name)).init(jax.random.key(0), x)
    kern = variables["params"]["up"]["kernel"]
    assert isinstance(kern, jk.QuantizedMatrix) and kern.k == 3 and kern.shape == (64, 256)
    y = KbitDense(256, k=3).apply({"params": variables["params"]["up"]}, x)
    want = jnp.matmul(x, kern.dequantize(), precision="highest") + variables["params"]["up"]["bias"]
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expected"):
        KbitDense(128).apply({"params": variables["params"]["up"]}, x)
    arr = KbitDense(256, k=2, layout="array").init(jax.random.key(1), x)["params"]["kernel"]
    assert isinstance(arr, jk.QuantizedArray) and arr.k == 2 and arr.shape == (64, 256)
    with pytest.raises(ValueError, match="layout must be one of"):
        KbitDense(256, layout="rows").init(jax.random.key(1), x)


# ---------------------------------------------------------------- QuantizedMatrix kernels: the fused path


def _forward_lowered(layer, x):
    """The lowered jitted forward of an NNX layer (state as an argument, as nnx.jit passes it)."""
    graphdef, state = nnx.split(layer)
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)).lower(state, x), state


def test_kbit_linear_batch_1_multiplies_the_codes_directly(rng):
    """At batch 1 the forward is one kbit_matmul custom call: no dequantized (full-size) weight."""
    lin = nnx.Linear(256, 512, rngs=nnx.Rngs(0))
    layer = KbitLinear.from_linear(lin, 4)
    for shape in ((1, 256), (1, 1, 256)):  # a single token, with and without a sequence axis
        lowered, state = _forward_lowered(layer, jnp.ones(shape, jnp.float32))
        text, compiled = lowered.as_text(), lowered.compile().as_text()
        assert "kbit_matmul" in text and "kbit_dequantize" not in text, shape
        assert "kbit_matmul" in compiled and "kbit_dequantize" not in compiled, shape
    # The check can fail: the 0.1 layout dequantizes, and so does matmul itself above FUSED_MAX_ROWS rows.
    text = _forward_lowered(KbitLinear.from_linear(lin, 4, layout="array"), jnp.ones((1, 256)))[0].as_text()
    assert "kbit_dequantize" in text and "kbit_matmul" not in text
    rows = FUSED_MAX_ROWS + 1
    assert "kbit_dequantize" in _forward_lowered(layer, jnp.ones((rows, 256)))[0].as_text()
    # Linen: KbitDense on quantize_params output, through Module.apply
    params = MLP().init(jax.random.key(0), jnp.ones((1, 96)))["params"]
    qparams = jk.quantize_params(params, 4, min_size=0)
    text = (
        jax.jit(lambda qp, x: MLP(dense=KbitDense).apply({"params": qp}, x))
        .lower(qparams, jnp.ones((1, 96), jnp.bfloat16))
        .as_text()
    )
    assert text.count("kbit_matmul") >= 3 and "kbit_dequantize" not in text


@pytest.mark.gpu
@needs_cuda
def test_gpu_kbit_linear_batch_1_materialises_no_weight():
    din, dout = 4096, 4096
    dense_bytes = din * dout * 2  # the bf16 weight, 32 MiB
    with jax.default_device(GPU):
        w = jax.random.normal(jax.random.key(0), (din, dout), jnp.bfloat16) * jnp.bfloat16(0.02)
        x = jax.random.normal(jax.random.key(1), (1, din), jnp.bfloat16)
        layer = KbitLinear(jk.quantize_matrix(w, 4), None, dtype=jnp.bfloat16)
        lowered, state = _forward_lowered(layer, x)
        assert "kbit_matmul" in lowered.as_text() and "kbit_dequantize" not in lowered.as_text()
        compiled = lowered.compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp < dense_bytes // 16, f"{temp} bytes of temporaries"
        y = compiled(state, x)
        want = jnp.matmul(x.astype(jnp.float32), layer.kernel.get_value().dequantize(jnp.float32))
        err = float(jnp.linalg.norm(y.astype(jnp.float32) - want) / jnp.linalg.norm(want))
        assert y.shape == (1, dout) and err < 1e-2, err
        # The measure can fail: the same layer with a QuantizedArray kernel holds the dequantized weight.
        layer_a = KbitLinear(jk.quantize(w, 4), None, dtype=jnp.bfloat16)
        temp_a = _forward_lowered(layer_a, x)[0].compile().memory_analysis().temp_size_in_bytes
        assert temp_a >= dense_bytes, temp_a


def test_grad_through_quantized_matrix_layers(rng):
    """jax.grad to the activations (NNX) and to LoRA-style adapters (Linen, Module.apply) through matmul."""
    lin = nnx.Linear(96, 48, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    lin.bias[...] = jnp.asarray(rng.standard_normal(48), jnp.float32)
    layer = KbitLinear.from_linear(lin, 4)
    w = layer.kernel.get_value().dequantize()
    x = jnp.asarray(rng.standard_normal((3, 96)), jnp.float32)
    grad_fn = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(layer(x)))))
    got = grad_fn(x)
    # the backward pass at 3 rows is the fused transposed product too: no dequantized weight either way
    text = grad_fn.lower(x).as_text()
    assert re.search(r"kbit_matmul_t(_tiled)?\b", text) and "kbit_dequantize" not in text
    want = jax.grad(lambda x: jnp.sum(jnp.sin(jnp.matmul(x, w, precision="highest") + lin.bias[...])))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(got))) > 0

    class Adapted(nn.Module):
        @nn.compact
        def __call__(self, x):
            a = self.param("lora_a", nn.initializers.normal(0.1), (x.shape[-1], 4))
            b = self.param("lora_b", nn.initializers.normal(0.1), (4, 48))
            return KbitDense(48, name="base")(x) + (x @ a) @ b

    params = Adapted().init(jax.random.key(0), x)["params"]  # base/kernel: a QuantizedMatrix
    assert isinstance(params["base"]["kernel"], jk.QuantizedMatrix)
    lora = {n: params[n] for n in ("lora_a", "lora_b")}
    y = jnp.asarray(rng.standard_normal((3, 48)), jnp.float32)

    def loss(lora, base, x):
        return jnp.mean((Adapted().apply({"params": {"base": base, **lora}}, x) - y) ** 2)

    dense_base = dict(params["base"], kernel=params["base"]["kernel"].dequantize())  # plain-array kernel
    g_lora, g_x = jax.jit(jax.grad(loss, argnums=(0, 2)))(lora, params["base"], x)
    w_lora, w_x = jax.grad(loss, argnums=(0, 2))(lora, dense_base, x)
    for a, b in zip(jax.tree.leaves((g_lora, g_x)), jax.tree.leaves((w_lora, w_x))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_layout_options_and_errors(rng):
    def my_dot(*args, **kwargs):  # a custom dot_general (only the QuantizedArray path can use it)
        return jax.lax.dot_general(*args, **kwargs)

    custom = nnx.Linear(64, 64, dot_general=my_dot, rngs=nnx.Rngs(0))
    assert isinstance(KbitLinear.from_linear(custom, 4).kernel.get_value(), jk.QuantizedArray)  # auto
    with pytest.raises(ValueError, match="dot_general"):
        KbitLinear.from_linear(custom, 4, layout="matrix")
    with pytest.raises(ValueError, match="layout must be one of"):
        KbitLinear.from_linear(custom, 4, layout="cols")
    with pytest.raises(TypeError, match="linear must be an nnx.Linear"):
        KbitLinear.from_linear(nnx.LayerNorm(8, rngs=nnx.Rngs(0)), 4)
    with pytest.raises(ValueError, match="k must be"):
        KbitLinear.from_linear(custom, 9)
    with pytest.raises(ValueError, match="logical shape"):
        KbitLinear(jk.quantize_matrix(jnp.ones((2, 64, 64)), 4))
    model = Net(64, nnx.Rngs(0), n=1)
    model.head = nnx.Linear(64, 64, dot_general=my_dot, rngs=nnx.Rngs(1))
    quantize_model(model, min_size=0)
    assert isinstance(model.head.kernel.get_value(), jk.QuantizedArray)  # auto keeps its dot_general
    assert isinstance(model.blocks[0].attn.kernel.get_value(), jk.QuantizedMatrix)
    x = jnp.asarray(rng.standard_normal((2, 64)), jnp.float32)
    assert np.isfinite(np.asarray(model(x))).all()
    model = Net(64, nnx.Rngs(0), n=1)
    quantize_model(model, layout="array", min_size=0)
    kinds = {type(m.kernel.get_value()) for _, m in nnx.iter_modules(model) if isinstance(m, KbitLinear)}
    assert kinds == {jk.QuantizedArray}
    with pytest.raises(ValueError, match="layout must be one of"):
        quantize_model(Net(64, nnx.Rngs(0), n=1), layout="both")
    model = Net(64, nnx.Rngs(0), n=1)
    model.head = nnx.Linear(64, 64, dot_general=my_dot, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="quantize_model: head/kernel: the layer has a custom dot_general"):
        quantize_model(model, min_size=0, rules=[jk.Rule("head", layout="matrix")])
    with pytest.raises(ValueError, match="dot_general"):  # the constructor checks too
        KbitLinear(jk.quantize_matrix(jnp.ones((64, 64)), 4), dot_general=my_dot)
    # fitted codebooks follow the layout's blocks (along `in` for a matrix)
    lin = nnx.Linear(96, 64, rngs=nnx.Rngs(2))
    q = KbitLinear.from_linear(lin, 3, codebook="fit").kernel.get_value()
    np.testing.assert_array_equal(np.asarray(q.t.codebook), jk.fit_codebook(np.asarray(lin.kernel[...]).T, 3))
