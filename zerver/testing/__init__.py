"""Helpers for testing zerver apps (as structlog ships ``capture_logs``)."""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from zerver._lazy import install as _install

if _TYPE_CHECKING:
    from zerver.export._sinks import InMemorySpanSink as InMemorySpanSink

    from ._client import AppClient as AppClient
    from ._client import FakeInterpreter as FakeInterpreter
    from ._client import FakeRule as FakeRule
    from ._client import RecordCapture as RecordCapture
    from ._client import capture_logs as capture_logs
    from ._client import running as running
    from ._golden import GoldenMismatchError as GoldenMismatchError
    from ._golden import assert_golden as assert_golden
    from ._golden import diff_trees as diff_trees
    from ._golden import normalise as normalise
    from ._golden import render_text as render_text
    from ._golden import update_requested as update_requested
    from ._scenarios import Scenario as Scenario
    from ._scenarios import check_scenarios as check_scenarios
    from ._scenarios import trace_requests as trace_requests

__all__ = [
    "AppClient",
    "FakeInterpreter",
    "FakeRule",
    "GoldenMismatchError",
    "InMemorySpanSink",
    "RecordCapture",
    "Scenario",
    "assert_golden",
    "capture_logs",
    "check_scenarios",
    "diff_trees",
    "normalise",
    "render_text",
    "running",
    "trace_requests",
    "update_requested",
]

# Imported on first use (see ``zerver._lazy``).
_LAZY = {
    "AppClient": "._client",
    "FakeInterpreter": "._client",
    "FakeRule": "._client",
    "GoldenMismatchError": "._golden",
    "InMemorySpanSink": "zerver.export._sinks",
    "RecordCapture": "._client",
    "Scenario": "._scenarios",
    "assert_golden": "._golden",
    "capture_logs": "._client",
    "check_scenarios": "._scenarios",
    "diff_trees": "._golden",
    "normalise": "._golden",
    "render_text": "._golden",
    "running": "._client",
    "trace_requests": "._scenarios",
    "update_requested": "._golden",
}

if not _TYPE_CHECKING:
    __getattr__, __dir__ = _install(__name__, _LAZY)
