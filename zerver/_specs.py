"""The settings' values that the runtime reads, and their parsers: rolling windows and
sampler specs.

Kept apart from :mod:`zerver._config` so that the trace engine and the samplers
can use them without loading pydantic, which only reading the settings needs.
Plain frozen dataclasses and functions that raise ``ValueError`` saying what is
accepted; :mod:`zerver._config` turns those into one-line ``ConfigError``s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "OTEL_SAMPLERS",
    "TAIL_TRIGGERS",
    "SamplerSpec",
    "Window",
    "otel_sampler_spec",
    "parse_ratio",
    "parse_sampler",
    "parse_window",
]


@dataclass(frozen=True, slots=True)
class Window:
    """A rolling window: the last ``count`` samples, or those of the last ``seconds``.

    A time window still keeps at most ``max_samples`` samples, so it is bounded.
    """

    count: int | None = None
    seconds: float | None = None
    max_samples: int = 4096


_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")


def parse_window(text: str) -> Window:
    """``60s``, ``500ms``, ``5m`` (a time window) or ``1000`` (the last N samples)."""
    m = _WINDOW.match(text)
    if m is None:
        raise ValueError("accepted: a sample count like 1000, or a duration like 60s, 500ms, 5m")
    number, unit = m.group(1), m.group(2)
    if unit is None:
        if "." in number or not 1 <= int(number) <= 1_000_000:
            raise ValueError("accepted: a sample count from 1 to 1000000, or a duration like 60s")
        return Window(count=int(number))
    seconds = float(number) * {"ms": 0.001, "s": 1.0, "m": 60.0}[unit]
    if seconds <= 0:
        raise ValueError("accepted: a duration greater than zero")
    return Window(seconds=seconds)


TAIL_TRIGGERS = ("error", "p95", "p99", "required_failure", "slow_queue", "latency:<ms>")

#: The standard ``OTEL_TRACES_SAMPLER`` values zerver honours.
OTEL_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


@dataclass(frozen=True, slots=True)
class SamplerSpec:
    """``head:<ratio>[,tail:<trigger>|<trigger>...]`` parsed.

    ``head_ratio`` is the share of new traces (no valid incoming parent) that
    are sampled; with ``parent_based`` an incoming parent's sampled flag
    decides instead, without it the ratio applies to every trace.
    ``tail`` holds the triggers in the order given; a fixed latency bar is
    normalised to ``latency:<ms>`` (``latency:250``).
    """

    head_ratio: float = 1.0
    tail: tuple[str, ...] = ()
    parent_based: bool = True


def parse_ratio(text: str) -> float:
    """A sampling ratio from 0 to 1; raises ``ValueError`` saying what is accepted."""
    try:
        ratio = float(text)
    except ValueError:
        raise ValueError("accepted: a number from 0 to 1") from None
    if not 0.0 <= ratio <= 1.0:  # also refuses nan
        raise ValueError("accepted: a number from 0 to 1")
    return ratio


def otel_sampler_spec(name: str, arg: str | None) -> SamplerSpec:
    """The spec for a standard ``OTEL_TRACES_SAMPLER`` name and its argument.

    As in the OpenTelemetry SDK the argument is read only by the
    ``traceidratio`` samplers, and an unset one means 1.0.
    """
    ratio = {"always_on": 1.0, "always_off": 0.0}.get(name.removeprefix("parentbased_"))
    if ratio is None:
        ratio = parse_ratio(arg) if arg is not None else 1.0
    return SamplerSpec(head_ratio=ratio, parent_based=name.startswith("parentbased_"))


_LATENCY = re.compile(r"^latency:(\d+(?:\.\d+)?)$")


def _tail_trigger(text: str) -> str | None:
    """A tail trigger in its normal form, or ``None`` when it is not one."""
    if text in TAIL_TRIGGERS and text != "latency:<ms>":
        return text
    m = _LATENCY.match(text)
    if m is None:
        return None
    ms = float(m.group(1))
    if ms <= 0:
        return None
    return "latency:" + repr(ms).removesuffix(".0")


def parse_sampler(text: str) -> SamplerSpec:
    """Parse ``head:0.05,tail:error|p99``; raises ``ValueError`` saying what is accepted."""
    grammar = (
        "accepted: head:<ratio 0..1>[,tail:<trigger>|...] with triggers "
        + ", ".join(TAIL_TRIGGERS)
        + " (each at most once)"
    )
    parts = [p.strip() for p in text.split(",")]
    if not parts or not parts[0].startswith("head:") or len(parts) > 2:
        raise ValueError(grammar)
    try:
        ratio = parse_ratio(parts[0].removeprefix("head:").strip())
    except ValueError:
        raise ValueError(grammar) from None
    tail: tuple[str, ...] = ()
    if len(parts) == 2:
        if not parts[1].startswith("tail:"):
            raise ValueError(grammar)
        triggers = [_tail_trigger(t.strip()) for t in parts[1].removeprefix("tail:").split("|")]
        kinds = [t.partition(":")[0] for t in triggers if t is not None]
        if None in triggers or len(set(kinds)) != len(kinds):
            raise ValueError(grammar)
        tail = tuple(t for t in triggers if t is not None)
    return SamplerSpec(head_ratio=ratio, tail=tail)
