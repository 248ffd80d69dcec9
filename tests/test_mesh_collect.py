"""Asking the other probes, against real local HTTP servers (one per pretend pod IP, all on
one port as in a cluster): only listed peers, whole reports, and the mesh document."""

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
    Gathered,
    MeshView,
    Peer,
    evidence_from,
    gather_reports,
    mesh_document,
    peer,
)
from probe.mesh.report import BadReport, Report, ReportResult, Unreached, own_report, parse
from probe.mesh.verdicts import judge
from probe.neighbours import Neighbour, Neighbourhood
from tests.test_discovery import add_neighbour, api, in_cluster, sa_dir, source, started  # noqa: F401 - fixtures
from tests.test_discovery import eventually as discovery_eventually

TRACE = "0af7651916cd43dd8448eb211c80319c"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.3.1", 0))
        return int(s.getsockname()[1])


def ip(i: int) -> str:
    return f"127.0.3.{i}"


def report(i: int, checks: list[int], failing: set[int] = frozenset()) -> Report:  # type: ignore[assignment]
    return Report(
        f"n{i}", f"pod-{i}", True, None, 1.0,
        (
            *(
                ReportResult(f"path_n{j}", j not in failing, None if j in failing else 0.001,
                             "connect_done" if j in failing else None, TRACE, f"n{j}")
                for j in checks
            ),
            ReportResult("api_server_direct", True, 0.002),
        ),
    )


def listed(*indices: int) -> list[Peer]:
    return [peer(f"n{i}", f"pod-{i}", ip(i)) for i in indices]


def ring(n: int, limit: int) -> dict[int, list[int]]:
    return {i: [((i - 1 + k) % n) + 1 for k in range(1, limit + 1)] for i in range(1, n + 1)}


