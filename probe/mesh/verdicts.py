"""Where is it broken: pure functions from the cluster's evidence to verdicts.

The evidence is what every probe reported of its last round (`Evidence`); `judge` turns it
into verdicts, each with a kind, a subject, a confidence and the evidence in words and
numbers. Nothing here does I/O, so every rule is tested on hand-written tables.

The rules, in the order they explain failures away:

1. The API server: `api_server_direct` fails on at least half of the probes.
2. Cluster DNS: the name-based checks (`api_server_dns`, `dns_cluster`) fail on probes
   where the API server answers by IP.
3. A partition: the probes fall into two or more groups of at least two that reach each
   other inside a group and not across. Which side is at fault cannot be told: unsure.
4. A node unreachable: its incoming paths fail from at least half of the probes that check
   it (and from more than one, unless it also did not answer the mesh request), while those
   probes reach other nodes. Only witnesses that reach others count: a
   probe that reaches nobody may be isolated itself, and then the verdict says unsure.
5. A node isolated: its outgoing paths fail (at least half, and at least two) while others
   reach it.
6. One path broken: a failing path whose source reaches others and whose destination is
   reached by others.
7. A node slow: most paths towards it are slow by the one slowness rule (`SlowRule`), which
   also gives every path its state (`SlowRule.state`) for the page and the terminal.
8. The Service and the ingress: `me_service` / `me_ingress` fail on probes not otherwise
   explained; the ingress only where the Service works (it forwards to the Service). A
   minority of Service failures while a node is down is that node's doing: evidence in the
   node's verdict, not a second verdict.
9. Loss and MTU (loss.py): paths that answer but lose UDP datagrams, or only the full-size
   ones, towards or from one node (its link) or on one path.
10. Nothing else: exactly one `ok` verdict, `unsure` while no path has been checked.

A peer's report may lie. Every path is its source's claim, so a lying probe can only make
its own row fail: a verdict about a node (unreachable, slow) is `sure` or `likely` only on
evidence from two probes or more (this probe's own failed request for the report counts as
one); one probe's word alone about another node is a broken path, or `unsure`.

`judge` takes the verdicts of the view before (`previous`): a node once slow stays slow until
its paths fall below a lower limit, so the verdict does not flap round to round.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from probe import names
from probe.mesh.loss import UdpPathView, judge_loss
from probe.mesh.verdict import LIKELY, SURE, UNSURE, Verdict

# Verdict kinds (docs/mesh.md, "Reading the verdicts").
OK = "ok"
NODE_UNREACHABLE = "node_unreachable"
NODE_ISOLATED = "node_isolated"
PATH_BROKEN = "path_broken"
CLUSTER_DNS = "cluster_dns"
API_SERVER = "api_server"
SERVICE = "service"
INGRESS = "ingress"
# Added by this project beyond the contract's list: latency, a split cluster, any other check.
NODE_SLOW = "node_slow"
PARTITION = "partition"
CHECK_FAILING = "check_failing"


#: Check types that resolve a name through cluster DNS.
DNS_CHECKS = frozenset({names.API_SERVER_DNS, "dns_cluster"})

#: A path is slow when it takes longer than its source's usual path by SLOW_MARGIN (a delay
#: a person notices; loopback and LAN paths take about a millisecond), or by SPREAD_FACTOR
#: times the cluster's usual spread where paths jitter more (`SlowRule`). Under load the
#: old rule, "4x the median path", stopped firing once a loaded median passed 70 ms.
SLOW_MARGIN_SECONDS = 0.1
SPREAD_FACTOR = 3.0
BASELINE_FLOOR_SECONDS = 0.001
#: A node judged slow stays slow until its paths are less late than this share of the limit.
SLOW_RELEASE = 0.5

OK_STATE, SLOW_STATE, FAILING_STATE = "ok", "slow", "failing"


@dataclass(frozen=True, slots=True)
class NodeView:
    node: str
    pod: str = ""
    pod_ip: str = ""
    ready: bool = True
    #: False when the probe did not answer the mesh request.
    reached: bool = True
    #: Why it is not ready (its own word), in words; None when ready.
    not_ready_reason: str | None = None
    #: False when discovery leaves it out of the checks (its node cordoned or unschedulable).
    checked: bool = True
    #: Why it did not answer, in this probe's words; None when reached.
    unreached_reason: str | None = None


@dataclass(frozen=True, slots=True)
class PathView:
    source: str
    target: str
    ok: bool
    latency: float | None = None
    error_event: str | None = None
    trace_id: str | None = None


@dataclass(frozen=True, slots=True)
class CheckView:
    node: str
    type: str
    ok: bool
    latency: float | None = None
    error_event: str | None = None
    trace_id: str | None = None


@dataclass(frozen=True, slots=True)
class Evidence:
    nodes: Sequence[NodeView] = ()
    #: Performed paths only (a skipped check is no evidence).
    paths: Sequence[PathView] = ()
    checks: Sequence[CheckView] = ()
    #: The UDP trains' paths (loss, MTU): loss.py judges them.
    udp: Sequence[UdpPathView] = ()


# --- small helpers --------------------------------------------------------------------------


def _names(nodes: Iterable[str], limit: int = 8) -> str:
    ordered = sorted(nodes)
    shown = ", ".join(ordered[:limit])
    return shown + (f" and {len(ordered) - limit} more" if len(ordered) > limit else "")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _event(error_event: str | None) -> str:
    return error_event or names.ROUND_TRIP_ERROR


def _events(items: Iterable[PathView | CheckView]) -> str:
    counts: dict[str, int] = {}
    for item in items:
        counts[_event(item.error_event)] = counts.get(_event(item.error_event), 0) + 1
    return ", ".join(f"{event} x{n}" for event, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _share(part: int, whole: int) -> str:
    return f"{part} of {whole}"


class _Graph:
    """The path matrix, indexed both ways."""

    def __init__(self, paths: Sequence[PathView]) -> None:
        self.outgoing: dict[str, list[PathView]] = {}
        self.incoming: dict[str, list[PathView]] = {}
        for p in paths:
            if p.source == p.target:
                continue
            self.outgoing.setdefault(p.source, []).append(p)
            self.incoming.setdefault(p.target, []).append(p)

    def reaches_other(self, source: str, besides: str) -> bool:
        return any(p.ok for p in self.outgoing.get(source, ()) if p.target != besides)

    def reached_by_other(self, target: str, besides: str) -> bool:
        return any(p.ok for p in self.incoming.get(target, ()) if p.source != besides)


def _components(nodes: Iterable[str], paths: Sequence[PathView]) -> list[set[str]]:
    """Groups of nodes joined by working paths (either direction)."""
    parent: dict[str, str] = {n: n for n in nodes}

    def find(n: str) -> str:
        parent.setdefault(n, n)
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for p in paths:
        if p.ok and p.source != p.target:
            parent[find(p.source)] = find(p.target)
    groups: dict[str, set[str]] = {}
    for n in list(parent):
        groups.setdefault(find(n), set()).add(n)
    return sorted(groups.values(), key=lambda g: (-len(g), min(g)))


# --- the rules --------------------------------------------------------------------------------


def _by_type(checks: Sequence[CheckView]) -> dict[str, dict[str, CheckView]]:
    table: dict[str, dict[str, CheckView]] = {}
    for c in checks:
        table.setdefault(c.type, {})[c.node] = c
    return table


def _api_server(
    checks: Mapping[str, Mapping[str, CheckView]], explained: Collection[str] = ()
) -> tuple[Verdict | None, set[str]]:
    """The API server verdict, and the nodes whose API failures it explains."""
    direct = {n: c for n, c in checks.get(names.API_SERVER_DIRECT, {}).items() if n not in explained}
    failing = {n for n, c in direct.items() if not c.ok}
    if not failing:
        return None, set()
    if len(failing) == len(direct):
        confidence = SURE
    elif 2 * len(failing) >= len(direct):
        confidence = LIKELY
    else:
        confidence = UNSURE
    evidence = [
        f"api_server_direct fails on {_share(len(failing), len(direct))} probes "
        f"({_events(direct[n] for n in failing)})",
    ]
    by_dns = checks.get(names.API_SERVER_DNS, {})
    dns_failing = {n for n, c in by_dns.items() if not c.ok}
    if by_dns:
        evidence.append(f"api_server_dns fails on {_share(len(dns_failing), len(by_dns))} probes")
    if confidence != SURE:
        evidence.append(f"it answers {_names(set(direct) - failing)}")
    summary = (
        "The API server does not answer any probe, by IP or by name."
        if confidence == SURE
        else f"The API server does not answer {len(failing)} of {len(direct)} probes."
    )
    return Verdict(API_SERVER, "api-server", confidence, summary, tuple(evidence)), failing


def _cluster_dns(checks: Mapping[str, Mapping[str, CheckView]], explained: set[str]) -> Verdict | None:
    direct = checks.get(names.API_SERVER_DIRECT, {})
    # Nodes where some DNS check was performed, and where one failed while the IP path worked.
    asked: set[str] = set()
    failing: list[CheckView] = []
    for check_type in sorted(DNS_CHECKS):
        for node, c in checks.get(check_type, {}).items():
            if node in explained:
                continue
            asked.add(node)
            if not c.ok:
                failing.append(c)
    failing_nodes = {c.node for c in failing}
    if not failing_nodes:
        return None
    by_ip_ok = {n for n in failing_nodes if n in direct and direct[n].ok}
    evidence = [
        f"{', '.join(sorted({c.type for c in failing}))} fail on {_share(len(failing_nodes), len(asked))} probes "
        f"({_events(failing)})",
    ]
    if by_ip_ok:
        evidence.append(f"api_server_direct (by IP) answers on {_share(len(by_ip_ok), len(failing_nodes))} of them")
    if len(failing_nodes) == len(asked) and len(by_ip_ok) == len(failing_nodes):
        confidence = SURE
    elif 2 * len(failing_nodes) >= len(asked) and by_ip_ok:
        confidence = LIKELY
    else:
        confidence = UNSURE
        evidence.append(f"only on {_names(failing_nodes)}: a node-local resolver problem is as likely")
    where = "every probe" if len(failing_nodes) == len(asked) else f"{_names(failing_nodes)}"
    summary = f"Cluster DNS is failing on {where} while the API server answers by IP."
    if not by_ip_ok:
        summary = f"Name resolution fails on {where}; the API server by IP gives no comparison there."
    return Verdict(CLUSTER_DNS, "cluster-dns", confidence, summary, tuple(evidence))


def _partition(nodes: Sequence[NodeView], paths: Sequence[PathView]) -> tuple[Verdict | None, set[str]]:
    reached = [n.node for n in nodes if n.reached]
    groups = [g for g in _components(reached, [p for p in paths if p.source in reached]) if len(g) >= 2]
    if len(groups) < 2:
        return None, set()
    members = {n: i for i, g in enumerate(groups) for n in g}
    across = [
        p for p in paths if p.source in members and p.target in members and members[p.source] != members[p.target]
    ]
    if not across or any(p.ok for p in across):
        return None, set()
    sides = " | ".join(_names(g, 5) for g in groups)
    evidence = (
        f"{len(groups)} groups: {sides}",
        f"{len(across)} paths across the groups fail ({_events(across)}); paths inside each group work",
        "which side is cut off cannot be told from inside the cluster",
    )
    summary = f"The cluster looks split into {len(groups)} groups that cannot reach each other."
    involved = set(members)
    return Verdict(PARTITION, sides, UNSURE, summary, evidence), involved


def _unreachable(
    target: str, graph: _Graph, node: NodeView | None
) -> Verdict | None:
    incoming = graph.incoming.get(target, [])
    failing = [p for p in incoming if not p.ok]
    not_answering = node is not None and not node.reached
    if not incoming:
        if not_answering:
            return Verdict(
                NODE_UNREACHABLE, target, UNSURE,
                f"The probe on {target} did not answer the mesh request, and no probe checks it.",
                (f"{target} did not answer the mesh request", "no path towards it was checked"),
            )
        return None
    if 2 * len(failing) < len(incoming):
        return None
    if len({p.source for p in failing}) < 2 and not not_answering:
        # One probe's word about another node (it may be cut off, or lying) while the node
        # answered this probe: a broken path, not a node verdict.
        return None
    witnesses = [p for p in failing if graph.reaches_other(p.source, target)]
    evidence = [
        f"{_share(len(failing), len(incoming))} probes that check it fail ({_events(failing)})",
    ]
    if not_answering:
        evidence.append(f"{target} did not answer the mesh request")
    if witnesses:
        evidence.append(f"{_share(len(witnesses), len(failing))} of those reach other nodes")
    doubtful = sorted({p.source for p in failing} - {p.source for p in witnesses})
    if doubtful:
        evidence.append(f"{_names(doubtful)} reach no other node either: they may be isolated instead")
    latencies = [p.latency for p in failing if p.latency is not None]
    if latencies:
        evidence.append(f"failing after {_ms(statistics.median(latencies))} (median)")
    if not witnesses:
        confidence = UNSURE
    elif len(failing) == len(incoming) and len(witnesses) == len(failing) and (len(witnesses) >= 2 or not_answering):
        confidence = SURE
    else:
        confidence = LIKELY
    summary = f"{target} is unreachable: " + (
        "no probe that checks it gets an answer." if len(failing) == len(incoming)
        else f"{len(failing)} of the {len(incoming)} probes that check it get no answer."
    )
    return Verdict(NODE_UNREACHABLE, target, confidence, summary, tuple(evidence))


def _isolated(source: str, graph: _Graph, unreachable: set[str]) -> Verdict | None:
    outgoing = [p for p in graph.outgoing.get(source, []) if p.target not in unreachable]
    failing = [p for p in outgoing if not p.ok]
    # One failing path is a broken path (rule 6), not an isolated node: isolation takes two.
    if len(failing) < 2 or 2 * len(failing) < len(outgoing):
        return None
    # The destinations it cannot reach are reached by others, and others reach it.
    reached_targets = [p for p in failing if graph.reached_by_other(p.target, source)]
    incoming = graph.incoming.get(source, [])
    incoming_ok = [p for p in incoming if p.ok]
    if not reached_targets:
        return None
    evidence = [
        f"{_share(len(failing), len(outgoing))} of its paths fail ({_events(failing)})",
        f"{_share(len(reached_targets), len(failing))} of those destinations are reached by other probes",
    ]
    if incoming:
        evidence.append(f"{_share(len(incoming_ok), len(incoming))} probes that check it reach it")
    if len(failing) == len(outgoing) and len(reached_targets) == len(failing) and incoming and incoming_ok:
        confidence = SURE
    elif incoming_ok or not incoming:
        confidence = LIKELY
    else:
        confidence = UNSURE
    summary = f"{source} is isolated: it reaches " + (
        "none of the nodes it checks" if len(failing) == len(outgoing)
        else f"only {len(outgoing) - len(failing)} of the {len(outgoing)} nodes it checks"
    ) + ", while others reach them" + (" and it." if incoming_ok else ".")
    return Verdict(NODE_ISOLATED, source, confidence, summary, tuple(evidence))


def _broken_path(p: PathView, graph: _Graph) -> Verdict:
    """A failing path no node verdict explains. Even on thin evidence it gets a verdict
    (`unsure`): a failing check must never end in `ok`."""
    source_fine = graph.reaches_other(p.source, p.target)
    target_fine = graph.reached_by_other(p.target, p.source)
    evidence = [f"{p.source} -> {p.target} fails at {_event(p.error_event)}"]
    evidence.append(
        f"{p.source} reaches other nodes" if source_fine else f"{p.source} reaches no other node it checks"
    )
    evidence.append(
        f"{p.target} is reached by other probes" if target_fine else f"no other probe checks {p.target} successfully"
    )
    confidence = SURE if source_fine and target_fine else LIKELY if source_fine or target_fine else UNSURE
    summary = f"The path from {p.source} to {p.target} is broken; both ends work otherwise."
    if confidence == LIKELY:
        summary = f"The path from {p.source} to {p.target} is broken."
    if confidence == UNSURE:
        summary = f"The path from {p.source} to {p.target} fails; the rest of the evidence is too thin to say more."
    return Verdict(PATH_BROKEN, f"{p.source}->{p.target}", confidence, summary, tuple(evidence))


@dataclass(frozen=True, slots=True)
class SlowRule:
    """The one slowness rule. A path is slow when it takes longer than its source's usual
    path (the median of the source's paths; the cluster's median for a source with fewer
    than three) by more than `limit`: SLOW_MARGIN, or SPREAD_FACTOR times the cluster's usual
    spread (the median of every path's distance from its source's usual) when the paths
    jitter more than that. Load on a probe delays all its paths alike, so comparing a path
    with its own source's others keeps a loaded cluster's baseline from hiding a node 200 ms
    late, and the spread keeps a jittery one from calling every path slow.

    A node that was slow in the view before (`held`) is measured against the lower
    `release`, so it leaves the verdict only once clearly back. The page and the terminal
    read each path's state from the document (`state`) instead of applying a rule of their own."""

    baseline: float | None
    spread: float = 0.0
    usual: Mapping[str, float] = field(default_factory=dict)
    held: frozenset[str] = frozenset()

    @classmethod
    def of(cls, paths: Sequence[PathView], held: Collection[str] = ()) -> SlowRule:
        timed = [p for p in paths if p.ok and p.latency is not None and p.source != p.target]
        if not timed:
            return cls(None, held=frozenset(held))
        baseline = max(statistics.median(p.latency for p in timed if p.latency is not None), BASELINE_FLOOR_SECONDS)
        by_source: dict[str, list[float]] = {}
        for p in timed:
            assert p.latency is not None
            by_source.setdefault(p.source, []).append(p.latency)
        usual = {s: statistics.median(xs) if len(xs) >= 3 else baseline for s, xs in by_source.items()}
        spread = statistics.median(abs(p.latency - usual[p.source]) for p in timed if p.latency is not None)
        return cls(baseline, spread, usual, frozenset(held))

    @property
    def limit(self) -> float:
        """How much longer than its source's usual a path may take before it is slow."""
        return max(SLOW_MARGIN_SECONDS, SPREAD_FACTOR * self.spread)

    @property
    def release(self) -> float:
        return SLOW_RELEASE * self.limit

    def limit_for(self, target: str) -> float:
        return self.release if target in self.held else self.limit

    def excess(self, p: PathView) -> float:
        if p.latency is None or self.baseline is None:
            return 0.0
        return p.latency - self.usual.get(p.source, self.baseline)

    def state(self, p: PathView) -> str:
        if not p.ok:
            return FAILING_STATE
        return SLOW_STATE if self.excess(p) > self.limit_for(p.target) else OK_STATE


