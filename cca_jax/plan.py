"""Capacity planner: will a recipe's train step fit in a device's HBM on a given topology?

``python -m cca_jax.main --config=configs/var_d30.py --workdir=DIR --config.job=plan
--config.plan.topology=v5p-32`` prints, per device, the bytes of the policy params, AdamW state,
frozen reference params, gradients and activations (with and without rematerialisation) and whether
the total fits. ``python -m cca_jax.plan --table`` prints the README table for the nine paper
recipes; ``python -m cca_jax.plan --config=configs/var_d30.py --topology=v5p-32`` plans one.

Topologies (:func:`parse_topology`): Cloud TPU slice names as ``gcloud`` spells them (``v4-32``,
``v5p-64``: the number counts TensorCores, two per chip, one JAX device per chip; ``v5e-256`` /
``v5litepod-256``, ``v6e-64``: the number counts chips) and GPU hosts ``8xH100``, ``16xH100``,
``8xA100-80G``, ``8xA100-40G``, ``8xH200`` (8 GPUs per host).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import sys
from typing import Any, Optional

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AbstractMesh

from cca_jax import families, sharding

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One accelerator generation; HBM and host sizes are per JAX device / per VM."""

    family: str  # v4 | v5p | v5e | v6e | H100 | ...
    kind: str  # tpu | gpu
    hbm_bytes: int  # memory of one JAX device
    cores_per_chip: int = 1  # v4/v5p names count TensorCores (2 per chip = 1 megacore device)
    chips_per_host: int = 4  # multi-host slices
    single_host_chips: int = 4  # largest slice one VM serves
    gcloud_prefix: str = ""  # accelerator-type prefix in gcloud (v5e is "v5litepod")
    runtime_version: str = ""  # TPU VM software version for gcloud create
    gke_accelerator: str = ""  # value of the cloud.google.com/gke-tpu-accelerator node label
    torus_dims: int = 3  # physical topology rank (3-D torus for v4/v5p, 2-D for v5e/v6e)
    chip_counts: tuple[int, ...] = ()  # slice sizes (chips) that exist


