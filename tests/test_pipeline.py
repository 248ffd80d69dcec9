"""The check pipeline with a kind of the test's own, registered the way a new kind would be:
what one check leaves behind (its span and children, its series, its /alive text) comes
from the pipeline, whatever the kind measured or however it broke."""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

from opentelemetry.trace import StatusCode

from probe import names
from probe.checks import kernel
from probe.checks.pipeline import Pipeline
from probe.checks.result import CheckResult, Facts, Failure, Kind, Outcome, Phase, Status, Target
from probe.checks.rounds import by_type
from probe.neighbours import Neighbour
from probe.settings import Settings
from tests.kind_helpers import Spans, new_metrics, series


@dataclass(frozen=True)
class Echo:
    """The test kind's target: what its measure should return, or raise."""

    kind = "echo"
    outcome: Outcome | None = None
    error: Exception | None = None


class EchoKind(Kind):
    async def measure(self, target: Target) -> Outcome:
        assert isinstance(target.spec, Echo)
        if target.spec.error is not None:
            raise target.spec.error
        assert target.spec.outcome is not None
        return target.spec.outcome


async def check(spec: Echo) -> tuple[CheckResult, list[CheckResult], dict[str, float], Spans]:
    metrics, spans, recorded = new_metrics(), Spans(), []

    def record(result: CheckResult) -> None:
        recorded.append(result)
        metrics.record(result)

    pipeline = Pipeline(Settings(), record=record, tracer=spans.tracer, kinds={Echo: EchoKind()})
    result = await pipeline.check(Target("echo", "echo://here", spec))
    return result, recorded, series(metrics, "echo"), spans


async def test_an_exception_in_a_kind_is_one_round_trip_error() -> None:
    result, recorded, seen, spans = await check(Echo(error=RuntimeError("boom")))
    assert result.status is Status.FAILED
    assert result.failure == Failure(names.ROUND_TRIP_ERROR, "RuntimeError", "RuntimeError: boom")
    assert result.summary == "round_trip_error: RuntimeError: boom"
    assert recorded == [result]
    assert seen == {
        'kubenurse_httpclient_requests_total{code="round_trip_error",type="echo"}': 1.0,
        'kubenurse_errors_total{event="round_trip_error",type="echo"}': 1.0,
    }
    (span,) = spans.named("check echo")
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["error.type"] == "RuntimeError"
    assert span.attributes[names.ATTR_ERROR_EVENT] == names.ROUND_TRIP_ERROR


async def test_phases_become_children_and_a_phase_timed_elsewhere_says_so() -> None:
    now = time.perf_counter_ns()
    ms = 1_000_000
    outcome = Outcome(
        phases=(
            Phase(names.DNS_START, names.DNS_DONE, now, now + 2 * ms, kernel.KERNEL),
            # A connect whose SYN was sent again: the loop timed it, not the kernel.
            Phase(names.CONNECT_START, names.CONNECT_DONE, now + 2 * ms, now + 5 * ms, kernel.LOOP),
        ),
        events={names.DNS_START: 0.0, names.DNS_DONE: 0.002, names.CONNECT_START: 0.002, names.CONNECT_DONE: 0.005},
        duration=0.005,
        peer=("127.0.0.1", 7),
        timing_source=kernel.KERNEL,
        facts=Facts(attributes={"echo.answer": 42}),
    )
    result, _, seen, spans = await check(Echo(outcome=outcome))
    assert result.ok and result.summary == "ok" and result.events == outcome.events
    assert seen['kubenurse_httpclient_requests_total{code="ok",type="echo"}'] == 1.0
    (span,) = spans.named("check echo")
    assert span.attributes is not None
    assert span.attributes[names.ATTR_TIMING_SOURCE] == kernel.KERNEL
    assert span.attributes["echo.answer"] == 42
    assert span.attributes["network.peer.port"] == 7
    children = spans.children(span)
    assert set(children) == {"dns", "connect"}
    assert children["connect"].attributes == {names.ATTR_TIMING_SOURCE: kernel.LOOP}
    assert not children["dns"].attributes, "the same source as the check's: nothing to say"
    connect = children["connect"]
    assert connect.end_time is not None and connect.start_time is not None
    assert connect.end_time - connect.start_time == 3 * ms


