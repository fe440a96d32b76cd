"""Set-up the tests share: an app on a virtual clock with a fake database, an app
served on a real socket, exporter variables that point at an OTLP receiver, and an
interpreter with nothing to open or close."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio
import pytest

from zerver import App, Broker, ServerConfig, Settings, VirtualClock, serve
from zerver.testing import FakeInterpreter

if TYPE_CHECKING:
    from zerver.export import OtlpReceiver


def app_with_fake_db(
    name: str,
    settings: Settings,
    *,
    rng: random.Random | None = None,
    broker: Broker | None = None,
) -> tuple[App, VirtualClock, FakeInterpreter]:
    """An app on a virtual clock whose ``db`` interpreter is a fake on the same clock."""
    clock = VirtualClock()
    app = App(name, clock=clock, settings=settings, rng=rng, broker=broker)
    fake = FakeInterpreter(clock)
    app.interpreter("db", fake)
    return app, clock, fake


@contextlib.asynccontextmanager
async def served(app: App) -> AsyncIterator[str]:
    """Serve ``app`` on a free port of 127.0.0.1 while the block runs; yields its base URL."""
    shutdown = anyio.Event()
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            functools.partial(serve, app, ServerConfig(port=0), shutdown=shutdown)
        )
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            shutdown.set()


def receiver_env(receiver: OtlpReceiver, **env: str) -> dict[str, str]:
    """Exporter variables that send to ``receiver`` over OTLP/HTTP, then ``env``."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", **env}


class NothingToOpen:
    """``start`` and ``aclose`` of an interpreter that holds no resource."""

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def require(missing: str | None) -> None:
    """Skip the test when something it needs is ``missing`` (a reason), except under
    ``CI=true``, where CI installs everything and a missing piece is a failure."""
    if missing is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{missing}, and CI=true requires it")
    pytest.skip(missing)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
