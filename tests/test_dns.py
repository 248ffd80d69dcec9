"""DNS checks against a real dnsmasq: answering, NXDOMAIN, SERVFAIL, an empty answer, no answer
at all, a truncated answer (TCP fallback); through a resolv.conf with a search list; and the
series, /alive text and span a user sees of each."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from probe import names
from probe.checks import dns, kernel
from probe.checks.dns import DnsKind, ResolverConfig, candidates, parse_resolv_conf
from probe.checks.pipeline import Pipeline
from probe.checks.result import CheckResult, Target
from probe.checks.targets import plan_round
from probe.checkurls import DnsQuery, parse_dns_url
from probe.neighbours import StaticNeighbours
from probe.settings import Settings
from tests.dns_servers import DnsServers, run_dns_servers
from tests.kind_helpers import Spans, new_metrics, series

RECORDS = {"ok.test": "10.0.0.1", "kubernetes.default.svc.cluster.test": "10.96.0.1"}


@pytest.fixture(scope="module")
def servers() -> Iterator[DnsServers]:
    with run_dns_servers(RECORDS) as running:
        yield running


async def run(url: str, *, settings: Settings | None = None, resolv_conf: str = dns.RESOLV_CONF,
              check_type: str = "lookup") -> tuple[CheckResult, dict[str, float], Spans]:
    metrics = new_metrics()
    spans = Spans()
    settings = settings or Settings()
    kinds = {DnsQuery: DnsKind(settings, resolv_conf=resolv_conf)}
    checker = Pipeline(settings, record=metrics.record, tracer=spans.tracer, kinds=kinds)
    result = await checker.check(Target(check_type, url, parse_dns_url(url)))
    return result, series(metrics, check_type), spans


def ok_series(check_type: str = "lookup") -> dict[str, float]:
    t = f'type="{check_type}"'
    return {
        f'kubenurse_httpclient_requests_total{{code="ok",{t}}}': 1.0,
        f"kubenurse_httpclient_request_duration_seconds_count{{{t}}}": 1.0,
        f'kubenurse_httpclient_trace_request_duration_seconds_count{{event="dns_start",{t}}}': 1.0,
        f'kubenurse_httpclient_trace_request_duration_seconds_count{{event="dns_done",{t}}}': 1.0,
    }


def failed_series(*, answered: bool) -> dict[str, float]:
    t = 'type="lookup"'
    expected = {
        f'kubenurse_httpclient_requests_total{{code="round_trip_error",{t}}}': 1.0,
        f'kubenurse_errors_total{{event="dns_done",{t}}}': 1.0,
        f'kubenurse_httpclient_trace_request_duration_seconds_count{{event="dns_start",{t}}}': 1.0,
    }
    if answered:  # an answer came (NXDOMAIN, SERVFAIL, empty): dns_done happened, and took this long
        expected[f'kubenurse_httpclient_trace_request_duration_seconds_count{{event="dns_done",{t}}}'] = 1.0
        expected[f"kubenurse_httpclient_request_duration_seconds_count{{{t}}}"] = 1.0
    return expected


async def test_answer_is_ok_with_dns_events_and_a_span(servers: DnsServers) -> None:
    result, seen, spans = await run(f"dns://{servers.dnsmasq}/ok.test")
    assert result.summary == "ok"
    assert list(result.events) == [names.DNS_START, names.DNS_DONE]
    assert result.events[names.DNS_START] == 0.0
    assert result.duration == result.events[names.DNS_DONE]
    assert 0 < result.duration < 1
    assert result.status_code is None
    assert seen == ok_series()
    (span,) = spans.named("check lookup")
    assert span.kind == SpanKind.CLIENT
    assert span.status.status_code == StatusCode.UNSET
    attrs = dict(span.attributes or {})
    assert attrs[names.ATTR_CHECK_TYPE] == "lookup"
    assert attrs["dns.question.name"] == "ok.test"
    assert attrs["dns.question.type"] == "A"
    assert attrs["dns.answer.count"] == 1
    assert attrs["dns.response_code"] == "NOERROR"
    assert (attrs["server.address"], attrs["server.port"]) == (servers.address, 53)
    assert attrs["network.transport"] == "udp"
    assert set(spans.children(span)) == {"dns"}


async def test_nxdomain_fails_at_dns_done(servers: DnsServers) -> None:
    result, seen, spans = await run(f"dns://{servers.dnsmasq}/nope.test")
    assert result.summary == "dns_done: NXDOMAIN: nope.test does not exist"
    assert result.error_event == names.DNS_DONE
    assert seen == failed_series(answered=True)
    (span,) = spans.named("check lookup")
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["error.type"] == "NXDOMAIN"
    assert span.attributes[names.ATTR_ERROR_EVENT] == "dns_done"
    assert span.attributes["dns.answer.count"] == 0


async def test_servfail_fails_at_dns_done(servers: DnsServers) -> None:
    result, seen, _ = await run(f"dns://{servers.dnsmasq}/x.broken.test")
    assert result.summary == f"dns_done: SERVFAIL from {servers.dnsmasq} for x.broken.test"
    assert seen == failed_series(answered=True)


async def test_empty_answer_fails_at_dns_done(servers: DnsServers) -> None:
    result, seen, _ = await run(f"dns://{servers.dnsmasq}/ok.test?type=AAAA")
    assert result.summary == "dns_done: no AAAA record for ok.test (empty answer)"
    assert seen == failed_series(answered=True)


async def test_no_answer_times_out_at_dns_done(servers: DnsServers) -> None:
    started = time.monotonic()
    result, seen, spans = await run(
        f"dns://127.0.0.1:{servers.silent_port}/ok.test", settings=Settings(check_timeout=0.3)
    )
    assert 0.3 <= time.monotonic() - started < 2
    assert result.summary == f"dns_done: no answer from 127.0.0.1:{servers.silent_port} within 0.3s"
    assert list(result.events) == [names.DNS_START]
    assert result.duration is None
    assert seen == failed_series(answered=False)
    (span,) = spans.named("check lookup")
    assert span.attributes is not None and span.attributes["error.type"] == "timeout"
    dns_child = spans.children(span)["dns"]
    assert dns_child.status.status_code == StatusCode.ERROR


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses UDP and TCP for as long as the block runs: held by a UDP
    socket connected elsewhere (Linux delivers it nothing from other peers and answers them
    with "port unreachable") and a TCP socket that never listens (a SYN gets a reset). No
    other server can take the port meanwhile (a port merely found free could be: dnsmasq
    forwards from random UDP ports)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
            udp.bind(("127.0.0.1", 0))
            udp.connect(("127.0.0.1", 9))
            port = int(udp.getsockname()[1])
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            yield port
            return
    raise RuntimeError("no loopback port free for both UDP and TCP")


async def test_refused_port_fails_at_dns_done(servers: DnsServers) -> None:
    with refusing_port() as port:
        result, _, _ = await run(f"dns://127.0.0.1:{port}/ok.test")
    assert result.summary == f"dns_done: 127.0.0.1:{port} refused (nothing listens on that port)"


async def test_truncated_answer_is_asked_again_over_tcp(servers: DnsServers) -> None:
    result, seen, spans = await run(f"dns://{servers.dnsmasq}/big.test?type=TXT")
    assert result.summary == "ok", result.summary
    assert seen == ok_series()
    (span,) = spans.named("check lookup")
    assert span.attributes is not None
    assert span.attributes["network.transport"] == "tcp"
    assert span.attributes["dns.answer.count"] == 4


def resolv_conf(tmp_path: Path, servers: DnsServers, *lines: str) -> str:
    path = tmp_path / "resolv.conf"
    path.write_text("\n".join([f"nameserver {servers.address}", *lines]) + "\n")
    return str(path)


async def test_pods_resolver_uses_the_search_list(servers: DnsServers, tmp_path: Path) -> None:
    conf = resolv_conf(tmp_path, servers, "search default.svc.cluster.test svc.cluster.test", "options ndots:5")
    result, seen, spans = await run("dns://kubernetes.default", resolv_conf=conf)
    assert result.summary == "ok", result.summary
    assert seen == ok_series()
    (span,) = spans.named("check lookup")
    assert span.attributes is not None
    # default.svc.cluster.test first (NXDOMAIN), then svc.cluster.test: as glibc does.
    assert span.attributes["dns.question.name"] == "kubernetes.default.svc.cluster.test"


async def test_pods_resolver_reports_the_name_as_given(servers: DnsServers, tmp_path: Path) -> None:
    conf = resolv_conf(tmp_path, servers, "search svc.cluster.test", "options ndots:5")
    result, _, _ = await run("dns://missing.cluster.test", resolv_conf=conf)
    assert result.summary == "dns_done: NXDOMAIN: missing.cluster.test does not exist"


async def test_failed_resolution_counts_every_name_tried(
    servers: DnsServers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Enough dots: the name as given first (NXDOMAIN, and what /alive reports), then the search
    # list (NXDOMAIN too). Each real exchange is made to weigh 50 ms more, so the figure must
    # hold both of them.
    real = dns.exchange
    asked: list[str] = []

    async def heavier(query: Any, server: tuple[str, int], timeout: float) -> dns.Exchange:
        asked.append(str(query.question[0].name))
        answer = await real(query, server, timeout)
        return dataclasses.replace(answer, network_ns=answer.network_ns + 50_000_000)

    monkeypatch.setattr(dns, "exchange", heavier)
    conf = resolv_conf(tmp_path, servers, "search svc.cluster.test")
    result, _, _ = await run("dns://missing.cluster.test", resolv_conf=conf)
    assert asked == ["missing.cluster.test.", "missing.cluster.test.svc.cluster.test."]
    assert result.summary == "dns_done: NXDOMAIN: missing.cluster.test does not exist"
    assert 0.1 <= result.events[names.DNS_DONE] < 0.2


async def test_pods_resolver_tries_the_next_nameserver(servers: DnsServers, tmp_path: Path) -> None:
    # A resolv.conf has no ports: a first nameserver that is not there refuses, the second answers.
    path = tmp_path / "resolv.conf"
    path.write_text(f"nameserver 127.0.0.1\nnameserver {servers.address}\noptions timeout:1\n")
    result, _, spans = await run("dns://ok.test", resolv_conf=str(path))
    assert result.summary == "ok", result.summary
    (span,) = spans.named("check lookup")
    assert span.attributes is not None and span.attributes["server.address"] == servers.address


def test_resolv_conf_is_read_as_glibc_does() -> None:
    config = parse_resolv_conf(
        "# comment\nnameserver 10.96.0.10\nnameserver fd00::10\nnameserver 10.0.0.3\nnameserver 10.0.0.4\n"
        "domain ignored.example\nsearch ns.svc.cluster.local svc.cluster.local cluster.local\n"
        "options ndots:5 timeout:2 attempts:3 rotate\n"
    )
    assert config == ResolverConfig(
        nameservers=(("10.96.0.10", 53), ("fd00::10", 53), ("10.0.0.3", 53)),
        search=("ns.svc.cluster.local", "svc.cluster.local", "cluster.local"),
        ndots=5,
        timeout=2.0,
        attempts=3,
    )
    assert parse_resolv_conf("") == ResolverConfig()


def test_candidates_follow_ndots() -> None:
    config = ResolverConfig(search=("ns.svc.cluster.local", "svc.cluster.local"), ndots=5)
    assert candidates("kubernetes.default", config) == [
        "kubernetes.default.ns.svc.cluster.local.",
        "kubernetes.default.svc.cluster.local.",
        "kubernetes.default.",
    ]
    assert candidates("a.b.c.d.e.f", config)[0] == "a.b.c.d.e.f."
    assert candidates("example.com.", config) == ["example.com."]


async def test_loop_delay_is_not_in_the_figure(servers: DnsServers) -> None:
    if not kernel.capabilities().rx_timestamps:
        pytest.skip(f"this kernel has no receive timestamps: {kernel.capabilities().describe()}")
    checker = Pipeline(Settings())
    url = f"dns://{servers.dnsmasq}/ok.test"
    task = asyncio.create_task(checker.check(Target("lookup", url, parse_dns_url(url))))
    await asyncio.sleep(0)  # the query is sent; the answer arrives while the loop is blocked
    time.sleep(0.3)
    result = await task
    assert result.ok, result.summary
    assert result.events[names.DNS_DONE] < 0.1, result.events


def test_dns_cluster_is_built_in_and_can_be_turned_off() -> None:
    hood = StaticNeighbours.unavailable("test").current()
    on = plan_round(Settings(kubernetes_service_host="10.96.0.1"), hood)
    (target,) = [t for t in on.targets if t.check_type == names.DNS_CLUSTER]
    assert (target.kind, target.url) == (names.KIND_DNS, "dns://kubernetes.default.svc.cluster.local")
    off = plan_round(Settings(kubernetes_service_host="10.96.0.1", check_dns_cluster=False), hood)
    (skipped,) = [r for r in off.skipped if r.check_type == names.DNS_CLUSTER]
    assert skipped.summary == "skipped"
    assert skipped.skip_reason == "disabled by KUBENURSE_CHECK_DNS_CLUSTER"
    outside = plan_round(Settings(), hood)
    assert [r.skip_reason for r in outside.skipped if r.check_type == names.DNS_CLUSTER] == [
        "KUBERNETES_SERVICE_HOST not set (not in a cluster)"
    ]
