"""OpenTelemetry wiring: the resource, the tracer provider and the OTLP metric reader.

With no OTLP endpoint configured nothing here creates an exporter, a thread or a socket.
"""

from __future__ import annotations

import logging
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


def build_tracer_provider(settings: Settings, resource: Resource) -> TracerProvider | None:
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
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter,
            max_queue_size=MAX_QUEUE_SIZE,
            export_timeout_millis=EXPORT_TIMEOUT_MILLIS,
        )
    )
    return provider


def build_otlp_metric_reader(settings: Settings, interval_seconds: float = 15.0) -> MetricReader | None:
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
    return PeriodicExportingMetricReader(
        exporter,
        export_interval_millis=interval_seconds * 1000,
        export_timeout_millis=EXPORT_TIMEOUT_MILLIS,
    )


def tracer(provider: TracerProvider | None) -> trace.Tracer:
    if provider is None:
        return trace.NoOpTracer()
    return provider.get_tracer(names.TRACER_NAME, __version__)
