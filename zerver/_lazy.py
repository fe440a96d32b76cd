"""Public names imported on first use (PEP 562), so ``import zerver`` costs almost nothing.

A public package lists each of its names with the private module that defines
it and calls :func:`install`. ``zerver.App`` (or ``from zerver import App``)
then imports ``zerver._app`` the first time the name is used and keeps the
object in the package's namespace, so later uses are plain attribute reads.
Public classes and functions report their public home, as anyio's do:
``zerver.App.__module__ == "zerver"``, ``zerver.export.ExportPipeline.__module__
== "zerver.export"``. The table is the one declaration of that home: when a
defining module is executed (by whatever import comes first, a private one
included), its public objects are renamed before anyone else sees them, so the
answer does not depend on the order of imports. A name two packages list
belongs to the package installed first (``zerver`` before its subpackages).
The price is the one anyio pays: tools that find source through
``__module__`` (``inspect.getsource`` of a class) look in the package's
``__init__``.

Rules this module keeps:

* ``dir(package)`` lists every public name, loaded or not.
* ``vars(package)`` (``package.__dict__``) imports every name still missing
  before it answers, so code that walks a namespace sees what an eagerly
  importing package would show.
* An unknown name raises the ``AttributeError`` Python itself would.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

__all__ = ["install"]

# The namespace descriptor of every module; the subclass below answers ``__dict__``
# itself, so it reads the real one through this.
_namespace: Any = vars(ModuleType)["__dict__"]

# Package name → {public name: module that defines it, relative to the package}.
_TABLES: dict[str, Mapping[str, str]] = {}

# Defining module (absolute) → {public name: its public package}, first claim wins.
_HOMES: dict[str, dict[str, str]] = {}


def _claim(module: ModuleType, homes: Mapping[str, str]) -> None:
    """Give the public classes and functions ``module`` defines their public home."""
    defined_in = module.__name__
    for name, package in homes.items():
        obj = module.__dict__.get(name)
        if (
            (isinstance(obj, type) or (callable(obj) and hasattr(obj, "__code__")))
            and getattr(obj, "__module__", None) == defined_in
            and obj.__name__ == name
        ):
            obj.__module__ = package


class _ClaimingLoader(importlib.abc.Loader):
    """The defining module's own loader, plus :func:`_claim` once it has run."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        _claim(module, _HOMES.get(module.__name__, {}))

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, ...
        return getattr(self._inner, name)


class _ClaimingFinder(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path``: finds nothing itself; for a defining module it asks
    the finders after it and wraps the loader they give."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _HOMES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ClaimingLoader(spec.loader)
                return spec
        return None


_FINDER = _ClaimingFinder()


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
    package: str, names: Mapping[str, str], moved: Mapping[str, str] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Make ``names`` (public name → defining module, e.g. ``{"App": "._app"}``) of
    ``package`` load on first use; returns the package's ``__getattr__`` and ``__dir__``.

    ``moved`` (old public name → the package that exports it now) keeps names that
    left this package working for a while: each use warns (``DeprecationWarning``,
    naming the new import) and answers the new home's object. They are not listed by
    ``dir`` and not loaded by ``vars``."""
    moved = dict(moved or {})
    module = sys.modules[package]
    ns: dict[str, Any] = _namespace.__get__(module, type(module))
    _TABLES[package] = names
    for name, source in names.items():
        defined_in = importlib.util.resolve_name(source, package)
        _HOMES.setdefault(defined_in, {}).setdefault(name, package)
        if defined_in in sys.modules:  # already run: claim now
            _claim(sys.modules[defined_in], {name: _HOMES[defined_in][name]})
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)

    def getattr_(name: str) -> Any:
        source = names.get(name)
        if source is None:
            if name in moved:
                warnings.warn(
                    f"{package}.{name} moved: import it from {moved[name]} "
                    f"(from {moved[name]} import {name})",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return getattr(importlib.import_module(moved[name]), name)
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(source, package), name)
        ns[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(set(ns) | set(names))

    module.__class__ = _LazyPackage
    return getattr_, dir_
