"""The CLIENT span of a check and its phases.

Phases are child spans rather than span events: Jaeger and Tempo draw child spans as bars
on the waterfall, so "the TLS handshake took 80 ms of this 90 ms check" is seen at a
glance, whereas events are zero-width dots whose gaps the reader must subtract by hand.
Children are created after the request from the measured timestamps, so the request path
pays nothing for them.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from probe import names
from probe.checks.httptrace import Timeline
from probe.checks.result import CheckResult, Target

#: (child span name, start event, end event)
PHASES = (
    ("dns", names.DNS_START, names.DNS_DONE),
    ("connect", names.CONNECT_START, names.CONNECT_DONE),
    ("tls handshake", names.TLS_HANDSHAKE_START, names.TLS_HANDSHAKE_DONE),
    ("send request", names.GOT_CONN, names.WROTE_REQUEST),
    ("wait for first byte", names.WROTE_REQUEST, names.GOT_FIRST_RESP_BYTE),
)


def span_name(check_type: str) -> str:
    return f"check {check_type}"


def start_client_span(tracer: trace.Tracer, target: Target, timeline: Timeline) -> trace.Span:
    url = urlsplit(target.url)
    attributes: dict[str, str | int] = {
        names.ATTR_CHECK_TYPE: target.check_type,
        "http.request.method": "GET",
        "url.full": target.url,
        "server.address": url.hostname or "",
        "server.port": url.port or (443 if url.scheme == "https" else 80),
    }
    if target.neighbour is not None:
        attributes[names.ATTR_NEIGHBOUR_NODE] = target.neighbour.node_name
        attributes[names.ATTR_NEIGHBOUR_POD] = target.neighbour.pod_name
    return tracer.start_span(
        span_name(target.check_type),
        kind=SpanKind.CLIENT,
        attributes=attributes,
        start_time=timeline.wall_start_ns,
    )


def finish_client_span(
    tracer: trace.Tracer,
    span: trace.Span,
    result: CheckResult,
    timeline: Timeline,
) -> None:
    if not span.is_recording():
        span.end()
        return
    if timeline.peer:
        span.set_attribute("network.peer.address", timeline.peer[0])
        span.set_attribute("network.peer.port", timeline.peer[1])
    if result.status_code is not None:
        span.set_attribute("http.response.status_code", result.status_code)
    span.set_attribute(names.ATTR_TIMING_SOURCE, timeline.source)
    if result.retransmits is not None:
        span.set_attribute(names.ATTR_TCP_RETRANSMITS, result.retransmits)
    if result.duration is not None:
        span.set_attribute(names.ATTR_NETWORK_DURATION, result.duration)
    context = trace.set_span_in_context(span)
    failed_at = result.error_event
    for name, start_event, end_event in PHASES:
        if start_event not in timeline.marks:
            continue
        # Each child starts when its phase began on the wire and lasts the network time the
        # metrics record for it, so a trace and a histogram never disagree.
        started = timeline.marks[start_event]
        child = tracer.start_span(name, context=context, start_time=timeline.wall_ns(started))
        if end_event in timeline.sources:
            child.set_attribute(names.ATTR_TIMING_SOURCE, timeline.sources[end_event])
        network = timeline.phase_ns(end_event)
        if network is not None:
            child.end(end_time=timeline.wall_ns(started + network))
        else:
            if failed_at == end_event or failed_at == names.ROUND_TRIP_ERROR:
                child.set_status(Status(StatusCode.ERROR, result.summary))
            child.end()
    if not result.ok:
        span.set_status(Status(StatusCode.ERROR, result.summary))
        span.set_attribute(
            "error.type", str(result.status_code) if result.status_code is not None else result.error_type or "error"
        )
        span.set_attribute(names.ATTR_ERROR_EVENT, result.error_event or names.ROUND_TRIP_ERROR)
    span.end()

