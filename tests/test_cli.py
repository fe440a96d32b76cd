"""The ``zerver`` command as an operator meets it: real processes, real sockets.

Every operator error stops start-up with exit status 2 and one line on stderr
naming the cause (for the app's own errors, the app's innermost frame), never
a traceback of zerver's frames.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from demo_process import operator_env, zerver_process

import zerver
from zerver import Settings
from zerver._cli import warn_unknown_variables
from zerver._config import env_name, known_variables
from zerver.testing import capture_logs

# A module tree the way an operator has one: app modules in a directory on
# PYTHONPATH, the command run from another directory.
MODULES = {
    "good.py": """
        from zerver import App

        app = App("good")
    """,
    "bad_syntax.py": """
        from zerver import App

        def create_app(:
            return App("bad")
    """,
    "missing_dependency.py": """
        from zerver import App

        import zerver_no_such_dependency

        app = App("missing")
    """,
    "raises_on_import.py": """
        from zerver import App

        SETTINGS = {"threads": "four"}
        THREADS = int(SETTINGS["threads"])
        app = App("raises")
    """,
    "helpers.py": """
        def ratio(a, b):
            return a / b
    """,
    "factory_raises.py": """
        from zerver import App

        from helpers import ratio


        def create_app():
            scale = ratio(1, 0)
            return App("factory", version=str(scale))
    """,
    "startup_raises.py": """
        from zerver import App

        app = App("startup")


        async def connect(app):
            raise ConnectionRefusedError("broker at 127.0.0.1:1 refused the connection")


        app.on_startup(connect)
    """,
    "gc_state.py": """
        import gc

        from zerver import App, Done, Response, step

        app = App("gc")


        @step
        def collector(ctx):
            threshold = gc.get_threshold()[0]
            return Done(Response.json({"threshold": threshold, "frozen": gc.get_freeze_count()}))


        app.get("/gc", collector)
    """,
}


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """``(modules, cwd)``: the app modules and an empty directory to run in."""
    modules, cwd = tmp_path / "modules", tmp_path / "cwd"
    modules.mkdir()
    cwd.mkdir()
    for name, text in MODULES.items():
        (modules / name).write_text(textwrap.dedent(text).lstrip())
    return modules, cwd


def _env(modules: Path, cwd: Path, **extra: str) -> dict[str, str]:
    env = operator_env(modules, cwd / "state", ZER_VER_DB_PATH=str(cwd / "app.sqlite3"))
    env.update(extra)
    return env


def zerver_cmd(tree: tuple[Path, Path], *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    modules, cwd = tree
    return subprocess.run(
        [sys.executable, "-m", "zerver", *args],
        capture_output=True,
        text=True,
        env=_env(modules, cwd, **env),
        cwd=cwd,
        timeout=60,
        check=False,
    )


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed start, after checking the exit status."""
    assert "Traceback (most recent call last)" not in out.stderr, out.stderr
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


# -- the app's own errors -----------------------------------------------------------


def test_syntax_error_names_the_file_and_line(tree: tuple[Path, Path]) -> None:
    line = one_line(zerver_cmd(tree, "run", "bad_syntax:create_app", "--port", "0"))
    assert re.fullmatch(
        r"zerver: loading bad_syntax:create_app failed: SyntaxError: .+ \(bad_syntax\.py:3\)",
        line,
    ), line


def test_import_error_inside_the_app_names_the_import_line(tree: tuple[Path, Path]) -> None:
    line = one_line(zerver_cmd(tree, "run", "missing_dependency:app", "--port", "0"))
    assert line == (
        "zerver: cannot import module 'missing_dependency': "
        "No module named 'zerver_no_such_dependency' (missing_dependency.py:3 in <module>)"
    )


def test_unknown_module_is_one_line_as_before(tree: tuple[Path, Path]) -> None:
    line = one_line(zerver_cmd(tree, "run", "nope:app", "--port", "0"))
    assert line == "zerver: cannot import module 'nope': No module named 'nope'"


def test_exception_at_import_names_the_app_frame(tree: tuple[Path, Path]) -> None:
    line = one_line(zerver_cmd(tree, "run", "raises_on_import:app", "--port", "0"))
    assert line == (
        "zerver: loading raises_on_import:app failed: ValueError: invalid literal for int() "
        "with base 10: 'four' (raises_on_import.py:4 in <module>)"
    )


def test_factory_that_raises_names_the_innermost_app_frame(tree: tuple[Path, Path]) -> None:
    line = one_line(zerver_cmd(tree, "run", "factory_raises:create_app", "--port", "0"))
    assert line == (
        "zerver: loading factory_raises:create_app failed: "
        "ZeroDivisionError: division by zero (helpers.py:2 in ratio)"
    )


def test_startup_hook_that_raises_is_one_line(tree: tuple[Path, Path]) -> None:
    # Raised inside the server's task group: an ExceptionGroup, unwrapped.
    line = one_line(zerver_cmd(tree, "run", "startup_raises:app", "--port", "0"))
    assert line == (
        "zerver: serving startup_raises:app failed: ConnectionRefusedError: "
        "broker at 127.0.0.1:1 refused the connection (startup_raises.py:7 in connect)"
    )


def test_startup_hook_that_raises_in_workers_is_one_line(tree: tuple[Path, Path]) -> None:
    # Each worker fails on its own; the supervisor says it once, with exit status 2.
    line = one_line(zerver_cmd(tree, "run", "startup_raises:app", "--port", "0", "--workers", "2"))
    assert line == (
        "zerver: serving startup_raises:app failed: ConnectionRefusedError: "
        "broker at 127.0.0.1:1 refused the connection (startup_raises.py:7 in connect)"
    )


def test_demo_with_a_database_it_cannot_open_is_one_line(tree: tuple[Path, Path]) -> None:
    _, cwd = tree
    db = cwd / "no-such-dir" / "blog.sqlite3"
    line = one_line(zerver_cmd(tree, "demo", "--db", str(db), "--port", "0"))
    assert line.startswith("zerver: serving zerver.demo:create_app failed: ")
    assert str(db) in line and "unable to open database file" in line


# -- the address ----------------------------------------------------------------------


@contextlib.contextmanager
def port_in_use() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket is bound to and listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("transport", "workers"), [("protocol", "1"), ("streams", "1"), ("protocol", "2")]
)
def test_port_in_use_is_one_line(tree: tuple[Path, Path], transport: str, workers: str) -> None:
    with port_in_use() as port:
        out = zerver_cmd(
            tree,
            "run",
            "good:app",
            "--port",
            str(port),
            "--workers",
            workers,
            ZER_VER_TRANSPORT=transport,
        )
    line = one_line(out)
    assert line.startswith(f"zerver: cannot listen on 127.0.0.1:{port}: "), line
    assert "address already in use" in line.lower(), line


