"""Device mesh and the one table that maps logical axis names to mesh axes.

Models never name mesh axes. Every parameter is created with
``nn.with_logical_partitioning(init, (logical names...))`` and large activations are annotated
with ``nn.with_logical_constraint(x, (logical names...))``. Both are no-ops until a step is traced
under :func:`logical_rules` on a mesh, so the same model code runs unsharded in tests.

Logical names (params):
  ``embed``   model width C               ``mlp``     FFN hidden width
  ``heads``   attention heads (q/k/v/o)   ``kv``      head dim D (never sharded)
  ``qkv``     fused q|k|v output rows     ``vocab``   token vocabulary V
  ``classes`` class-table rows            ``norm``    1-D scale/bias vectors
  ``conv_in`` / ``conv_out`` conv channels; ``height`` / ``width`` kernel taps (replicated)
  ``scales``  VAR level / position tables
Logical names (activations):
  ``act_batch`` B, ``act_length`` L, ``act_embed`` C, ``act_heads`` H, ``act_mlp``,
  ``act_vocab`` V, ``act_kv`` D.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with parameters and optimizer
state sharded over it, ZeRO-3 style) and ``tensor`` (Megatron-style model parallel).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# The only place where logical names meet mesh axes. A name missing here is replicated.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("qkv", "tensor"),
    ("vocab", "tensor"),
    ("classes", None),
    ("kv", None),
    ("norm", None),
    ("conv_in", None),
    ("conv_out", None),
    ("height", None),
    ("width", None),
    ("scales", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_kv", None),
)


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a ``(data, fsdp, tensor)`` mesh.

    ``shape`` maps axis name -> size; one axis may be ``-1`` (takes the remaining devices).
    Defaults to all devices on ``fsdp``, which shards parameters and the batch alike.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    shape = dict(shape or {"data": 1, "fsdp": -1, "tensor": 1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; allowed: {MESH_AXES}.")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh {shape}: at most one axis may be -1.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n % known:
            raise ValueError(f"config.mesh {shape}: {n} devices are not divisible by {known}.")
        sizes[sizes.index(-1)] = n // known
    if int(np.prod(sizes)) != n:
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices but "
            f"{n} are available; set config.mesh so that data*fsdp*tensor == {n} (or use -1).")
    try:
        from jax.experimental import mesh_utils
        arr = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # fake CPU devices / uneven topologies
        arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES)


@contextlib.contextmanager
def logical_rules(rules: Sequence[tuple[str, Any]] = LOGICAL_RULES):
    """Logical-name rules only (no mesh): for code that maps specs but traces nothing."""
    with nn.logical_axis_rules(rules):
        yield


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES):
    """Context for tracing sharded code: ``mesh`` set as JAX's current mesh plus the rules.

    ``jax.set_mesh`` (not the legacy ``with mesh:``) is what makes flax's
    ``with_logical_constraint`` emit sharding constraints under jax >= 0.7; under ``with mesh:``
    they are silently dropped and every device would run the whole batch through the model.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """Maps a pytree of logical ``PartitionSpec``s to ``NamedSharding``s on ``mesh``."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Sharding of a batch-major array: leading axis over ``data`` x ``fsdp``."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_size(spec_entry, mesh: Mesh) -> int:
    if spec_entry is None:
        return 1
    axes = spec_entry if isinstance(spec_entry, tuple) else (spec_entry,)
    return int(np.prod([mesh.shape[a] for a in axes]))


def _fit_sharding(shape, sharding: NamedSharding) -> NamedSharding:
    """Drops mesh axes from dimensions they do not divide (e.g. 11 class rows over 8 devices)."""
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    fixed = [e if (e is None or dim % shard_size(e, sharding.mesh) == 0) else None
             for dim, e in zip(shape, spec)]
    return NamedSharding(sharding.mesh, P(*fixed))


def strip_boxes(tree: Any) -> Any:
    """Removes ``nn.Partitioned`` boxes without applying their constraint (``nn.meta.unbox`` would
    add a sharding constraint when traced under :func:`use_mesh`)."""
    return jax.tree_util.tree_map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
                                  tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def boxed_shardings(abstract_boxed: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """Shardings for a pytree of (possibly ``nn.Partitioned``-boxed) abstract arrays.

    Leaves without logical names are replicated; axes that a mesh dimension does not divide are
    replicated too, so odd sizes (class tables, tiny test models) always work.
    """
    specs = nn.get_partition_spec(abstract_boxed)
    shardings = logical_to_sharding(specs, mesh, rules)
    shapes = strip_boxes(abstract_boxed)
    return jax.tree_util.tree_map(
        lambda s, x: _fit_sharding(x.shape, s), shardings, shapes,
        is_leaf=lambda x: isinstance(x, NamedSharding))


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, *args, rules=LOGICAL_RULES) -> Any:
    """Runs ``init_fn(*args)`` directly into its sharded layout (never whole on one device).

    ``init_fn`` returns a pytree of arrays whose leaves may be logical-partitioning boxes; the
    result is unboxed.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = boxed_shardings(abstract, mesh, rules)
    with use_mesh(mesh, rules):
        out = jax.jit(lambda *a: strip_boxes(init_fn(*a)), out_shardings=shardings)(*args)
    return out
