"""Multi-host start-up: one JAX process per host, joined with ``jax.distributed``."""

import os

import jax
from absl import logging

_INITIALIZED = False


def _multi_host_requested() -> bool:
    """Whether this process is one of several.

    True when any of these is set: ``CCA_JAX_MULTIHOST=1`` (what launch/ exports on TPU VMs),
    ``JAX_COORDINATOR_ADDRESS`` (explicit coordinator, e.g. GPUs or CPUs with gloo),
    ``TPU_WORKER_HOSTNAMES`` naming several hosts (GKE / Cloud TPU metadata), or a
    ``MEGASCALE_COORDINATOR_ADDRESS`` (multi-slice).
    """
    env = os.environ
    return (env.get("CCA_JAX_MULTIHOST", "") == "1"
            or "JAX_COORDINATOR_ADDRESS" in env
            or "," in env.get("TPU_WORKER_HOSTNAMES", "")
            or "MEGASCALE_COORDINATOR_ADDRESS" in env)


def initialize() -> None:
    """Calls ``jax.distributed.initialize()`` when launched as one process of several.

    On Cloud TPU pods the coordinator and process ids are discovered automatically; elsewhere set
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. A single process
    with none of the variables of :func:`_multi_host_requested` runs without it.
    """
    global _INITIALIZED
    if _INITIALIZED:
        return
    if _multi_host_requested():
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()
        logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                     jax.process_index(), jax.process_count(), jax.local_device_count(),
                     jax.device_count())
    _INITIALIZED = True
