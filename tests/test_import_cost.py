"""What ``import zerver`` loads: the runtime on first use, tracing's parts when tracing starts.

Each check runs in a fresh interpreter and looks at ``sys.modules`` (which
modules are loaded, never how long that took).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from types import ModuleType

import pytest

import zerver
import zerver.export
import zerver.testing
import zerver.trace

# Loaded only when tracing or export starts (or an http effect makes a client).
HEAVY = (
    "opentelemetry.sdk",
    "google.protobuf",
    "httpx",
    "zerver.export._pipeline",
    "zerver.export._transport",
    "zerver.trace._offload",
)


def loaded_after(code: str, **env: str) -> set[str]:
    """The modules loaded after running ``code`` in a fresh interpreter."""
    script = textwrap.dedent(code) + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith(("ZER_VER_", "OTEL_"))}
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=60,
        check=True,
    )
    return set(json.loads(out.stdout.splitlines()[-1]))


def heavy_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def test_import_zerver_loads_none_of_the_runtime() -> None:
    modules = loaded_after("import zerver")
    assert heavy_in(modules) == []
    assert sorted(m for m in modules if m.startswith("zerver")) == [
        "zerver",
        "zerver._lazy",
        "zerver._version",
    ]


def test_an_app_without_tracing_loads_no_export_machinery() -> None:
    modules = loaded_after(
        """
        from zerver import App, Context, Done, Need, Response, Slot, DbGet, step
        from zerver.testing import AppClient

        app = App("plain")

        @step
        def hello(ctx):
            return Done(Response.json({"hello": "world"}))

        app.get("/hello", hello)
        """
    )
    assert heavy_in(modules) == []


def test_an_app_author_s_imports_load_no_settings_machinery() -> None:
    """The programming model and the runtime's value types load without pydantic:
    only reading the settings (``App(...)``) needs it."""
    modules = loaded_after(
        "from zerver import App, Done, Need, Response, Slot, step; zerver_app = App"
    )
    assert sorted(m for m in modules if m.split(".")[0] in ("pydantic", "pydantic_settings")) == []
    assert "zerver._config" not in modules
    assert "zerver._specs" in modules  # the trace engine's windows and sampler specs
    settings = loaded_after("from zerver import App; App('blog')")
    assert {"pydantic", "zerver._config"} <= settings


def test_the_pytest_plugin_imports_nothing_of_the_runtime() -> None:
    modules = loaded_after("import zerver.testing._pytest_plugin")
    assert sorted(m for m in modules if m.startswith("zerver")) == [
        "zerver",
        "zerver._lazy",
        "zerver._version",
        "zerver.testing",
        "zerver.testing._pytest_plugin",
    ]


def test_tracing_loads_the_sdk_and_the_pipeline_when_it_starts() -> None:
    modules = loaded_after(
        """
        import sys
        import anyio
        from zerver import App, setup_tracing
        app = App("traced")
        before = [m for m in ("opentelemetry.sdk", "zerver.export._pipeline") if m in sys.modules]
        assert before == [], before
        engine = setup_tracing(app)
        assert engine is not None

        async def start_and_stop():
            async with app.lifespan():  # stopping drains and closes the pipeline
                pass

        anyio.run(start_and_stop)
        """,
        OTEL_TRACES_EXPORTER="console",
        ZER_VER_EXPORT_PROCESS="off",
    )
    assert {"opentelemetry.sdk.trace", "zerver.export._pipeline"} <= modules


# -- the public surface is unchanged -------------------------------------------------


@pytest.mark.parametrize("package", [zerver, zerver.export, zerver.testing, zerver.trace])
def test_every_public_name_resolves_and_is_listed(package: ModuleType) -> None:
    names = package.__all__
    assert set(names) <= set(dir(package))
    for name in names:
        assert getattr(package, name) is not None
    ns: dict[str, object] = {}
    exec(f"from {package.__name__} import *", ns)
    assert set(names) <= set(ns)


def test_public_objects_are_the_defining_modules_objects() -> None:
    from zerver._app import App
    from zerver.export._pipeline import ExportPipeline
    from zerver.testing._client import AppClient

    assert zerver.App is App
    assert zerver.export.ExportPipeline is ExportPipeline
    assert zerver.testing.AppClient is AppClient


@pytest.mark.parametrize("package", [zerver, zerver.export, zerver.testing, zerver.trace])
def test_public_classes_and_functions_report_their_public_module(package: ModuleType) -> None:
    for name in package.__all__:
        obj = getattr(package, name)
        if isinstance(obj, type) or (callable(obj) and hasattr(obj, "__code__")):
            home = obj.__module__
            # A name a subpackage repeats from zerver's own surface belongs to zerver.
            assert home in (package.__name__, "zerver"), (name, home)
            if home == "zerver":
                assert getattr(zerver, name) is obj
    assert (zerver.App.__module__, zerver.step.__module__) == ("zerver", "zerver")
    assert zerver.export.ExportPipeline.__module__ == "zerver.export"


def test_the_public_module_does_not_depend_on_the_order_of_imports() -> None:
    """A private import first (as the command line and the tests do) sees the same
    names as the public one; and a public object still pickles by its public name."""
    loaded_after(
        """
        import pickle
        from zerver._app import App
        from zerver.core._decisions import Done
        from zerver.export._pipeline import ExportPipeline
        from zerver.core._http import Response
        assert App.__module__ == "zerver", App.__module__
        assert ExportPipeline.__module__ == "zerver.export", ExportPipeline.__module__
        assert repr(App) == "<class 'zerver.App'>", repr(App)
        done = pickle.loads(pickle.dumps(Done(Response.text("hi"))))
        assert type(done) is Done and type(done).__module__ == "zerver"
        """
    )


@pytest.mark.parametrize("package", [zerver, zerver.export, zerver.testing, zerver.trace])
def test_an_unknown_name_is_an_attribute_error(package: ModuleType) -> None:
    name = package.__name__
    with pytest.raises(AttributeError, match=f"^module '{name}' has no attribute 'NoSuchName'$"):
        package.NoSuchName  # noqa: B018
    with pytest.raises(ImportError, match="NoSuchName"):
        exec(f"from {name} import NoSuchName", {})


def test_vars_lists_every_public_name_even_before_first_use() -> None:
    modules = loaded_after(
        """
        import zerver
        missing = set(zerver.__all__) - set(vars(zerver))
        assert missing == set(), missing
        """
    )
    assert "zerver._app" in modules


def test_record_internals_and_the_span_model_live_in_their_subpackages() -> None:
    """zerver's own surface is what an app author uses; the records a subscriber
    reads are zerver.trace's, the span model zerver.export's."""
    from zerver.trace._records import RequestRecord

    assert zerver.trace.RequestRecord is RequestRecord
    assert RequestRecord.__module__ == "zerver.trace"
    assert zerver.export.SpanData.__module__ == "zerver.export"
    for gone in ("RequestRecord", "Subscriber", "durations", "TraceEngine", "SpanData"):
        assert gone not in zerver.__all__ and gone not in dir(zerver)


@pytest.mark.parametrize(
    ("name", "home"),
    [
        ("RequestRecord", "zerver.trace"),
        ("durations", "zerver.trace"),
        ("SpanKind", "zerver.export"),
    ],
)
def test_a_moved_name_still_answers_with_a_warning(name: str, home: str) -> None:
    message = f"zerver.{name} moved: import it from {home} (from {home} import {name})"
    with pytest.warns(DeprecationWarning, match=re.escape(message)):
        value = getattr(zerver, name)
    assert value is getattr(sys.modules[home], name)
    with pytest.warns(DeprecationWarning, match=re.escape(message)):
        exec(f"from zerver import {name}", {})
