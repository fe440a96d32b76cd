"""Every cell of the join table (docs/concepts.md), unit-level and through the runtime."""

from __future__ import annotations

from typing import Any

import pytest

from zerver import (
    App,
    Context,
    DbGet,
    EffectError,
    Join,
    Mode,
    Need,
    load_settings,
    step,
)
from zerver.core._join import JoinState
from zerver.testing import AppClient, FakeInterpreter, RecordCapture

REQ, OPT = True, False
OK, FAIL = True, False

# Each scenario: the effects in the order they finish, as (required, succeeds).
SCENARIOS: dict[str, list[tuple[bool, bool]]] = {
    "all_succeed": [(REQ, OK), (OPT, OK)],
    "optional_fails": [(REQ, OK), (OPT, FAIL)],
    "required_fails": [(REQ, FAIL), (OPT, OK)],
    "optional_fails_first": [(OPT, FAIL), (REQ, OK)],
    "all_fail": [(REQ, FAIL), (OPT, FAIL)],
    "only_optional_all_fail": [(OPT, FAIL), (OPT, FAIL)],
}

# join -> scenario -> (need fails?, effects finished when the join resolves)
TABLE: dict[Join, dict[str, tuple[bool, int]]] = {
    Join.ALL: {
        "all_succeed": (False, 2),
        "optional_fails": (False, 2),
        "required_fails": (True, 1),
        "optional_fails_first": (False, 2),
        "all_fail": (True, 1),
        "only_optional_all_fail": (False, 2),
    },
    Join.ALL_REQUIRED: {
        "all_succeed": (False, 1),
        "optional_fails": (False, 1),
        "required_fails": (True, 1),
        "optional_fails_first": (False, 2),
        "all_fail": (True, 1),
        "only_optional_all_fail": (False, 2),
    },
    Join.ANY: {
        "all_succeed": (False, 1),
        "optional_fails": (False, 1),
        "required_fails": (True, 1),
        "optional_fails_first": (False, 1),
        "all_fail": (True, 1),
        "only_optional_all_fail": (False, 1),
    },
    Join.FIRST_SUCCESS: {
        "all_succeed": (False, 1),
        "optional_fails": (False, 1),
        "required_fails": (False, 2),
        "optional_fails_first": (False, 2),
        "all_fail": (True, 2),
        "only_optional_all_fail": (False, 2),
    },
}

CELLS = [(j, s) for j in TABLE for s in SCENARIOS]


@pytest.mark.parametrize(("join", "scenario"), CELLS)
def test_join_state_cell(join: Join, scenario: str) -> None:
    effects = SCENARIOS[scenario]
    js = JoinState(join, [req for req, _ in effects])
    resolved_at = None
    for i, (req, ok) in enumerate(effects, 1):
        if js.add(success=ok, required=req):
            resolved_at = i
            break
    fails, at = TABLE[join][scenario]
    assert resolved_at == at
    assert js.failure is fails


def test_join_state_refuses_input_after_resolution() -> None:
    js = JoinState(Join.ANY, [True, True])
    assert js.add(success=True, required=True)
    with pytest.raises(RuntimeError):
        js.add(success=True, required=True)


@pytest.mark.anyio
@pytest.mark.parametrize("mode", [Mode.PARALLEL, Mode.SEQUENTIAL])
@pytest.mark.parametrize(("join", "scenario"), CELLS)
async def test_join_cell_through_runtime(join: Join, scenario: str, mode: Mode) -> None:
    effects = SCENARIOS[scenario]
    app = App("j", settings=load_settings({}))
    fake = FakeInterpreter(app.clock)
    for i, (_req, ok) in enumerate(effects):
        if ok:
            fake.on(f"db.get e{i}", result=i)
        else:
            fake.on(f"db.get e{i}", error=EffectError(f"e{i} broke", kind="db_error"))
    app.interpreter("db", fake)
    cap = RecordCapture()
    app.subscribe(cap)

    @step
    def ask(ctx: Context) -> Need:
        return Need(
            [DbGet(table=f"e{i}", key="k", required=req) for i, (req, _) in enumerate(effects)],
            mode=mode,
            join=join,
            then=answer,
        )

    @step
    def answer(ctx: Context) -> Any:
        from zerver import Done, Response

        return Done(Response.text("ok"))

    app.get("/j", ask)
    async with AppClient(app) as c:
        r = await c.get("/j")
    fails, at = TABLE[join][scenario]
    assert r.status == (500 if fails else 200)
    rec = cap.last
    effect_jobs = [j for j in rec.jobs if j.kind == "effect"]
    finished = [j for j in effect_jobs if j.outcome in ("complete", "fail")]
    assert len(finished) == at
    if mode is Mode.SEQUENTIAL:
        assert len(effect_jobs) == at  # effects after resolution are never started
    else:
        assert len(effect_jobs) == len(effects)
        assert all(j.outcome == "cancel" for j in effect_jobs[at:])
    need = rec.steps[1].need
    assert need is not None and need.join_ts is not None
    assert need.completed + need.failed == at
    assert [j.kind for j in rec.jobs].count("continuation") == (0 if fails else 1)
