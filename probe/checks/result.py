"""What one check produced."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from probe import names
from probe.neighbours import Neighbour


@dataclass(frozen=True)
class Target:
    """One check to perform: a GET for `kind` http, else a DNS query or a TCP connect
    (the URL says what). `send_token` only for the API-server checks."""

    check_type: str
    url: str
    send_token: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)
    neighbour: Neighbour | None = None
    kind: str = names.KIND_HTTP

    @property
    def key(self) -> str:
        """What identifies this check: its type, and the pod for a neighbour (two probe pods
        can share a node, and so a `path_<node>` type, during a rolling update)."""
        key = self.check_type if self.neighbour is None else f"{self.check_type}/{self.neighbour.pod_name}"
        # A neighbour is checked over HTTP and over UDP under the same type.
        return f"{key} ({self.kind})" if self.kind == names.KIND_UDP else key


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
    #: Where the timings came from: "kernel" (receive timestamps, TCP_INFO) or "loop".
    timing_source: str | None = None
    #: Trace id (32 hex digits) of the check's span when it was sampled.
    trace_id: str | None = None
    #: Earliest notAfter (Unix seconds) of the certificates the TLS peer presented.
    cert_not_after: float | None = None
    #: Low-cardinality class of the failure (span `error.type`), e.g. "NXDOMAIN", "timeout".
    error_type: str | None = None
    #: TCP segments the kernel resent on the check's connections (SYNs included); None
    #: where the check had no TCP connection or the kernel does not say.
    retransmits: int | None = None
    #: UDP checks: datagrams sent and not back within the timeout, and each round trip (s).
    udp_sent: int | None = None
    udp_lost: int | None = None
    udp_rtts: tuple[float, ...] = ()

    @property
    def key(self) -> str:
        return self.target.key if self.target is not None else self.check_type

    @property
    def ok(self) -> bool:
        return self.summary == names.OK

    @property
    def skipped(self) -> bool:
        return self.summary == names.SKIPPED

    @classmethod
    def skip(cls, check_type: str, reason: str) -> CheckResult:
        return cls(check_type, names.SKIPPED, skip_reason=reason)
