"""Every configuration variable: default, a valid override, an invalid value."""

from __future__ import annotations

import pytest

from zerver import ConfigError, load_settings

# variable -> (attribute, default, valid text, parsed valid value, invalid text, message part)
CASES: dict[str, tuple[str, object, str, object, str | None, str | None]] = {
    "ZER_VER_QUEUE_NAME_EFFECTS": ("queue_name_effects", "effects", "fx", "fx", "a b", "1 to 64"),
    "ZER_VER_QUEUE_NAME_CONT": ("queue_name_cont", "continuations", "k", "k", "x" * 65, "1 to 64"),
    "ZER_VER_QUEUE_CAPACITY_EFFECTS": ("queue_capacity_effects", 1024, "8", 8, "0", ">= 1"),
    "ZER_VER_QUEUE_CAPACITY_CONT": ("queue_capacity_cont", 1024, "8", 8, "x", "whole number"),
    "ZER_VER_WORKERS_EFFECTS": ("workers_effects", 64, "2", 2, "0", ">= 1"),
    "ZER_VER_WORKERS_CONT": ("workers_cont", 4, "2", 2, "-1", ">= 1"),
    "ZER_VER_MAX_NEED_DEPTH": ("max_need_depth", 16, "4", 4, "0", ">= 1"),
    "ZER_VER_HOST": ("host", "127.0.0.1", "0.0.0.0", "0.0.0.0", None, None),
    "ZER_VER_PORT": ("port", 8080, "9000", 9000, "70000", "<= 65535"),
    "ZER_VER_MAX_HEADER_BYTES": ("max_header_bytes", 16384, "32768", 32768, "10", ">= 1024"),
    "ZER_VER_MAX_BODY_BYTES": ("max_body_bytes", 1048576, "10", 10, "-1", ">= 0"),
    "ZER_VER_HEADER_TIMEOUT_S": ("header_timeout_s", 10.0, "2.5", 2.5, "0", "> 0"),
    "ZER_VER_KEEPALIVE_TIMEOUT_S": ("keepalive_timeout_s", 5.0, "1", 1.0, "soon", "a number"),
    "ZER_VER_SHUTDOWN_TIMEOUT_S": ("shutdown_timeout_s", 10.0, "3", 3.0, "0", "> 0"),
    "ZER_VER_BODY_TIMEOUT_S": ("body_timeout_s", 60.0, "5", 5.0, "0", "> 0"),
    "ZER_VER_WRITE_TIMEOUT_S": ("write_timeout_s", 30.0, "5", 5.0, "-1", "> 0"),
    "ZER_VER_MAX_CONNECTIONS": ("max_connections", 1000, "50", 50, "0", ">= 1"),
    "ZER_VER_GC_THRESHOLD": ("gc_threshold", 10000, "700", 700, "-1", ">= 0"),
    "ZER_VER_TRANSPORT": ("transport", "auto", "Streams", "streams", "udp", "'auto', 'streams'"),
    "ZER_VER_DB_PATH": ("db_path", "zerver.sqlite3", "/tmp/x.db", "/tmp/x.db", None, None),
    "ZER_VER_DB_POOL_SIZE": ("db_pool_size", None, "8", 8, "0", ">= 1"),
    "ZER_VER_DB_URL": ("db_url", None, "postgres://h/d", "postgres://h/d", "mysql://h/d", "ql://"),
    "ZER_VER_CACHE_MAX_ENTRIES": ("cache_max_entries", 10000, "5", 5, "0", ">= 1"),
    "ZER_VER_CACHE_TTL_MS": ("cache_ttl_ms", 60000, "5", 5, "0", ">= 1"),
    # The Redis URLs are checked (password masked) by the app: tests/test_redis.py.
    "ZER_VER_CACHE_URL": ("cache_url", None, "redis://h:1/0", "redis://h:1/0", None, None),
    "ZER_VER_BROKER_URL": ("broker_url", None, "redis://h:1/0", "redis://h:1/0", None, None),
    "ZER_VER_BROKER_VISIBILITY_TIMEOUT_MS": (
        "broker_visibility_timeout_ms",
        30000,
        "5",
        5,
        "0",
        ">= 1",
    ),
    "ZER_VER_EXPORT_PROCESS": (
        "export_process",
        "auto",
        "1",
        "on",
        "maybe",
        "'auto', 'on' or 'off'",
    ),
    "ZER_VER_EXPORT_PRIORITY": (
        "export_priority",
        "idle",
        "Normal",
        "normal",
        "high",
        "'idle' or 'normal'",
    ),
    "ZER_VER_DEMO_BASE_URL": (
        "demo_base_url",
        None,
        "http://b:9/",
        "http://b:9/",
        "ftp://x",
        "http:// or https:// URL",
    ),
    "ZER_VER_PROMOTE_QUEUE_MS": ("promote_queue_ms", 5.0, "2.5", 2.5, "-1", ">= 0"),
    "ZER_VER_PROMOTE_P95_MIN_MS": ("promote_p95_min_ms", 1.0, "0.5", 0.5, "-2", ">= 0"),
    "ZER_VER_PROMOTE_PARK_MS": ("promote_park_ms", 5.0, "0", 0.0, "fast", "a number"),
    "ZER_VER_DEBUG_JOBS": ("debug_jobs", False, "1", True, "yes", "0, 1, true, false"),
    "ZER_VER_OTEL_CONTEXT": ("otel_context", True, "0", False, "on", "0, 1, true, false"),
    "ZER_VER_EXPORT_JOB_DEPTH": ("export_job_depth", False, "true", True, "2", "0, 1, true"),
    "ZER_VER_SEMCONV": ("semconv", None, "NEW", "new", "both", "'old', 'new' or 'dup'"),
    "ZER_VER_METRICS_VIEW_ROUTE_P95_WINDOW": (
        "metrics_view_route_p95_window",
        "60s",
        "500",
        "500",
        "1h",
        "duration like 60s",
    ),
    "ZER_VER_SAMPLER": (
        "sampler",
        None,
        "head:0.05,tail:error|p99",
        "head:0.05,tail:error|p99",
        "head:2",
        "head:<ratio 0..1>",
    ),
    "OTEL_TRACES_SAMPLER": (
        "traces_sampler",
        None,
        "TraceIdRatio",
        "traceidratio",
        "jaeger_remote",
        "always_on, always_off",
    ),
    "OTEL_TRACES_SAMPLER_ARG": ("traces_sampler_arg", None, "0.5", "0.5", "2", "from 0 to 1"),
    "OTEL_SERVICE_NAME": ("service_name", None, "blog", "blog", None, None),
    "OTEL_RESOURCE_ATTRIBUTES": ("resource_attributes", "", "a=b", "a=b", "a", "key=value"),
    "OTEL_SEMCONV_STABILITY_OPT_IN": ("semconv_stability_opt_in", "", "http", "http", None, None),
    "ZER_VER_LOG_FORMAT": ("log_format", "auto", "JSON", "json", "xml", "'auto', 'console'"),
    "ZER_VER_LOG_LEVEL": ("log_level", "info", "debug", "debug", "loud", "'debug', 'info'"),
    "ZER_VER_ACCESS_LOG": ("access_log", True, "0", False, "maybe", "0, 1, true, false"),
    # Secrets and limits in telemetry.
    "ZER_VER_REDACT_QUERY_PARAMS": ("redact_query_params", "", "token", "token", "a=b", "names"),
    "ZER_VER_TRACE_EXCEPTION_STACKTRACE": (
        "trace_exception_stacktrace",
        True,
        "0",
        False,
        "no",
        "0, 1, true, false",
    ),
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST": (
        "capture_headers_server_request",
        "",
        "x-a",
        "x-a",
        "x-(",
        "regular expressions",
    ),
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE": (
        "capture_headers_server_response",
        "",
        "x-a",
        "x-a",
        "x-(",
        "regular expressions",
    ),
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST": (
        "capture_headers_client_request",
        "",
        "x-a",
        "x-a",
        "x-(",
        "regular expressions",
    ),
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_RESPONSE": (
        "capture_headers_client_response",
        "",
        "x-a",
        "x-a",
        "x-(",
        "regular expressions",
    ),
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS": (
        "capture_headers_sanitize_fields",
        "",
        "secret",
        "secret",
        "[",
        "regular expressions",
    ),
    "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": (
        "attribute_value_length_limit",
        None,
        "64",
        64,
        "-1",
        ">= 0",
    ),
    "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT": (
        "span_attribute_value_length_limit",
        None,
        "64",
        64,
        "x",
        "whole number",
    ),
    "OTEL_ATTRIBUTE_COUNT_LIMIT": ("attribute_count_limit", 128, "8", 8, "-1", ">= 0"),
    "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": ("span_attribute_count_limit", None, "8", 8, "-1", ">= 0"),
    "OTEL_SPAN_EVENT_COUNT_LIMIT": ("span_event_count_limit", 128, "8", 8, "-1", ">= 0"),
    "OTEL_SPAN_LINK_COUNT_LIMIT": ("span_link_count_limit", 128, "8", 8, "-1", ">= 0"),
    "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT": ("event_attribute_count_limit", None, "8", 8, "-1", ">= 0"),
    "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT": ("link_attribute_count_limit", None, "8", 8, "-1", ">= 0"),
    "ZER_VER_ZPAGES": ("zpages", False, "on", True, "yes", "on, off"),
    "ZER_VER_ZPAGES_PATH": ("zpages_path", "/debug", "/_z/x", "/_z/x", "debug", "/debug"),
    "ZER_VER_ZPAGES_ALLOW": ("zpages_allow", "", "10.0.0.0/8", "10.0.0.0/8", "10.0.0/x", "10.0"),
    "ZER_VER_TRACE_RESPONSE_HEADER": (
        "trace_response_header",
        True,
        "off",
        False,
        "yes",
        "on, off, 1, 0",
    ),
    "ZER_VER_CONSOLE_FORMAT": ("console_format", "tree", "JSONL", "jsonl", "json", "'tree'"),
}


