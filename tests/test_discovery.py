"""Discovery against the API-server stand-in: list once, then watch; 410s, outages, token
rotation, readiness, identity, KUBECONFIG, and a real Probe checking real neighbour servers
on 127.0.0.x (all on the probe's own port, as neighbours are checked on the same port)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import socket
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web

from kubenurse_sandbox.standin import ApiServerStandin
from probe.app import Probe
from probe.discovery import Fixed, make_discovery
from probe.discovery.cache import Reflector, Timing, iter_list
from probe.discovery.kube import ApiError, KubeClient, Kubeconfig, ServiceAccount
from probe.discovery.source import KubeDiscovery, node_info, pod_info
from probe.neighbours import StaticNeighbours, ring_hash
from probe.settings import ExtraCheck, Settings

NS = "kubenurse"
LABELS = {"app.kubernetes.io/name": "kubenurse"}
FILTER = "app.kubernetes.io/name=kubenurse"
ME, MY_NODE = "kubenurse-me", "node-me"
#: Everything short: watches end every second or two, retries within a quarter second.
#: Bookmarks come every 0.2 s, so 1.5 s of silence means a stuck stream: the stand-in's
#: watch can stall when a bookmark falls due with events queued, and the probe must (and
#: does) get over that by itself.
FAST = Timing(
    request_timeout=5.0,
    connect_timeout=2.0,
    watch_seconds=1.0,
    watch_grace=2.0,
    idle_timeout=1.5,
    quiet_after=1.0,
    backoff_initial=0.05,
    backoff_max=0.25,
    healthy_after=0.5,
    initial_sync=5.0,
    qps=500.0,
    burst=500,
)

T = TypeVar("T")


async def eventually(check: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        await asyncio.sleep(0.02)


# The stand-in and the probe's view of it -------------------------------------------------


@pytest.fixture
async def api() -> AsyncIterator[ApiServerStandin]:
    server = ApiServerStandin(bookmark_interval=0.2)
    server.add_node(MY_NODE)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def sa_dir(api: ApiServerStandin, tmp_path: Path) -> Path:
    return api.write_serviceaccount(tmp_path / "serviceaccount", NS)


def add_neighbour(api: ApiServerStandin, name: str, node: str, ip: str, **kwargs: Any) -> None:
    if api.node(node) is None:
        api.add_node(node)
    api.add_pod(name, namespace=NS, node_name=node, pod_ip=ip, labels=LABELS, **kwargs)


def in_cluster(api: ApiServerStandin, sa_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "kubernetes_service_host": "127.0.0.1",
        "kubernetes_service_port": api.port,
        "serviceaccount_dir": str(sa_dir),
        "neighbour_filter": FILTER,
        "pod_name": ME,
        "node_name": MY_NODE,
    }
    values.update(overrides)
    return Settings(**values)


def source(settings: Settings, timing: Timing = FAST) -> KubeDiscovery:
    made = make_discovery(settings, timing=timing)
    assert isinstance(made, KubeDiscovery), made.neighbours.current()
    return made


@contextlib.asynccontextmanager
async def started(src: KubeDiscovery) -> AsyncIterator[KubeDiscovery]:
    await src.start()
    try:
        yield src
    finally:
        await src.stop()


def pod_names(src: KubeDiscovery) -> set[str]:
    return {n.pod_name for n in src.neighbours.current().neighbours}


def has_pod(src: KubeDiscovery, name: str) -> Callable[[], bool]:
    return lambda: name in pod_names(src)


def lists_by_selector(api: ApiServerStandin, kind: str) -> Counter[str]:
    """First pages of lists, by field selector: each node watch lists once (then only watches)."""
    return Counter(
        r.query.get("fieldSelector", "") for r in api.requests if r.kind == kind and r.verb == "list"
        and "continue" not in r.query
    )


def listed_once_each(api: ApiServerStandin) -> bool:
    return api.count("pods", verb="list") == 1 and set(lists_by_selector(api, "nodes").values()) == {1}


def pod_watches_reach(api: ApiServerStandin, count: int) -> Callable[[], bool]:
    return lambda: api.count("pods", verb="watch") >= count


def schedulable_is(src: KubeDiscovery, expected: bool) -> Callable[[], bool]:
    return lambda: src.readiness.node_schedulable() is expected


# Pure pieces: the list walker and the decoders ---------------------------------------------


def test_iter_list_yields_members_and_items_one_at_a_time() -> None:
    text = ' {"kind":"PodList" , "metadata" : {"resourceVersion":"7"},\n "items" : [ {"a":1} ,{"b":[2]} ] }'
    assert list(iter_list(text)) == [
        ("kind", "PodList"),
        ("metadata", {"resourceVersion": "7"}),
        (None, {"a": 1}),
        (None, {"b": [2]}),
    ]
    assert list(iter_list('{"items":[],"metadata":{}}')) == [("metadata", {})]
    assert list(iter_list("{}")) == []
    for broken in ('{"items":[{"a":1}', '{"items":[{"a":1},]}', "[1]", '{"a":1', '{"a" 1}', ""):
        with pytest.raises(ValueError):
            list(iter_list(broken))


def test_decoders_keep_only_what_selection_reads(api: ApiServerStandin) -> None:
    api.add_node("n1", taints=["node.kubernetes.io/unschedulable:NoExecute", "other:NoSchedule"])
    api.add_node("n2", taints=["node.kubernetes.io/unschedulable:NoSchedule"])
    api.add_node("n3", unschedulable=True)
    assert node_info(api.node("n1") or {}).schedulable  # wrong effect, wrong key
    n2, n3 = node_info(api.node("n2") or {}), node_info(api.node("n3") or {})
    assert (n2.unschedulable, n2.unschedulable_taint) == (False, True)
    assert (n3.unschedulable, n3.unschedulable_taint) == (True, False)
    api.add_pod("p", namespace=NS, node_name="n1", pod_ip="10.1.2.3", labels=LABELS)
    api.mark_pod_terminating("p", namespace=NS)
    info = pod_info(api.pod("p", namespace=NS) or {})
    assert (info.name, info.node_name, info.pod_ip, info.phase, info.terminating) == (
        "p", "n1", "10.1.2.3", "Running", True,
    )
    assert info.host_ip.startswith("10.128.")
    empty = pod_info({"metadata": {"name": "x"}})
    assert (empty.node_name, empty.pod_ip, empty.phase, empty.terminating) == ("", "", "", False)


# Where discovery connects to ---------------------------------------------------------------


async def test_neither_in_cluster_nor_kubeconfig_is_skipped_with_the_reason(tmp_path: Path) -> None:
    src = make_discovery(Settings(serviceaccount_dir=str(tmp_path)))
    assert isinstance(src, Fixed) and isinstance(src.neighbours, StaticNeighbours)
    assert src.readiness.node_schedulable()  # nothing to ask: in service
    hood = src.neighbours.current()
    assert hood.skipped
    assert "KUBERNETES_SERVICE_HOST not set" in hood.state and "KUBECONFIG not set" in hood.state
    no_token = make_discovery(Settings(kubernetes_service_host="10.0.0.1", serviceaccount_dir=str(tmp_path)))
    assert no_token.neighbours.current().skipped
    assert f"no service-account token in {tmp_path}" in no_token.neighbours.current().state
    off = make_discovery(Settings(check_neighbourhood=False)).neighbours.current()
    assert off.skipped and "KUBENURSE_CHECK_NEIGHBOURHOOD" in off.state


async def test_in_cluster_wins_over_kubeconfig(api: ApiServerStandin, sa_dir: Path, tmp_path: Path) -> None:
    kubeconfig = str(api.write_kubeconfig(tmp_path / "kubeconfig", NS))
    src = make_discovery(in_cluster(api, sa_dir, kubeconfig=kubeconfig))
    assert isinstance(src, KubeDiscovery) and isinstance(src.credentials, ServiceAccount)
    outside = make_discovery(Settings(kubeconfig=kubeconfig, serviceaccount_dir=str(sa_dir)))
    assert isinstance(outside, KubeDiscovery) and isinstance(outside.credentials, Kubeconfig)


async def test_unknown_namespace_is_skipped_with_the_reason(api: ApiServerStandin, sa_dir: Path) -> None:
    (sa_dir / "namespace").unlink()
    async with started(source(in_cluster(api, sa_dir))) as src:
        hood = src.neighbours.current()
        assert hood.skipped and "KUBENURSE_NAMESPACE not set" in hood.state
        api.cordon(MY_NODE)  # readiness does not need the neighbours' namespace
        await eventually(schedulable_is(src, False), "own node cordoned")
    assert api.count("pods") == 0 and node_watches(api) == {f"metadata.name={MY_NODE}"}


async def test_namespace_defaults_to_pod_namespace_then_serviceaccount(api: ApiServerStandin, sa_dir: Path) -> None:
    add_neighbour(api, "a", "node-a", "10.0.0.2")
    api.add_pod("elsewhere", namespace="other", node_name="node-a", pod_ip="10.0.0.3", labels=LABELS)
    async with started(source(in_cluster(api, sa_dir))) as src:
        assert src.kube_neighbours.namespace == NS and pod_names(src) == {"a"}
    async with started(source(in_cluster(api, sa_dir, pod_namespace="other"))) as src:
        assert src.kube_neighbours.namespace == "other" and pod_names(src) == {"elsewhere"}
    async with started(source(in_cluster(api, sa_dir, namespace="other", pod_namespace=NS))) as src:
        assert src.kube_neighbours.namespace == "other" and pod_names(src) == {"elsewhere"}


async def test_kubeconfig_mode(api: ApiServerStandin, tmp_path: Path) -> None:
    add_neighbour(api, "a", "node-a", "10.0.0.2")
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", NS)
    settings = Settings(kubeconfig=str(kubeconfig), neighbour_filter=FILTER, pod_name=ME, node_name=MY_NODE,
                        serviceaccount_dir=str(tmp_path / "none"))
    async with started(source(settings)) as src:
        hood = src.neighbours.current()
        assert (hood.details["source"], hood.details["namespace"]) == ("kubeconfig", NS)
        assert pod_names(src) == {"a"} and not hood.stale
        add_neighbour(api, "b", "node-b", "10.0.0.3")
        await eventually(lambda: pod_names(src) == {"a", "b"}, "a watched change")
    assert api.count(authorized=False) == 0


async def test_unreadable_kubeconfig_is_skipped_not_a_crash(tmp_path: Path) -> None:
    missing = make_discovery(Settings(kubeconfig=str(tmp_path / "nope")))
    assert isinstance(missing, KubeDiscovery)
    await missing.start()
    assert missing.neighbours.current().skipped and "file not found" in missing.neighbours.current().state
    await missing.stop()
    (tmp_path / "bad").write_text("clusters: [")
    bad = make_discovery(Settings(kubeconfig=str(tmp_path / "bad")))
    await bad.start()
    assert bad.neighbours.current().skipped and "KUBECONFIG=" in bad.neighbours.current().state
    await bad.stop()


# The cache -------------------------------------------------------------------------------


async def test_known_pods_by_name_for_the_incoming_checks(api: ApiServerStandin, sa_dir: Path) -> None:
    add_neighbour(api, "a", "node-a", "10.0.0.2")
    api.add_pod("unlabelled", namespace=NS, node_name="node-a", pod_ip="10.0.0.9")
    async with started(source(in_cluster(api, sa_dir))) as src:
        await eventually(has_pod(src, "a"), "a listed")
        lookup = src.neighbours.pod_ip  # type: ignore[attr-defined]
        assert lookup("a") == "10.0.0.2"
        assert lookup("unlabelled") is None and lookup("invented") is None, "only pods discovery lists"
        api.delete_pod("a", namespace=NS)
        await eventually(lambda: lookup("a") is None, "a forgotten once deleted")


async def test_pods_come_and_go(api: ApiServerStandin, sa_dir: Path) -> None:
    add_neighbour(api, "a", "node-a", "10.0.0.2")
    add_neighbour(api, "b", "node-b", "10.0.0.3")
    api.add_pod(ME, namespace=NS, node_name=MY_NODE, pod_ip="10.0.0.1", labels=LABELS)
    api.add_pod("unlabelled", namespace=NS, node_name="node-a", pod_ip="10.0.0.9")
    async with started(source(in_cluster(api, sa_dir))) as src:
        assert pod_names(src) == {"a", "b"}
        hood = src.neighbours.current()
        assert hood.state == "ok" and not hood.stale and src.readiness.node_schedulable()
        assert src.neighbours.current() is hood  # nothing changed: the same snapshot, no recomputation

        add_neighbour(api, "c", "node-c", "10.0.0.4", phase="Pending")
        await asyncio.sleep(0.3)
        assert pod_names(src) == {"a", "b"}
        api.set_pod_phase("c", "Running", namespace=NS)
        await eventually(lambda: pod_names(src) == {"a", "b", "c"}, "c running")
        api.mark_pod_terminating("a", namespace=NS)
        await eventually(lambda: pod_names(src) == {"b", "c"}, "a terminating")
        api.delete_pod("a", namespace=NS)
        api.update_pod("b", lambda p: p["metadata"]["labels"].clear(), namespace=NS)  # stops matching
        await eventually(lambda: pod_names(src) == {"c"}, "b unlabelled")
        api.cordon("node-c")
        await eventually(lambda: pod_names(src) == set(), "node-c cordoned")
        api.uncordon("node-c")
        await eventually(lambda: pod_names(src) == {"c"}, "node-c back")
        api.delete_node("node-c")
        await eventually(lambda: pod_names(src) == set(), "node-c gone")
        assert src.neighbours.current().details["pods"] == 2  # this pod and c
    # A label selector on the server: the unlabelled pod never reached the probe.
    assert all(r.query.get("labelSelector") == FILTER for r in api.requests if r.kind == "pods")


async def test_one_list_then_only_watches_and_a_410_lists_once_more(api: ApiServerStandin, sa_dir: Path) -> None:
    add_neighbour(api, "a", "node-a", "10.0.0.2")
    add_neighbour(api, "b", "node-b", "10.0.0.3")
    async with started(source(in_cluster(api, sa_dir))) as src:
        # Several server-side watch ends (timeoutSeconds=1) and bookmarks; changes keep flowing.
        for i in range(3):
            add_neighbour(api, f"x{i}", f"node-x{i}", f"10.0.1.{i}")
            await eventually(has_pod(src, f"x{i}"), f"x{i}")
            await eventually(pod_watches_reach(api, i + 2), "watch renewed")
        assert listed_once_each(api)
        watches = [r for r in api.requests if r.verb == "watch"]
        assert all(
            r.query["resourceVersion"] not in ("", "0")
            and r.query["allowWatchBookmarks"] == "true"
            and int(r.query["timeoutSeconds"]) >= 1
            for r in watches
        )

        # History compacted while watching: resuming gets 410 Gone, which means list again.
        api.delete_pod("b", namespace=NS)
        api.compact()
        api.end_watches()
        add_neighbour(api, "c", "node-c", "10.0.0.4")
        await eventually(lambda: pod_names(src) == {"a", "c", "x0", "x1", "x2"}, "state after relist")
        await eventually(lambda: api.count("pods", verb="list") == 2, "pods listed again")
        # Node watches that went on (node-b's ended with pod b; node-c's began after) list again.
        relisted = ["spec.unschedulable=true", *(f"metadata.name={n}" for n in (MY_NODE, "node-a", "node-x0"))]
        await eventually(lambda: {lists_by_selector(api, "nodes")[f] for f in relisted} == {2}, "nodes listed again")
        relist = [r for r in api.requests if r.verb == "list"][-1]
        assert "resourceVersion" not in relist.query  # a consistent read after 410
        hood = src.kube_neighbours
        assert hood is not None and hood.pods is not None and hood.pods.relists_after_gone == 1
        await eventually(pod_watches_reach(api, api.count("pods", verb="watch") + 2), "more watch renewals")
        assert api.count("pods", verb="list") == 2 and {lists_by_selector(api, "nodes")[f] for f in relisted} == {2}
        # A watch reconnecting at this instant carries its error until it is back (a loaded
        # machine hits that window): discovery is not stale once every watch is up again.
        await eventually(lambda: not src.neighbours.current().stale, "discovery not stale")


class PlainHttp:
    """Credentials for a plain-HTTP fake API server (the Credentials protocol)."""

    source = "test"
    namespace = NS

    def __init__(self, server: str) -> None:
        self.server = server

    async def load(self) -> None:
        pass

    async def authorization(self) -> str | None:
        return "Bearer test"

    def ssl_context(self) -> bool:
        return False

    def rejected(self) -> None:
        pass


async def test_a_410_error_event_in_the_middle_of_a_watch_lists_again() -> None:
    """The stand-in sends 410 only when a watch starts; a real server can also send it in
    the middle of a stream (its watch cache fell behind). The same path must handle it."""
    lists: list[dict[str, str]] = []
    watches: list[dict[str, str]] = []

    def node(name: str, rv: str) -> dict[str, Any]:
        return {"metadata": {"name": name, "resourceVersion": rv}, "spec": {}}

    async def nodes(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") != "true":
            lists.append(dict(request.query))
            first = len(lists) == 1
            items = [node("n1", "5")] if first else [node("n2", "20")]
            metadata = {"resourceVersion": "5" if first else "20"}
            return web.json_response({"kind": "NodeList", "metadata": metadata, "items": items})
        watches.append(dict(request.query))
        response = web.StreamResponse()
        await response.prepare(request)
        if len(watches) == 1:
            await response.write(json.dumps({"type": "ADDED", "object": node("n3", "6")}).encode() + b"\n")
            await response.write(json.dumps({"type": "BOOKMARK", "object": node("", "7")}).encode() + b"\n")
            gone = {"kind": "Status", "status": "Failure", "reason": "Expired", "code": 410, "message": "too old"}
            await response.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
            return response
        await asyncio.sleep(30)
        return response

    app = web.Application()
    app.router.add_get("/api/v1/nodes", nodes)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    client = KubeClient(PlainHttp(f"http://127.0.0.1:{port}"))
    reflector = Reflector(client, "nodes", "/api/v1/nodes", node_info, timing=FAST)
    task = asyncio.create_task(reflector.run())
    try:
        await eventually(lambda: len(lists) == 2 and set(reflector.items) == {"n2"} and len(watches) >= 2,
                         "relisted after the 410, and watching again")
        assert reflector.relists_after_gone == 1
        # Consistent reads, which the server pages (with "0" a real one ignores `limit`).
        assert "resourceVersion" not in lists[0] and "resourceVersion" not in lists[1]
        assert [w["resourceVersion"] for w in watches[:2]] == ["5", "20"]
        assert reflector.connected and reflector.resource_version == "20"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.close()
        await runner.cleanup()


async def test_a_silent_connection_is_given_up_after_the_idle_timeout(sa_dir: Path, tmp_path: Path) -> None:
    # No bookmarks and no changes: a watch that looks exactly like a half-dead connection.
    silent = ApiServerStandin(bookmark_interval=3600)
    await silent.start()
    try:
        folder = silent.write_serviceaccount(tmp_path / "silent", NS)
        timing = Timing(**{**FAST.__dict__, "watch_seconds": 60.0, "idle_timeout": 0.4})
        async with started(source(in_cluster(silent, folder), timing)):
            await eventually(lambda: silent.count("pods", verb="watch") >= 3, "watches renewed after idling", 5)
            assert silent.count("pods", verb="list") == 1
    finally:
        await silent.stop()


async def test_token_rotation(api: ApiServerStandin, sa_dir: Path) -> None:
    add_neighbour(api, "a", "node-a", "10.0.0.2")
    async with started(source(in_cluster(api, sa_dir))) as src:
        await eventually(lambda: api.watch_count == 1 + src.nodes.watching(), "every watch open")
        # The kubelet's rotation: a new token in the file; the old one stops working.
        rotated_at = time.monotonic()
        api.rotate_token()
        assert (sa_dir / "token").read_text() == api.token
        await eventually(lambda: api.count("pods", verb="watch", since=rotated_at) >= 2, "watches renewed")
        add_neighbour(api, "b", "node-b", "10.0.0.3")
        await eventually(lambda: pod_names(src) == {"a", "b"}, "b after rotation")
        assert api.count(authorized=False) == 0
        assert not src.neighbours.current().stale

        # The server switches first and the file follows later: 401s, stale, then recovery.
        api.set_token("standin-next-token")
        api.end_watches()
        await eventually(lambda: src.neighbours.current().stale, "stale on 401")
        assert "401" in str(src.neighbours.current().details["error"])
        add_neighbour(api, "c", "node-c", "10.0.0.4")
        api.write_serviceaccount(sa_dir, NS)
        await eventually(lambda: not src.neighbours.current().stale, "recovered with the new token")
        await eventually(lambda: pod_names(src) == {"a", "b", "c"}, "c after the new token")
        assert api.count("pods", verb="list") == 1


async def test_readiness_follows_this_node(api: ApiServerStandin, sa_dir: Path) -> None:
    async with started(source(in_cluster(api, sa_dir))) as src:
        assert src.readiness.node_schedulable()
        steps: list[tuple[Callable[[], object], bool, str]] = [
            (lambda: api.cordon(MY_NODE), False, "cordoned"),
            (lambda: api.uncordon(MY_NODE), True, "uncordoned"),
            (lambda: api.taint_node(MY_NODE, "node.kubernetes.io/unschedulable"), False, "tainted"),
            (lambda: api.untaint(MY_NODE, "node.kubernetes.io/unschedulable"), True, "untainted"),
            (lambda: api.taint_node(MY_NODE, "dedicated", effect="NoSchedule"), True, "other taint"),
            (lambda: api.delete_node(MY_NODE), False, "gone"),
            (lambda: api.add_node(MY_NODE), True, "back"),
        ]
        for change, expected, what in steps:
            change()
            await eventually(schedulable_is(src, expected), what)
    assert lists_by_selector(api, "nodes")[f"metadata.name={MY_NODE}"] == 1  # driven by the watch, not polling


async def test_own_node_from_the_cache_or_one_get(api: ApiServerStandin, sa_dir: Path) -> None:
    api.add_node("node-x")
    api.add_pod(ME, namespace=NS, node_name="node-x", pod_ip="10.0.0.1", labels=LABELS)
    add_neighbour(api, "a", "node-a", "10.0.0.2")
    async with started(source(in_cluster(api, sa_dir, node_name=None))) as src:
        await eventually(lambda: src.neighbours.current().details["node"] == "node-x", "own node from the cache")
        assert pod_names(src) == {"a"}
        api.cordon("node-x")
        await eventually(lambda: not src.readiness.node_schedulable(), "own node cordoned")
    assert api.count("pods", verb="get") == 0

    # This pod is not a candidate (another namespace): one GET finds its node.
    api.uncordon("node-x")
    api.add_pod("probe-elsewhere", namespace="infra", node_name="node-a", pod_ip="10.0.0.5")
    settings = in_cluster(api, sa_dir, node_name=None, pod_name="probe-elsewhere", pod_namespace="infra", namespace=NS)
    async with started(source(settings)) as src:
        await eventually(lambda: src.neighbours.current().details["node"] == "node-a", "own node from a GET")
        assert pod_names(src) == {"a", ME}
    assert api.count("pods", verb="get") == 1


async def test_allow_unschedulable_watches_only_this_node(api: ApiServerStandin, sa_dir: Path) -> None:
    add_neighbour(api, "a", "node-a", "10.0.0.2")
    api.cordon("node-a")
    async with started(source(in_cluster(api, sa_dir, allow_unschedulable=True))) as src:
        assert pod_names(src) == {"a"}
        assert src.neighbours.current().details["node_watches"] == 1
        api.cordon(MY_NODE)
        await eventually(lambda: not src.readiness.node_schedulable(), "own node cordoned")
    assert {r.query.get("fieldSelector") for r in api.requests if r.kind == "nodes"} == {f"metadata.name={MY_NODE}"}


# A real probe checking real neighbours ----------------------------------------------------


def free_port(hosts: list[str]) -> int:
    """A port free on every one of `hosts` (neighbours are all checked on one port)."""
    for _ in range(100):
        with socket.socket() as probe_socket:
            probe_socket.bind(("127.0.0.1", 0))
            port = probe_socket.getsockname()[1]
        sockets = []
        try:
            for host in hosts:
                s = socket.socket()
                sockets.append(s)
                s.bind((host, port))
            return port
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no common free port")


class Neighbours:
    """/alwayshappy servers on 127.0.0.x:port that note who checked them, and when."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.hits: dict[str, list[tuple[float, str]]] = defaultdict(list)
        self._runners: list[web.AppRunner] = []

    async def serve(self, ip: str) -> None:
        async def happy(request: web.Request) -> web.Response:
            self.hits[ip].append((time.monotonic(), request.headers.get("KUBENURSE-NEIGHBOUR-ORIGIN", "")))
            return web.Response(text="I'm happy\n")

        app = web.Application()
        app.router.add_get("/alwayshappy", happy)
        app.router.add_get("/healthz", happy)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, ip, self.port, reuse_address=True).start()
        self._runners.append(runner)

    def count(self, ip: str, since: float = 0.0) -> int:
        return sum(1 for at, _ in self.hits[ip] if at >= since)

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()


