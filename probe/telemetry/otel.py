"""OpenTelemetry wiring: the resource, the tracer provider and the OTLP metric reader.

With no OTLP endpoint configured nothing here creates an exporter, a thread or a socket.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import Aggregation, ExponentialBucketHistogramAggregation
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

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


LOG_EVERY_SECONDS = 60.0


class RateLimitFilter(logging.Filter):
    """Lets the same message through once per LOG_EVERY_SECONDS: a dead collector makes the
    OTLP exporters complain on every batch, and the log must not turn into that."""

    def __init__(self, every: float = LOG_EVERY_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._every, self._clock = every, clock
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = str(record.msg), self._clock()
        if now - self._last.get(key, -self._every) < self._every:
            return False
        self._last[key] = now
        return True


class CountingSpanExporter(SpanExporter):
    """Counts the spans that reached the collector, those whose export failed, and (with
    CountingSpanProcessor) those dropped because the queue in front of it was full."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.exported = 0
        self.failed = 0
        self.queue_full = 0
        #: Spans handed to the batch processor and not yet through export().
        self.pending = 0
        self._lock = threading.Lock()
        self._last_log = -LOG_EVERY_SECONDS

    @property
    def dropped(self) -> int:
        """Spans that never reached the collector: failed exports plus a full queue."""
        return self.failed + self.queue_full

    def admit(self, limit: int) -> bool:
        """Take one more span in, unless `limit` spans are already waiting (then count it)."""
        with self._lock:
            if self.pending >= limit:
                self.queue_full += 1
                return False
            self.pending += 1
            return True

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:  # an exporter bug must cost spans, not the worker thread
            result = SpanExportResult.FAILURE
        with self._lock:
            self.pending = max(0, self.pending - len(spans))
            if result is SpanExportResult.SUCCESS:
                self.exported += len(spans)
            else:
                self.failed += len(spans)
        if result is not SpanExportResult.SUCCESS and time.monotonic() - self._last_log >= LOG_EVERY_SECONDS:
            self._last_log = time.monotonic()
            counts = {"dropped_total": self.dropped, "exported_total": self.exported}
            log.warning("spans not exported (collector unreachable?)", extra=counts)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


class CountingSpanProcessor(BatchSpanProcessor):
    """The SDK's batch processor, with its queue bound kept in front of it so that the spans
    a full queue drops are counted (the SDK only logs them). Every admitted span leaves
    through export(), so `pending` never lets the SDK's own queue overflow."""

    def __init__(self, exporter: CountingSpanExporter, max_queue_size: int = MAX_QUEUE_SIZE) -> None:
        super().__init__(exporter, max_queue_size=max_queue_size)
        self._counting = exporter
        self._limit = max_queue_size

    def on_end(self, span: ReadableSpan) -> None:
        if not (span.context and span.context.trace_flags.sampled):
            return
        if self._counting.admit(self._limit):
            super().on_end(span)


@dataclass
class Tracing:
    provider: TracerProvider
    exporter: CountingSpanExporter

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
    counting = CountingSpanExporter(exporter)
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(CountingSpanProcessor(counting))
    quiet_exporter_logs()
    return Tracing(provider, counting)


def quiet_exporter_logs() -> None:
    """The SDK's exporters and batch processors log per failed batch; keep one a minute."""
    for name in ("opentelemetry.exporter.otlp", "opentelemetry.sdk"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimitFilter) for f in logger.filters):
            logger.addFilter(RateLimitFilter())


_DELTA_SETS: dict[str, tuple[type, ...]] = {
    # OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE, as the specification defines it.
    "cumulative": (),
    "delta": (Counter, ObservableCounter, Histogram),
    "lowmemory": (Counter, Histogram),
}


def otlp_temporality(preference: str) -> dict[type, AggregationTemporality]:
    delta = _DELTA_SETS[preference]
    return {
        kind: AggregationTemporality.DELTA if kind in delta else AggregationTemporality.CUMULATIVE
        for kind in (Counter, UpDownCounter, Histogram, ObservableCounter, ObservableUpDownCounter, ObservableGauge)
    }


def otlp_histogram_aggregation(name: str) -> dict[type, Aggregation]:
    if name == "explicit_bucket_histogram":
        return {}  # the instruments' advisory buckets, as on /metrics
    return {Histogram: ExponentialBucketHistogramAggregation()}


def build_otlp_metric_reader(settings: Settings, cardinality_limit: int | None = None) -> MetricReader | None:
    """Periodic OTLP export, by default with delta temporality and exponential histograms
    (fine resolution, no bucket tuning); the OTEL_EXPORTER_OTLP_METRICS_* variables choose
    otherwise. /metrics keeps its cumulative explicit buckets either way."""
    if not settings.otlp_metrics_enabled:
        return None
    temporality = otlp_temporality(settings.otlp_metrics_temporality)
    aggregation = otlp_histogram_aggregation(settings.otlp_histogram_aggregation)
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
    quiet_exporter_logs()
    limits = cardinality_limits(cardinality_limit) if cardinality_limit else None
    # The interval comes from OTEL_METRIC_EXPORT_INTERVAL (SDK default 60 s).
    return PeriodicExportingMetricReader(
        exporter, export_timeout_millis=EXPORT_TIMEOUT_MILLIS, cardinality_limits=limits
    )


def cardinality_limits(limit: int) -> dict[type, int]:
    """The same per-metric series limit for every instrument kind the probe uses."""
    return dict.fromkeys((Counter, UpDownCounter, Histogram, ObservableGauge), limit)


def tracer(tracing: Tracing | None) -> trace.Tracer:
    if tracing is None:
        return trace.NoOpTracer()
    return tracing.provider.get_tracer(names.TRACER_NAME, __version__)
