"""One check, whatever its kind: the one place that opens its span, turns an unexpected
exception into a failure, ends the span with the phases (spans.py) and records the result.
A kind (kinds.py) only measures."""

from __future__ import annotations

from collections.abc import Callable, Mapping

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
            return await self._check_untraced(kind, target)
        clock = spans.Clock()
        span = spans.start(self._tracer, target, clock, kind.attributes(target))
        with trace.use_span(span, end_on_exit=False):
            outcome = await _measure(kind, target)
            context = span.get_span_context()
            sampled = context.is_valid and context.trace_flags.sampled
            result = CheckResult.of(target, outcome, trace_id=format(context.trace_id, "032x") if sampled else None)
            spans.finish(self._tracer, span, clock, result)
            result = await kind.after_span(target, result)
            self._record(result)
        return result

    async def _check_untraced(self, kind: Kind, target: Target) -> CheckResult:
        """The same without a span: no traces are exported (OTLP traces off), and a span that
        records nothing still cost the check's attributes, a context switch and its phases."""
        result = CheckResult.of(target, await _measure(kind, target))
        result = await kind.after_span(target, result)
        self._record(result)
        return result


async def _measure(kind: Kind, target: Target) -> Outcome:
    try:
        return await kind.measure(target)
    except Exception as e:  # never let one check take the round down
        name = type(e).__name__
        return Outcome(failure=Failure(names.ROUND_TRIP_ERROR, name, f"{name}: {e}"))
