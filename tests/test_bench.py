"""Smoke tests of the benchmark scripts' arithmetic and command lines (tiny sizes; no timing asserted)."""

import dataclasses

import pytest

from cca_jax.bench import attention as attn_bench
from cca_jax.bench import decode_roofline
from cca_jax.bench import filter as filter_bench
from cca_jax.models import llamagen as lg


def test_decode_roofline_counts_kernels_and_cache():
    cfg = lg.LlamaGenConfig(dim=64, n_layer=2, n_head=4, vocab_size=100, num_classes=10, block_size=16)
    w, c, flops = decode_roofline.step_cost(cfg, rows=3)
    tables = (cfg.vocab_size + cfg.class_rows) * cfg.dim  # gathered, not multiplied
    norms = (2 * cfg.n_layer + 1) * cfg.dim
    assert w == 4 * (lg.param_count(cfg) - tables - norms)
    S = lg.find_multiple(1 + 16, 8)
    assert c == 4 * 2 * cfg.n_layer * 3 * S * cfg.dim
    assert flops == 2 * 3 * w / 4 + 2 * c / 4
    w2, c2, _ = decode_roofline.step_cost(dataclasses.replace(cfg), rows=6)
    assert w2 == w and c2 == 2 * c  # CFG doubles the cache traffic only
    _, c8, _ = decode_roofline.step_cost(cfg, rows=3, block_len=8)
    # steps 1..7 read block 0 (8 slots), steps 8..15 blocks 0-1 (16 slots)
    assert c8 == pytest.approx(c / S * (7 * 8 + 8 * 16) / 15, rel=1e-12)


def test_filter_bench_runs(capsys):
    filter_bench.main(["--rows", "4", "--vocab", "64", "--k", "9", "--reps", "1"])
    out = capsys.readouterr().out
    assert out.count("(equal to lax.top_k: True)") == 3 and "top-p 0.96 filter" in out


def test_attention_bench_runs(capsys):
    attn_bench.main(["--batch", "1", "--heads", "1", "--head-dim", "4", "--reps", "1", "--min-rows", "64",
                     "--length", "16"])
    out = capsys.readouterr().out
    assert "full mask" in out and "blocks min_rows=64 (5 blocks)" in out and "0.63 of L^2" in out
    assert "q/k/v (1, 16, 1, 4)" in out
    for name in ("sequence-major einsums", "attend (head-major)"):
        assert out.count(name) == 2, out  # forward, fwd+bwd
