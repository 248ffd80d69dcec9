"""What a check is (`Target`), what a kind measured (`Outcome`) and what the rest of the probe
reads (`CheckResult`): data only. The words /alive and the logs show are made from it here,
in `summary` and `skip_reason`, and nothing decides anything by reading them back.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType

from probe import names
from probe.checkurls import HttpGet, Spec
from probe.neighbours import Neighbour

AttributeValue = str | int | float | bool

#: (child span name, start event, done event) of every phase, in the order they happen.
PHASES = (
    ("dns", names.DNS_START, names.DNS_DONE),
    ("connect", names.CONNECT_START, names.CONNECT_DONE),
    ("tls handshake", names.TLS_HANDSHAKE_START, names.TLS_HANDSHAKE_DONE),
    ("send request", names.GOT_CONN, names.WROTE_REQUEST),
    ("wait for first byte", names.WROTE_REQUEST, names.GOT_FIRST_RESP_BYTE),
)
_PHASE_NAMES = {done: name for name, _, done in PHASES}


@dataclass(frozen=True)
class Target:
    """One check to perform: `spec` says what (a GET, a DNS query, a TCP connect)."""

    check_type: str
    url: str
    spec: Spec = field(default_factory=HttpGet)
    neighbour: Neighbour | None = None

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def key(self) -> str:
        """What identifies this check: its type, and the pod for a neighbour (two probe pods
        can share a node, and so a `path_<node>` type, during a rolling update)."""
        key = self.check_type if self.neighbour is None else f"{self.check_type}/{self.neighbour.pod_name}"
        # A neighbour is checked over HTTP and over UDP under the same type.
        return f"{key} ({self.kind})" if self.kind == names.KIND_UDP else key


@dataclass(frozen=True)
class Phase:
    """One phase on the wire, from `start` to `done` (events), as perf_counter_ns moments;
    `end_ns` None when it never finished. `source`: who timed it (kernel.KERNEL or kernel.LOOP),
    None where the kind does not say."""

    start: str
    done: str
    start_ns: int
    end_ns: int | None
    source: str | None = None
    #: The child span's name, for a phase outside PHASES (a UDP train).
    label: str | None = None

    @property
    def name(self) -> str:
        return self.label or _PHASE_NAMES[self.done]


@dataclass(frozen=True)
class Failure:
    """Where a check failed (`event`), the failure's low-cardinality class (`error_type`, the
    span's `error.type`) and the reason in words."""

    event: str
    error_type: str
    reason: str


@dataclass(frozen=True)
class UdpLoss:
    """What a UDP train found: datagrams sent, not back within the timeout, each round trip."""

    sent: int
    lost: int
    rtts: tuple[float, ...] = ()
    #: This path's recent trains (the last WINDOW of probe.checks.udp): (train id, sent, came back).
    trains: tuple[tuple[int, int, int], ...] = ()
    #: The path MTU the full-size datagrams were sized to.
    mtu: int | None = None

    @property
    def window(self) -> tuple[int, int]:
        """(sent, lost) over the recent trains that got an answer: a train of which nothing
        came back is an outage (the check failed), not a share of loss, and must not make a
        path look lossy for ten trains after it is back."""
        answered = [t for t in self.trains if t[2] > 0]
        sent = sum(t[1] for t in answered)
        return sent, sent - sum(t[2] for t in answered)


