"""The errors zerver raises.

Two families, kept apart as h11 and anyio do: :class:`UsageError` says the
caller misused the API (a bug in the application), while :class:`PeerError`
says a peer misbehaved and carries the HTTP status the server answers with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._effects import Effect

__all__ = [
    "ConfigError",
    "EffectError",
    "MissingSlotError",
    "PeerError",
    "QueueFullError",
    "UnsupportedEffectError",
    "UsageError",
    "ZerverError",
]


class ZerverError(Exception):
    """Base class of every error zerver raises on purpose."""


class UsageError(ZerverError):
    """The application used zerver's API wrongly (a bug in the caller)."""


class MissingSlotError(UsageError):
    """A step required a slot that no earlier step or effect wrote."""

    def __init__(self, slot: str, step: str | None = None) -> None:
        where = f" in step {step!r}" if step else ""
        super().__init__(f"required slot {slot!r} has no value{where}")
        self.slot = slot
        self.step = step


class ConfigError(ZerverError):
    """A configuration value is invalid; the message names the variable."""


class PeerError(ZerverError):
    """A peer sent something zerver refuses; ``status_hint`` is the answer."""

    def __init__(self, message: str, *, status_hint: int = 400) -> None:
        super().__init__(message)
        self.status_hint = status_hint


class EffectError(ZerverError):
    """An effect failed. ``kind`` is a short machine-readable reason.

    ``status_hint`` is the HTTP status a failed *required* effect maps to
    (timeouts 504, a full queue 429, an upstream failure 502, else 500) and
    ``retryable`` tells the retry policy whether another attempt may help.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str = "effect_error",
        status_hint: int = 500,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status_hint = status_hint
        self.retryable = retryable


class QueueFullError(EffectError):
    """A job queue was at capacity; the job was refused, never parked."""

    def __init__(self, queue: str, capacity: int) -> None:
        super().__init__(
            f"queue {queue!r} is full (capacity {capacity})",
            kind="queue_full",
            status_hint=429,
            retryable=False,
        )
        self.queue = queue
        self.capacity = capacity


class UnsupportedEffectError(EffectError):
    """An interpreter was given an effect it does not perform (a wiring bug: 500)."""

    def __init__(self, interpreter: str, effect: Effect) -> None:
        super().__init__(
            f"{interpreter} cannot perform {type(effect).__name__} (system {effect.system!r})",
            kind="unsupported_effect",
            status_hint=500,
        )
        self.effect = effect
