"""One checker per check kind, and the dispatch by `Target.kind` the scheduler calls."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from opentelemetry import trace

from probe import names
from probe.checks.dns import DnsChecker
from probe.checks.http import HttpChecker
from probe.checks.result import CheckResult, Target
from probe.checks.tcp import TcpChecker
from probe.checks.udp import UdpChecker
from probe.settings import Settings


class Checker(Protocol):
    """Performs checks of one kind; records each result inside the check's span."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def check(self, target: Target) -> CheckResult: ...


class Checkers:
    """Sends each target to the checker of its kind."""

    def __init__(self, by_kind: Mapping[str, Checker]) -> None:
        self._by_kind = dict(by_kind)

    def for_kind(self, kind: str) -> Checker:
        return self._by_kind[kind]

    async def start(self) -> None:
        for checker in self._by_kind.values():
            await checker.start()

    async def close(self) -> None:
        for checker in self._by_kind.values():
            await checker.close()

    async def check(self, target: Target) -> CheckResult:
        return await self._by_kind[target.kind].check(target)


def build_checkers(
    settings: Settings,
    *,
    record: Callable[[CheckResult], None] = lambda _r: None,
    tracer: trace.Tracer | None = None,
) -> Checkers:
    return Checkers(
        {
            names.KIND_HTTP: HttpChecker(settings, record=record, tracer=tracer),
            names.KIND_DNS: DnsChecker(settings, record=record, tracer=tracer),
            names.KIND_TCP: TcpChecker(settings, record=record, tracer=tracer),
            names.KIND_UDP: UdpChecker(settings, record=record, tracer=tracer),
        }
    )
