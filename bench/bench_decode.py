"""End-to-end decode speed at batch 1: a Llama-shaped decoder with bf16 weights vs k-bit weights.

The model (random weights; speed does not depend on their values): token embedding, ``layers`` blocks of
RMSNorm -> fused QKV projection -> RoPE -> grouped-query attention over a static-length KV cache -> output
projection, RMSNorm -> fused gate/up projection -> SwiGLU -> down projection, then a final RMSNorm and the
LM head. The default shape is a ~1.1B-parameter model (hidden 2048, 16 layers, 32 heads with 8 KV heads,
MLP 8192, vocabulary 32000, cache of 1024 positions); ``--tiny`` is a 0.8M-parameter (1.6 MB) model for a
functional check on a CPU.

Weights: in the bf16 run every matrix is a bf16 array multiplied with ``jnp.dot``; in a k-bit run the four
matrices of every block and the LM head are ``QuantizedMatrix`` (built once by
``quantize_params(..., layout="matrix")``) multiplied with ``jax_kbit.matmul``, which at batch 1 reads the
codes directly. The embedding table and the norm weights stay bf16 in both (a decode step reads one row of
the table). ``--lm-head bf16`` keeps the LM head in bf16 in the k-bit runs too.

Timing: prefill a short random prompt, then greedy-decode ``--tokens`` tokens inside one ``jax.jit`` (a
``lax.fori_loop`` over decode steps, the KV cache in the loop carry); tokens/s is ``tokens / time`` of that
call (median of rounds, ``bench_gpu.timeit``); the prefill is not timed. Accuracy, against the bf16 run:
the relative error of the k-bit model's logits along the bf16 run's greedy sequence (``logit err``), its
next-token argmax along that sequence (teacher-forced, ``next-token agree``; for bf16 itself this is prefill
vs decode numerics), and its own greedy tokens position by position (``seq match``, which stays low once
the sequences diverge: with random weights the next-token distribution is nearly flat). Prints a table and
writes JSON to ``--out``.

    python bench/bench_decode.py              # the 1.1B model (GPU); --quick: K = 4 only, 64 tokens
    python bench/bench_decode.py --tiny       # 0.8M parameters, on a CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jax_kbit as jk

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import timeit  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    """Shape of the decoder (hashable: it is a static argument of the jitted functions)."""

    vocab: int = 32000
    hidden: int = 2048
    layers: int = 16
    heads: int = 32
    kv_heads: int = 8
    mlp: int = 8192
    max_len: int = 1024
    rope_theta: float = 10000.0
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"hidden / heads / kv_heads do not fit together: {self}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def qkv_features(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    def matrix_shapes(self) -> dict[str, tuple[int, int]]:
        """``[in, out]`` of the four matrices of one block."""
        return {
            "wqkv": (self.hidden, self.qkv_features),
            "wo": (self.heads * self.head_dim, self.hidden),
            "w_gate_up": (self.hidden, 2 * self.mlp),
            "w_down": (self.mlp, self.hidden),
        }

    def num_params(self) -> int:
        block = sum(a * b for a, b in self.matrix_shapes().values()) + 2 * self.hidden
        return self.layers * block + 2 * self.vocab * self.hidden + self.hidden


LLAMA_1B = Config()
TINY = Config(vocab=1024, hidden=128, layers=2, heads=4, kv_heads=2, mlp=512, max_len=128)

Params = dict[str, Any]


# ---------------------------------------------------------------- model


def init_params(cfg: Config, seed: int = 0, dtype: Any = jnp.bfloat16) -> Params:
    """Random weights: N(0, 1 / fan_in) matrices (so activations stay O(1)), N(0, 1) embeddings, unit norms.

    Drawn with NumPy on the host, so the same seed gives the same weights on every machine and nothing is
    compiled; each array is then put on the default device.
    """
    rng = np.random.default_rng(seed)

    def normal(shape: tuple[int, int], std: float) -> jax.Array:
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= np.float32(std)
        return jnp.asarray(x.astype(dtype))

    def ones() -> jax.Array:
        return jnp.asarray(np.ones((cfg.hidden,), dtype))

    layers = []
    for _ in range(cfg.layers):
        layer = {"attn_norm": ones(), "mlp_norm": ones()}
        for name, (din, dout) in cfg.matrix_shapes().items():
            layer[name] = normal((din, dout), 1.0 / math.sqrt(din))
        layers.append(layer)
    return {
        "embed": normal((cfg.vocab, cfg.hidden), 1.0),
        "layers": layers,
        "final_norm": ones(),
        "lm_head": normal((cfg.hidden, cfg.vocab), 1.0 / math.sqrt(cfg.hidden)),
    }


def quantize_weights(params: Params, k: int, *, lm_head: bool = True) -> Params:
    """The same tree with every block matrix (and the LM head unless ``lm_head=False``) a ``QuantizedMatrix``."""
    rules = [jk.Rule(r"^embed$|norm$", skip=True)]
    if not lm_head:
        rules.append(jk.Rule(r"^lm_head$", skip=True))
    return jk.quantize_params(params, k, rules=rules, min_size=0, layout="matrix")


def init_cache(cfg: Config, dtype: Any = jnp.bfloat16) -> dict[str, list[jax.Array]]:
    """Per-layer K and V caches ``[max_len, kv_heads, head_dim]`` (batch 1), zero-filled."""
    shape = (cfg.max_len, cfg.kv_heads, cfg.head_dim)
    zeros = jnp.zeros(shape, dtype)  # arrays are immutable: every layer can start from the same one
    return {"k": [zeros] * cfg.layers, "v": [zeros] * cfg.layers}


def linear(x: jax.Array, w: Any) -> jax.Array:
    """``x @ w``: ``jax_kbit.matmul`` for a ``QuantizedMatrix``, ``jnp.dot`` for a dense array."""
    if isinstance(w, jk.QuantizedMatrix):
        return jk.matmul(x, w)
    return jnp.dot(x, w)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope(x: jax.Array, pos: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding (rotate-half convention) of ``x [T, n, head_dim]`` at positions ``pos [T]``."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = pos.astype(jnp.float32)[:, None, None] * freqs  # [T, 1, half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def forward(
    params: Params, cache: dict[str, list[jax.Array]], tokens: jax.Array, start: jax.Array, cfg: Config
) -> tuple[jax.Array, dict[str, list[jax.Array]]]:
    """Run ``tokens [T]`` at positions ``start .. start + T - 1``: float32 logits ``[T, vocab]`` and the cache."""
    t = tokens.shape[0]
    hd, kvh, group = cfg.head_dim, cfg.kv_heads, cfg.heads // cfg.kv_heads
    pos = start + jnp.arange(t, dtype=jnp.int32)
    mask = jnp.arange(cfg.max_len, dtype=jnp.int32)[None, :] <= pos[:, None]  # [T, S] causal over the cache
    x = params["embed"][tokens]
    new_k, new_v = [], []
    for i, lp in enumerate(params["layers"]):
        h = rms_norm(x, lp["attn_norm"], cfg.eps)
        qkv = linear(h, lp["wqkv"])
        q = qkv[:, : cfg.heads * hd].reshape(t, cfg.heads, hd)
        k = qkv[:, cfg.heads * hd : (cfg.heads + kvh) * hd].reshape(t, kvh, hd)
        v = qkv[:, (cfg.heads + kvh) * hd :].reshape(t, kvh, hd)
        q, k = rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta)
        ck = lax.dynamic_update_slice(cache["k"][i], k.astype(cache["k"][i].dtype), (start, 0, 0))
        cv = lax.dynamic_update_slice(cache["v"][i], v.astype(cache["v"][i].dtype), (start, 0, 0))
        new_k.append(ck)
        new_v.append(cv)
        qg = q.reshape(t, kvh, group, hd)
        scores = jnp.einsum("tkgd,skd->kgts", qg, ck, preferred_element_type=jnp.float32) / math.sqrt(hd)
        scores = jnp.where(mask, scores, -jnp.inf)
        p = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        o = jnp.einsum("kgts,skd->tkgd", p, cv).reshape(t, cfg.heads * hd)
        x = x + linear(o, lp["wo"])
        h = rms_norm(x, lp["mlp_norm"], cfg.eps)
        gate, up = jnp.split(linear(h, lp["w_gate_up"]), 2, axis=-1)
        x = x + linear(jax.nn.silu(gate) * up, lp["w_down"])
    logits = linear(rms_norm(x, params["final_norm"], cfg.eps), params["lm_head"]).astype(jnp.float32)
    return logits, {"k": new_k, "v": new_v}


@partial(jax.jit, static_argnames=("cfg",))
def prefill(
    params: Params, cache: dict[str, list[jax.Array]], tokens: jax.Array, cfg: Config
) -> tuple[jax.Array, dict[str, list[jax.Array]]]:
    """The prompt at positions ``0 .. T - 1``: logits ``[T, vocab]`` and the filled cache."""
    return forward(params, cache, tokens, jnp.int32(0), cfg)


@partial(jax.jit, static_argnames=("n", "cfg"))
def generate(
    params: Params, cache: dict[str, list[jax.Array]], token: jax.Array, start: jax.Array, n: int, cfg: Config
) -> tuple[jax.Array, jax.Array]:
    """Greedy decoding of ``n`` steps, one token at a time, from ``token`` at position ``start``.

    Returns the ``n`` tokens each step picked (int32 ``[n]``) and whether every step's logits were finite.
    """

    def step(i, carry):
        cache, tok, out, finite = carry
        logits, cache = forward(params, cache, tok[None], start + i, cfg)
        nxt = jnp.argmax(logits[-1]).astype(jnp.int32)
        return cache, nxt, out.at[i].set(nxt), finite & jnp.all(jnp.isfinite(logits))

    init = (cache, token.astype(jnp.int32), jnp.zeros((n,), jnp.int32), jnp.bool_(True))
    _, _, out, finite = lax.fori_loop(0, n, step, init)
    return out, finite


def weight_bytes(params: Params) -> int:
    """Bytes of all weights (a ``QuantizedMatrix`` counts codes, scales, codebook and tensor scale)."""
    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, jk.QuantizedMatrix))
    return int(sum(leaf.nbytes for leaf in leaves))


def streamed_bytes(params: Params) -> int:
    """Weight bytes one decode step reads: everything but the embedding table (one row of it is read)."""
    return weight_bytes({k: v for k, v in params.items() if k != "embed"})


# ---------------------------------------------------------------- one run


def run_variant(
    name: str,
    params: Params,
    cfg: Config,
    prompt: jax.Array,
    n: int,
    *,
    reference: np.ndarray | None = None,
    reference_logits: np.ndarray | None = None,
    rounds: int = 5,
    time_it: bool = True,
) -> tuple[dict[str, Any], np.ndarray]:
    """Prefill, decode ``n`` tokens (timed), and compare with the bf16 run.

    Args:
      reference: the bf16 run's greedy sequence (the first token after the prompt, then the ``n`` decoded).
      reference_logits: the bf16 run's teacher-forced logits ``[n + 1, vocab]``.

    Returns:
      The result row and this run's teacher-forced logits along ``reference`` (its own sequence if None).
    """
    # The glue below is NumPy: every eager jax.numpy op would compile a program of its own.
    prompt = np.asarray(prompt, np.int32)
    p = int(prompt.shape[0])
    length = p + n  # one prefill length serves the prompt and the teacher-forced pass: one compiled program
    # The prompt, padded with zeros to `length`. Cache rows >= p then hold padding, but decode step i writes
    # row p + i before it reads it and masks every row after it, so the padding is never attended to.
    padded = np.zeros((length,), np.int32)
    padded[:p] = prompt
    logits, cache = prefill(params, init_cache(cfg), padded, cfg)
    logits = np.asarray(logits)
    first = np.int32(np.argmax(logits[p - 1]))
    out, finite = generate(params, cache, first, np.int32(p), n=n, cfg=cfg)  # as timeit calls it: one compile
    seq = np.concatenate([[first], np.asarray(out)]).astype(np.int32)
    row: dict[str, Any] = {
        "variant": name,
        "weight_bytes": weight_bytes(params),
        "streamed_bytes_per_token": streamed_bytes(params),
        "finite_logits": bool(finite) and bool(np.isfinite(logits).all()),
        "tokens": seq.tolist(),
    }
    if time_it:
        seconds = timeit(partial(generate, n=n, cfg=cfg), params, cache, first, np.int32(p), rounds=rounds)
        row.update(seconds=seconds, tokens_per_s=n / seconds, ms_per_token=1e3 * seconds / n)
    ref = seq if reference is None else np.asarray(reference, np.int32)
    if reference is not None:
        match = seq == ref
        row["seq_match"] = float(np.mean(match))
        row["first_divergence"] = None if match.all() else int(np.argmin(match))
    # Teacher-forced: this model's next-token argmax along the reference sequence.
    forced = np.concatenate([prompt, ref[:-1]])
    tf_logits = np.asarray(prefill(params, init_cache(cfg), forced, cfg)[0])[p - 1 :]
    row["next_token_agree"] = float(np.mean(np.argmax(tf_logits, axis=-1) == ref))
    row["finite_logits"] = row["finite_logits"] and bool(np.isfinite(tf_logits).all())
    if reference_logits is not None:
        ref_logits = np.asarray(reference_logits, np.float64)
        err = np.linalg.norm(tf_logits - ref_logits) / np.linalg.norm(ref_logits)
        row["logits_rel_err"] = float(err)
    return row, tf_logits


# ---------------------------------------------------------------- main


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def main(argv: list[str] | None = None, *, config: Config | None = None) -> dict[str, Any]:
    """Run the benchmark (``argv``: command-line arguments); ``config`` overrides the model shape (tests)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a 0.8M-parameter model, 32 tokens (runs on a CPU)")
    ap.add_argument(
        "--quick", action="store_true", help="K = 4 only, 64 decode steps, 3 rounds (small budgets)"
    )
    ap.add_argument(
        "--ks", default=None, help="comma-separated K values to compare with bf16 (default 4,3,2,5)"
    )
    ap.add_argument("--tokens", type=int, default=None, help="decode steps timed (default 128; --tiny 32)")
    ap.add_argument("--prompt", type=int, default=16, help="prompt length (prefill, not timed)")
    ap.add_argument("--max-len", type=int, default=None, help="KV cache length (default 1024; --tiny 128)")
    ap.add_argument("--lm-head", choices=("kbit", "bf16"), default="kbit", help="LM head in the k-bit runs")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds, median (default 5; --tiny 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args(argv)

    cfg = config if config is not None else TINY if args.tiny else LLAMA_1B
    if args.max_len is not None:
        cfg = dataclasses.replace(cfg, max_len=args.max_len)
    n = args.tokens if args.tokens is not None else (32 if args.tiny else 64 if args.quick else 128)
    rounds = args.rounds if args.rounds is not None else (3 if args.tiny or args.quick else 5)
    ks_arg = args.ks if args.ks is not None else ("4" if args.quick else "4,3,2,5")
    try:
        ks = [int(k) for k in ks_arg.split(",") if k.strip()]
    except ValueError:
        ks = [0]
    if any(k not in (2, 3, 4, 5) for k in ks):
        raise SystemExit(f"--ks: K must be in 2..5, got {ks_arg!r}")
    if n < 1 or args.prompt < 1 or rounds < 1 or args.prompt + n > cfg.max_len:
        raise SystemExit(
            f"need --prompt, --tokens and --rounds >= 1 and prompt + tokens <= max_len ({cfg.max_len})"
        )

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}; jax_kbit {jk.__version__}")
    print(
        f"model: {cfg.num_params() / 1e6:,.1f}M parameters (hidden {cfg.hidden}, {cfg.layers} layers, "
        f"{cfg.heads} heads / {cfg.kv_heads} KV heads, MLP {cfg.mlp}, vocab {cfg.vocab}, cache {cfg.max_len}); "
        f"prompt {args.prompt}, {n} decode steps timed; LM head in k-bit runs: {args.lm_head}"
    )
    t0 = time.perf_counter()
    params = init_params(cfg, args.seed)
    prompt = np.random.default_rng(args.seed + 1).integers(0, cfg.vocab, args.prompt, dtype=np.int32)
    jax.block_until_ready(params)

    row, ref_logits = run_variant("bf16", params, cfg, prompt, n, rounds=rounds)
    rows = [dict(row, k=None)]
    reference = np.asarray(row["tokens"])
    for k in ks:
        qparams = jax.jit(partial(quantize_weights, k=k, lm_head=args.lm_head == "kbit"))(params)
        jax.block_until_ready(qparams)
        row, _ = run_variant(
            f"K={k}",
            qparams,
            cfg,
            prompt,
            n,
            reference=reference,
            reference_logits=ref_logits,
            rounds=rounds,
        )
        rows.append(dict(row, k=k))
        del qparams
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup_vs_bf16"] = row["tokens_per_s"] / base

    head = (
        f"{'weights':>8} {'MiB':>9} {'MiB/token':>10} {'tokens/s':>9} {'ms/token':>9} {'vs bf16':>8} "
        f"{'GB/s':>6} {'logit err':>9} {'next-token agree':>16} {'seq match':>9} {'finite':>6}"
    )
    print(head)
    for r in rows:
        gbps = r["streamed_bytes_per_token"] * r["tokens_per_s"] / 1e9
        seq = "-" if r.get("seq_match") is None else f"{100 * r['seq_match']:.0f}%"
        lerr = "-" if r.get("logits_rel_err") is None else f"{r['logits_rel_err']:.3f}"
        print(
            f"{r['variant']:>8} {_mib(r['weight_bytes']):>9} {_mib(r['streamed_bytes_per_token']):>10} "
            f"{r['tokens_per_s']:>9.1f} {r['ms_per_token']:>9.3f} {r['speedup_vs_bf16']:>7.2f}x {gbps:>6.1f} {lerr:>9} "
            f"{100 * r['next_token_agree']:>15.0f}% {seq:>9} {'yes' if r['finite_logits'] else 'NO':>6}",
            flush=True,
        )
    print(
        "logit err: ||logits - bf16 logits|| / ||bf16 logits|| along the bf16 run's sequence; next-token "
        "agree: the greedy next token along that sequence (teacher-forced; for bf16 itself: prefill vs "
        "decode numerics); seq match: its own greedy sequence vs bf16's, position by position."
    )
    if not all(r["finite_logits"] for r in rows):
        print("WARNING: non-finite logits in some run", file=sys.stderr)

    result = {
        "device": dev.device_kind,
        "platform": dev.platform,
        "jax": jax.__version__,
        "jax_kbit": jk.__version__,
        "config": dataclasses.asdict(cfg),
        "num_params": cfg.num_params(),
        "prompt": args.prompt,
        "tokens": n,
        "lm_head": args.lm_head,
        "embedding": "bf16",
        "seconds_total": time.perf_counter() - t0,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_decode{'_tiny' if args.tiny else ''}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
