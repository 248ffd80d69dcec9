"""Assembling the cluster's view: the other probes' reports, the evidence, the mesh document.

Every probe serves a compact report of its last round on `/mesh/report` (`report.py`).
`/mesh.json` asks every running pod this probe's discovery lists, and no one else: by its
IP as discovery gives it, parsed as an IP, on the probe's own port, following no redirect.
Nothing a peer answers chooses where a request goes. Each report is read to its end, up to
a size cap, and parsed against the report's schema; a probe whose answer is not a report of
its own node counts as not answering (`reached: false`, with this probe's words for why).

One view serves every viewer for `max_age`: the document is encoded once (plain and
gzip) off the event loop, and every `/mesh.json` in that time sends the same bytes. An older
view is still served while the next is being built: only the very first viewer waits.
"""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import aiohttp

from probe import names, resources
from probe.mesh.loss import UdpPathView, directions
from probe.mesh.report import (
    MAX_REPORT_BYTES,
    BadReport,
    Report,
    Unreached,
    parse,
    results_by_kind,
)
from probe.mesh.verdicts import CheckView, Evidence, NodeView, PathView, SlowRule, Verdict, assess

log = logging.getLogger("probe.mesh")

REPORT_PATH = "/mesh/report"
#: Per probe: the whole request. An answer slower than this is as good as none for a live view.
ASK_TIMEOUT_SECONDS = 2.0
ASK_CONCURRENCY = 32
#: Reports up to this size are parsed on the event loop (at most about 1.5 ms; a probe with
#: 10 neighbours sends 1.7 KB, 0.15 ms); larger ones on a worker thread.
PARSE_ON_LOOP_BYTES = 16 * 1024
#: A view is built again no sooner than this many times as long as the last one took.
BUILD_SHARE = 3.0
#: The view before counts for hysteresis (`judge`'s `previous`) only when younger than this.
HYSTERESIS_SECONDS = 120.0
#: At most this many probes are asked for one view.
ASK_CAP = 5000
#: What a probe left out of the checks (its node cordoned or unschedulable) is, in words.
NOT_CHECKED = "node cordoned or unschedulable: the other probes do not check it"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Peer:
    """A probe to ask, as discovery lists it."""

    node: str
    pod: str
    ip: IPAddress | None
    #: False when discovery leaves its node out of the checks (cordoned, unschedulable).
    checked: bool = True


def peer(node: str, pod: str, pod_ip: str, *, checked: bool = True) -> Peer:
    """A listed pod as a peer; an IP that does not parse is no address (never a host name)."""
    try:
        ip: IPAddress | None = ipaddress.ip_address(pod_ip)
    except ValueError:
        ip = None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        ip = None  # a pod IP has no zone; `%zone` would be text in the URL
    return Peer(node, pod, ip, checked)


@dataclass
class Gathered:
    """The reports of one round of asking: by node, and the peers that did not answer."""

    own: Report
    reports: dict[str, Report] = field(default_factory=dict)
    peers: dict[str, Peer] = field(default_factory=dict)
    unreached: dict[str, Unreached] = field(default_factory=dict)
    capped: bool = False


async def read_body(response: aiohttp.ClientResponse, cap: int) -> bytes | None:
    """The whole body, however many reads it takes; None when it is longer than `cap`."""
    if response.content_length is not None and response.content_length > cap:
        return None
    chunks, size = [], 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def ask(session: aiohttp.ClientSession, peer: Peer, port: int, timeout: float) -> Report | Unreached:
    """One peer's report, or why there is none."""
    if peer.ip is None:
        return Unreached.NO_ADDRESS
    host = f"[{peer.ip}]" if peer.ip.version == 6 else str(peer.ip)
    try:
        async with session.get(
            f"http://{host}:{port}{REPORT_PATH}",
            allow_redirects=False,
            headers={"Accept-Encoding": "identity"},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            if response.status != 200:
                return Unreached.STATUS
            if response.headers.get("Content-Encoding", "identity").lower() != "identity":
                return Unreached.ENCODED  # never inflated: a small body may inflate to gigabytes
            body = await read_body(response, MAX_REPORT_BYTES)
    except TimeoutError:
        return Unreached.TIMEOUT
    except aiohttp.ClientConnectorError as e:
        return Unreached.REFUSED if isinstance(e.os_error, ConnectionRefusedError) else Unreached.CONNECTION
    except (aiohttp.ClientError, OSError):
        return Unreached.CONNECTION
    if body is None:
        return Unreached.TOO_LARGE
    try:
        # A large report (KUBENURSE_NEIGHBOUR_LIMIT=0 in a big cluster) is parsed on a worker
        # thread, which gives the loop the interpreter back every millisecond.
        report = parse(body) if len(body) < PARSE_ON_LOOP_BYTES else await asyncio.to_thread(parse, body)
    except BadReport:
        return Unreached.INVALID
    if report.node != peer.node or report.pod != peer.pod:
        return Unreached.IMPOSTOR
    return report


async def gather_reports(
    own: Report,
    session: aiohttp.ClientSession,
    *,
    port: int,
    peers: Iterable[Peer],
    timeout: float = ASK_TIMEOUT_SECONDS,
    concurrency: int = ASK_CONCURRENCY,
    cap: int = ASK_CAP,
) -> Gathered:
    """Ask every listed peer (one per node: the first listed) for its report."""
    gathered = Gathered(own)
    gathered.reports[own.node] = own
    todo: list[Peer] = []
    for p in peers:
        if p.node == own.node or p.node in gathered.peers:
            continue
        gathered.peers[p.node] = p
        if len(todo) >= cap:
            gathered.capped = True
            gathered.unreached[p.node] = Unreached.NOT_ASKED
            continue
        todo.append(p)
    queue = iter(todo)

    async def worker() -> None:
        for p in queue:  # shared iterator: each peer is taken once
            answer = await ask(session, p, port, timeout)
            if isinstance(answer, Report):
                gathered.reports[p.node] = answer
            else:
                gathered.unreached[p.node] = answer

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(todo)))))
    return gathered


