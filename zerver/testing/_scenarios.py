"""Golden-trace scenarios: named, deterministic runs that produce spans."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from zerver._app import App
from zerver.export._sinks import InMemorySpanSink
from zerver.export._spans import SpanData

from ._client import AppClient
from ._golden import GoldenMismatchError, assert_golden

__all__ = ["Scenario", "check_scenarios", "trace_requests"]


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """A named run: ``run()`` returns the spans to compare with ``<dir>/<name>.json``."""

    name: str
    run: Callable[[], Awaitable[list[SpanData]]]
    description: str = ""
    mask: Sequence[str] = field(default_factory=tuple)


async def trace_requests(
    app: App,
    requests: Iterable[tuple[str, str]],
    *,
    headers: Sequence[tuple[str, str]] = (("user-agent", "zerver-golden/1"),),
    body: bytes = b"",
) -> list[SpanData]:
    """Run ``app``, send each ``(method, target)`` and return the last request's spans.

    Earlier requests warm caches and rolling statistics; only the spans of
    the last one are returned.
    """
    sink = InMemorySpanSink()
    app.trace_to(sink)
    async with AppClient(app) as client:
        for method, target in requests:
            await client.request(method, target, headers=headers, body=body)
    if not sink.traces:
        return []
    return list(sink.traces[-1])


def check_scenarios(
    scenarios: Iterable[Scenario], directory: str | Path, *, update: bool = False
) -> list[tuple[str, str]]:
    """Run every scenario against its fixture; returns ``(name, problem)`` for each failure."""
    failures: list[tuple[str, str]] = []
    for sc in scenarios:
        spans = anyio.run(sc.run)
        try:
            assert_golden(spans, Path(directory) / f"{sc.name}.json", mask=sc.mask, update=update)
        except GoldenMismatchError as exc:
            failures.append((sc.name, str(exc)))
    return failures
