"""The exporter-path benchmark runs every part on a few records (no timing judged)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from loadtest.bench_exporter import PARTS, main, prepare


@pytest.fixture
def gc_restored() -> Iterator[None]:
    """The bench sets the collector up as the exporter process does; undo that."""
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


@pytest.mark.usefixtures("gc_restored")
def test_every_part_runs(capsys: pytest.CaptureFixture[str]) -> None:
    parts = prepare(20)
    assert set(parts) == set(PARTS)
    assert main(["--n", "20", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    # The table's rows, in order (the demo app's own log lines, such as its
    # consumer's counters at shutdown, may come between them).
    rows = [line.split()[0] for line in out.splitlines() if "µs / record" in line]
    assert rows == list(PARTS)


def test_unknown_part_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--only", "encode,nope"]) == 2
    assert "nope" in capsys.readouterr().err
