"""Rounds: every interval, all checks at once; a round lasts as long as its slowest check.

Rounds never overlap: when one overruns the interval, the ticks it covered are dropped
(like Go's time.Ticker in kubenurse) instead of queueing up behind a hanging target.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from probe import names
from probe.checks.result import CheckResult, Target
from probe.checks.targets import plan_round
from probe.neighbours import Neighbourhood, NeighbourSource
from probe.settings import Settings

log = logging.getLogger("probe.checks")

#: While a check keeps failing the same way, say so again this often, not every round.
REPEAT_LOG_SECONDS = 300.0


@dataclass(frozen=True)
class Round:
    results: Mapping[str, CheckResult]
    neighbourhood: Neighbourhood
    finished_at: float  # wall clock
    duration: float

    @property
    def healthy(self) -> bool:
        """Every performed check ok (skipped ones do not count against it)."""
        return all(r.ok for r in self.results.values() if not r.skipped)


class FailureLog:
    """One log line per failing check when it starts failing or fails differently, then one
    reminder every REPEAT_LOG_SECONDS, and one line when it recovers."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failing: dict[str, tuple[str, float, int]] = {}  # type -> (event, last logged, count)

    def update(self, result: CheckResult) -> None:
        check_type = result.check_type
        previous = self._failing.get(check_type)
        if result.ok or result.skipped:
            if previous is not None:
                del self._failing[check_type]
                log.info("check recovered", extra={"check": check_type, "failures": previous[2]})
            return
        event = result.error_event or names.ROUND_TRIP_ERROR
        now = self._clock()
        if previous is None or previous[0] != event or now - previous[1] >= REPEAT_LOG_SECONDS:
            count = 1 if previous is None or previous[0] != event else previous[2] + 1
            log.warning(
                "check failed",
                extra={"check": check_type, "event": event, "error": result.summary, "failures": count},
            )
            self._failing[check_type] = (event, now, count)
        else:
            self._failing[check_type] = (event, previous[1], previous[2] + 1)

    def forget(self, check_types: set[str]) -> None:
        for check_type in check_types:
            self._failing.pop(check_type, None)


class Prober:
    """Runs rounds against the targets planned from settings and the neighbour source."""

    def __init__(
        self,
        settings: Settings,
        neighbours: NeighbourSource,
        check: Callable[[Target], Awaitable[CheckResult]],
        *,
        on_departed: Callable[[set[str]], None] = lambda _types: None,
    ) -> None:
        self._settings = settings
        self._neighbours = neighbours
        self._check = check
        self._on_departed = on_departed
        self._failures = FailureLog()
        self._path_types: set[str] = set()
        self.last_round: Round | None = None
        self.rounds = 0

    async def run_round(self) -> Round:
        started = time.monotonic()
        neighbourhood = self._neighbours.current()
        plan = plan_round(self._settings, neighbourhood)
        performed = await asyncio.gather(*(self._check(t) for t in plan.targets))
        results = {r.check_type: r for r in plan.skipped}
        results.update((r.check_type, r) for r in performed)
        for result in performed:
            self._failures.update(result)
        self._retire_departed(results)
        self.rounds += 1
        self.last_round = Round(results, neighbourhood, time.time(), time.monotonic() - started)
        return self.last_round

    def _retire_departed(self, results: Mapping[str, CheckResult]) -> None:
        path_types = {t for t in results if t.startswith(names.PATH_PREFIX)}
        departed = self._path_types - path_types
        self._path_types = path_types
        if departed:
            self._failures.forget(departed)
            self._on_departed(departed)

    async def run(self) -> None:
        """Run rounds until cancelled."""
        interval = self._settings.check_interval
        next_tick = time.monotonic()
        while True:
            try:
                await self.run_round()
            except Exception:  # a bug in one round must not stop the probe
                log.exception("round failed")
            next_tick += interval
            now = time.monotonic()
            if next_tick < now:  # overran: drop the missed ticks
                next_tick += interval * ((now - next_tick) // interval + 1)
            await asyncio.sleep(next_tick - now)