@pytest.fixture
async def pods() -> AsyncIterator[Callable[..., Any]]:
    """Start a server at ip(i) answering every path with `handler`; `pods.asked` records
    every request any of them received, as (i, path)."""
    port = free_port()
    runners: list[web.AppRunner] = []
    asked: list[tuple[int, str]] = []

    async def start(i: int, handler: Callable[[web.Request], Any]) -> None:
        async def recording(request: web.Request) -> Any:
            asked.append((i, request.path_qs))
            return await handler(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", recording)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, ip(i), port).start()
        runners.append(runner)

    start.port = port  # type: ignore[attr-defined]
    start.asked = asked  # type: ignore[attr-defined]
    yield start
    for runner in runners:
        await runner.cleanup()


def serving(body: Report | bytes) -> Callable[[web.Request], Any]:
    raw = body.encode() if isinstance(body, Report) else body

    async def handler(_r: web.Request) -> web.Response:
        return web.Response(body=raw, content_type="application/json")

    return handler


async def gather(own: Report, peers: list[Peer], port: int, **kwargs: Any) -> Gathered:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        return await gather_reports(own, session, port=port, peers=peers, **kwargs)


async def test_every_listed_probe_is_asked_once_and_no_one_else(pods) -> None:  # type: ignore[no-untyped-def]
    lists = ring(12, 2)
    for i in range(2, 13):
        await pods(i, serving(report(i, lists[i])))
    gathered = await gather(report(1, lists[1]), listed(*range(2, 13)), pods.port, concurrency=4)
    assert sorted(gathered.reports) == sorted(f"n{i}" for i in range(1, 13))
    assert sorted(pods.asked) == [(i, REPORT_PATH) for i in range(2, 13)], "every probe asked exactly once"
    assert not gathered.unreached and not gathered.capped
    evidence = evidence_from(gathered)
    assert len(evidence.paths) == 24 and all(p.ok for p in evidence.paths)
    assert [v.kind for v in judge(evidence)] == ["ok"]


async def test_unanswering_wrong_and_garbage_probes_are_unreached_in_words(pods) -> None:  # type: ignore[no-untyped-def]
    async def hang(_r: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.json_response({})

    async def error(_r: web.Request) -> web.Response:
        return web.Response(status=500, text="Traceback (most recent call last): secrets")

    await pods(2, serving(b"<html>not json"))
    await pods(3, serving(report(9, [])))
    await pods(4, hang)
    await pods(6, error)
    # ip(5) listens nowhere: connection refused.
    own = report(1, [2, 3, 4, 5, 6], failing={5})
    started = asyncio.get_running_loop().time()
    gathered = await gather(own, listed(2, 3, 4, 5, 6), pods.port, timeout=0.5)
    assert asyncio.get_running_loop().time() - started < 5, "a hanging probe costs one timeout"
    assert gathered.unreached == {
        "n2": Unreached.INVALID, "n3": Unreached.IMPOSTOR, "n4": Unreached.TIMEOUT,
        "n5": Unreached.REFUSED, "n6": Unreached.STATUS,
    }
    document = mesh_document(evidence_from(gathered), [], source="pod-1", generated_at=0)
    nodes = document["nodes"]
    assert [n["reached"] for n in nodes] == [True, False, False, False, False, False]  # type: ignore[index]
    reasons = {n["node"]: n.get("unreached_reason") for n in nodes}  # type: ignore[union-attr]
    assert reasons["n5"] == "connection refused (no probe listening)"
    assert reasons["n4"] == "no answer in time"
    assert "Traceback" not in json.dumps(document) and "Error" not in json.dumps(document)


async def test_cap_limits_how_many_are_asked(pods) -> None:  # type: ignore[no-untyped-def]
    for i in range(2, 11):
        await pods(i, serving(report(i, [])))
    gathered = await gather(report(1, []), listed(*range(2, 11)), pods.port, cap=3)
    assert len(gathered.reports) == 4 and gathered.capped
    assert list(gathered.unreached.values()) == [Unreached.NOT_ASKED] * 6


def test_trace_links_come_from_the_template() -> None:
    target = Target("path_n2", "http://127.0.0.3:8080/alwayshappy", neighbour=Neighbour("pod-2", "127.0.0.3", "", "n2"))
    refused = Failure("connect_done", "ClientConnectorError", "connection refused")
    failed = CheckResult(check_type="path_n2", target=target, failure=refused, trace_id="ab" * 16)
    skipped = CheckResult(check_type="me_ingress", skip=Skip(Why.NOT_SET, "KUBENURSE_INGRESS_URL"))
    last = Round({"path_n2": failed, "me_ingress": skipped}, Neighbourhood(neighbours=(target.neighbour,)), 0.0, 0.1)
    own = own_report(last, node="n1", pod="pod-1", now=1.0)
    assert [r.type for r in own.results] == ["path_n2"], "skipped checks are no evidence"
    assert parse(own.encode()) == own, "written and read by the same code"
    evidence = evidence_from(Gathered(own, reports={"n1": own}, peers={"n2": peer("n2", "pod-2", "127.0.0.3")}))
    document = mesh_document(
        evidence, judge(evidence), source="pod-1", generated_at=0, trace_url_template="https://grafana/explore?t={trace_id}"
    )
    (path,) = document["paths"]  # type: ignore[misc]
    assert path["trace_url"] == "https://grafana/explore?t=" + "ab" * 16
    assert path["error_event"] == "connect_done" and path["ok"] is False and path["state"] == "failing"
    plain = mesh_document(evidence, [], source="pod-1", generated_at=0)
    assert plain["paths"][0]["trace_url"] is None  # type: ignore[index]


async def test_viewers_share_one_view_encoded_once() -> None:
    calls = 0

    def own() -> Report:
        nonlocal calls
        calls += 1
        return report(1, [])

    view = MeshView(own, source="pod-1", port=1, max_age=5)
    try:
        views = await asyncio.gather(*(view.view() for _ in range(10)))
        await view.view()
    finally:
        await view.close()
    assert calls == 1
    assert all(v.plain is views[0].plain and v.gzipped is views[0].gzipped for v in views)
    import gzip

    assert gzip.decompress(views[0].gzipped) == views[0].plain


# --- peer reports are untrusted input -----------------------------------------------------------


def good(i: int) -> dict[str, Any]:
    return json.loads(report(i, [1, 3]).encode())


FORGERIES: dict[str, Callable[[dict[str, Any]], object]] = {
    "NaN latency": lambda r: r["results"][0].update(latency_seconds=float("nan")),
    "Infinity latency": lambda r: r["results"][0].update(latency_seconds=float("inf")),
    "negative latency": lambda r: r["results"][0].update(latency_seconds=-1),
    "huge latency": lambda r: r["results"][0].update(latency_seconds=1e300),
    "escape in a node name": lambda r: r["results"][0].update(to="n1\x1b[2J\x1b[31mOK"),
    "escape in a check type": lambda r: r["results"].append({"type": "x\x1b]0;pwned\x07", "ok": False}),
    "escape in an event": lambda r: r["results"][0].update(ok=False, error_event="\x1b[2Jboom"),
    "sentence as an event": lambda r: r["results"][0].update(ok=False, error_event="your cluster is fine"),
    "trace id not hex": lambda r: r["results"][0].update(trace_id="x" * 32),
    "trace id too short": lambda r: r["results"][0].update(trace_id="ab" * 8),
    "trace id as a URL": lambda r: r["results"][0].update(trace_id="0af7651916cd43dd8448eb211c80319c/../x"),
    "too many fields": lambda r: r["results"][0].update({f"x{i}": i for i in range(40)}),
    "string ok": lambda r: r["results"][0].update(ok="true"),
    "not an object": lambda r: r["results"].__setitem__(0, ["path_n1"]),
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_forged_reports_are_refused(name: str) -> None:
    forged = good(2)
    FORGERIES[name](forged)
    body = json.dumps(forged).encode()
    with pytest.raises(BadReport):
        parse(body)


async def test_a_liar_changes_only_its_own_row(pods) -> None:  # type: ignore[no-untyped-def]
    """n2 answers each forgery in turn; the document outside n2's row is the same as when
    n2 answers honestly, and it stays valid JSON (no NaN can reach it)."""
    checks = {1: [2, 3], 3: [1, 2], 4: [1, 2, 3]}
    answer: dict[str, bytes] = {}

    async def liar(_r: web.Request) -> web.Response:
        return web.Response(body=answer["body"], content_type="application/json")

    await pods(2, liar)
    for i in (3, 4):
        await pods(i, serving(report(i, checks[i])))
    await pods(9, serving(report(9, [])))  # not listed: must never be asked

    async def document() -> dict[str, Any]:
        gathered = await gather(report(1, checks[1]), listed(2, 3, 4), pods.port)
        evidence = evidence_from(gathered)
        text = json.dumps(mesh_document(evidence, judge(evidence), source="pod-1", generated_at=0), allow_nan=False)
        return json.loads(text)

    def outside_n2(doc: dict[str, Any]) -> object:
        return (
            [n for n in doc["nodes"] if n["node"] != "n2"],
            [p for p in doc["paths"] if p["from"] != "n2"],
            [c for c in doc["checks"] if c["node"] != "n2"],
        )

    answer["body"] = report(2, [1, 3]).encode()
    honest = await document()
    assert [v["kind"] for v in honest["verdicts"]] == ["ok"]
    def forged_body(forge: Callable[[dict[str, Any]], object]) -> Callable[[], bytes]:
        def body() -> bytes:
            r = good(2)
            forge(r)
            return json.dumps(r).encode()

        return body

    lies = {name: forged_body(forge) for name, forge in FORGERIES.items()}
    # Valid reports that lie: every path of n2 fails, towards nodes that work, and towards
    # names discovery does not list.
    lies["says n1 and n3 are down"] = lambda: report(2, [1, 3], failing={1, 3}).encode()
    lies["names unlisted nodes"] = lambda: Report("n2", "pod-2", results=(
        ReportResult("path_n9", False, None, "connect_done", None, "n9"),
        ReportResult("path_127.9.9.9", False, None, "connect_done"),
    )).encode()
    lies["claims to be n3"] = lambda: report(3, [1]).encode()
    # Fields this version does not read (a newer probe's) are left unread: no neighbour list
    # of a peer's is ever an address to ask.
    lies["lists a neighbour to ask"] = forged_body(
        lambda r: r.update(neighbours=[{"node": "n9", "pod": "x", "pod_ip": ip(9)}], version="9")
    )
    for name, lie in lies.items():
        answer["body"] = lie()
        forged = await document()
        assert outside_n2(forged) == outside_n2(honest), name
        for v in forged["verdicts"]:
            assert v["kind"] in ("ok", "path_broken", "node_isolated"), (name, v)
            assert v["kind"] == "ok" or "n2" in v["subject"], (name, v)
        assert all(p["to"] in ("n1", "n2", "n3", "n4") for p in forged["paths"]), name
    assert {i for i, _ in pods.asked} == {2, 3, 4}


async def test_an_address_that_is_not_an_ip_is_never_asked(pods) -> None:  # type: ignore[no-untyped-def]
    await pods(9, serving(b"{}"))
    bad = [
        peer("n2", "pod-2", f"{ip(9)}/via-pod-ip?x="),
        peer("n3", "pod-3", "localhost"),
        peer("n4", "pod-4", f"{ip(9)}:{pods.port}"),
        peer("n5", "pod-5", f"{ip(9)}#"),
        peer("n6", "pod-6", "fe80::1%lo/x"),
        peer("n7", "pod-7", "fe80::1%lo"),
        peer("n8", "pod-8", ""),
    ]
    gathered = await gather(report(1, []), bad, pods.port)
    assert set(gathered.unreached.values()) == {Unreached.NO_ADDRESS}
    assert pods.asked == []


async def test_a_redirect_is_not_followed(pods) -> None:  # type: ignore[no-untyped-def]
    async def redirect(_r: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://{ip(9)}:{pods.port}/internal/secret")

    async def internal(_r: web.Request) -> web.Response:
        return web.Response(body=report(2, []).encode(), content_type="application/json")

    await pods(2, redirect)
    await pods(9, internal)
    gathered = await gather(report(1, []), listed(2), pods.port)
    assert gathered.unreached == {"n2": Unreached.STATUS}
    assert pods.asked == [(2, REPORT_PATH)]


async def test_a_gzip_bomb_is_not_inflated(pods) -> None:  # type: ignore[no-untyped-def]
    import gzip
    import resource

    member = gzip.compress(b"\0" * (1 << 20), compresslevel=9)
    bomb = member * 1024  # 1 GiB inflated, ~1 MB on the wire

    async def handler(_r: web.Request) -> web.Response:
        return web.Response(body=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    await pods(2, handler)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gathered = await gather(report(1, []), listed(2), pods.port)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert gathered.unreached == {"n2": Unreached.ENCODED}
    assert grown_mb < 64, f"max RSS grew {grown_mb:.0f} MB"
    # The same bytes without the header: not JSON, refused; and through a MeshView's own session.
    view = MeshView(lambda: report(1, []), peers=lambda: listed(2), source="pod-1", port=pods.port)
    try:
        document = json.loads((await view.view()).plain)
    finally:
        await view.close()
    assert document["nodes"][1]["unreached_reason"] == "report in an encoding the probe does not accept"


async def test_a_report_above_the_cap_is_refused(pods) -> None:  # type: ignore[no-untyped-def]
    huge = b'{"node":"n2","pod":"pod-2","results":[' + b" " * (3 << 20) + b"]}"
    await pods(2, serving(huge))
    gathered = await gather(report(1, []), listed(2), pods.port)
    assert gathered.unreached == {"n2": Unreached.TOO_LARGE}


def big_report(i: int, size: int) -> bytes:
    results = []
    n = 0
    while True:
        results.append(ReportResult(f"path_n{i}x{n}", True, 0.001234, None, TRACE, f"n{i}x{n}"))
        n += 1
        body = Report(f"n{i}", f"pod-{i}", results=tuple(results)).encode()
        if len(body) >= size:
            return body


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_100kb_report_in_4kb_pieces_is_read_whole_every_time(chunked: bool) -> None:
    """A server that writes its answer 4 KB at a time with a pause between pieces, as a
    1,500-byte-MTU network delivers a large report: the reader must wait for the end."""
    body = big_report(2, 100 * 1024)
    assert len(body) >= 100 * 1024
    served = 0

    async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await reader.readuntil(b"\r\n\r\n")
        head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
        head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode())
        for start in range(0, len(body), 4096):
            piece = body[start:start + 4096]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            await writer.drain()
            await asyncio.sleep(0.002)
        if chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        served += 1
        writer.close()

    port = free_port()
    server = await asyncio.start_server(dribble, ip(2), port)
    for s in server.sockets:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            for _ in range(10):
                gathered = await gather_reports(report(1, []), session, port=port, peers=listed(2))
                assert not gathered.unreached, gathered.unreached
                assert len(gathered.reports["n2"].results) > 500
    finally:
        server.close()
        await server.wait_closed()
    assert served == 10


# --- discovery lists the peers ------------------------------------------------------------------


async def test_discovery_lists_every_pod_and_which_may_be_checked(api, sa_dir) -> None:  # type: ignore[no-untyped-def] # noqa: F811
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
        await discovery_eventually(lambda: len(src.listed()) == 7, "the cordoned pod listed")
        assert [(n.pod_name, checked) for n, checked in src.listed() if not checked] == [("cordoned", False)]
        api.uncordon("node-c")
        await discovery_eventually(lambda: len(src.eligible()) == 7, "uncordoned pod eligible")
        assert all(checked for _, checked in src.listed())
