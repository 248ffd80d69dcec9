"""The figures are the network's, not the probe's: the mechanism, shown with real servers.

The target servers here run on their own threads, not on the probe's event loop, so the
tests can keep the probe's loop busy on purpose while the server does its known work.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from probe import names
from probe.checks import kernel
from probe.checks.pipeline import Pipeline
from probe.checks.result import CheckResult, Target
from probe.settings import Settings
from probe.telemetry.metrics import Metrics

SERVER_DELAY = 0.060  # what the server really does before it answers
LOOP_BUSY = 0.300  # how long the test blocks the probe's loop while the answer is on its way


class _Slow(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless the client says close

    def do_GET(self) -> None:
        time.sleep(SERVER_DELAY)
        # Head and body in one write, as real servers do: two small writes would meet Nagle
        # and the client's delayed ACK on a kept-alive connection (a real 40 ms, not ours).
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def log_message(self, *_args: object) -> None:
        pass


def _serve(tls: ssl.SSLContext | None) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        scheme = "https" if tls else "http"
        yield f"{scheme}://localhost:{server.server_address[1]}/alwayshappy"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def slow_http() -> Iterator[str]:
    yield from _serve(None)


@pytest.fixture
def slow_https(server_tls: ssl.SSLContext) -> Iterator[str]:
    yield from _serve(server_tls)


async def _check_while_loop_is_busy(checker: Pipeline, url: str) -> CheckResult:
    async def hog() -> None:
        await asyncio.sleep(0.010)  # the request is out; the answer comes in 60 ms
        time.sleep(LOOP_BUSY)  # the probe's loop is stuck (other checks, a scrape, a GC pause)

    result, _ = await asyncio.gather(checker.check(Target("slow", url)), hog())
    return result


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_the_first_byte_comes_from_the_kernel_not_from_when_the_loop_got_round_to_it(
    scheme: str, slow_http: str, slow_https: str, ca_file: Path
) -> None:
    checker = Pipeline(Settings(extra_ca_file=str(ca_file)))
    await checker.start()
    try:
        await checker.check(Target("warm", slow_http))  # imports and first connections
        result = await _check_while_loop_is_busy(checker, slow_http if scheme == "http" else slow_https)
    finally:
        await checker.close()
    assert result.ok, result.summary
    if kernel.capabilities().source != kernel.KERNEL:
        # A sandboxed kernel (gVisor) gives no timestamps: then the figure must say so.
        assert result.timing_source == kernel.LOOP
        return
    assert result.timing_source == kernel.KERNEL
    assert result.duration is not None
    # The server answered after 60 ms; the loop looked 300 ms later. A loop-time figure
    # would be >= 0.31 s; the kernel's is the server's 60 ms plus the handshake(s).
    assert SERVER_DELAY <= result.duration < SERVER_DELAY + 0.060, result.events
    wait = result.events[names.GOT_FIRST_RESP_BYTE] - result.events[names.WROTE_REQUEST]
    assert SERVER_DELAY <= wait < SERVER_DELAY + 0.030
    connect = result.events[names.CONNECT_DONE] - result.events[names.CONNECT_START]
    assert 0 < connect < 0.005  # loopback: the kernel's SYN/SYN-ACK, microseconds


async def test_without_kernel_timestamps_the_fallback_is_used_and_said(
    slow_http: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(kernel, "capabilities", lambda: kernel.Capabilities(rx_timestamps=False, tcp_info=False))
    checker = Pipeline(Settings())
    await checker.start()
    try:
        result = await _check_while_loop_is_busy(checker, slow_http)
    finally:
        await checker.close()
    assert result.ok, result.summary
    assert result.timing_source == kernel.LOOP
    assert result.duration is not None
    # The fallback reads the answer when the loop got round to it: after the busy spell.
    assert result.duration >= LOOP_BUSY

    from probe.app import Probe
    from probe.neighbours import StaticNeighbours

    caplog.set_level(logging.INFO, logger="probe")
    probe = Probe(Settings(listen_host="127.0.0.1", http_port=0, https_port=0), StaticNeighbours.unavailable("t"))
    await probe.start()
    await probe.stop()
    started = [r for r in caplog.records if r.getMessage() == "probe started"]
    assert started and getattr(started[0], "timing_source", None) == kernel.LOOP
    assert "SO_TIMESTAMPNS" in getattr(started[0], "timing", "")


async def test_spans_and_metrics_carry_the_same_durations(slow_https: str, ca_file: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    metrics = Metrics(buckets=Settings().histogram_buckets, incoming=lambda: 0)
    checker = Pipeline(
        Settings(extra_ca_file=str(ca_file)), record=metrics.record, tracer=provider.get_tracer("test")
    )
    await checker.start()
    try:
        result = await _check_while_loop_is_busy(checker, slow_https)
    finally:
        await checker.close()
    assert result.ok and result.duration is not None
    spans = exporter.get_finished_spans()
    client = next(s for s in spans if s.name == "check slow")
    assert client.attributes is not None
    assert client.attributes[names.ATTR_NETWORK_DURATION] == result.duration
    assert client.attributes[names.ATTR_TIMING_SOURCE] == result.timing_source
    children = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == client.context.span_id}
    e = result.events
    expected = {
        "connect": e[names.CONNECT_DONE] - e[names.CONNECT_START],
        "tls handshake": e[names.TLS_HANDSHAKE_DONE] - e[names.TLS_HANDSHAKE_START],
        "send request": e[names.WROTE_REQUEST] - e[names.GOT_CONN],
        "wait for first byte": e[names.GOT_FIRST_RESP_BYTE] - e[names.WROTE_REQUEST],
    }
    for name, seconds in expected.items():
        child = children[name]
        assert child.start_time is not None and child.end_time is not None
        assert abs((child.end_time - child.start_time) / 1e9 - seconds) < 2e-6, name
    # The phases laid end to end are the request duration the histogram got.
    assert abs(sum(expected.values()) + e.get(names.DNS_DONE, 0.0) - result.duration) < 2e-6
    text = metrics.exposition("text/plain")[0].decode()
    series = 'kubenurse_httpclient_request_duration_seconds_sum{type="slow"}'
    line = next(ln for ln in text.splitlines() if ln.startswith(series))
    assert abs(float(line.rsplit(" ", 1)[1]) - result.duration) < 1e-9
    metrics.shutdown(1.0)


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_a_reused_connection_times_the_request_that_uses_it(
    scheme: str, slow_http: str, slow_https: str, ca_file: Path
) -> None:
    """KUBENURSE_REUSE_CONNECTIONS: the socket outlives its first request; the second check's
    figures are its own (no connect, no handshake, its own wait), not the first one's."""
    checker = Pipeline(Settings(extra_ca_file=str(ca_file), reuse_connections=True))
    await checker.start()
    url = slow_http if scheme == "http" else slow_https
    try:
        first = await checker.check(Target("slow", url))
        second = await _check_while_loop_is_busy(checker, url)
    finally:
        await checker.close()
    assert first.ok and second.ok, (first.summary, second.summary)
    assert names.CONNECT_START in first.events and names.CONNECT_START not in second.events
    assert second.duration is not None
    assert second.events[names.WROTE_REQUEST] < 0.001
    if second.timing_source == kernel.KERNEL:
        assert SERVER_DELAY <= second.duration < SERVER_DELAY + 0.030, second.events

