"""The contract's instruments, on one MeterProvider, served on /metrics by the
PrometheusMetricReader from a private registry, and optionally over OTLP."""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Iterable, Sequence

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, Gauge, ProcessCollector
from prometheus_client.exposition import choose_encoder

from probe import __version__, names
from probe.checks.result import CheckResult
from probe.telemetry.exemplars import ExemplarCollector, ExemplarPrometheusReader, ExemplarStore
from probe.telemetry.otel import cardinality_limits, run_bounded
from probe.telemetry.points import PointRecorder

log = logging.getLogger(__name__)

#: The largest cluster Kubernetes supports: with KUBENURSE_NEIGHBOUR_LIMIT=0 every node
#: may be a neighbour.
MAX_NODES = 5000
#: Built-in check types besides the neighbours (two API-server checks, ingress, service,
#: and room for one more).
BUILTIN_CHECK_TYPES = 5
#: Series one check type can have in one metric: an event each on the trace histogram and
#: on errors, plus status codes and round_trip_error.
SERIES_PER_CHECK_TYPE = 2 * len(names.EVENTS)


def series_limit(neighbour_limit: int, extra_checks: int) -> int:
    """Per-metric series cap for the SDK. Past its limit the SDK moves new series under an
    `otel_metric_overflow` label, which breaks the contract's label sets, so the cap is sized
    from the settings: every check type the probe can have, twice over for neighbours (one
    round may still hold a departed node's series while its successor is already checked)."""
    neighbours = neighbour_limit or MAX_NODES
    check_types = 2 * neighbours + BUILTIN_CHECK_TYPES + extra_checks
    return check_types * SERIES_PER_CHECK_TYPE


