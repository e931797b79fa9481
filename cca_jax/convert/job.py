"""The ``convert`` job: official PyTorch checkpoints <-> Orbax params dirs.

``python -m cca_jax.main --config=configs/<recipe>.py --workdir=DIR --config.job=convert``

``config.convert.direction == "to_orbax"`` (default)
    ``config.convert.source`` (or ``config.init.reference_checkpoint``) -> ``DIR/params``;
    ``config.init.tokenizer_checkpoint`` -> ``DIR/tokenizer_params`` (``config.convert.tokenizer``).
    Both are read by the family converter (strict: every key and shape is checked against
    ``config.model`` / ``config.tokenizer``) and written with :func:`cca_jax.checkpoint.export_params`,
    so ``load_params`` / the converters' ``load_checkpoint`` / the samplers read them back.
``config.convert.direction == "to_official"``
    The model params (an Orbax params dir, or a train workdir: the params of its latest
    checkpoint) -> ``DIR/model.pt`` (LlamaGen: ``{"model": sd}``, or bare for XXL/XXXL/3B like
    their official files) or ``DIR/model.pth`` (VAR, bare),
    loadable by the official code with ``load_state_dict(strict=True)``; the tokenizer likewise
    -> ``DIR/tokenizer.pt`` / ``tokenizer.pth``. ``config.convert.wrap`` overrides the layout.

Sources and ``DIR`` may be ``gs://`` paths: official files are staged through a local temp dir.
Converters are imported lazily by family, so the job needs only the family in use.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import tempfile
from typing import Any

import jax
from absl import logging

from cca_jax import checkpoint as ckpt
from cca_jax.convert import common

DIRECTIONS = ("to_orbax", "to_official")


@dataclasses.dataclass(frozen=True)
class Family:
    """How to build a family's config object and which converter module handles it."""
    config_module: str
    config_class: str
    converter: str
    section: str  # "model" | "tokenizer": the config section (and output name stem)
    wrap: str | None  # official file layout: state dict under this key, or bare
    suffix: str  # official file extension

    def build_config(self, config) -> Any:
        cls = getattr(importlib.import_module(self.config_module), self.config_class)
        return cls.from_config(config[self.section])

    def module(self):
        return importlib.import_module(self.converter)


MODEL_FAMILIES = {
    "llamagen": Family("cca_jax.models.llamagen", "LlamaGenConfig", "cca_jax.convert.llamagen",
                       "model", "model", ".pt"),
    "var": Family("cca_jax.models.var", "VARConfig", "cca_jax.convert.var", "model", None, ".pth"),
}
TOKENIZER_FAMILIES = {
    "vq16": Family("cca_jax.models.vq16", "VQ16Config", "cca_jax.convert.vq16", "tokenizer",
                   "model", ".pt"),
    "vqvae": Family("cca_jax.models.vqvae", "VQVAEConfig", "cca_jax.convert.vqvae", "tokenizer",
                    None, ".pth"),
}
OUTPUT_DIRS = {"model": "params", "tokenizer": "tokenizer_params"}


def _family(config, section: str) -> Family:
    table = MODEL_FAMILIES if section == "model" else TOKENIZER_FAMILIES
    name = config[section].get("family", "")
    if name not in table:
        raise ValueError(f"config.{section}.family={name!r}; the convert job knows {sorted(table)}.")
    return table[name]


def _exists(path: str) -> bool:
    return ckpt.as_path(path).exists()


def _read(source: str, fam: Family, fcfg: Any, field: str) -> tuple[Any, dict | None]:
    """``(params, None)`` from an official file or ``(None, state dict)`` from an Orbax params dir
    or a train workdir; either way checked strictly against the configured model."""
    conv = fam.module()
    if ckpt.is_params_dir(source):
        tree = ckpt.load_params(source)
    elif ckpt.checkpoint_dir(source).exists():
        step, tree = ckpt.load_latest_params(source)
        logging.info("convert: params of step %d of the train run in %s", step, source)
    elif not _exists(source):
        raise FileNotFoundError(f"{field}={source!r} does not exist; set it to an official "
                                ".pt/.pth file, an Orbax params dir or a train workdir.")
    elif ckpt.as_path(source).is_dir():
        raise FileNotFoundError(f"{field}={source!r} is a directory but neither an Orbax params "
                                "dir nor a train workdir (no checkpoints/ inside).")
    else:
        with _staged_in(source) as local:
            return conv.load_checkpoint(local, fcfg), None  # strict key/shape check inside
    # An Orbax tree goes through the official key layout, which names any missing/odd entry.
    try:
        sd = conv.to_state_dict(tree, fcfg)
    except (KeyError, TypeError) as e:
        raise common.CheckpointMismatchError(
            f"The params in {field}={source!r} lack {e} that config.{fam.section} expects; check "
            f"that config.{fam.section} matches the model that was saved.") from e
    common.check_state_dict(sd, conv.expected_shapes(fcfg), what=f"params in {source}")
    return None, sd