@pytest.fixture
async def world(api: ApiServerStandin, sa_dir: Path) -> AsyncIterator[tuple[Neighbours, Settings]]:
    """Neighbour servers on 127.0.0.2-5 and settings for a probe on 127.0.0.1, same port."""
    ips = [f"127.0.0.{i}" for i in range(1, 6)]
    port = free_port(ips)
    servers = Neighbours(port)
    for ip in ips[1:]:
        await servers.serve(ip)
    settings = in_cluster(
        api,
        sa_dir,
        listen_host="127.0.0.1",
        http_port=port,
        check_interval=0.2,
        check_api_server_dns=False,
        check_timeout=2.0,
        check_connect_timeout=1.0,
        extra_checks=(ExtraCheck("local", f"http://127.0.0.5:{port}/healthz"),),
    )
    api.add_pod(ME, namespace=NS, node_name=MY_NODE, pod_ip="127.0.0.1", labels=LABELS)
    try:
        yield servers, settings
    finally:
        await servers.close()


@contextlib.asynccontextmanager
async def running_probe(settings: Settings) -> AsyncIterator[Client]:
    probe = Probe(settings, discovery=make_discovery(settings, timing=FAST))
    await probe.start()
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{settings.http_port}") as session:
            yield Client(probe, session)
    finally:
        await probe.stop()


