"""glibc malloc settings for runs on a CPU host: keep freed memory instead of unmapping it.

Why: XLA:CPU allocates every execution's temporary buffer with ``malloc`` (5.4 GB for the
BENCH-VAR CCA step), and glibc serves a block that large with a fresh ``mmap`` and ``munmap``\\ s
it on ``free``. Each step then page-faults the whole buffer back in, zero-filled by the kernel:
1.75 M minor faults and 6 s of kernel CPU time per BENCH-VAR step (1.2 s per BENCH-LLAMAGEN
step), as ``getrusage`` shows. Three glibc settings stop it: one arena (``MALLOC_ARENA_MAX=1``;
only the main arena grows past 64 MB without ``mmap``), no ``mmap`` (``MALLOC_MMAP_MAX_=0``) and
no trimming of the heap top (``MALLOC_TRIM_THRESHOLD_``, 1 TiB). After the first step no page
faults remain: BENCH-VAR 13.7–14.6 s -> 10.1–10.4 s, BENCH-LLAMAGEN 4.9–5.2 s -> 4.4–4.6 s
(``python -m cca_jax.bench.step``, back to back). The cost: the process keeps its peak host
memory until it exits, which a training process reaches every step anyway.

glibc reads these variables only when a process starts, so the entry points that run training
steps (``cca_jax.main`` for the train job, ``cca_jax.bench.step``, ``cca_jax.bench.attention``)
re-execute themselves once with them set, before JAX is imported. Sampling loops gain nothing
(one execution per batch; LlamaGen guidance-free sampling: 4.2–5.5 s with glibc's defaults,
4.6–5.9 s with the settings, alternating runs on this noisy machine), so the sample job keeps
glibc's defaults. The re-exec happens only on Linux with glibc, on a host without TPU/GPU device
files (or with ``JAX_PLATFORMS=cpu``), when none of the variables is set already (a user's own
choice wins) and ``CCA_JAX_DEFAULT_MALLOC`` is not set (the opt-out). Importing ``cca_jax`` as a
library never re-executes anything.
"""

from __future__ import annotations

import glob
import os
import platform
import sys

TUNED_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
             "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
OPT_OUT = "CCA_JAX_DEFAULT_MALLOC"
_ACCELERATOR_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")


def _cpu_host(environ) -> bool:
    platforms = environ.get("JAX_PLATFORMS", "").lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(glob.glob(pattern) for pattern in _ACCELERATOR_FILES)


def wanted(environ=None) -> bool:
    """Whether this process should re-execute itself with :data:`TUNED_ENV`."""
    environ = os.environ if environ is None else environ
    return (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
            and OPT_OUT not in environ and not any(k in environ for k in TUNED_ENV)
            and _cpu_host(environ))


def describe(environ=None) -> str:
    """One line for logs and benchmark headers: which malloc settings this process runs with."""
    environ = os.environ if environ is None else environ
    if all(environ.get(k) == v for k, v in TUNED_ENV.items()):
        return "host malloc: kept (MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0, no trim)"
    set_ = {k: environ[k] for k in TUNED_ENV if k in environ}
    return f"host malloc: glibc defaults{f' + {set_}' if set_ else ''} (see cca_jax/host_malloc.py)"


def reexec_if_wanted() -> None:
    """Replaces this process by the same command line with :data:`TUNED_ENV` added, if
    :func:`wanted`; call first thing in a ``__main__`` block, before JAX starts."""
    if not wanted():
        return
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, {**os.environ, **TUNED_ENV})