class _staged_in:
    """A local copy of a remote file for readers that need a local path (``torch.load``)."""

    def __init__(self, path: str):
        self.path, self._tmp = os.fspath(path), None

    def __enter__(self) -> str:
        if not ckpt.is_remote(self.path):
            return self.path
        self._tmp = tempfile.TemporaryDirectory()
        local = os.path.join(self._tmp.name, os.path.basename(self.path))
        ckpt.as_path(self.path).copy(local)
        return local

    def __exit__(self, *exc):
        if self._tmp is not None:
            self._tmp.cleanup()


def _write_official(sd: dict, dest, wrap: str | None) -> None:
    dest_s = os.fspath(dest)
    if not ckpt.is_remote(dest_s):
        common.save_torch_file(sd, dest_s, wrap=wrap)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(dest_s))
        common.save_torch_file(sd, local, wrap=wrap)
        dest = ckpt.as_path(dest_s)
        dest.parent.mkdir(parents=True, exist_ok=True)
        ckpt.as_path(local).copy(dest, overwrite=True)


def _resolve_wrap(setting: str, fam: Family, fcfg: Any) -> str | None:
    if setting == "auto":  # the converter knows the official layout per size (LlamaGen XXL/3B: bare)
        by_size = getattr(fam.module(), "official_wrap", None)
        return by_size(fcfg) if by_size is not None else fam.wrap
    if setting in ("none", ""):
        return None
    return setting


def _section_dict(config, section: str) -> dict:
    sec = config[section]
    return sec.to_dict() if hasattr(sec, "to_dict") else dict(sec)


def _jobs(config) -> list[tuple[str, str, str]]:
    """``(section, source, config field naming it)`` for everything this run converts."""
    out = []
    model_src = config.convert.source or config.init.reference_checkpoint
    if model_src:
        field = "config.convert.source" if config.convert.source else "config.init.reference_checkpoint"
        out.append(("model", model_src, field))
    if config.convert.tokenizer and config.init.tokenizer_checkpoint:
        out.append(("tokenizer", config.init.tokenizer_checkpoint, "config.init.tokenizer_checkpoint"))
    if not out:
        raise ValueError("The convert job has nothing to convert: set config.init.reference_checkpoint "
                         "(or config.convert.source) and/or config.init.tokenizer_checkpoint.")
    return out


def run(config, workdir: str) -> dict[str, str]:
    """Converts what the config names; returns ``{"model"|"tokenizer": written path}``."""
    direction = config.convert.direction
    if direction not in DIRECTIONS:
        raise ValueError(f"config.convert.direction={direction!r}; choose one of {DIRECTIONS}.")
    out_root = ckpt.as_path(workdir)
    written: dict[str, str] = {}
    for section, source, field in _jobs(config):
        fam = _family(config, section)
        fcfg = fam.build_config(config)
        if direction == "to_orbax":
            dest = out_root / OUTPUT_DIRS[section]
        else:
            dest = out_root / f"{section}{fam.suffix}"
        if dest.exists() and not config.convert.overwrite:
            raise FileExistsError(f"{dest} exists; delete it, pick another --workdir or set "
                                  "config.convert.overwrite=True.")
        logging.info("convert %s: %s -> %s", section, source, dest)
        params, sd = _read(source, fam, fcfg, field)
        if direction == "to_orbax":
            if params is None:
                params = fam.module().from_state_dict(sd, fcfg)
            ckpt.export_params(params, dest, overwrite=bool(config.convert.overwrite), metadata={
                "family": config[section].family, section: _section_dict(config, section),
                "source": os.fspath(source)})
        elif jax.process_index() == 0:
            if sd is None:
                sd = fam.module().to_state_dict(params, fcfg)
            _write_official(sd, dest, _resolve_wrap(config.convert.wrap, fam, fcfg))
        written[section] = os.fspath(dest)
    for section, path in written.items():
        logging.info("convert: wrote %s %s", section, path)
    return written

