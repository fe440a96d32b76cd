"""Golden traces: normalised span trees compared structurally, with a readable diff.

A trace is normalised into a tree that does not change from run to run:
span ids become symbolic names (``s1``, ``s2``, ... in depth-first order),
times become milliseconds relative to the root's start, attributes are
sorted, and attributes named in ``mask`` are replaced by ``"<masked>"``.
Fixtures are stored as that tree in JSON. On a mismatch the two trees are
rendered as indented text and shown as a unified diff.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from zerver.export._spans import KIND_NAMES, STATUS_NAMES, AttrValue, SpanData, span_tree

__all__ = [
    "GoldenMismatchError",
    "assert_golden",
    "diff_trees",
    "normalise",
    "render_text",
    "update_requested",
]


Tree = dict[str, Any]


class GoldenMismatchError(AssertionError):
    """A trace differs from its golden fixture; the message is a readable diff."""


def _ms(ns: int) -> float:
    return round(ns / 1e6, 6)


def _value(v: AttrValue) -> Any:
    if isinstance(v, (list, tuple)):
        return list(v)
    return v


#: Attributes masked in every trace: a stack trace names files and line numbers.
ALWAYS_MASKED = frozenset({"exception.stacktrace"})


def normalise(spans: Sequence[SpanData], *, mask: Iterable[str] = ()) -> list[Tree]:
    """The spans as stable trees (one per root), ready to compare or store.

    ``exception.stacktrace`` is always masked (:data:`ALWAYS_MASKED`)."""
    masked = ALWAYS_MASKED.union(mask)
    roots, children = span_tree(spans)
    counter = [0]
    trace_names: dict[int, str] = {}

    def order(items: list[SpanData]) -> list[SpanData]:
        return sorted(items, key=lambda s: s.start_ns)  # stable: ties keep input order

    def attrs(a: Mapping[str, AttrValue]) -> dict[str, Any]:
        return {k: ("<masked>" if k in masked else _value(a[k])) for k in sorted(a)}

    def node(s: SpanData, t0: int) -> Tree:
        counter[0] += 1
        tree: Tree = {
            "id": f"s{counter[0]}",
            "name": s.name,
            "kind": KIND_NAMES.get(s.kind, str(s.kind)),
            "start_ms": _ms(s.start_ns - t0),
            "duration_ms": _ms(s.end_ns - s.start_ns),
            "status": STATUS_NAMES.get(s.status_code, str(s.status_code)),
        }
        if s.status_message:
            tree["status_message"] = s.status_message
        tree["attributes"] = attrs(s.attributes)
        if s.events:
            tree["events"] = [
                {"name": name, "at_ms": _ms(time_ns - t0), "attributes": attrs(attributes)}
                for name, time_ns, attributes, _dropped in s.events
            ]
        if s.links:
            tree["links"] = len(s.links)
        kids = children.get(s.span_id)
        if kids:
            tree["children"] = [node(c, t0) for c in order(kids)]
        return tree

    out: list[Tree] = []
    for root in order(roots):
        tname = trace_names.setdefault(root.trace_id, f"t{len(trace_names) + 1}")
        tree = node(root, root.start_ns)
        tree = {"trace": tname, **tree}
        if root.parent_span_id:
            tree["remote_parent"] = True
        out.append(tree)
    return out


def _fmt(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False, sort_keys=True)


def render_text(trees: Sequence[Tree]) -> str:
    """Trees as indented text: one line per span, attribute and event."""
    lines: list[str] = []

    def walk(t: Tree, depth: int) -> None:
        pad = "  " * depth
        status = t["status"] + (f" {t['status_message']!r}" if "status_message" in t else "")
        lines.append(
            f"{pad}{t['kind']} {t['name']}  @{t['start_ms']}ms +{t['duration_ms']}ms  {status}"
        )
        for k, v in t["attributes"].items():
            lines.append(f"{pad}    {k} = {_fmt(v)}")
        for e in t.get("events", ()):
            lines.append(f"{pad}    ! {e['name']} @{e['at_ms']}ms {_fmt(e['attributes'])}")
        for c in t.get("children", ()):
            walk(c, depth + 1)

    for t in trees:
        lines.append(f"trace {t['trace']}")
        walk(t, 1)
    return "\n".join(lines) + "\n"


def diff_trees(expected: Sequence[Tree], actual: Sequence[Tree], name: str = "trace") -> str:
    """A unified diff of the two trees' text renderings ('' when equal)."""
    if list(expected) == list(actual):
        return ""
    return "".join(
        difflib.unified_diff(
            render_text(expected).splitlines(keepends=True),
            render_text(actual).splitlines(keepends=True),
            fromfile=f"{name} (golden)",
            tofile=f"{name} (actual)",
        )
    )


def update_requested() -> bool:
    """Whether ``ZERVER_GOLDEN_UPDATE=1`` asks to re-record fixtures."""
    return os.environ.get("ZERVER_GOLDEN_UPDATE", "") in ("1", "true", "yes")


def assert_golden(
    spans: Sequence[SpanData],
    path: str | os.PathLike[str],
    *,
    mask: Iterable[str] = (),
    update: bool | None = None,
) -> None:
    """Compare ``spans`` with the fixture at ``path``; re-record it when ``update``.

    ``update=None`` follows :func:`update_requested`. A missing fixture is a
    mismatch unless updating. Raises :class:`GoldenMismatchError` with a diff.
    """
    p = Path(path)
    actual = normalise(spans, mask=mask)
    if update is None:
        update = update_requested()
    if update:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(actual, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return
    if not p.exists():
        raise GoldenMismatchError(
            f"no golden fixture at {p}; record it with ZERVER_GOLDEN_UPDATE=1 "
            "(or `zerver golden update`)"
        )
    expected = json.loads(p.read_text(encoding="utf-8"))
    diff = diff_trees(expected, actual, p.name)
    if diff:
        raise GoldenMismatchError(f"trace differs from golden fixture {p}:\n{diff}")
