"""OTLP/HTTP over real TLS on 127.0.0.1: CA bundle, mutual TLS, start-up errors.

Certificates come from ``trustme`` (a throw-away CA per test module); the
receiver is :class:`OtlpReceiver` serving HTTPS on an ephemeral port.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from export_helpers import export_once, make_span

from zerver.core._errors import ConfigError
from zerver.export import (
    ExportConfig,
    ExportPipeline,
    ExportStatus,
    OtlpHttpExporter,
    OtlpReceiver,
    tls_context,
)


@dataclass(frozen=True)
class Pki:
    ca: trustme.CA
    ca_file: str
    client_cert_file: str
    client_key_file: str
    client_combined_file: str
    other_key_file: str
    server_cert: trustme.LeafCert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    client = ca.issue_cert("zerver-client.example")
    client.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    client.private_key_pem.write_to_path(str(d / "client.key"))
    client.private_key_and_cert_chain_pem.write_to_path(str(d / "client-combined.pem"))
    ca.issue_cert("other.example").private_key_pem.write_to_path(str(d / "other.key"))
    return Pki(
        ca=ca,
        ca_file=str(d / "ca.pem"),
        client_cert_file=str(d / "client.pem"),
        client_key_file=str(d / "client.key"),
        client_combined_file=str(d / "client-combined.pem"),
        other_key_file=str(d / "other.key"),
        server_cert=ca.issue_cert("127.0.0.1"),
    )


def server_context(pki: Pki, *, require_client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki.server_cert.configure_cert(ctx)
    if require_client_cert:
        pki.ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@pytest.fixture
def https_receiver(pki: Pki) -> Iterator[OtlpReceiver]:
    with OtlpReceiver(ssl_context=server_context(pki)) as r:
        yield r


@pytest.fixture
def mtls_receiver(pki: Pki) -> Iterator[OtlpReceiver]:
    with OtlpReceiver(ssl_context=server_context(pki, require_client_cert=True)) as r:
        yield r


def export_via_env(env: dict[str, str], n: int = 20) -> ExportPipeline:
    """A pipeline built from ``env`` (as ``zerver run`` builds it) that sent ``n`` spans.

    One attempt per batch: the retry back-off (0.5 s) is longer than the
    100 ms export deadline, so a failed batch is dropped at once, not retried.
    """
    config = ExportConfig.from_env(
        {"OTEL_BSP_SCHEDULE_DELAY": "0", "OTEL_BSP_EXPORT_TIMEOUT": "100", **env}
    )
    pipeline = ExportPipeline.from_config(config)
    for i in range(n):
        pipeline.submit(make_span(i))
    assert pipeline.force_flush(10)
    return pipeline


# -- the exporter over HTTPS --------------------------------------------------


def test_spans_arrive_over_https_with_the_ca_configured(
    https_receiver: OtlpReceiver, pki: Pki
) -> None:
    assert https_receiver.endpoint.startswith("https://127.0.0.1:")
    pipeline = export_via_env(
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": https_receiver.endpoint,
            "OTEL_EXPORTER_OTLP_CERTIFICATE": pki.ca_file,
        }
    )
    report = pipeline.shutdown(5)
    assert report.stats.exported == 20 and report.stats.dropped_total == 0
    assert https_receiver.span_count == 20
    assert https_receiver.tls_failures == 0


def test_without_the_ca_the_export_fails_and_is_counted_not_raised(
    https_receiver: OtlpReceiver,
) -> None:
    # The system trust store does not know the test CA.
    pipeline = export_via_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": https_receiver.endpoint})
    report = pipeline.shutdown(5)
    assert report.completed
    assert report.stats.exported == 0
    assert report.stats.dropped["export_failed"] == 20
    assert https_receiver.span_count == 0 and not https_receiver.requests

    exporter = OtlpHttpExporter(https_receiver.endpoint, timeout_s=5)
    result = export_once(exporter, [make_span(0)])
    assert result.status is ExportStatus.RETRYABLE
    assert "CERTIFICATE_VERIFY_FAILED" in result.detail


def test_a_server_name_that_does_not_match_the_certificate_is_refused(pki: Pki) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki.ca.issue_cert("collector.example").configure_cert(ctx)
    with OtlpReceiver(ssl_context=ctx) as receiver:
        exporter = OtlpHttpExporter(receiver.endpoint, ssl_context=tls_context(pki.ca_file))
        result = export_once(exporter, [make_span(0)])
    assert result.status is ExportStatus.RETRYABLE
    assert "CERTIFICATE_VERIFY_FAILED" in result.detail
    assert receiver.span_count == 0


@pytest.mark.parametrize("key_in_cert_file", [False, True])
def test_mutual_tls_with_a_client_certificate(
    mtls_receiver: OtlpReceiver, pki: Pki, key_in_cert_file: bool
) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": mtls_receiver.endpoint,
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": pki.ca_file,
    }
    if key_in_cert_file:
        env["OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"] = pki.client_combined_file
    else:
        env["OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"] = pki.client_cert_file
        env["OTEL_EXPORTER_OTLP_CLIENT_KEY"] = pki.client_key_file
    report = export_via_env(env).shutdown(5)
    assert report.stats.exported == 20
    assert mtls_receiver.span_count == 20
    assert mtls_receiver.tls_failures == 0


def test_a_server_requiring_client_certificates_rejects_a_client_without_one(
    mtls_receiver: OtlpReceiver, pki: Pki
) -> None:
    pipeline = export_via_env(
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": mtls_receiver.endpoint,
            "OTEL_EXPORTER_OTLP_CERTIFICATE": pki.ca_file,
        }
    )
    report = pipeline.shutdown(5)
    assert report.completed
    assert report.stats.exported == 0
    assert report.stats.dropped["export_failed"] == 20
    assert mtls_receiver.span_count == 0 and not mtls_receiver.requests
    assert mtls_receiver.wait_for_tls_failures(1, timeout=5)


# -- configuration ------------------------------------------------------------


def test_tls_variables_traces_specific_wins(pki: Pki) -> None:
    c = ExportConfig.from_env(
        {
            "OTEL_EXPORTER_OTLP_CERTIFICATE": "/nonexistent/generic-ca.pem",
            "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": pki.ca_file,
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": "/nonexistent/generic.pem",
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE": pki.client_cert_file,
            "OTEL_EXPORTER_OTLP_CLIENT_KEY": "/nonexistent/generic.key",
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY": pki.client_key_file,
        }
    )
    assert (c.certificate, c.client_certificate, c.client_key) == (
        pki.ca_file,
        pki.client_cert_file,
        pki.client_key_file,
    )
    assert isinstance(c.ssl_context(), ssl.SSLContext)
    generic = ExportConfig.from_env({"OTEL_EXPORTER_OTLP_CERTIFICATE": pki.ca_file})
    assert generic.certificate == pki.ca_file and generic.client_certificate is None
    assert ExportConfig.from_env({}).ssl_context() is None


def _config_error(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        ExportConfig.from_env(env)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "name",
    [
        "OTEL_EXPORTER_OTLP_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
    ],
)
def test_missing_file_names_variable_value_and_accepted(name: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    message = _config_error({name: missing})
    assert message.startswith(f"{name}={missing!r} is invalid: expected a readable PEM file")


def test_a_directory_is_not_a_pem_file(tmp_path: Path) -> None:
    message = _config_error({"OTEL_EXPORTER_OTLP_CERTIFICATE": str(tmp_path)})
    assert message.startswith(f"OTEL_EXPORTER_OTLP_CERTIFICATE={str(tmp_path)!r} is invalid")


def test_a_file_without_certificates_is_rejected(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    message = _config_error({"OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": str(junk)})
    assert message.startswith(f"OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE={str(junk)!r} is invalid")
    assert "PEM file of CA certificates" in message


def test_a_client_key_that_does_not_match_is_rejected(pki: Pki) -> None:
    message = _config_error(
        {
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": pki.client_cert_file,
            "OTEL_EXPORTER_OTLP_CLIENT_KEY": pki.other_key_file,
        }
    )
    assert message.startswith(
        f"OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE={pki.client_cert_file!r} with "
        f"OTEL_EXPORTER_OTLP_CLIENT_KEY={pki.other_key_file!r} is invalid"
    )
    assert "matching, unencrypted PEM private key" in message


def test_an_encrypted_client_key_is_rejected_not_prompted_for(pki: Pki, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(Path(pki.client_key_file).read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    message = _config_error(
        {
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": pki.client_cert_file,
            "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(encrypted),
        }
    )
    assert "unencrypted PEM private key" in message


def test_a_client_certificate_without_its_key_is_rejected(pki: Pki) -> None:
    message = _config_error({"OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": pki.client_cert_file})
    assert message.startswith(
        f"OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE={pki.client_cert_file!r} is invalid"
    )
    assert "OTEL_EXPORTER_OTLP_[TRACES_]CLIENT_KEY" in message


def test_a_client_key_without_a_certificate_is_rejected(pki: Pki) -> None:
    message = _config_error({"OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY": pki.client_key_file})
    assert message.startswith(
        f"OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY={pki.client_key_file!r} is invalid"
    )
    assert "CLIENT_CERTIFICATE" in message
