"""The attention core at the train steps' shapes: ``python -m cca_jax.bench.attention``.

Times one forward + backward of the attention core (after the q/k/v projections), float32, on
the default device, per layer of the CCA step:

* VAR (``--shape var``, BENCH-VAR): ``[2B = 8, L = 680, H = 8, D = 64]`` over the ten scales
  (1, 2, 3, 4, 5, 6, 8, 10, 13, 16). Variants: the full ``[L, L]`` mask (:func:`attention.attend`)
  and :func:`attention.attend_block_causal` with several ``min_rows`` (scales merged until a query
  block has that many rows).
* LlamaGen (``--shape llamagen``, BENCH-LLAMAGEN): ``[8, 256, 8, 64]`` with a causal mask, forward
  alone and forward + backward, :func:`attention.attend` against the same products written on the
  sequence-major ``[B, L, H, D]`` operands (what ``attend`` computed before it went head-major;
  the forwards are bit-equal).

Prints ms per call (wall and CPU time / cores) and, for VAR, the score-matrix entries each
variant computes.
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


def sequence_major_attend(q_BLHD: jax.Array, k_BLHD: jax.Array, v_BLHD: jax.Array,
                          mask: jax.Array) -> jax.Array:
    """The baseline: softmax attention with both products contracted on ``[B, L, H, D]`` operands
    as they come out of the projections, letting XLA pick the layouts."""
    hp = jax.lax.Precision.HIGHEST
    scale = 1.0 / jnp.sqrt(jnp.float32(q_BLHD.shape[-1]))
    logits = jnp.einsum("blhd,bshd->bhls", q_BLHD, k_BLHD, precision=hp,
                        preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("bhls,bshd->blhd", probs, v_BLHD, precision=hp,
                      preferred_element_type=jnp.float32)


def bench_llamagen(args) -> None:
    """Sequence-major products against :func:`attention.attend`, forward and forward + backward."""
    L = args.length or 256
    shape = (args.batch, L, args.heads, args.head_dim)
    q, k, v, ct = (jax.random.normal(jax.random.key(i), shape) for i in range(4))
    mask = attention.causal_mask(L)
    variants = {"sequence-major einsums": lambda q, k, v: sequence_major_attend(q, k, v, mask),
                "attend (head-major)": lambda q, k, v: attention.attend(q, k, v, mask=mask)}
    print(f"causal attention, q/k/v {shape} float32 on {jax.devices()[0].platform} "
          f"x{jax.device_count()}, {args.reps} reps")
    base = {}
    for name, fn in variants.items():
        for what, f in (("forward", jax.jit(fn)),
                        ("fwd+bwd", jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) * ct),
                                                     argnums=(0, 1, 2))))):
            wall, cpu = _timed(f, (q, k, v), args.reps)
            base.setdefault(what, wall)
            print(f"  {name:24s} {what:8s} {wall * 1e3:8.1f} ms wall  {cpu * 1e3:8.1f} ms cpu/core  "
                  f"speed-up {base[what] / wall:.2f}x")


def bench_var(args) -> None:
    """Full mask against scale blocks at BENCH-VAR's shape, forward + backward."""
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="var,llamagen", help="var, llamagen or both (comma-separated)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--length", type=int, default=0, help="LlamaGen sequence length (default 256)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--min-rows", default="1,64,128,256")
    args = ap.parse_args(argv)
    shapes = args.shape.split(",")
    unknown = set(shapes) - {"var", "llamagen"}
    if unknown:
        raise SystemExit(f"--shape: unknown {sorted(unknown)}; expected var and/or llamagen.")
    if "var" in shapes:
        bench_var(args)
    if "llamagen" in shapes:
        bench_llamagen(args)


if __name__ == "__main__":
    from cca_jax import host_malloc
    host_malloc.reexec_if_wanted()
    main()
