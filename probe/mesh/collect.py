"""Assembling the cluster's view: this probe's report, the other probes' reports, the mesh
document.

Every probe serves a compact report of its last round on `/mesh/report`. `/mesh.json`
starts from this probe's own neighbours and asks each probe for its report; every report
names that probe's neighbours, so the walk follows the hash ring and reaches every probe
that any probe checks (not only the `KUBENURSE_NEIGHBOUR_LIMIT` this one checks), with
bounded concurrency, a short timeout and a cap. A probe that does not answer is evidence
too (`reached: false`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from probe import names
from probe.checks.result import CheckResult
from probe.checks.rounds import Round
from probe.mesh.verdicts import CheckView, Evidence, NodeView, PathView, Verdict, judge

REPORT_PATH = "/mesh/report"
#: Per probe: the whole request. An answer slower than this is as good as none for a live view.
ASK_TIMEOUT_SECONDS = 2.0
ASK_CONCURRENCY = 32
#: At most this many probes are asked for one view.
ASK_CAP = 1000
#: A report's body above this is refused (a probe's report is a few KB per 100 neighbours).
MAX_REPORT_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Peer:
    node: str
    pod: str
    pod_ip: str


def _result(result: CheckResult) -> dict[str, object]:
    entry: dict[str, object] = {
        "type": result.check_type,
        "ok": result.ok,
        "latency_seconds": None if result.duration is None else round(result.duration, 6),
        "error_event": None if result.failure is None else result.failure.event,
        "trace_id": result.trace_id,
    }
    target = result.target
    if target is not None and target.neighbour is not None:
        entry["to"] = target.neighbour.node_name
    return entry


def own_report(last: Round | None, *, node: str, pod: str, ready: bool, now: float | None = None) -> dict[str, Any]:
    """What `/mesh/report` answers: who this probe is, whom it checks, how its last round went.
    Skipped checks are left out: they are no evidence."""
    now = time.time() if now is None else now
    report: dict[str, Any] = {"node": node, "pod": pod, "ready": ready, "neighbours": [], "results": []}
    if last is None:
        return report
    report["round_age_seconds"] = round(max(0.0, now - last.finished_at), 3)
    report["neighbours"] = [
        {"node": n.node_name, "pod": n.pod_name, "pod_ip": n.pod_ip} for n in last.neighbourhood.neighbours
    ]
    report["results"] = [_result(r) for _, r in sorted(last.results.items()) if not r.skipped]
    return report


def peers_of(report: Mapping[str, Any]) -> list[Peer]:
    peers = []
    for n in report.get("neighbours") or ():
        if isinstance(n, dict) and isinstance(n.get("node"), str) and isinstance(n.get("pod_ip"), str):
            peers.append(Peer(n["node"], str(n.get("pod", "")), n["pod_ip"]))
    return peers


@dataclass
class Gathered:
    """The reports of one walk: by node, and the peers that did not answer."""

    reports: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    peers: dict[str, Peer] = field(default_factory=dict)
    unreached: dict[str, str] = field(default_factory=dict)  # node -> why
    capped: bool = False


async def gather_reports(
    own: Mapping[str, Any],
    session: aiohttp.ClientSession,
    *,
    port: int,
    timeout: float = ASK_TIMEOUT_SECONDS,
    concurrency: int = ASK_CONCURRENCY,
    cap: int = ASK_CAP,
    seeds: Iterable[Peer] = (),
) -> Gathered:
    """Ask every probe in `seeds` (every eligible pod this probe's discovery knows) and every
    probe reachable through the neighbour lists for its report."""
    gathered = Gathered()
    gathered.reports[str(own["node"])] = own
    queue: asyncio.Queue[Peer] = asyncio.Queue()
    seen = {own["node"]}

    def discover(peers: Iterable[Peer]) -> None:
        for peer in peers:
            gathered.peers.setdefault(peer.node, peer)
            if peer.node in seen:
                continue
            if len(seen) >= cap:
                gathered.capped = True
                continue
            seen.add(peer.node)
            queue.put_nowait(peer)

    async def ask(peer: Peer) -> None:
        url = f"http://{_host(peer.pod_ip)}:{port}{REPORT_PATH}"
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                if response.status != 200:
                    gathered.unreached[peer.node] = f"HTTP {response.status}"
                    return
                body = await response.content.read(MAX_REPORT_BYTES + 1)
                if len(body) > MAX_REPORT_BYTES:
                    gathered.unreached[peer.node] = "report too large"
                    return
                report = _decode(body)
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            gathered.unreached[peer.node] = type(e).__name__
            return
        except ValueError as e:
            gathered.unreached[peer.node] = f"bad report: {e}"
            return
        if report.get("node") != peer.node:
            gathered.unreached[peer.node] = f"answered as {report.get('node')!r}"
            return
        gathered.reports[peer.node] = report
        discover(peers_of(report))

    async def worker() -> None:
        while True:
            peer = await queue.get()
            try:
                await ask(peer)
            finally:
                queue.task_done()

    discover([*seeds, *peers_of(own)])
    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await queue.join()
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return gathered


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def _decode(body: bytes) -> dict[str, Any]:
    value = json.loads(body)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def evidence_from(gathered: Gathered) -> Evidence:
    """The verdicts' input: nodes, paths and checks from every report."""
    nodes: list[NodeView] = []
    paths: list[PathView] = []
    checks: list[CheckView] = []
    for node in sorted(set(gathered.reports) | set(gathered.peers)):
        report = gathered.reports.get(node)
        peer = gathered.peers.get(node)
        nodes.append(
            NodeView(
                node=node,
                pod=(peer.pod if peer else "") or str((report or {}).get("pod", "")),
                pod_ip=peer.pod_ip if peer else "",
                ready=bool(report.get("ready", True)) if report else True,
                reached=report is not None,
            )
        )
        if report is None:
            continue
        for r in report.get("results") or ():
            if not isinstance(r, dict) or not isinstance(r.get("type"), str):
                continue
            check_type: str = r["type"]
            ok = r.get("ok") is True
            latency, event = _number(r.get("latency_seconds")), _text(r.get("error_event"))
            trace_id = _text(r.get("trace_id"))
            if check_type.startswith(names.PATH_PREFIX):
                target = _text(r.get("to")) or check_type.removeprefix(names.PATH_PREFIX)
                paths.append(PathView(node, target, ok, latency, event, trace_id))
            else:
                checks.append(CheckView(node, check_type, ok, latency, event, trace_id))
    return Evidence(nodes, paths, checks)


def _trace_url(template: str | None, trace_id: str | None) -> str | None:
    return template.replace("{trace_id}", trace_id) if template and trace_id else None


def mesh_document(
    evidence: Evidence,
    verdicts: Iterable[Verdict],
    *,
    source: str,
    generated_at: float,
    trace_url_template: str | None = None,
    unreached: Mapping[str, str] | None = None,
    capped: bool = False,
) -> dict[str, object]:
    """`/mesh.json` as docs/reference.md ("/mesh.json") specifies it, plus `trace_id`/`trace_url` on
    paths and checks and, for probes that did not answer, `unreached_reason`."""
    unreached = unreached or {}

    def node_entry(n: NodeView) -> dict[str, object]:
        entry: dict[str, object] = {
            "node": n.node, "pod": n.pod, "pod_ip": n.pod_ip, "ready": n.ready, "reached": n.reached,
        }
        if n.node in unreached:
            entry["unreached_reason"] = unreached[n.node]
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
        "capped": capped,
    }


