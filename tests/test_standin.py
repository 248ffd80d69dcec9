"""The API-server stand-in, exercised through real HTTPS clients that verify its CA:
aiohttp directly, and kubernetes_asyncio to prove the real client library accepts it."""

from __future__ import annotations

import asyncio
import errno
import json
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from kubenurse_sandbox.standin import ApiServerStandin
from kubenurse_sandbox.standin.selectors import SelectorError, parse_field_selector, parse_label_selector

NS = "ns"


# Fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[ApiServerStandin]:
    s = ApiServerStandin(bookmark_interval=0.2)
    await s.start()
    yield s
    await s.stop()


class Http:
    """aiohttp against the stand-in, trusting only its CA."""

    def __init__(self, server: ApiServerStandin, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session
        self.ssl = ssl.create_default_context(cadata=server.ca_pem.decode())

    def headers(self, token: str | None = "") -> dict[str, str]:
        token = self.server.token if token == "" else token
        return {"Authorization": f"Bearer {token}"} if token is not None else {}

    async def get(self, path: str, token: str | None = "", **params: str) -> tuple[int, Any]:
        async with self.session.get(
            self.server.url + path, params=params, ssl=self.ssl, headers=self.headers(token)
        ) as resp:
            return resp.status, await resp.json()

    async def stream(self, path: str, **params: str) -> list[dict[str, Any]]:
        """Every event of a watch until the server ends the stream."""
        async with self.session.get(
            self.server.url + path, params=params, ssl=self.ssl, headers=self.headers()
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "application/json"
            return [json.loads(line) async for line in resp.content]


@pytest.fixture
async def http(server: ApiServerStandin) -> AsyncIterator[Http]:
    async with aiohttp.ClientSession() as session:
        yield Http(server, session)


async def kube_client(server: ApiServerStandin, tmp_path: Path) -> client.ApiClient:
    """A kubernetes_asyncio client configured from the stand-in's kubeconfig file."""
    cfg = client.Configuration()
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig", NS)
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    return client.ApiClient(configuration=cfg)


@pytest.fixture
async def core(server: ApiServerStandin, tmp_path: Path) -> AsyncIterator[client.CoreV1Api]:
    async with await kube_client(server, tmp_path) as api:
        yield client.CoreV1Api(api)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def watch_events(core: client.CoreV1Api, **kwargs: Any) -> list[dict[str, Any]]:
    """kubernetes_asyncio watch events of namespace NS until the stream ends."""
    async with watch.Watch() as w:
        return [e async for e in w.stream(core.list_namespaced_pod, NS, timeout_seconds=30, **kwargs)]


async def during_watch(
    server: ApiServerStandin, watcher: Awaitable[list[dict[str, Any]]], changes: Callable[[], object]
) -> list[dict[str, Any]]:
    """Start a watch, apply changes once it is open, then end it and return its events."""
    task = asyncio.ensure_future(watcher)
    await until(lambda: server.watch_count == 1)
    changes()
    server.end_watches()
    return await asyncio.wait_for(task, 5)


def summary(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["type"], e["raw_object"]["metadata"].get("name", "")) for e in events]


def names(items: list[dict[str, Any]]) -> list[str]:
    return [item["metadata"]["name"] for item in items]


def add_pods(server: ApiServerStandin) -> None:
    server.add_node("n1")
    server.add_node("n2")
    server.add_pod("p-a", namespace=NS, node_name="n1", pod_ip="10.1.0.1", labels={"app": "web", "tier": "front"})
    server.add_pod("p-b", namespace=NS, node_name="n2", pod_ip="10.1.0.2", labels={"app": "web", "tier": "back"})
    server.add_pod("p-c", namespace=NS, node_name="n1", pod_ip="10.1.0.3", labels={"app": "db"}, phase="Pending")
    server.add_pod("p-d", namespace=NS, node_name="n2", pod_ip="10.1.0.4")
    server.add_pod("p-e", namespace="other", node_name="n1", pod_ip="10.1.0.5", labels={"app": "web"})


# Authentication and TLS ----------------------------------------------------------------


async def test_requests_without_a_valid_token_get_401_status(server: ApiServerStandin, http: Http) -> None:
    for token in (None, "wrong", server.token + "x"):
        status, body = await http.get("/api/v1/pods", token=token)
        assert status == 401
        assert body == {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "Unauthorized",
            "reason": "Unauthorized",
            "code": 401,
        }
    # Authentication comes before routing, as on the real server.
    assert (await http.get("/no/such/path", token=None))[0] == 401
    async with http.session.get(
        server.url + "/version", ssl=http.ssl, headers={"Authorization": f"Basic {server.token}"}
    ) as resp:
        assert resp.status == 401
    assert server.count(authorized=False) == 5
    assert server.count(authorized=True) == 0


async def test_wrong_token_is_an_api_exception_401_in_kubernetes_asyncio(
    server: ApiServerStandin, tmp_path: Path
) -> None:
    server.set_token("the-new-one")  # the kubeconfig below still carries it: rotate after writing
    async with await kube_client(server, tmp_path) as api:
        server.set_token("another")
        with pytest.raises(ApiException) as raised:
            await client.CoreV1Api(api).list_namespaced_pod(NS)
    assert raised.value.status == 401
    assert json.loads(raised.value.body or "")["reason"] == "Unauthorized"


async def test_certificate_names_and_version(server: ApiServerStandin) -> None:
    extra = ApiServerStandin(extra_names=["probe.example", "10.9.8.7"])
    await extra.start()
    try:
        ctx = ssl.create_default_context(cadata=extra.ca_pem.decode())
        names = ["localhost", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local", "probe.example"]
        async with aiohttp.ClientSession() as session:
            for name in names:
                async with session.get(
                    extra.url + "/version",
                    ssl=ctx,
                    server_hostname=name,
                    headers={"Authorization": f"Bearer {extra.token}"},
                ) as resp:
                    assert resp.status == 200, name
                    assert (await resp.json())["gitVersion"].startswith("v1.")
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.get(extra.url + "/version", ssl=ctx, server_hostname="not-in-the-cert.example")
            # Another stand-in's CA must not be trusted: each has its own.
            other = ssl.create_default_context(cadata=server.ca_pem.decode())
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.get(extra.url + "/version", ssl=other)
    finally:
        await extra.stop()


async def test_version_through_kubernetes_asyncio(core: client.CoreV1Api) -> None:
    info = await client.VersionApi(core.api_client).get_code()  # type: ignore[attr-defined]
    assert (info.major, info.minor) == ("1", "32")
    assert info.git_version == "v1.32.0"


async def test_token_rotation_rewrites_the_file_and_rejects_the_old_token(
    server: ApiServerStandin, http: Http, tmp_path: Path
) -> None:
    sa = server.write_serviceaccount(tmp_path / "sa", "probe-ns")
    assert (sa / "namespace").read_text() == "probe-ns"
    assert (sa / "ca.crt").read_bytes() == server.ca_pem
    first = (sa / "token").read_text()
    assert first == server.token and not first.endswith("\n")
    assert (await http.get("/version", token=first))[0] == 200

    second = server.rotate_token()
    assert (sa / "token").read_text() == second != first
    assert (await http.get("/version", token=first))[0] == 401
    assert (await http.get("/version", token=second))[0] == 200

    # keep_old: projected tokens stay valid for a while after the kubelet replaces them.
    third = server.rotate_token(sa, keep_old=True)
    assert (sa / "token").read_text() == third
    assert (await http.get("/version", token=second))[0] == 200
    assert (await http.get("/version", token=third))[0] == 200


async def test_incluster_files_work_with_kubernetes_asyncio(server: ApiServerStandin, tmp_path: Path) -> None:
    sa = server.write_serviceaccount(tmp_path / "sa", NS)
    server.add_pod("p1", namespace=NS, node_name=None, pod_ip=None, phase="Pending")
    cfg = client.Configuration()
    config.load_incluster_config(
        client_configuration=cfg,
        token_filename=str(sa / "token"),
        cert_filename=str(sa / "ca.crt"),
        environ={"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(server.port)},
    )
    async with client.ApiClient(configuration=cfg) as api:
        pods = await client.CoreV1Api(api).list_namespaced_pod((sa / "namespace").read_text())
        assert [p.metadata.name for p in pods.items] == ["p1"]
        # Observed: kubernetes_asyncio re-reads the token file only once a minute, so a
        # rotation that revokes the old token at once locks it out until then.
        server.rotate_token()
        with pytest.raises(ApiException) as raised:
            await client.CoreV1Api(api).list_namespaced_pod(NS)
        assert raised.value.status == 401


# Get and list ----------------------------------------------------------------------------


async def test_get_objects_and_404s(server: ApiServerStandin, http: Http, core: client.CoreV1Api) -> None:
    add_pods(server)
    pod = await core.read_namespaced_pod("p-a", NS)
    assert (pod.kind, pod.api_version) == ("Pod", "v1")
    assert (pod.spec.node_name, pod.status.pod_ip, pod.status.phase) == ("n1", "10.1.0.1", "Running")
    node = await core.read_node("n1")
    assert pod.status.host_ip == node.status.addresses[0].address  # defaults to the node's InternalIP
    assert node.status.conditions[0].type == "Ready"

    with pytest.raises(ApiException) as raised:
        await core.read_namespaced_pod("p-e", NS)  # exists, but in another namespace
    assert raised.value.status == 404
    assert json.loads(raised.value.body or "")["message"] == 'pods "p-e" not found'

    status, body = await http.get("/api/v1/nodes/nope")
    assert (status, body["reason"], body["details"]) == (404, "NotFound", {"name": "nope", "kind": "nodes"})
    status, body = await http.get("/api/v1/services")
    assert (status, body["kind"], body["reason"]) == (404, "Status", "NotFound")


async def test_list_shape_and_resource_versions(server: ApiServerStandin, http: Http) -> None:
    add_pods(server)
    status, body = await http.get("/api/v1/pods")
    assert status == 200
    assert (body["kind"], body["apiVersion"]) == ("PodList", "v1")
    assert body["metadata"] == {"resourceVersion": str(server.resource_version)}
    assert names(body["items"]) == ["p-a", "p-b", "p-c", "p-d", "p-e"]  # sorted by namespace/name
    assert names(body["items"]).index("p-e") == 4  # "ns/..." sorts before "other/..."
    versions = [int(item["metadata"]["resourceVersion"]) for item in body["items"]]
    assert versions == sorted(set(versions)) and versions[-1] == server.resource_version
    assert "kind" not in body["items"][0]  # list items carry no kind, as on the real server
    _, nodes = await http.get("/api/v1/nodes")
    assert (nodes["kind"], names(nodes["items"])) == ("NodeList", ["n1", "n2"])


LABEL_CASES = [
    ("", ["p-a", "p-b", "p-c", "p-d"]),
    ("app=web", ["p-a", "p-b"]),
    ("app==web", ["p-a", "p-b"]),
    ("app!=web", ["p-c", "p-d"]),
    ("app in (web,db)", ["p-a", "p-b", "p-c"]),
    ("app notin (web)", ["p-c", "p-d"]),
    ("tier", ["p-a", "p-b"]),
    ("!tier", ["p-c", "p-d"]),
    ("app=web,tier=back", ["p-b"]),
    (" app in ( web ) , tier notin (front)", ["p-b"]),
]


@pytest.mark.parametrize(("selector", "expected"), LABEL_CASES)
async def test_label_selectors(
    server: ApiServerStandin, core: client.CoreV1Api, selector: str, expected: list[str]
) -> None:
    add_pods(server)
    pods = await core.list_namespaced_pod(NS, label_selector=selector)
    assert [p.metadata.name for p in pods.items] == expected


@pytest.mark.parametrize(
    "selector", ["app in (web", "app=web,", "=web", "app in web", "a b", "-bad=x", "app=x y", "a>b", "a=(b)"]
)
def test_unparsable_label_selectors(selector: str) -> None:
    with pytest.raises(SelectorError):
        parse_label_selector(selector)


def test_label_selector_semantics_edge_cases() -> None:
    assert parse_label_selector("a>5").matches({"a": "7"})
    assert not parse_label_selector("a>5").matches({"a": "x"})
    assert parse_label_selector("a=").matches({"a": ""})
    assert parse_label_selector("example.com/a in (x)").matches({"example.com/a": "x"})


async def test_bad_selectors_are_400_status(http: Http) -> None:
    for params in ({"labelSelector": "app in (web"}, {"fieldSelector": "spec.foo=x"}, {"fieldSelector": "x"}):
        status, body = await http.get("/api/v1/pods", **params)
        assert (status, body["reason"], body["code"]) == (400, "BadRequest", 400), params


async def test_boolean_query_values_are_read_as_go_reads_them(http: Http) -> None:
    # strconv.ParseBool: the same table the probe's settings use, with nothing trimmed.
    for value in ("yes", " true", "on"):
        status, body = await http.get("/api/v1/pods", watch=value)
        assert (status, body["reason"]) == (400, "BadRequest"), value
        assert "strconv.ParseBool" in body["message"]
    for value in ("", "0", "f", "False"):
        status, body = await http.get("/api/v1/pods", watch=value)
        assert (status, body["kind"]) == (200, "PodList"), value


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("spec.nodeName=n1", ["p-a", "p-c"]),
        ("status.phase!=Running", ["p-c"]),
        ("metadata.name==p-d", ["p-d"]),
        ("spec.nodeName=n2,status.phase=Running", ["p-b", "p-d"]),
    ],
)
async def test_field_selectors(
    server: ApiServerStandin, core: client.CoreV1Api, selector: str, expected: list[str]
) -> None:
    add_pods(server)
    pods = await core.list_namespaced_pod(NS, field_selector=selector)
    assert [p.metadata.name for p in pods.items] == expected


def test_field_selector_rejects_unknown_fields() -> None:
    with pytest.raises(SelectorError, match=r"field label not supported: spec\.hostname"):
        parse_field_selector("spec.hostname=x", {"metadata.name"})


async def test_pagination_like_the_real_server(server: ApiServerStandin, http: Http) -> None:
    for i in range(25):
        server.add_pod(f"p{i:02}", namespace="abc"[i % 3], node_name="n1", pod_ip=f"10.2.0.{i}")
    _, everything = await http.get("/api/v1/pods")
    first_rv = everything["metadata"]["resourceVersion"]
    pages, token = [], ""
    while True:
        _, page = await http.get("/api/v1/pods", limit="7", **({"continue": token} if token else {}))
        pages.append(page)
        # A change between pages: the later pages still report the first page's version, so a
        # watch started from it misses nothing.
        server.set_pod_phase("p00", "Failed", namespace="a")
        assert page["metadata"]["resourceVersion"] == first_rv
        token = page["metadata"].get("continue", "")
        if not token:
            break
    assert [len(p["items"]) for p in pages] == [7, 7, 7, 4]
    assert [p["metadata"].get("remainingItemCount") for p in pages] == [18, 11, 4, None]
    listed = [f"{i['metadata']['namespace']}/{i['metadata']['name']}" for p in pages for i in p["items"]]
    assert listed == sorted(listed) and len(set(listed)) == 25

    _, ns_page = await http.get("/api/v1/namespaces/b/pods", limit="5")
    _, ns_rest = await http.get("/api/v1/namespaces/b/pods", limit="5", **{"continue": ns_page["metadata"]["continue"]})
    assert names(ns_page["items"] + ns_rest["items"]) == [f"p{i:02}" for i in range(1, 25, 3)]
    assert "continue" not in ns_rest["metadata"]

    status, body = await http.get("/api/v1/pods", limit="5", **{"continue": "not-a-token"})
    assert (status, body["reason"]) == (400, "BadRequest")
    server.compact()
    status, body = await http.get("/api/v1/pods", limit="5", **{"continue": ns_page["metadata"]["continue"]})
    assert (status, body["reason"], body["code"]) == (410, "Expired", 410)


async def test_pagination_through_kubernetes_asyncio(server: ApiServerStandin, core: client.CoreV1Api) -> None:
    for i in range(10):
        server.add_pod(f"p{i}", namespace=NS, node_name="n1", pod_ip=f"10.3.0.{i}", labels={"even": str(i % 2 == 0)})
    seen, token = [], ""
    while True:
        page = await core.list_namespaced_pod(NS, label_selector="even=True", limit=2, _continue=token)
        seen += [p.metadata.name for p in page.items]
        token = page.metadata._continue or ""
        if not token:
            break
    assert seen == ["p0", "p2", "p4", "p6", "p8"]


# Watch -----------------------------------------------------------------------------------


async def test_watch_streams_added_modified_deleted_in_order(server: ApiServerStandin, core: client.CoreV1Api) -> None:
    server.add_pod("old", namespace=NS, node_name="n1", pod_ip="10.0.0.1")
    rv = (await core.list_namespaced_pod(NS)).metadata.resource_version

    def changes() -> None:
        server.add_pod("p1", namespace=NS, node_name="n1", pod_ip="10.0.0.2")
        server.add_pod("elsewhere", namespace="other", node_name="n1", pod_ip="10.0.0.3")
        server.set_pod_phase("p1", "Failed", namespace=NS)
        server.mark_pod_terminating("p1", namespace=NS)
        server.delete_pod("p1", namespace=NS)

    events = await during_watch(server, watch_events(core, resource_version=rv), changes)
    assert summary(events) == [("ADDED", "p1"), ("MODIFIED", "p1"), ("MODIFIED", "p1"), ("DELETED", "p1")]
    assert events[1]["object"].status.phase == "Failed"  # deserialised into V1Pod by the client
    assert events[2]["object"].metadata.deletion_timestamp is not None
    versions = [int(e["raw_object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(set(versions)) and versions[-1] == server.resource_version


async def test_watch_without_version_starts_with_the_current_objects(
    server: ApiServerStandin, core: client.CoreV1Api
) -> None:
    add_pods(server)
    events = await during_watch(
        server,
        watch_events(core, label_selector="app=web"),
        lambda: server.add_pod("p-z", namespace=NS, node_name="n1", pod_ip="10.0.0.9", labels={"app": "web"}),
    )
    assert summary(events) == [("ADDED", "p-a"), ("ADDED", "p-b"), ("ADDED", "p-z")]


async def test_resume_from_a_version_has_no_duplicates(server: ApiServerStandin, core: client.CoreV1Api) -> None:
    rv = (await core.list_namespaced_pod(NS)).metadata.resource_version
    server.add_pod("p1", namespace=NS, node_name="n1", pod_ip="10.0.0.1")
    server.add_pod("p2", namespace=NS, node_name="n1", pod_ip="10.0.0.2")
    first = await during_watch(server, watch_events(core, resource_version=rv), lambda: None)
    assert summary(first) == [("ADDED", "p1"), ("ADDED", "p2")]  # replayed from the history

    last_rv = first[-1]["raw_object"]["metadata"]["resourceVersion"]
    server.set_pod_phase("p1", "Succeeded", namespace=NS)
    server.add_pod("p3", namespace=NS, node_name="n1", pod_ip="10.0.0.3")
    second = await during_watch(
        server, watch_events(core, resource_version=last_rv), lambda: server.delete_pod("p2", namespace=NS)
    )
    assert summary(second) == [("MODIFIED", "p1"), ("ADDED", "p3"), ("DELETED", "p2")]


async def test_selector_changes_become_added_and_deleted(server: ApiServerStandin, core: client.CoreV1Api) -> None:
    add_pods(server)
    rv = str(server.resource_version)

    def relabel(app: str) -> Callable[[dict[str, Any]], None]:
        return lambda pod: pod["metadata"]["labels"].__setitem__("app", app)

    def changes() -> None:
        server.update_pod("p-c", relabel("web"), namespace=NS)  # starts matching
        server.update_pod("p-a", relabel("db"), namespace=NS)  # stops matching
        server.set_pod_phase("p-b", "Failed", namespace=NS)  # keeps matching
        server.delete_pod("p-d", namespace=NS)  # never matched

    events = await during_watch(server, watch_events(core, resource_version=rv, label_selector="app=web"), changes)
    assert summary(events) == [("ADDED", "p-c"), ("DELETED", "p-a"), ("MODIFIED", "p-b")]
    gone = events[1]["raw_object"]["metadata"]
    assert gone["labels"]["app"] == "web"  # its last matching state, with the change's version
    assert int(gone["resourceVersion"]) == int(events[0]["raw_object"]["metadata"]["resourceVersion"]) + 1


async def test_field_selector_on_watch(server: ApiServerStandin, http: Http) -> None:
    add_pods(server)
    task = asyncio.ensure_future(http.stream("/api/v1/pods", watch="true", fieldSelector="spec.nodeName=n2"))
    await until(lambda: server.watch_count == 1)
    server.add_pod("p-n1", namespace=NS, node_name="n1", pod_ip="10.0.0.7")
    server.add_pod("p-n2", namespace=NS, node_name="n2", pod_ip="10.0.0.8")
    server.end_watches()
    events = await task
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "p-b"),
        ("ADDED", "p-d"),
        ("ADDED", "p-n2"),
    ]
    assert events[0]["object"]["kind"] == "Pod"  # watch objects carry kind/apiVersion


async def test_bookmarks_carry_the_current_version(server: ApiServerStandin, core: client.CoreV1Api) -> None:
    server.add_pod("p1", namespace=NS, node_name="n1", pod_ip="10.0.0.1")
    server.add_pod("p2", namespace="other", node_name="n1", pod_ip="10.0.0.2")  # moves the version too
    started = time.monotonic()
    async with watch.Watch() as w:
        stream = w.stream(core.list_namespaced_pod, NS, allow_watch_bookmarks=True, timeout_seconds=5)
        assert (await stream.__anext__())["type"] == "ADDED"
        bookmark = await stream.__anext__()
        assert bookmark["type"] == "BOOKMARK"
        assert bookmark["raw_object"] == {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(server.resource_version)},
        }
        assert w.resource_version == str(server.resource_version)  # the client resumes from here
    assert 0.15 < time.monotonic() - started < 2


async def test_no_bookmarks_unless_asked_and_server_side_watch_limit() -> None:
    server = ApiServerStandin(bookmark_interval=0.05, max_watch_seconds=0.4)
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            http = Http(server, session)
            started = time.monotonic()
            assert await http.stream("/api/v1/nodes", watch="1") == []
            assert 0.35 < time.monotonic() - started < 2
            started = time.monotonic()
            events = await http.stream("/api/v1/nodes", watch="1", allowWatchBookmarks="true")
            assert len(events) >= 3 and {e["type"] for e in events} == {"BOOKMARK"}
            assert events[0]["object"]["kind"] == "Node"
            assert 0.35 < time.monotonic() - started < 2
    finally:
        await server.stop()


async def test_timeout_seconds_ends_the_stream(server: ApiServerStandin, core: client.CoreV1Api) -> None:
    started = time.monotonic()
    async with watch.Watch() as w:
        events = [e async for e in w.stream(core.list_node, timeout_seconds=1)]
    assert events == []
    assert 0.9 < time.monotonic() - started < 3


async def test_too_old_version_is_a_410_error_event_in_a_200_stream(server: ApiServerStandin, http: Http) -> None:
    server.add_pod("p1", namespace=NS, node_name="n1", pod_ip="10.0.0.1")
    old = server.resource_version
    server.compact()
    events = await http.stream("/api/v1/pods", watch="true", resourceVersion=str(old))
    assert events == [
        {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f"too old resource version: {old} ({server.resource_version})",
                "reason": "Expired",
                "code": 410,
            },
        }
    ]
    # A fresh list after the compaction hands out a version that can be watched from.
    _, listed = await http.get("/api/v1/pods")
    task = asyncio.ensure_future(
        http.stream("/api/v1/pods", watch="true", resourceVersion=listed["metadata"]["resourceVersion"])
    )
    await until(lambda: server.watch_count == 1)
    server.delete_pod("p1", namespace=NS)
    server.end_watches()
    assert [e["type"] for e in await task] == ["DELETED"]