def _slow(graph: _Graph, rule: SlowRule) -> list[Verdict]:
    if rule.baseline is None:
        return []
    verdicts = []
    for target, incoming in sorted(graph.incoming.items()):
        timed = [p for p in incoming if p.ok and p.latency is not None]
        if not timed:
            continue
        limit = rule.limit_for(target)
        slow = [p for p in timed if rule.state(p) == SLOW_STATE]
        late = statistics.median(rule.excess(p) for p in timed)
        if 2 * len(slow) <= len(timed) or late <= limit:
            continue
        mine = statistics.median(p.latency for p in timed if p.latency is not None)
        witnesses = {p.source for p in slow}
        # One probe's word is not enough: it may be loaded itself, or lying.
        if len(witnesses) < 2:
            confidence = UNSURE
        elif len(slow) == len(timed):
            confidence = SURE
        else:
            confidence = LIKELY
        evidence = [
            f"paths towards it take {_ms(late)} longer than their probes' other paths (median of {len(timed)})",
            f"median latency towards it {_ms(mine)}; the cluster's median path {_ms(rule.baseline)}",
            f"{_share(len(slow), len(timed))} paths towards it are over {_ms(limit)} late, "
            f"seen by {len(witnesses)} probes",
        ]
        if target in rule.held:
            evidence.append(f"slow in the view before too: it stays slow until less than {_ms(rule.release)} late")
        if len(witnesses) < 2:
            evidence.append("only one probe sees it: that probe may be loaded itself")
        summary = (
            f"{target} answers slowly: {_ms(late)} later than the other nodes "
            f"({_ms(mine)} against {_ms(rule.baseline)})."
        )
        verdicts.append(Verdict(NODE_SLOW, target, confidence, summary, tuple(evidence)))
    return verdicts


