"""When checks run: each check on its own cadence, large rounds spread over the interval.

Every interval the plan is made afresh (settings + current neighbourhood), and each planned
check starts on a slot of the first SPREAD of the interval chosen by a hash of its type, about
SLOT_SIZE checks to a slot: a large round does not hit the event loop at once, and a path is
measured at the same phase of every interval. A check whose previous run is still in flight
(a black-holed target waiting out its timeout) skips this tick, like Go's time.Ticker drops
ticks, and never overlaps itself; every other check keeps its cadence. This differs from
kubenurse, where a round waits for its slowest check and one dead neighbour slows every path.

A "round" is one tick: it is complete once every check started at that tick has finished,
and `last_round` then holds the latest result of every planned check.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from probe import names
from probe.checks.result import CheckResult, Status, Target
from probe.checks.targets import Plan, plan_round
from probe.checks.wakeups import awake_at
from probe.neighbours import Neighbourhood, NeighbourSource
from probe.settings import Settings

log = logging.getLogger("probe.checks")

#: While a check keeps failing the same way, say so again this often, not every round.
REPEAT_LOG_SECONDS = 300.0
#: The share of the interval over which the checks' start offsets are spread.
SPREAD = 0.5
#: About this many check types start together (a neighbour's HTTP check and its UDP train
#: share a type, and start together): the starts fall on ceil(types / SLOT_SIZE) evenly
#: spaced slots of that share. Spreading costs CPU, each group waking the loop on its
#: own (measured at 15 checks: 0.70 s per 1,000 checks all at once, 1.06 s on 4 slots; every
#: check alone took 1.9 times the CPU of the same checks at once), and the figures no longer
#: need the checks apart (they are the kernel's), so a default round (14 checks) starts as
#: one, and a large neighbourhood is kept from hitting the loop, the probe's own server and
#: its targets all at once.
SLOT_SIZE = 16

#: In each slot the UDP trains go first and the other checks this long after: by then a
#: healthy path's echoes are back, so the echo answering a train is not at that moment busy
#: answering this probe's HTTP check (its lateness would be in every round trip; started
#: together, the mean round trip of eleven probes on two cores rose from 544 to 695 µs). The
#: trains' echoes are first read at that very moment (probe.checks.wakeups.awake_at), so the
#: lead costs one wakeup a slot, not two.
UDP_LEAD = 0.02


def trains_first(targets: Iterable[Target]) -> list[Target]:
    """The targets in the order their checks start within a slot: UDP trains first."""
    return sorted(targets, key=lambda target: target.kind != names.KIND_UDP)


def slots_for(checks: int) -> int:
    return max(1, -(-checks // SLOT_SIZE))


def start_offset(check_type: str, interval: float, slots: int) -> float:
    """Seconds into each interval at which `check_type` starts: the same every interval
    while the number of slots stays."""
    digest = hashlib.sha256(check_type.encode()).digest()
    slot = int.from_bytes(digest[:8], "big") % slots
    return slot / slots * SPREAD * interval


@dataclass(frozen=True)
class Round:
    results: Mapping[str, CheckResult]
    neighbourhood: Neighbourhood
    finished_at: float  # wall clock
    duration: float
    #: The neighbours' UDP paths, by type (they share their type with the HTTP check).
    udp: Mapping[str, CheckResult] = dataclasses.field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        """Every performed check ok (skipped ones do not count against it)."""
        return not any(r.status is Status.FAILED for r in (*self.results.values(), *self.udp.values()))


def is_udp_path(result: CheckResult) -> bool:
    target = result.target
    return target is not None and target.neighbour is not None and target.kind == names.KIND_UDP


def by_type(results: Iterable[CheckResult]) -> dict[str, CheckResult]:
    """One result per check type, as /alive shows them. Where two pods share a node (a
    rolling update), both are checked and the node's path is as bad as the worse of them:
    a failing pod is never hidden behind a healthy one (its text names the pod)."""
    grouped: dict[str, list[CheckResult]] = {}
    for result in results:
        grouped.setdefault(result.check_type, []).append(result)
    out: dict[str, CheckResult] = {}
    for check_type, group in grouped.items():
        if len(group) == 1:
            out[check_type] = group[0]
            continue
        group.sort(key=lambda r: r.key)
        failing = [r for r in group if r.status is Status.FAILED]
        out[check_type] = dataclasses.replace(failing[0] if failing else group[0], pods_of_type=len(group))
    return out


class FailureLog:
    """One log line per failing check when it starts failing or fails differently, then one
    reminder every REPEAT_LOG_SECONDS, and one line when it recovers."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failing: dict[str, tuple[str, float, int]] = {}  # type -> (event, last logged, count)

    def update(self, result: CheckResult) -> None:
        check_type = result.key
        previous = self._failing.get(check_type)
        if result.failure is None:
            if previous is not None:
                del self._failing[check_type]
                log.info("check recovered", extra={"check": check_type, "failures": previous[2]})
            return
        event = result.failure.event
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

    def forget(self, keys: set[str]) -> None:
        for key in keys:
            self._failing.pop(key, None)


