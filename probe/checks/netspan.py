"""The CLIENT span of a check that is not an HTTP GET (dns, tcp), with its phases as children.

Same shape as the HTTP span (spans.py): `check <type>`, `kubenurse.check.type`, phases as
child spans with their real start and end, error status with `error.type` and
`kubenurse.error.event` on failure.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from probe import names
from probe.checks.result import CheckResult, Target

AttributeValue = str | int | bool


@dataclass
class Clock:
    """One check's start on both clocks, to place perf_counter marks on the wall clock."""

    start_ns: int = field(default_factory=time.perf_counter_ns)
    wall_start_ns: int = field(default_factory=time.time_ns)

    def wall(self, perf_ns: int) -> int:
        return self.wall_start_ns + (perf_ns - self.start_ns)


@dataclass(frozen=True)
class Phase:
    """A child span: `name` from `start_ns` to `end_ns` (perf_counter); open when end is None."""

    name: str
    start_ns: int
    end_ns: int | None
    failed_event: str


def start(tracer: trace.Tracer, target: Target, clock: Clock) -> trace.Span:
    attributes: dict[str, AttributeValue] = {names.ATTR_CHECK_TYPE: target.check_type, "url.full": target.url}
    return tracer.start_span(
        f"check {target.check_type}", kind=SpanKind.CLIENT, attributes=attributes, start_time=clock.wall_start_ns
    )


def finish(
    tracer: trace.Tracer,
    span: trace.Span,
    result: CheckResult,
    clock: Clock,
    phases: list[Phase],
    attributes: Mapping[str, AttributeValue],
) -> None:
    if not span.is_recording():
        span.end()
        return
    span.set_attributes(dict(attributes))
    context = trace.set_span_in_context(span)
    for phase in phases:
        child = tracer.start_span(phase.name, context=context, start_time=clock.wall(phase.start_ns))
        if phase.end_ns is None:
            if result.error_event == phase.failed_event:
                child.set_status(Status(StatusCode.ERROR, result.summary))
            child.end()
        else:
            child.end(end_time=clock.wall(phase.end_ns))
    if not result.ok:
        span.set_status(Status(StatusCode.ERROR, result.summary))
        span.set_attribute("error.type", result.error_type or "error")
        span.set_attribute(names.ATTR_ERROR_EVENT, result.error_event or names.ROUND_TRIP_ERROR)
    span.end()
