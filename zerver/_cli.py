"""The ``zerver`` command: ``zerver run module:app`` and ``zerver demo``.

An operator's mistake (a bad setting, a port in use, an app module that does
not import, a factory that raises) stops start-up with one line on stderr
naming the cause and exit status 2: for the app's own code, its exception
and the app's innermost frame, never zerver's traceback. A ``ZER_VER_*``
variable zerver does not read is logged as a warning naming the closest
known one.

Before binding, one line says where traces go (:func:`announce_traces`); with
OTLP, a check on a thread of its own warns at once, and once, when nothing
answers at the endpoint (:func:`check_collector_soon`).
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
import site
import socket
import sys
import sysconfig
import threading
import traceback
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import structlog

from zerver.core._errors import ConfigError, UsageError, ZerverError

from ._app import App
from ._config import Settings, known_variables, load_settings
from ._gc import tune_gc
from ._version import __version__

if TYPE_CHECKING:
    from .export import ExportConfig

__all__ = ["main", "serving_app"]


_APP_ENV = "ZERVER_APP"
_PREFIX = "ZER_VER_"


def serving_app(*, check_only: bool = False) -> App:
    """The app named by ``$ZERVER_APP``, prepared for serving (each worker calls this).

    Configures logging, the access log and trace export from the environment.
    With ``check_only`` it only validates (settings, exporter variables, the
    app import) and starts nothing: the CLI calls it so a bad value stops
    start-up before the port is bound.
    """
    from zerver.http._server import load_app
    from zerver.trace._logging import AccessLog, configure_logging

    from ._telemetry import default_spool_dir, setup_tracing
    from .export import ExportConfig

    settings = load_settings()
    if check_only:
        ExportConfig.from_env()
    else:
        configure_logging(settings.log_format, settings.log_level)
    app = load_app(os.environ[_APP_ENV])
    if not isinstance(app, App):
        raise UsageError(f"{os.environ[_APP_ENV]} is not a zerver App")
    if check_only:
        return app
    if settings.access_log:
        app.subscribe(AccessLog())
    setup_tracing(app, default_spool_dir=default_spool_dir(settings.service_name or app.name))
    tune_gc(settings.gc_threshold)
    return app


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address to bind (default: ZER_VER_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind (default: ZER_VER_PORT or 8080)")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port (default 1)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zerver", description="Serve a zerver app, the demo, or check golden traces."
    )
    parser.add_argument("--version", action="version", version=f"zerver {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve an app: zerver run module:app")
    run.add_argument("app", help="module:attribute naming an App or a factory returning one")
    _server_args(run)
    demo = sub.add_parser(
        "demo",
        help="serve the demo blog (SQLite by default; ZER_VER_DB_URL for PostgreSQL, "
        "ZER_VER_CACHE_URL and ZER_VER_BROKER_URL for Redis)",
    )
    demo.add_argument("--db", help="SQLite file (default: ZER_VER_DB_PATH or zerver.sqlite3)")
    _server_args(demo)
    golden = sub.add_parser("golden", help="check or re-record golden traces")
    golden.add_argument("action", choices=["check", "update"])
    golden.add_argument("--dir", default="golden_traces", help="fixture directory")
    golden.add_argument(
        "--scenarios",
        default="zerver.demo.golden:SCENARIOS",
        help="module:attribute naming a list of zerver.testing.Scenario",
    )
    golden.add_argument("--only", action="append", default=[], help="run only this scenario")
    return parser


def _golden(args: argparse.Namespace) -> int:
    from zerver.http._server import import_target

    from .testing import Scenario, check_scenarios

    try:
        scenarios = import_target(args.scenarios)
    except UsageError as exc:
        print(f"zerver: cannot load scenarios {args.scenarios!r}: {exc}", file=sys.stderr)
        return 2
    chosen = [
        s
        for s in (scenarios if isinstance(scenarios, Iterable) else ())
        if isinstance(s, Scenario) and (not args.only or s.name in args.only)
    ]
    if not chosen:
        print(f"zerver: no scenarios to run from {args.scenarios!r}", file=sys.stderr)
        return 2
    update = args.action == "update"
    failures = check_scenarios(chosen, args.dir, update=update)
    for name, problem in failures:
        print(f"FAIL {name}\n{problem}")
    verb = "recorded" if update else "match"
    print(f"{len(chosen) - len(failures)} of {len(chosen)} golden traces {verb} ({args.dir})")
    return 1 if failures else 0


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if getattr(args, "db", None):
        overrides["db_path"] = args.db
    return load_settings(os.environ, **overrides)


def warn_unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """Log one warning per ``ZER_VER_*`` variable zerver does not read; return their names.

    Such a variable is ignored, so a typo would otherwise go unnoticed; the
    warning names the closest known variable when one is close.
    """
    known = known_variables()
    suffixes = {name.removeprefix(_PREFIX): name for name in known}
    log = structlog.get_logger("zerver.config")
    unknown = sorted(
        name for name in environ if name.upper().startswith(_PREFIX) and name.upper() not in known
    )
    for name in unknown:
        # Compared without the shared prefix, which would make every name look close.
        close = difflib.get_close_matches(
            name.upper().removeprefix(_PREFIX), list(suffixes), n=1, cutoff=0.6
        )
        if close:
            log.warning("unknown variable ignored", variable=name, did_you_mean=suffixes[close[0]])
        else:
            log.warning("unknown variable ignored", variable=name)
    return unknown


_METRICS_PREFIXES = ("OTEL_EXPORTER_OTLP_METRICS_", "OTEL_METRIC_EXPORT_")


def warn_unwired_variables(environ: Mapping[str, str]) -> list[str]:
    """Log a warning when metrics variables are set but metrics are off; return their names.

    The server exports metrics only when ``OTEL_METRICS_EXPORTER`` names an
    exporter (docs/metrics.md); ``OTEL_EXPORTER_OTLP_METRICS_*`` or
    ``OTEL_METRIC_EXPORT_*`` without it would do nothing: say so rather than
    ignore them.
    """
    if environ.get("OTEL_METRICS_EXPORTER", "none").strip().lower() != "none":
        return []
    names = sorted(name for name in environ if name.upper().startswith(_METRICS_PREFIXES))
    if names:
        structlog.get_logger("zerver.config").warning(
            "metrics variables ignored: OTEL_METRICS_EXPORTER is unset or none, so the "
            "server exports no metrics; set it to otlp or console (see docs/metrics.md)",
            variables=names,
        )
    return names


def _directory(path: str) -> str:
    return os.path.join(os.path.abspath(path), "")


class _AppCode:
    """Tells the app's own source files from zerver's, the standard library's and installed ones.

    The target's top-level package (or module) is the app's even when it is
    installed in site-packages.
    """

    __slots__ = ("_app", "_library")

    def __init__(self, target: str) -> None:
        paths = sysconfig.get_paths()
        library = {os.path.dirname(os.path.abspath(__file__)), *site.getsitepackages()}
        library.update(paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib"))
        library.add(site.getusersitepackages())
        self._library = tuple(_directory(d) for d in library if d)
        self._app = self._package(target)

    @staticmethod
    def _package(target: str) -> str | None:
        top = target.partition(":")[0].partition(".")[0]
        if not top or top == "zerver":  # the demo is zerver's own
            return None
        try:
            spec = importlib.util.find_spec(top)  # a top-level name: found, not imported
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        if spec.submodule_search_locations:
            return _directory(next(iter(spec.submodule_search_locations)))
        return os.path.abspath(spec.origin) if spec.origin else None

    def __contains__(self, filename: str) -> bool:
        if filename.startswith("<"):
            return False
        path = os.path.abspath(filename)
        if self._app is not None and path.startswith(self._app):
            return True
        return not path.startswith(self._library)


def _short(filename: str) -> str:
    """``filename`` relative to the import-path entry it was found on (``myapp.py``)."""
    path = os.path.abspath(filename)
    roots = [os.path.join(os.path.abspath(p or os.curdir), "") for p in sys.path]
    inside = [root for root in roots if path.startswith(root)]
    return path.removeprefix(max(inside, key=len)) if inside else path


def _app_location(exc: BaseException | None, app: _AppCode) -> str | None:
    """Where in the app's own code ``exc`` arose: ``myapp.py:12 in helper``, or None."""
    if exc is None:
        return None
    if isinstance(exc, SyntaxError) and exc.filename and exc.filename in app:
        return f"{_short(exc.filename)}:{exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename in app]
    if not frames:
        return None
    frame = frames[-1]
    return f"{_short(frame.filename)}:{frame.lineno} in {frame.name}"