class Client:
    def __init__(self, probe: Probe, session: aiohttp.ClientSession) -> None:
        self.probe = probe
        self.session = session

    async def alive(self) -> dict[str, Any]:
        async with self.session.get("/alive") as response:
            return dict(json.loads(await response.text()))

    async def neighbourhood(self) -> set[str]:
        return {n["PodName"] for n in (await self.alive())["last_check_result"]["neighbourhood"]}

    async def ready(self) -> int:
        async with self.session.get("/ready") as response:
            return response.status

    async def metrics(self) -> str:
        async with self.session.get("/metrics") as response:
            return await response.text()

    async def rounds(self, count: int) -> None:
        target = self.probe.prober.rounds + count
        await eventually(lambda: self.probe.prober.rounds >= target, f"{count} rounds", 2 + count)


async def test_probe_checks_the_neighbours_alive_shows_and_counts_its_api_requests(
    api: ApiServerStandin, world: tuple[Neighbours, Settings]
) -> None:
    servers, settings = world
    add_neighbour(api, "a", "node-a", "127.0.0.2")
    add_neighbour(api, "b", "node-b", "127.0.0.3")
    async with running_probe(settings) as probe:
        assert await probe.neighbourhood() == {"a", "b"}
        await eventually(lambda: servers.count("127.0.0.2") and servers.count("127.0.0.3"), "a and b checked")
        assert {origin for _, origin in servers.hits["127.0.0.2"]} == {ME}
        add_neighbour(api, "c", "node-c", "127.0.0.4")
        await eventually(lambda: servers.count("127.0.0.4"), "c checked")
        api.delete_pod("a", namespace=NS)
        await eventually(async_equals(probe.neighbourhood, {"b", "c"}), "a gone from /alive")
        alive = await probe.alive()
        results = alive["last_check_result"]
        assert results["neighbourhood_state"] == "ok"
        assert results["path_node-b"] == results["path_node-c"] == results["local"] == "ok"
        assert alive["discovery"]["stale"] is False and alive["discovery"]["namespace"] == NS
        assert results["api_server_direct"] == "ok"  # the checks and discovery share the stand-in

        # Many more rounds: watches only, never a list again (the API server's side of scale).
        await probe.rounds(10)
    assert listed_once_each(api)
    assert api.count("pods", verb="watch") >= 2 and api.count("nodes", verb="watch") >= 2
    assert api.count("version") >= 10  # one api_server_direct check per round, for scale
    assert api.count(authorized=False) == 0


