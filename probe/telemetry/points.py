"""Many points of one histogram under one attribute set, for about the cost of one.

A UDP train records a round trip per datagram. Through the OpenTelemetry API each point
pays for its own measurement: the attribute set cleaned and hashed, the context looked up,
the exemplar filter asked, each reader's storage walked (17 µs a point measured on a 2-core
VM, the largest single part of a train's Python). Here the first point goes through the API (it creates the
series and may carry an exemplar) and the others straight into the aggregations that point
reached, through SDK internals: pyproject.toml pins the SDK's minor version, and
tests/test_points.py checks that both ways export the same histogram on /metrics and over
OTLP. Should the internals still differ, every point goes through the API.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

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

    def _give_up(self, error: Exception) -> None:
        self._broken = True
        log.error("recording histogram points one by one (SDK internals changed): %s", error)

    def record(self, histogram: Histogram, values: Sequence[float], attributes: Mapping[str, str]) -> None:
        if not values:
            return
        histogram.record(values[0], attributes)
        if len(values) > 1 and (self._broken or not self._aggregate(histogram, values[1:], attributes)):
            for value in values[1:]:
                histogram.record(value, attributes)

    def _aggregate(self, histogram: Histogram, values: Sequence[float], attributes: Mapping[str, str]) -> bool:
        """True when the values went into the series the first point reached."""
        try:
            key = self._hash(dict(attributes))
            matches: list[Any] = []
            storages: Any = self._provider._measurement_consumer._reader_storages
            for storage in storages.values():
                for match in storage._instrument_view_instrument_matches.get(histogram, ()):
                    if match._view._attribute_keys is not None or key not in match._attributes_aggregation:
                        return False  # a filtering view, or past the cardinality limit (overflow)
                    matches.append(match)
            if not matches:
                return False
            points = [self._measurement(value, 0, histogram, None, None) for value in values]
            for match in matches:
                # Under the lock, as the SDK does: a delta reader's collection may have just
                # replaced the aggregation (it is then made again, as the API would).
                with match._lock:
                    aggregation = match._get_or_create_aggregation(key, dict(attributes))
                    for point in points:
                        aggregation.aggregate(point, False)
            return True
        except (AttributeError, TypeError) as e:
            self._give_up(e)
            return False