def test_every_setting_has_a_case() -> None:
    from zerver._config import Settings, env_name

    assert {env_name(f) for f in Settings.model_fields} == set(CASES)


@pytest.mark.parametrize("var", sorted(CASES))
def test_default(var: str) -> None:
    attr, default, *_ = CASES[var]
    assert getattr(load_settings({}), attr) == default


@pytest.mark.parametrize("var", sorted(CASES))
def test_valid_override(var: str) -> None:
    attr, _default, text, value, *_ = CASES[var]
    assert getattr(load_settings({var: text}), attr) == value


@pytest.mark.parametrize("var", sorted(v for v, c in CASES.items() if c[4] is not None))
def test_invalid_value_names_variable_value_and_accepted(var: str) -> None:
    *_, bad, accepted = CASES[var]
    assert bad is not None
    with pytest.raises(ConfigError) as err:
        load_settings({var: bad})
    msg = str(err.value)
    assert msg.startswith(f"{var}={bad!r} is invalid: ")
    assert accepted is not None and accepted in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("text", "head", "tail"),
    [
        ("head:1", 1.0, ()),
        ("head:0", 0.0, ()),
        ("head:0.02,tail:error|p99", 0.02, ("error", "p99")),
        (
            "head:0.5,tail:required_failure|slow_queue|p95",
            0.5,
            ("required_failure", "slow_queue", "p95"),
        ),
    ],
)
def test_sampler_grammar(text: str, head: float, tail: tuple[str, ...]) -> None:
    spec = load_settings({"ZER_VER_SAMPLER": text}).sampler_spec
    assert (spec.head_ratio, spec.tail) == (head, tail)


