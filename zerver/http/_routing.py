"""Route templates (``/blogs/posts/{id}``) and matching.

The template, never the raw path, is what spans and metrics use as
``http.route``, so cardinality stays bounded. Static templates are found
with one dict look-up; templates with parameters are grouped by segment
count and compared segment by segment.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import unquote

from zerver.core._errors import UsageError
from zerver.core._steps import Step

__all__ = ["Route", "Router"]

_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_METHOD = re.compile(r"^[A-Z]+$")


class Route:
    """A method + template bound to its steps (``before`` steps run first)."""

    __slots__ = ("before", "method", "steps", "template")

    def __init__(
        self, method: str, template: str, steps: Sequence[Step], before: Sequence[Step] = ()
    ) -> None:
        self.method = method
        self.template = template
        self.steps = tuple(steps)
        self.before = tuple(before)

    def __repr__(self) -> str:
        return f"<Route {self.method} {self.template}>"


class _Template:
    __slots__ = ("methods", "names", "segments", "template")

    def __init__(self, template: str, segments: tuple[str | None, ...], names: tuple[str, ...]):
        self.template = template
        self.segments = segments  # literal text, or None for a parameter
        self.names = names
        self.methods: dict[str, Route] = {}

    def allowed(self) -> list[str]:
        methods = set(self.methods)
        if "GET" in methods:
            methods.add("HEAD")
        return sorted(methods)


def _parse(template: str) -> tuple[tuple[str | None, ...], tuple[str, ...]]:
    if not template.startswith("/"):
        raise UsageError(f"route template must start with '/', got {template!r}")
    segments: list[str | None] = []
    names: list[str] = []
    for part in template.split("/")[1:]:
        m = _PARAM.match(part)
        if m:
            name = m.group(1)
            if name in names:
                raise UsageError(f"parameter {{{name}}} appears twice in {template!r}")
            names.append(name)
            segments.append(None)
        elif "{" in part or "}" in part:
            raise UsageError(
                f"bad segment {part!r} in route template {template!r}: "
                "a parameter must be a whole segment like {id}"
            )
        else:
            segments.append(part)
    return tuple(segments), tuple(names)


class Match:
    """A successful match: the route and its decoded path parameters."""

    __slots__ = ("params", "route")

    def __init__(self, route: Route, params: dict[str, str]) -> None:
        self.route = route
        self.params = params


class NotAllowed:
    """The path matched a template but not the method; ``allow`` lists methods."""

    __slots__ = ("allow", "template")

    def __init__(self, template: str, allow: list[str]) -> None:
        self.template = template
        self.allow = allow


class Router:
    """Holds routes and matches ``(method, path)`` against them."""

    __slots__ = ("_dynamic", "_static", "_templates")

    def __init__(self) -> None:
        self._templates: dict[str, _Template] = {}
        self._static: dict[str, _Template] = {}
        self._dynamic: dict[int, list[_Template]] = {}

    def add(self, route: Route) -> None:
        if not _METHOD.match(route.method):
            raise UsageError(f"HTTP method must be upper-case letters, got {route.method!r}")
        tpl = self._templates.get(route.template)
        if tpl is None:
            segments, names = _parse(route.template)
            for other in self._dynamic.get(len(segments), ()):
                if other.segments == segments:
                    raise UsageError(
                        f"route {route.template!r} has the same shape as {other.template!r}"
                    )
            tpl = _Template(route.template, segments, names)
            self._templates[route.template] = tpl
            if names:
                self._dynamic.setdefault(len(segments), []).append(tpl)
            else:
                self._static[route.template] = tpl
        if route.method in tpl.methods:
            raise UsageError(f"route {route.method} {route.template} is defined twice")
        tpl.methods[route.method] = route

    @property
    def routes(self) -> list[Route]:
        return [r for t in self._templates.values() for r in t.methods.values()]

    def _find(self, path: str) -> tuple[_Template, dict[str, str]] | None:
        tpl = self._static.get(path)
        if tpl is not None:
            return tpl, {}
        parts = path.split("/")[1:]
        for cand in self._dynamic.get(len(parts), ()):
            params: dict[str, str] = {}
            names = iter(cand.names)
            for seg, part in zip(cand.segments, parts, strict=True):
                if seg is None:
                    if not part:
                        break
                    params[next(names)] = unquote(part) if "%" in part else part
                elif seg != part:
                    break
            else:
                return cand, params
        return None

    def match(self, method: str, path: str) -> Match | NotAllowed | None:
        """The route for the request, :class:`NotAllowed`, or ``None`` (404)."""
        found = self._find(path)
        if found is None:
            return None
        tpl, params = found
        route = tpl.methods.get(method)
        if route is None and method == "HEAD":
            route = tpl.methods.get("GET")
        if route is None:
            return NotAllowed(tpl.template, tpl.allowed())
        return Match(route, params)
