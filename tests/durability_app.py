"""The app the durability tests serve with ``zerver run durability_app:app``: one route,
no I/O, so every request's trace is a SERVER span and its step spans."""

from __future__ import annotations

from zerver import App, Context, Done, Response, step


@step()
def hello(ctx: Context) -> Done:
    return Done(Response.json({"n": ctx.params["n"]}))


app = App("durability")
app.get("/hello/{n}", hello)