@pytest.mark.parametrize(
    "text",
    [
        "tail:error",
        "head:x",
        "head:-0.1",
        "head:1,tail:",
        "head:1,tail:nope",
        "head:1,tail:error|error",
        "head:1,foo:error",
        "head:1,tail:error,extra",
    ],
)
def test_sampler_grammar_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="ZER_VER_SAMPLER"):
        load_settings({"ZER_VER_SAMPLER": text})


def test_windows() -> None:
    assert load_settings({}).route_window.seconds == 60.0
    assert (
        load_settings({"ZER_VER_METRICS_VIEW_ROUTE_P95_WINDOW": "250ms"}).route_window.seconds
        == 0.25
    )
    assert (
        load_settings({"ZER_VER_METRICS_VIEW_ROUTE_P95_WINDOW": "2m"}).route_window.seconds == 120
    )
    assert load_settings({"ZER_VER_METRICS_VIEW_ROUTE_P95_WINDOW": "100"}).route_window.count == 100


def test_resource_attributes_are_url_decoded() -> None:
    s = load_settings({"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,note=a%20b%2Cc"})
    assert s.resource_attrs == {"deployment.environment": "prod", "note": "a b,c"}


def test_variable_names_are_case_insensitive_and_process_env_is_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ZER_VER_PORT", "1234")
    assert load_settings({}).port == 8080
    assert load_settings().port == 1234
    assert load_settings({"zer_ver_port": "99"}).port == 99


def test_empty_values_mean_unset() -> None:
    s = load_settings({"ZER_VER_SEMCONV": "", "ZER_VER_PORT": "  ", "OTEL_SERVICE_NAME": ""})
    assert s.semconv is None and s.port == 8080 and s.service_name is None
