"""Orbax checkpoints of a train run, params-only exports, and reading them back on any mesh.

API (stable; ``cca_jax/train.py``, the samplers and the converters rely on it)
-------------------------------------------------------------------------------
``checkpoint_dir(workdir) -> epath.Path``
    ``<workdir>/checkpoints``; ``workdir`` may be a local path or ``gs://bucket/...``.
``as_path(path) -> epath.Path`` (local paths made absolute, ``gs://`` kept intact), ``is_remote(path)``.

``CheckpointManager(workdir, *, save_every=1000, keep=3, metadata=None, async_save=True,
                    check_finite=True, atomicity="auto")``
  (or ``CheckpointManager.from_config(config, workdir)``: ``config.train.ckpt_every``,
  ``config.train.keep_checkpoints``; the whole config is stored as the metadata snapshot)
    ``.directory``                      the checkpoints directory (``epath.Path``)
    ``.latest_step() -> int | None``    newest *complete* checkpoint (half-written ones never count)
    ``.all_steps() -> list[int]``
    ``.should_save(step) -> bool``      ``step % save_every == 0`` and not saved yet
    ``.save(step, state, *, data_state=None, force=False) -> bool``
        Async save of the train-state pytree (step, params, opt_state, rng: any pytree of
        jax/numpy arrays, typed PRNG keys included), the data iterator position
        ``data_state`` (a JSON-able dict that is the same on every process) and the metadata
        snapshot. Saves when ``force`` or :meth:`should_save`; returns whether it saved. Call it
        on every process. Returns once the arrays are copied off the devices, so the caller may
        donate ``state`` to the next step right away. With ``check_finite`` a non-finite float
        leaf raises :class:`NonFiniteCheckpointError` instead of writing NaN weights.
    ``.restore_latest(abstract_state, shardings=None) -> Restored | None``
    ``.restore(step, abstract_state, shardings=None) -> Restored``
        ``abstract_state`` is ``jax.eval_shape(init_state, ...)`` (``nn.Partitioned`` boxes are
        unboxed); ``shardings`` the matching pytree of ``jax.sharding.Sharding`` on the *current*
        mesh (e.g. ``sharding.boxed_shardings(abstract, mesh)``), a single sharding for every
        leaf, or ``None`` (use each leaf's ``.sharding``, else replicate over all devices).
        Arrays are read straight into those shardings, so a run saved on 8 devices resumes on 2
        (or on another mesh shape). Leaves are cast to the abstract dtypes.
        ``Restored(step, state, data_state, metadata)``; ``None`` when there is no checkpoint.
    ``.wait_until_finished()``          block until the pending async save is durable
    ``.close()``                        wait, then release; also ``with CheckpointManager(...) as m``

``export_params(params, path, *, overwrite=False, metadata=None)``
    Writes a params pytree as an Orbax dir (blocking). ``metadata``: optional JSON-able dict
    (e.g. the model config) read back by :func:`params_metadata`.
``load_params(path, abstract=None, shardings=None)``
    Reads such a dir. No ``abstract`` and no ``shardings``: host numpy arrays (works on any
    device count). ``shardings`` only: jax arrays in those shardings, shapes from the file.
    ``abstract`` (+ ``shardings``): as :meth:`CheckpointManager.restore`.
``is_params_dir(path) -> bool``         an Orbax params dir (vs. an official ``.pt``/``.pth`` file)
``params_metadata(path) -> dict``        the ``metadata`` given to :func:`export_params` (or {})
``load_latest_params(workdir, abstract=None, shardings=None) -> (step, params)``
    Only the ``params`` entry of the newest train checkpoint in ``<workdir>/checkpoints``.

Layout on disk: ``<workdir>/checkpoints/<step>/{state,data,meta}``. Orbax writes each step into
``<step>.orbax-checkpoint-tmp-<ts>`` and renames it when complete (locally), or marks it with
``commit_success.txt`` (``gs://``), so a process killed mid-save leaves nothing that
:meth:`latest_step` or a restore would pick up; leftovers are deleted on the next start.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

CHECKPOINT_SUBDIR = "checkpoints"
STATE_ITEM, DATA_ITEM, META_ITEM = "state", "data", "meta"
_ITEMS = (STATE_ITEM, DATA_ITEM, META_ITEM)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class NonFiniteCheckpointError(FloatingPointError):
    """A train state about to be saved holds NaN/Inf values."""


class CheckpointRestoreError(ValueError):
    """A checkpoint does not match the state the caller expects."""


@dataclasses.dataclass
class Restored:
    """What :meth:`CheckpointManager.restore` returns."""
    step: int
    state: Any
    data_state: dict  # {} when the run saved none
    metadata: dict  # the config snapshot ({} when none)


# --------------------------------------------------------------------------------------- paths

def as_path(path: str | os.PathLike) -> epath.Path:
    """``epath.Path`` for a local path (made absolute: Orbax requires it) or a ``gs://`` URL.

    Never goes through ``pathlib``, which would collapse ``gs://b`` into ``gs:/b``.
    """
    s = os.fspath(path)
    if not s:
        raise ValueError("Empty path; set the config field that names this directory "
                         "(e.g. --workdir or config.init.reference_checkpoint).")
    if is_remote(s):
        return epath.Path(s)
    return epath.Path(os.path.abspath(os.path.expanduser(s)))


def is_remote(path: str | os.PathLike) -> bool:
    """``gs://...`` and other URL-style paths (read through epath / tf.io.gfile, not ``open``)."""
    return bool(_SCHEME.match(os.fspath(path)))


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    return as_path(workdir) / CHECKPOINT_SUBDIR