async def test_alive_shows_the_live_retry_state_during_an_outage(
    api: ApiServerStandin, world: tuple[Neighbours, Settings]
) -> None:
    """Issue 23 item 6: the count and the time of the last attempt move while the API is down
    (it once showed `failures_in_a_row 3` for a minute while 62 attempts were made)."""
    _, settings = world
    add_neighbour(api, "a", "node-a", "127.0.0.2")
    async with running_probe(settings) as probe:
        await eventually(async_equals(probe.neighbourhood, {"a"}), "a listed")
        await api.down()

        async def pods_retrying() -> dict[str, Any] | None:
            return (await probe.alive())["discovery"].get("retrying", {}).get("pods")

        first = await eventually(pods_retrying, "the pod watch retrying, in /alive")
        await asyncio.sleep(1.0)  # backoff 0.05 s doubling to 0.25 s: several attempts a second
        later = await pods_retrying()
        assert later is not None
        assert later["failures_in_a_row"] >= first["failures_in_a_row"] + 2, (first, later)
        assert later["last_attempt_at"] > first["last_attempt_at"], (first, later)
        assert later["retry_in_seconds"] is None or 0 <= later["retry_in_seconds"] <= FAST.backoff_max
        assert "cannot connect" in later["error"]
        await api.up()

        async def recovered() -> bool:
            return "retrying" not in (await probe.alive())["discovery"]

        await eventually(recovered, "no retry state once the API server is back", 5)