async def test_history_is_bounded() -> None:
    server = ApiServerStandin(history_size=5)
    await server.start()
    try:
        versions = []
        for i in range(10):
            server.add_pod(f"p{i}", namespace=NS, node_name="n1", pod_ip=f"10.0.0.{i}")
            versions.append(server.resource_version)
        async with aiohttp.ClientSession() as session:
            http = Http(server, session)
            expired = await http.stream("/api/v1/pods", watch="1", resourceVersion=str(versions[3]))
            assert expired[0]["object"]["code"] == 410
            task = asyncio.ensure_future(http.stream("/api/v1/pods", watch="1", resourceVersion=str(versions[4])))
            await until(lambda: server.watch_count == 1)
            server.end_watches()
            assert [e["object"]["metadata"]["name"] for e in await task] == [f"p{i}" for i in range(5, 10)]
    finally:
        await server.stop()


async def test_kubernetes_asyncio_410_behaviour(server: ApiServerStandin, core: client.CoreV1Api) -> None:
    """What the client really does with 410 (kubernetes_asyncio 36.1, checked here): with
    timeout_seconds it raises at once; without, it retries once from the same (still too
    old) version, then raises."""
    server.add_pod("p1", namespace=NS, node_name="n1", pod_ip="10.0.0.1")
    old = str(server.resource_version)
    server.compact()

    async with watch.Watch() as w:
        with pytest.raises(ApiException) as raised:
            await w.stream(core.list_namespaced_pod, NS, resource_version=old, timeout_seconds=5).__anext__()
    assert raised.value.status == 410
    assert raised.value.reason == f"Expired: too old resource version: {old} ({server.resource_version})"
    assert server.count("pods", verb="watch") == 1

    server.clear_requests()
    async with watch.Watch() as w:
        with pytest.raises(ApiException) as raised:
            await w.stream(core.list_namespaced_pod, NS, resource_version=old, _request_timeout=5).__anext__()
    assert raised.value.status == 410
    watches = [r for r in server.requests if r.is_watch]
    assert [r.query["resourceVersion"] for r in watches] == [old, old]


