"""The demo blog service (``zerver demo``)."""

from ._blog import SEED_AUTHORS, SEED_COMMENTS, SEED_POSTS, create_app

__all__ = ["SEED_AUTHORS", "SEED_COMMENTS", "SEED_POSTS", "create_app"]
