"""The semantic-convention table and the root-attribute templates, property-tested."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from zerver import VirtualClock
from zerver.trace import RequestRecord
from zerver.trace._semconv import MODES, SERVER_ROWS, SemConv

# Few values per shape fact, so records often share a shape (and a template);
# any values for the per-request facts.
shape_facts = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "POST"]),
        "route": st.sampled_from([None, "/posts/{id}"]),
        "host": st.sampled_from([None, "example.com", "example.com:8443", "[::1]:9000"]),
        "user_agent": st.sampled_from([None, "ua/1"]),
        "client_address": st.sampled_from([None, "10.0.0.1"]),
        "status": st.sampled_from([0, 200, 404, 500, 503]),
        "request_body_size": st.sampled_from([0, 12]),
        "system_fault": st.booleans(),
    }
)
request_facts = st.fixed_dictionaries(
    {
        "path": st.text(min_size=1, max_size=12),
        "query": st.sampled_from(["", "a=1", "q=x&b=2"]),
        "client_port": st.one_of(st.none(), st.integers(1, 65535)),
        "response_body_size": st.integers(0, 10**6),
    }
)


def record(shape: dict[str, object], per_request: dict[str, object]) -> RequestRecord:
    rec = RequestRecord(VirtualClock())
    for name, value in {**shape, **per_request}.items():
        setattr(rec, name, value)
    rec.server_address, rec.server_port = "127.0.0.1", 8080
    return rec


@settings(max_examples=60)
@given(
    st.sampled_from(MODES),
    st.lists(shape_facts, min_size=1, max_size=3),
    st.lists(st.tuples(st.integers(0, 2), request_facts), min_size=1, max_size=12),
)
def test_templates_give_what_the_table_gives(
    mode: str,
    shapes: list[dict[str, object]],
    requests: list[tuple[int, dict[str, object]]],
) -> None:
    # However requests of a few shapes interleave, copying a template and writing
    # the per-request facts equals writing every fact from the table.
    semconv = SemConv(mode)
    for which, per_request in requests:
        rec = record(shapes[which % len(shapes)], per_request)
        attrs = semconv.server_attributes(rec)
        assert attrs == semconv._server_facts(rec)
        attrs["mutated"] = True  # each request gets its own dict


def test_every_row_key_is_emitted_in_its_modes() -> None:
    rec = record(
        {"method": "GET", "route": "/r", "host": "h:81", "user_agent": "ua", "status": 503,
         "client_address": "10.0.0.1", "request_body_size": 3, "system_fault": False},
        {"path": "/r", "query": "a=1", "client_port": 5000, "response_body_size": 9},
    )  # fmt: skip
    for mode in MODES:
        keys = set(SemConv(mode).server_attributes(rec))
        for new, old in SERVER_ROWS.values():
            if new:
                assert (new in keys) == (mode != "old") or new == old
            if old:
                assert (old in keys) == (mode != "new") or new == old