async def test_end_watches_makes_clients_resume_from_their_last_version(
    server: ApiServerStandin, core: client.CoreV1Api
) -> None:
    """The list-then-watch pattern: after the first list, only watches (no relist)."""
    listed = await core.list_namespaced_pod(NS)
    got: list[tuple[str, str]] = []
    async with watch.Watch() as w:
        # No timeout_seconds: kubernetes_asyncio reconnects by itself when a stream ends.
        stream = w.stream(core.list_namespaced_pod, NS, resource_version=listed.metadata.resource_version)
        server.add_pod("p1", namespace=NS, node_name="n1", pod_ip="10.0.0.1")
        got += summary([await asyncio.wait_for(stream.__anext__(), 5)])
        server.end_watches()
        # The client notices the end (and reconnects) only while it waits for the next event.
        following = asyncio.ensure_future(stream.__anext__())
        await until(lambda: server.count("pods", verb="watch") == 2 and server.watch_count == 1)
        server.add_pod("p2", namespace=NS, node_name="n1", pod_ip="10.0.0.2")
        got += summary([await asyncio.wait_for(following, 5)])
    assert got == [("ADDED", "p1"), ("ADDED", "p2")]
    resumed = [r for r in server.requests if r.is_watch][1]
    p1 = server.pod("p1", namespace=NS)
    assert p1 is not None and resumed.query["resourceVersion"] == p1["metadata"]["resourceVersion"]
    assert server.count("pods", verb="list") == 1
    assert server.count("pods", watch=False) == 1


