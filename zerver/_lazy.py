"""Public names imported on first use (PEP 562), so ``import zerver`` costs almost nothing.

A public package lists each of its names with the private module that defines
it and calls :func:`install`. ``zerver.App`` (or ``from zerver import App``)
then imports ``zerver._app`` the first time the name is used and keeps the
object in the package's namespace, so later uses are plain attribute reads.
The objects themselves are unchanged (``zerver.App.__module__`` is still
``"zerver._app"``).

Rules this module keeps:

* ``dir(package)`` lists every public name, loaded or not.
* ``vars(package)`` (``package.__dict__``) imports every name still missing
  before it answers, so code that walks a namespace sees what an eagerly
  importing package would show.
* An unknown name raises the ``AttributeError`` Python itself would.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

__all__ = ["install"]

# The namespace descriptor of every module; the subclass below answers ``__dict__``
# itself, so it reads the real one through this.
_namespace: Any = vars(ModuleType)["__dict__"]

# Package name → {public name: module that defines it, relative to the package}.
_TABLES: dict[str, Mapping[str, str]] = {}


class _LazyPackage(ModuleType):
    """A package whose ``__dict__`` loads its lazy names before answering."""

    @property
    def __dict__(self) -> dict[str, Any]:  # type: ignore[override]
        ns: dict[str, Any] = _namespace.__get__(self, type(self))
        for name in _TABLES.get(self.__name__, {}):
            if name not in ns:
                getattr(self, name)
        return ns


def install(
    package: str, names: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Make ``names`` (public name → defining module, e.g. ``{"App": "._app"}``) of
    ``package`` load on first use; returns the package's ``__getattr__`` and ``__dir__``."""
    module = sys.modules[package]
    ns: dict[str, Any] = _namespace.__get__(module, type(module))
    _TABLES[package] = names

    def getattr_(name: str) -> Any:
        source = names.get(name)
        if source is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(source, package), name)
        ns[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(set(ns) | set(names))

    module.__class__ = _LazyPackage
    return getattr_, dir_