def evidence_from(gathered: Gathered) -> Evidence:
    """The verdicts' input. Each report speaks only for its own row: its paths start at its
    own node and end at a node discovery lists (others are dropped)."""
    known = set(gathered.peers) | {gathered.own.node}
    nodes: list[NodeView] = []
    paths: list[PathView] = []
    checks: list[CheckView] = []
    udp: list[UdpPathView] = []
    for node in sorted(known):
        report = gathered.reports.get(node)
        listed = gathered.peers.get(node)
        checked = listed.checked if listed else True
        unreached = gathered.unreached.get(node)
        not_ready = None
        if report is not None and report.not_ready is not None:
            not_ready = report.not_ready.words
        elif not checked:
            not_ready = NOT_CHECKED
        nodes.append(
            NodeView(
                node=node,
                pod=listed.pod if listed else (report.pod if report else ""),
                pod_ip=str(listed.ip) if listed and listed.ip else "",
                ready=(report.ready if report else True) and checked,
                reached=report is not None,
                not_ready_reason=not_ready,
                checked=checked,
                unreached_reason=unreached.words if unreached is not None and report is None else None,
            )
        )
        if report is None:
            continue
        report_paths, report_checks = results_by_kind(report.results)
        for r in report_paths:
            target = r.to or r.type.removeprefix(names.PATH_PREFIX)
            if target in known:
                paths.append(PathView(node, target, r.ok, r.latency, r.error_event, r.trace_id))
        checks.extend(CheckView(node, r.type, r.ok, r.latency, r.error_event, r.trace_id) for r in report_checks)
        udp.extend(_udp_paths(node, report, gathered.reports, known))
    return Evidence(nodes, paths, checks, udp)


def _udp_paths(node: str, report: Report, reports: Mapping[str, Report], known: set[str]) -> Iterable[UdpPathView]:
    """A report's UDP paths, each with which way its datagrams were lost where the target's
    echo says what reached it (its report's `echo`)."""
    for u in report.udp:
        if u.to not in known or u.to == node:
            continue
        target = reports.get(u.to)
        way = directions(u.trains, dict(target.echo)) if target is not None else None
        yield UdpPathView(
            node, u.to, u.sent, u.lost, u.mtu_failed, u.mtu,
            lost_there=None if way is None else way[0], lost_back=None if way is None else way[1],
            matched_sent=None if way is None else way[2],
            lossy_trains=sum(1 for _, sent, back in u.trains if 0 < back < sent),
        )


def _trace_url(template: str | None, trace_id: str | None) -> str | None:
    return template.replace("{trace_id}", trace_id) if template and trace_id else None


def mesh_document(
    evidence: Evidence,
    verdicts: Iterable[Verdict],
    *,
    source: str,
    generated_at: float,
    rule: SlowRule | None = None,
    trace_url_template: str | None = None,
    capped: bool = False,
) -> dict[str, object]:
    """`/mesh.json` as docs/reference.md ("/mesh.json") specifies it, plus: on paths their `state`
    (`ok`, `slow`, `failing`: the verdicts' slowness rule, which the page and the terminal
    read) and `trace_id`/`trace_url`; on nodes `not_ready_reason`, `checked` and, for probes
    that did not answer, `unreached_reason` (this probe's words); the rule's figures
    (`slowness`); `capped`."""
    rule = rule or SlowRule.of(evidence.paths)

    def node_entry(n: NodeView) -> dict[str, object]:
        entry: dict[str, object] = {
            "node": n.node, "pod": n.pod, "pod_ip": n.pod_ip, "ready": n.ready, "reached": n.reached,
            "checked": n.checked, "not_ready_reason": n.not_ready_reason,
        }
        if n.unreached_reason is not None:
            entry["unreached_reason"] = n.unreached_reason
        return entry

    return {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(generated_at)),
        "source": source,
        "nodes": [node_entry(n) for n in evidence.nodes],
        "paths": [
            {
                "from": p.source,
                "to": p.target,
                "ok": p.ok,
                "latency_seconds": p.latency,
                "error_event": p.error_event,
                "state": rule.state(p),
                "trace_id": p.trace_id,
                "trace_url": _trace_url(trace_url_template, p.trace_id),
            }
            for p in evidence.paths
        ],
        "checks": [
            {
                "node": c.node,
                "type": c.type,
                "ok": c.ok,
                "latency_seconds": c.latency,
                "error_event": c.error_event,
                "trace_id": c.trace_id,
                "trace_url": _trace_url(trace_url_template, c.trace_id),
            }
            for c in evidence.checks
        ],
        "verdicts": [v.as_json() for v in verdicts],
        "slowness": {
            "median_path_seconds": rule.baseline,
            "spread_seconds": rule.spread,
            "slow_when_late_by_seconds": rule.limit,
            "slow_until_late_by_less_than_seconds": rule.release,
        },
        "capped": capped,
    }


