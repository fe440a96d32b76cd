"""Span sinks for development and tests: an in-memory collector and a console writer.

The OTLP exporter (``zerver.export``) is the production sink.
"""

from __future__ import annotations

import sys
from collections import deque
from typing import TextIO

from ._spans import KIND_NAMES, STATUS_NAMES, SpanData, StatusCode, span_tree

__all__ = ["ConsoleSpanSink", "InMemorySpanSink"]


class InMemorySpanSink:
    """Keeps the most recent ``maxlen`` spans; older ones are dropped and counted."""

    def __init__(self, maxlen: int = 100_000) -> None:
        self.spans: deque[SpanData] = deque(maxlen=maxlen)
        self.traces: deque[list[SpanData]] = deque(maxlen=maxlen)
        self.dropped = 0

    def export(self, spans: list[SpanData]) -> None:
        overflow = len(self.spans) + len(spans) - (self.spans.maxlen or 0)
        if overflow > 0:
            self.dropped += overflow
        self.spans.extend(spans)
        self.traces.append(spans)

    def by_name(self, name: str) -> list[SpanData]:
        """Every kept span called ``name``."""
        return [s for s in self.spans if s.name == name]

    def clear(self) -> None:
        self.spans.clear()
        self.traces.clear()


def format_tree(spans: list[SpanData]) -> str:
    """A trace as an indented tree with durations, for humans."""
    roots, children = span_tree(spans)
    lines: list[str] = []

    def walk(span: SpanData, depth: int) -> None:
        ms = (span.end_ns - span.start_ns) / 1e6
        code = span.status_code
        status = STATUS_NAMES.get(code, "") if code != StatusCode.UNSET else ""
        lines.append(
            f"{'  ' * depth}{KIND_NAMES.get(span.kind, '?'):<8} {span.name}  "
            f"{ms:.3f} ms{' ' + status if status else ''}"
        )
        for child in sorted(children.get(span.span_id, ()), key=lambda c: c.start_ns):
            walk(child, depth + 1)

    for r in roots:
        lines.append(f"trace {r.trace_id:032x}")
        walk(r, 0)
    return "\n".join(lines)


class ConsoleSpanSink:
    """Writes each trace as an indented tree (development only: this is I/O)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr

    def export(self, spans: list[SpanData]) -> None:
        self.stream.write(format_tree(spans) + "\n")
