"""VAR sampling throughput on BENCH-VAR: guidance-free vs CFG vs recompute; tokens and VQ decode apart.

BENCH-VAR: VAR depth 8, width 512, 8 heads, the 10 scales of 256 px (L = 680), vocab 4096,
Cvae 32, batch 8, random weights; the ch=160 VQVAE (vae_ch160v4096z32 architecture) with random
weights for the decode. Float32 unless ``--dtype bfloat16``.

    python -m cca_jax.bench.sample_var [--batch 8] [--reps 3] [--cfg 1.5] [--skip_recompute]

Prints, per mode, seconds per batch (median of ``--reps`` after one compile run), images/s and
tokens/s (B * L tokens per batch) of the token generation (transformer + sampling + f_hat
accumulation), then the VQ decode alone, then end-to-end images/s of each mode.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from cca_jax import host_malloc
from cca_jax.models import vqvae
from cca_jax.models.var import VARConfig, init_params
from cca_jax.sampling import var as vs

BENCH_VAR = dict(depth=8, embed_dim=512, num_heads=8, vocab_size=4096, Cvae=32, num_classes=1000,
                 patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))


def _time(fn, reps: int) -> tuple[float, float, float]:
    """(first call incl. compile, median wall seconds, median process-CPU seconds) over ``reps``
    further calls. CPU seconds are reported because a shared machine inflates wall time."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return first, statistics.median(walls), statistics.median(cpus)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cfg", type=float, default=1.5, help="VAR guidance for the CFG runs")
    ap.add_argument("--top_k", type=int, default=900)
    ap.add_argument("--top_p", type=float, default=0.96)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--skip_recompute", action="store_true")
    args = ap.parse_args(argv)

    dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
    cfg = VARConfig(**BENCH_VAR)
    vq_cfg = vqvae.VQVAEConfig(vocab_size=cfg.vocab_size, z_channels=cfg.Cvae, ch=160,
                               patch_nums=cfg.patch_nums)
    params = init_params(cfg, jax.random.key(0))
    vq_params = vqvae.init_params(vq_cfg, jax.random.key(1))
    B = args.batch
    labels = jnp.arange(B, dtype=jnp.int32) * 97 % cfg.num_classes
    tokens = B * cfg.L
    print(f"BENCH-VAR: depth {cfg.depth}, C {cfg.C}, heads {cfg.num_heads}, L {cfg.L}, V {cfg.vocab_size}, "
          f"batch {B}, {args.dtype}, top_k {args.top_k}, top_p {args.top_p}, "
          f"devices {jax.devices()}; "
          f"{host_malloc.describe()}")

    modes = [("guidance-free (cfg 0, B rows, KV cache)", vs.VARSampleOptions(0.0, args.top_k, args.top_p)),
             (f"CFG (cfg {args.cfg}, 2B rows, KV cache)", vs.VARSampleOptions(args.cfg, args.top_k, args.top_p))]
    if not args.skip_recompute:
        modes += [("guidance-free, recompute (no cache)",
                   vs.VARSampleOptions(0.0, args.top_k, args.top_p, use_cache=False)),
                  (f"CFG {args.cfg}, recompute (no cache)",
                   vs.VARSampleOptions(args.cfg, args.top_k, args.top_p, use_cache=False))]

    results = {}
    f_hat = None
    for name, opts in modes:
        fn = vs.generate_fn(cfg, vq_cfg, opts, dtype=dtype, decode=False)
        first, sec, cpu = _time(lambda: fn(params, vq_params, labels, jax.random.key(2)), args.reps)
        results[name] = (sec, cpu)
        f_hat = fn(params, vq_params, labels, jax.random.key(2))["f_hat"]
        print(f"tokens  {name:40s} {sec:8.3f} s/batch ({cpu:7.2f} cpu-s)  {B / sec:7.3f} img/s  "
              f"{tokens / sec:8.0f} tok/s  (first call incl. compile {first:.1f} s)", flush=True)

    dec = vs.decode_fn(vq_cfg)
    first, dec_sec, dec_cpu = _time(lambda: dec(vq_params, f_hat), args.reps)
    print(f"decode  {'VQVAE ch=160, 256x256':40s} {dec_sec:8.3f} s/batch ({dec_cpu:7.2f} cpu-s)  "
          f"{B / dec_sec:7.3f} img/s  (first call incl. compile {first:.1f} s)")
    for name, (sec, cpu) in results.items():
        print(f"total   {name:40s} {sec + dec_sec:8.3f} s/batch ({cpu + dec_cpu:7.2f} cpu-s)  "
              f"{B / (sec + dec_sec):7.3f} img/s")
    (gf, gf_cpu), (cfg_t, cfg_cpu) = results[modes[0][0]], results[modes[1][0]]
    print(f"token generation, guidance-free vs CFG: {cfg_t / gf:.2f}x wall, {cfg_cpu / gf_cpu:.2f}x cpu")
    if not args.skip_recompute:
        (rg, rg_cpu), (rc, rc_cpu) = results[modes[2][0]], results[modes[3][0]]
        print(f"KV cache vs recompute: guidance-free {rg / gf:.2f}x wall ({rg_cpu / gf_cpu:.2f}x cpu), "
              f"CFG {rc / cfg_t:.2f}x wall ({rc_cpu / cfg_cpu:.2f}x cpu)")


if __name__ == "__main__":
    main()
