"""The test service the W3C Trace Context test suite calls, written with zerver.

The suite (https://github.com/w3c/trace-context, folder ``test/``) POSTs a JSON
list of ``{"url": ..., "arguments": ...}`` with trace context headers; for each
element the service POSTs ``arguments`` as JSON to ``url``. Each call is an
:class:`~zerver.HttpPost` effect, so what the suite checks is zerver's own
propagation: the incoming headers parsed by the server, the outgoing ones
written by the HTTP interpreter.

It calls whatever URLs it is told to, so it only ever listens on 127.0.0.1;
it is a conformance fixture, not an example of a service to deploy. Run it,
then the suite from a clone of w3c/trace-context kept outside this repository
(it needs ``aiohttp``; docs/propagation.md, "How to run the W3C suite")::

    python tests/w3c/service.py 5000
    cd trace-context/test && STRICT_LEVEL=2 SPEC_LEVEL=2 python test.py http://127.0.0.1:5000/test
"""

from __future__ import annotations

import sys
from typing import Any

from zerver import (
    App,
    Context,
    Decision,
    Done,
    Fail,
    HttpInterpreter,
    HttpPost,
    Mode,
    Need,
    Response,
    ServerConfig,
    load_settings,
    run,
    step,
)


def calls(body: Any) -> list[HttpPost]:
    """One ``HttpPost`` per element of the suite's instruction list, in order."""
    if not isinstance(body, list):
        return []
    effects = []
    for i, action in enumerate(body):
        if isinstance(action, dict) and isinstance(action.get("url"), str):
            arguments = action.get("arguments") or []
            effects.append(
                HttpPost(url=action["url"], json=arguments, name=f"callback-{i}", timeout_ms=5000)
            )
    return effects


@step
def relay(ctx: Context) -> Decision:
    try:
        body = ctx.request.json()
    except ValueError:
        return Fail(400, "the body is not JSON")
    effects = calls(body)
    if not effects:
        return Done(Response.json({"calls": 0}))
    # In order: the suite's callbacks are numbered as listed.
    return Need(effects, mode=Mode.SEQUENTIAL, then=answer)


@step
def answer(ctx: Context) -> Decision:
    return Done(Response.json({"done": True}))


def create_app(http: HttpInterpreter | None = None) -> App:
    """The service: ``POST /test`` relays the suite's instructions (through
    ``http`` when given, e.g. one on an ``httpx.MockTransport`` in tests)."""
    app = App("w3c-trace-context", settings=load_settings({}))
    if http is not None:
        app.interpreter("http", http)
    app.post("/test", relay)
    return app


app = create_app()

if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    sys.exit(run(app, ServerConfig(host="127.0.0.1", port=port)))
