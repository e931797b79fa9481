"""Top-k / top-p thresholds: ``python -m cca_jax.bench.filter [--rows 2048] [--k 900]``.

Times, on the default device, three ways to get the k-th largest logit of each row (what top-k
filtering needs) at VAR's last scale (B 8 x 256 positions, V 4096, the official top-k 900):
``lax.top_k``, a full ``jnp.sort``, and :func:`cca_jax.sampling.select.kth_largest`; then the
whole VAR top-k + top-p filter (:func:`cca_jax.sampling.var.top_k_top_p_filter`, top-p 0.96).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from cca_jax.sampling import select
from cca_jax.sampling import var as var_sampling


def _best_ms(fn, x, reps: int) -> float:
    jax.block_until_ready(fn(x))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(x))
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--k", type=int, default=900)
    ap.add_argument("--top_p", type=float, default=0.96)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    x = 3.0 * jax.random.normal(jax.random.key(0), (args.rows, args.vocab))
    k = args.k
    ways = {
        "lax.top_k": jax.jit(lambda x: jax.lax.top_k(x, k)[0][:, -1:]),
        "jnp.sort": jax.jit(lambda x: jnp.sort(x, axis=-1)[:, -k:-k + 1 or None]),
        "select.kth_largest": jax.jit(lambda x: select.kth_largest(x, k)),
    }
    want = ways["lax.top_k"](x)
    print(f"{args.rows} rows x V {args.vocab}, k {k}, device {jax.devices()[0].platform}")
    for name, fn in ways.items():
        same = bool(jnp.all(fn(x) == want))
        print(f"  k-th largest by {name:<20s} {_best_ms(fn, x, args.reps):8.1f} ms  "
              f"(equal to lax.top_k: {same})")
    filt = jax.jit(lambda x: var_sampling.top_k_top_p_filter(x, k, args.top_p))
    print(f"  VAR top-k {k} + top-p {args.top_p} filter  {_best_ms(filt, x, args.reps):8.1f} ms")


if __name__ == "__main__":
    main()