async def test_an_unfinished_phase_carries_the_failure() -> None:
    now = time.perf_counter_ns()
    failure = Failure(names.CONNECT_DONE, "timeout", "no answer from 10.0.0.1:7 within 5s")
    phases = (Phase(names.CONNECT_START, names.CONNECT_DONE, now, None),)
    result, _, _, spans = await check(Echo(outcome=Outcome(phases=phases, failure=failure)))
    assert result.summary == "connect_done: no answer from 10.0.0.1:7 within 5s"
    (span,) = spans.named("check echo")
    child = spans.children(span)["connect"]
    assert child.status.status_code == StatusCode.ERROR
    assert child.status.description == result.summary


def test_a_result_carries_every_field_of_its_outcome() -> None:
    """A field a kind adds to Outcome reaches the result (and so telemetry) untouched."""
    outcome = Outcome(
        phases=(Phase(names.DNS_START, names.DNS_DONE, 1, 2, kernel.LOOP),), events={names.DNS_START: 0.0},
        duration=1.0, failure=Failure("e", "t", "r"), status_code=503, peer=("::1", 1), timing_source=kernel.LOOP,
        cert_not_after=2.0, facts=Facts(retransmits=3, attributes={"a": 1}),
    )
    result = CheckResult.of(Target("x", "echo://"), outcome)
    assert {f.name: getattr(result, f.name) for f in fields(Outcome)} == {
        f.name: getattr(outcome, f.name) for f in fields(Outcome)
    }


def test_the_node_of_two_pods_is_as_bad_as_the_worse_and_names_it() -> None:
    def path(pod: str, failure: Failure | None) -> CheckResult:
        target = Target("path_n", "http://x/", neighbour=Neighbour(pod, "10.0.0.1", "", "n"))
        return CheckResult.of(target, Outcome(failure=failure))

    refused = Failure(names.CONNECT_DONE, "ClientConnectorError", "connection refused by 10.0.0.1:8080")
    (shown,) = by_type([path("pod-new", None), path("pod-old", refused)]).values()
    assert shown.status is Status.FAILED
    assert shown.summary == "connect_done: connection refused by 10.0.0.1:8080 (pod pod-old, 1 of 2 on the node)"
    (alone,) = by_type([path("pod-old", refused)]).values()
    assert alone.summary == "connect_done: connection refused by 10.0.0.1:8080"


async def check_untraced(spec: Echo) -> tuple[CheckResult, list[CheckResult], dict[str, float]]:
    """check(), with the no-op tracer the probe uses when OTLP traces are off."""
    from opentelemetry.trace import NoOpTracer

    metrics, recorded = new_metrics(), []

    def record(result: CheckResult) -> None:
        recorded.append(result)
        metrics.record(result)

    pipeline = Pipeline(Settings(), record=record, tracer=NoOpTracer(), kinds={Echo: EchoKind()})
    result = await pipeline.check(Target("echo", "echo://here", spec))
    return result, recorded, series(metrics, "echo")


async def test_without_tracing_a_check_leaves_the_same_result_and_series() -> None:
    """With OTLP traces off the pipeline opens no span at all: the result, what is recorded
    and what /alive shows are those of a traced check (less its trace id)."""
    outcome = Outcome(
        phases=(Phase(names.CONNECT_START, names.CONNECT_DONE, 0, 2_000_000),),
        events={names.CONNECT_DONE: 0.002, names.GOT_FIRST_RESP_BYTE: 0.004},
        duration=0.004, status_code=200, facts=Facts(retransmits=1),
    )
    for spec in (Echo(outcome=outcome), Echo(error=RuntimeError("boom"))):
        traced, _, traced_series, spans = await check(spec)
        untraced, recorded, untraced_series = await check_untraced(spec)
        assert spans.named("check echo") and untraced.trace_id is None
        assert untraced == CheckResult.of(untraced.target, traced) and recorded == [untraced]  # type: ignore[arg-type]
        assert untraced_series == traced_series
