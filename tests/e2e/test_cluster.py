"""End to end, in network namespaces: four probes on four "nodes", real DNS, ingress,
Service, API server stand-in, Prometheus and an OTLP receiver. Each fault test breaks one
thing, asserts that exactly the right probes report exactly the right failure (from what
Prometheus and the receiver hold), restores it and waits until all is well again.
"""

from __future__ import annotations

import time

from tests.e2e.cluster import Cluster, wait_until
from tests.e2e.observe import (
    CHECK_TYPES_FIXED,
    Snapshot,
    children,
    delta,
    series,
    settle,
    spans_of,
    wait_scraped,
)
from tests.otlp_receiver import Span


def check_types(cluster: Cluster, node: str) -> set[str]:
    return {*CHECK_TYPES_FIXED, *(f"path_{n}" for n in cluster.neighbours_of(node))}


def test_every_path_ok_and_every_node_checked_by_exactly_the_limit(cluster: Cluster) -> None:
    limit = cluster.neighbour_limit
    expected_incoming = {(n.name,): float(limit) for n in cluster.nodes}
    wait_until(lambda: series(cluster, "kubenurse_neighbourhood_incoming_checks") == expected_incoming,
               30, f"every node receiving exactly {limit} checks", cluster.diagnostics)
    before = settle(cluster)
    cluster.receiver.clear()
    started_ns = time.time_ns()
    time.sleep(2.0)
    wait_scraped(cluster)
    after = Snapshot.take(cluster)

    assert delta(before.errors, after.errors) == {}, "no check failed while all is well"
    checked = delta(before.requests, after.requests)
    for node in cluster.nodes:
        types = {t for (n, t, code) in checked if n == node.name}
        assert types == check_types(cluster, node.name), f"{node.name} runs exactly its checks"
        codes = {(t, code) for (n, t, code) in checked if n == node.name}
        assert {c for (t, c) in codes if t != "dns_cluster"} == {"200"}, f"{node.name}: every GET answered 200"
        assert {c for (t, c) in codes if t == "dns_cluster"} == {"ok"}, f"{node.name}: cluster DNS answered"
    # Each path type exists exactly where the hash ring says, over the whole run.
    path_series = {(n, t) for (n, t, _c) in after.requests if t.startswith("path_")}
    assert path_series == {(n.name, f"path_{m}") for n in cluster.nodes for m in cluster.neighbours_of(n.name)}
    # The phases of a plain-HTTP neighbour check, as kubenurse's trace histogram has them.
    events = series(cluster, "kubenurse_httpclient_trace_request_duration_seconds_count", "type", "event")
    for node in cluster.nodes:
        for neighbour in cluster.neighbours_of(node.name):
            seen = {e for (n, t, e) in events if n == node.name and t == f"path_{neighbour}"}
            assert seen == {"connect_start", "connect_done", "got_conn", "wrote_request", "got_first_resp_byte"}
        seen = {e for (n, t, e) in events if n == node.name and t == "api_server_dns"}
        assert {"dns_start", "dns_done", "tls_handshake_start", "tls_handshake_done"} <= seen

    # Every check type of every probe also arrives as a CLIENT span over OTLP, and a
    # neighbour check's trace carries the neighbour's SERVER span.
    def traced() -> bool:
        spans = cluster.receiver.spans()
        for node in cluster.nodes:
            mine = spans_of(spans, pod=node.pod, after_ns=started_ns)
            names = {s.attributes.get("kubenurse.check.type") for s in mine if s.kind == "CLIENT"}
            if not check_types(cluster, node.name) <= names:
                return False
        return True

    wait_until(traced, 15, "a span of every check type from every probe", cluster.diagnostics)
    spans = cluster.receiver.spans()
    servers = {(s.trace_id, s.parent_span_id): s for s in spans if s.kind == "SERVER"}
    linked = [
        s for s in spans_of(spans, after_ns=started_ns)
        if s.kind == "CLIENT" and str(s.attributes.get("kubenurse.check.type", "")).startswith("path_")
        and (s.trace_id, s.span_id) in servers
    ]
    assert linked, "no neighbour check trace shows the neighbour's SERVER span"
    for client in linked:
        server = servers[(client.trace_id, client.span_id)]
        assert server.resource["k8s.node.name"] == client.attributes["kubenurse.neighbour.node"]


