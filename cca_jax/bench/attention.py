"""VAR block-causal attention, full mask vs scale blocks: ``python -m cca_jax.bench.attention``.

Times one forward + backward of the attention core (after the q/k/v projections) at BENCH-VAR's
shape per layer of the CCA step: ``[2B = 8, L = 680, H = 8, D = 64]`` over the ten scales
(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), float32, on the default device. Variants: the full ``[L, L]``
mask (:func:`attention.attend`) and :func:`attention.attend_block_causal` with several
``min_rows`` (scales merged until a query block has that many rows). Prints ms per call (wall and
CPU time / cores) and the score-matrix entries each variant computes.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from cca_jax.models import attention

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def _timed(fn, args, reps: int) -> tuple[float, float]:
    jax.block_until_ready(fn(*args))  # compile + warm up
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        jax.block_until_ready(fn(*args))
    cores = len(os.sched_getaffinity(0))
    return (time.perf_counter() - w0) / reps, (time.process_time() - c0) / reps / cores


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--min-rows", default="1,64,128,256")
    args = ap.parse_args(argv)

    level = np.concatenate([np.full(p * p, i) for i, p in enumerate(PATCH_NUMS)])
    L = len(level)
    shape = (args.batch, L, args.heads, args.head_dim)
    q, k, v, ct = (jax.random.normal(jax.random.key(i), shape) for i in range(4))
    mask = jnp.asarray(level[:, None] >= level[None, :])[None, None]

    def fwd_bwd(attn_fn):
        def loss(q, k, v):
            return jnp.sum(attn_fn(q, k, v) * ct)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    variants = {"full mask": (lambda q, k, v: attention.attend(q, k, v, mask=mask, scale=1.0), L * L)}
    for r in (int(x) for x in args.min_rows.split(",") if x):
        blocks = attention.level_blocks(level, r)
        entries = sum((e - b) * e for b, e in blocks)
        variants[f"blocks min_rows={r} ({len(blocks)} blocks)"] = (
            lambda q, k, v, r=r: attention.attend_block_causal(q, k, v, level, min_rows=r, scale=1.0),
            entries)

    print(f"attention fwd+bwd, q/k/v {shape} float32 on {jax.devices()[0].platform} "
          f"x{jax.device_count()}, {args.reps} reps")
    base = None
    for name, (fn, entries) in variants.items():
        wall, cpu = _timed(fwd_bwd(fn), (q, k, v), args.reps)
        base = base or wall
        print(f"  {name:34s} {wall * 1e3:8.1f} ms wall  {cpu * 1e3:8.1f} ms cpu/core  "
              f"score entries {entries / (L * L):.2f} of L^2  speed-up {base / wall:.2f}x")


if __name__ == "__main__":
    from cca_jax import host_malloc
    host_malloc.reexec_if_wanted()
    main()
