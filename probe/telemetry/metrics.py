"""The contract's instruments, on one MeterProvider, served on /metrics by the
PrometheusMetricReader from a private registry, and optionally over OTLP."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder

from probe import names
from probe.checks.result import CheckResult
from probe.telemetry.exemplars import ExemplarCollector, ExemplarPrometheusReader, ExemplarStore
from probe.telemetry.otel import run_bounded

log = logging.getLogger(__name__)


class Metrics:
    """Records check results; owns the MeterProvider and the /metrics registry."""

    def __init__(
        self,
        *,
        buckets: Sequence[float],
        incoming: Callable[[], int],
        resource: Resource | None = None,
        extra_readers: Iterable[MetricReader] = (),
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        # The exporter writes into a registry of its own; /metrics serves it through the
        # exemplar collector (exemplars show in OpenMetrics scrapes only).
        self._exemplars = ExemplarStore()
        # No auto_describe: it would collect before the reader is on a MeterProvider.
        exported = CollectorRegistry(auto_describe=False)
        self._prometheus = ExemplarPrometheusReader(
            self._exemplars, disable_target_info=True, scope_info_enabled=False, registry=exported
        )
        self.registry.register(ExemplarCollector(exported, self._exemplars))
        self.provider = MeterProvider(
            metric_readers=[self._prometheus, *extra_readers],
            resource=resource or Resource.get_empty(),
            shutdown_on_exit=False,  # Probe.stop() flushes, within a time budget
        )
        meter = self.provider.get_meter(names.METER_NAME)
        # Buckets come from the advisory, not a View, so an OTLP reader may still choose
        # exponential histograms while /metrics keeps these explicit bounds (NOTES.md).
        self.request_duration = meter.create_histogram(
            names.REQUEST_DURATION,
            unit=names.UNIT_SECONDS,
            description="latency distribution of http requests",
            explicit_bucket_boundaries_advisory=list(buckets),
        )
        self.trace_duration = meter.create_histogram(
            names.TRACE_REQUEST_DURATION,
            unit=names.UNIT_SECONDS,
            description="Latency histogram for requests from the kubenurse http client. "
            "Time in seconds since the start of the http request.",
            explicit_bucket_boundaries_advisory=list(buckets),
        )
        self.requests = meter.create_counter(
            names.REQUESTS, description="A counter for requests from the kubenurse http client."
        )
        self.errors = meter.create_counter(
            names.ERRORS, description="Kubenurse error counter partitioned by error type"
        )
        self.cert_expiry = meter.create_gauge(
            names.TLS_CERT_EXPIRY,
            unit=names.UNIT_SECONDS,
            description="Earliest notAfter (Unix time) of the certificates the peer of an HTTPS check presented",
        )

        def observe_incoming(_options: CallbackOptions) -> Iterable[Observation]:
            yield Observation(incoming())

        meter.create_observable_gauge(
            names.INCOMING_CHECKS,
            callbacks=[observe_incoming],
            description="Number of unique source nodes checks in the last minute",
        )

    def record(self, result: CheckResult) -> None:
        """Record one performed check. Call it inside the check's span: histogram points
        then carry the trace id as an exemplar."""
        if result.skipped:
            return
        check_type = {names.LABEL_TYPE: result.check_type}
        for event, offset in result.events.items():
            self.trace_duration.record(offset, {**check_type, names.LABEL_EVENT: event})
        if result.status_code is not None:
            code = str(result.status_code)
        else:  # no HTTP status: a failed GET, or a kind that has none (dns, tcp)
            code = names.CODE_OK if result.ok else names.ROUND_TRIP_ERROR
        self.requests.add(1, {**check_type, names.LABEL_CODE: code})
        if result.duration is not None:
            self.request_duration.record(result.duration, check_type)
        if result.cert_not_after is not None:
            self.cert_expiry.set(result.cert_not_after, check_type)
        if result.error_event:
            self.errors.add(1, {**check_type, names.LABEL_EVENT: result.error_event})

    def forget(self, check_types: set[str]) -> int:
        """Drop every series of these check types (a node left the neighbourhood).

        The SDK has no public way to retire an attribute set, and cumulative readers keep
        them forever; we remove them from its aggregation storage. This reaches into SDK
        internals on purpose; tests/test_metrics.py proves it on the pinned version and a
        failure only logs, so an SDK upgrade degrades to kubenurse's behaviour (stale series).
        """
        if not check_types:
            return 0
        wanted = {(names.LABEL_TYPE, ("str", t)) for t in check_types}
        dropped = 0
        try:
            storages = self.provider._measurement_consumer._reader_storages
            for storage in storages.values():
                for matches in storage._instrument_view_instrument_matches.values():
                    for match in matches:
                        with match._lock:
                            aggregations = match._attributes_aggregation
                            for key in [k for k in aggregations if _has_any(k, wanted)]:
                                del aggregations[key]
                                dropped += 1
        except (AttributeError, TypeError) as e:  # pragma: no cover - SDK internals moved
            log.warning("cannot drop series of departed neighbours: %s", e)
        self._exemplars.forget(names.LABEL_TYPE, check_types)
        return dropped

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """Render /metrics for this Accept header (OpenMetrics when asked). Blocking: a
        scrape collects synchronously, so callers run it off the event loop."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def shutdown(self, timeout_seconds: float = 5.0) -> None:
        run_bounded(lambda: self.provider.shutdown(timeout_millis=timeout_seconds * 1000), timeout_seconds)


def _has_any(key: object, wanted: set[tuple[str, tuple[str, str]]]) -> bool:
    # Keys look like ("mapping", (("type", ("str", "path_x")), ...)).
    if isinstance(key, tuple) and len(key) == 2 and key[0] == "mapping":
        return any(item in wanted for item in key[1])
    return False
