"""Data-driven access to the golden fixtures of the official implementations.

Every ``NAME.json`` + ``NAME.npz`` pair in ``$CCA_FIXTURES_DIR`` (default ``../shared/fixtures``
next to the repository) is one fixture; its json ``fixture`` field names its kind. Test modules
parametrise over the kinds they handle with :func:`fixture_params` (test ids read
``<kind>:<file stem>`` so ``-k llamagen`` selects them); ``test_fixture_kinds.py`` fails for
any fixture whose kind no test module handles.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
HANDLED_KINDS: set[str] = set()


def fixtures_dir() -> pathlib.Path:
    default = REPO_ROOT.parent / "shared" / "fixtures"
    path = pathlib.Path(os.environ.get("CCA_FIXTURES_DIR", default))
    if not path.is_dir():
        raise FileNotFoundError(
            f"Fixture directory {path} does not exist; set CCA_FIXTURES_DIR to a directory of "
            "official golden fixtures (NAME.json + NAME.npz).")
    return path


@dataclasses.dataclass(frozen=True)
class Fixture:
    name: str
    kind: str
    meta: dict[str, Any]
    path: pathlib.Path

    @functools.cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        with np.load(self.path.with_suffix(".npz"), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def state_dict(self, prefix: str = "sd/") -> dict[str, np.ndarray]:
        """Official state dict stored under ``prefix`` (``sd/``, ``ref_sd/``, ``vae_sd/``)."""
        return {k[len(prefix):]: v for k, v in self.arrays.items() if k.startswith(prefix)}

    def group(self, prefix: str) -> dict[str, np.ndarray]:
        """All arrays under ``prefix`` with the prefix removed."""
        return {k[len(prefix):]: v for k, v in self.arrays.items() if k.startswith(prefix)}


@functools.lru_cache(maxsize=None)
def all_fixtures() -> tuple[Fixture, ...]:
    out = []
    for js in sorted(fixtures_dir().glob("*.json")):
        if not js.with_suffix(".npz").exists():
            continue
        meta = json.loads(js.read_text())
        kind = meta.get("fixture")
        if not kind:
            raise ValueError(f"{js}: no 'fixture' field naming the fixture kind.")
        out.append(Fixture(name=js.stem, kind=kind, meta=meta, path=js))
    return tuple(out)


def fixture_params(*kinds: str) -> list:
    """``pytest.param``s for every fixture of ``kinds``; registers the kinds as handled."""
    HANDLED_KINDS.update(kinds)
    return [pytest.param(f, id=f"{f.kind}:{f.name}") for f in all_fixtures() if f.kind in kinds]