def _front_door(
    kind: str, check_type: str, checks: Mapping[str, Mapping[str, CheckView]], explained: set[str],
    also_failing: Collection[str] = (),
) -> tuple[Verdict | None, set[str]]:
    table = {n: c for n, c in checks.get(check_type, {}).items() if n not in explained}
    failing = [c for c in table.values() if not c.ok and c.node not in also_failing]
    if not failing:
        return None, set()
    nodes = {c.node for c in failing}
    if len(nodes) == len(table):
        confidence = SURE if len(nodes) >= 2 else LIKELY
    elif 2 * len(nodes) >= len(table):
        confidence = LIKELY
    else:
        confidence = UNSURE
    what = "Service" if kind == SERVICE else "ingress"
    evidence = [f"{check_type} fails on {_share(len(nodes), len(table))} probes ({_events(failing)})"]
    if confidence == UNSURE:
        evidence.append(f"only from {_names(nodes)}: one bad endpoint behind the {what}, or those nodes' routing")
    where = "every probe" if len(nodes) == len(table) else _names(nodes)
    summary = f"The {what} is broken: {check_type} fails from {where}."
    return Verdict(kind, check_type, confidence, summary, tuple(evidence)), nodes


@dataclass(frozen=True, slots=True)
class Assessment:
    verdicts: list[Verdict]
    #: The slowness rule the verdicts used: it gives each path its state for the document.
    rule: SlowRule