# ------------------------------------------------------------------------------ pytree helpers

def _unbox(tree: Any) -> Any:
    from flax.core import meta
    return meta.unbox(tree)


def _all_devices_replicated() -> jax.sharding.Sharding:
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def with_shardings(abstract: Any, shardings: Any = None) -> Any:
    """Pytree of ``jax.ShapeDtypeStruct`` carrying the shardings the arrays are restored into.

    ``shardings``: a matching pytree of ``jax.sharding.Sharding``, one sharding for all leaves, or
    ``None`` (each leaf's own ``.sharding``, else replicated over all devices).
    """
    abstract = _unbox(abstract)
    default = None

    def leaf(x, s):
        nonlocal default
        if s is None:
            s = getattr(x, "sharding", None)
        if s is None:
            default = default or _all_devices_replicated()
            s = default
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda x: leaf(x, shardings), abstract)
    try:
        return jax.tree_util.tree_map(leaf, abstract, shardings,
                                      is_leaf=lambda x: x is None)
    except ValueError as e:
        raise CheckpointRestoreError(
            "The shardings pytree does not match the abstract state: "
            f"{jax.tree_util.tree_structure(abstract)} vs "
            f"{jax.tree_util.tree_structure(shardings, is_leaf=lambda x: x is None)}. Build both "
            "from the same jax.eval_shape(...) result (sharding.boxed_shardings).") from e


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def _nonfinite_leaves(tree: Any) -> list[str]:
    """Key paths of floating leaves that contain NaN/Inf (one fused device reduction)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    idx = [i for i, (_, x) in enumerate(flat)
           if hasattr(x, "dtype") and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
           and jnp.issubdtype(x.dtype, jnp.inexact)]
    if not idx:
        return []
    ok = _all_finite([flat[i][1] for i in idx])
    # A reduction comes out replicated; on several hosts read the local replica.
    ok = np.asarray(ok.addressable_data(0) if not ok.is_fully_addressable else ok)
    return [jax.tree_util.keystr(flat[i][0]) for i, good in zip(idx, ok) if not good]


def _config_snapshot(metadata: Any) -> dict | None:
    if metadata is None:
        return None
    if hasattr(metadata, "to_json_best_effort"):  # ml_collections.ConfigDict
        return json.loads(metadata.to_json_best_effort())
    return json.loads(json.dumps(metadata, default=repr))


# ------------------------------------------------------------------------------ train checkpoints

class CheckpointManager:
    """Async Orbax checkpoints of one train run in ``<workdir>/checkpoints`` (see module doc)."""

    def __init__(self, workdir: str | os.PathLike, *, save_every: int = 1000, keep: int = 3,
                 metadata: Any = None, async_save: bool = True, check_finite: bool = True,
                 atomicity: str = "auto"):
        if save_every < 1:
            raise ValueError(f"save_every={save_every}; expected >= 1 (config.train.ckpt_every).")
        if keep < 1:
            raise ValueError(f"keep={keep}; expected >= 1 (config.train.keep_checkpoints).")
        self.save_every = int(save_every)
        self.check_finite = check_finite
        self._metadata = _config_snapshot(metadata)
        from orbax.checkpoint._src.checkpoint_managers import save_decision_policy as sdp
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(keep),
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a killed save
            enable_async_checkpointing=async_save,
            # Explicit policy: Orbax's default also saves the very first step it sees.
            save_decision_policy=sdp.AnySavePolicy([
                sdp.FixedIntervalPolicy(self.save_every),
                sdp.PreemptionCheckpointingPolicy(),
            ]),
            temporary_path_class=_temporary_path_class(atomicity),
        )
        self._mngr = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=_ITEMS,
                                           options=options)

    @classmethod
    def from_config(cls, config, workdir: str | os.PathLike, **kw) -> "CheckpointManager":
        kw.setdefault("save_every", config.train.ckpt_every)
        kw.setdefault("keep", config.train.keep_checkpoints)
        kw.setdefault("metadata", config)
        return cls(workdir, **kw)

    # -- queries
    @property
    def directory(self) -> epath.Path:
        return self._mngr.directory

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def saved_state_keys(self, step: int) -> set[str]:
        """Top-level entries of the train state saved at ``step`` (read from its metadata)."""
        with ocp.PyTreeCheckpointer() as ckptr:
            tree = ckptr.metadata(self.directory / str(int(step)) / STATE_ITEM).item_metadata.tree
        return set(tree) if isinstance(tree, Mapping) else set()

    def should_save(self, step: int) -> bool:
        return self._mngr.should_save(int(step))

    # -- save
    def save(self, step: int, state: Any, *, data_state: Mapping | None = None,
             force: bool = False) -> bool:
        step = int(step)
        if not force and not self._mngr.should_save(step):
            return False
        if step in self._mngr.all_steps():
            logging.info("Checkpoint for step %d exists already; not saving again.", step)
            return False
        if self.check_finite:
            bad = _nonfinite_leaves(state)
            if bad:
                raise NonFiniteCheckpointError(
                    f"Refusing to checkpoint step {step}: non-finite values in {bad[:8]}"
                    f"{' ...' if len(bad) > 8 else ''}. Lower config.optim.lr or set "
                    "config.train.nonfinite='skip'.")
        data_state = json.loads(json.dumps(dict(data_state or {})))  # fail early if not JSON
        saved = self._mngr.save(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardSave(state),
            DATA_ITEM: ocp.args.JsonSave(data_state),
            META_ITEM: ocp.args.JsonSave(self._metadata or {}),
        }), force=True)
        if saved:
            logging.info("Checkpoint of step %d started in %s", step, self.directory)
        return saved

    # -- restore
    def restore(self, step: int, abstract_state: Any, shardings: Any = None) -> Restored:
        step = int(step)
        if step not in self._mngr.all_steps():
            raise FileNotFoundError(f"No complete checkpoint of step {step} in {self.directory}; "
                                    f"available: {self.all_steps()}.")
        target = with_shardings(abstract_state, shardings)
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.StandardRestore(target),
                DATA_ITEM: ocp.args.JsonRestore(),
                META_ITEM: ocp.args.JsonRestore(),
            }))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointRestoreError(
                f"Cannot restore step {step} from {self.directory} into the expected train state "
                f"({type(e).__name__}: {e}). The checkpoint was written by another model/optimizer "
                "config; point --workdir elsewhere or match config.model / config.optim.") from e
        return Restored(step=step, state=out[STATE_ITEM], data_state=out[DATA_ITEM] or {},
                        metadata=out[META_ITEM] or {})

    def restore_latest(self, abstract_state: Any, shardings: Any = None) -> Restored | None:
        step = self.latest_step()
        if step is None:
            return None
        logging.info("Restoring step %d from %s", step, self.directory)
        return self.restore(step, abstract_state, shardings)

    # -- lifetime
    def wait_until_finished(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _temporary_path_class(atomicity: str):
    """``auto``: Orbax's choice (atomic rename locally, commit file on gs://)."""
    from orbax.checkpoint._src.path import atomicity as atom
    choices = {"auto": None, "rename": atom.AtomicRenameTemporaryPath,
               "commit_file": atom.CommitFileTemporaryPath}
    if atomicity not in choices:
        raise ValueError(f"atomicity={atomicity!r}; expected one of {sorted(choices)}.")
    return choices[atomicity]


