"""zerver's contender: the demo blog plus ``GET /items/{id}``.

Served with ``python -m zerver run loadtest.apps.zerver_app:create_app --port P``
(the CLI calls the factory); telemetry is configured from the environment by
the CLI, exactly as for any user's app.
"""

from __future__ import annotations

from zerver import App, Context, Decision, Done, Response, step
from zerver.demo import create_app as create_demo_app

__all__ = ["create_app", "get_item"]


@step
def get_item(ctx: Context) -> Decision:
    item_id = ctx.params["id"]
    return Done(Response.json({"id": item_id, "name": f"item {item_id}"}))


def create_app() -> App:
    """The demo app (``/blogs/posts/{id}``, ...) with the load test's ``/items/{id}`` added."""
    app = create_demo_app()
    app.get("/items/{id}", get_item)
    return app
