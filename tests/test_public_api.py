"""The public surface: ``__all__`` lists exactly what each public module exports."""

from __future__ import annotations

import importlib
import types

import pytest

PUBLIC = ["zerver", "zerver.testing", "zerver.demo"]


@pytest.mark.parametrize("name", PUBLIC)
def test_all_matches_public_names(name: str) -> None:
    mod = importlib.import_module(name)
    declared = set(mod.__all__)
    public = {
        n
        for n, v in vars(mod).items()
        if not n.startswith("_") and not isinstance(v, types.ModuleType)
    }
    assert declared - {"__version__"} == public
    for n in declared:
        assert getattr(mod, n) is not None


def test_version() -> None:
    import zerver

    assert zerver.__version__ == "0.1.0"