def judge(evidence: Evidence, previous: Iterable[Verdict] = ()) -> list[Verdict]:
    """Every verdict the evidence supports, the surest first; exactly one `ok` when none."""
    return assess(evidence, previous).verdicts


def assess(evidence: Evidence, previous: Iterable[Verdict] = ()) -> Assessment:
    """`judge`, with the slowness rule it used. `previous`: the verdicts of the view before
    (hysteresis for slowness)."""
    nodes = {n.node: n for n in evidence.nodes}
    checks = _by_type(evidence.checks)
    paths = [p for p in evidence.paths if p.source != p.target]
    graph = _Graph(paths)
    rule = SlowRule.of(paths, {v.subject for v in previous if v.kind == NODE_SLOW})
    verdicts: list[Verdict] = []

    # A minority of API failures may be isolated nodes: judged after isolation.
    api, api_explained = _api_server(checks)
    if api and api.confidence != UNSURE:
        verdicts.append(api)
    dns = _cluster_dns(checks, api_explained if api and api.confidence != UNSURE else set())
    if dns:
        verdicts.append(dns)

    partition, partitioned = _partition(evidence.nodes, paths)
    if partition:
        verdicts.append(partition)

    unreachable: set[str] = set()
    for target in sorted(set(graph.incoming) | set(nodes)):
        if target in partitioned:
            continue
        v = _unreachable(target, graph, nodes.get(target))
        if v:
            verdicts.append(v)
            unreachable.add(target)

    _crowd(verdicts, len(nodes))

    isolated: set[str] = set()
    for source in sorted(graph.outgoing):
        if source in partitioned or source in unreachable:
            continue
        v = _isolated(source, graph, unreachable)
        if v:
            verdicts.append(v)
            isolated.add(source)

    explained = unreachable | isolated | partitioned
    if api and api.confidence == UNSURE:
        late_api, _ = _api_server(checks, isolated | partitioned)
        if late_api:
            verdicts.append(late_api)
    for p in paths:
        if p.ok or p.source in explained or p.target in explained:
            continue
        verdicts.append(_broken_path(p, graph))

    verdicts.extend(v for v in _slow(graph, rule) if v.subject not in explained)

    # An isolated node fails its Service and ingress checks too: that is not the Service's fault.
    # A node that is down fails a share of everyone's Service checks (the Service sends them
    # there): that is evidence in the node's verdict.
    down = unreachable | {n.node for n in evidence.nodes if not n.reached}
    service, service_failing = _front_door(SERVICE, names.ME_SERVICE, checks, isolated | partitioned)
    if service:
        service = _fold(service, service_failing, checks.get(names.ME_SERVICE, {}), down, verdicts)
    if service:
        verdicts.append(service)
    ingress, ingress_failing = _front_door(INGRESS, names.ME_INGRESS, checks, isolated | partitioned, service_failing)
    if ingress:
        ingress = _fold(ingress, ingress_failing, checks.get(names.ME_INGRESS, {}), down, verdicts)
    if ingress:
        verdicts.append(ingress)

    verdicts.extend(_other_checks(checks, isolated | partitioned))
    # Loss and MTU on paths that still answer (a node that is down or cut off loses everything).
    verdicts.extend(judge_loss([u for u in evidence.udp if u.source not in explained and u.target not in explained]))

    if not verdicts:
        verdicts.append(_all_well(evidence, paths))
    order = {SURE: 0, LIKELY: 1, UNSURE: 2}
    return Assessment(sorted(verdicts, key=lambda v: order[v.confidence]), rule)