def test_blackholed_node_is_reported_by_exactly_its_checkers(cluster: Cluster) -> None:
    target = cluster.nodes[0]
    checkers = cluster.selected_by(target.name)
    others = [n.name for n in cluster.nodes if n.name not in checkers and n is not target]
    assert len(checkers) == cluster.neighbour_limit and others, "the cluster shape makes this test meaningful"
    path = f"path_{target.name}"
    before = settle(cluster)

    with cluster.blackholed(target):
        def reported() -> bool:
            errors = series(cluster, f'kubenurse_errors_total{{type="{path}"}}', "type", "event")
            return all(errors.get((c, path, "connect_done"), 0) >= before.errors.get((c, path, "connect_done"), 0) + 2
                       for c in checkers)

        wait_until(reported, 20, f"{checkers} report connect errors for {path}", cluster.diagnostics)
        for checker in checkers:
            result = cluster.alive(cluster.node(checker))["last_check_result"][path]
            assert result.startswith("connect_done: "), result
        during = Snapshot.take(cluster)

    after = settle(cluster)  # every check ok again, then counters scraped after that
    for checker in checkers:
        key = (checker, path, "200")
        assert after.requests.get(key, 0) > during.requests.get(key, 0), f"{checker} sees {target.name} again"
    changed = delta(before.errors, after.errors)
    assert set(changed) == {(c, path, "connect_done") for c in checkers}, (
        f"only {checkers} may report, and only connect errors towards {target.name}: {changed}"
    )
    assert not any(t == path for (n, t, _c) in after.requests if n in others)


def test_latency_on_one_path_shows_in_that_path_only(cluster: Cluster) -> None:
    delay = 0.4
    source = cluster.nodes[0]
    target = cluster.node(cluster.neighbours_of(source.name)[0])
    other_checker = next(c for c in cluster.selected_by(target.name) if c != source.name)
    path = f"path_{target.name}"
    before = settle(cluster)

    with cluster.delayed_path(source, target, delay):
        began_ns = time.time_ns()
        # Wait for a delayed observation to be scraped; from then on, every one is delayed.
        wait_until(lambda: series(cluster, "kubenurse_httpclient_request_duration_seconds_sum", "type")
                   .get((source.name, path), 0) >= before.duration_sum.get((source.name, path), 0) + delay,
                   20, "a delayed check scraped", cluster.diagnostics)
        start = Snapshot.take(cluster)
        cluster.receiver.clear()
        wait_until(lambda: series(cluster, "kubenurse_httpclient_request_duration_seconds_count", "type")
                   .get((source.name, path), 0) >= start.duration_count.get((source.name, path), 0) + 3,
                   20, "three more delayed checks", cluster.diagnostics)
        end = Snapshot.take(cluster)
        ended_ns = time.time_ns()

        def delayed_spans() -> list[Span] | None:
            spans = cluster.receiver.spans()
            return spans if spans_of(spans, pod=source.pod, name=f"check {path}", after_ns=began_ns) else None

        spans = cluster.receiver.wait_for(delayed_spans, timeout=10)

    counts = delta(start.duration_count, end.duration_count)
    sums = delta(start.duration_sum, end.duration_sum)
    slow = delta(start.slow, end.slow)
    assert counts[(source.name, path)] >= 3
    assert slow[(source.name, path)] == counts[(source.name, path)], "every delayed check lands above 0.25 s"
    assert delay <= sums[(source.name, path)] / counts[(source.name, path)] < delay + 0.2
    for key, count in counts.items():
        if key == (source.name, path):
            continue
        # The API-server stand-in shares this test process (and its GIL) with the span
        # decoding, so only a gross slowdown of its checks would be the probe's doing.
        assert sums.get(key, 0) / count < delay / 2, f"{key} got slow too"
        if not key[1].startswith("api_server_"):
            assert slow.get(key, 0) == 0, f"{key} got slow too"
            assert sums.get(key, 0) / count < 0.15, f"{key} got slow too"
    assert (other_checker, path) in counts, "the other checker of the target kept checking it"

    # In the traces: the delay is the "wait for first byte" phase of source -> target only.
    delayed = spans_of(spans, pod=source.pod, name=f"check {path}", after_ns=began_ns, before_ns=ended_ns)
    assert delayed
    for check in delayed:
        phases = children(spans, check)
        assert phases["wait for first byte"].duration_ns >= delay * 1e9
        assert phases["connect"].duration_ns < 0.1e9
    parents = {s.span_id: s for s in spans if s.kind == "CLIENT"}
    waits = [s for s in spans_of(spans, name="wait for first byte", after_ns=began_ns) if s.parent_span_id in parents]
    assert len({parents[w.parent_span_id].resource.get("k8s.pod.name") for w in waits}) == len(cluster.nodes)
    for wait in waits:
        parent = parents[wait.parent_span_id]
        if parent.resource.get("k8s.pod.name") == source.pod and parent.name == f"check {path}":
            continue
        limit = delay / 2 if parent.name.startswith("check api_server_") else 0.2
        assert wait.duration_ns < limit * 1e9, f"{parent.resource.get('k8s.pod.name')} {parent.name} got slow too"