def _pow2(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(2 ** k for k in range(int(math.log2(lo)), int(math.log2(hi)) + 1))


ACCELERATORS: dict[str, Accelerator] = {
    "v4": Accelerator("v4", "tpu", 32 * GiB, cores_per_chip=2, chips_per_host=4,
                      single_host_chips=4, gcloud_prefix="v4", runtime_version="tpu-ubuntu2204-base",
                      gke_accelerator="tpu-v4-podslice", torus_dims=3, chip_counts=_pow2(4, 2048)),
    "v5p": Accelerator("v5p", "tpu", 95 * GiB, cores_per_chip=2, chips_per_host=4,
                       single_host_chips=4, gcloud_prefix="v5p", runtime_version="v2-alpha-tpuv5",
                       gke_accelerator="tpu-v5p-slice", torus_dims=3, chip_counts=_pow2(4, 6144)),
    "v5e": Accelerator("v5e", "tpu", 16 * GiB, chips_per_host=4, single_host_chips=8,
                       gcloud_prefix="v5litepod", runtime_version="v2-alpha-tpuv5-lite",
                       gke_accelerator="tpu-v5-lite-podslice", torus_dims=2,
                       chip_counts=(1,) + _pow2(4, 256)),
    "v6e": Accelerator("v6e", "tpu", 32 * GiB, chips_per_host=4, single_host_chips=8,
                       gcloud_prefix="v6e", runtime_version="v2-alpha-tpuv6e",
                       gke_accelerator="tpu-v6e-slice", torus_dims=2,
                       chip_counts=(1,) + _pow2(4, 256)),
    "H100": Accelerator("H100", "gpu", 80 * GiB, chips_per_host=8, single_host_chips=8),
    "H200": Accelerator("H200", "gpu", 141 * 10 ** 9, chips_per_host=8, single_host_chips=8),
    "A100-80G": Accelerator("A100-80G", "gpu", 80 * GiB, chips_per_host=8, single_host_chips=8),
    "A100-40G": Accelerator("A100-40G", "gpu", 40 * GiB, chips_per_host=8, single_host_chips=8),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "a100": "A100-80G", "a100-80gb": "A100-80G",
            "a100-40gb": "A100-40G"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice / GPU cluster: ``num_devices`` JAX devices on ``num_hosts`` hosts."""

    name: str
    accelerator: Accelerator
    num_devices: int
    num_hosts: int

    @property
    def devices_per_host(self) -> int:
        return self.num_devices // self.num_hosts

    @property
    def hbm_bytes(self) -> int:
        return self.accelerator.hbm_bytes

    @property
    def is_tpu(self) -> bool:
        return self.accelerator.kind == "tpu"

    @property
    def accelerator_type(self) -> str:
        """``gcloud --accelerator-type`` value, e.g. ``v5p-64`` or ``v5litepod-16``."""
        acc = self.accelerator
        if not self.is_tpu:
            raise ValueError(f"{self.name} is a GPU topology; Cloud TPU launches need a TPU slice "
                             "(v4-N, v5p-N, v5e-N, v6e-N).")
        return f"{acc.gcloud_prefix}-{self.num_devices * acc.cores_per_chip}"

    @property
    def physical_shape(self) -> tuple[int, ...]:
        """Chip grid (``cloud.google.com/gke-tpu-topology``): 2x2x4 for v5p-32, 4x4 for v5e-16.

        Grows from the smallest slice by doubling the last of the shortest sides, which reproduces
        the documented shapes (2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...; 1x1, 2x2, 2x4, 4x4, 4x8, ...).
        """
        if not self.is_tpu:
            raise ValueError(f"{self.name} is not a TPU slice; it has no TPU chip grid.")
        n = self.num_devices
        if self.accelerator.torus_dims == 3:
            dims = [2, 2, 1]
        else:
            if n == 1:
                return (1, 1)
            dims = [2, 2]
        while math.prod(dims) < n:
            m = min(dims)
            i = max(j for j, d in enumerate(dims) if d == m)
            dims[i] *= 2
        return tuple(dims)

    @property
    def gke_topology(self) -> str:
        return "x".join(str(d) for d in self.physical_shape)


def parse_topology(name: str) -> Topology:
    """``v5p-64`` / ``v5e-256`` / ``v5litepod-16`` / ``v4-32`` / ``v6e-64`` / ``8xH100`` -> Topology."""
    raw = str(name).strip()
    s = raw.replace("×", "x")
    gpu = re.fullmatch(r"(\d+)\s*x\s*([A-Za-z0-9-]+)", s)
    tpu = re.fullmatch(r"([A-Za-z0-9]+?)-(\d+)", s)
    known = ", ".join(sorted(ACCELERATORS))
    if gpu:
        n, fam = int(gpu.group(1)), gpu.group(2)
        acc = _lookup(fam, raw, known)
        if acc.kind != "gpu":
            raise ValueError(f"topology {raw!r}: write TPU slices as {acc.family}-N (e.g. v5p-32).")
        per = acc.chips_per_host
        if n < 1 or (n > per and n % per):
            raise ValueError(f"topology {raw!r}: {n} GPUs must be <= {per} or a multiple of {per} "
                             "(GPUs per host).")
        return Topology(raw, acc, n, max(1, n // per))
    if tpu:
        acc = _lookup(tpu.group(1), raw, known)
        if acc.kind != "tpu":
            raise ValueError(f"topology {raw!r}: write GPU clusters as NxGPU (e.g. 8x{acc.family}).")
        count = int(tpu.group(2))
        if count % acc.cores_per_chip:
            raise ValueError(f"topology {raw!r}: {acc.family}-N counts TensorCores ({acc.cores_per_chip} "
                             f"per chip); N must be a multiple of {acc.cores_per_chip}.")
        chips = count // acc.cores_per_chip
        if chips not in acc.chip_counts:
            sizes = ", ".join(f"{acc.family}-{c * acc.cores_per_chip}" for c in acc.chip_counts)
            raise ValueError(f"topology {raw!r} is not a {acc.family} slice size; choose one of {sizes}.")
        hosts = 1 if chips <= acc.single_host_chips else chips // acc.chips_per_host
        return Topology(raw, acc, chips, hosts)
    raise ValueError(f"topology {raw!r} not understood; expected e.g. v5p-64, v5e-256, v4-32, v6e-64 "
                     f"or 8xH100 (accelerators: {known}).")


def _lookup(family: str, raw: str, known: str) -> Accelerator:
    for key in (family, family.lower(), family.upper()):
        if key in ACCELERATORS:
            return ACCELERATORS[key]
    alias = _ALIASES.get(family.lower())
    if alias:
        return ACCELERATORS[alias]
    raise ValueError(f"topology {raw!r}: unknown accelerator {family!r}; known: {known}.")


# =============================================================================== the planner

def resolve_mesh(mesh_cfg, num_devices: int) -> dict[str, int]:
    """``config.mesh`` (one axis may be -1) -> concrete ``{data, fsdp, tensor}`` sizes."""
    shape = dict(mesh_cfg)
    unknown = set(shape) - set(sharding.MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; allowed: {sharding.MESH_AXES}.")
    sizes = {a: int(shape.get(a, 1)) for a in sharding.MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh {shape}: at most one axis may be -1.")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % known:
            raise ValueError(f"config.mesh {shape}: {num_devices} devices are not divisible by {known}.")
        sizes[free[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"config.mesh {sizes} needs {math.prod(sizes.values())} devices but the "
                         f"topology has {num_devices}; set config.mesh so that data*fsdp*tensor == "
                         f"{num_devices} (or use -1).")
    return sizes


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    """A device-free mesh of the target size: shardings (and their shard shapes) without devices."""
    return AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)


def per_device_elements(abstract_boxed: Any, mesh: AbstractMesh) -> tuple[int, int, int]:
    """(total elements, elements on one device, kernel elements on one device) of a boxed tree,
    sharded by the real rules (sharding.boxed_shardings, which replicates dims a mesh axis does
    not divide)."""
    shardings = sharding.boxed_shardings(abstract_boxed, mesh)
    shapes = nn.meta.unbox(abstract_boxed)
    total = local = local_kernels = 0
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(shapes),
                            jax.tree_util.tree_leaves(shardings,
                                                      is_leaf=lambda v: isinstance(v, jax.sharding.NamedSharding))):
        n = int(np.prod(x.shape))
        shard = int(np.prod(s.shard_shape(x.shape)))
        total += n
        local += shard
        if str(getattr(path[-1], "key", "")) == "kernel":
            local_kernels += shard
    return total, local, local_kernels


# ------------------------------------------------------------------------- activation formulas
#
# Bytes one device holds for the backward pass of one micro-step, per token of the forward batch
# (rows R = 2 x micro-batch for CCA/DPO/unlearning: every image is scored under its positive and
# its negative condition; R = micro-batch for MLE). b = bytes of the compute dtype, C width,
# F FFN hidden, H heads, L sequence length, V vocab, n layers; F, H, V are divided by the
# ``tensor`` mesh axis (they are sharded over it), C is not.
#
# LlamaGen block (pre-norm, RMSNorm, RoPE, SwiGLU, dropout on residual and FFN branches):
#   residual stream in and after attention, fp32 ......................... 8C
#   two RMSNorm outputs, q, k, v, attention output (matmul inputs, dtype b) 6bC
#   three dropout keep-masks (bool) and the rotated q/k fp32 copies ......... ~(3 + 8)C
#   SwiGLU: w1 and w3 outputs, silu(w1), their product, silu's sigmoid ..... 5bF
#   attention logits/probabilities, fp32 (softmax is computed in fp32) ...... 8HL (+ bHL if b < 4)
# AdaLN VAR block (LayerNorm, adaptive scale/shift/gate, L2-normalised q/k, GELU(tanh) MLP):
#   two LayerNorms in fp32 (input, centred input, normalised output) ........ 24C
#   modulated copies, q, k, v, two L2-normalisation steps each for q and k,
#   scaled q, attention output, projection, fc2 output (dtype b) ............ 13bC
#   fc1 output and the GELU(tanh) intermediates .............................. 6bF
#   attention logits/probabilities ........................................... 8HL (+ bHL if b < 4)
# Outside the blocks (both families): embeddings / final norm (~16C) and the fp32 logits with the
# log-softmax residuals and their gradient (~17V).
# Rematerialisation (config.train.remat, nn.remat per block) keeps only each block's fp32 input
# (4C per layer) and recomputes one block at a time during the backward pass, so the estimate is
# n*4C + one block + outside.
# These counts were checked against the compiled memory analysis of the real train step
# (tests/test_plan.py); they assume XLA keeps one copy of each residual, which TPU/GPU fusion
# usually beats, so the estimate errs on the safe side there.


@dataclasses.dataclass(frozen=True)
class ActivationTerms:
    """Per-token bytes: ``per_layer`` (one block), ``remat_layer`` (what remat keeps per block),
    ``outside`` (embeddings, head, logits)."""

    per_layer: float
    remat_layer: float
    outside: float


def _attn_bytes(b: int) -> int:
    return 8 + (b if b < 4 else 0)


def llamagen_terms(cfg, *, b: int, tensor: int) -> ActivationTerms:
    C, F = cfg.dim, cfg.ffn_hidden_dim / tensor
    H, L, V = cfg.n_head / tensor, cfg.block_size, cfg.vocab_size / tensor
    per_layer = C * (19 + 6 * b) + F * 5 * b + H * L * _attn_bytes(b)
    return ActivationTerms(per_layer, 4 * C, 16 * C + 17 * V)


def var_terms(cfg, *, b: int, tensor: int) -> ActivationTerms:
    C = cfg.C
    F = cfg.ffn_dim / tensor
    H, L, V = cfg.num_heads / tensor, cfg.L, cfg.vocab_size / tensor
    per_layer = C * (24 + 13 * b) + F * 6 * b + H * L * _attn_bytes(b)
    return ActivationTerms(per_layer, 4 * C, 16 * C + 17 * V)


ACTIVATION_TERMS = {"llamagen": llamagen_terms, "var": var_terms}


def activation_bytes(family: families.Family, *, rows: int, compute_bytes: int, tensor: int,
                     remat: bool) -> int:
    """Activation bytes one device keeps for one micro-step's backward pass (see the table above)."""
    cfg = family.model_cfg
    t = ACTIVATION_TERMS[family.name](cfg, b=compute_bytes, tensor=tensor)
    n = cfg.n_layer if family.name == "llamagen" else cfg.depth
    layers = n * t.remat_layer + t.per_layer if remat else n * t.per_layer
    return int(math.ceil(rows * family.num_tokens * (layers + t.outside)))


# ------------------------------------------------------------------------------------ the plan

@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of one train step (policy fp32 master weights, AdamW, frozen reference,
    gradients, activations) on ``topology``; ``fits`` compares the total with
    ``hbm_fraction`` x HBM."""

    recipe: str
    topology: str
    num_devices: int
    hbm_bytes: int
    hbm_fraction: float
    mesh: dict
    num_params: int
    micro_batch: int  # dataset rows per device per micro-step
    rows: int  # forward rows per device per micro-step (2x micro_batch for CCA)
    grad_accum_steps: int
    remat: bool  # what config.train.remat asks for
    params: int
    optimizer: int
    reference: int
    gradients: int
    compute_copies: int  # compute-dtype copies of the sharded kernels (bf16 runs)
    fsdp_gathered: int  # policy weights all-gathered over fsdp, in the compute dtype
    aux: int  # frozen tokenizer params the step needs (VAR: the VQVAE)
    batch: int
    activations: int  # without remat
    activations_remat: int  # with remat

    @property
    def static(self) -> int:
        return (self.params + self.optimizer + self.reference + self.gradients
                + self.compute_copies + self.fsdp_gathered + self.aux + self.batch)

    def total_for(self, remat: bool) -> int:
        return self.static + (self.activations_remat if remat else self.activations)

    @property
    def total(self) -> int:
        return self.total_for(self.remat)

    @property
    def budget(self) -> int:
        return int(self.hbm_bytes * self.hbm_fraction)

    def fits_with(self, remat: bool) -> bool:
        return self.total_for(remat) <= self.budget

    @property
    def fits(self) -> bool:
        return self.fits_with(self.remat)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(total=self.total, total_no_remat=self.total_for(False),
                 total_remat=self.total_for(True), budget=self.budget, fits=self.fits,
                 fits_no_remat=self.fits_with(False), fits_remat=self.fits_with(True))
        return d


def micro_batch_for(config, sizes: dict[str, int]) -> int:
    """Dataset rows per device per micro-step: config.plan.micro_batch, or the recipe's
    global_batch_size / grad_accum_steps spread over data x fsdp."""
    explicit = int(config.get("plan", {}).get("micro_batch", -1))
    if explicit > 0:
        return explicit
    B = int(config.train.global_batch_size)
    A = int(config.optim.grad_accum_steps)
    shards = sizes["data"] * sizes["fsdp"]
    if B % (A * shards):
        raise ValueError(
            f"config.train.global_batch_size={B} / grad_accum_steps={A} = {B / A:g} rows per "
            f"micro-step do not split over {shards} batch shards (mesh data x fsdp); change "
            "config.optim.grad_accum_steps, or plan a per-device micro-batch directly with "
            "config.plan.micro_batch.")
    return B // (A * shards)


def _aux_bytes(config, family: families.Family) -> int:
    if family.name != "var":
        return 0
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.init.tokenizer_checkpoint = ""
        cfg.init.from_scratch = True
    shapes = jax.eval_shape(lambda k: family.make_aux(cfg, k), jax.random.key(0))
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(shapes)))


_ABSTRACT_CACHE: dict = {}


def _abstract_params(family: families.Family) -> Any:
    """Boxed abstract params of the real init, cached per model config (eval_shape traces the
    whole model, which takes seconds for the big recipes)."""
    key = (family.name, family.model_cfg)
    if key not in _ABSTRACT_CACHE:
        _ABSTRACT_CACHE[key] = family.abstract_params()
    return _ABSTRACT_CACHE[key]


def _dtype_bytes(name: str, field: str) -> int:
    return int(np.dtype(families.parse_dtype(name, field)).itemsize)


def plan_memory(config, topology: Optional[str | Topology] = None, *,
                recipe: str = "") -> MemoryPlan:
    """Plans ``config``'s train step on ``topology`` (default ``config.plan.topology``).

    Parameter bytes come from ``jax.eval_shape`` of the real model init, sharded by the real rules
    (sharding.boxed_shardings) on a device-free mesh of the topology's size; activations from the
    per-family formula above. Nothing is allocated and no device is needed.
    """
    plan_cfg = config.get("plan", None) or {}
    topo = topology if isinstance(topology, Topology) else parse_topology(
        topology or plan_cfg.get("topology", ""))
    fraction = float(plan_cfg.get("hbm_fraction", 0.9))
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"config.plan.hbm_fraction={fraction}; expected a share in (0, 1].")
    sizes = resolve_mesh(config.mesh, topo.num_devices)
    family = families.from_config(config)
    boxed = _abstract_params(family)
    total, local, local_kernels = per_device_elements(boxed, abstract_mesh(sizes))
    # the policy's weights as a device holds them after the FSDP all-gather (tensor shards only)
    _, gathered_elems, _ = per_device_elements(
        boxed, abstract_mesh({"data": 1, "fsdp": 1, "tensor": sizes["tensor"]}))

    b = _dtype_bytes(config.train.compute_dtype, "config.train.compute_dtype")
    ref_b = _dtype_bytes(config.train.reference_dtype, "config.train.reference_dtype")
    accum = int(config.optim.grad_accum_steps)
    contrastive = config.loss.type != "mle"
    m = micro_batch_for(config, sizes)
    rows = 2 * m if contrastive else m
    # bf16 runs cast the kernels of policy (and reference) before the forward (train.py
    # micro_loss_and_grads, so that FSDP gathers half the bytes); those copies live through the
    # step.
    copies = local_kernels * b * (1 + int(contrastive)) if b < 4 else 0
    # FSDP gathers a layer's weights before use and XLA reuses the forward's gather in the backward
    # pass (CSE), so all gathered policy weights stay live. Conservative: when short of HBM, XLA's
    # rematerialisation may re-gather instead.
    gathered = (gathered_elems - local) * b
    act = functools.partial(activation_bytes, family, rows=rows, compute_bytes=b,
                            tensor=sizes["tensor"])
    return MemoryPlan(
        recipe=recipe, topology=topo.name, num_devices=topo.num_devices, hbm_bytes=topo.hbm_bytes,
        hbm_fraction=fraction, mesh=sizes, num_params=total, micro_batch=m, rows=rows,
        grad_accum_steps=accum, remat=bool(config.train.get("remat", False)),
        params=4 * local, optimizer=2 * 4 * local, reference=local * ref_b if contrastive else 0,
        # the scan over micro-steps carries a running sum next to each micro-step's gradient
        gradients=4 * local * (2 if accum > 1 else 1), compute_copies=copies,
        fsdp_gathered=gathered, aux=_aux_bytes(config, family),
        batch=m * accum * family.num_tokens * 4,
        activations=act(remat=False), activations_remat=act(remat=True))


# ------------------------------------------------------------------------------------ printing

def human(n: float) -> str:
    for unit, div in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def format_plan(p: MemoryPlan) -> str:
    mesh = " x ".join(f"{a}={p.mesh[a]}" for a in sharding.MESH_AXES)
    rows = [
        ("policy params (fp32)", p.params),
        ("optimizer state (AdamW mu, nu fp32)", p.optimizer),
        ("reference params", p.reference),
        ("gradients (fp32" + (", + accumulator)" if p.grad_accum_steps > 1 else ")"), p.gradients),
        ("compute-dtype kernel copies", p.compute_copies),
        ("FSDP all-gathered weights", p.fsdp_gathered),
        ("frozen tokenizer (aux)", p.aux),
        ("input batch", p.batch),
        ("activations, no remat", p.activations),
        ("activations, remat", p.activations_remat),
    ]
    lines = [f"{p.recipe or 'config'} on {p.topology}: {p.num_devices} devices, mesh {mesh}, "
             f"{p.num_params / 1e6:.1f}M params, micro-batch {p.micro_batch}/device "
             f"({p.rows} forward rows) x {p.grad_accum_steps} accumulation steps"]
    lines += [f"  {name:<40s} {human(v):>12s}" for name, v in rows]
    for remat in (False, True):
        mark = " (config.train.remat)" if remat == p.remat else ""
        verdict = "fits" if p.fits_with(remat) else "DOES NOT FIT"
        lines.append(f"  total, {'remat' if remat else 'no remat':<8s}{mark:<22s} "
                     f"{human(p.total_for(remat)):>12s}  -> {verdict} in {human(p.budget)} "
                     f"({p.hbm_fraction:.0%} of {human(p.hbm_bytes)} HBM)")
    return "\n".join(lines)


def run(config, workdir: str) -> None:
    """``job=plan``: prints the plan of ``config.plan.topology`` and writes ``workdir/plan.json``
    (``workdir`` may be a gs:// URI)."""
    from etils import epath

    p = plan_memory(config)
    print(format_plan(p), flush=True)
    out = epath.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(p.to_dict(), indent=1, sort_keys=True))


# --------------------------------------------------------------------------------------- table

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_RECIPES = ("llamagen_b_384", "llamagen_l_384", "llamagen_xl_384", "llamagen_xxl_384",
                 "llamagen_3b_384", "var_d16", "var_d20", "var_d24", "var_d30")
TABLE_TOPOLOGIES = ("v4-8", "v4-32", "v5e-16", "v5e-64", "v5p-8", "v5p-32", "v6e-8", "8xH100")
OFFICIAL_GPUS = 8  # the paper's recipes ran on 8 GPUs


def load_config(spec: str):
    """``configs/var_d30.py`` or ``configs/var_d30.py:ARG`` -> ``get_config(ARG)``."""
    path, _, arg = spec.partition(":")
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(REPO_ROOT, path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {spec!r} not found; pass e.g. configs/var_d30.py.")
    if REPO_ROOT not in sys.path:  # recipes import their configs/*_common.py helpers
        sys.path.insert(0, REPO_ROOT)
    mod_spec = importlib.util.spec_from_file_location(
        "cca_plan_recipe_" + re.sub(r"\W", "_", os.path.basename(path)), path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def at_official_micro_batch(config, topology: Topology):
    """The recipe with the official per-GPU micro-batch per device (global batch / accumulation /
    8 GPUs) and the accumulation steps that keep the global batch; when the topology has more
    devices than that allows, one row per device and no accumulation."""
    cfg = config.copy_and_resolve_references()
    B, A = int(cfg.train.global_batch_size), int(cfg.optim.grad_accum_steps)
    sizes = resolve_mesh(cfg.mesh, topology.num_devices)
    shards = sizes["data"] * sizes["fsdp"]
    micro = max(1, B // A // OFFICIAL_GPUS)
    while micro > 1 and (B % (micro * shards) or B < micro * shards):
        micro //= 2
    if B % (micro * shards):
        raise ValueError(f"global batch {B} does not split over {shards} batch shards on "
                         f"{topology.name}; pick another topology or config.mesh.")
    with cfg.unlocked():
        cfg.optim.grad_accum_steps = B // (micro * shards)
        cfg.plan.micro_batch = -1
    return cfg


def plan_table(recipes=PAPER_RECIPES, topologies=TABLE_TOPOLOGIES) -> dict:
    """``{recipe: {topology: MemoryPlan}}`` at the official per-device micro-batch."""
    out = {}
    for name in recipes:
        base = load_config(os.path.join("configs", name + ".py"))
        out[name] = {}
        for t in topologies:
            topo = parse_topology(t)
            out[name][t] = plan_memory(at_official_micro_batch(base, topo), topo, recipe=name)
    return out


def _gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def markdown_table(plans: dict) -> str:
    """The README table: GiB per device and whether it fits, without and with remat."""
    recipes = list(plans)
    topologies = list(next(iter(plans.values())))
    topo_objs = {t: parse_topology(t) for t in topologies}
    head = "| recipe | params | " + " | ".join(
        f"{t} ({topo_objs[t].hbm_bytes / GiB:.0f} GiB)" for t in topologies) + " |"
    sep = "|---|---:|" + "---:|" * len(topologies)
    lines = [
        "Bytes per device of one CCA train step (`python -m cca_jax.plan --table`): fp32 policy "
        "params, AdamW mu/nu, fp32 frozen reference, fp32 gradients (+ accumulator), bf16 kernel "
        "copies and FSDP-gathered weights, activations of one micro-step. Mesh: all devices on "
        "`fsdp` (the default `config.mesh`); per-device micro-batch = the official per-GPU one "
        "(LlamaGen 2; VAR d16 8, d20 4, d24 4, d30 2; accumulation steps adjusted to keep the global "
        "batch of 256, or 1 row per device when there are more devices than that allows). "
        "Cells: GiB / device, ✓ fits in 90 % of HBM (`config.plan.hbm_fraction`), ✗ does not.",
        "",
        "**Without rematerialisation** (`config.train.remat=False`, the recipes' default):",
        "", head, sep]

    def row(name, remat):
        plans_r = plans[name]
        first = next(iter(plans_r.values()))
        cells = [f"{_gib(p.total_for(remat))} {'✓' if p.fits_with(remat) else '✗'}"
                 for p in plans_r.values()]
        return f"| {name} | {first.num_params / 1e9:.2f} B | " + " | ".join(cells) + " |"

    lines += [row(n, False) for n in recipes]
    lines += ["", "**With rematerialisation** (`--config.train.remat=True`):", "", head, sep]
    lines += [row(n, True) for n in recipes]
    ref_topo = "8xH100" if "8xH100" in topologies else topologies[0]
    lines += ["", f"Breakdown on {ref_topo} (GiB / device; activations without / with remat):", "",
              "| recipe | micro-batch × accum | params | AdamW | reference | grads | bf16 copies + "
              "FSDP gather | tokenizer | activations | total |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in recipes:
        p = plans[name][ref_topo]
        lines.append(
            f"| {name} | {p.micro_batch} × {p.grad_accum_steps} | {_gib(p.params)} | "
            f"{_gib(p.optimizer)} | {_gib(p.reference)} | {_gib(p.gradients)} | "
            f"{_gib(p.compute_copies + p.fsdp_gathered)} | {_gib(p.aux)} | "
            f"{_gib(p.activations)} / {_gib(p.activations_remat)} | "
            f"{_gib(p.total_for(False))} / {_gib(p.total_for(True))} |")
    lines += ["", "Estimates: parameter terms are exact (eval_shape of the real init, real sharding "
              "rules); activations use the documented per-family formula (cca_jax/plan.py), checked "
              "against XLA's compiled memory analysis of the real train step on CPU within 20 %. "
              "XLA on TPU/GPU fuses more and may re-gather FSDP weights under memory pressure, so "
              "real usage is usually lower; treat ✗ cells near the budget as 'try it'."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cca_jax.plan",
        description="Per-device memory of a recipe's train step on a TPU slice / GPU host.")
    parser.add_argument("--config", help="recipe, e.g. configs/var_d30.py (or FILE:ARG)")
    parser.add_argument("--topology", default="", help="v5p-32, v5e-64, v4-32, v6e-64, 8xH100, ...")
    parser.add_argument("--micro-batch", type=int, default=0,
                        help="per-device micro-batch (default: from the recipe)")
    parser.add_argument("--remat", action="store_true", help="plan with config.train.remat=True")
    parser.add_argument("--table", action="store_true", help="the README table of the nine recipes")
    parser.add_argument("--out", default="", help="also write the output to this file")
    args = parser.parse_args(argv)
    if args.table:
        text = markdown_table(plan_table())
    elif args.config:
        cfg = load_config(args.config)
        with cfg.unlocked():
            if args.micro_batch:
                cfg.plan.micro_batch = args.micro_batch
            if args.remat:
                cfg.train.remat = True
        text = format_plan(plan_memory(cfg, args.topology or None,
                                       recipe=os.path.basename(args.config.split(":")[0]))) + "\n"
    else:
        parser.error("pass --config (with --topology) or --table")
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
