"""The docs run (docs/conftest.py) fails a page that drifts, and says where.

Each test writes a small page next to a copy of docs/conftest.py and runs
``python -m pytest`` on it, as CI runs the docs: a failure must name the page
and the line of the block's fence, and never end in an INTERNALERROR.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _docs_conftest() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_conftest", DOCS / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_docs(tmp_path: Path, page: str) -> tuple[int, str, Path]:
    """Run pytest on ``page`` (saved as page.md); the exit code, the report and the
    temporary directory the examples ran under."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(DOCS / "conftest.py", site / "conftest.py")
    (site / "page.md").write_text(page)
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "page.md"],
        check=False,
        cwd=site,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = result.stdout + result.stderr
    assert "INTERNALERROR" not in report
    return result.returncode, report, temp


FENCE = "```"

FAILING_PAGE = f"""# A page that drifted

{FENCE}python
print("hello", 6 * 7)
# > hello 41
{FENCE}

Between the blocks.

{FENCE}python
def parse(text):
    return int(text)


parse("forty-two")
{FENCE}

{FENCE}python
print("something the page does not show")
{FENCE}

{FENCE}python
\"\"\"test_sums.py: a test file of the reader's.\"\"\"


def test_sum():
    assert sum([1, 2]) == 4
{FENCE}
"""


def test_a_drifted_page_fails_each_block_at_its_page_and_line(tmp_path: Path) -> None:
    code, report, _temp = run_docs(tmp_path, FAILING_PAGE)
    assert code == 1
    # The wrong output: what was printed, and what the page shows.
    assert "page.md:3: SybilFailure" in report
    assert "hello 42" in report and "# > hello 41" in report
    # The raising block: its traceback names the page and the line that raised.
    assert "page.md:10: SybilFailure" in report
    assert 'page.md", line 15, in <module>' in report
    assert 'page.md", line 12, in parse' in report
    assert "ValueError: invalid literal for int() with base 10: 'forty-two'" in report
    # A block that prints while the page shows nothing.
    assert "page.md:18: SybilFailure" in report
    assert "(nothing)" in report
    # A test file: its failing test, under pytest.
    assert "page.md:22: SybilFailure" in report
    assert "test_sums.py (its line 1 is line 23 of the page) under pytest" in report
    assert "FAILED test_sums.py::test_sum" in report
    assert "4 failed" in report


PASSING_PAGE = f"""# A page that holds

{FENCE}python
\"\"\"greeting.py: a module of the reader's.\"\"\"

from pathlib import Path

GREETING = "hello"
Path("notes.txt").write_text(GREETING)
{FENCE}

{FENCE}python
import asyncio
from pathlib import Path

from greeting import GREETING


async def main() -> str:
    await asyncio.sleep(0)
    return GREETING.upper()


print(asyncio.run(main()), Path("notes.txt").read_text(), Path.cwd().name)
# >   HELLO hello zerver-docs-...
{FENCE}

{FENCE}python
\"\"\"test_greeting.py: the reader's test of it.\"\"\"

from greeting import GREETING


def test_greeting():
    assert GREETING == "hello"
{FENCE}

<!-- skip: next "needs a server the page cannot start" -->

{FENCE}python
import nowhere
{FENCE}

- In a list item:

  {FENCE}python
  print([1, 2][-1])
  # > 2
  {FENCE}
"""


def test_a_page_that_holds_passes_and_leaves_nothing_behind(tmp_path: Path) -> None:
    code, report, temp = run_docs(tmp_path, PASSING_PAGE)
    assert code == 0, report
    # Four blocks ran (one in a list item), one was skipped with its reason; the
    # skip directive itself is an item too.
    assert "5 passed, 1 skipped" in report
    assert "page.md:40: needs a server the page cannot start" in report
    assert list(temp.iterdir()) == []


def test_a_skip_without_a_reason_stops_collection(tmp_path: Path) -> None:
    page = f"<!-- skip: next -->\n\n{FENCE}python\nimport nowhere\n{FENCE}\n"
    code, report, _temp = run_docs(tmp_path, page)
    assert code != 0
    assert "page.md, line 1, column 1: a skipped example says why" in report


@pytest.mark.parametrize(
    ("printed", "expected", "matches"),
    [
        (["hello 42"], ["hello 42"], True),
        (["hello 42"], ["hello 41"], False),
        (["trace 1a2b", "done"], ["trace ...", "done"], True),
        (["trace 1a2b"], ["trace ...", "done"], False),
        (["a", "b"], ["a"], False),
        ([], [], True),
        (["x"], [], False),
        (["[1] (2)"], ["[1] (...)"], True),
        (["[1] (2)"], ["[1] .2."], False),
        (["trace 1a2b ms"], ["trace ... ms"], True),
        (["trace 1a2b"], ["trace ... ms"], False),
    ],
)
def test_output_matches(printed: list[str], expected: list[str], matches: bool) -> None:
    assert _docs_conftest().output_matches(printed, expected) is matches


def test_expected_output_reads_the_marked_lines_only() -> None:
    source = "print(1)  # a comment\n# > 1\nfor i in ():\n    pass\n    # >   two  \n#> 3\n"
    assert _docs_conftest().expected_output(source) == ["1", "two", "3"]
