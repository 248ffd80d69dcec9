"""Traces and OTLP metrics as a collector receives them, from real probes."""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from otlp_receiver import OtlpReceiver, Span

from probe import names
from probe.app import Probe
from probe.checks.spans import span_name
from probe.neighbours import Neighbour, Neighbourhood, StaticNeighbours
from probe.settings import load_settings
from tests.conftest import StartTarget, free_port

TRANSPORTS = {"grpc": "grpc_endpoint", "http/protobuf": "http_endpoint"}


@pytest.fixture
def rx() -> AsyncIterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver  # type: ignore[misc]


def otel_env(monkeypatch: pytest.MonkeyPatch, rx: OtlpReceiver, protocol: str) -> dict[str, str]:
    """The standard variables, set as a user would; the SDK exporters read them too."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": getattr(rx, TRANSPORTS[protocol]),
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        "OTEL_RESOURCE_ATTRIBUTES": "k8s.cluster.name=lab,deployment.environment=test",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def base_settings(port: int, **extra: str) -> dict[str, str]:
    return {
        "KUBENURSE_LISTEN_HOST": "127.0.0.1",
        "KUBENURSE_HTTP_PORT": str(port),
        "KUBENURSE_CHECK_INTERVAL": "200ms",
        "POD_NAME": "pod-a",
        "NODE_NAME": "node-a",
        "POD_NAMESPACE": "kubenurse",
        **extra,
    }


def client_span(spans: list[Span], check_type: str) -> Span | None:
    for span in spans:
        if span.name == span_name(check_type) and span.kind == "CLIENT":
            return span
    return None


def children(spans: list[Span], parent: Span) -> dict[str, Span]:
    return {s.name: s for s in spans if s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id}


@pytest.mark.parametrize("protocol", list(TRANSPORTS))
async def test_check_spans_show_phases_and_failures(
    protocol: str,
    rx: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
    start_target: StartTarget,
    server_tls: ssl.SSLContext,
    ca_file: Path,
) -> None:
    env = otel_env(monkeypatch, rx, protocol)
    tls = await start_target(ssl_context=server_tls)
    plain = await start_target()
    refused = free_port()
    checks = "|".join(
        [
            f"tls_ok:{tls.url}/alwayshappy",
            f"fails:{plain.url}/status/500",
            f"refused:http://127.0.0.1:{refused}/",
            f"hangs:{plain.url}/hang",
            f"named:http://localhost:{plain.port}/alwayshappy",
        ]
    )
    port = free_port()
    settings = load_settings(
        {**env, **base_settings(port, KUBENURSE_EXTRA_CHECKS=checks, KUBENURSE_EXTRA_CA=str(ca_file),
                                 KUBENURSE_CHECK_TIMEOUT="500ms")}
    )
    probe = Probe(settings, StaticNeighbours.unavailable("test"))
    await probe.start()
    try:
        wanted = ["tls_ok", "fails", "refused", "hangs", "named"]
        await rx.async_wait_for(lambda: all(client_span(rx.spans(), t) for t in wanted), timeout=15)
    finally:
        await probe.stop()
    spans = rx.spans()

    ok = client_span(spans, "tls_ok")
    assert ok is not None
    assert ok.parent_span_id == "", "a check is the root of its trace"
    assert ok.status_code == "UNSET"
    assert ok.attributes[names.ATTR_CHECK_TYPE] == "tls_ok"
    assert ok.attributes["http.request.method"] == "GET"
    assert ok.attributes["url.full"] == f"{tls.url}/alwayshappy"
    assert ok.attributes["server.address"] == "127.0.0.1"
    assert ok.attributes["server.port"] == tls.port
    assert ok.attributes["network.peer.address"] == "127.0.0.1"
    assert ok.attributes["http.response.status_code"] == 200
    assert ok.resource["service.name"] == "kubenurse"
    assert ok.resource["k8s.pod.name"] == "pod-a"
    assert ok.resource["k8s.node.name"] == "node-a"
    assert ok.resource["k8s.namespace.name"] == "kubenurse"
    assert ok.resource["k8s.cluster.name"] == "lab"
    assert ok.resource["service.version"]
    phases = children(spans, ok)
    assert list(phases) == ["connect", "tls handshake", "send request", "wait for first byte"]
    total = 0
    for phase in phases.values():
        assert ok.start_ns <= phase.start_ns <= phase.end_ns <= ok.end_ns, phase.name
        total += phase.duration_ns
    assert total <= ok.duration_ns, "phases add up within the parent"
    assert phases["tls handshake"].duration_ns > 0
    # Phases follow each other; the request went out on the connection the handshake made.
    assert phases["connect"].end_ns <= phases["tls handshake"].start_ns
    assert phases["tls handshake"].end_ns <= phases["wait for first byte"].start_ns

    named = client_span(spans, "named")
    assert named is not None and "dns" in children(spans, named)

    fails = client_span(spans, "fails")
    assert fails is not None and fails.status_code == "ERROR"
    assert fails.attributes["error.type"] == "500"
    assert fails.attributes["http.response.status_code"] == 500
    assert fails.attributes[names.ATTR_ERROR_EVENT] == "status_code_500"

    refused_span = client_span(spans, "refused")
    assert refused_span is not None and refused_span.status_code == "ERROR"
    assert refused_span.attributes["error.type"] == "ClientConnectorError"
    assert refused_span.attributes[names.ATTR_ERROR_EVENT] == "connect_done"
    connect = children(spans, refused_span)["connect"]
    assert connect.status_code == "ERROR", "the failing phase is marked"

    hangs = client_span(spans, "hangs")
    assert hangs is not None and hangs.status_code == "ERROR"
    assert hangs.attributes[names.ATTR_ERROR_EVENT] == "round_trip_error"
    assert hangs.duration_ns >= 0.45e9
    assert children(spans, hangs)["wait for first byte"].status_code == "ERROR"


async def test_tls_failure_span(
    rx: OtlpReceiver, monkeypatch: pytest.MonkeyPatch, start_target: StartTarget, server_tls: ssl.SSLContext
) -> None:
    env = otel_env(monkeypatch, rx, "grpc")
    tls = await start_target(ssl_context=server_tls)  # its CA is not trusted here
    port = free_port()
    settings = load_settings({**env, **base_settings(port, KUBENURSE_EXTRA_CHECKS=f"tls:{tls.url}/")})
    probe = Probe(settings, StaticNeighbours.unavailable("test"))
    await probe.start()
    try:
        span = await rx.async_wait_for(lambda: client_span(rx.spans(), "tls"), timeout=15)
    finally:
        await probe.stop()
    assert span.status_code == "ERROR"
    assert span.attributes[names.ATTR_ERROR_EVENT] == "tls_handshake_done"
    assert "Certificate" in span.attributes["error.type"]
    assert children(rx.spans(), span)["tls handshake"].status_code == "ERROR"


async def test_two_probes_share_one_trace_per_path(rx: OtlpReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    env = otel_env(monkeypatch, rx, "http/protobuf")
    port = free_port()
    probes = []
    for me, other, ip, other_ip in (("a", "b", "127.0.0.1", "127.0.0.2"), ("b", "a", "127.0.0.2", "127.0.0.1")):
        settings = load_settings(
            {**env, **base_settings(port, POD_NAME=f"pod-{me}", NODE_NAME=f"node-{me}", KUBENURSE_LISTEN_HOST=ip)}
        )
        hood = Neighbourhood(neighbours=(Neighbour(f"pod-{other}", other_ip, other_ip, f"node-{other}"),))
        probes.append(Probe(settings, StaticNeighbours(hood)))
    for probe in probes:
        await probe.start()

    def linked() -> tuple[Span, Span] | None:
        spans = rx.spans()
        for client in spans:
            if client.kind != "CLIENT" or client.name != span_name("path_node-b"):
                continue
            for server in spans:
                if server.kind == "SERVER" and server.parent_span_id == client.span_id:
                    return client, server
        return None

    try:
        client, server = await rx.async_wait_for(linked, timeout=15)
    finally:
        for probe in probes:
            await probe.stop()
    assert client.trace_id == server.trace_id
    assert client.resource["k8s.pod.name"] == "pod-a"
    assert server.resource["k8s.pod.name"] == "pod-b", "the server span is emitted by the neighbour"
    assert client.attributes[names.ATTR_NEIGHBOUR_NODE] == "node-b"
    assert client.attributes[names.ATTR_NEIGHBOUR_POD] == "pod-b"
    assert server.name == "GET /alwayshappy"
    assert server.attributes["http.route"] == "/alwayshappy"
    assert client.start_ns <= server.start_ns and server.end_ns <= client.end_ns + 5_000_000


async def test_metrics_over_otlp_with_exemplars(
    rx: OtlpReceiver, monkeypatch: pytest.MonkeyPatch, start_target: StartTarget
) -> None:
    env = otel_env(monkeypatch, rx, "grpc")
    target = await start_target()
    port = free_port()
    settings = load_settings(
        {**env, **base_settings(port, KUBENURSE_SERVICE_URL=target.url,
                                 KUBENURSE_EXTRA_CHECKS=f"broken:http://127.0.0.1:{free_port()}/")}
    )
    probe = Probe(settings, StaticNeighbours.unavailable("test"))
    await probe.start()
    try:
        await rx.async_wait_for(
            lambda: rx.points(names.REQUEST_DURATION) and rx.points(names.ERRORS) and rx.points(names.REQUESTS)
            and rx.points(names.TRACE_REQUEST_DURATION),
            timeout=15,
        )
        await asyncio.sleep(0.5)  # let the spans of those checks be exported too
    finally:
        await probe.stop()
    durations = rx.points(names.REQUEST_DURATION)
    assert {p.unit for p in durations} == {"s"}
    assert {p.kind for p in durations} == {"exponential_histogram"}, "fine resolution, no bucket tuning, over OTLP"
    assert {p.attributes["type"] for p in durations} == {"me_service"}
    assert all(p.resource["service.name"] == "kubenurse" and p.resource["k8s.node.name"] == "node-a"
               for p in durations)
    errors = rx.points(names.ERRORS)
    assert {(p.attributes["type"], p.attributes["event"]) for p in errors} == {("broken", "connect_done")}
    codes = {(p.attributes["type"], p.attributes["code"]) for p in rx.points(names.REQUESTS)}
    assert codes == {("me_service", "200"), ("broken", "round_trip_error")}
    exemplars = [e for p in durations for e in p.exemplars if e.trace_id]
    assert exemplars, "histogram points carry trace ids"
    trace_ids = {s.trace_id for s in rx.spans()}
    assert {e.trace_id for e in exemplars} <= trace_ids, "exemplars point at traces that exist"


def sdk_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("Otel") or "grpc" in t.name.lower()]


async def test_no_endpoint_no_exporter(start_target: StartTarget, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)
    target = await start_target()
    port = free_port()
    before = set(sdk_threads())
    probe = Probe(load_settings(base_settings(port, KUBENURSE_SERVICE_URL=target.url)),
                  StaticNeighbours.unavailable("test"))
    await probe.start()
    try:
        while probe.prober.rounds < 2:
            await asyncio.sleep(0.05)
        assert probe.tracing is None
        assert set(sdk_threads()) == before, "no exporter thread without an endpoint"
        assert "traceparent" not in target.requests[-1], "nothing to propagate without tracing"
    finally:
        await probe.stop()


async def wait_until(predicate: Callable[[], object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("protocol", list(TRANSPORTS))
async def test_dead_collector_never_gets_in_the_way(
    protocol: str, rx: OtlpReceiver, monkeypatch: pytest.MonkeyPatch, start_target: StartTarget,
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = otel_env(monkeypatch, rx, protocol)
    target = await start_target()
    port = free_port()
    settings = load_settings({**env, **base_settings(port, KUBENURSE_SERVICE_URL=target.url,
                                                      KUBENURSE_CHECK_INTERVAL="100ms")})
    probe = Probe(settings, StaticNeighbours.unavailable("test"))
    await probe.start()
    try:
        await rx.async_wait_for(lambda: client_span(rx.spans(), "me_service"), timeout=15)
        for fault in (rx.stop, rx.blackhole):
            fault()
            rounds, started = probe.prober.rounds, time.monotonic()
            await asyncio.sleep(2.0)
            elapsed = time.monotonic() - started
            done = probe.prober.rounds - rounds
            # 100 ms interval: about 20 rounds in 2 s whatever the collector does.
            assert done >= 0.6 * elapsed / 0.1, (fault.__name__, done)
            assert probe.prober.last_round is not None and probe.prober.last_round.healthy
            rx.restore()
        assert probe.tracing is not None and probe.tracing.exporter.dropped > 0, "drops are counted"
        complaints = [r for r in caplog.records if r.getMessage().startswith("spans not exported")]
        assert len(complaints) == 1, "logged at a sane rate, not per batch"
        rx.clear()
        resumed_after = time.time_ns()
        await rx.async_wait_for(
            lambda: any(s.start_ns > resumed_after for s in rx.spans() if s.kind == "CLIENT"), timeout=20
        )
        rx.blackhole()
        started = time.monotonic()
    finally:
        await probe.stop()
    assert time.monotonic() - started < 8, "shutdown stays within its budget with a black-holed collector"


async def test_openmetrics_scrape_carries_exemplars_of_real_traces(
    rx: OtlpReceiver, monkeypatch: pytest.MonkeyPatch, start_target: StartTarget
) -> None:
    import re

    import aiohttp

    env = otel_env(monkeypatch, rx, "grpc")
    target = await start_target()
    port = free_port()
    probe = Probe(load_settings({**env, **base_settings(port, KUBENURSE_SERVICE_URL=target.url)}),
                  StaticNeighbours.unavailable("test"))
    await probe.start()
    try:
        await wait_until(lambda: probe.prober.rounds >= 3, timeout=10)
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/metrics"
            async with session.get(url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}) as r:
                openmetrics = await r.text()
            async with session.get(url) as r:
                text = await r.text()
        await rx.async_wait_for(lambda: len(rx.spans()) > 6, timeout=10)
    finally:
        await probe.stop()
    pattern = re.compile(
        r'^kubenurse_httpclient_request_duration_seconds_bucket\{[^}]*type="me_service"[^}]*\} \S+ '
        r'# \{span_id="([0-9a-f]{16})",trace_id="([0-9a-f]{32})"\} [0-9.e-]+ [0-9.]+$',
        re.MULTILINE,
    )
    found = pattern.findall(openmetrics)
    assert found, "OpenMetrics bucket samples carry exemplars"
    trace_ids = {s.trace_id for s in rx.spans()}
    assert any(trace_id in trace_ids for _, trace_id in found), "exemplars point at exported traces"
    assert "trace_id" not in text, "the classic text format has no exemplars"


@pytest.mark.parametrize(
    ("preferences", "histogram", "counter"),
    [
        ({}, ("exponential_histogram", "DELTA"), "DELTA"),
        (
            {
                "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "cumulative",
                "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION": "explicit_bucket_histogram",
            },
            ("histogram", "CUMULATIVE"),
            "CUMULATIVE",
        ),
        ({"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "lowmemory"}, ("exponential_histogram", "DELTA"),
         "DELTA"),
    ],
)
async def test_otlp_metric_preferences_are_honoured(
    rx: OtlpReceiver, monkeypatch: pytest.MonkeyPatch, start_target: StartTarget,
    preferences: dict[str, str], histogram: tuple[str, str], counter: str,
) -> None:
    env = {**otel_env(monkeypatch, rx, "http/protobuf"), **preferences}
    target = await start_target()
    settings = load_settings({**env, **base_settings(free_port(), KUBENURSE_SERVICE_URL=target.url)})
    probe = Probe(settings, StaticNeighbours.unavailable("test"))
    await probe.start()
    try:
        await rx.async_wait_for(lambda: rx.points(names.REQUEST_DURATION) and rx.points(names.REQUESTS), timeout=15)
    finally:
        await probe.stop()
    assert {(p.kind, p.temporality) for p in rx.points(names.REQUEST_DURATION)} == {histogram}
    assert {p.temporality for p in rx.points(names.REQUESTS)} == {counter}


def test_spans_dropped_from_a_full_queue_are_counted() -> None:
    """A collector that hangs fills the queue; what the queue then drops is counted, so
    /alive's spans_dropped is every span that did not reach the collector."""
    import threading
    from collections.abc import Sequence

    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from probe.telemetry.otel import CountingSpanExporter, CountingSpanProcessor

    release = threading.Event()

    class Hanging(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            release.wait(10)
            return SpanExportResult.SUCCESS

    counting = CountingSpanExporter(Hanging())
    provider = TracerProvider()
    provider.add_span_processor(CountingSpanProcessor(counting, max_queue_size=512))
    tracer = provider.get_tracer("test")
    for _ in range(1200):
        with tracer.start_as_current_span("check"):
            pass
    assert counting.queue_full >= 1200 - 512 and counting.dropped == counting.queue_full
    release.set()
    provider.shutdown()
    assert counting.exported + counting.dropped == 1200