# ------------------------------------------------------------------------------ params exports

def export_params(params: Any, path: str | os.PathLike, *, overwrite: bool = False,
                  metadata: Mapping | None = None) -> None:
    """Writes ``params`` (a pytree of arrays) as an Orbax dir at ``path``; blocks until durable."""
    path = as_path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; remove it or pass overwrite=True.")
    params = _unbox(params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=overwrite,
                   custom_metadata={"cca_jax": _config_snapshot(dict(metadata or {}))})
        ckptr.wait_until_finished()


def is_params_dir(path: str | os.PathLike) -> bool:
    """True for a finished Orbax pytree dir (what :func:`export_params` writes)."""
    try:
        path = as_path(path)
        return path.is_dir() and (path / "_CHECKPOINT_METADATA").exists() and (
            (path / "_METADATA").exists() or (path / "manifest.ocdbt").exists())
    except ValueError:
        return False


def _require_params_dir(path: epath.Path) -> None:
    if not is_params_dir(path):
        raise FileNotFoundError(
            f"{path} is not an Orbax params directory (no _CHECKPOINT_METADATA/_METADATA). Expected "
            "what cca_jax.checkpoint.export_params or the convert job writes (workdir/params); "
            "official .pt/.pth files are read by the family converter instead.")


def params_metadata(path: str | os.PathLike) -> dict:
    path = as_path(path)
    _require_params_dir(path)
    md = ocp.StandardCheckpointer().metadata(path)
    return dict((md.custom_metadata or {}).get("cca_jax") or {})