class Metrics:
    """Records check results; owns the MeterProvider and the /metrics registry."""

    def __init__(
        self,
        *,
        buckets: Sequence[float],
        incoming: Callable[[], int],
        resource: Resource | None = None,
        extra_readers: Iterable[MetricReader] = (),
        cardinality_limit: int | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        build = Gauge(
            names.BUILD_INFO,
            "The probe's version and the Python running it (always 1).",
            [names.LABEL_VERSION, names.LABEL_PYTHON_VERSION],
            registry=self.registry,
        )
        build.labels(__version__, platform.python_version()).set(1)
        # The exporter writes into a registry of its own; /metrics serves it through the
        # exemplar collector (exemplars show in OpenMetrics scrapes only).
        self._exemplars = ExemplarStore()
        # No auto_describe: it would collect before the reader is on a MeterProvider.
        exported = CollectorRegistry(auto_describe=False)
        self._prometheus = ExemplarPrometheusReader(
            self._exemplars,
            disable_target_info=True,
            scope_info_enabled=False,
            registry=exported,
            cardinality_limits=cardinality_limits(cardinality_limit) if cardinality_limit else None,
        )
        self.registry.register(ExemplarCollector(exported, self._exemplars))
        self.provider = MeterProvider(
            metric_readers=[self._prometheus, *extra_readers],
            resource=resource or Resource.get_empty(),
            shutdown_on_exit=False,  # Probe.stop() flushes, within a time budget
        )
        # The SDK reads OTEL_SDK_DISABLED in __init__ and then hands out no-op meters, which
        # would empty /metrics. The contract uses that variable to turn OTLP off only (the
        # settings do that), so /metrics ignores it. tests/test_metrics.py fails if the SDK
        # stops honouring this attribute.
        if getattr(self.provider, "_disabled", False):
            self.provider._disabled = False
        self._points = PointRecorder(self.provider)
        meter = self.provider.get_meter(names.METER_NAME)
        # Buckets come from the advisory, not a View, so an OTLP reader may still choose
        # exponential histograms while /metrics keeps these explicit bounds (Views would apply
        # to every reader).
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
        self.tcp_retransmits = meter.create_counter(
            names.TCP_RETRANSMITS,
            description="TCP segments the kernel resent on the checks' connections, SYNs included",
        )
        # A train's counts are added to totals of our own and observed when the readers
        # collect: a counter's add() per train cost about as much as recording its round trips
        # (a UDP train of ten neighbours every round is held to a CPU budget).
        self._udp_totals: dict[str, list[int]] = {}  # check type -> [sent, lost]
        meter.create_observable_counter(
            names.UDP_PACKETS_SENT,
            callbacks=[lambda _options: self._observe_udp(0)],
            description="Datagrams the UDP checks sent to probes' UDP echo",
        )
        meter.create_observable_counter(
            names.UDP_PACKETS_LOST,
            callbacks=[lambda _options: self._observe_udp(1)],
            description="Datagrams of the UDP checks that did not come back within the check timeout",
        )
        self.udp_rtt = meter.create_histogram(
            names.UDP_RTT,
            unit=names.UNIT_SECONDS,
            description="Round trips of the UDP checks' datagrams (kernel send to kernel receive)",
            explicit_bucket_boundaries_advisory=list(buckets),
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
        udp = result.facts.udp
        if udp is not None:
            # A UDP train is no HTTP request: a neighbour's UDP path shares its type with the
            # HTTP check of that neighbour, whose httpclient series it must not touch.
            totals = self._udp_totals.get(result.check_type)
            if totals is None:
                totals = self._udp_totals[result.check_type] = [0, 0]
            totals[0] += udp.sent
            totals[1] += udp.lost
            self._points.record(self.udp_rtt, udp.rtts, check_type)
            if result.error_event:
                self.errors.add(1, {**check_type, names.LABEL_EVENT: result.error_event})
            return
        for event, offset in result.events.items():
            self.trace_duration.record(offset, {**check_type, names.LABEL_EVENT: event})
        if result.status_code is not None:
            code = str(result.status_code)
        else:  # no HTTP status: a failed GET, or a kind that has none (dns, tcp)
            code = names.CODE_OK if result.ok else names.ROUND_TRIP_ERROR
        self.requests.add(1, {**check_type, names.LABEL_CODE: code})
        if result.duration is not None:
            self.request_duration.record(result.duration, check_type)
        if result.facts.retransmits is not None:
            self.tcp_retransmits.add(result.facts.retransmits, check_type)
        if result.cert_not_after is not None:
            self.cert_expiry.set(result.cert_not_after, check_type)
        if result.failure is not None:
            self.errors.add(1, {**check_type, names.LABEL_EVENT: result.failure.event})

    def _observe_udp(self, which: int) -> Iterable[Observation]:
        """The UDP totals (which: 0 sent, 1 lost), read in the collecting thread: a copy of the
        dict is taken at once, so a train recorded meanwhile cannot break the iteration."""
        for check_type, totals in list(self._udp_totals.items()):
            yield Observation(totals[which], {names.LABEL_TYPE: check_type})

    def forget(self, check_types: set[str]) -> int:
        """Drop every series of these check types (a node left the neighbourhood).

        The SDK has no public way to retire an attribute set, and cumulative readers keep
        them forever; we remove them from its aggregation storage. This reaches into SDK
        internals on purpose: pyproject.toml pins the SDK's minor version, and
        tests/test_metrics.py checks the storage shape on it. Should the shape still change,
        this logs an error (once per call) and the probe degrades to kubenurse's behaviour
        (stale series), rather than silently dropping nothing.
        """
        if not check_types:
            return 0
        for check_type in check_types:
            self._udp_totals.pop(check_type, None)
        wanted = {(names.LABEL_TYPE, ("str", t)) for t in check_types}
        dropped = 0
        try:
            storages = self.provider._measurement_consumer._reader_storages
            for storage in storages.values():
                for matches in storage._instrument_view_instrument_matches.values():
                    for match in matches:
                        with match._lock:
                            aggregations = match._attributes_aggregation
                            for key in list(aggregations):
                                if _has_any(key, wanted):
                                    del aggregations[key]
                                    dropped += 1
        except (AttributeError, TypeError, ValueError) as e:  # SDK internals moved
            log.error("cannot drop series of departed neighbours (SDK internals changed): %s", e)
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
    """Keys look like ("mapping", (("type", ("str", "path_x")), ...)) in the pinned SDK; any
    other shape raises, so forget() says so instead of silently keeping every series."""
    if isinstance(key, tuple) and len(key) == 2 and key[0] == "mapping" and isinstance(key[1], tuple):
        return any(item in wanted for item in key[1])
    if key == ("NoneType", None):  # a series without attributes (the incoming-checks gauge)
        return False
    raise ValueError(f"unexpected series key {key!r}")
