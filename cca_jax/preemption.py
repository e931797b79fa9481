"""Preemption notice (SIGTERM) -> one agreed step at which every process checkpoints and stops.

Cloud TPU (and GKE, Slurm, ...) announce a preemption or maintenance event by sending SIGTERM,
followed some time later by SIGKILL. The train loop polls :meth:`PreemptionWatcher.reached` once
per step; it turns True at the *same* step on every process, which then saves a checkpoint
(``CheckpointManager.save(step, ..., force=True)``), waits for it, and returns normally (exit 0)::

    with PreemptionWatcher() as preempt:
        for step in range(start, num_steps + 1):
            state, metrics = train_step(state, batch)
            stop = preempt.reached(step)
            ckpt.save(step, state, data_state=it.state(), force=stop or step == num_steps)
            if stop:
                break
    ckpt.close()

How processes agree:
- ``jax.distributed`` initialised with its preemption service (the default on multi-host runs):
  JAX's coordination service catches SIGTERM on any host and picks the sync step
  (``multihost_utils.reached_preemption_sync_point``); no Python signal handler is installed,
  since it would replace JAX's.
- otherwise: a Python handler sets a local flag; with several processes the flags are OR-ed
  across processes every ``check_every`` steps (one tiny host all-gather).
"""

from __future__ import annotations

import signal
import threading
from typing import Iterable

import jax
import numpy as np
from absl import logging


def _jax_sync_manager():
    try:
        from jax._src import distributed
        return distributed.global_state.preemption_sync_manager
    except Exception:  # noqa: BLE001 - private API moved: fall back to signal handling
        return None


class PreemptionWatcher:
    """Polled once per step by the train loop; see the module doc.

    ``signals``: what counts as a preemption notice (SIGTERM by default; add ``signal.SIGINT``
    to make Ctrl-C save and stop too). ``check_every``: steps between cross-process agreements
    in signal mode (all processes must use the same value). ``mode``: ``auto`` (JAX's service
    when available, else signals), ``jax`` or ``signal``.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,), *, check_every: int = 1,
                 mode: str = "auto"):
        if mode not in ("auto", "jax", "signal"):
            raise ValueError(f"mode={mode!r}; expected 'auto', 'jax' or 'signal'.")
        if check_every < 1:
            raise ValueError(f"check_every={check_every}; expected >= 1.")
        self.signals = tuple(signals)
        self.check_every = int(check_every)
        self._mode = mode
        self._flag = threading.Event()
        self._previous: dict[int, object] = {}
        self._installed = False
        self._cache: tuple[int, bool] | None = None
        self._reached = False

    # -- install / uninstall
    @property
    def mode(self) -> str:
        if self._mode == "auto":
            return "jax" if _jax_sync_manager() is not None else "signal"
        return self._mode

    def install(self) -> "PreemptionWatcher":
        if self._installed:
            return self
        if self.mode == "jax":
            if _jax_sync_manager() is None:
                raise RuntimeError("mode='jax' needs jax.distributed.initialize() with "
                                   "jax_enable_preemption_service=True.")
            logging.info("Preemption: using JAX's preemption sync service.")
        else:
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError("PreemptionWatcher.install() must run in the main thread "
                                   "(Python delivers signals there).")
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            logging.info("Preemption: watching signals %s.", [signal.Signals(s).name for s in self.signals])
        self._installed = True
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
        self._installed = False

    def __enter__(self) -> "PreemptionWatcher":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        # Only set a flag: the step finishes, then the loop checkpoints at an agreed step.
        if not self._flag.is_set():
            logging.warning("Received %s: will checkpoint and stop at the next agreed step.",
                            signal.Signals(signum).name)
        self._flag.set()

    # -- polling
    @property
    def requested(self) -> bool:
        """This process saw a notice (signal mode; other processes may not know yet)."""
        return self._flag.is_set()

    def request(self) -> None:
        """Acts as if a notice arrived (tests; a custom notifier such as a metadata poller)."""
        self._flag.set()

    def reached(self, step: int) -> bool:
        """True from the agreed step on, identically on every process. Call once per step."""
        step = int(step)
        if self._reached:
            return True
        if self._cache is not None and self._cache[0] == step:
            return self._cache[1]
        if not self._installed:
            self.install()
        if self.mode == "jax":
            from jax.experimental import multihost_utils
            hit = bool(multihost_utils.reached_preemption_sync_point(step)) or (
                self._flag.is_set() and jax.process_count() == 1)
        elif jax.process_count() == 1:
            hit = self._flag.is_set()
        elif step % self.check_every:
            hit = False
        else:
            from jax.experimental import multihost_utils
            flags = multihost_utils.process_allgather(np.int32(self._flag.is_set()))
            hit = bool(np.any(flags))
        self._cache = (step, hit)
        if hit:
            self._reached = True
            logging.warning("Preemption: stopping at step %d after a checkpoint.", step)
        return hit
