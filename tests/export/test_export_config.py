from __future__ import annotations

import pytest

from zerver.core._errors import ConfigError
from zerver.export import ExportConfig, Overflow


def cfg(**env: str) -> ExportConfig:
    return ExportConfig.from_env(env)


def test_defaults() -> None:
    c = cfg()
    assert c == ExportConfig()
    assert c.exporters == ("otlp",)
    assert c.endpoint == "http://localhost:4318/v1/traces"
    assert c.protocol == "http/json"
    assert c.headers == ()
    assert c.timeout_s == 10.0
    assert c.compression == "none"
    assert (c.max_queue_size, c.max_export_batch_size) == (2048, 512)
    assert (c.schedule_delay_s, c.export_timeout_s) == (5.0, 30.0)
    assert c.overflow is Overflow.DROP_NEWEST
    assert c.block_timeout_s == 0.5
    assert (c.breaker_failures, c.breaker_cooldown_s, c.breaker_successes) == (5, 30.0, 2)
    assert (c.rate_spans_per_s, c.rate_bytes_per_s) == (0.0, 0.0)


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4096")
    assert ExportConfig.from_env().max_queue_size == 4096


@pytest.mark.parametrize(
    ("env", "endpoint"),
    [
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://jaeger:4318/custom"},
            "http://jaeger:4318/custom",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"},
            "http://collector:4318/v1/traces",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c.example/otlp/"},
            "https://c.example/otlp/v1/traces",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://a:1/x",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://b:2",
            },
            "http://a:1/x",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, "http://localhost:4318/v1/traces"),
    ],
)
def test_endpoint_precedence(env: dict[str, str], endpoint: str) -> None:
    assert ExportConfig.from_env(env).endpoint == endpoint


def test_signal_specific_overrides_generic() -> None:
    c = cfg(
        OTEL_EXPORTER_OTLP_HEADERS="a=1",
        OTEL_EXPORTER_OTLP_TRACES_HEADERS="b=2",
        OTEL_EXPORTER_OTLP_TIMEOUT="100",
        OTEL_EXPORTER_OTLP_TRACES_TIMEOUT="2500",
        OTEL_EXPORTER_OTLP_COMPRESSION="none",
        OTEL_EXPORTER_OTLP_TRACES_COMPRESSION="gzip",
        OTEL_EXPORTER_OTLP_PROTOCOL="http/json",
        OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="http/protobuf",
    )
    assert c.headers == (("b", "2"),)
    assert c.timeout_s == 2.5
    assert c.compression == "gzip"
    assert c.protocol == "http/protobuf"


def test_generic_values_apply() -> None:
    c = cfg(
        OTEL_EXPORTER_OTLP_HEADERS="api-key=s%3Dcret, x-team = a%2Cb ,",
        OTEL_EXPORTER_OTLP_TIMEOUT="250",
        OTEL_EXPORTER_OTLP_COMPRESSION="GZIP",
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
    )
    assert c.headers == (("api-key", "s=cret"), ("x-team", "a,b"))
    assert c.timeout_s == 0.25
    assert c.compression == "gzip"
    assert c.protocol == "http/protobuf"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("otlp", ("otlp",)),
        ("console", ("console",)),
        ("none", ()),
        ("otlp,console", ("otlp", "console")),
    ],
)
def test_traces_exporter(value: str, expected: tuple[str, ...]) -> None:
    assert cfg(OTEL_TRACES_EXPORTER=value).exporters == expected


def test_valid_overrides() -> None:
    c = cfg(
        OTEL_BSP_MAX_QUEUE_SIZE="100",
        OTEL_BSP_MAX_EXPORT_BATCH_SIZE="10",
        OTEL_BSP_SCHEDULE_DELAY="0",
        OTEL_BSP_EXPORT_TIMEOUT="1500",
        ZER_VER_EXPORT_OVERFLOW="Block",
        ZER_VER_EXPORT_BLOCK_TIMEOUT_MS="20",
        ZER_VER_EXPORT_BREAKER_FAILURES="0",
        ZER_VER_EXPORT_BREAKER_COOLDOWN_MS="250",
        ZER_VER_EXPORT_BREAKER_SUCCESSES="3",
        ZER_VER_EXPORT_RATE_SPANS="1000",
        ZER_VER_EXPORT_RATE_BYTES="1e6",
    )
    assert (c.max_queue_size, c.max_export_batch_size) == (100, 10)
    assert (c.schedule_delay_s, c.export_timeout_s) == (0.0, 1.5)
    assert c.overflow is Overflow.BLOCK
    assert c.block_timeout_s == 0.02
    assert (c.breaker_failures, c.breaker_cooldown_s, c.breaker_successes) == (0, 0.25, 3)
    assert (c.rate_spans_per_s, c.rate_bytes_per_s) == (1000.0, 1e6)
    assert cfg(ZER_VER_EXPORT_OVERFLOW="drop_oldest").overflow is Overflow.DROP_OLDEST


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    [
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "localhost:4318", "http:// or https:// URL"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://x", "http:// or https:// URL"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x:99999", "valid port"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "novalue", "key=value"),
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "=v", "key=value"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "ten", "milliseconds > 0"),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "0", "milliseconds > 0"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd", "gzip, none"),
        ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "br", "gzip, none"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/xml", "http/json, http/protobuf"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc", "OTLP/HTTP"),
        ("OTEL_TRACES_EXPORTER", "zipkin", "otlp, console, none"),
        ("OTEL_TRACES_EXPORTER", "none,otlp", "'none' alone"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0", "integer >= 1"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "x", "integer >= 1"),
        ("OTEL_BSP_SCHEDULE_DELAY", "-1", "milliseconds >= 0"),
        ("OTEL_BSP_EXPORT_TIMEOUT", "1.5", "milliseconds > 0"),
        ("ZER_VER_EXPORT_OVERFLOW", "drop_all", "drop_newest, drop_oldest, block"),
        ("ZER_VER_EXPORT_BLOCK_TIMEOUT_MS", "soon", "milliseconds >= 0"),
        ("ZER_VER_EXPORT_BREAKER_FAILURES", "-1", "integer >= 0"),
        ("ZER_VER_EXPORT_BREAKER_COOLDOWN_MS", "0", "milliseconds > 0"),
        ("ZER_VER_EXPORT_BREAKER_SUCCESSES", "0", "integer >= 1"),
        ("ZER_VER_EXPORT_RATE_SPANS", "-5", "number >= 0"),
        ("ZER_VER_EXPORT_RATE_BYTES", "nan", "number >= 0"),
    ],
)
def test_invalid_value_names_variable_value_and_accepted(
    name: str, value: str, accepted: str
) -> None:
    with pytest.raises(ConfigError) as info:
        cfg(**{name: value})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{name}={value!r}")
    assert accepted in message


def test_batch_larger_than_queue_is_rejected() -> None:
    with pytest.raises(
        ConfigError, match=r"^OTEL_BSP_MAX_EXPORT_BATCH_SIZE=600 .*OTEL_BSP_MAX_QUEUE_SIZE \(500\)"
    ):
        cfg(OTEL_BSP_MAX_QUEUE_SIZE="500", OTEL_BSP_MAX_EXPORT_BATCH_SIZE="600")
