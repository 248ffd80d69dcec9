"""IPv6 end to end (kubenurse supports IPv6 services, its PR #218): two probes, each in its
own network namespace with an IPv6 pod IP on the bridge, find each other through the
API-server stand-in listening on the bridge's IPv6 address, then check each other as
neighbours (http://[ip]:8080/alwayshappy) and through an IPv6 extra check.

Traffic stays on the session's bridge (a ULA /64 of its own, no route anywhere else).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import netns
from tests.e2e.cluster import LABELS, NAMESPACE, PROBE_PORT
from tests.e2e.netns import Bridge, Namespace, run, which
from tests.e2e.services import Process, ThreadedStandin, wait_port

NODES = ["v6-node-1", "v6-node-2"]
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def ula_prefix() -> str:
    """A unique-local /64 of this session (fd00::/8 is never routed beyond a site)."""
    return f"fd6b:6e75:{netns.session_id() & 0xFFFF:x}:1"


def alive(address: str) -> dict[str, Any]:
    try:
        with _DIRECT.open(f"http://[{address}]:{PROBE_PORT}/alive", timeout=3) as response:
            return dict(json.load(response))
    except urllib.error.HTTPError as e:
        return dict(json.load(e))


def test_probes_on_ipv6_pod_ips_check_each_other(tmp_path: Path) -> None:
    reason = netns.unsupported_reason()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    netns.sweep_leftovers()
    ip = which("ip") or "ip"
    prefix = ula_prefix()
    with contextlib.ExitStack() as stack:
        bridge = Bridge.create(netns.free_subnet())
        stack.callback(bridge.delete)
        api_ip = f"{prefix}::1"
        run(ip, "-6", "addr", "add", f"{api_ip}/64", "dev", bridge.name, "nodad")
        standin = ThreadedStandin(api_ip, 443)
        stack.callback(standin.close)
        stack.callback(netns.wait_gone, [f"{netns.LINK_PREFIX}{netns.session_id():x}v{i}" for i in range(len(NODES))])
        pods: dict[str, str] = {}
        for i, name in enumerate(NODES):
            pod_ip = f"{prefix}::{0x11 + i:x}"
            # Namespace.create gives eth0 an IPv4 address too; nothing here uses it.
            ns = Namespace.create(name, i, bridge, bridge.host(11 + i), nameserver=bridge.host(1))
            stack.callback(ns.delete)
            run(ip, "-n", ns.name, "-6", "addr", "add", f"{pod_ip}/64", "dev", "eth0", "nodad")
            standin.call(lambda s, name=name, pod_ip=pod_ip: s.add_node(name, internal_ip=pod_ip))
            standin.call(lambda s, name=name, pod_ip=pod_ip: s.add_pod(
                f"kubenurse-{name}", namespace=NAMESPACE, node_name=name, pod_ip=pod_ip, labels=LABELS))
            pods[name] = pod_ip
        sa_dir = tmp_path / "serviceaccount"
        sa_dir.mkdir()
        standin.call(lambda s: s.write_serviceaccount(sa_dir, NAMESPACE))

        processes: list[Process] = []
        for i, name in enumerate(NODES):
            peer = pods[NODES[1 - i]]
            env = {
                "POD_NAME": f"kubenurse-{name}",
                "NODE_NAME": name,
                "POD_NAMESPACE": NAMESPACE,
                "KUBENURSE_NAMESPACE": NAMESPACE,
                "KUBENURSE_NEIGHBOUR_FILTER": ",".join(f"{k}={v}" for k, v in LABELS.items()),
                "KUBENURSE_LISTEN_HOST": "::",
                "KUBERNETES_SERVICE_HOST": api_ip,
                "KUBERNETES_SERVICE_PORT": "443",
                "KUBENURSE_SERVICEACCOUNT_DIR": str(sa_dir),
                "KUBENURSE_CHECK_API_SERVER_DNS": "false",  # no cluster DNS in this small setup
                "KUBENURSE_EXTRA_CHECKS": f"peer_v6:http://[{peer}]:{PROBE_PORT}/alwayshappy",
                "KUBENURSE_CHECK_INTERVAL": "500ms",
                "KUBENURSE_SHUTDOWN_DURATION": "0s",
            }
            ns_name = f"{netns.NS_PREFIX}{netns.session_id()}-{name}"
            process = Process(f"probe {name}", [ip, "netns", "exec", ns_name, sys.executable, "-m", "probe"],
                              tmp_path / f"probe-{name}.log", env)
            processes.append(process)
            stack.callback(process.stop)
        for name, process in zip(NODES, processes, strict=True):
            wait_port(pods[name], PROBE_PORT, timeout=20, process=process)

        deadline = time.monotonic() + 20
        seen: dict[str, Any] = {}
        while time.monotonic() < deadline:
            seen = {name: alive(pods[name])["last_check_result"] for name in NODES}
            if all(
                results.get(f"path_{NODES[1 - i]}") == "ok" and results.get("peer_v6") == "ok"
                and results.get("api_server_direct") == "ok"
                for i, results in enumerate(seen.values())
            ):
                break
            time.sleep(0.25)
        else:
            pytest.fail(f"IPv6 checks not ok within 20 s: {seen}\n" + "\n".join(p.tail() for p in processes))
        for i, name in enumerate(NODES):
            neighbourhood = seen[name]["neighbourhood"]
            assert [n["PodIP"] for n in neighbourhood] == [pods[NODES[1 - i]]], neighbourhood
