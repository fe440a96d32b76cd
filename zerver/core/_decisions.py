"""What a step returns: the next move of the pipeline.

* :data:`Continue` — go on with the next step.
* :class:`Done` — answer with a response now.
* :class:`Fail` — answer with an error status (an application outcome, not a fault).
* :class:`Need` — perform effects, join them, then run ``then`` (or continue).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Final, Literal

from ._effects import Effect
from ._http import Response

if TYPE_CHECKING:
    from ._steps import Step

__all__ = ["Continue", "Decision", "Done", "Fail", "Join", "Mode", "Need"]


class Mode(enum.Enum):
    """How a ``Need``'s effects are started."""

    SEQUENTIAL = "sequential"
    """One after another, each started when the previous one finished."""
    PARALLEL = "parallel"
    """All at once."""


class Join(enum.Enum):
    """When a ``Need`` is resolved and whether it failed (see docs/concepts.md)."""

    ALL = "all"
    ALL_REQUIRED = "all_required"
    ANY = "any"
    FIRST_SUCCESS = "first_success"


#: What a step decided, as its step record and span name it.
DecisionKind = Literal["Continue", "Done", "Fail", "Need"]


class _Continue:
    __slots__ = ()
    kind: ClassVar[DecisionKind] = "Continue"

    def __repr__(self) -> str:
        return "Continue"


Continue: Final = _Continue()
"""Go on with the next step."""


@dataclass(frozen=True, slots=True)
class Done:
    """Answer the request with ``response``."""

    response: Response
    kind: ClassVar[DecisionKind] = "Done"


@dataclass(frozen=True, slots=True)
class Fail:
    """Answer with ``status`` and a JSON error body ``{"error": what, "key": key}``.

    ``what`` says what went wrong for the client; ``key`` names the offending
    input (a field, an id) when there is one.
    """

    status: int
    what: str = ""
    key: str | None = None
    kind: ClassVar[DecisionKind] = "Fail"

    def __post_init__(self) -> None:
        if not 400 <= self.status <= 599:
            raise ValueError(f"Fail status must be 400..599, got {self.status}")


@dataclass(frozen=True, slots=True, init=False)
class Need:
    """Perform ``effects`` (``mode``), wait per ``join``, then run ``then``.

    With ``then`` the continuation step's decision replaces this step's; with
    ``then=None`` the pipeline continues with the next step.
    """

    effects: tuple[Effect, ...]
    mode: Mode
    join: Join
    then: Step | None
    kind: ClassVar[DecisionKind] = "Need"

    def __init__(
        self,
        effects: Sequence[Effect] | Effect,
        *,
        mode: Mode = Mode.PARALLEL,
        join: Join = Join.ALL,
        then: Step | None = None,
    ) -> None:
        effs = (effects,) if isinstance(effects, Effect) else tuple(effects)
        if not effs:
            raise ValueError("Need requires at least one effect")
        for e in effs:
            if not isinstance(e, Effect):
                raise TypeError(f"Need effects must be Effect instances, got {e!r}")
        object.__setattr__(self, "effects", effs)
        object.__setattr__(self, "mode", Mode(mode))
        object.__setattr__(self, "join", Join(join))
        object.__setattr__(self, "then", then)


Decision = _Continue | Done | Fail | Need
