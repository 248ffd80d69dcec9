"""What a user sees of a check of any kind: its series on /metrics, and its span."""

from __future__ import annotations

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from probe.telemetry.metrics import Metrics


def new_metrics() -> Metrics:
    return Metrics(buckets=(0.005, 0.01, 0.1, 1, 10), incoming=lambda: 0)


def series(metrics: Metrics, check_type: str) -> dict[str, float]:
    """`name{label="value",...}` -> value for the counters, histogram counts and gauges of one
    check type, as /metrics shows them (buckets and sums left out)."""
    text, _ = metrics.exposition("text/plain")
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            if s.labels.get("type") != check_type:
                continue
            if s.name.endswith(("_bucket", "_sum", "_created")):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            found[f"{s.name}{{{labels}}}"] = s.value
    return found


class Spans:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("test")

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    def children(self, parent: ReadableSpan) -> dict[str, ReadableSpan]:
        return {
            s.name: s
            for s in self.exporter.get_finished_spans()
            if s.parent is not None and s.parent.span_id == parent.context.span_id
        }
