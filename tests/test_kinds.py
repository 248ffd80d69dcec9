"""Extra checks by URL scheme, end to end in one probe: what KUBENURSE_EXTRA_CHECKS accepts
and refuses (exit 2 naming the entry), and what /alive and /metrics then show for dns://,
tcp:// and https:// checks against real local servers."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from probe import names
from probe.app import Probe
from probe.checkurls import DnsQuery, TcpEndpoint, parse_dns_url, parse_tcp_url
from probe.neighbours import StaticNeighbours
from probe.settings import ExtraCheck, Settings, SettingsError, load_settings, parse_extra_checks
from tests.conftest import StartTarget, free_port
from tests.dns_servers import DnsServers, run_dns_servers


def test_extra_checks_by_scheme() -> None:
    checks = parse_extra_checks(
        "web:https://example.com/|db:tcp://db.internal:5432|"
        "cdns:dns://10.96.0.10/kubernetes.default.svc.cluster.local?type=AAAA|local:dns://example.com|"
        "nodelocal:dns://169.254.20.10:53/example.com"
    )
    assert checks == (
        ExtraCheck("web", "https://example.com/", names.KIND_HTTP),  # as given (issue 10 #4)
        ExtraCheck("db", "tcp://db.internal:5432", names.KIND_TCP),
        ExtraCheck("cdns", "dns://10.96.0.10/kubernetes.default.svc.cluster.local?type=AAAA", names.KIND_DNS),
        ExtraCheck("local", "dns://example.com", names.KIND_DNS),
        ExtraCheck("nodelocal", "dns://169.254.20.10:53/example.com", names.KIND_DNS),
    )


def test_dns_urls_say_whom_to_ask() -> None:
    assert parse_dns_url("dns://kubernetes.default") == DnsQuery("kubernetes.default", "A", None)
    assert parse_dns_url("dns:///example.com.?type=srv") == DnsQuery("example.com", "SRV", None)
    assert parse_dns_url("dns://10.96.0.10/a.b") == DnsQuery("a.b", "A", ("10.96.0.10", 53))
    assert parse_dns_url("dns://[fd00::10]:5353/a.b?type=AAAA") == DnsQuery("a.b", "AAAA", ("fd00::10", 5353))
    assert parse_tcp_url("tcp://[fd00::1]:5432") == TcpEndpoint("fd00::1", 5432)


def test_dns_cluster_skips_an_ip_address() -> None:
    from probe.checks.targets import plan_round

    plan = plan_round(
        Settings(kubernetes_service_host="10.96.0.1", kubernetes_service_dns="10.96.0.1"),
        StaticNeighbours.unavailable("test").current(),
    )
    assert [r.skip_reason for r in plan.skipped if r.check_type == names.DNS_CLUSTER] == [
        "KUBERNETES_SERVICE_DNS is an IP: nothing to resolve"
    ]


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("x:ftp://example.com", "unknown scheme 'ftp'"),
        ("x:dns://", "has no name"),
        ("x:dns://10.96.0.10/", "has no name"),
        ("x:dns://example.com?type=BOGUS", "unknown query type 'BOGUS'"),
        ("x:dns://coredns.local/example.com", "must be an IP address"),
        ("x:tcp://db.internal", "has no port"),
        ("x:tcp://:5432", "has no host"),
        ("dns_cluster:dns://example.com", "built-in"),
    ],
)
def test_bad_entries_name_the_variable_and_the_entry(entry: str, reason: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"KUBENURSE_EXTRA_CHECKS": f"ok:http://x|{entry}"})
    message = str(info.value)
    assert "KUBENURSE_EXTRA_CHECKS" in message
    assert f"{entry!r}" in message, message
    assert reason in message, message


def test_command_exits_2_naming_the_entry() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "probe"], env={"PATH": "/usr/bin:/bin", "KUBENURSE_EXTRA_CHECKS": "db:tcp://db"},
        capture_output=True, text=True, timeout=15, cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert "KUBENURSE_EXTRA_CHECKS" in line and "'db:tcp://db'" in line and "has no port" in line


# --- one probe, every kind --------------------------------------------------------------


@pytest.fixture(scope="module")
def servers() -> Iterator[DnsServers]:
    with run_dns_servers({"ok.test": "10.0.0.1"}) as running:
        yield running


@pytest.fixture
def listener() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield server.getsockname()[1]


EXPIRES = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)


async def test_alive_and_metrics_show_every_kind(
    servers: DnsServers, listener: int, start_target: StartTarget, ca: trustme.CA, ca_file: Path
) -> None:
    import ssl

    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", not_after=EXPIRES).configure_cert(tls)
    web = await start_target(ssl_context=tls)
    closed = free_port()
    port = free_port()
    checks = "|".join(
        [
            f"dnsok:dns://{servers.dnsmasq}/ok.test",
            f"dnsbad:dns://{servers.dnsmasq}/nope.test",
            f"open:tcp://127.0.0.1:{listener}",
            f"closed:tcp://127.0.0.1:{closed}",
            f"web:{web.url}/alwayshappy",
        ]
    )
    settings = load_settings(
        {
            "KUBENURSE_LISTEN_HOST": "127.0.0.1",
            "KUBENURSE_HTTP_PORT": str(port),
            "KUBENURSE_CHECK_INTERVAL": "10s",
            "KUBENURSE_EXTRA_CHECKS": checks,
            "KUBENURSE_EXTRA_CA": str(ca_file),
            "POD_NAME": "pod-a",
        }
    )
    probe = Probe(settings, StaticNeighbours.unavailable("test"))
    await probe.start()
    try:
        while probe.prober.rounds < 1:
            await asyncio.sleep(0.02)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/alive") as resp:
                status, alive = resp.status, await resp.json()
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                text = await resp.text()
    finally:
        await probe.stop()
    assert status == 500  # two checks fail
    results = alive["last_check_result"]
    assert results["dnsok"] == "ok"
    assert results["dnsbad"] == "dns_done: NXDOMAIN: nope.test does not exist"
    assert results["open"] == "ok"
    assert results["closed"] == f"connect_done: connection refused by 127.0.0.1:{closed}"
    assert results["web"] == "ok"
    assert results["dns_cluster"] == "skipped"  # not in a cluster

    counted = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in ("kubenurse_httpclient_requests_total", "kubenurse_errors_total"):
                counted[(s.name, s.labels["type"], s.labels.get("code") or s.labels.get("event"))] = s.value
            if s.name == "kubenurse_tls_certificate_expiry_timestamp_seconds":
                counted[(s.name, s.labels["type"], "")] = s.value
    assert counted == {
        ("kubenurse_httpclient_requests_total", "dnsok", "ok"): 1,
        ("kubenurse_httpclient_requests_total", "dnsbad", "round_trip_error"): 1,
        ("kubenurse_errors_total", "dnsbad", "dns_done"): 1,
        ("kubenurse_httpclient_requests_total", "open", "ok"): 1,
        ("kubenurse_httpclient_requests_total", "closed", "round_trip_error"): 1,
        ("kubenurse_errors_total", "closed", "connect_done"): 1,
        ("kubenurse_httpclient_requests_total", "web", "200"): 1,
        ("kubenurse_tls_certificate_expiry_timestamp_seconds", "web", ""): EXPIRES.timestamp(),
    }
    assert "# TYPE kubenurse_tls_certificate_expiry_timestamp_seconds gauge" in text
