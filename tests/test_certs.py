"""Certificate expiry: notAfter read from DER, and every HTTPS check reporting the earliest
notAfter its peer presented, also when verification failed (expired, self-signed)."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trustme
from cryptography import x509

from probe import names
from probe.checks.certs import earliest_not_after, not_after
from probe.checks.pipeline import Pipeline
from probe.checks.result import CheckResult, Target
from probe.settings import Settings
from tests.conftest import StartTarget
from tests.kind_helpers import new_metrics, series

IN_FIVE_YEARS = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)  # UTCTime in the certificate
AFTER_2050 = datetime(2055, 1, 2, 3, 4, 5, tzinfo=UTC)  # GeneralizedTime


def leaf_der(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def ca_der(ca: trustme.CA) -> bytes:
    return ssl.PEM_cert_to_DER_cert(ca.cert_pem.bytes().decode())


def test_not_after_reads_both_time_encodings(ca: trustme.CA) -> None:
    assert not_after(leaf_der(ca.issue_cert("a.test", not_after=IN_FIVE_YEARS))) == IN_FIVE_YEARS.timestamp()
    assert not_after(leaf_der(ca.issue_cert("b.test", not_after=AFTER_2050))) == AFTER_2050.timestamp()


def test_earliest_of_the_chain_wins_and_garbage_hides_nothing(ca: trustme.CA) -> None:
    intermediate = ca.create_child_ca()
    later = datetime(3010, 1, 1, tzinfo=UTC)  # after the CA's own notAfter (trustme: year 3000)
    leaf = leaf_der(intermediate.issue_cert("c.test", not_after=later))
    intermediate_der = ca_der(intermediate)
    expected = x509.load_der_x509_certificate(intermediate_der).not_valid_after_utc.timestamp()
    assert expected < later.timestamp()
    assert earliest_not_after([leaf, intermediate_der, b"\x30\x03garbage"]) == expected
    assert earliest_not_after([]) is None


def server_context(cert: trustme.LeafCert | trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if isinstance(cert, trustme.CA):  # a self-signed certificate: the CA's own, as a server's
        with (
            cert.cert_pem.tempfile() as cert_path,
            cert.private_key_pem.tempfile() as key_path,
        ):
            context.load_cert_chain(cert_path, key_path)
    else:
        cert.configure_cert(context)
    return context


async def check(settings: Settings, url: str) -> tuple[CheckResult, dict[str, float]]:
    metrics = new_metrics()
    checker = Pipeline(settings, record=metrics.record)
    await checker.start()
    try:
        result = await checker.check(Target("secure", url))
    finally:
        await checker.close()
    return result, series(metrics, "secure")


GAUGE = 'kubenurse_tls_certificate_expiry_timestamp_seconds{type="secure"}'


async def test_verified_peer_reports_its_expiry(ca: trustme.CA, ca_file: Path, start_target: StartTarget) -> None:
    server = await start_target(ssl_context=server_context(ca.issue_cert("127.0.0.1", not_after=IN_FIVE_YEARS)))
    result, seen = await check(Settings(extra_ca_file=str(ca_file)), f"{server.url}/alwayshappy")
    assert result.summary == "ok"
    assert result.cert_not_after == IN_FIVE_YEARS.timestamp()
    assert seen[GAUGE] == IN_FIVE_YEARS.timestamp()
    assert seen['kubenurse_httpclient_requests_total{code="200",type="secure"}'] == 1


async def test_expired_certificate_fails_and_still_reports_when_it_expired(
    ca: trustme.CA, ca_file: Path, start_target: StartTarget
) -> None:
    expired = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)
    cert = ca.issue_cert("127.0.0.1", not_before=expired - timedelta(days=90), not_after=expired)
    server = await start_target(ssl_context=server_context(cert))
    result, seen = await check(Settings(extra_ca_file=str(ca_file)), f"{server.url}/alwayshappy")
    assert result.error_event == names.TLS_HANDSHAKE_DONE
    assert result.summary == (
        f"tls_handshake_done: certificate of 127.0.0.1:{server.port} not accepted: certificate has expired"
    )
    assert result.cert_not_after == expired.timestamp()
    assert seen[GAUGE] == expired.timestamp()
    assert seen['kubenurse_errors_total{event="tls_handshake_done",type="secure"}'] == 1


async def test_self_signed_certificate_fails_and_still_reports_its_expiry(start_target: StartTarget) -> None:
    self_signed = trustme.CA()
    expected = x509.load_der_x509_certificate(ca_der(self_signed)).not_valid_after_utc.timestamp()
    server = await start_target(ssl_context=server_context(self_signed))
    result, seen = await check(Settings(), f"{server.url}/alwayshappy")
    assert result.error_event == names.TLS_HANDSHAKE_DONE
    assert "self-signed certificate" in result.summary, result.summary
    assert seen[GAUGE] == expected


async def test_insecure_check_reports_the_expiry_too(ca: trustme.CA, start_target: StartTarget) -> None:
    server = await start_target(ssl_context=server_context(ca.issue_cert("127.0.0.1", not_after=IN_FIVE_YEARS)))
    result, seen = await check(Settings(insecure=True), f"{server.url}/alwayshappy")
    assert result.summary == "ok"
    assert seen[GAUGE] == IN_FIVE_YEARS.timestamp()


async def test_plain_http_has_no_expiry(start_target: StartTarget) -> None:
    server = await start_target()
    result, seen = await check(Settings(), f"{server.url}/alwayshappy")
    assert result.ok and result.cert_not_after is None
    assert GAUGE not in seen