def _fold(
    verdict: Verdict, failing: Collection[str], table: Mapping[str, CheckView], down: Collection[str],
    verdicts: list[Verdict],
) -> Verdict | None:
    """A front door (Service, ingress) failing on fewer than half of the probes while a node
    is down: the door sends those requests to the node that is down. The failures become
    evidence in that node's verdict, and there is no verdict of their own."""
    if not down or 2 * len(failing) >= len(table):
        return verdict
    note = (
        f"{verdict.subject} fails on {_share(len(failing), len(table))} probes ({_names(failing)}): "
        f"the requests the {verdict.kind.replace('_', ' ')} sends to a node that is down fail"
    )
    folded = False
    for i, v in enumerate(verdicts):
        if v.kind == NODE_UNREACHABLE and v.subject in down:
            verdicts[i] = Verdict(v.kind, v.subject, v.confidence, v.summary, (*v.evidence, note))
            folded = True
    return None if folded else verdict


def _crowd(verdicts: list[Verdict], cluster_size: int) -> None:
    """Many nodes unreachable at once: they may all be down, or the probes that see it may be
    cut off from them (a partition seen from one side). Say unsure rather than guess."""
    down = [i for i, v in enumerate(verdicts) if v.kind == NODE_UNREACHABLE]
    if len(down) < 2 or 2 * len(down) < cluster_size:
        return
    note = (
        f"{len(down)} of {cluster_size} nodes look unreachable at once: they may be down, "
        "or the probes that report it may be cut off from them"
    )
    for i in down:
        v = verdicts[i]
        verdicts[i] = Verdict(v.kind, v.subject, UNSURE, v.summary, (*v.evidence, note))