def async_equals(fetch: Callable[[], Awaitable[T]], expected: T) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await fetch() == expected

    return check


async def test_outage_keeps_checking_the_last_neighbourhood_and_recovers(
    api: ApiServerStandin, world: tuple[Neighbours, Settings]
) -> None:
    servers, settings = world
    add_neighbour(api, "a", "node-a", "127.0.0.2")
    add_neighbour(api, "b", "node-b", "127.0.0.3")
    async with running_probe(settings) as probe:
        await eventually(lambda: servers.count("127.0.0.3"), "b checked")
        down_at = time.monotonic()
        await api.down()
        await eventually(lambda: probe.probe.neighbours.current().stale, "stale")
        # Made while the server is unreachable: the probe cannot know yet.
        add_neighbour(api, "c", "node-c", "127.0.0.4")
        api.delete_pod("b", namespace=NS)
        await probe.rounds(5)  # > 1 s of outage
        alive = await probe.alive()
        assert alive["discovery"]["stale"] is True
        assert "cannot connect" in alive["discovery"]["error"]
        assert alive["discovery"]["stale_since"] and alive["discovery"]["last_sync"]
        assert await probe.neighbourhood() == {"a", "b"}  # the last known neighbourhood...
        assert servers.count("127.0.0.2", since=down_at) >= 3  # ...is still being checked
        assert servers.count("127.0.0.4") == 0
        results = alive["last_check_result"]
        assert results["local"] == "ok" and results["path_node-a"] == "ok"
        assert results["api_server_direct"] != "ok"
        assert await probe.ready() == 200  # an API outage is not this node's fault

        await api.up()
        await eventually(lambda: not probe.probe.neighbours.current().stale, "fresh again")
        await eventually(async_equals(probe.neighbourhood, {"a", "c"}), "changes from the outage")
        await eventually(lambda: servers.count("127.0.0.4"), "c checked")

        async def no_error() -> bool:  # /alive shows the last round's view
            return "error" not in (await probe.alive())["discovery"]

        await eventually(no_error, "no discovery error in /alive")
    # Resumed from the last version: the outage cost no list.
    assert listed_once_each(api)