class MeshView:
    """`/mesh.json` on demand. Concurrent viewers share one walk, and a view younger than
    `max_age` is served again: a page refreshing every few seconds in several browsers
    costs one walk per `max_age`, not one per viewer."""

    def __init__(
        self,
        own: Callable[[], Mapping[str, Any]],
        *,
        seeds: Callable[[], Iterable[Peer]] = tuple,
        source: str,
        port: int,
        trace_url_template: str | None = None,
        max_age: float = 1.0,
        timeout: float = ASK_TIMEOUT_SECONDS,
    ) -> None:
        self._own = own
        self._seeds = seeds
        self._source = source
        self._port = port
        self._template = trace_url_template
        self._max_age = max_age
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._cached: tuple[float, dict[str, object]] | None = None
        self._pending: asyncio.Future[dict[str, object]] | None = None

    async def document(self) -> dict[str, object]:
        if self._cached and time.monotonic() - self._cached[0] < self._max_age:
            return self._cached[1]
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._build())
        pending = self._pending
        try:
            return await asyncio.shield(pending)
        finally:
            if pending.done() and self._pending is pending:
                self._pending = None

    async def _build(self) -> dict[str, object]:
        if self._session is None or self._session.closed:
            # No proxy from the environment, no cookies: probe to probe only.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=ASK_CONCURRENCY, force_close=True),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        gathered = await gather_reports(
            self._own(), self._session, port=self._port, timeout=self._timeout, seeds=self._seeds()
        )
        evidence = evidence_from(gathered)
        document = mesh_document(
            evidence,
            judge(evidence),
            source=self._source,
            generated_at=time.time(),
            trace_url_template=self._template,
            unreached=gathered.unreached,
            capped=gathered.capped,
        )
        self._cached = (time.monotonic(), document)
        return document

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
