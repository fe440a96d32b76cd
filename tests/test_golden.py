"""Golden traces of the demo's flows, and the golden tool itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from zerver.demo.golden import SCENARIOS
from zerver.export._spans import SpanData
from zerver.testing import (
    GoldenMismatchError,
    Scenario,
    assert_golden,
    normalise,
    render_text,
)

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "golden_traces"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_demo_scenario_matches_golden(scenario: Scenario, golden_update: bool) -> None:
    spans = anyio.run(scenario.run)
    assert_golden(spans, GOLDEN / f"{scenario.name}.json", mask=scenario.mask, update=golden_update)


def test_runs_are_byte_identical() -> None:
    first = [json.dumps(normalise(anyio.run(s.run))) for s in SCENARIOS]
    second = [json.dumps(normalise(anyio.run(s.run))) for s in SCENARIOS]
    assert first == second


def _happy() -> list[SpanData]:
    return anyio.run(next(s for s in SCENARIOS if s.name == "happy_200").run)


def test_changed_attribute_fails_with_readable_diff(tmp_path: Path) -> None:
    spans = _happy()
    fixture = tmp_path / "happy.json"
    assert_golden(spans, fixture, update=True)
    db = next(s for s in spans if s.name == "db.get blog_post")
    db.attributes["db.namespace"] = "blog_posts"
    with pytest.raises(GoldenMismatchError) as err:
        assert_golden(spans, fixture, update=False)
    msg = str(err.value)
    assert "happy.json (golden)" in msg and "happy.json (actual)" in msg
    assert '-          db.namespace = "blog_post"' in msg
    assert '+          db.namespace = "blog_posts"' in msg


def test_changed_tree_shape_fails(tmp_path: Path) -> None:
    spans = _happy()
    fixture = tmp_path / "happy.json"
    assert_golden(spans, fixture, update=True)
    cache = next(s for s in spans if s.name == "cache.get author_profile")
    root = next(s for s in spans if s.parent_span_id == 0)
    cache.parent_span_id = root.span_id  # moved up one level
    with pytest.raises(GoldenMismatchError, match=r"\+    CLIENT cache.get author_profile"):
        assert_golden(spans, fixture, update=False)


def test_missing_fixture_says_how_to_record(tmp_path: Path) -> None:
    with pytest.raises(GoldenMismatchError, match="ZERVER_GOLDEN_UPDATE=1"):
        assert_golden(_happy(), tmp_path / "nope.json", update=False)


def test_mask_hides_volatile_attributes() -> None:
    trees = normalise(_happy(), mask=["zerver.request_id"])
    assert trees[0]["attributes"]["zerver.request_id"] == "<masked>"
    assert 'zerver.request_id = "<masked>"' in render_text(trees)


def test_cli_check_and_update(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "zerver", "golden"]
    out = subprocess.run(
        [*cmd, "check", "--dir", str(GOLDEN)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(SCENARIOS)} of {len(SCENARIOS)} golden traces match" in out.stdout
    rec = subprocess.run(
        [*cmd, "update", "--dir", str(tmp_path), "--only", "happy_200"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert rec.returncode == 0 and (tmp_path / "happy_200.json").exists()
    fixture = json.loads((tmp_path / "happy_200.json").read_text())
    fixture[0]["attributes"]["http.route"] = "/changed"
    (tmp_path / "happy_200.json").write_text(json.dumps(fixture))
    bad = subprocess.run(
        [*cmd, "check", "--dir", str(tmp_path), "--only", "happy_200"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 1
    assert "FAIL happy_200" in bad.stdout and '-      http.route = "/changed"' in bad.stdout


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("nope_no_such_module:SCENARIOS", "cannot import module 'nope_no_such_module'"),
        ("zerver.demo.golden:MISSING", "has no attribute 'MISSING'"),
        ("zerver.demo.golden", "module:attribute"),
        ("zerver.demo.golden:__name__", "no scenarios to run"),
    ],
)
def test_cli_bad_scenarios_target_is_one_line_and_exit_2(
    target: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from zerver._cli import main

    assert main(["golden", "check", "--scenarios", target]) == 2
    err = capsys.readouterr().err
    assert problem in err and err.count("\n") == 1
