"""pytest plugin: ``--golden-update`` re-records golden traces; the ``golden_update`` fixture."""

from __future__ import annotations

import pytest

from ._golden import update_requested


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
    return bool(request.config.getoption("--golden-update")) or update_requested()