def test_bad_setting_is_still_one_line(tree: tuple[Path, Path]) -> None:
    line = one_line(zerver_cmd(tree, "run", "good:app", ZER_VER_PORT="eighty"))
    assert line == "zerver: ZER_VER_PORT='eighty' is invalid: accepted: a whole number"


# -- the garbage collector of a serving process -------------------------------------


@pytest.mark.parametrize(("value", "threshold"), [(None, 10_000), ("700", 700)])
def test_serving_process_freezes_start_up_and_sets_the_collector_threshold(
    tree: tuple[Path, Path], value: str | None, threshold: int
) -> None:
    modules, cwd = tree
    env = _env(modules, cwd, **({"ZER_VER_GC_THRESHOLD": value} if value else {}))
    with zerver_process(("run", "gc_state:app"), env, cwd) as (proc, port, _lines):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/gc", timeout=10) as answer:
            state = json.load(answer)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert state["threshold"] == threshold
    assert state["frozen"] > 1000  # the imported modules and the app, at least


def test_bad_collector_threshold_is_one_line(tree: tuple[Path, Path]) -> None:
    line = one_line(zerver_cmd(tree, "run", "good:app", ZER_VER_GC_THRESHOLD="-5"))
    assert line.startswith("zerver: ZER_VER_GC_THRESHOLD='-5' is invalid: accepted:"), line


# -- unknown variables ----------------------------------------------------------------


def _startup_lines(
    tree: tuple[Path, Path], *args: str, **env: str
) -> tuple[list[dict[str, Any]], str]:
    """Start ``zerver`` on port 0, read its JSON log up to "server started", stop it."""
    modules, cwd = tree
    with zerver_process(args, _env(modules, cwd, **env), cwd) as (proc, _port, lines):
        assert proc.stderr is not None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        return lines, proc.stderr.read().decode()