KNOWN_CHECKS = frozenset({names.API_SERVER_DIRECT, names.ME_SERVICE, names.ME_INGRESS, *DNS_CHECKS})


def _other_checks(checks: Mapping[str, Mapping[str, CheckView]], explained: set[str]) -> list[Verdict]:
    """Extra checks (KUBENURSE_EXTRA_CHECKS): one verdict per failing type."""
    verdicts = []
    for check_type, table in sorted(checks.items()):
        if check_type in KNOWN_CHECKS:
            continue
        considered = {n: c for n, c in table.items() if n not in explained}
        failing = [c for c in considered.values() if not c.ok]
        if not failing:
            continue
        nodes = {c.node for c in failing}
        confidence = SURE if len(nodes) == len(considered) and len(nodes) >= 2 else LIKELY
        where = "every probe" if len(nodes) == len(considered) else _names(nodes)
        verdicts.append(
            Verdict(
                CHECK_FAILING, check_type, confidence,
                f"The check {check_type} fails from {where}.",
                (f"{check_type} fails on {_share(len(nodes), len(considered))} probes ({_events(failing)})",),
            )
        )
    return verdicts


def _all_well(evidence: Evidence, paths: Sequence[PathView]) -> Verdict:
    facts = [
        f"{_count(len(evidence.nodes), 'probe')}, {_count(len(paths), 'path')} and "
        f"{_count(len(evidence.checks), 'other check')}, all ok",
    ]
    timed = [p.latency for p in paths if p.latency is not None]
    if timed:
        facts.append(f"median path latency {_ms(statistics.median(timed))}, slowest {_ms(max(timed))}")
    silent = sorted(n.node for n in evidence.nodes if not n.reached)
    if silent:
        facts.append(f"paths to them work, but these did not answer the mesh request: {_names(silent)}")
    not_ready = sorted(n.node for n in evidence.nodes if not n.ready or not n.checked)
    if not_ready:
        reasons = sorted({n.not_ready_reason or "not checked by the others" for n in evidence.nodes
                          if n.node in not_ready})
        facts.append(f"not checked ({'; '.join(reasons)}): {_names(not_ready)}")
    if not paths and (len(evidence.nodes) > 1 or not evidence.checks):
        # Probes that just started have checked nothing yet: no failure is not "all well".
        # (One node alone has no path to check: its other checks are the evidence.)
        return Verdict(OK, "cluster", UNSURE, "Nothing fails, but no path between nodes has been checked yet.",
                       tuple(facts))
    return Verdict(OK, "cluster", SURE, "Nothing is wrong: every probe reaches every node it checks.", tuple(facts))
