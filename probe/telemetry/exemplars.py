"""Exemplars on /metrics (OpenMetrics only): the trace of a recent check in each bucket.

The stock Prometheus exporter drops the exemplars the SDK collects. This reader keeps, for
every histogram bucket, the latest exemplar that carries a trace id, and a collector in
front of the exporter's output attaches them to the `_bucket` samples. The text format
ignores exemplars; OpenMetrics scrapes show them, so Grafana can jump from a latency
spike to its trace. Only public prometheus_client types are touched; on the SDK side only
`_receive_metrics`, the hook every MetricReader implements.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics.export import HistogramDataPoint, MetricsData
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Exemplar

#: (metric name on /metrics, sorted label items without le, le) -> exemplar
_Key = tuple[str, tuple[tuple[str, str], ...], str]


def _exposed_name(name: str, unit: str) -> str:
    # What the exporter prints for a histogram with this unit (it appends `_seconds` for "s").
    return f"{name}_seconds" if unit == "s" and not name.endswith("_seconds") else name


class ExemplarStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[_Key, Exemplar] = {}

    def update(self, metrics_data: MetricsData) -> None:
        for resource_metrics in metrics_data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    name = _exposed_name(metric.name, metric.unit or "")
                    for point in getattr(metric.data, "data_points", ()):
                        if isinstance(point, HistogramDataPoint) and point.exemplars:
                            self._add(name, point)

    def _add(self, name: str, point: HistogramDataPoint) -> None:
        labels = tuple(sorted((str(k), str(v)) for k, v in (point.attributes or {}).items()))
        bounds = list(point.explicit_bounds)
        with self._lock:
            for exemplar in point.exemplars:
                if not exemplar.trace_id:
                    continue
                index = bisect.bisect_left(bounds, exemplar.value)
                le = f"{bounds[index]}" if index < len(bounds) else "+Inf"
                self._latest[(name, labels, le)] = Exemplar(
                    {"trace_id": f"{exemplar.trace_id:032x}", "span_id": f"{exemplar.span_id:016x}"},
                    exemplar.value,
                    exemplar.time_unix_nano / 1e9,
                )

    def get(self, key: _Key) -> Exemplar | None:
        return self._latest.get(key)

    def forget(self, label: str, values: set[str]) -> None:
        with self._lock:
            for key in [k for k in self._latest if any(item[0] == label and item[1] in values for item in k[1])]:
                del self._latest[key]


class ExemplarPrometheusReader(PrometheusMetricReader):
    """The stock reader, remembering histogram exemplars as metrics come through."""

    def __init__(self, store: ExemplarStore, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._store = store

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        if metrics_data is not None:
            self._store.update(metrics_data)
        super()._receive_metrics(metrics_data, timeout_millis, **kwargs)


class ExemplarCollector:
    """Yields the exporter's metric families, with exemplars attached to bucket samples."""

    def __init__(self, inner: CollectorRegistry, store: ExemplarStore) -> None:
        self._inner = inner
        self._store = store

    def describe(self) -> list[Metric]:
        # Registering must not trigger a collection (the SDK warns before it is wired up).
        return []

    def collect(self) -> Iterator[Metric]:
        for family in self._inner.collect():
            if family.type == "histogram":
                family.samples = list(self._with_exemplars(family.name, family.samples))
            yield family

    def _with_exemplars(self, name: str, samples: Iterable[Any]) -> Iterator[Any]:
        for sample in samples:
            if sample.name.endswith("_bucket") and sample.exemplar is None:
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
                exemplar = self._store.get((name, labels, sample.labels.get("le", "")))
                if exemplar is not None:
                    sample = sample._replace(exemplar=exemplar)
            yield sample
