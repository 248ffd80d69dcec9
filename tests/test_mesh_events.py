"""Kubernetes Events on the culprit node: which verdicts become which Events, who reports,
and the POSTs against a real HTTPS endpoint with the service-account token and CA."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from probe.discovery.kube import ServiceAccount
from probe.mesh.collect import View
from probe.mesh.events import NodeEventReporter, is_reporter, node_events
from probe.mesh.verdicts import Evidence, NodeView, PathView, Verdict, judge

TOKEN = "token-for-events"


def test_only_node_verdicts_we_are_fairly_sure_of_become_events() -> None:
    verdicts = [
        Verdict("node_unreachable", "node-3", "sure", "node-3 is unreachable.", ("3 of 3 probes fail",)),
        Verdict("node_unreachable", "node-4", "unsure", "node-4 may be unreachable.", ()),
        Verdict("node_slow", "node-5", "likely", "node-5 answers slowly.", ("median 200 ms",)),
        Verdict("api_server", "api-server", "sure", "The API server is down.", ()),
        Verdict("node_lossy", "node-6", "sure", "node-6 loses packets.", ("n1 -> node-6: 12 of 100",)),
        Verdict("path_lossy", "node-1->node-2", "likely", "The path loses packets.", ()),
        Verdict("node_mtu", "node-7", "likely", "node-7 drops full-size packets.", ()),
        Verdict("ok", "cluster", "sure", "Nothing is wrong.", ()),
    ]
    events = node_events(verdicts, namespace="kubenurse", reporter_node="node-1", reporter_pod="p1", now=6000.0)
    assert [(e["involvedObject"]["name"], e["reason"]) for e in events] == [
        ("node-3", "KubenurseNodeUnreachable"),
        ("node-5", "KubenurseNodeSlow"),
        ("node-6", "KubenurseNodeLossy"),
        ("node-7", "KubenurseNodeMTU"),
    ]
    first = events[0]
    # As the kubelet does, so `kubectl describe node` finds it: uid = node name, type Warning.
    assert first["involvedObject"] == {"apiVersion": "v1", "kind": "Node", "name": "node-3", "uid": "node-3"}
    assert first["type"] == "Warning" and first["metadata"]["namespace"] == "kubenurse"
    assert "3 of 3 probes fail" in first["message"]
    again = node_events(verdicts, namespace="kubenurse", reporter_node="node-2", reporter_pod="p2", now=6599.0)
    later = node_events(verdicts, namespace="kubenurse", reporter_node="node-1", reporter_pod="p1", now=6600.0)
    assert again[0]["metadata"]["name"] == first["metadata"]["name"], "same window: same name, one Event"
    assert later[0]["metadata"]["name"] != first["metadata"]["name"], "next window: a new Event"


def test_the_first_three_nodes_by_name_report() -> None:
    others = ["node-b", "node-c", "node-d", "node-e"]
    assert is_reporter("node-a", others)
    assert is_reporter("node-c", ["node-a", "node-b", "node-d"])
    assert not is_reporter("node-d", ["node-a", "node-b", "node-c"])


class FakeView:
    """A view with node-3 unreachable (hand-written evidence through the real judge)."""

    async def view(self) -> View:
        nodes = ["node-1", "node-2", "node-3"]
        paths = [
            PathView("node-1", "node-2", True, 0.001), PathView("node-2", "node-1", True, 0.001),
            PathView("node-1", "node-3", False, None, "connect_done"),
            PathView("node-2", "node-3", False, None, "connect_done"),
        ]
        evidence = Evidence([NodeView(n, reached=n != "node-3") for n in nodes], paths, [])
        return View(tuple(judge(evidence)), b"", b"", 0.0)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[ServiceAccount, list[dict[str, Any]]]]:
    """An HTTPS events endpoint with Kubernetes' create semantics (201, then 409 for a name)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    created: list[dict[str, Any]] = []

    async def create(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        event = await request.json()
        if any(e["metadata"]["name"] == event["metadata"]["name"] for e in created):
            return web.json_response({"kind": "Status", "reason": "AlreadyExists", "code": 409}, status=409)
        assert request.match_info["namespace"] == event["metadata"]["namespace"]
        created.append(event)
        return web.json_response(event, status=201)

    app = web.Application()
    app.router.add_post("/api/v1/namespaces/{namespace}/events", create)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    (tmp_path / "token").write_text(TOKEN)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    (tmp_path / "namespace").write_text("kubenurse")
    credentials = ServiceAccount(str(tmp_path), "127.0.0.1", port)
    await credentials.load()
    yield credentials, created
    await runner.cleanup()


async def test_reporters_post_one_event_per_culprit(api) -> None:  # type: ignore[no-untyped-def]
    credentials, created = api

    def reporter(node: str) -> NodeEventReporter:
        return NodeEventReporter(
            credentials, FakeView(), namespace="kubenurse", pod=f"kubenurse-{node}",  # type: ignore[arg-type]
            own_node=lambda: node, eligible_nodes=lambda: ["node-1", "node-2", "node-3", "node-4", "node-5"],
            clock=lambda: 1_800_000_000.0,
        )

    first, second, bystander = reporter("node-1"), reporter("node-2"), reporter("node-5")
    try:
        assert len(await first.run_once()) == 1
        assert await second.run_once() == [], "the same Event: 409, not a second copy"
        assert list(second.posted.values()) == [409]
        assert await bystander.run_once() == [] and not bystander.posted, "not a reporter: no view, no POST"
    finally:
        for r in (first, second, bystander):
            await r.close()
    (event,) = created
    assert event["involvedObject"]["name"] == "node-3" and event["reason"] == "KubenurseNodeUnreachable"
    assert event["source"] == {"component": "kubenurse", "host": "node-1"}
    assert "did not answer the mesh request" in event["message"]


async def test_a_dead_api_server_is_logged_not_raised(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN)
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    credentials = ServiceAccount(str(tmp_path), "127.0.0.1", 9)
    await credentials.load()
    reporter = NodeEventReporter(
        credentials, FakeView(), namespace="kubenurse", pod="p1",  # type: ignore[arg-type]
        own_node=lambda: "node-1", eligible_nodes=lambda: ["node-2", "node-3"],
    )
    try:
        assert await reporter.run_once() == []
        assert list(reporter.posted.values()) == [0]
    finally:
        await reporter.close()


def test_probe_wiring_needs_the_setting_and_credentials(tmp_path: Path) -> None:
    from probe.app import node_event_reporter
    from probe.mesh.routes import add_routes
    from probe.neighbours import StaticNeighbours
    from probe.settings import Settings

    def app_for(settings: Settings) -> web.Application:
        app = web.Application()
        add_routes(app, settings, last_round=lambda: None, neighbourhood=hood.current, not_ready=lambda: None)
        return app

    hood = StaticNeighbours.unavailable("test")
    off = Settings(pod_namespace="kubenurse")
    assert node_event_reporter(off, app_for(off), hood) is None
    nowhere = Settings(node_events=True, pod_namespace="kubenurse")
    assert node_event_reporter(nowhere, app_for(nowhere), hood) is None, "not in a cluster: off, with a warning"
    (tmp_path / "token").write_text(TOKEN)
    in_cluster = Settings(
        node_events=True, pod_namespace="kubenurse", kubernetes_service_host="127.0.0.1",
        serviceaccount_dir=str(tmp_path),
    )
    assert isinstance(node_event_reporter(in_cluster, app_for(in_cluster), hood), NodeEventReporter)