async def test_a_client_leaving_ends_its_watch(server: ApiServerStandin, http: Http) -> None:
    server.add_node("n1")
    async with http.session.get(
        server.url + "/api/v1/nodes", params={"watch": "1"}, ssl=http.ssl, headers=http.headers()
    ) as resp:
        assert json.loads(await resp.content.readline())["type"] == "ADDED"
        assert server.watch_count == 1
        resp.close()  # drops the connection
    await until(lambda: server.watch_count == 0)


# Outage ------------------------------------------------------------------------------------


async def test_down_refuses_connections_and_up_restores_the_same_server(server: ApiServerStandin) -> None:
    server.add_node("n1")
    port, ca = server.port, server.ca_pem
    async with aiohttp.ClientSession() as session:
        http = Http(server, session)
        assert (await http.get("/api/v1/nodes"))[0] == 200  # leaves a keep-alive connection open
        async with session.get(
            server.url + "/api/v1/nodes", params={"watch": "1"}, ssl=http.ssl, headers=http.headers()
        ) as resp:
            assert json.loads(await resp.content.readline())["type"] == "ADDED"
            await server.down()
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(resp.content.read(), 5)  # cut off, not cleanly ended
        assert server.watch_count == 0
        with pytest.raises(aiohttp.ClientConnectorError) as refused:
            await http.get("/api/v1/nodes")
        assert refused.value.os_error.errno == errno.ECONNREFUSED

        server.add_node("n2")  # the cluster goes on while the API server is away
        await server.up()
        assert (server.port, server.ca_pem) == (port, ca)
        status, body = await http.get("/api/v1/nodes")  # same session, same trusted CA
        assert (status, names(body["items"])) == (200, ["n1", "n2"])


