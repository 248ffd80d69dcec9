"""One check, whatever its kind: the one place that opens its span, turns an unexpected
exception into a failure, ends the span with the phases (spans.py) and records the result.
A kind (kinds.py) only measures."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from opentelemetry import trace

from probe import names
from probe.checks import spans
from probe.checks.kinds import build_kinds
from probe.checks.result import CheckResult, Failure, Kind, Outcome, Target
from probe.settings import Settings


class Pipeline:
    """Performs checks of every kind; `record` is called with each result inside its span."""

    def __init__(
        self,
        settings: Settings,
        *,
        record: Callable[[CheckResult], None] = lambda _r: None,
        tracer: trace.Tracer | None = None,
        kinds: Mapping[type, Kind] | None = None,
    ) -> None:
        """`kinds` replaces the registered kind of a target type (tests)."""
        self._kinds = {**build_kinds(settings), **(kinds or {})}
        self._record = record
        self._tracer = tracer or trace.get_tracer(names.TRACER_NAME)
        self._untraced = isinstance(self._tracer, trace.NoOpTracer)

    async def start(self) -> None:
        for kind in self._kinds.values():
            await kind.start()

    async def close(self) -> None:
        for kind in self._kinds.values():
            await kind.close()

    async def check(self, target: Target) -> CheckResult:
        kind = self._kinds[type(target.spec)]
        if self._untraced:
            return await self._conclude(kind, target, await _measure(kind, target))
        clock = spans.Clock()
        span = spans.start(self._tracer, target, clock, kind.attributes(target))
        with trace.use_span(span, end_on_exit=False):  # the kind measures inside it (propagation)
            outcome = await _measure(kind, target)
        return await self._conclude(kind, target, outcome, span, clock)

    async def check_many(self, targets: Sequence[Target]) -> list[CheckResult]:
        """Checks of one kind started together (a slot's UDP trains), each with its own span,
        result and recording as check() gives it; the kind measures them at once, outside
        their spans' context (nothing of theirs propagates a trace)."""
        if not targets:
            return []
        kind = self._kinds[type(targets[0].spec)]
        assert all(type(t.spec) is type(targets[0].spec) for t in targets), "one kind at a time"
        if self._untraced:
            measured = await kind.measure_many(targets)
            return [await self._conclude(kind, t, _outcome(m)) for t, m in zip(targets, measured, strict=True)]
        clocks = [spans.Clock() for _ in targets]
        opened = [spans.start(self._tracer, t, c, kind.attributes(t)) for t, c in zip(targets, clocks, strict=True)]
        try:
            measured = await kind.measure_many(targets)
        except BaseException:
            for span in opened:
                span.end()
            raise
        return [
            await self._conclude(kind, target, _outcome(outcome), span, clock)
            for target, clock, span, outcome in zip(targets, clocks, opened, measured, strict=True)
        ]

    async def _conclude(
        self, kind: Kind, target: Target, outcome: Outcome, span: trace.Span | None = None,
        clock: spans.Clock | None = None,
    ) -> CheckResult:
        """The result of what was measured, its span ended with the phases, then recorded
        inside that span (histogram points carry its trace id). Without tracing (OTLP traces
        off) there is no span at all: one that records nothing still cost the check's
        attributes, a context switch and its phases."""
        if span is None or clock is None:
            result = await kind.after_span(target, CheckResult.of(target, outcome))
            self._record(result)
            return result
        with trace.use_span(span, end_on_exit=False):
            context = span.get_span_context()
            sampled = context.is_valid and context.trace_flags.sampled
            result = CheckResult.of(target, outcome, trace_id=format(context.trace_id, "032x") if sampled else None)
            spans.finish(self._tracer, span, clock, result)
            result = await kind.after_span(target, result)
            self._record(result)
        return result


async def _measure(kind: Kind, target: Target) -> Outcome:
    try:
        return await kind.measure(target)
    except Exception as e:  # never let one check take the round down
        return _outcome(e)


def _outcome(measured: Outcome | BaseException) -> Outcome:
    """An unexpected exception is the check's failure; cancellation goes on up."""
    if isinstance(measured, Outcome):
        return measured
    if not isinstance(measured, Exception):
        raise measured
    name = type(measured).__name__
    return Outcome(failure=Failure(names.ROUND_TRIP_ERROR, name, f"{name}: {measured}"))
