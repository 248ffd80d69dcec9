"""What one check produced."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from probe import names
from probe.neighbours import Neighbour


@dataclass(frozen=True)
class Target:
    """One GET to perform. `send_token` only for the API-server checks."""

    check_type: str
    url: str
    send_token: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)
    neighbour: Neighbour | None = None


@dataclass(frozen=True)
class CheckResult:
    check_type: str
    #: "ok", "skipped" or the error text, as /alive shows it.
    summary: str
    target: Target | None = None
    #: HTTP status of the answer, None when none arrived.
    status_code: int | None = None
    #: Where it failed: a phase event, status_code_NNN or round_trip_error; None when ok.
    error_event: str | None = None
    #: Seconds from request start to the response headers; None without an answer.
    duration: float | None = None
    #: Seconds from request start to each phase event that happened.
    events: Mapping[str, float] = field(default_factory=dict)
    #: Why a skipped check was skipped.
    skip_reason: str | None = None
    trace_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.summary == names.OK

    @property
    def skipped(self) -> bool:
        return self.summary == names.SKIPPED

    @classmethod
    def skip(cls, check_type: str, reason: str) -> CheckResult:
        return cls(check_type, names.SKIPPED, skip_reason=reason)