def _restore_tree(ckptr, path: epath.Path, tree_meta: Any, abstract: Any, shardings: Any,
                  partial: bool) -> Any:
    """Restores ``path`` as numpy (no abstract/shardings) or into shardings."""
    if abstract is None and shardings is None:
        restore_args = jax.tree_util.tree_map(
            lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree_meta)
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(
            item=tree_meta if partial else None, restore_args=restore_args,
            partial_restore=partial))
    if abstract is None:
        abstract = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree_meta)
    target = with_shardings(abstract, shardings)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=partial))


def load_params(path: str | os.PathLike, abstract: Any = None, shardings: Any = None) -> Any:
    """Reads an Orbax params dir (see module doc for what ``abstract``/``shardings`` select)."""
    path = as_path(path)
    _require_params_dir(path)
    with ocp.PyTreeCheckpointer() as ckptr:
        tree_meta = ckptr.metadata(path).item_metadata.tree
        try:
            return _restore_tree(ckptr, path, tree_meta, abstract, shardings, partial=False)
        except (ValueError, KeyError) as e:
            raise CheckpointRestoreError(
                f"Params in {path} do not match the expected tree ({type(e).__name__}: {e}). "
                "Check that config.model matches the exported model.") from e


def load_latest_params(workdir: str | os.PathLike, abstract: Any = None,
                       shardings: Any = None) -> tuple[int, Any]:
    """``(step, params)`` of the newest complete train checkpoint under ``<workdir>/checkpoints``.

    Reads only the ``params`` entry of the saved train state (not the optimizer state).
    """
    directory = checkpoint_dir(workdir)
    if not directory.exists():
        raise FileNotFoundError(f"No checkpoints in {directory}; train first or set "
                                "config.sample.checkpoint to a params dir / official file.")
    with ocp.CheckpointManager(directory, item_names=_ITEMS,
                               options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
        step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(f"No complete checkpoint in {directory}.")
    state_path = directory / str(step) / STATE_ITEM
    with ocp.PyTreeCheckpointer() as ckptr:
        tree_meta = ckptr.metadata(state_path).item_metadata.tree
        if not isinstance(tree_meta, Mapping) or "params" not in tree_meta:
            raise CheckpointRestoreError(
                f"The train state in {state_path} has no top-level 'params' entry "
                f"(found {list(tree_meta) if isinstance(tree_meta, Mapping) else type(tree_meta)}).")
        meta = {"params": tree_meta["params"]}
        wrap = lambda t: None if t is None else {"params": t}  # noqa: E731
        single = shardings is None or isinstance(shardings, jax.sharding.Sharding)
        out = _restore_tree(ckptr, state_path, meta, wrap(abstract),
                            shardings if single else wrap(shardings), partial=True)
    return step, out["params"]