async def test_cordon_makes_ready_503_and_uncordon_200(
    api: ApiServerStandin, world: tuple[Neighbours, Settings]
) -> None:
    _, settings = world
    async with running_probe(settings) as probe:
        assert await probe.ready() == 200
        api.cordon(MY_NODE)
        await eventually(async_equals(probe.ready, 503), "/ready 503 when cordoned")
        api.uncordon(MY_NODE)
        await eventually(async_equals(probe.ready, 200), "/ready 200 when uncordoned")
        api.delete_node(MY_NODE)
        await eventually(async_equals(probe.ready, 503), "/ready 503 when the node is gone")


async def test_a_departed_nodes_series_leave_metrics(
    api: ApiServerStandin, world: tuple[Neighbours, Settings]
) -> None:
    _servers, settings = world
    add_neighbour(api, "a", "node-a", "127.0.0.2")
    add_neighbour(api, "b", "node-b", "127.0.0.3")
    async with running_probe(settings) as probe:

        async def both_recorded() -> bool:
            metrics = await probe.metrics()
            return 'type="path_node-a"' in metrics and 'type="path_node-b"' in metrics

        # Each path starts at its own offset into the interval: wait until both were recorded.
        await eventually(both_recorded, "both paths in /metrics")
        api.delete_node("node-b")
        await eventually(async_equals(probe.neighbourhood, {"a"}), "node-b gone from /alive")

        async def b_gone() -> bool:
            return 'type="path_node-b"' not in await probe.metrics()

        await eventually(b_gone, "path_node-b series gone")
        assert 'kubenurse_httpclient_requests_total{code="200",type="path_node-a"}' in (await probe.metrics())


async def test_probe_without_kubernetes_skips_the_neighbourhood_and_runs_the_rest(
    world: tuple[Neighbours, Settings], tmp_path: Path
) -> None:
    _, settings = world
    outside = Settings(**{
        **settings.__dict__,
        "kubernetes_service_host": None,
        "serviceaccount_dir": str(tmp_path / "none"),
    })
    async with running_probe(outside) as probe:
        await probe.rounds(1)
        alive = await probe.alive()
        results = alive["last_check_result"]
        assert results["neighbourhood_state"] == "skipped" and results["neighbourhood"] == []
        assert "KUBECONFIG not set" in alive["skipped_checks"]["neighbourhood"]
        assert results["local"] == "ok"
        assert await probe.ready() == 200


# Narrow node watches (issue 12) ------------------------------------------------------------


def ring_from(own: str, names: list[str]) -> list[str]:
    mine = ring_hash(own)
    return sorted(names, key=lambda n: (ring_hash(n) - mine) % (1 << 64))


def node_watches(api: ApiServerStandin, since: float = 0.0) -> set[str]:
    return {r.query.get("fieldSelector", "") for r in api.requests if r.kind == "nodes" and r.time >= since}


