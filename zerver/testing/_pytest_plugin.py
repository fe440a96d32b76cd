"""pytest plugin: ``--golden-update`` re-records golden traces; the ``golden_update`` fixture.

pytest loads this plugin in every run where zerver is installed, so it imports
nothing of zerver's runtime until a fixture asks for it.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--golden-update",
        action="store_true",
        default=False,
        help="re-record zerver golden trace fixtures instead of comparing",
    )


@pytest.fixture
def golden_update(request: pytest.FixtureRequest) -> bool:
    """True when fixtures should be re-recorded (``--golden-update`` or ZERVER_GOLDEN_UPDATE=1)."""
    from ._golden import update_requested

    return bool(request.config.getoption("--golden-update")) or update_requested()
