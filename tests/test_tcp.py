"""TCP checks against real loopback sockets: a listener, a refused port, a black-holed port
(a listener whose accept queue is full drops further SYNs), a name resolved first; and the
series, /alive text and span a user sees of each."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from probe import names
from probe.checks import kernel
from probe.checks.pipeline import Pipeline
from probe.checks.result import CheckResult, Target
from probe.checks.tcp import TcpKind
from probe.checkurls import TcpEndpoint, parse_tcp_url
from probe.settings import Settings
from tests.conftest import free_port
from tests.dns_servers import DnsServers, run_dns_servers
from tests.kind_helpers import Spans, new_metrics, series


@pytest.fixture
def listener() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port whose SYNs go unanswered: backlog 0 holds one connection; once it is taken,
    Linux drops further SYNs instead of refusing them."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        fillers = []
        for _ in range(2):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.1)
        yield port
        for filler in fillers:
            filler.close()


@pytest.fixture(scope="module")
def servers() -> Iterator[DnsServers]:
    with run_dns_servers({"db.test": "127.0.0.1"}) as running:
        yield running


async def run(url: str, *, settings: Settings | None = None, resolv_conf: str = "/etc/resolv.conf",
              ) -> tuple[CheckResult, dict[str, float], Spans]:
    metrics = new_metrics()
    spans = Spans()
    settings = settings or Settings()
    kinds = {TcpEndpoint: TcpKind(settings, resolv_conf=resolv_conf)}
    checker = Pipeline(settings, record=metrics.record, tracer=spans.tracer, kinds=kinds)
    result = await checker.check(Target("db", url, parse_tcp_url(url)))
    return result, series(metrics, "db"), spans


def counts(
    code: str, events: list[str], *, duration: bool, error: str | None = None, retransmits: float | None = 0.0
) -> dict[str, float]:
    t = 'type="db"'
    expected = {f'kubenurse_httpclient_requests_total{{code="{code}",{t}}}': 1.0}
    if retransmits is not None:  # a connect was tried: the kernel's resend count (SYNs)
        expected[f"kubenurse_tcp_retransmits_total{{{t}}}"] = retransmits
    for event in events:
        expected[f'kubenurse_httpclient_trace_request_duration_seconds_count{{event="{event}",{t}}}'] = 1.0
    if duration:
        expected[f"kubenurse_httpclient_request_duration_seconds_count{{{t}}}"] = 1.0
    if error:
        expected[f'kubenurse_errors_total{{event="{error}",{t}}}'] = 1.0
    return expected


async def test_listener_is_ok(listener: int) -> None:
    result, seen, spans = await run(f"tcp://127.0.0.1:{listener}")
    assert result.summary == "ok"
    assert list(result.events) == [names.CONNECT_START, names.CONNECT_DONE]
    assert result.events[names.CONNECT_START] == 0.0
    assert 0 < result.events[names.CONNECT_DONE] < 0.1
    assert result.duration == result.events[names.CONNECT_DONE]
    assert seen == counts("ok", ["connect_start", "connect_done"], duration=True)
    (span,) = spans.named("check db")
    assert span.kind == SpanKind.CLIENT
    attrs = dict(span.attributes or {})
    assert attrs["network.peer.address"] == "127.0.0.1"
    assert attrs["server.port"] == listener
    assert attrs[names.ATTR_CHECK_TYPE] == "db"
    assert set(spans.children(span)) == {"connect"}


async def test_refused_port_fails_at_connect_done() -> None:
    port = free_port()
    result, seen, spans = await run(f"tcp://127.0.0.1:{port}")
    assert result.summary == f"connect_done: connection refused by 127.0.0.1:{port}"
    assert result.error_event == names.CONNECT_DONE
    assert seen == counts("round_trip_error", ["connect_start"], duration=False, error="connect_done")
    (span,) = spans.named("check db")
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes is not None and span.attributes["error.type"] == "connection_refused"


async def test_black_holed_port_times_out_at_connect_done(black_hole: int) -> None:
    started = time.monotonic()
    result, seen, _ = await run(f"tcp://127.0.0.1:{black_hole}", settings=Settings(check_connect_timeout=0.5))
    assert 0.5 <= time.monotonic() - started < 3
    assert result.summary == f"connect_done: timeout: no answer from 127.0.0.1:{black_hole} within 0.5s"
    assert seen == counts("round_trip_error", ["connect_start"], duration=False, error="connect_done")


def resolv_conf(tmp_path: Path, servers: DnsServers) -> str:
    path = tmp_path / "resolv.conf"
    path.write_text(f"nameserver {servers.address}\n")
    return str(path)


async def test_name_is_resolved_first(listener: int, servers: DnsServers, tmp_path: Path) -> None:
    result, seen, spans = await run(f"tcp://db.test:{listener}", resolv_conf=resolv_conf(tmp_path, servers))
    assert result.summary == "ok", result.summary
    assert list(result.events) == [names.DNS_START, names.DNS_DONE, names.CONNECT_START, names.CONNECT_DONE]
    offsets = list(result.events.values())
    assert offsets == sorted(offsets)
    # Network time only: the connect starts where the DNS answer arrived.
    assert result.events[names.CONNECT_START] == result.events[names.DNS_DONE]
    assert seen == counts("ok", ["dns_start", "dns_done", "connect_start", "connect_done"], duration=True)
    (span,) = spans.named("check db")
    assert set(spans.children(span)) == {"dns", "connect"}
    assert span.attributes is not None and span.attributes["dns.question.name"] == "db.test"


async def test_unknown_name_fails_at_dns_done(servers: DnsServers, tmp_path: Path) -> None:
    result, seen, _ = await run("tcp://nope.test:5432", resolv_conf=resolv_conf(tmp_path, servers))
    assert result.summary == "dns_done: NXDOMAIN: nope.test does not exist"
    assert seen == counts(
        "round_trip_error", ["dns_start", "dns_done"], duration=False, error="dns_done", retransmits=None
    )


async def test_loop_delay_is_not_in_the_figure(listener: int) -> None:
    if not kernel.capabilities().tcp_info:
        pytest.skip(f"this kernel has no TCP_INFO: {kernel.capabilities().describe()}")
    checker = Pipeline(Settings())
    url = f"tcp://127.0.0.1:{listener}"
    task = asyncio.create_task(checker.check(Target("db", url, parse_tcp_url(url))))
    await asyncio.sleep(0)  # the SYN is out; the handshake completes while the loop is blocked
    time.sleep(0.3)
    result = await task
    assert result.ok, result.summary
    assert result.events[names.CONNECT_DONE] < 0.1, result.events