def _one_line(text: str) -> str:
    return " / ".join(part.strip() for part in text.splitlines() if part.strip())


def _describe(exc: BaseException, app: _AppCode) -> str:
    """``Type: message (where)``, the where being the app's innermost frame if any."""
    message = exc.msg if isinstance(exc, SyntaxError) and exc.msg else str(exc)
    text = f"{type(exc).__name__}: {_one_line(message)}" if message else type(exc).__name__
    where = _app_location(exc, app)
    return f"{text} ({where})" if where else text


def _usage_line(exc: ZerverError, app: _AppCode) -> str:
    """A ConfigError's or UsageError's own line, plus where in the app it arose, if it did.

    That is the app's call that misused zerver, or the app's import that
    failed (zerver reports a failed import as a UsageError, from None).
    """
    line = f"zerver: {_one_line(str(exc))}"
    cause = exc.__cause__ or exc.__context__
    imported = cause if isinstance(cause, ImportError) else None
    where = _app_location(exc, app) or _app_location(imported, app)
    return f"{line} ({where})" if where else line


def _leaf(exc: BaseException) -> BaseException:
    """The exception an anyio task group wrapped: a zerver error first, else the first one."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves = [_leaf(e) for e in exc.exceptions]
    return next((e for e in leaves if isinstance(e, ZerverError)), leaves[0])


def _failure_line(doing: str, exc: BaseException, app: _AppCode) -> str | None:
    """The one line for an exception that stopped start-up, or None for a fault of zerver's own.

    A zerver error (a bad setting or target, an address that cannot be
    bound, a database that cannot be opened) and an exception raised in the
    app's own code (its module, factory or start-up hook) are the operator's
    to fix: one line says which. Anything else keeps its traceback.
    """
    if isinstance(exc, ConfigError | UsageError):
        return _usage_line(exc, app)
    if isinstance(exc, ZerverError):
        where = _app_location(exc, app)
        line = f"zerver: {doing} failed: {_one_line(str(exc))}"
        return f"{line} ({where})" if where else line
    if isinstance(exc, Exception) and _app_location(exc, app) is not None:
        return f"zerver: {doing} failed: {_describe(exc, app)}"
    return None


def worker_failure_line(exc: BaseException) -> str | None:
    """For a worker process of ``zerver run``: the one line describing why it could
    not serve the app (None when not started by this command, or for zerver's own
    bugs, whose traceback stays)."""
    target = os.environ.get(_APP_ENV)
    if target is None:
        return None
    return _failure_line(f"serving {target}", _leaf(exc), _AppCode(target))


# -- what a new user is told at start ------------------------------------------------


def _export_config() -> ExportConfig:
    from .export import ExportConfig

    return ExportConfig.from_env()


def trace_destination(settings: Settings, config: ExportConfig) -> str:
    """Where this server's traces go, in words: the OTLP endpoint and protocol (and
    whether an exporter process builds them), the console and its format, or nowhere."""
    from ._telemetry import in_exporter_process

    parts: list[str] = []
    for name in config.exporters:
        if name == "otlp":
            where = "an exporter process" if in_exporter_process(settings) else "this process"
            parts.append(f"OTLP {config.protocol} at {config.endpoint} (built in {where})")
        elif name == "console":
            form = "trees" if settings.console_format == "tree" else "JSON lines"
            parts.append(f"standard output as {form} (console)")
    if not parts:
        return "traces go nowhere (OTEL_TRACES_EXPORTER=none)"
    return "traces go to " + " and ".join(parts)


def tracez_text(settings: Settings) -> str | None:
    """``tracez at http://host:port/debug/tracez`` when the trace pages are on, else None.

    A server bound to every address is reached on loopback, where the pages answer;
    with ``--port 0`` the port is the one the ``server started`` line names. A server
    bound to one address that is not loopback is reached from that address even by a
    browser on this machine, so unless ``ZER_VER_ZPAGES_ALLOW`` admits it, the line
    says that the pages will refuse it and how to admit it.
    """
    if not settings.zpages:
        return None
    from zerver.zpages._access import Allow

    host = settings.host
    bound = host.strip("[]")
    refused = False
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    else:
        refused = bound != "localhost" and not Allow.parse(settings.zpages_allow)(bound)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
    path = settings.zpages_path.rstrip("/") + "/tracez"
    where = (
        f"{path} on this server" if settings.port == 0 else f"http://{host}:{settings.port}{path}"
    )
    if refused:
        width = "128" if ":" in bound else "32"
        return (
            f"tracez at {where}, served to loopback clients only, so a browser reaching "
            f"{bound} is refused (404); to admit it, set ZER_VER_ZPAGES_ALLOW={bound}/{width} "
            "or the clients' network"
        )
    return f"tracez at {where}"


def announce_traces(settings: Settings, config: ExportConfig, extra: Sequence[str] = ()) -> str:
    """Log, once and on one line, where traces go, followed by ``extra`` (each a short
    phrase such as where to browse them); returns the line."""
    line = "; ".join([trace_destination(settings, config), *extra])
    structlog.get_logger("zerver").info(
        line,
        exporters=",".join(config.exporters) or "none",
        endpoint=config.endpoint if "otlp" in config.exporters else None,
    )
    return line


def collector_problem(endpoint: str, timeout_s: float = 2.0) -> str | None:
    """Why nothing takes a connection at ``endpoint``'s host and port, or None when
    something does (a TCP connect, nothing sent: it says a collector could answer)."""
    url = urllib.parse.urlsplit(endpoint)
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        return "its port is not a number"
    host = url.hostname or "localhost"
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except TimeoutError:
        return f"no answer within {timeout_s:g}s"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    except ValueError as exc:  # a host name that cannot be encoded
        return f"{type(exc).__name__}: {exc}"


def no_collector_message(endpoint: str, problem: str, *, spooling: bool) -> str:
    """The one warning a server gives when no collector answers at ``endpoint``:
    what happens to traces meanwhile and the two ways to see them."""
    port = urllib.parse.urlsplit(endpoint).port or 4318
    kept = (
        "traces wait in the spool until it answers"
        if spooling
        else "traces are dropped after retries"
    )
    return (
        f"no trace collector answers at {endpoint} ({problem}); {kept}. "
        f"To see them: start a collector or Jaeger there "
        f"(docker run --rm -p {port}:4318 -p 16686:16686 jaegertracing/all-in-one, "
        f"then http://localhost:16686), or set OTEL_TRACES_EXPORTER=console to print them "
        f"(none: no export). Serving goes on."
    )


def check_collector_soon(
    config: ExportConfig, environ: Mapping[str, str]
) -> threading.Thread | None:
    """Check once, on a thread of its own (start-up does not wait), that something
    answers at the OTLP endpoint; warn at once if not. None when OTLP is not used."""
    if "otlp" not in config.exporters:
        return None
    spool = environ.get("ZER_VER_EXPORT_SPOOL_DIR", "").strip().lower()
    spooling = config.exporters == ("otlp",) and spool not in ("off", "none")
    log = structlog.get_logger("zerver.export")

    def check() -> None:
        problem = collector_problem(config.endpoint)
        if problem is not None:
            log.warning(
                no_collector_message(config.endpoint, problem, spooling=spooling),
                endpoint=config.endpoint,
                error=problem,
            )

    thread = threading.Thread(target=check, name="zerver-collector-check", daemon=True)
    thread.start()
    return thread


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zerver`` console script."""
    from zerver.trace._logging import configure_logging

    args = _parser().parse_args(argv)
    if args.command == "golden":
        return _golden(args)
    from zerver.http._server import catch_early_signals, serve_from_settings

    catch_early_signals()
    target = "zerver.demo:create_app" if args.command == "demo" else args.app

    try:
        if args.command == "demo" and not os.environ.get("ZER_VER_ZPAGES", "").strip():
            os.environ["ZER_VER_ZPAGES"] = "on"  # the demo shows its traces at /debug/tracez
        settings = _settings(args)
        if args.workers < 1:
            raise ConfigError(f"--workers={args.workers} is invalid: accepted: 1 or more")
        configure_logging(settings.log_format, settings.log_level)
        warn_unknown_variables(os.environ)
        warn_unwired_variables(os.environ)
        # Every worker process builds the app itself from the environment.
        if settings.db_url is None:
            os.environ["ZER_VER_DB_PATH"] = settings.db_path
        os.environ[_APP_ENV] = target
        serving_app(check_only=True)  # fail fast, before binding, on a bad value
        backend, db_target = settings.db_backend
        if backend == "postgresql":  # an unreachable server: one line, exit 2
            from zerver.runtime.interpreters._postgres import probe_postgres

            probe_postgres(db_target)
        export = _export_config()
    except Exception as exc:  # a bad value, or the app's module or factory raised
        line = _failure_line(f"loading {target}", exc, _AppCode(target))
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2
    announce_traces(settings, export, [t for t in (tracez_text(settings),) if t])
    check_collector_soon(export, os.environ)
    try:
        return serve_from_settings(
            "zerver._cli:serving_app",
            settings,
            workers=args.workers,
            describe_failure=worker_failure_line,
        )
    except Exception as exc:  # raised inside the server's task group, so often a group
        line = _failure_line(f"serving {target}", _leaf(exc), _AppCode(target))
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