# Mutations ---------------------------------------------------------------------------------


async def test_node_mutations(server: ApiServerStandin, http: Http, core: client.CoreV1Api) -> None:
    server.add_node("n1", labels={"zone": "a"}, internal_ip="192.0.2.1")
    server.add_node("n2", unschedulable=True, taints=["dedicated=gpu:NoSchedule"])
    server.cordon("n1")
    node = await core.read_node("n1")
    assert node.spec.unschedulable is True
    assert [(t.key, t.effect) for t in node.spec.taints] == [("node.kubernetes.io/unschedulable", "NoSchedule")]
    assert node.metadata.labels["zone"] == "a"
    assert node.status.addresses[0].address == "192.0.2.1"
    _, cordoned = await http.get("/api/v1/nodes", fieldSelector="spec.unschedulable=true")
    assert names(cordoned["items"]) == ["n1", "n2"]

    server.uncordon("n1")
    raw = server.node("n1")
    assert raw is not None and "unschedulable" not in raw["spec"] and "taints" not in raw["spec"]
    server.taint_node("n1", "example.com/maintenance", effect="NoExecute")
    server.untaint("n2", "dedicated")
    assert [t["key"] for t in server.node("n1")["spec"]["taints"]] == ["example.com/maintenance"]  # type: ignore[index]
    assert "taints" not in server.node("n2")["spec"]  # type: ignore[index]

    server.delete_node("n2")
    assert (await http.get("/api/v1/nodes/n2"))[0] == 404
    with pytest.raises(ValueError):
        server.add_node("n1")
    with pytest.raises(KeyError):
        server.cordon("n2")


