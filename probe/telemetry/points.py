"""Many points of one histogram under one attribute set, for about the cost of one.

A UDP train records a round trip per datagram. Through the OpenTelemetry API each point
pays for its own measurement: the attribute set cleaned and hashed, the context looked up,
the exemplar filter asked, each reader's storage walked (17 µs a point measured on a 2-core
VM with cold caches). Here, once the series exists, the points go straight into its
aggregations through SDK internals. Only the first of a run is offered as an exemplar (when the
SDK's exemplar filter takes it, as through the API): one trace link a train is what an
exemplar is for. The first point of a new series goes through the API (it creates the series,
within the cardinality limit). pyproject.toml pins the SDK's minor version, and
tests/test_points.py checks that both ways export the same histogram on /metrics and over
OTLP, and the exemplar. Should the internals still differ, every point goes through the API.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.context import get_current
from opentelemetry.metrics import Histogram
from opentelemetry.sdk.metrics import MeterProvider

log = logging.getLogger(__name__)


class PointRecorder:
    """Records runs of points on `provider`'s instruments."""

    def __init__(self, provider: MeterProvider) -> None:
        self._provider = provider
        try:
            from opentelemetry.sdk.metrics._internal._view_instrument_match import _hash_attributes
            from opentelemetry.sdk.metrics._internal.measurement import Measurement
        except ImportError as e:
            self._give_up(e)
        else:
            self._broken = False
            self._hash: Any = _hash_attributes
            self._measurement: Any = Measurement
            self._filter: Any = getattr(getattr(provider, "_sdk_config", None), "exemplar_filter", None)
            if self._filter is None:
                self._give_up(AttributeError("MeterProvider._sdk_config.exemplar_filter"))

    def _give_up(self, error: Exception) -> None:
        self._broken = True
        log.error("recording histogram points one by one (SDK internals changed): %s", error)

    def record(self, histogram: Histogram, values: Sequence[float], attributes: Mapping[str, str]) -> None:
        if not values or (not self._broken and self._aggregate(histogram, values, attributes, exemplar=True)):
            return
        histogram.record(values[0], attributes)  # a new series: the API makes it
        rest = values[1:]
        if rest and (self._broken or not self._aggregate(histogram, rest, attributes, exemplar=False)):
            for value in rest:
                histogram.record(value, attributes)

    def _aggregate(
        self, histogram: Histogram, values: Sequence[float], attributes: Mapping[str, str], *, exemplar: bool
    ) -> bool:
        """True when the values went into the existing series; the first offered as an
        exemplar if `exemplar` and the exemplar filter takes it (as through the API)."""
        try:
            key = self._hash(dict(attributes))
            matches: list[Any] = []
            storages: Any = self._provider._measurement_consumer._reader_storages
            for storage in storages.values():
                for match in storage._instrument_view_instrument_matches.get(histogram, ()):
                    if match._view._attribute_keys is not None or key not in match._attributes_aggregation:
                        return False  # a filtering view, a series not made yet, or past the limit
                    matches.append(match)
            if not matches:
                return False
            first, sample = self._measurement(values[0], 0, histogram, None, None), False
            if exemplar:
                context, now = get_current(), time.time_ns()
                sample = bool(self._filter.should_sample(values[0], now, attributes, context))
                if sample:
                    first = self._measurement(values[0], now, histogram, context, attributes)
            points = [self._measurement(value, 0, histogram, None, None) for value in values[1:]]
            for match in matches:
                # Under the lock, as the SDK does: a delta reader's collection may have just
                # replaced the aggregation (it is then made again, as the API would).
                with match._lock:
                    aggregation = match._get_or_create_aggregation(key, dict(attributes))
                    aggregation.aggregate(first, sample)
                    for point in points:
                        aggregation.aggregate(point, False)
            return True
        except (AttributeError, TypeError) as e:
            self._give_up(e)
            return False