def test_unknown_variables_are_warned_once_each_with_the_closest_name(
    tree: tuple[Path, Path],
) -> None:
    lines, stderr = _startup_lines(
        tree,
        "run",
        "good:app",
        ZER_VER_PROT="9000",
        zer_ver_acess_log="0",
        ZER_VER_EXPORT_OVERFLW="drop_oldest",
        ZER_VER_BANANA="1",
    )
    warnings = [x for x in lines if x["event"] == "unknown variable ignored"]
    assert [(w["variable"], w.get("did_you_mean")) for w in warnings] == [
        ("ZER_VER_BANANA", None),
        ("ZER_VER_EXPORT_OVERFLW", "ZER_VER_EXPORT_OVERFLOW"),
        ("ZER_VER_PROT", "ZER_VER_PORT"),
        ("zer_ver_acess_log", "ZER_VER_ACCESS_LOG"),
    ]
    assert all(w["level"] == "warning" for w in warnings)
    assert stderr == ""


def test_metrics_variables_without_a_metrics_exporter_are_reported(
    tree: tuple[Path, Path],
) -> None:
    lines, _ = _startup_lines(
        tree,
        "run",
        "good:app",
        OTEL_METRIC_EXPORT_INTERVAL="1000",
        OTEL_EXPORTER_OTLP_METRICS_TIMEOUT="500",
    )
    (warning,) = [x for x in lines if x["event"].startswith("metrics variables ignored")]
    assert warning["variables"] == [
        "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT",
        "OTEL_METRIC_EXPORT_INTERVAL",
    ]
    lines, _ = _startup_lines(
        tree, "run", "good:app", OTEL_METRICS_EXPORTER="none", OTEL_METRIC_EXPORT_INTERVAL="1000"
    )
    assert [x for x in lines if x["event"].startswith("metrics variables ignored")]
    lines, _ = _startup_lines(
        tree,
        "run",
        "good:app",
        OTEL_TRACES_EXPORTER="console",
        OTEL_METRICS_EXPORTER="console",
        OTEL_METRIC_EXPORT_INTERVAL="1000",
    )
    assert not [x for x in lines if x["event"].startswith("metrics variables ignored")]


def test_known_variables_give_no_warning(tree: tuple[Path, Path]) -> None:
    lines, _ = _startup_lines(
        tree,
        "demo",
        ZER_VER_WORKERS_EFFECTS="8",
        zer_ver_cache_ttl_ms="1000",  # names are case-insensitive
        ZER_VER_EXPORT_OVERFLOW="drop_oldest",  # read by the exporter, not the model
        ZER_VER_EXPORT_SPOOL_MAX_MB="4",
    )
    assert not [x for x in lines if x["event"] == "unknown variable ignored"]


def test_known_variables_come_from_the_code() -> None:
    known = known_variables()
    every_setting = {env_name(f) for f in Settings.model_fields}
    assert {n for n in every_setting if n.startswith("ZER_VER_")} <= known
    # Read by the exporter configuration, outside the settings model.
    assert {"ZER_VER_EXPORT_OVERFLOW", "ZER_VER_EXPORT_SPOOL_DIR"} <= known
    assert all(n.startswith("ZER_VER_") and n.upper() == n for n in known)


def test_warning_without_a_close_name_has_no_suggestion() -> None:
    with capture_logs() as logs:
        unknown = warn_unknown_variables(
            {"ZER_VER_ZZZZZZZZZZ": "1", "HOME": "/", "ZER_VER_PORT": ""}
        )
    assert unknown == ["ZER_VER_ZZZZZZZZZZ"]
    assert [(x["event"], x["variable"], "did_you_mean" in x) for x in logs] == [
        ("unknown variable ignored", "ZER_VER_ZZZZZZZZZZ", False)
    ]


# -- --version ------------------------------------------------------------------------


def test_version(tree: tuple[Path, Path]) -> None:
    out = zerver_cmd(tree, "--version")
    assert out.returncode == 0
    assert out.stdout == f"zerver {zerver.__version__}\n"
    assert out.stderr == ""


def test_the_targets_package_is_app_code_even_when_installed() -> None:
    import os as os_module

    from zerver._cli import _AppCode

    # json is in the standard library, as an installed app would be in site-packages.
    assert json.__file__ in _AppCode("json:loads")
    assert os_module.__file__ not in _AppCode("json:loads")
    assert json.__file__ not in _AppCode("myapp:app")
    assert zerver.__file__ not in _AppCode("zerver.demo:create_app")
    assert "<frozen importlib._bootstrap>" not in _AppCode("json:loads")
