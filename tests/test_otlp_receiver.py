"""The OTLP test receiver, fed by the real OpenTelemetry SDK exporters."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import Aggregation, ExponentialBucketHistogramAggregation
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode
from otlp_receiver import OtlpReceiver

RESOURCE = Resource.create({"service.name": "kubenurse", "k8s.node.name": "node-a"})


@pytest.fixture
def rx() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


def _span_exporter(rx: OtlpReceiver, transport: str, timeout: float = 5) -> SpanExporter:
    if transport == "grpc":
        return GrpcSpanExporter(endpoint=rx.grpc_endpoint, insecure=True, timeout=timeout)
    return HttpSpanExporter(
        endpoint=f"{rx.http_endpoint}/v1/traces", compression=Compression.Gzip, timeout=timeout
    )


def _tracer_provider(exporter: SpanExporter) -> TracerProvider:
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_spans_arrive_decoded(rx: OtlpReceiver, transport: str) -> None:
    provider = _tracer_provider(_span_exporter(rx, transport))
    tracer = provider.get_tracer("probe.checks")
    with tracer.start_as_current_span("check", kind=SpanKind.CLIENT) as parent:
        parent.set_attribute("kubenurse.check.type", "path_node-b")
        parent.set_attribute("tags", ["a", "b"])
        parent.add_event("dns_done", {"elapsed": 0.25})
        with tracer.start_as_current_span("inner", kind=SpanKind.SERVER):
            pass
        parent.set_status(Status(StatusCode.ERROR, "connection refused"))
    provider.shutdown()

    rx.wait_for(lambda: len(rx.spans()) == 2, timeout=5)
    check, inner = rx.find_span("check"), rx.find_span("inner")
    assert check is not None and inner is not None
    ctx = parent.get_span_context()
    assert check.trace_id == f"{ctx.trace_id:032x}" and check.span_id == f"{ctx.span_id:016x}"
    assert check.parent_span_id == "" and inner.parent_span_id == check.span_id
    assert (check.kind, inner.kind) == ("CLIENT", "SERVER")
    assert check.attributes == {"kubenurse.check.type": "path_node-b", "tags": ["a", "b"]}
    assert [(e.name, e.attributes) for e in check.events] == [("dns_done", {"elapsed": 0.25})]
    assert check.events[0].time_ns >= check.start_ns
    assert (check.status_code, check.status_message) == ("ERROR", "connection refused")
    assert inner.status_code == "UNSET"
    assert check.duration_ns > 0
    assert check.resource["service.name"] == "kubenurse" and check.resource["k8s.node.name"] == "node-a"
    assert check.scope == "probe.checks"
    assert {r.transport for r in rx.received("traces")} == {transport}
    if transport == "http":
        assert rx.received("traces")[0].headers["content-encoding"] == "gzip"


def _metric_exporter(rx: OtlpReceiver, transport: str, exponential: bool) -> MetricExporter:
    temporality: dict[type, AggregationTemporality] = {Counter: AggregationTemporality.DELTA}
    aggregation: dict[type, Aggregation] = (
        {Histogram: ExponentialBucketHistogramAggregation()} if exponential else {}
    )
    if transport == "grpc":
        return GrpcMetricExporter(
            endpoint=rx.grpc_endpoint,
            insecure=True,
            preferred_temporality=temporality,
            preferred_aggregation=aggregation,
        )
    return HttpMetricExporter(
        endpoint=f"{rx.http_endpoint}/v1/metrics",
        preferred_temporality=temporality,
        preferred_aggregation=aggregation,
    )


@pytest.mark.parametrize(("transport", "exponential"), [("grpc", False), ("http", True)])
def test_metrics_arrive_flattened(rx: OtlpReceiver, transport: str, exponential: bool) -> None:
    reader = PeriodicExportingMetricReader(
        _metric_exporter(rx, transport, exponential), export_interval_millis=3_600_000
    )
    meters = MeterProvider(resource=RESOURCE, metric_readers=[reader])
    meter = meters.get_meter("probe.telemetry")
    duration = meter.create_histogram(
        "kubenurse_httpclient_request_duration", unit="s", explicit_bucket_boundaries_advisory=[0.1, 1.0]
    )
    errors = meter.create_counter("kubenurse_errors")
    incoming = meter.create_gauge("kubenurse_neighbourhood_incoming_checks")
    tracer = _tracer_provider(_span_exporter(rx, transport)).get_tracer("t")
    with tracer.start_as_current_span("check") as span:
        duration.record(0.05, {"type": "api_server_direct"})  # exemplar: recorded in a sampled span
    duration.record(2.0, {"type": "api_server_direct"})
    errors.add(3, {"type": "me_ingress", "event": "connect_start"})
    incoming.set(4)
    meters.force_flush()  # exactly one export: shutdown() would send a second one

    rx.wait_for(lambda: len(rx.metrics()) >= 3, timeout=5)
    [hist] = rx.points("kubenurse_httpclient_request_duration")
    assert hist.unit == "s" and hist.temporality == "CUMULATIVE"
    assert hist.attributes == {"type": "api_server_direct"}
    assert (hist.count, hist.sum, hist.min, hist.max) == (2, 2.05, 0.05, 2.0)
    assert hist.resource["k8s.node.name"] == "node-a" and hist.scope == "probe.telemetry"
    if exponential:
        assert hist.kind == "exponential_histogram"
        assert hist.scale is not None and hist.positive is not None and sum(hist.positive[1]) == 2
    else:
        assert hist.kind == "histogram"
        assert hist.buckets == [(0.1, 1), (1.0, 0), (float("inf"), 1)]
    ctx = span.get_span_context()
    assert [(e.value, e.trace_id, e.span_id) for e in hist.exemplars if e.trace_id] == [
        (0.05, f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    ]
    [err] = rx.points("kubenurse_errors")
    assert (err.kind, err.temporality, err.monotonic, err.value) == ("sum", "DELTA", True, 3)
    assert err.attributes == {"type": "me_ingress", "event": "connect_start"}
    [gauge] = rx.points("kubenurse_neighbourhood_incoming_checks")
    assert (gauge.kind, gauge.temporality, gauge.value, gauge.attributes) == ("gauge", "", 4, {})
    meters.shutdown()


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_headers_are_recorded(rx: OtlpReceiver, transport: str) -> None:
    exporter = (
        GrpcSpanExporter(endpoint=rx.grpc_endpoint, insecure=True, headers={"x-tenant": "probe"})
        if transport == "grpc"
        else HttpSpanExporter(endpoint=f"{rx.http_endpoint}/v1/traces", headers={"X-Tenant": "probe"})
    )
    provider = _tracer_provider(exporter)
    provider.get_tracer("t").start_span("s").end()
    provider.shutdown()
    [received] = rx.received("traces")
    assert received.headers["x-tenant"] == "probe"


async def test_async_wait_does_not_block_the_loop(rx: OtlpReceiver) -> None:
    provider = _tracer_provider(_span_exporter(rx, "grpc"))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    def export_later() -> None:
        time.sleep(0.3)
        provider.get_tracer("t").start_span("late").end()

    task = asyncio.create_task(ticker())
    threading.Thread(target=export_later).start()
    span = await rx.async_wait_for(lambda: rx.find_span("late"), timeout=5)
    task.cancel()
    provider.shutdown()
    assert span is not None and span.name == "late"
    assert ticks >= 10  # the loop kept running while we waited


def test_wait_for_times_out_with_a_summary(rx: OtlpReceiver) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="0 requests"):
        rx.wait_for(lambda: rx.spans(), timeout=0.3)
    assert time.monotonic() - started < 2


def test_stop_refuses_and_start_reuses_the_ports(rx: OtlpReceiver) -> None:
    ports = (rx.grpc_port, rx.http_port)
    rx.stop()
    assert rx.state == "stopped"
    assert _refused(rx.grpc_port) and _refused(rx.http_port)
    assert _span_exporter(rx, "http", timeout=1).export([]) is SpanExportResult.FAILURE

    rx.start()
    assert (rx.grpc_port, rx.http_port) == ports
    for transport in ("grpc", "http"):
        provider = _tracer_provider(_span_exporter(rx, transport))
        provider.get_tracer("t").start_span(f"after-restart-{transport}").end()
        provider.shutdown()
    assert {s.name for s in rx.spans()} == {"after-restart-grpc", "after-restart-http"}


def test_stop_cuts_kept_alive_http_connections(rx: OtlpReceiver) -> None:
    # The SDK's HTTP exporter keeps its connection open; after stop() it must not be answered.
    exporter = _span_exporter(rx, "http", timeout=1)
    provider = _tracer_provider(exporter)
    provider.get_tracer("t").start_span("first").end()
    rx.stop()
    provider.get_tracer("t").start_span("while-stopped").end()
    provider.shutdown()
    assert [s.name for s in rx.spans()] == ["first"]


def test_blackhole_accepts_but_never_answers(rx: OtlpReceiver) -> None:
    rx.blackhole()
    assert rx.state == "blackhole"
    for port in (rx.grpc_port, rx.http_port):
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            conn.settimeout(0.3)
            with pytest.raises(TimeoutError):
                conn.recv(1)

    for transport in ("grpc", "http"):
        started = time.monotonic()
        provider = _tracer_provider(_span_exporter(rx, transport, timeout=1))
        provider.get_tracer("t").start_span("lost").end()  # SimpleSpanProcessor: export waits here
        provider.shutdown()
        assert time.monotonic() - started >= 0.9  # the client waited for its own timeout

    rx.restore()
    assert rx.state == "running"
    provider = _tracer_provider(_span_exporter(rx, "grpc"))
    provider.get_tracer("t").start_span("back").end()
    provider.shutdown()
    assert [s.name for s in rx.spans()] == ["back"]


def test_fail_answers_with_errors_until_restore(rx: OtlpReceiver) -> None:
    # Non-retryable codes so the exporters give up at once instead of backing off.
    rx.fail(http_status=400, grpc_code=grpc.StatusCode.INVALID_ARGUMENT)
    for transport in ("grpc", "http"):
        assert _span_exporter(rx, transport).export([]) is SpanExportResult.FAILURE
    rx.restore()
    provider = _tracer_provider(_span_exporter(rx, "http"))
    provider.get_tracer("t").start_span("ok").end()
    provider.shutdown()
    assert [s.name for s in rx.spans()] == ["ok"]


def _post(url: str, body: bytes, content_type: str) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


def test_http_rejects_what_it_cannot_decode(rx: OtlpReceiver) -> None:
    assert _post(f"{rx.http_endpoint}/v1/logs", b"", "application/x-protobuf") == 404
    assert _post(f"{rx.http_endpoint}/v1/traces", b"{}", "application/json") == 415
    assert _post(f"{rx.http_endpoint}/v1/traces", b"\xff\xff\xff", "application/x-protobuf") == 400
    assert _post(f"{rx.http_endpoint}/v1/traces", b"", "application/x-protobuf") == 200  # empty = valid
    assert rx.received() and rx.spans() == []


def test_clear_forgets_everything(rx: OtlpReceiver) -> None:
    provider = _tracer_provider(_span_exporter(rx, "grpc"))
    provider.get_tracer("t").start_span("s").end()
    provider.shutdown()
    assert rx.spans()
    rx.clear()
    assert rx.spans() == [] and rx.received() == []