async def test_request_log(server: ApiServerStandin, http: Http) -> None:
    server.add_node("n1")
    await http.get("/api/v1/nodes")
    await http.get("/api/v1/nodes/n1")
    await http.get("/api/v1/namespaces/x/pods", labelSelector="a=b")
    await http.get("/version", token=None)
    rv = str(server.resource_version)
    await during_watch(server, http.stream("/api/v1/pods", watch="true", resourceVersion=rv), lambda: None)
    assert [(r.kind, r.verb, r.authorized) for r in server.requests] == [
        ("nodes", "list", True),
        ("nodes", "get", True),
        ("pods", "list", True),
        ("version", "get", False),
        ("pods", "watch", True),
    ]
    assert server.requests[2].query == {"labelSelector": "a=b"} and server.requests[2].namespace == "x"
    assert server.count("nodes", watch=False) == 2
    assert server.count(verb="watch") == 1
    assert server.count(since=server.requests[3].time) == 2


# Scale and process -------------------------------------------------------------------------


async def test_five_thousand_pods_and_nodes_list_fast(server: ApiServerStandin, http: Http) -> None:
    started = time.perf_counter()
    for i in range(5000):
        server.add_node(f"node-{i:04}")
        server.add_pod(f"pod-{i:04}", namespace=NS, node_name=f"node-{i:04}", pod_ip=f"10.4.{i // 250}.{i % 250}")
    filled = time.perf_counter() - started
    timings = {}
    for path in ("/api/v1/pods", "/api/v1/nodes"):
        started = time.perf_counter()
        async with http.session.get(server.url + path, ssl=http.ssl, headers=http.headers()) as resp:
            body = await resp.read()
        timings[path] = time.perf_counter() - started
        assert len(json.loads(body)["items"]) == 5000
    started = time.perf_counter()
    pages, token = 0, ""
    while True:
        _, page = await http.get("/api/v1/pods", limit="500", **({"continue": token} if token else {}))
        pages, token = pages + 1, page["metadata"].get("continue", "")
        if not token:
            break
    paged = time.perf_counter() - started
    print(
        f"\nstand-in: 10,000 objects added in {filled:.2f}s; list 5,000 pods {timings['/api/v1/pods']:.3f}s "
        f"(nodes {len(body) // 1024} KiB), nodes {timings['/api/v1/nodes']:.3f}s; 10 pages of 500 in {paged:.3f}s"
    )
    assert pages == 10
    assert max(timings.values()) < 5


