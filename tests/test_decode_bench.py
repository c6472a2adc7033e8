"""bench/bench_decode.py runs: the tiny decoder in bf16 and with k-bit QuantizedMatrix weights (no timing here).

Skipped when the bench folder is not next to the tests (an installed package tested elsewhere).
"""

from __future__ import annotations

import json
from functools import partial

import jax
import numpy as np
import pytest
from conftest import load_bench_script

import jax_kbit as jk

pytestmark = pytest.mark.usefixtures("cpu")


@pytest.fixture(scope="module")
def bd():
    return load_bench_script("bench_decode")


def micro(bd):
    """Smaller than --tiny (one block): the compile time is what a CPU test pays for."""
    return bd.Config(vocab=512, hidden=128, layers=1, heads=4, kv_heads=2, mlp=256, max_len=16)


def test_tiny_decoder_bf16_and_kbit(bd, tmp_path):
    """The script end to end (2 decode steps, one timing round): finite, sane, JSON written."""
    argv = ["--tiny", "--ks", "5", "--tokens", "2", "--prompt", "4", "--rounds", "1", "--out", str(tmp_path)]
    out = bd.main(argv, config=micro(bd))
    written = json.loads((tmp_path / "bench_decode_tiny.json").read_text())
    assert [r["variant"] for r in written["rows"]] == ["bf16", "K=5"] == [r["variant"] for r in out["rows"]]
    bf16, k5 = written["rows"]
    vocab = written["config"]["vocab"]
    for row in (bf16, k5):
        assert row["finite_logits"] is True
        assert len(row["tokens"]) == 3 and all(0 <= t < vocab for t in row["tokens"])
        assert row["tokens_per_s"] > 0 and row["ms_per_token"] > 0
    assert k5["k"] == 5 and bf16["k"] is None and bf16["speedup_vs_bf16"] == 1.0
    # 5-bit weights: the logits stay within a few % of bf16's (a layout bug gives ~1.4)
    assert k5["logits_rel_err"] < 0.15, k5["logits_rel_err"]
    assert 0.0 <= k5["next_token_agree"] <= 1.0 and 0.0 <= k5["seq_match"] <= 1.0
    # the k-bit weights are QuantizedMatrix: ~5.3 bits per weight instead of 16 (the embedding stays bf16)
    assert k5["streamed_bytes_per_token"] < 0.4 * bf16["streamed_bytes_per_token"]


def test_decode_step_is_fused_matmuls(bd):
    """A k-bit decode step multiplies every weight with kbit_matmul and dequantizes none (lowering only)."""
    cfg = micro(bd)
    params = bd.init_params(cfg, seed=0)
    qparams = jax.jit(partial(bd.quantize_weights, k=4))(params)
    kinds = {
        type(leaf) for leaf in jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, jk.QuantizedMatrix))
    }
    assert jk.QuantizedMatrix in kinds
    cache = bd.init_cache(cfg)
    args = (cache, np.int32(1), np.int32(3))
    text = bd.generate.lower(qparams, *args, n=2, cfg=cfg).as_text()
    assert text.count("kbit_matmul") == 4 * cfg.layers + 1  # four matrices per block and the LM head
    assert "kbit_dequantize" not in text
    dense = bd.generate.lower(params, *args, n=2, cfg=cfg).as_text()
    assert "kbit_matmul" not in dense
    bf16_head = jax.jit(partial(bd.quantize_weights, k=4, lm_head=False))(params)
    assert bd.generate.lower(bf16_head, *args, n=2, cfg=cfg).as_text().count("kbit_matmul") == 4 * cfg.layers
    # one forward step: shapes and finite values
    logits, cache = bd.prefill(qparams, cache, np.array([5], np.int32), cfg)
    assert logits.shape == (1, cfg.vocab) and np.isfinite(np.asarray(logits)).all()
    assert cache["k"][0].shape == (cfg.max_len, cfg.kv_heads, cfg.head_dim)
    assert (
        np.abs(np.asarray(cache["k"][0][0], np.float32)).max() > 0 and not np.asarray(cache["k"][0][1:]).any()
    )