@dataclass(frozen=True, slots=True)
class View:
    """One view of the cluster: the typed verdicts, and the document encoded once."""

    verdicts: tuple[Verdict, ...]
    plain: bytes
    gzipped: bytes
    built_at: float


def encode(document: Mapping[str, object]) -> tuple[bytes, bytes]:
    plain = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    return plain, gzip.compress(plain, compresslevel=5)


class MeshView:
    """`/mesh.json` on demand. Concurrent viewers share one round of asking, and a view
    younger than `max_age` is served again: a page refreshing every few seconds in several
    browsers costs one round per `max_age`, not one per viewer."""

    def __init__(
        self,
        own: Callable[[], Report],
        *,
        peers: Callable[[], Iterable[Peer]] = tuple,
        source: str,
        port: int,
        trace_url_template: str | None = None,
        max_age: float = 1.0,
        timeout: float = ASK_TIMEOUT_SECONDS,
    ) -> None:
        self._own = own
        self._peers = peers
        self._source = source
        self._port = port
        self._template = trace_url_template
        self._max_age = max_age
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._view: View | None = None
        self._pending: asyncio.Future[View] | None = None
        self._biggest = 0
        self._interval = max_age

    @property
    def last(self) -> View | None:
        return self._view

    async def view(self) -> View:
        """The current view. Once there is one, nobody waits for the next: an older view starts
        a new round of asking and is served meanwhile (its `generated_at` says how old it is)."""
        fresh = self._view is not None and time.monotonic() - self._view.built_at < self._interval
        if not fresh and self._pending is None:
            self._pending = asyncio.ensure_future(self._build())
            self._pending.add_done_callback(self._built)
        if self._view is not None:
            return self._view
        assert self._pending is not None
        return await asyncio.shield(self._pending)

    def _built(self, pending: asyncio.Future[View]) -> None:
        if self._pending is pending:
            self._pending = None
        if not pending.cancelled() and pending.exception() is not None:
            log.warning("mesh view failed", extra={"error": type(pending.exception()).__name__})

    async def _build(self) -> View:
        if self._session is None or self._session.closed:
            # No proxy from the environment, no cookies, nothing inflated: probe to probe only.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=ASK_CONCURRENCY, force_close=True),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                trust_env=False,
            )
        started = time.monotonic()
        gathered = await gather_reports(
            self._own(), self._session, port=self._port, timeout=self._timeout, peers=self._peers()
        )
        # Hysteresis holds a verdict from one view to the next, not from a view long gone.
        recent = self._view is not None and time.monotonic() - self._view.built_at < HYSTERESIS_SECONDS
        previous = self._view.verdicts if self._view is not None and recent else ()
        view = await asyncio.to_thread(self._finish, gathered, previous)
        self._view = view
        # Asking takes the loop's time (a few ms per probe): at most 1/BUILD_SHARE of it, so
        # with 1,000 probes a view is built every ~15 s however many viewers there are.
        self._interval = max(self._max_age, BUILD_SHARE * (time.monotonic() - started))
        if len(view.plain) > self._biggest:
            self._biggest = len(view.plain)
        elif len(view.plain) < self._biggest // 2:
            # The cluster shrank (or the last view was an outlier): give the heap back.
            self._biggest = len(view.plain)
            await asyncio.to_thread(resources.give_memory_back)
        return view

    def _finish(self, gathered: Gathered, previous: Iterable[Verdict]) -> View:
        """Evidence, verdicts and the encoded document: CPU work, run off the event loop."""
        evidence = evidence_from(gathered)
        assessment = assess(evidence, previous)
        document = mesh_document(
            evidence,
            assessment.verdicts,
            source=self._source,
            generated_at=time.time(),
            rule=assessment.rule,
            trace_url_template=self._template,
            capped=gathered.capped,
        )
        plain, gzipped = encode(document)
        return View(tuple(assessment.verdicts), plain, gzipped, time.monotonic())

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