async def test_runs_as_a_process(tmp_path: Path) -> None:
    sa = tmp_path / "sa"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kubenurse_sandbox.standin",
        "--serviceaccount-dir",
        str(sa),
        "--namespace",
        "sandbox",
        "--nodes",
        "3",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode().strip()
        assert url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(sa / "ca.crt"))
        headers = {"Authorization": f"Bearer {(sa / 'token').read_text()}"}
        async with (
            aiohttp.ClientSession() as session,
            session.get(url + "/api/v1/nodes", ssl=ctx, headers=headers) as resp,
        ):
            assert names((await resp.json())["items"]) == ["node-0", "node-1", "node-2"]
        assert (sa / "namespace").read_text() == "sandbox"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_burst_of_changes_with_a_bookmark_due_is_all_delivered() -> None:
    # A bookmark falling due while changes are queued must not stall the stream.
    server = ApiServerStandin(bookmark_interval=0.05)
    await server.start()
    try:
        ctx = ssl.create_default_context(cadata=server.ca_pem.decode())
        headers = {"Authorization": f"Bearer {server.token}"}
        url = f"{server.url}/api/v1/nodes?watch=true&allowWatchBookmarks=true&resourceVersion={server.resource_version}"
        seen: set[str] = set()
        async with aiohttp.ClientSession() as session, session.get(url, headers=headers, ssl=ctx) as resp:
            await asyncio.sleep(0.1)  # a bookmark is due
            for i in range(200):
                server.add_node(f"burst-{i}")
            async with asyncio.timeout(10):
                while len(seen) < 200:
                    event = json.loads(await resp.content.readline())
                    if event["type"] == "ADDED":
                        seen.add(event["object"]["metadata"]["name"])
        assert len(seen) == 200
    finally:
        await server.stop()


# What the narrow watches need: metadata only, node field selectors, realistic nodes -------

PARTIAL_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
PARTIAL = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


async def raw(http: Http, path: str, accept: str, **params: str) -> tuple[int, str]:
    headers = {**http.headers(), "Accept": accept}
    async with http.session.get(http.server.url + path, params=params, ssl=http.ssl, headers=headers) as resp:
        return resp.status, await resp.text()


async def test_metadata_only_lists_and_watches(server: ApiServerStandin, http: Http) -> None:
    for i in range(3):
        server.add_node(f"n{i}", labels={"i": str(i)})
    status, text = await raw(http, "/api/v1/nodes", PARTIAL_LIST + ",application/json", limit="2")
    body = json.loads(text)
    assert status == 200 and (body["kind"], body["apiVersion"]) == ("PartialObjectMetadataList", "meta.k8s.io/v1")
    assert [item["kind"] for item in body["items"]] == ["PartialObjectMetadata"] * 2
    assert set(body["items"][0]) == {"kind", "apiVersion", "metadata"} and body["items"][0]["metadata"]["labels"]["i"]
    assert body["metadata"]["continue"]  # paged like the full form
    # A list asked for in the watch's form (or anything unknown) is refused, as the real server does.
    assert (await raw(http, "/api/v1/nodes", PARTIAL))[0] == 406
    assert (await raw(http, "/api/v1/nodes", "application/json;as=Table;g=meta.k8s.io;v=v1"))[0] == 406
    assert json.loads((await raw(http, "/api/v1/nodes", "application/json"))[1])["kind"] == "NodeList"

    rv = body["metadata"]["resourceVersion"]

    async def changes() -> None:
        await asyncio.sleep(0.05)
        server.cordon("n1")
        server.heartbeat("n2")

    task = asyncio.create_task(changes())
    status, text = await raw(http, "/api/v1/nodes", PARTIAL, watch="true", resourceVersion=rv,
                             allowWatchBookmarks="true", timeoutSeconds="1")
    await task
    events = [json.loads(line) for line in text.splitlines()]
    assert [(e["type"], e["object"]["metadata"].get("name")) for e in events if e["type"] != "BOOKMARK"] == [
        ("MODIFIED", "n1"), ("MODIFIED", "n2")]
    assert all(set(e["object"]) == {"kind", "apiVersion", "metadata"} for e in events)
    bookmarks = [e for e in events if e["type"] == "BOOKMARK"]
    assert bookmarks and bookmarks[0]["object"]["kind"] == "PartialObjectMetadata"


