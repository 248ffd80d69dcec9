"""PointRecorder: a run of histogram points recorded through SDK internals must export
exactly what recording them one by one through the API exports, on every kind of reader."""

from __future__ import annotations

import logging

import pytest
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View

from probe.telemetry.points import PointRecorder

VALUES = [0.0002, 0.00031, 0.0005, 0.004, 0.0002, 0.75, 3.0, 0.00001]
ATTRIBUTES = {"type": "path_node-b"}


def _readers() -> list[InMemoryMetricReader]:
    return [
        InMemoryMetricReader(),
        InMemoryMetricReader(preferred_temporality={Histogram: AggregationTemporality.DELTA}),
        InMemoryMetricReader(preferred_aggregation={Histogram: ExponentialBucketHistogramAggregation()}),
    ]


def _points(reader: InMemoryMetricReader) -> dict[str, object]:
    """Histogram name -> its one data point, as the reader exports it."""
    data = reader.get_metrics_data()
    assert data is not None
    found = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                (point,) = metric.data.data_points
                found[metric.name] = point
    return found


def _same(a: object, b: object) -> None:
    for name in ("count", "sum", "min", "max", "bucket_counts", "attributes"):
        if hasattr(a, name):
            assert getattr(a, name) == getattr(b, name), name
    for side in ("positive", "negative"):  # exponential histograms
        if hasattr(a, side):
            assert getattr(a, side).bucket_counts == getattr(b, side).bucket_counts
            assert a.scale == b.scale  # type: ignore[attr-defined]


@pytest.mark.parametrize("rounds", [1, 3])
def test_a_run_of_points_exports_as_the_points_one_by_one(rounds: int) -> None:
    readers = _readers()
    provider = MeterProvider(metric_readers=readers)
    meter = provider.get_meter("test")
    bounds = [0.0001, 0.0005, 0.001, 0.01, 1.0]
    fast = meter.create_histogram("fast", explicit_bucket_boundaries_advisory=bounds)
    slow = meter.create_histogram("slow", explicit_bucket_boundaries_advisory=bounds)
    recorder = PointRecorder(provider)
    for i in range(rounds):
        values = VALUES[i:] + VALUES[:i]
        recorder.record(fast, values, ATTRIBUTES)
        for value in values:
            slow.record(value, ATTRIBUTES)
    for reader in readers:
        points = _points(reader)
        assert points["fast"].count == len(VALUES) * rounds  # type: ignore[attr-defined]
        _same(points["fast"], points["slow"])
    assert not recorder._broken


def test_a_filtering_view_gets_every_point_through_the_api() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], views=[View(instrument_name="fast", attribute_keys=set())])
    fast = provider.get_meter("test").create_histogram("fast")
    PointRecorder(provider).record(fast, VALUES, ATTRIBUTES)
    point = _points(reader)["fast"]
    assert point.count == len(VALUES) and dict(point.attributes) == {}  # type: ignore[attr-defined]


def test_changed_internals_fall_back_to_the_api_and_say_so(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    fast = provider.get_meter("test").create_histogram("fast")
    # The SDK's own modules hold their reference; only a new import of it fails.
    monkeypatch.delattr("opentelemetry.sdk.metrics._internal.measurement.Measurement")
    with caplog.at_level(logging.ERROR, logger="probe.telemetry.points"):
        recorder = PointRecorder(provider)
        recorder.record(fast, VALUES, ATTRIBUTES)
        recorder.record(fast, VALUES, ATTRIBUTES)
    assert recorder._broken
    assert _points(reader)["fast"].count == 2 * len(VALUES)  # type: ignore[attr-defined]
    assert len([r for r in caplog.records if "internals changed" in r.getMessage()]) == 1


def test_the_first_point_of_a_run_is_offered_as_an_exemplar_inside_a_sampled_span() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    fast = provider.get_meter("test").create_histogram("fast", explicit_bucket_boundaries_advisory=[0.001, 1.0])
    recorder = PointRecorder(provider)
    recorder.record(fast, [0.5], ATTRIBUTES)  # the series exists: what follows takes the fast path
    tracer = TracerProvider().get_tracer("test")
    with trace.use_span(tracer.start_span("check"), end_on_exit=True) as span:
        recorder.record(fast, [0.0002, 0.0003, 3.0], ATTRIBUTES)
        trace_id = span.get_span_context().trace_id
    recorder.record(fast, [0.0004], ATTRIBUTES)  # no span: no exemplar
    point = _points(reader)["fast"]
    assert point.count == 5  # type: ignore[attr-defined]
    exemplars = point.exemplars  # type: ignore[attr-defined]
    assert [(e.value, e.trace_id) for e in exemplars] == [(0.0002, trace_id)]
    assert not recorder._broken
