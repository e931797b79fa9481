"""Every fixture in CCA_FIXTURES_DIR must be handled by some parity test: an unknown kind fails."""

import importlib
import pathlib

import pytest

import fixture_harness


def _import_all_test_modules():
    for path in sorted(pathlib.Path(__file__).parent.glob("test_*.py")):
        if path.stem != pathlib.Path(__file__).stem:
            importlib.import_module(path.stem)


@pytest.mark.parity
@pytest.mark.parametrize("fx", [pytest.param(f, id=f"{f.kind}:{f.name}")
                                for f in fixture_harness.all_fixtures()])
def test_fixture_kind_is_handled(fx):
    _import_all_test_modules()
    assert fx.kind in fixture_harness.HANDLED_KINDS, (
        f"Fixture {fx.path} has kind {fx.kind!r}, which no parity test handles "
        f"(handled: {sorted(fixture_harness.HANDLED_KINDS)}).")
