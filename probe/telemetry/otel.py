"""OpenTelemetry wiring: the resource, the tracer provider and the OTLP metric reader.

With no OTLP endpoint configured nothing here creates an exporter, a thread or a socket.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.metrics import Histogram
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import Aggregation, ExponentialBucketHistogramAggregation
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from probe import __version__, names
from probe.settings import Settings

log = logging.getLogger(__name__)

GRPC = "grpc"
# Bounded so a dead or black-holed collector costs a fixed amount of memory: once the
# queue is full the SDK drops spans (and logs that it did) instead of growing.
MAX_QUEUE_SIZE = 2048
EXPORT_TIMEOUT_MILLIS = 5_000


def build_resource(settings: Settings) -> Resource:
    """service.name (default kubenurse), service.version and the k8s.* the downward API
    gives, overridden by OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES."""
    attributes: dict[str, str] = {"service.name": "kubenurse", "service.version": __version__}
    if settings.pod_name:
        attributes["k8s.pod.name"] = settings.pod_name
    if settings.node_name:
        attributes["k8s.node.name"] = settings.node_name
    if settings.own_namespace:
        attributes["k8s.namespace.name"] = settings.own_namespace
    return Resource.create(attributes).merge(OTELResourceDetector().detect())


@dataclass
class Tracing:
    provider: TracerProvider
    processor: BatchSpanProcessor

    def shutdown(self, timeout_seconds: float) -> None:
        """Flush what is queued, giving up after `timeout_seconds`."""
        run_bounded(self.provider.shutdown, timeout_seconds)


def run_bounded(fn: Callable[[], object], timeout_seconds: float) -> bool:
    """Run a blocking SDK shutdown/flush for at most `timeout_seconds`; False if it overran.

    The SDK's own timeouts do not bound a black-holed collector (the span processor joins
    its worker for up to 30 s), and a dead collector must not hold up the pod's
    termination. A daemon thread is abandoned at exit instead of joined.
    """
    worker = threading.Thread(target=fn, name="otel-shutdown", daemon=True)
    worker.start()
    worker.join(timeout_seconds)
    if worker.is_alive():
        log.warning("telemetry flush gave up", extra={"timeout_seconds": timeout_seconds})
        return False
    return True


def build_tracing(settings: Settings, resource: Resource) -> Tracing | None:
    """A provider exporting over OTLP, or None (spans stay non-recording and cost nothing)."""
    if not settings.otlp_traces_enabled:
        return None
    exporter: Any
    if settings.otlp_traces_protocol == GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

        exporter = GrpcSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

        exporter = HttpSpanExporter()
    # The sampler comes from OTEL_TRACES_SAMPLER(_ARG) (default: parent-based always-on).
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    processor = BatchSpanProcessor(exporter, max_queue_size=MAX_QUEUE_SIZE)
    provider.add_span_processor(processor)
    return Tracing(provider, processor)


def build_otlp_metric_reader(settings: Settings) -> MetricReader | None:
    """Periodic OTLP export: delta temporality and exponential histograms (fine resolution,
    no bucket tuning); /metrics keeps its cumulative explicit buckets."""
    if not settings.otlp_metrics_enabled:
        return None
    temporality: dict[type, AggregationTemporality] = {Histogram: AggregationTemporality.DELTA}
    aggregation: dict[type, Aggregation] = {Histogram: ExponentialBucketHistogramAggregation()}
    exporter: Any
    if settings.otlp_metrics_protocol == GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetricExporter,
        )

        exporter = GrpcMetricExporter(preferred_temporality=temporality, preferred_aggregation=aggregation)
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpMetricExporter,
        )

        exporter = HttpMetricExporter(preferred_temporality=temporality, preferred_aggregation=aggregation)
    # The interval comes from OTEL_METRIC_EXPORT_INTERVAL (SDK default 60 s).
    return PeriodicExportingMetricReader(exporter, export_timeout_millis=EXPORT_TIMEOUT_MILLIS)


def tracer(tracing: Tracing | None) -> trace.Tracer:
    if tracing is None:
        return trace.NoOpTracer()
    return tracing.provider.get_tracer(names.TRACER_NAME, __version__)
