"""One probe's report (`/mesh/report`): typed values, written and read by the same code.

A report comes from another pod, so reading one is reading untrusted input: `parse` accepts
only known fields of known types, finite numbers in range, names and events of a bounded
alphabet and length, and turns everything else into `BadReport`. Nothing in a report is
used as an address, a path or free text: names are matched against what discovery lists,
and the words shown for a probe that did not answer are this module's own (`Unreached`).
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from probe import names
from probe.checks.result import CheckResult
from probe.checks.rounds import Round

#: Node and pod names: Kubernetes names (DNS subdomains), with upper case allowed for
#: stand-ins; no spaces, no control characters.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
#: Check types: `path_<node>`, the built-in types and KUBENURSE_EXTRA_CHECKS names.
CHECK_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,299}")
#: Error events: lower-case identifiers (`connect_done`, `status_code_503`, `mtu`, ...).
EVENT = re.compile(r"[a-z][a-z0-9_]{0,39}")
TRACE_ID = re.compile(r"[0-9a-f]{32}")
#: A check takes at most a few seconds; anything beyond an hour is not a latency.
MAX_LATENCY_SECONDS = 3600.0
MAX_AGE_SECONDS = 10.0 * 365 * 86400
#: A probe checks at most this many paths and other checks in a round (KUBENURSE_NEIGHBOUR_LIMIT=0
#: on a 5,000-node cluster, plus extra checks).
MAX_RESULTS = 6000
#: Fields of one object in a report (this version writes at most 7).
MAX_FIELDS = 32
#: UDP paths a probe reports (one per neighbour), the trains of each, and the echo's arrivals.
MAX_UDP_PATHS = MAX_RESULTS
#: The last trains of a path a report carries (for which way datagrams were lost); the path's
#: sent and lost cover its whole window (probe.checks.udp.WINDOW).
MAX_TRAINS = 10
MAX_ARRIVALS = 4096
TRAIN_ID = re.compile(r"[0-9a-f]{16}")
#: A train is four datagrams; anything beyond this is not a count of ours.
MAX_DATAGRAMS = 1_000_000
#: The encoded report of a probe with MAX_RESULTS results stays below this.
MAX_REPORT_BYTES = 2 * 1024 * 1024


class NotReady(enum.StrEnum):
    """Why a probe says it is not ready (its /ready answers 503)."""

    SHUTTING_DOWN = "shutting_down"
    NODE_UNSCHEDULABLE = "node_unschedulable"

    @property
    def words(self) -> str:
        return {
            NotReady.SHUTTING_DOWN: "shutting down",
            NotReady.NODE_UNSCHEDULABLE: "node cordoned, unschedulable or gone",
        }[self]


class Unreached(enum.StrEnum):
    """Why a listed probe's report is not in the view: the only text shown for it."""

    TIMEOUT = "timeout"
    REFUSED = "refused"
    CONNECTION = "connection"
    STATUS = "status"
    TOO_LARGE = "too_large"
    ENCODED = "encoded"
    INVALID = "invalid"
    IMPOSTOR = "impostor"
    NO_ADDRESS = "no_address"
    NOT_ASKED = "not_asked"

    @property
    def words(self) -> str:
        return _UNREACHED_WORDS[self]


_UNREACHED_WORDS = {
    Unreached.TIMEOUT: "no answer in time",
    Unreached.REFUSED: "connection refused (no probe listening)",
    Unreached.CONNECTION: "connection failed",
    Unreached.STATUS: "answered with an error status",
    Unreached.TOO_LARGE: "report too large",
    Unreached.ENCODED: "report in an encoding the probe does not accept",
    Unreached.INVALID: "report not understood",
    Unreached.IMPOSTOR: "answered as another node or pod",
    Unreached.NO_ADDRESS: "its pod has no usable IP address",
    Unreached.NOT_ASKED: "not asked (more probes than the view's cap)",
}


class BadReport(ValueError):
    """The body is not a report; the reason is for logs and tests, never shown to users."""


@dataclass(frozen=True, slots=True)
class ReportResult:
    type: str
    ok: bool
    latency: float | None = None
    error_event: str | None = None
    trace_id: str | None = None
    #: For a path: the node checked.
    to: str | None = None


