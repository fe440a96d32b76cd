"""Every Python example in docs/ runs, so a page cannot drift from the code it shows.

Sybil collects the ```python blocks of docs/*.md; each runs as a reader would
run it: in a fresh interpreter whose working directory is the page's own empty
temporary directory (removed when the page's examples are done), so an example
that starts servers, writes files or calls ``anyio.run`` leaves nothing behind
and no process-wide state (tracer providers, logging) leaks between examples.

- Expected output: lines ``# > text`` give what the block prints to stdout,
  in order; a block that prints must show it. Leading and trailing spaces are
  ignored, and ``...`` stands for any text within a line (an id that differs
  from run to run). zerver's log lines are sent to stderr and not compared.
- A block whose first line is a docstring naming a file (``\"\"\"notes.py: ...\"\"\"``)
  is saved under that name in the page's directory, so a later block of the page
  may ``import notes``, as a reader who saved it would. A ``test_*.py`` file is
  run with ``python -m pytest`` instead (with anyio's and zerver's plugins), and
  every test in it must pass.
- A fragment (an outline, or code that needs a server the suite does not start)
  says why on the line before its fence: ``<!-- skip: next "needs a Redis server" -->``.
  The reason is required.

A failing block fails its test with the page and the line of its fence.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
from sybil import Document, Example, Region, Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

_OUTPUT = re.compile(r"^\s*# ?>(.*)$", re.M)
_FILE = re.compile(r'^"""(\w+\.py): ')
_SKIP_WITHOUT_REASON = re.compile(r"<!--\s*skip:\s*(next|start)\s*-->")
_TIMEOUT_S = 60
# The pytest plugins the pages' test files use (anyio's marker, zerver's golden_update),
# and only those: loading every installed plugin would double the run's time.
_PLUGINS = ("-p", "anyio.pytest_plugin", "-p", "zerver.testing._pytest_plugin")
# Runs the block's source compiled under the page's path, so that a traceback
# names the page and the page's own line numbers (the source is padded to start
# at its line) and shows the offending line; it runs as __main__, as a script does.
# Log lines go to stderr (structlog's default is stdout), so that what a page
# shows after ``# >`` is what the block prints; a block that configures logging
# itself still decides.
_BOOT = (
    "import sys, structlog; "
    "structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr)); "
    "_code = compile(sys.stdin.read(), sys.argv[1], 'exec'); del sys, structlog; exec(_code)"
)


def expected_output(source: str) -> list[str]:
    """The ``# > text`` lines of ``source``, stripped."""
    return [m.group(1).strip() for m in _OUTPUT.finditer(source)]


def output_matches(printed: list[str], expected: list[str]) -> bool:
    """True when each printed line matches its expected line (``...``: any text)."""
    if len(printed) != len(expected):
        return False
    return all(
        re.fullmatch(".*".join(map(re.escape, want.split("..."))), got) is not None
        for got, want in zip(printed, expected, strict=True)
    )


def _workdir(example: Example) -> Path:
    workdir: Path = example.namespace["workdir"]
    return workdir


def _failed(what: str, result: subprocess.CompletedProcess[str]) -> str:
    return f"{what} exited with {result.returncode}:\n{result.stdout}{result.stderr}"


def run_block(example: Example) -> str | None:
    """Run one block as a reader would; a non-empty string says how it failed."""
    source = str(example.parsed)
    workdir = _workdir(example)
    named = _FILE.match(source)
    if named is not None:
        (workdir / named.group(1)).write_text(source)
    if named is not None and named.group(1).startswith("test_"):
        name = named.group(1)
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *_PLUGINS, name],
            check=False,
            cwd=workdir,
            env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
        )
        if result.returncode != 0:
            first = example.line + 1
            return _failed(f"{name} (its line 1 is line {first} of the page) under pytest", result)
        return None
    line_of_source = example.line + example.parsed.line_offset
    result = subprocess.run(
        [sys.executable, "-c", _BOOT, example.path],
        input="\n" * line_of_source + source,
        check=False,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
    )
    if result.returncode != 0:
        return _failed("the block", result)
    expected = expected_output(source)
    printed = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    if not output_matches(printed, expected):
        shown = "\n".join(f"# > {line}" for line in expected) or "(nothing)"
        return f"the block printed:\n{result.stdout}\nwhere the page shows:\n{shown}"
    return None


class RunnableCodeBlockParser(PythonCodeBlockParser):
    """Python blocks, each run by :func:`run_block`."""

    def __call__(self, document: Document) -> Any:
        for region in super().__call__(document):
            region.evaluator = run_block
            yield region


class ReasonedSkipParser(SkipParser):
    """Sybil's ``<!-- skip: next "why" -->``, refusing a skip that gives no reason."""

    def __call__(self, document: Document) -> Any:
        missing = _SKIP_WITHOUT_REASON.search(document.text)
        if missing is not None:
            raise ValueError(
                f"{document.path}, {document.line_column(missing.start())}: "
                f'a skipped example says why: <!-- skip: next "reason" -->'
            )
        regions: list[Region] = list(super().__call__(document))
        return regions


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A skipped example is reported at its page and line, not inside pytest."""
    report = yield
    example = getattr(item, "example", None)
    if report.skipped and isinstance(example, Example) and isinstance(report.longrepr, tuple):
        report.longrepr = (example.path, example.line, report.longrepr[2])
    return report


def _setup(namespace: dict[str, Any]) -> None:
    namespace["workdir"] = Path(tempfile.mkdtemp(prefix="zerver-docs-"))


def _teardown(namespace: dict[str, Any]) -> None:
    shutil.rmtree(namespace["workdir"], ignore_errors=True)


pytest_collect_file = Sybil(
    parsers=[RunnableCodeBlockParser(), ReasonedSkipParser()],
    patterns=["*.md"],
    setup=_setup,
    teardown=_teardown,
).pytest()
