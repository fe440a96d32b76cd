from __future__ import annotations

import functools

import pytest
from server_apps import TRANSPORTS, ConfigFactory

from zerver.http._server import ServerConfig


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=TRANSPORTS)
def config(request: pytest.FixtureRequest) -> ConfigFactory:
    """Local ``ServerConfig`` factory for the transport under test (each test that asks
    for it runs on both transports)."""
    return functools.partial(ServerConfig, host="127.0.0.1", port=0, transport=request.param)