async def test_the_cordoned_selection_sees_cordon_and_uncordon_only(server: ApiServerStandin, http: Http) -> None:
    server.add_node("a")
    server.add_node("b", unschedulable=True)
    _, text = await raw(http, "/api/v1/nodes", PARTIAL_LIST, fieldSelector="spec.unschedulable=true")
    listed = json.loads(text)
    assert [i["metadata"]["name"] for i in listed["items"]] == ["b"]

    async def changes() -> None:
        await asyncio.sleep(0.05)
        server.heartbeat("a")  # not selected: nothing
        server.cordon("a")
        server.heartbeat("a")  # selected now: a metadata-only MODIFIED
        server.uncordon("a")

    task = asyncio.create_task(changes())
    _, text = await raw(http, "/api/v1/nodes", PARTIAL, watch="true", fieldSelector="spec.unschedulable=true",
                        resourceVersion=listed["metadata"]["resourceVersion"], timeoutSeconds="1")
    await task
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in map(json.loads, text.splitlines())] == [
        ("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]


async def test_a_list_from_the_watch_cache_ignores_limit(server: ApiServerStandin, http: Http) -> None:
    for i in range(5):
        server.add_node(f"n{i}")
    _, cached = await http.get("/api/v1/nodes", limit="2", resourceVersion="0")
    _, consistent = await http.get("/api/v1/nodes", limit="2")
    assert len(cached["items"]) == 5 and "continue" not in cached["metadata"]
    assert len(consistent["items"]) == 2 and consistent["metadata"]["continue"]


async def test_realistic_nodes_and_heartbeats_at_a_chosen_rate(http: Http) -> None:
    server = ApiServerStandin(realistic_nodes=True, bookmark_interval=3600)
    for i in range(100):
        server.add_node(f"n{i}")
    await server.start()
    try:
        node = server.node("n1") or {}
        size = len(json.dumps(node, separators=(",", ":")))
        assert 5_000 < size < 20_000, size
        assert len(node["status"]["images"]) >= 40 and len(node["status"]["conditions"]) >= 8
        rv = server.resource_version
        # Every node every 2 s plus 10% flapping every 0.5 s: 50 + 40 updates a second.
        server.start_heartbeats(period=2.0, flapping=0.1, flap_period=0.5)
        await asyncio.sleep(1.0)
        server.stop_heartbeats()
        updates = server.resource_version - rv
        assert 60 <= updates <= 120, updates

        def flapping(obj: dict[str, Any]) -> str:
            return next(c["status"] for c in obj["status"]["conditions"] if c["type"] == "FrequentContainerdRestart")

        changes = server._store.changes_since(rv) or []
        flips = sum(1 for c in changes if c.old is not None and flapping(c.old.obj) != flapping(c.new.obj))
        assert 10 <= flips <= 40, flips  # 10 nodes turning it over twice a second
    finally:
        await server.stop()


async def test_bytes_and_events_sent_are_counted_per_client(server: ApiServerStandin, http: Http) -> None:
    server.add_node("a")
    headers = {**http.headers(), "User-Agent": "counted"}
    async with http.session.get(server.url + "/api/v1/nodes", ssl=http.ssl, headers=headers) as resp:
        body = await resp.read()
    assert server.sent_bytes["counted"] == len(body) and server.sent_events["counted"] == 0
    async with http.session.get(server.url + "/api/v1/nodes", ssl=http.ssl, headers=headers,
                                params={"watch": "1", "timeoutSeconds": "1"}) as resp:
        lines = await resp.read()
    assert server.sent_bytes["counted"] == len(body) + len(lines) and server.sent_events["counted"] == 1
    assert server.requests[-1].user_agent == "counted"


async def test_faults_short_watches_and_gone_after_list(server: ApiServerStandin, http: Http) -> None:
    server.add_node("a")
    _, listed = await http.get("/api/v1/nodes")
    rv = listed["metadata"]["resourceVersion"]
    server.fault = "short_watches"
    started = time.monotonic()
    events = await http.stream("/api/v1/nodes", watch="1", resourceVersion=rv, allowWatchBookmarks="true")
    assert [e["type"] for e in events] == ["BOOKMARK"] and time.monotonic() - started < 1
    server.fault = "gone_after_list"
    events = await http.stream("/api/v1/nodes", watch="1", resourceVersion=rv)
    assert [(e["type"], e["object"]["code"]) for e in events] == [("ERROR", 410)]
    with pytest.raises(ValueError):
        server.fault = "unknown"


async def test_runs_as_a_process_with_realistic_nodes_and_heartbeats(tmp_path: Path) -> None:
    sa = tmp_path / "sa"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubenurse_sandbox.standin", "--serviceaccount-dir", str(sa), "--nodes", "4",
        "--realistic-nodes", "--heartbeat-period", "0.2", "--flapping", "0",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode().strip()
        ctx = ssl.create_default_context(cafile=str(sa / "ca.crt"))
        headers = {"Authorization": f"Bearer {(sa / 'token').read_text()}"}
        async with aiohttp.ClientSession() as session:
            versions = []
            for _ in range(2):
                async with session.get(url + "/api/v1/nodes", ssl=ctx, headers=headers) as resp:
                    body = await resp.json()
                versions.append(int(body["metadata"]["resourceVersion"]))
                await asyncio.sleep(1.0)
        assert len(body["items"][0]["status"]["images"]) >= 40
        assert versions[1] - versions[0] >= 10  # 4 nodes x 5 updates a second, loosely
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