@dataclass(frozen=True, slots=True)
class UdpPathReport:
    """One neighbour's UDP path as its sender saw it over its recent trains."""

    to: str
    sent: int
    lost: int
    #: The last train lost every full-size datagram while small ones came back.
    mtu_failed: bool = False
    mtu: int | None = None
    #: (train id as 16 hex digits, sent, came back) of each recent train.
    trains: tuple[tuple[str, int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Report:
    node: str
    pod: str
    ready: bool = True
    not_ready: NotReady | None = None
    round_age: float | None = None
    results: tuple[ReportResult, ...] = ()
    udp: tuple[UdpPathReport, ...] = ()
    #: What this probe's UDP echo received of recent trains: (train id, datagrams).
    echo: tuple[tuple[str, int], ...] = ()

    def encode(self) -> bytes:
        return json.dumps(
            {
                "node": self.node,
                "pod": self.pod,
                "ready": self.ready,
                "not_ready": None if self.not_ready is None else self.not_ready.value,
                "round_age_seconds": self.round_age,
                "results": [_encode_result(r) for r in self.results],
                "udp": [
                    {"to": u.to, "sent": u.sent, "lost": u.lost, "mtu_failed": u.mtu_failed, "mtu": u.mtu,
                     "trains": [list(t) for t in u.trains]}
                    for u in self.udp
                ],
                "echo": [list(e) for e in self.echo],
            },
            separators=(",", ":"),
            allow_nan=False,
        ).encode()


def _encode_result(r: ReportResult) -> dict[str, object]:
    entry: dict[str, object] = {
        "type": r.type, "ok": r.ok, "latency_seconds": r.latency, "error_event": r.error_event, "trace_id": r.trace_id,
    }
    if r.to is not None:
        entry["to"] = r.to
    return entry


def _from_result(result: CheckResult) -> ReportResult:
    target = result.target
    to = target.neighbour.node_name if target is not None and target.neighbour is not None else None
    return ReportResult(
        type=result.check_type,
        ok=result.ok,
        latency=None if result.duration is None else round(result.duration, 6),
        error_event=None if result.ok else (result.error_event or names.ROUND_TRIP_ERROR),
        trace_id=result.trace_id,
        to=to,
    )


def _udp_path(result: CheckResult) -> UdpPathReport | None:
    udp, target = result.facts.udp, result.target
    if udp is None or target is None or target.neighbour is None:
        return None
    sent, lost = udp.window
    trains = tuple((f"{train_id:016x}", s, b) for train_id, s, b in udp.trains[-MAX_TRAINS:])
    return UdpPathReport(target.neighbour.node_name, sent, lost, result.error_event == names.MTU, udp.mtu, trains)


def own_report(
    last: Round | None, *, node: str, pod: str, not_ready: NotReady | None = None, now: float,
    arrivals: Mapping[int, int] | None = None,
) -> Report:
    """This probe's report: who it is, whether it is ready, how its last round went, and
    what its UDP echo received. Skipped checks are left out: they are no evidence."""
    echo = tuple((f"{train_id:016x}", n) for train_id, n in list((arrivals or {}).items())[:MAX_ARRIVALS])
    if last is None:
        return Report(node, pod, not_ready is None, not_ready, echo=echo)
    udp = (_udp_path(r) for _, r in sorted(last.udp.items()))
    return Report(
        node, pod, not_ready is None, not_ready,
        round_age=round(max(0.0, now - last.finished_at), 3),
        results=tuple(_from_result(r) for _, r in sorted(last.results.items()) if not r.skipped),
        udp=tuple(u for u in udp if u is not None),
        echo=echo,
    )


# --- reading a peer's report -----------------------------------------------------------------


def _reject_constant(name: str) -> None:
    raise BadReport(f"{name} is not a number JSON allows")


def parse(body: bytes) -> Report:
    """A peer's report, or BadReport. Only the fields below are read, and each must be of its
    form: a report is written by the same code (`Report.encode`) that reads it."""
    if len(body) > MAX_REPORT_BYTES:
        raise BadReport("too large")
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise BadReport(f"not JSON ({type(e).__name__})") from None
    fields = _object(value, "report")
    results = fields.get("results", [])
    if not isinstance(results, list) or len(results) > MAX_RESULTS:
        raise BadReport("results: not a list of at most MAX_RESULTS")
    not_ready = fields.get("not_ready")
    if not_ready is not None and not_ready not in NotReady.__members__.values():
        raise BadReport("not_ready: unknown reason")
    return Report(
        node=_name(fields.get("node"), "node"),
        pod=_name(fields.get("pod"), "pod"),
        ready=_bool(fields.get("ready", True), "ready"),
        not_ready=None if not_ready is None else NotReady(not_ready),
        round_age=_number(fields.get("round_age_seconds"), MAX_AGE_SECONDS, "round_age_seconds"),
        results=tuple(_result(r) for r in results),
        udp=tuple(_udp(u) for u in _list(fields.get("udp", []), MAX_UDP_PATHS, "udp")),
        echo=tuple(_arrival(e) for e in _list(fields.get("echo", []), MAX_ARRIVALS, "echo")),
    )


def _list(value: object, most: int, what: str) -> list[Any]:
    if not isinstance(value, list) or len(value) > most:
        raise BadReport(f"{what}: not a list of at most {most}")
    return value


def _count(value: object, most: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
        raise BadReport(f"{what}: not a count")
    return value


def _udp(value: object) -> UdpPathReport:
    fields = _object(value, "udp path")
    sent = _count(fields.get("sent"), MAX_DATAGRAMS, "sent")
    mtu = fields.get("mtu")
    trains = []
    for train in _list(fields.get("trains", []), MAX_TRAINS, "trains"):
        if not isinstance(train, list) or len(train) != 3:
            raise BadReport("train: not [id, sent, back]")
        train_id = _optional(train[0], TRAIN_ID, "train id")
        trains.append((train_id or "", _count(train[1], 1000, "train sent"), _count(train[2], 1000, "train back")))
    return UdpPathReport(
        to=_name(fields.get("to"), "to"),
        sent=sent,
        lost=min(_count(fields.get("lost"), MAX_DATAGRAMS, "lost"), sent),
        mtu_failed=_bool(fields.get("mtu_failed", False), "mtu_failed"),
        mtu=None if mtu is None else _count(mtu, 65535, "mtu"),
        trains=tuple(t for t in trains if t[0]),
    )


def _arrival(value: object) -> tuple[str, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise BadReport("echo: not [id, datagrams]")
    return _optional(value[0], TRAIN_ID, "train id") or "", _count(value[1], 1000, "datagrams")


def _object(value: object, what: str) -> Mapping[str, Any]:
    """An object of at most MAX_FIELDS fields. Fields this version does not know are left
    unread (a newer probe may add some during a rolling upgrade); known ones must be right."""
    if not isinstance(value, dict):
        raise BadReport(f"{what}: not an object")
    if len(value) > MAX_FIELDS:
        raise BadReport(f"{what}: too many fields")
    return value


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise BadReport(f"{what}: not a name")
    return value


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise BadReport(f"{what}: not a boolean")
    return value


def _number(value: object, most: float, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadReport(f"{what}: not a number")
    number = float(value)
    if not math.isfinite(number) or not 0 <= number <= most:
        raise BadReport(f"{what}: out of range")
    return number


def _optional(value: object, pattern: re.Pattern[str], what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise BadReport(f"{what}: not of the expected form")
    return value


def _result(value: object) -> ReportResult:
    fields = _object(value, "result")
    check_type = fields.get("type")
    if not isinstance(check_type, str) or not CHECK_TYPE.fullmatch(check_type):
        raise BadReport("result type: not a check type")
    to = fields.get("to")
    return ReportResult(
        type=check_type,
        ok=_bool(fields.get("ok"), "ok"),
        latency=_number(fields.get("latency_seconds"), MAX_LATENCY_SECONDS, "latency_seconds"),
        error_event=_optional(fields.get("error_event"), EVENT, "error_event"),
        trace_id=_optional(fields.get("trace_id"), TRACE_ID, "trace_id"),
        to=None if to is None else _name(to, "to"),
    )


def results_by_kind(results: Iterable[ReportResult]) -> tuple[list[ReportResult], list[ReportResult]]:
    """(paths, other checks): a path names the node it checked."""
    paths, checks = [], []
    for r in results:
        if r.type.startswith(names.PATH_PREFIX):
            paths.append(r)
        else:
            checks.append(r)
    return paths, checks
