"""What bounds a LlamaGen KV-cached decode step here: ``python -m cca_jax.bench.decode_roofline``.

A decode step of BENCH-LLAMAGEN (dim 512, 8 layers, vocab 16384, static cache of 264 slots)
multiplies a few rows by every weight matrix and reads every layer's cache (the blocks written so
far: ``S`` is the average number of slots read per step), so it moves

    bytes(B) = 4 · (N_matmul + 2 · n_layer · B · S · dim)      (float32)
    FLOPs(B) = 2 · B · N_matmul + 4 · n_layer · B · S · dim

for B rows (guidance-free: B; CFG: 2B). This script measures, on the default device, the plain
streaming read rate (a reduction over 256 MiB), the rate at which a jitted chain of decode-shaped
matmuls (``[B, 512] @ [512, 1536]`` over 40 distinct float32 weights, more than the last-level
cache) streams its weights, and a large square matmul's FLOP/s, then prints per step the time
each bound allows and the guidance-free/CFG ratio those bounds permit. Compare with
``python -m cca_jax.bench.sample_llamagen`` (ms/step).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from cca_jax.bench.sample_llamagen import BENCH_LLAMAGEN
from cca_jax.models import llamagen as lg
from cca_jax.sampling import llamagen as sampler


def _best_seconds(fn, *args, reps: int = 3) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def read_rate() -> float:
    """Bytes/s of a reduction over 256 MiB of float32."""
    x = jnp.ones((64 * 1024 * 1024,), jnp.float32)
    return x.nbytes / _best_seconds(jax.jit(jnp.sum), x)


def matvec_stream_rate(rows: int, n_weights: int = 40, iters: int = 8) -> float:
    """Weight bytes/s of ``iters`` passes over ``n_weights`` distinct ``[512, 1536]`` matmuls."""
    ws = [jax.random.normal(jax.random.key(i), (512, 1536)) * 0.01 for i in range(n_weights)]
    x = jax.random.normal(jax.random.key(n_weights), (rows, 512))

    @jax.jit
    def chain(x, ws):
        def body(_, x):
            for w in ws:
                x = x + 0.01 * (x @ w)[:, :512]
            return x
        return jax.lax.fori_loop(0, iters, body, x)

    return iters * sum(w.nbytes for w in ws) / _best_seconds(chain, x, ws)


def matmul_peak(n: int = 4096) -> float:
    a = jnp.ones((n, n), jnp.float32)
    return 2.0 * n ** 3 / _best_seconds(jax.jit(lambda x, y: x @ y), a, a)


def step_cost(cfg: lg.LlamaGenConfig, rows: int, block_len: int = 0) -> tuple[float, float, float]:
    """(weight bytes, cache bytes, FLOPs) of one decode step over ``rows`` sequences, averaged
    over a generation when the cache is read by blocks of ``block_len`` slots (0: one block,
    every step reads all of it)."""
    leaves = jax.tree_util.tree_flatten_with_path(lg.param_shapes(cfg))[0]
    n_matmul = sum(x.shape[0] * x.shape[1] for path, x in leaves  # kernels; tables are gathered
                   if x.ndim == 2 and "embedding" not in jax.tree_util.keystr(path))
    S = float(lg.find_multiple(cfg.cls_token_num + cfg.block_size, 8))
    if block_len:
        segments = lg.decode_segments(cfg.cls_token_num - 1, (1, cfg.block_size), block_len)
        slots = sum((hi - lo) * active * block_len for lo, hi, active in segments)
        S = slots / (cfg.block_size - 1)
    cache = 2 * cfg.n_layer * rows * S * cfg.dim
    return 4.0 * n_matmul, 4.0 * cache, 2.0 * rows * n_matmul + 2.0 * cache


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    cfg, B = BENCH_LLAMAGEN, args.batch

    read = read_rate()
    stream = {r: matvec_stream_rate(r) for r in (B, 2 * B)}
    peak = matmul_peak()
    print(f"device {jax.devices()[0].platform}: plain read {read / 1e9:.1f} GB/s, decode-shaped matmul "
          f"weight streaming {stream[B] / 1e9:.1f} GB/s ({B} rows) / {stream[2 * B] / 1e9:.1f} GB/s "
          f"({2 * B} rows), square matmul {peak / 1e9:.0f} GFLOP/s")
    times = {}
    blk = sampler.default_cache_block_len(cfg.cache_len)
    print(f"  cache read by blocks of {blk} slots (the sampler's default): on average "
          f"{step_cost(cfg, 1, blk)[1] / step_cost(cfg, 1)[1]:.0%} of it per step")
    for name, rows in (("guidance-free", B), ("CFG", 2 * B)):
        w, c, flops = step_cost(cfg, rows, blk)
        t_read, t_stream, t_flop = (w + c) / read, (w + c) / stream[rows], flops / peak
        times[name] = (t_read, t_stream)
        print(f"  {name:13s} {rows:3d} rows: weights {w / 1e6:.0f} MB + cache {c / 1e6:.0f} MB, "
              f"{flops / 1e9:.2f} GFLOP -> >= {t_read * 1e3:.1f} ms at the plain read rate, "
              f"~{t_stream * 1e3:.1f} ms at the matmul streaming rate, >= {t_flop * 1e3:.1f} ms of FLOPs; "
              f"{cfg.block_size} steps >= {t_read * cfg.block_size:.2f} s")
    (gr, gs), (cr, cs) = times["guidance-free"], times["CFG"]
    print(f"  bandwidth-bound CFG / guidance-free step time: {cr / gr:.2f}x (plain read), "
          f"{cs / gs:.2f}x (matmul streaming)")


if __name__ == "__main__":
    main()
