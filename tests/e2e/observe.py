"""What the tests read: Prometheus series keyed by node, counter deltas, spans per pod."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from tests.e2e.cluster import Cluster, wait_until
from tests.otlp_receiver import Span

#: (node, label values...) -> sample value
Series = dict[tuple[str, ...], float]

CHECK_TYPES_FIXED = ("api_server_direct", "api_server_dns", "me_ingress", "me_service", "dns_cluster")


def series(cluster: Cluster, promql: str, *labels: str) -> Series:
    """An instant query, keyed by (node name, *labels)."""
    out: Series = {}
    for item in cluster.prometheus.query(promql):
        metric = item["metric"]
        node = cluster.by_instance(metric["instance"]).name
        out[(node, *(metric.get(label, "") for label in labels))] = float(item["value"][1])
    return out


def delta(before: Series, after: Series) -> Series:
    """after - before per key (a series absent before counts as 0), non-zero ones only."""
    out: Series = {}
    for key in set(before) | set(after):
        change = after.get(key, 0.0) - before.get(key, 0.0)
        if change:
            out[key] = change
    return out


@dataclass
class Snapshot:
    """Every probe's counters as Prometheus holds them at one moment."""

    errors: Series  # (node, type, event)
    requests: Series  # (node, type, code)
    duration_sum: Series  # (node, type)
    duration_count: Series  # (node, type)
    slow: Series  # (node, type): observations above 0.25 s

    @classmethod
    def take(cls, cluster: Cluster) -> Snapshot:
        return cls(
            errors=series(cluster, "kubenurse_errors_total", "type", "event"),
            requests=series(cluster, "kubenurse_httpclient_requests_total", "type", "code"),
            duration_sum=series(cluster, "kubenurse_httpclient_request_duration_seconds_sum", "type"),
            duration_count=series(cluster, "kubenurse_httpclient_request_duration_seconds_count", "type"),
            slow=series(
                cluster,
                'kubenurse_httpclient_request_duration_seconds_count'
                ' - ignoring(le) kubenurse_httpclient_request_duration_seconds_bucket{le="0.25"}',
                "type",
            ),
        )


def wait_scraped(cluster: Cluster, since: float | None = None, timeout: float = 15.0) -> None:
    """Until Prometheus scraped every probe successfully after `since` (default: now), so a
    snapshot taken next reflects what the probes had counted by then."""
    since = time.time() if since is None else since

    def fresh() -> bool:
        up = series(cluster, "up")
        stamps = series(cluster, "timestamp(up)")
        return len(up) == len(cluster.nodes) and all(
            up[(n.name,)] == 1 and stamps[(n.name,)] > since for n in cluster.nodes
        )

    wait_until(fresh, timeout, "every probe scraped", cluster.diagnostics)


def settle(cluster: Cluster, timeout: float = 30.0) -> Snapshot:
    """Until every probe reports every check ok on /alive with a fresh neighbourhood, then a
    snapshot of the counters (scraped after that point)."""

    def healthy() -> bool:
        for node in cluster.nodes:
            alive = cluster.alive(node)
            results = alive["last_check_result"]
            expected = {*CHECK_TYPES_FIXED, *(f"path_{n}" for n in cluster.neighbours_of(node.name))}
            checks = {k: v for k, v in results.items() if k not in ("neighbourhood_state", "neighbourhood")}
            if set(checks) != expected or any(v != "ok" for v in checks.values()) or alive["discovery"]["stale"]:
                return False
        return True

    wait_until(healthy, timeout, "every probe healthy", cluster.diagnostics)
    wait_scraped(cluster)
    return Snapshot.take(cluster)


def spans_of(spans: Iterable[Span], *, pod: str | None = None, name: str | None = None,
             after_ns: int = 0, before_ns: int | None = None) -> list[Span]:
    return [
        s
        for s in spans
        if (pod is None or s.resource.get("k8s.pod.name") == pod)
        and (name is None or s.name == name)
        and s.start_ns >= after_ns
        and (before_ns is None or s.end_ns <= before_ns)
    ]


def children(spans: Iterable[Span], parent: Span) -> dict[str, Span]:
    return {s.name: s for s in spans if s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id}
