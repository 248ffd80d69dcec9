"""/metrics with a 1,000-node neighbourhood (KUBENURSE_NEIGHBOUR_LIMIT=0, every check over
TLS: nine trace events each): series count, exposition size and time, and the memory the
SDK's aggregation storage takes, with the series cap sized from the settings."""

from __future__ import annotations

import statistics
import time
import tracemalloc

from bench.core import Row
from probe import names
from probe.checks.result import CheckResult
from probe.settings import DEFAULT_BUCKETS
from probe.telemetry.metrics import Metrics, series_limit

NODES = 1000


def _result(check_type: str) -> CheckResult:
    events = {event: 0.001 * (i + 1) for i, event in enumerate(names.EVENTS)}
    return CheckResult(check_type=check_type, status_code=200, duration=0.01, events=events)


def run() -> list[Row]:
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    metrics = Metrics(buckets=DEFAULT_BUCKETS, incoming=lambda: 0, cardinality_limit=series_limit(0, 0))
    for i in range(NODES):
        metrics.record(_result(names.path_type(f"node-{i:04d}")))
    stored = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    times, text = [], b""
    for _ in range(5):
        started = time.perf_counter()
        text, _ = metrics.exposition("text/plain")
        times.append(time.perf_counter() - started)
    body = text.decode()
    overflow = "otel_metric_overflow" in body
    count = "kubenurse_httpclient_trace_request_duration_seconds_count"
    series = sum(1 for line in body.splitlines() if line.startswith(count))
    metrics.shutdown(1.0)
    return [
        (f"/metrics, {NODES} neighbours: trace series (overflow label?)", f"{series} ({'yes' if overflow else 'no'})"),
        (f"/metrics, {NODES} neighbours: exposition size", f"{len(text) / 1e6:.1f} MB"),
        (f"/metrics, {NODES} neighbours: exposition time (median of 5)", f"{statistics.median(times) * 1000:.0f} ms"),
        (f"/metrics, {NODES} neighbours: memory of the recorded series", f"{stored / 1e6:.1f} MB"),
    ]


if __name__ == "__main__":
    for label, value in run():
        print(f"{label}: {value}")