@dataclass(frozen=True)
class Facts:
    """What a kind found besides its timings. A new figure of a kind gets a field here (and its
    instrument in probe/telemetry/metrics.py); `attributes` go onto the check's span."""

    #: TCP segments the kernel sent again during the check (SYNs included).
    retransmits: int | None = None
    #: A UDP check's train.
    udp: UdpLoss | None = None
    attributes: Mapping[str, AttributeValue] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What measuring one target gave: failed when `failure` is set, else ok."""

    #: The phases as they happened on the wire: the span's children.
    phases: tuple[Phase, ...] = ()
    #: Seconds of network time from the start of the check to each event that happened: the
    #: metrics' figures (phases laid end to end, without the probe's own waits).
    events: Mapping[str, float] = field(default_factory=dict)
    #: Seconds from request start to the answer; None without an answer.
    duration: float | None = None
    failure: Failure | None = None
    #: HTTP status of the answer, None when none arrived (or the kind has none).
    status_code: int | None = None
    #: The address connected to (the last attempt's).
    peer: tuple[str, int] | None = None
    #: Where the check's timings came from, where the kind says: kernel.KERNEL or kernel.LOOP.
    timing_source: str | None = None
    #: Earliest notAfter (Unix seconds) of the certificates the TLS peer presented.
    cert_not_after: float | None = None
    facts: Facts = field(default_factory=Facts)


_OUTCOME_FIELDS = tuple(f.name for f in fields(Outcome))


class Status(enum.Enum):
    OK = names.OK
    FAILED = "failed"
    SKIPPED = names.SKIPPED


class Why(enum.Enum):
    """Why a check is not performed, as a sentence about a variable."""

    DISABLED = "disabled by {}"
    NOT_SET = "{} not set"
    NOT_IN_CLUSTER = "{} not set (not in a cluster)"
    NOTHING_TO_RESOLVE = "{} is an IP: nothing to resolve"


@dataclass(frozen=True)
class Skip:
    why: Why
    #: The setting that decided it.
    variable: str

    @property
    def reason(self) -> str:
        return self.why.value.format(self.variable)


@dataclass(frozen=True, kw_only=True)
class CheckResult(Outcome):
    check_type: str
    target: Target | None = None
    skip: Skip | None = None
    #: Trace id (32 hex digits) of the check's span when it was sampled.
    trace_id: str | None = None
    #: How many pods share this check type (two probe pods on one node during a rolling update).
    pods_of_type: int = 1

    @classmethod
    def of(cls, target: Target, outcome: Outcome, *, trace_id: str | None = None) -> CheckResult:
        measured = {name: getattr(outcome, name) for name in _OUTCOME_FIELDS}
        return cls(check_type=target.check_type, target=target, trace_id=trace_id, **measured)

    @property
    def status(self) -> Status:
        if self.skip is not None:
            return Status.SKIPPED
        return Status.OK if self.failure is None else Status.FAILED

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @property
    def skipped(self) -> bool:
        return self.status is Status.SKIPPED

    @property
    def key(self) -> str:
        return self.target.key if self.target is not None else self.check_type

    @property
    def error_event(self) -> str | None:
        return self.failure.event if self.failure is not None else None

    @property
    def error_type(self) -> str | None:
        return self.failure.error_type if self.failure is not None else None

    @property
    def skip_reason(self) -> str | None:
        return self.skip.reason if self.skip is not None else None

    @property
    def summary(self) -> str:
        """What /alive and the logs say: "ok", "skipped" or "<event>: <reason>", naming the
        failing pod where several pods share the type."""
        if self.failure is None:
            return self.status.value
        text = f"{self.failure.event}: {self.failure.reason}"
        neighbour = self.target.neighbour if self.target is not None else None
        if self.pods_of_type > 1 and neighbour is not None:
            text += f" (pod {neighbour.pod_name}, 1 of {self.pods_of_type} on the node)"
        return text


class Kind:
    """Measures the checks of one kind: `measure` turns a target into an Outcome, raising
    nothing it can explain. The pipeline (pipeline.py) does the span, the failure of an
    unexpected exception and the recording around it."""

    async def start(self) -> None:
        """Before the first check."""

    async def close(self) -> None:
        """After the last check."""

    def attributes(self, target: Target) -> Mapping[str, AttributeValue]:
        """Span attributes known before measuring."""
        return {}

    async def measure(self, target: Target) -> Outcome:
        raise NotImplementedError

    async def measure_many(self, targets: Sequence[Target]) -> Sequence[Outcome | BaseException]:
        """Several targets started together, an Outcome each in their order; an exception
        stands for its target's Outcome (the pipeline makes it a failure). A kind whose
        checks are cheaper together (one wakeup for many) does them at once."""
        return list(await asyncio.gather(*(self.measure(target) for target in targets), return_exceptions=True))

    async def after_span(self, target: Target, result: CheckResult) -> CheckResult:
        """A step after the check's span ended, before the result is recorded: no part of the
        check's time."""
        return result
