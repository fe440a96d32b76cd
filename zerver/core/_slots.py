"""Typed per-request slots and the context steps read and write them through."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, overload

from ._errors import MissingSlotError

if TYPE_CHECKING:
    from ._http import Request
    from ._message import Message

__all__ = ["Context", "RequestFacts", "Slot"]

T = TypeVar("T")
D = TypeVar("D")

_MISSING: Any = object()


class Slot(Generic[T]):
    """A named, typed place for one per-request value.

    Slots are declared once at import time (``POST = Slot[dict]("post")``)
    and used as keys: ``ctx.put(POST, row)``, ``ctx.require(POST)``.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        if not name or not name.replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"slot name must be a non-empty identifier, got {name!r}")
        self.name = name

    def __repr__(self) -> str:
        return f"Slot({self.name!r})"


def value_size(value: object) -> int:
    """A cheap size estimate in bytes for ``zerver.slot.write``."""
    if isinstance(value, bytes | bytearray | str):
        return len(value)
    return sys.getsizeof(value)


class RequestFacts(Protocol):
    """What a step's context needs of its request's record: the baggage it carried
    and a place to note slot writes. The runtime's request record is one; the
    model does not need to know more of it."""

    @property
    def baggage(self) -> Mapping[str, str] | None: ...

    def slot_written(self, slot: str, size_bytes: int) -> None: ...


class Context:
    """What a step sees: the request, its path parameters and the slots.

    The context is per request and only touched from the event loop, so it
    needs no lock. Every write is recorded as a ``zerver.slot.write`` event.
    """

    __slots__ = ("_values", "message", "params", "record", "request", "step_name")

    def __init__(
        self,
        request: Request,
        params: Mapping[str, str],
        record: RequestFacts,
        message: Message | None = None,
    ) -> None:
        self.request = request
        self.params = params
        self.record = record
        #: The message being consumed (consumers only; ``None`` for HTTP requests).
        self.message = message
        self.step_name: str | None = None
        self._values: dict[str, object] = {}

    @property
    def baggage(self) -> Mapping[str, str]:
        """W3C baggage the request carried (forwarded on outbound HTTP effects)."""
        return self.record.baggage or {}

    def require(self, slot: Slot[T]) -> T:
        """The slot's value; raises :class:`MissingSlotError` when it was never written."""
        value = self._values.get(slot.name, _MISSING)
        if value is _MISSING:
            raise MissingSlotError(slot.name, self.step_name)
        return value  # type: ignore[return-value]

    @overload
    def optional(self, slot: Slot[T]) -> T | None: ...
    @overload
    def optional(self, slot: Slot[T], default: D) -> T | D: ...
    def optional(self, slot: Slot[T], default: object = None) -> object:
        """The slot's value, or ``default`` when it was never written."""
        return self._values.get(slot.name, default)

    def has(self, slot: Slot[Any]) -> bool:
        """Whether the slot has been written."""
        return slot.name in self._values

    def put(self, slot: Slot[T], value: T) -> None:
        """Write the slot (recorded as ``zerver.slot.write``)."""
        self._values[slot.name] = value
        self.record.slot_written(slot.name, value_size(value))

    def put_raw(self, name: str, value: object) -> None:
        """Write a slot by name (used by the runtime for effect results)."""
        self._values[name] = value
        self.record.slot_written(name, value_size(value))