class Prober:
    """Runs the checks planned from settings and the neighbour source, each on its cadence."""

    def __init__(
        self,
        settings: Settings,
        neighbours: NeighbourSource,
        check: Callable[[Target], Awaitable[CheckResult]],
        *,
        check_many: Callable[[Sequence[Target]], Awaitable[Sequence[CheckResult]]] | None = None,
        on_departed: Callable[[set[str]], None] = lambda _types: None,
    ) -> None:
        """`check_many`: the UDP trains of a slot, checked together (default: one by one)."""
        self._settings = settings
        self._neighbours = neighbours
        self._check = check
        self._check_many = check_many or self._one_by_one
        self._on_departed = on_departed
        self._failures = FailureLog()
        self._path_types: set[str] = set()
        #: Latest result and running task per check key (Target.key).
        self._latest: dict[str, CheckResult] = {}
        self._in_flight: dict[str, asyncio.Task[list[CheckResult]]] = {}
        self._plan: Plan | None = None
        self._neighbourhood: Neighbourhood | None = None
        self._watchers: set[asyncio.Task[None]] = set()
        self.last_round: Round | None = None
        self.rounds = 0
        #: Ticks a check skipped because its previous run was still in flight.
        self.skipped_ticks = 0

    async def run_round(self) -> Round:
        """Every planned check once, all at once; returns when all are done (tests, tools)."""
        started = time.monotonic()
        self._replan()
        assert self._plan is not None
        tasks = [self._start([target], None) for target in trains_first(self._plan.targets)]
        await asyncio.gather(*tasks)
        return self._complete(started)

    def _replan(self) -> None:
        self._neighbourhood = self._neighbours.current()
        self._plan = plan_round(self._settings, self._neighbourhood)
        planned_keys = {t.key for t in self._plan.targets} | {r.key for r in self._plan.skipped}
        gone = [key for key in (*self._latest, *self._in_flight) if key not in planned_keys]
        for key in gone:
            self._latest.pop(key, None)
            # A result arriving after its series were dropped would bring them back.
            task = self._in_flight.pop(key, None)
            if task is not None:
                task.cancel()
        self._failures.forget(set(gone))
        for result in self._plan.skipped:
            self._latest[result.key] = result
        path_types = {t.check_type for t in self._plan.targets if t.neighbour is not None}
        departed = self._path_types - path_types
        self._path_types = path_types
        if departed:
            self._on_departed(departed)

    def _start(
        self, targets: list[Target], gate: asyncio.Event | None, *, together: bool = False,
        awake: float | None = None,
    ) -> asyncio.Task[list[CheckResult]]:
        """One task for one check, or for a slot's trains `together` (a task each cost more
        than a train's Python). A neighbour departing while they are out cancels them all:
        that round, its slot-mates keep their previous result."""
        name = f"trains of {len(targets)}" if together else f"check {targets[0].key}"
        task = asyncio.create_task(self._perform(targets, gate, together, awake), name=name)
        for target in targets:
            self._in_flight[target.key] = task
        return task

    async def _perform(
        self, targets: list[Target], gate: asyncio.Event | None, together: bool, awake: float | None
    ) -> list[CheckResult]:
        """The checks, started once `gate` is set (None: now); `awake`: a loop time at which
        the loop wakes anyway (the slot's other checks start), for the trains' first look."""
        try:
            if gate is not None:
                await gate.wait()
            if awake is not None:
                awake_at.set(awake)  # this task's own context
            results = list(await self._check_many(targets)) if together else [await self._check(targets[0])]
            for result in results:
                self._latest[result.key] = result
                self._failures.update(result)
            return results
        finally:
            task = asyncio.current_task()
            for target in targets:
                if self._in_flight.get(target.key) is task:
                    del self._in_flight[target.key]

    async def _one_by_one(self, targets: Sequence[Target]) -> list[CheckResult]:
        return list(await asyncio.gather(*(self._check(target) for target in targets)))

    def _complete(self, started: float) -> Round:
        assert self._neighbourhood is not None
        self.rounds += 1
        latest = list(self._latest.values())
        self.last_round = Round(
            by_type(r for r in latest if not is_udp_path(r)), self._neighbourhood, time.time(),
            time.monotonic() - started, udp=by_type(r for r in latest if is_udp_path(r)),
        )
        return self.last_round

    def _tick(self) -> None:
        """Plan, and start every check that is not still running, each at its offset."""
        started = time.monotonic()
        self._replan()
        assert self._plan is not None
        interval = self._settings.check_interval
        # The slots count check types: a path's HTTP check and its UDP train share a slot.
        slots = slots_for(len({target.check_type for target in self._plan.targets}))
        lead = UDP_LEAD if any(target.kind == names.KIND_UDP for target in self._plan.targets) else 0.0
        # The checks starting at one moment wait for the same event, so each moment is one
        # wakeup (each wakeup of an idle probe costs more CPU than the Python it runs).
        loop = asyncio.get_running_loop()
        now = loop.time()
        gates: dict[float, asyncio.Event] = {}

        def gate_at(at: float) -> asyncio.Event | None:
            gate = gates.get(at)
            if gate is None and at > now:
                gate = gates[at] = asyncio.Event()
                loop.call_at(at, gate.set)
            return gate

        trains: dict[float, list[Target]] = {}
        others: list[tuple[Target, float]] = []
        for target in self._plan.targets:
            if target.key in self._in_flight:
                self.skipped_ticks += 1
                continue
            slot_at = now + start_offset(target.check_type, interval, slots)
            if target.kind == names.KIND_UDP:
                trains.setdefault(slot_at, []).append(target)
            else:
                others.append((target, slot_at + lead))
        # The trains first (a slot's trains are one task); their first look is when the slot's
        # other checks start, in the same wakeup.
        tasks = [
            self._start(group, gate_at(slot_at), together=True, awake=slot_at + lead if lead else None)
            for slot_at, group in trains.items()
        ]
        tasks += [self._start([target], gate_at(at)) for target, at in others]
        watcher = asyncio.create_task(self._watch(tasks, started), name="round")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _watch(self, tasks: list[asyncio.Task[list[CheckResult]]], started: float) -> None:
        if tasks:
            await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                log.error("check failed unexpectedly", exc_info=task.exception())
        self._complete(started)

    async def run(self) -> None:
        """Run the checks until cancelled."""
        interval = self._settings.check_interval
        next_tick = time.monotonic()
        try:
            while True:
                try:
                    self._tick()
                except Exception:  # a bug in one tick must not stop the probe
                    log.exception("round failed")
                next_tick += interval
                now = time.monotonic()
                if next_tick < now:  # the loop itself overran: drop the missed ticks
                    next_tick += interval * ((now - next_tick) // interval + 1)
                await asyncio.sleep(next_tick - now)
        finally:
            for task in [*self._in_flight.values(), *self._watchers]:
                task.cancel()
            await asyncio.gather(*self._in_flight.values(), *self._watchers, return_exceptions=True)
