"""Discovery against a real kube-apiserver (and etcd): the contract the stand-in tests check,
held against the real thing. Probe processes run as the DaemonSet runs them, with a real
service-account token (TokenRequest) bound by the project's own RBAC from k8s/."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from probe.discovery.cache import Reflector, Timing
from probe.discovery.kube import KubeClient, ServiceAccount
from probe.discovery.nodes import node_info
from probe.discovery.source import KubeDiscovery, pod_info
from probe.settings import Settings
from tests.conftest import free_port
from tests.e2e.cluster import expected_neighbours
from tests.real.cluster import RealCluster, rotate_token
from tests.real.conftest import FILTER, LABELS, NS, ProbeProcess, probe_env, wait_for

FAST = Timing(
    request_timeout=10.0, connect_timeout=5.0, watch_seconds=30.0, watch_grace=5.0, idle_timeout=90.0,
    quiet_after=70.0, backoff_initial=0.05, backoff_max=0.5, healthy_after=0.5, initial_sync=10.0,
    qps=500.0, burst=500,
)


async def eventually(check: Any, what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")


@pytest.fixture(scope="module")
def sa_dir(real_cluster: RealCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    token = real_cluster.token(NS, "kubenurse")
    return real_cluster.write_serviceaccount(tmp_path_factory.mktemp("sa"), token, NS)


def client_for(cluster: RealCluster, sa_dir: Path) -> KubeClient:
    return KubeClient(ServiceAccount(str(sa_dir), "127.0.0.1", cluster.port), qps=500, burst=500)


# Probe processes on the hash ring --------------------------------------------------------


@pytest.fixture(scope="module")
def ring(real_cluster: RealCluster, sa_dir: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[dict[str, ProbeProcess]]:
    """Four nodes, four probe pods, each probe checking one neighbour (limit 1: the next node
    on the ring), all on one port on 127.0.21.1-4."""
    logs = tmp_path_factory.mktemp("ring")
    names = [f"ring-{i}" for i in range(1, 5)]
    ips = {n: f"127.0.21.{i}" for i, n in enumerate(names, 1)}
    port = free_port("127.0.21.1")
    for name in names:
        real_cluster.add_node(name)
        real_cluster.add_pod(f"kubenurse-{name}", namespace=NS, node=name, ip=ips[name], labels=LABELS)
    probes: dict[str, ProbeProcess] = {}
    try:
        for name in names:
            env = probe_env(real_cluster, sa_dir, pod=f"kubenurse-{name}", node=name, ip=ips[name], port=port,
                            extra={"KUBENURSE_NEIGHBOUR_LIMIT": "1"})
            probes[name] = ProbeProcess(name, env, logs / f"{name}.log")
        yield probes
    finally:
        for probe in probes.values():
            probe.stop()
        for name in names:
            with contextlib.suppress(Exception):
                real_cluster.delete_pod(f"kubenurse-{name}", namespace=NS)
            with contextlib.suppress(Exception):
                real_cluster.delete_node(name)


def checked_nodes(probe: ProbeProcess) -> set[str]:
    results = probe.alive()["last_check_result"]
    return {n["NodeName"] for n in results.get("neighbourhood", [])}


def test_each_probe_checks_its_ring_neighbour_and_the_real_api_server(
    real_cluster: RealCluster, ring: dict[str, ProbeProcess]
) -> None:
    names = sorted(ring)
    for name, probe in ring.items():
        want = set(expected_neighbours(name, names, 1))
        wait_for(lambda p=probe, w=want: checked_nodes(p) == w, f"{name} checks {want}", process=probe)
        (target,) = want

        def path_ok(p: ProbeProcess = probe, t: str = target) -> bool:
            results = p.alive()["last_check_result"]
            return bool(results.get(f"path_{t}") == "ok" and results.get("api_server_direct") == "ok")

        wait_for(path_ok, f"{name}: path_{target} and api_server_direct ok", process=probe)
        alive = probe.alive()
        assert alive["discovery"]["stale"] is False, alive["discovery"]
        assert probe.ready() == 200


def test_cordon_moves_the_check_to_the_next_node_and_readiness_follows(
    real_cluster: RealCluster, ring: dict[str, ProbeProcess]
) -> None:
    names = sorted(ring)
    watcher = names[0]
    target = expected_neighbours(watcher, names, 1)[0]
    after = expected_neighbours(watcher, [n for n in names if n != target], 1)[0]
    real_cluster.cordon(target)
    try:
        wait_for(lambda: checked_nodes(ring[watcher]) == {after}, f"{watcher} moves to {after}",
                 process=ring[watcher])
        wait_for(lambda: ring[target].ready() == 503, f"{target} /ready 503 when cordoned", process=ring[target])
    finally:
        real_cluster.cordon(target, on=False)
    wait_for(lambda: checked_nodes(ring[watcher]) == {target}, f"{watcher} back on {target}")
    wait_for(lambda: ring[target].ready() == 200, f"{target} /ready 200 when uncordoned")


def test_pod_churn_and_node_deletion(real_cluster: RealCluster, ring: dict[str, ProbeProcess]) -> None:
    names = sorted(ring)
    watcher = names[1]
    target = expected_neighbours(watcher, names, 1)[0]
    rest = [n for n in names if n != target]
    after = expected_neighbours(watcher, rest, 1)[0]
    pod = real_cluster.get(f"/api/v1/namespaces/{NS}/pods/kubenurse-{target}")
    ip = pod["status"]["podIP"]

    real_cluster.delete_pod(f"kubenurse-{target}", namespace=NS)
    wait_for(lambda: checked_nodes(ring[watcher]) == {after}, f"{watcher} moves on when the pod goes")
    real_cluster.add_pod(f"kubenurse-{target}", namespace=NS, node=target, ip=ip, labels=LABELS)
    wait_for(lambda: checked_nodes(ring[watcher]) == {target}, f"{watcher} back when the pod is back")

    # A pod that is not Running yet is not checked (phase from the status subresource).
    real_cluster.set_pod_status(f"kubenurse-{target}", namespace=NS, ip=ip, phase="Pending")
    wait_for(lambda: checked_nodes(ring[watcher]) == {after}, f"{watcher} skips a Pending pod")
    real_cluster.set_pod_status(f"kubenurse-{target}", namespace=NS, ip=ip, phase="Running")
    wait_for(lambda: checked_nodes(ring[watcher]) == {target}, f"{watcher} back on Running")

    # The node goes (its pod stays, as pods of a deleted node do until garbage collection).
    real_cluster.delete_node(target)
    try:
        wait_for(lambda: checked_nodes(ring[watcher]) == {after}, f"{watcher} drops a deleted node")
        wait_for(lambda: ring[target].ready() == 503, "the deleted node's own probe is not ready")
    finally:
        real_cluster.add_node(target)
    wait_for(lambda: checked_nodes(ring[watcher]) == {target}, f"{watcher} back when the node returns")
    wait_for(lambda: ring[target].ready() == 200, "ready again with its node back")


# The API conversation, in-process, with short timings -------------------------------------


@contextlib.asynccontextmanager
async def reflecting(reflector: Reflector[Any]) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(reflector.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class CountingClient(KubeClient):
    """Counts the list pages it fetches."""

    pages = 0

    async def get(self, path: str, params: Any, **kwargs: Any) -> bytearray:
        self.pages += 1
        return await super().get(path, params, **kwargs)


async def test_paged_lists_return_every_pod(real_cluster: RealCluster, sa_dir: Path) -> None:
    ns_pods = [f"paged-{i}" for i in range(7)]
    labels = {"paged": "yes"}
    real_cluster.add_node("paged-node")
    for i, name in enumerate(ns_pods):
        real_cluster.add_pod(name, namespace=NS, node="paged-node", ip=f"127.0.22.{i + 1}", labels=labels)
    client = CountingClient(ServiceAccount(str(sa_dir), "127.0.0.1", real_cluster.port), qps=500, burst=500)
    await client.credentials.load()
    try:
        timing = Timing(**{**FAST.__dict__, "page_size": 3})
        reflector = Reflector(client, "pods", f"/api/v1/namespaces/{NS}/pods", pod_info,
                              label_selector="paged=yes", timing=timing)
        async with reflecting(reflector):
            await asyncio.wait_for(reflector.synced.wait(), 15)
            assert set(reflector.items) == set(ns_pods)
            assert client.pages == 3  # 3 + 3 + 1: the real server honours `limit` and `continue`
            assert all(p.phase == "Running" and p.pod_ip for p in reflector.items.values())
    finally:
        await client.close()
        for name in ns_pods:
            real_cluster.delete_pod(name, namespace=NS)
        real_cluster.delete_node("paged-node")


async def test_metadata_only_watch_of_cordoned_nodes(real_cluster: RealCluster, sa_dir: Path) -> None:
    """The "front" mode's cluster-wide watch: spec.unschedulable=true as a field selector,
    PartialObjectMetadata only."""
    from probe.discovery.nodes import cordoned_info

    client = client_for(real_cluster, sa_dir)
    await client.credentials.load()
    real_cluster.add_node("meta-node")
    try:
        reflector = Reflector(client, "cordoned nodes", "/api/v1/nodes", cordoned_info,
                              field_selector="spec.unschedulable=true", metadata_only=True, timing=FAST)
        async with reflecting(reflector):
            await asyncio.wait_for(reflector.synced.wait(), 15)
            assert "meta-node" not in reflector.items
            real_cluster.cordon("meta-node")
            await eventually(lambda: "meta-node" in reflector.items, "cordoned node seen")
            real_cluster.cordon("meta-node", on=False)
            # Leaving a field selector's set arrives as a DELETED event.
            await eventually(lambda: "meta-node" not in reflector.items, "uncordoned node gone")
            assert reflector.malformed == 0
        # What the server really sends for that Accept header.
        body = await client.get("/api/v1/nodes", {"limit": "1"}, timeout=10,
                                accept="application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1")
        listed = json.loads(body)
        assert listed["kind"] == "PartialObjectMetadataList" and listed["apiVersion"] == "meta.k8s.io/v1"
        assert "spec" not in listed["items"][0]
    finally:
        await client.close()
        real_cluster.delete_node("meta-node")


async def watch_events(client: KubeClient, params: dict[str, str], seconds: int) -> list[tuple[float, dict[str, Any]]]:
    started = time.monotonic()
    events = []
    async with client.stream("/api/v1/nodes", {**params, "watch": "true", "allowWatchBookmarks": "true",
                                               "timeoutSeconds": str(seconds)}, total=seconds + 10, idle=seconds + 10
                             ) as lines:
        async for line in lines:
            events.append((time.monotonic() - started, json.loads(line)))
    return events


async def test_bookmarks_carry_progress_only(real_cluster: RealCluster, sa_dir: Path) -> None:
    """kube-apiserver bookmarks a watch (about once a minute, and 2 s before it ends) only when
    its resource's version moved past what the watch was sent: a quiet watch hears nothing."""
    client = client_for(real_cluster, sa_dir)
    await client.credentials.load()
    real_cluster.add_node("bm-watched")
    real_cluster.add_node("bm-other")
    try:
        listed = json.loads(await client.get("/api/v1/nodes", {"limit": "1"}, timeout=10))
        since = listed["metadata"]["resourceVersion"]
        one = {"resourceVersion": since, "fieldSelector": "metadata.name=bm-watched"}
        assert await watch_events(client, one, 4) == []  # nothing changed: not a byte

        async def elsewhere() -> None:
            await asyncio.sleep(0.5)
            real_cluster.cordon("bm-other")

        task = asyncio.create_task(elsewhere())
        events = await watch_events(client, one, 4)
        await task
        # No event for the other node; bookmarks of the version it moved to, the first one
        # 2 s before the end (the real server may send a second right after it). Its watch
        # cache fires bookmarks from timers in 1 s buckets, so "2 s before" is 1 to 2 s in
        # (seen at 1.30 s once).
        assert events and all(e["type"] == "BOOKMARK" for _, e in events), events
        at, bookmark = events[0]
        assert 1.0 <= at < 3.9, events
        assert int(bookmark["object"]["metadata"]["resourceVersion"]) > int(since)
        assert bookmark["object"]["kind"] == "Node" and set(bookmark["object"]["metadata"]) == {"resourceVersion"}

        # A resourceVersion=0 watch: the current state, then at once an annotated bookmark.
        events = await watch_events(client, {"resourceVersion": "0", "fieldSelector": "metadata.name=bm-watched"}, 3)
        assert [e["type"] for _, e in events] == ["ADDED", "BOOKMARK"] and events[1][0] < 1
        assert events[1][1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    finally:
        await client.close()
        real_cluster.delete_node("bm-watched")
        real_cluster.delete_node("bm-other")


async def test_a_watch_from_before_a_restart_gets_410_and_lists_again(
    real_cluster: RealCluster, sa_dir: Path
) -> None:
    """The probe was away while pods changed and the API server restarted: its resource
    version is older than the new watch cache, the server answers 410, the probe lists again
    and ends with the right pods."""
    client = client_for(real_cluster, sa_dir)
    await client.credentials.load()
    labels = {"gone": "yes"}
    real_cluster.add_node("gone-node")
    real_cluster.add_pod("gone-a", namespace=NS, node="gone-node", ip="127.0.23.1", labels=labels)
    try:
        reflector = Reflector(client, "pods", f"/api/v1/namespaces/{NS}/pods", pod_info,
                              label_selector="gone=yes", timing=FAST)
        async with reflecting(reflector):
            await asyncio.wait_for(reflector.synced.wait(), 15)
            assert set(reflector.items) == {"gone-a"}
        old_version = reflector.resource_version
        real_cluster.delete_pod("gone-a", namespace=NS)
        real_cluster.add_pod("gone-b", namespace=NS, node="gone-node", ip="127.0.23.2", labels=labels)
        real_cluster.stop_apiserver()
        real_cluster.start_apiserver()
        assert reflector.resource_version == old_version
        async with reflecting(reflector):
            await eventually(lambda: set(reflector.items) == {"gone-b"}, "the pods as they are now", 30)
        assert reflector.relists_after_gone >= 1
    finally:
        await client.close()
        for name in ("gone-a", "gone-b"):
            with contextlib.suppress(Exception):
                real_cluster.delete_pod(name, namespace=NS)
        real_cluster.delete_node("gone-node")


async def test_a_revoked_token_recovers_when_the_new_one_is_written(
    real_cluster: RealCluster, tmp_path: Path
) -> None:
    """Rotation as the kubelet does it: the old token stops working (here: the Secret it is
    bound to is deleted), a new one is written over the file; discovery carries on."""
    for secret in ("rotation-1", "rotation-2"):
        real_cluster.request("POST", f"/api/v1/namespaces/{NS}/secrets",
                             {"metadata": {"name": secret}, "type": "Opaque"})
    first = real_cluster.token(NS, "kubenurse", bound_secret="rotation-1")
    directory = real_cluster.write_serviceaccount(tmp_path / "sa", first, NS)
    real_cluster.add_node("rotation-node")
    settings = Settings(kubernetes_service_host="127.0.0.1", kubernetes_service_port=real_cluster.port,
                        serviceaccount_dir=str(directory), neighbour_filter=FILTER, pod_name="kubenurse-rotation",
                        node_name="rotation-node", pod_namespace=NS)
    credentials = ServiceAccount(str(directory), "127.0.0.1", real_cluster.port)
    # Watches end every 1-2 s, so each new one shows whether the token still works.
    timing = Timing(**{**FAST.__dict__, "watch_seconds": 1.0})
    discovery = KubeDiscovery(settings, credentials, timing=timing)
    await discovery.start()
    try:
        assert discovery.kube_neighbours is not None
        pods = discovery.kube_neighbours.pods
        assert pods is not None
        await asyncio.wait_for(pods.synced.wait(), 15)
        real_cluster.request("DELETE", f"/api/v1/namespaces/{NS}/secrets/rotation-1")
        await eventually(lambda: pods.error and "401" in pods.error, "401 with the revoked token", 20)
        rotate_token(directory, real_cluster.token(NS, "kubenurse", bound_secret="rotation-2"))
        await eventually(lambda: pods.error is None and pods.connected, "connected again with the new token", 20)
        real_cluster.add_pod("rotation-late", namespace=NS, node="rotation-node", ip="127.0.24.1", labels=LABELS)
        await eventually(lambda: "rotation-late" in pods.items, "a pod made after the rotation")
    finally:
        await discovery.stop()
        with contextlib.suppress(Exception):
            real_cluster.delete_pod("rotation-late", namespace=NS)
        real_cluster.delete_node("rotation-node")
        with contextlib.suppress(Exception):
            real_cluster.request("DELETE", f"/api/v1/namespaces/{NS}/secrets/rotation-2")


async def test_node_decoder_reads_real_nodes(real_cluster: RealCluster, sa_dir: Path) -> None:
    real_cluster.add_node("decode-node", unschedulable=True)
    try:
        info = node_info(real_cluster.get("/api/v1/nodes/decode-node"))
        assert info.name == "decode-node" and info.unschedulable
    finally:
        real_cluster.delete_node("decode-node")
