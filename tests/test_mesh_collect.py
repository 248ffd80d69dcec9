"""Asking the other probes: the walk over neighbour lists against real local HTTP servers
(one per pretend pod IP, all on one port as in a cluster), and the mesh document."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from probe.checks.result import CheckResult, Failure, Skip, Target, Why
from probe.checks.rounds import Round
from probe.mesh.collect import (
    REPORT_PATH,
    MeshView,
    Peer,
    evidence_from,
    gather_reports,
    mesh_document,
    own_report,
)
from probe.mesh.verdicts import judge
from probe.neighbours import Neighbour, Neighbourhood
from tests.test_discovery import add_neighbour, api, in_cluster, sa_dir, source, started  # noqa: F401 - fixtures
from tests.test_discovery import eventually as discovery_eventually


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.3.1", 0))
        return int(s.getsockname()[1])


def ip(i: int) -> str:
    return f"127.0.3.{i}"


def report(i: int, neighbours: list[int], failing: set[int] = frozenset()) -> dict[str, Any]:  # type: ignore[assignment]
    return {
        "node": f"n{i}",
        "pod": f"pod-{i}",
        "ready": True,
        "neighbours": [{"node": f"n{j}", "pod": f"pod-{j}", "pod_ip": ip(j)} for j in neighbours],
        "results": [
            {"type": f"path_n{j}", "to": f"n{j}", "ok": j not in failing, "latency_seconds": 0.001,
             "error_event": "connect_done" if j in failing else None, "trace_id": "0af7651916cd43dd8448eb211c80319c"}
            for j in neighbours
        ]
        + [{"type": "api_server_direct", "ok": True, "latency_seconds": 0.002, "error_event": None}],
    }


@pytest.fixture
async def pods() -> AsyncIterator[Callable[..., Any]]:
    """Start a report server at ip(i) answering `handler`."""
    port = free_port()
    runners: list[web.AppRunner] = []

    async def start(i: int, handler: Callable[[web.Request], Any]) -> None:
        app = web.Application()
        app.router.add_get(REPORT_PATH, handler)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, ip(i), port).start()
        runners.append(runner)

    start.port = port  # type: ignore[attr-defined]
    yield start
    for runner in runners:
        await runner.cleanup()


def ring(n: int, limit: int) -> dict[int, list[int]]:
    return {i: [((i - 1 + k) % n) + 1 for k in range(1, limit + 1)] for i in range(1, n + 1)}


async def test_walk_reaches_every_probe_through_the_neighbour_lists(pods) -> None:  # type: ignore[no-untyped-def]
    # 12 probes, each checks the next 2: probe 1 knows only 2 and 3, and still sees everyone.
    lists = ring(12, 2)
    asked: list[int] = []
    for i in range(2, 13):
        async def handler(_r: web.Request, i: int = i) -> web.Response:
            asked.append(i)
            return web.json_response(report(i, lists[i]))

        await pods(i, handler)
    async with aiohttp.ClientSession() as session:
        gathered = await gather_reports(report(1, lists[1]), session, port=pods.port, concurrency=4)
    assert sorted(gathered.reports) == sorted(f"n{i}" for i in range(1, 13))
    assert sorted(asked) == list(range(2, 13)), "every probe asked exactly once"
    assert not gathered.unreached and not gathered.capped
    evidence = evidence_from(gathered)
    assert len(evidence.paths) == 24 and all(p.ok for p in evidence.paths)
    assert [v.kind for v in judge(evidence)] == ["ok"]


async def test_unanswering_wrong_and_garbage_probes_are_unreached(pods) -> None:  # type: ignore[no-untyped-def]
    async def garbage(_r: web.Request) -> web.Response:
        return web.Response(text="<html>not json")

    async def impostor(_r: web.Request) -> web.Response:
        return web.json_response(report(9, []))

    async def hang(_r: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.json_response({})

    await pods(2, garbage)
    await pods(3, impostor)
    await pods(4, hang)
    # ip(5) listens nowhere: connection refused.
    own = report(1, [2, 3, 4, 5], failing={5})
    async with aiohttp.ClientSession() as session:
        started = asyncio.get_running_loop().time()
        gathered = await gather_reports(own, session, port=pods.port, timeout=0.5)
        took = asyncio.get_running_loop().time() - started
    assert took < 5, "a hanging probe costs one timeout"
    assert set(gathered.unreached) == {"n2", "n3", "n4", "n5"}
    assert gathered.unreached["n2"].startswith("bad report")
    assert "answered as 'n9'" in gathered.unreached["n3"]
    document = mesh_document(
        evidence_from(gathered), [], source="pod-1", generated_at=0, unreached=gathered.unreached
    )
    assert [n["reached"] for n in document["nodes"]] == [True, False, False, False, False]  # type: ignore[index]


async def test_cap_limits_how_many_are_asked(pods) -> None:  # type: ignore[no-untyped-def]
    lists = ring(10, 9)
    for i in range(2, 11):
        async def handler(_r: web.Request, i: int = i) -> web.Response:
            return web.json_response(report(i, lists[i]))

        await pods(i, handler)
    async with aiohttp.ClientSession() as session:
        gathered = await gather_reports(report(1, lists[1]), session, port=pods.port, cap=4)
    assert len(gathered.reports) == 4 and gathered.capped


def test_trace_links_come_from_the_template() -> None:
    target = Target("path_n2", "http://127.0.0.3:8080/alwayshappy", neighbour=Neighbour("pod-2", "127.0.0.3", "", "n2"))
    refused = Failure("connect_done", "ClientConnectorError", "connection refused")
    failed = CheckResult(check_type="path_n2", target=target, failure=refused, trace_id="ab" * 16)
    skipped = CheckResult(check_type="me_ingress", skip=Skip(Why.NOT_SET, "KUBENURSE_INGRESS_URL"))
    last = Round({"path_n2": failed, "me_ingress": skipped}, Neighbourhood(neighbours=(target.neighbour,)), 0.0, 0.1)
    own = own_report(last, node="n1", pod="pod-1", ready=True, now=1.0)
    assert [r["type"] for r in own["results"]] == ["path_n2"], "skipped checks are no evidence"
    from probe.mesh.collect import Gathered

    evidence = evidence_from(Gathered(reports={"n1": own}))
    document = mesh_document(
        evidence, judge(evidence), source="pod-1", generated_at=0, trace_url_template="https://grafana/explore?t={trace_id}"
    )
    (path,) = document["paths"]  # type: ignore[misc]
    assert path["trace_url"] == "https://grafana/explore?t=" + "ab" * 16
    assert path["error_event"] == "connect_done" and path["ok"] is False
    plain = mesh_document(evidence, [], source="pod-1", generated_at=0)
    assert plain["paths"][0]["trace_url"] is None  # type: ignore[index]


async def test_viewers_share_one_walk() -> None:
    calls = 0

    def own() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return report(1, [])

    view = MeshView(own, source="pod-1", port=1, max_age=5)
    try:
        documents = await asyncio.gather(*(view.document() for _ in range(10)))
        await view.document()
    finally:
        await view.close()
    assert calls == 1
    assert all(json.dumps(d) == json.dumps(documents[0]) for d in documents)


async def test_seeds_reach_probes_nobody_lists(pods) -> None:  # type: ignore[no-untyped-def]
    # Probe 1 checks only 2; 3 is checked by nobody (e.g. the probes before it are down),
    # but discovery knows it is eligible: it is asked too.
    async def two(_r: web.Request) -> web.Response:
        return web.json_response(report(2, []))

    async def three(_r: web.Request) -> web.Response:
        return web.json_response(report(3, []))

    await pods(2, two)
    await pods(3, three)
    seeds = [Peer("n2", "pod-2", ip(2)), Peer("n3", "pod-3", ip(3))]
    async with aiohttp.ClientSession() as session:
        without = await gather_reports(report(1, [2]), session, port=pods.port)
        with_seeds = await gather_reports(report(1, [2]), session, port=pods.port, seeds=seeds)
    assert sorted(without.reports) == ["n1", "n2"]
    assert sorted(with_seeds.reports) == ["n1", "n2", "n3"]


async def test_discovery_lists_every_eligible_pod_beyond_the_limit(api, sa_dir) -> None:  # type: ignore[no-untyped-def] # noqa: F811
    for i in range(6):
        add_neighbour(api, f"p{i}", f"node-{i}", f"10.0.0.{i + 2}")
    add_neighbour(api, "cordoned", "node-c", "10.0.0.99")
    api.cordon("node-c")
    async with started(source(in_cluster(api, sa_dir, neighbour_limit=2))) as discovery:
        src = discovery.kube_neighbours
        assert src is not None
        await discovery_eventually(lambda: len(src.current().neighbours) == 2, "two neighbours")
        everyone = src.eligible()
        assert sorted(n.pod_name for n in everyone) == [f"p{i}" for i in range(6)]
        assert src.eligible() is everyone, "cached while nothing changed"
        api.uncordon("node-c")
        await discovery_eventually(lambda: len(src.eligible()) == 7, "uncordoned pod eligible")
