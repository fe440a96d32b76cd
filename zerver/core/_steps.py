"""Steps: named, synchronous, pure functions of the request context."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, overload

from ._slots import Slot

if TYPE_CHECKING:
    from ._decisions import Decision
    from ._slots import Context

__all__ = ["Step", "step"]

StepFn = Callable[["Context"], "Decision"]


class Step:
    """A named step with the slots it declares to read and write.

    The declarations are exported as ``zerver.step.reads`` / ``.writes`` so a
    trace shows the data flow between steps.
    """

    __slots__ = ("fn", "name", "reads", "writes")

    def __init__(
        self,
        fn: StepFn,
        *,
        name: str | None = None,
        reads: Iterable[Slot[Any]] = (),
        writes: Iterable[Slot[Any]] = (),
    ) -> None:
        if not callable(fn):
            raise TypeError(f"a step needs a callable, got {fn!r}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", None) or "step"
        self.reads: tuple[str, ...] = tuple(_slot_name(s) for s in reads)
        self.writes: tuple[str, ...] = tuple(_slot_name(s) for s in writes)

    def __call__(self, ctx: Context) -> Decision:
        return self.fn(ctx)

    def __repr__(self) -> str:
        return f"<Step {self.name}>"


def _slot_name(slot: Slot[Any]) -> str:
    if not isinstance(slot, Slot):
        raise TypeError(f"reads/writes take Slot objects, got {slot!r}")
    return slot.name


@overload
def step(fn: StepFn, /) -> Step: ...
@overload
def step(
    *,
    name: str | None = None,
    reads: Iterable[Slot[Any]] = (),
    writes: Iterable[Slot[Any]] = (),
) -> Callable[[StepFn], Step]: ...
def step(
    fn: StepFn | None = None,
    /,
    *,
    name: str | None = None,
    reads: Iterable[Slot[Any]] = (),
    writes: Iterable[Slot[Any]] = (),
) -> Step | Callable[[StepFn], Step]:
    """Make a :class:`Step` from a function: ``@step`` or ``@step(reads=[A], writes=[B])``."""
    if fn is not None:
        return Step(fn)

    def wrap(f: StepFn) -> Step:
        return Step(f, name=name, reads=reads, writes=writes)

    return wrap
