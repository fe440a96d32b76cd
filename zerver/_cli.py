"""The ``zerver`` command: ``zerver run module:app`` and ``zerver demo``."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Iterable, Sequence

from ._app import App
from ._config import Settings, load_settings
from ._errors import ConfigError, UsageError

__all__ = ["main", "serving_app"]


_APP_ENV = "ZERVER_APP"


def serving_app(*, check_only: bool = False) -> App:
    """The app named by ``$ZERVER_APP``, prepared for serving (each worker calls this).

    Configures logging, the access log and trace export from the environment.
    With ``check_only`` it only validates (settings, exporter variables, the
    app import) and starts nothing: the CLI calls it so a bad value stops
    start-up before the port is bound.
    """
    from ._logging import AccessLog, configure_logging
    from ._server import load_app
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
    # Everything built so far lives as long as the process: keep it out of the
    # garbage collector's full passes, which otherwise show up in latency tails.
    gc.freeze()
    return app


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address to bind (default: ZER_VER_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind (default: ZER_VER_PORT or 8080)")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port (default 1)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zerver", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve an app: zerver run module:app")
    run.add_argument("app", help="module:attribute naming an App or a factory returning one")
    _server_args(run)
    demo = sub.add_parser("demo", help="serve the demo blog on SQLite")
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
    from ._server import import_target
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zerver`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "golden":
        return _golden(args)
    from ._server import catch_early_signals, serve_from_settings

    catch_early_signals()

    try:
        settings = _settings(args)
        if args.workers < 1:
            raise ConfigError(f"--workers={args.workers} is invalid: accepted: 1 or more")
        # Every worker process builds the app itself from the environment.
        os.environ["ZER_VER_DB_PATH"] = settings.db_path
        os.environ[_APP_ENV] = "zerver.demo:create_app" if args.command == "demo" else args.app
        serving_app(check_only=True)  # fail fast, before binding, on a bad value
    except (ConfigError, UsageError) as exc:
        print(f"zerver: {exc}", file=sys.stderr)
        return 2
    return serve_from_settings("zerver._cli:serving_app", settings, workers=args.workers)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
