"""The wheel ships every subpackage: pyproject.toml lists packages explicitly."""

from __future__ import annotations

import pytest

from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "fedtorch").rglob("__init__.py")
        if "configs" not in init.parent.relative_to(REPO).parts
    }
    assert found <= listed, f"missing from pyproject.toml packages: {sorted(found - listed)}"
