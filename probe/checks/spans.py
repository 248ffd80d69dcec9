"""The CLIENT span of a check and its phases, for every kind.

Phases are child spans rather than span events: Jaeger and Tempo draw child spans as bars
on the waterfall, so "the TLS handshake took 80 ms of this 90 ms check" is seen at a
glance, whereas events are zero-width dots whose gaps the reader must subtract by hand.
Children are created after the check from the measured timestamps, so the check pays
nothing for them; each lasts the network time the metrics record for it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from probe import names
from probe.checks.result import AttributeValue, CheckResult, Target


@dataclass
class Clock:
    """One check's start on both clocks, to place perf_counter moments on the wall clock."""

    start_ns: int = field(default_factory=time.perf_counter_ns)
    wall_start_ns: int = field(default_factory=time.time_ns)

    def wall(self, perf_ns: int) -> int:
        return self.wall_start_ns + (perf_ns - self.start_ns)


def span_name(check_type: str, kind: str = names.KIND_HTTP) -> str:
    """`check <type>`; a UDP train `check <type> (udp)`: a neighbour has both under one type."""
    return f"check {check_type} (udp)" if kind == names.KIND_UDP else f"check {check_type}"


def start(tracer: trace.Tracer, target: Target, clock: Clock, known: Mapping[str, AttributeValue]) -> trace.Span:
    """The check's span, begun at the clock's start; `known`: the kind's attributes."""
    attributes: dict[str, AttributeValue] = {names.ATTR_CHECK_TYPE: target.check_type, "url.full": target.url, **known}
    if target.neighbour is not None:
        attributes[names.ATTR_NEIGHBOUR_NODE] = target.neighbour.node_name
        attributes[names.ATTR_NEIGHBOUR_POD] = target.neighbour.pod_name
    return tracer.start_span(
        span_name(target.check_type, target.kind),
        kind=SpanKind.CLIENT,
        attributes=attributes,
        start_time=clock.wall_start_ns,
    )


def finish(tracer: trace.Tracer, span: trace.Span, clock: Clock, result: CheckResult) -> None:
    """What the check found onto its span, a child per phase; then the span ends. A phase
    timed by another source than the check's says so (`kubenurse.timing.source`)."""
    if not span.is_recording():
        span.end()
        return
    if result.peer is not None:
        span.set_attribute("network.peer.address", result.peer[0])
        span.set_attribute("network.peer.port", result.peer[1])
    if result.timing_source is not None:
        span.set_attribute(names.ATTR_TIMING_SOURCE, result.timing_source)
    span.set_attributes(dict(result.facts.attributes))
    if result.facts.retransmits is not None:
        span.set_attribute(names.ATTR_TCP_RETRANSMITS, result.facts.retransmits)
    if result.facts.udp is not None:
        span.set_attribute(names.ATTR_UDP_SENT, result.facts.udp.sent)
        span.set_attribute(names.ATTR_UDP_LOST, result.facts.udp.lost)
    context = trace.set_span_in_context(span)
    failure = result.failure
    for phase in result.phases:
        child = tracer.start_span(phase.name, context=context, start_time=clock.wall(phase.start_ns))
        if phase.source is not None and phase.source != result.timing_source:
            child.set_attribute(names.ATTR_TIMING_SOURCE, phase.source)
        if phase.end_ns is not None:
            child.end(end_time=clock.wall(phase.end_ns))
            continue
        if failure is not None and failure.event in (phase.done, names.ROUND_TRIP_ERROR):
            child.set_status(Status(StatusCode.ERROR, result.summary))
        child.end()
    if failure is not None:
        span.set_status(Status(StatusCode.ERROR, result.summary))
        span.set_attribute("error.type", failure.error_type)
        span.set_attribute(names.ATTR_ERROR_EVENT, failure.event)
    span.end()
