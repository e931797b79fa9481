"""CCA train-step throughput: ``python -m cca_jax.bench.step [--which llamagen,var] [--steps 5]``.

Prints, for two fixed configs on whatever devices exist (all of them, FSDP mesh):

* BENCH-LLAMAGEN: LlamaGen dim 512, 8 layers, 8 heads, vocab 16384, 256 image tokens,
  1 class token, global batch 4;
* BENCH-VAR: VAR depth 8 (width 512, 8 heads), the 10 scales (L = 680), vocab 4096, Cvae 32,
  global batch 4 (teacher-forcing input rebuilt from token ids on device, as in training);

the step time, tokens/s (tokens scored by the policy: 2B sequences × L, the [x; x] batch) and
model FLOP/s with

    FLOPs/step = policy 6·N·T + reference 2·N·T + attention 12·n_layer·L·C·T (policy, fwd+bwd)
                 + 4·n_layer·L·C·T (reference, fwd)

where T = 2B·L tokens and N the parameters in per-token matmuls (transformer blocks and head;
embedding tables and VAR's per-sample AdaLN projections excluded); attention counts the full
L×L score matrix. The ratio is to a matmul peak measured on the same devices right after the
step (a jitted 4096² float32 matmul, per device; with a 16-bit ``--dtype`` also that dtype's
16 x 16 -> float32 peak: for bf16 on a CPU with AVX-512 BF16 about twice the float32 one, for
float16 on this CPU the same as float32). Every figure is
given twice: from wall time, and from this process's CPU time divided by the cores (robust when
other processes share the machine; the two agree on an idle one). A last line gives the minor
page faults and kernel CPU time per step: on a CPU host the script re-executes itself with
glibc malloc keeping freed memory (cca_jax/host_malloc.py), and both are about 0 once the
heap has reached its peak (within the 3 warm-up steps; one page-faulting step in the timed ones
means it had not yet); ``CCA_JAX_DEFAULT_MALLOC=1`` runs it with glibc's defaults for comparison.

Official PyTorch step on this 2-core CPU (fp32, from the issue): BENCH-LLAMAGEN 4.3 s
(≈ 476 tokens/s, 0.68 of peak); BENCH-VAR 14.8 s (≈ 368 tokens/s, 6.7 s of it re-encoding images
with the VQVAE). Bars: ≥ 0.85 of peak (LlamaGen), ≥ 2× the official tokens/s (VAR).
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import jax
import jax.numpy as jnp

from cca_jax import families, host_malloc, train
from configs.common import base_config

OFFICIAL_STEP_S = {"llamagen": 4.3, "var": 14.8}
BATCH = 4


def bench_config(which: str, *, dtype: str = "float32", keep_dropout: bool = True):
    c = base_config()
    if which == "llamagen":
        c.model.update(dict(family="llamagen", dim=512, n_layer=8, n_head=8, vocab_size=16384,
                            num_classes=1000, cls_token_num=1, block_size=256,
                            class_dropout_prob=1e-5, token_dropout_p=0.1, resid_dropout_p=0.1,
                            ffn_dropout_p=0.1))
        c.loss.uncond_zero_form = "llamagen"
    elif which == "var":
        c.model.update(dict(family="var", depth=8, embed_dim=512, num_heads=8, vocab_size=4096,
                            Cvae=32, num_classes=1000,
                            patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                            drop_path_rate=0.1 * 8 / 24))
        c.loss.uncond_zero_form = "var"
        c.optim.decay_rule = "var"
    else:
        raise ValueError(f"unknown bench {which!r}; expected llamagen or var.")
    c.data.source = "synthetic"
    c.train.global_batch_size = BATCH
    c.train.compute_dtype = dtype
    c.train.keep_dropout = keep_dropout
    c.optim.grad_accum_steps = 1
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    return c


def step_flops(family: families.Family, batch: int) -> float:
    cfg = family.model_cfg
    if family.name == "llamagen":
        n_layer, width = cfg.n_layer, cfg.dim
    else:
        n_layer, width = cfg.depth, cfg.embed_dim
    L = family.num_tokens
    T = 2 * batch * L
    N = family.matmul_params()
    attn = 4.0 * n_layer * L * width  # forward, per token
    return T * (6.0 * N + 3 * attn) + T * (2.0 * N + attn)


def _timed(fn, reps: int) -> tuple[float, float]:
    """(best wall seconds, best process-CPU seconds / cores) over ``reps`` calls of ``fn``.

    On an idle machine the two agree; when other processes share the cores the CPU-time figure
    (our threads' own work, divided by the cores XLA uses) is the robust one.
    """
    cores = os.cpu_count() or 1
    wall, cpu = float("inf"), float("inf")
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - t)
        cpu = min(cpu, (time.process_time() - c) / cores)
    return wall, cpu


def matmul_peak(n: int = 4096, reps: int = 4, dtype=jnp.float32) -> tuple[float, float]:
    """FLOP/s of one device on a large square matmul of ``dtype`` operands accumulated in
    float32: (wall-based, CPU-time-based)."""
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype) * 0.5
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    wall, cpu = _timed(lambda: f(a, b).block_until_ready(), reps)
    return 2.0 * n ** 3 / wall, 2.0 * n ** 3 / cpu


def run_bench(which: str, *, steps: int, warmup: int, dtype: str, keep_dropout: bool) -> dict:
    config = bench_config(which, dtype=dtype, keep_dropout=keep_dropout)
    tr = train.Trainer(config, total_steps=1000)
    data = train.make_data(config, tr.family, tr.mesh)
    state, ref = tr.init_state(None, seed=0, with_reference=True)
    aux = tr.aux_global(tr.family.make_aux(config, jax.random.key(2)))
    batches = [tr.global_batch(next(data)) for _ in range(2)]
    t0 = time.perf_counter()
    for i in range(warmup):
        state, m = tr.step(state, ref, batches[i % 2], aux)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    it = iter(range(10 ** 9))

    def one():
        nonlocal state, m
        state, m = tr.step(state, ref, batches[next(it) % 2], aux)
        jax.block_until_ready((state, m))

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    wall, cpu = _timed(one, steps)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    tokens = 2 * BATCH * tr.family.num_tokens
    flops = step_flops(tr.family, BATCH)
    return {"which": which, "step_s": wall, "step_cpu_s": cpu, "tokens_per_s": tokens / wall,
            "tokens_per_s_cpu": tokens / cpu, "flops_per_step": flops, "flops_per_s": flops / wall,
            "flops_per_s_cpu": flops / cpu, "compile_s": compile_s,
            "matmul_params": tr.family.matmul_params(), "devices": len(tr.mesh.devices.flat),
            "loss": float(m["loss"]),
            # host memory traffic the step should not have (cca_jax/host_malloc.py)
            "page_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
            "sys_s_per_step": (r1.ru_stime - r0.ru_stime) / steps}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--which", default="llamagen,var")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3,
                    help="untimed steps: compile, then let the kept host heap reach its peak")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="compute dtype; float16 runs with dynamic loss scaling (loss_scale.py)")
    ap.add_argument("--no_dropout", action="store_true", help="keep_dropout=False")
    ap.add_argument("--matmul_n", type=int, default=4096)
    args = ap.parse_args(argv)

    ndev = jax.device_count()
    print(f"devices: {ndev} x {jax.devices()[0].device_kind}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}; {host_malloc.describe()}")
    for which in args.which.split(","):
        r = run_bench(which, steps=args.steps, warmup=args.warmup, dtype=args.dtype,
                      keep_dropout=not args.no_dropout)
        peak_w, peak_c = matmul_peak(args.matmul_n)  # right after the step, under the same load
        if args.dtype != "float32":
            low_w, low_c = matmul_peak(args.matmul_n, dtype=jnp.dtype(args.dtype))
        official_tps = 2 * BATCH * (256 if which == "llamagen" else 680) / OFFICIAL_STEP_S[which]
        print(f"BENCH-{which.upper()} [N={r['matmul_params'] / 1e6:.1f}M, "
              f"{r['flops_per_step'] / 1e9:.0f} GFLOP/step, dtype {args.dtype}, dropout "
              f"{'off' if args.no_dropout else 'on'}, compile+warm-up {r['compile_s']:.1f} s]")
        for basis, step, tps, fps, peak in (
                ("wall", r["step_s"], r["tokens_per_s"], r["flops_per_s"], peak_w),
                ("cpu-time", r["step_cpu_s"], r["tokens_per_s_cpu"], r["flops_per_s_cpu"], peak_c)):
            print(f"  {basis:8s}: step {step:.3f} s, {tps:.0f} tokens/s "
                  f"({tps / official_tps:.2f}x official {official_tps:.0f}), "
                  f"{fps / 1e9:.1f} model GFLOP/s = {fps / (peak * ndev):.2f} of matmul peak "
                  f"{peak / 1e9:.1f} GFLOP/s (float32)", flush=True)
            if args.dtype != "float32":
                low = low_w if basis == "wall" else low_c
                print(f"  {'':8s}  = {fps / (low * ndev):.2f} of the {args.dtype} matmul peak "
                      f"{low / 1e9:.1f} GFLOP/s (float32 accumulation)", flush=True)
        print(f"  host    : {r['page_faults_per_step']:,.0f} minor page faults and "
              f"{r['sys_s_per_step']:.2f} s kernel CPU time per step", flush=True)


if __name__ == "__main__":
    host_malloc.reexec_if_wanted()
    main()
