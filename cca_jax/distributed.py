"""Multi-host start-up: one JAX process per host, joined with ``jax.distributed``."""

import os

import jax
from absl import logging

_INITIALIZED = False


def initialize() -> None:
    """Calls ``jax.distributed.initialize()`` when launched as one process of several.

    On Cloud TPU pods the coordinator and process ids are discovered automatically; elsewhere set
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. A single process
    with none of these set runs without it.
    """
    global _INITIALIZED
    if _INITIALIZED:
        return
    on_tpu_pod = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
    explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
    if on_tpu_pod or explicit:
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()
        logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                     jax.process_index(), jax.process_count(), jax.local_device_count(),
                     jax.device_count())
    _INITIALIZED = True
