"""Helpers for testing zerver apps (as structlog ships ``capture_logs``)."""

from .._sinks import InMemorySpanSink
from ._client import (
    AppClient,
    FakeInterpreter,
    FakeRule,
    RecordCapture,
    capture_logs,
    running,
)
from ._golden import (
    GoldenMismatchError,
    assert_golden,
    diff_trees,
    normalise,
    render_text,
    update_requested,
)
from ._scenarios import Scenario, check_scenarios, trace_requests

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