def test_cluster_dns_down_fails_api_server_dns_at_dns_done_only(cluster: Cluster) -> None:
    before = settle(cluster)
    cluster.dns.stop()
    try:
        def reported() -> bool:
            errors = series(cluster, 'kubenurse_errors_total{type=~"api_server_dns|dns_cluster"}', "type", "event")
            return all(errors.get((n.name, t, "dns_done"), 0) >= before.errors.get((n.name, t, "dns_done"), 0) + 2
                       for n in cluster.nodes for t in ("api_server_dns", "dns_cluster"))

        wait_until(reported, 20, "every probe reports api_server_dns and dns_cluster failing at dns_done",
                   cluster.diagnostics)
        for node in cluster.nodes:
            results = cluster.alive(node)["last_check_result"]
            assert results["api_server_dns"].startswith("dns_done: "), results
            # dnsmasq's address is still there, its port is not: refused, or (ICMP is rate
            # limited) no answer within the resolv.conf timeout.
            dns_cluster = results["dns_cluster"]
            assert dns_cluster in (
                f"dns_done: no answer from {cluster.dns.address}:53 within 1s",
                f"dns_done: {cluster.dns.address}:53 refused (nothing listens on that port)",
            ), results
            assert results["api_server_direct"] == "ok", results
        during = Snapshot.take(cluster)
    finally:
        cluster.dns.start()
    after = settle(cluster)

    changed = delta(before.errors, after.errors)
    assert {(n, t) for (n, t, _e) in changed} >= {(n.name, "api_server_dns") for n in cluster.nodes}
    for (node, check, event), _count in changed.items():
        # The Service and the ingress are reached by name too, so they fail the same way.
        assert check in ("api_server_dns", "dns_cluster", "me_service", "me_ingress"), f"{node} {check} at {event}"
        assert event == "dns_done", f"{node} {check} failed at {event}"
    direct = delta(before.requests, during.requests)
    assert all(direct.get((n.name, "api_server_direct", "200"), 0) > 0 for n in cluster.nodes)
    assert {(n, t) for (n, t, _e) in changed if t == "dns_cluster"} == {(n.name, "dns_cluster") for n in cluster.nodes}
    # What the rule KubenurseClusterDNSFailing computes, on these real series: every node.
    share = cluster.prometheus.query(
        'count(sum by (instance) (increase(kubenurse_errors_total{type="dns_cluster"}[1h])) > 0)'
        ' / count(sum by (instance) (kubenurse_httpclient_requests_total{type="dns_cluster"}))'
    )
    assert [float(s["value"][1]) for s in share] == [1.0]


def test_api_server_outage_checks_go_on_and_discovery_recovers(cluster: Cluster) -> None:
    before = settle(cluster)
    cluster.standin.run(lambda s: s.down())
    try:
        wait_until(lambda: all(cluster.alive(n)["discovery"]["stale"] for n in cluster.nodes),
                   15, "every probe's discovery marked stale", cluster.diagnostics)

        def reported() -> bool:
            errors = series(cluster, 'kubenurse_errors_total{type=~"api_server_.*"}', "type", "event")
            return all(errors.get((n.name, t, "connect_done"), 0) > before.errors.get((n.name, t, "connect_done"), 0)
                       for n in cluster.nodes for t in ("api_server_direct", "api_server_dns"))

        wait_until(reported, 15, "both API-server checks failing at connect on every probe", cluster.diagnostics)
        outage_start = Snapshot.take(cluster)
        time.sleep(2.0)
        wait_scraped(cluster)
        during = Snapshot.take(cluster)
        for node in cluster.nodes:
            alive = cluster.alive(node)
            assert alive["discovery"]["stale"] is True
            paths = {k: v for k, v in alive["last_check_result"].items() if k.startswith("path_")}
            assert set(paths) == {f"path_{n}" for n in cluster.neighbours_of(node.name)}, "neighbours kept"
            assert set(paths.values()) == {"ok"}, paths
    finally:
        cluster.standin.run(lambda s: s.up())
    after = settle(cluster, timeout=40)

    progressed = delta(outage_start.requests, during.requests)
    for node in cluster.nodes:
        for neighbour in cluster.neighbours_of(node.name):
            assert progressed.get((node.name, f"path_{neighbour}", "200"), 0) >= 2, "neighbour checks went on"
    changed = delta(before.errors, after.errors)
    assert {t for (_n, t, _e) in changed} == {"api_server_direct", "api_server_dns"}, changed
    assert {e for (_n, _t, e) in changed} == {"connect_done"}, changed
    for node in cluster.nodes:
        assert cluster.alive(node)["discovery"]["stale"] is False


def test_collector_outage_does_not_touch_checks_and_traces_resume(cluster: Cluster) -> None:
    before = settle(cluster)
    with cluster.collector_down():
        time.sleep(0.3)  # exports already relayed finish landing
        cluster.receiver.clear()
        time.sleep(3.0)
        assert cluster.receiver.received() == [], "the collector was down, yet something arrived"
        wait_scraped(cluster)
        during = Snapshot.take(cluster)
    restored_ns = time.time_ns()
    assert delta(before.errors, during.errors) == {}, "checks failed while only the collector was down"
    progressed = delta(before.requests, during.requests)
    for node in cluster.nodes:
        assert {t for (n, t, _c) in progressed if n == node.name} == check_types(cluster, node.name)

    def resumed() -> bool:
        spans = spans_of(cluster.receiver.spans(), after_ns=restored_ns)
        return all(any(s.kind == "CLIENT" for s in spans_of(spans, pod=n.pod)) for n in cluster.nodes)

    wait_until(resumed, 30, "new check spans from every probe after the collector came back", cluster.diagnostics)
    after = settle(cluster)
    assert delta(before.errors, after.errors) == {}