async def test_narrow_node_watches_keep_every_selection_rule(api: ApiServerStandin, sa_dir: Path) -> None:
    names = [f"node-{i}" for i in range(12)]
    for i, name in enumerate(names):
        add_neighbour(api, f"p{i}", name, f"10.0.0.{i + 2}")
    order = ring_from(MY_NODE, names)
    async with started(source(in_cluster(api, sa_dir, neighbour_limit=2))) as src:

        def chosen_is(*nodes: str) -> Callable[[], bool]:
            return lambda: [n.node_name for n in src.neighbours.current().neighbours] == list(nodes)

        await eventually(chosen_is(*order[:2]), "the ring front")
        # Cordoned nodes (metadata only), this node, the two taken and one spare: nothing else.
        assert node_watches(api) == {
            "spec.unschedulable=true", f"metadata.name={MY_NODE}", *(f"metadata.name={n}" for n in order[:3])
        }
        assert src.nodes.cluster is not None and src.nodes.cluster._accept[1].startswith("application/json;as=")

        def by_field(on: bool) -> Callable[[dict[str, Any]], None]:
            return lambda node: node["spec"].__setitem__("unschedulable", True) if on else node["spec"].pop(
                "unschedulable", None)

        api.update_node(order[0], by_field(True))
        await eventually(chosen_is(order[1], order[2]), "cordoned by field", 2)
        api.update_node(order[0], by_field(False))
        await eventually(chosen_is(*order[:2]), "uncordoned", 2)
        api.taint_node(order[1], "node.kubernetes.io/unschedulable")
        await eventually(chosen_is(order[0], order[2]), "cordoned by taint only", 2)
        api.untaint(order[1], "node.kubernetes.io/unschedulable")
        await eventually(chosen_is(*order[:2]), "untainted", 2)
        api.delete_node(order[0])
        await eventually(chosen_is(order[1], order[2]), "node deleted, its pod still listed", 2)
        assert src.neighbours.current().details["pods"] == 12
        # A drain of the front: watches move on to the next nodes, none stays on a cordoned one.
        since = time.monotonic()
        for name in order[1:4]:
            api.cordon(name)
        await eventually(chosen_is(*order[4:6]), "the next nodes after a drain", 3)
        assert {f"metadata.name={n}" for n in order[4:7]} <= node_watches(api, since)
        # cordoned, own, the deleted node (its pod lingers), 3 cordoned, 2 taken, 1 spare
        assert set(src.nodes._per_node) == {MY_NODE, *order[:7]}
        # The whole-cluster view (mesh) leaves out what is known: cordoned and deleted nodes.
        assert {n.node_name for n in src.kube_neighbours.eligible()} == set(names) - set(order[:4])
        listed = lists_by_selector(api, "nodes")[f"metadata.name={order[2]}"]
        api.uncordon(order[2])  # still watched: back at once, without listing it again
        await eventually(chosen_is(order[2], order[4]), "uncordoned", 2)
        assert lists_by_selector(api, "nodes")[f"metadata.name={order[2]}"] == listed


async def test_heartbeats_do_not_reach_the_probe(tmp_path: Path) -> None:
    """Requests and bytes the probe causes, against a full watch of every node in the same run."""
    api = ApiServerStandin(realistic_nodes=True, bookmark_interval=3600)
    size = 60
    for i in range(size):
        add_neighbour(api, f"p{i}", f"node-{i}", f"10.0.1.{i}")
    await api.start()
    try:
        folder = api.write_serviceaccount(tmp_path / "sa", NS)
        narrow = source(in_cluster(api, folder, neighbour_limit=3, pod_name="narrow", node_name="node-0"))
        full = source(in_cluster(api, folder, neighbour_limit=0, pod_name="full", node_name="node-1"))
        async with started(narrow), started(full):
            await eventually(lambda: len(narrow.neighbours.current().neighbours) == 3, "narrow selection")
            start_rv = api.resource_version
            for _ in range(3):
                for i in range(size):
                    api.heartbeat(f"node-{i}")
            cluster = full.nodes.cluster
            assert cluster is not None
            await eventually(lambda: int(cluster.resource_version or 0) >= api.resource_version, "full watch caught up")
            await asyncio.sleep(0.3)
            assert api.resource_version - start_rv == 3 * size
            per_node = narrow.nodes.watching() - 1
        agent = "kubenurse-otel/discovery (pod {})"
        narrow_events, full_events = api.sent_events[agent.format("narrow")], api.sent_events[agent.format("full")]
        narrow_bytes, full_bytes = api.sent_bytes[agent.format("narrow")], api.sent_bytes[agent.format("full")]
        # The narrow probe hears its own node, 3 taken and 1 spare (its own node's pod is
        # one of the taken here): at most 5 nodes x 3 heartbeats.
        assert per_node <= 5 and narrow_events <= per_node * 3 and full_events >= 3 * size
        assert narrow_bytes * 5 < full_bytes, (narrow_bytes, full_bytes)
        requests = [r for r in api.requests if r.user_agent == agent.format("narrow")]
        lists = Counter(r.query.get("fieldSelector", r.path) for r in requests if r.verb == "list")
        assert set(lists.values()) == {1} and len(lists) == 1 + 1 + per_node  # pods, cordoned, each node
        assert sum(r.verb == "watch" for r in requests) <= 2 * len(lists)
    finally:
        await api.stop()


async def test_ready_follows_this_node_with_the_neighbourhood_check_off(
    api: ApiServerStandin, world: tuple[Neighbours, Settings]
) -> None:
    _, settings = world
    settings = Settings(**{**settings.__dict__, "check_neighbourhood": False})
    async with running_probe(settings) as probe:
        assert await probe.ready() == 200
        api.cordon(MY_NODE)
        await eventually(async_equals(probe.ready, 503), "/ready 503 when cordoned", 2)
        api.uncordon(MY_NODE)
        await eventually(async_equals(probe.ready, 200), "/ready 200 when uncordoned", 2)
        alive = await probe.alive()
        assert alive["last_check_result"]["neighbourhood_state"] == "skipped"
        assert alive["discovery"]["node_watches"] == 1 and "retrying" not in alive["discovery"]
        api.fault = "short_watches"  # /alive shows the readiness watch's trouble too
        api.end_watches()

        async def retrying() -> bool:
            return f"node {MY_NODE}" in (await probe.alive())["discovery"].get("retrying", {})

        await eventually(retrying, "the own-node watch retrying, in /alive")
    assert api.count("pods") == 0 and node_watches(api) == {f"metadata.name={MY_NODE}"}


# A sick API server: backoff, silence, malformed objects, big lists (issue 11) ---------------

SLOW_RETRY = Timing(**{**FAST.__dict__, "watch_seconds": 60.0, "idle_timeout": 10.0, "quiet_after": 5.0,
                       "backoff_initial": 0.1, "backoff_max": 1.6, "healthy_after": 1.0})


