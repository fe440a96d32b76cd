"""Every Python example in docs/ runs, so a page cannot drift from the code it shows.

Each ```python block is run on its own, in a fresh interpreter and an empty
working directory. Lines ``# > text`` after a ``print`` give the output the
block must print (in order, indentation ignored). A block that is a fragment
(it names a module of the reader's, or continues an earlier block) says so on
the line before its fence: ``<!-- docs-test: skip, <why> -->``.

Written by hand rather than with pytest-examples: under pytest 9 its failure
report raises an INTERNALERROR, which would hide the very failure it exists to show.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_OUTPUT = re.compile(r"# ?>(.*)")
_SKIP = re.compile(r"<!-- docs-test: skip, (.+?) -->\s*$")


@dataclass(frozen=True)
class Example:
    path: Path
    line: int
    source: str
    skip: str | None

    def __str__(self) -> str:
        return f"{self.path.name}:{self.line}"

    @property
    def expected(self) -> list[str]:
        return [
            m.group(1).strip()
            for line in self.source.splitlines()
            if (m := _OUTPUT.match(line.strip())) is not None
        ]


def examples() -> list[Example]:
    found = []
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text()
        for match in _BLOCK.finditer(text):
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            skip = _SKIP.search(before)
            found.append(
                Example(
                    path=path,
                    line=text[: match.start()].count("\n") + 1,
                    source=match.group(1),
                    skip=skip.group(1) if skip else None,
                )
            )
    return found


@pytest.mark.parametrize("example", examples(), ids=str)
def test_example_runs(example: Example, tmp_path: Path) -> None:
    if example.skip is not None:
        pytest.skip(example.skip)
    result = subprocess.run(
        [sys.executable, "-c", example.source],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"{example} failed:\n{result.stderr}"
    if example.expected:
        printed = [line.strip() for line in result.stdout.splitlines() if line.strip()]
        assert printed == example.expected, f"{example} printed:\n{result.stdout}"


def test_every_page_with_python_has_examples_that_run() -> None:
    pages = {e.path.name for e in examples() if e.skip is None}
    assert "exporting.md" in pages and "concepts.md" in pages
