"""Helpers for testing zerver apps (as structlog ships ``capture_logs``)."""

from ._client import AppClient, FakeInterpreter, FakeRule, RecordCapture, running

__all__ = ["AppClient", "FakeInterpreter", "FakeRule", "RecordCapture", "running"]