@pytest.mark.parametrize(("fault", "verb"), [("short_watches", "watch"), ("gone_after_list", "list")])
async def test_a_misbehaving_server_gets_backoff_not_a_tight_loop(
    api: ApiServerStandin, sa_dir: Path, fault: str, verb: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with started(source(in_cluster(api, sa_dir), SLOW_RETRY)) as src:
        await eventually(lambda: src.neighbours.current().state == "ok", "listed")
        reflectors = 1 + src.nodes.watching()  # pods, cordoned nodes, this node
        api.fault = fault
        api.end_watches()
        since = time.monotonic()
        await asyncio.sleep(4.0)
        sent = api.count(verb=verb, since=since)
        details = src.neighbours.current().details
    # Backoff 0.1 s doubling to 1.6 s (x0.5-1 jitter): at most ~9 tries each in 4 s; a loop
    # that resets on every bookmark or list sends hundreds or thousands.
    assert sent <= 10 * reflectors, sent
    retrying = details["retrying"]
    assert isinstance(retrying, dict) and len(retrying) == reflectors
    assert all(r["failures_in_a_row"] >= 3 for r in retrying.values())
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and r.name == "probe.discovery"]
    assert len(warnings) <= reflectors, [r.getMessage() for r in warnings]  # once per streak


async def test_a_silent_watch_shows_stale_before_it_is_given_up(sa_dir: Path, tmp_path: Path) -> None:
    # kube-apiserver bookmarks only to carry progress (tests/real): a quiet cluster's healthy
    # watch may be silent until its end, so silence counts only past the longest watch.
    t = Timing()
    assert 2 * t.watch_seconds + t.watch_grace < t.quiet_after < t.idle_timeout
    silent = ApiServerStandin(bookmark_interval=3600)
    silent.add_node(MY_NODE)
    await silent.start()
    try:
        folder = silent.write_serviceaccount(tmp_path / "silent", NS)
        timing = Timing(**{**FAST.__dict__, "watch_seconds": 60.0, "quiet_after": 0.5, "idle_timeout": 30.0})
        async with started(source(in_cluster(silent, folder), timing)) as src:
            assert not src.neighbours.current().stale
            hood = await eventually(lambda: src.neighbours.current().stale and src.neighbours.current(), "stale", 2)
            assert "no event or bookmark for 0.5 s" in str(hood.details["error"])
            assert silent.count("pods", verb="watch") == 1  # not given up yet
    finally:
        await silent.stop()


def test_api_connections_use_tcp_keepalive() -> None:
    """What finds a dead API server connection, now that silence may be normal."""
    from probe.discovery.kube import KEEPCNT, KEEPIDLE, KEEPINTVL, keepalive_socket

    with keepalive_socket((socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", 1))) as sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPIDLE
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == KEEPINTVL
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPCNT
    assert KEEPIDLE + KEEPCNT * KEEPINTVL <= 60


async def test_a_malformed_object_is_skipped_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    lists = 0

    async def nodes(request: web.Request) -> web.StreamResponse:
        nonlocal lists
        if request.query.get("watch") != "true":
            lists += 1
            items = [{"metadata": {"name": "ok"}, "spec": {}}, {"metadata": [1]}, "junk"]
            return web.json_response({"kind": "NodeList", "metadata": {"resourceVersion": "5"}, "items": items})
        gone = {"kind": "Status", "status": "Failure", "reason": "Expired", "code": 410, "message": "too old"}
        return web.Response(text=json.dumps({"type": "ERROR", "object": gone}) + "\n")

    app = web.Application()
    app.router.add_get("/api/v1/nodes", nodes)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    client = KubeClient(PlainHttp(f"http://127.0.0.1:{runner.addresses[0][1]}"), qps=100, burst=100)
    reflector = Reflector(client, "nodes", "/api/v1/nodes", node_info, timing=FAST)
    task = asyncio.create_task(reflector.run())
    try:
        await eventually(lambda: lists >= 3, "listed again and again")
        assert set(reflector.items) == {"ok"} and reflector.malformed >= 6
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.close()
        await runner.cleanup()
    skipped = [r for r in caplog.records if r.getMessage() == "skipping an object discovery cannot read"]
    assert len(skipped) == 2  # two different faults, each once
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_lists_are_paged_and_a_body_over_the_cap_fails_clearly(api: ApiServerStandin, sa_dir: Path) -> None:
    for i in range(5):
        add_neighbour(api, f"p{i}", f"node-{i}", f"10.0.0.{i + 2}")
    timing = Timing(**{**FAST.__dict__, "page_size": 2})
    async with started(source(in_cluster(api, sa_dir), timing)) as src:
        assert len(src.neighbours.current().neighbours) == 5
    pages = [r.query for r in api.requests if r.kind == "pods" and r.verb == "list"]
    assert len(pages) == 3 and all(p["limit"] == "2" and "resourceVersion" not in p for p in pages)

    credentials = ServiceAccount(str(sa_dir), "127.0.0.1", api.port)
    await credentials.load()
    client = KubeClient(credentials, max_body=2_000)
    try:
        with pytest.raises(ApiError, match="larger than 2000 bytes"):
            await client.get(f"/api/v1/namespaces/{NS}/pods", {"resourceVersion": "0"}, timeout=5)
    finally:
        await client.close()


async def test_pod_updates_selection_does_not_read_cost_nothing_but_decoding(
    api: ApiServerStandin, sa_dir: Path
) -> None:
    add_neighbour(api, "a", "node-a", "10.0.0.2")
    async with started(source(in_cluster(api, sa_dir))) as src:
        hood = src.neighbours.current()
        pods = src.kube_neighbours.pods if src.kube_neighbours else None
        assert pods is not None and [n.pod_name for n in hood.neighbours] == ["a"]
        revision = pods.data_revision

        def churn(pod: dict[str, Any], i: int) -> None:
            pod["metadata"].setdefault("annotations", {})["churn"] = str(i)
            pod["status"]["conditions"] = [{"type": "Ready", "status": "True" if i % 2 else "False"}]

        for i in range(20):
            api.update_pod("a", lambda pod, i=i: churn(pod, i), namespace=NS)
        api.set_pod_phase("a", "Running", namespace=NS)  # a no-op write, last: when seen, all were
        await eventually(lambda: int(pods.resource_version or 0) >= api.resource_version, "all 21 updates seen")
        assert pods.data_revision == revision
        assert src.neighbours.current().neighbours is hood.neighbours  # not selected again
        api.update_pod("a", lambda pod: pod["status"].__setitem__("podIP", "10.0.0.9"), namespace=NS)
        await eventually(lambda: pods.data_revision == revision + 1, "a change selection reads")
