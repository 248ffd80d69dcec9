"""A small Kubernetes cluster made of real parts, for end-to-end tests of the probe.

One network namespace per node, joined by a bridge; in each, a probe process with its own
pod IP on port 8080. Around them, on bridge addresses in the root namespace:

| address | what |
|---|---|
| .1:53   | dnsmasq, the cluster DNS (the API server's and the Service's names) |
| .2:443  | the API-server stand-in (pods, nodes, /version; its own CA, a token) |
| .3:443  | nginx as the ingress (TLS from a throwaway CA) -> every probe |
| .4:8080 | nginx as the probes' Service -> every probe |
| .5:4317/4318 | the OTLP receiver (gRPC / HTTP), relayed from loopback |
| .11 ... | the nodes (pods) |

A real Prometheus on loopback scrapes every probe through the bridge every second.
`Cluster.build()` is a context manager: everything it made is removed on the way out,
whatever failed, and in reverse order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trustme

from tests.e2e import netns
from tests.e2e.netns import Bridge, Namespace
from tests.e2e.services import Dnsmasq, Nginx, Process, Relay, ThreadedStandin, session_env, wait_port
from tests.otlp_receiver import OtlpReceiver
from tests.prometheus_server import Prometheus, run_prometheus

T = TypeVar("T")

NAMESPACE = "kube-system"
LABELS = {"app": "kubenurse"}
API_SERVER_NAME = "kubernetes.default.svc.cluster.local"
SERVICE_NAME = f"kubenurse.{NAMESPACE}.svc.cluster.local"
INGRESS_NAME = "kubenurse.e2e.test"
PROBE_PORT = 8080
DELAY_PROXY_PORT = 18080
DELAY_TABLE = "kne2e_delay"
BLACKHOLE_TABLE = "kne2e_blackhole"

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Node:
    name: str
    pod: str
    ip: str
    ns: Namespace
    process: Process | None = None

    @property
    def instance(self) -> str:
        """The Prometheus `instance` label of this node's probe."""
        return f"{self.ip}:{PROBE_PORT}"

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{PROBE_PORT}"


def ring_hash(node_name: str) -> int:
    """The contract's ring position: first 8 bytes of sha256(nodeName), big-endian."""
    return int.from_bytes(hashlib.sha256(node_name.encode()).digest()[:8], "big")


def expected_neighbours(me: str, nodes: list[str], limit: int) -> list[str]:
    """The nodes `me` checks, computed from the contract, independently of the probe's code."""
    others = sorted((n for n in nodes if n != me), key=lambda n: (ring_hash(n) - ring_hash(me)) % 2**64)
    return others if limit == 0 else others[:limit]


@dataclass
class Cluster:
    workdir: Path
    bridge: Bridge
    nodes: list[Node]
    neighbour_limit: int
    dns: Dnsmasq
    nginx: Nginx
    standin: ThreadedStandin
    receiver: OtlpReceiver
    collector: list[Relay]
    prometheus: Prometheus
    api_server: str
    otlp_protocol: str
    helpers: list[Process] = field(default_factory=list)

    # ---- building

    @classmethod
    @contextlib.contextmanager
    def build(cls, node_names: list[str], *, neighbour_limit: int, check_interval: str = "500ms",
              otlp_protocol: str = "grpc") -> Iterator[Cluster]:
        with contextlib.ExitStack() as stack:
            workdir = netns.WORK_ROOT / f"{netns.NS_PREFIX}-{netns.session_id()}"
            workdir.mkdir(exist_ok=True)
            if not os.environ.get("KNE2E_KEEP"):  # keep the logs to look at; the next session sweeps them
                stack.callback(_rmtree, workdir)

            bridge = Bridge.create(netns.free_subnet())
            stack.callback(bridge.delete)
            dns_ip, api_ip, ingress_ip, service_ip, otlp_ip = (bridge.add_address(i) for i in range(1, 6))

            # TLS for the ingress: a throwaway CA the probes trust through KUBENURSE_EXTRA_CA.
            ca = trustme.CA()
            ca.cert_pem.write_to_path(str(workdir / "ingress-ca.pem"))
            leaf = ca.issue_cert(INGRESS_NAME)
            leaf.cert_chain_pems[0].write_to_path(str(workdir / "ingress.pem"))
            leaf.private_key_pem.write_to_path(str(workdir / "ingress.key"))

            dns = Dnsmasq(workdir, dns_ip, {API_SERVER_NAME: api_ip, SERVICE_NAME: service_ip,
                                            INGRESS_NAME: ingress_ip})
            dns.start()
            stack.callback(dns.stop)

            standin = ThreadedStandin(api_ip, 443)
            stack.callback(standin.close)
            nodes: list[Node] = []
            # Runs after every namespace is deleted (exit callbacks run last-in first-out).
            stack.callback(netns.wait_gone, [f"{netns.LINK_PREFIX}{netns.session_id():x}v{i}"
                                             for i in range(len(node_names))])
            for i, name in enumerate(node_names):
                ip = bridge.host(11 + i)
                standin.call(lambda s, name=name, ip=ip: s.add_node(name, internal_ip=ip))
                standin.call(lambda s, name=name, ip=ip: s.add_pod(
                    f"kubenurse-{name}", namespace=NAMESPACE, node_name=name, pod_ip=ip, labels=LABELS))
                ns = Namespace.create(name, i, bridge, ip, nameserver=dns_ip)
                stack.callback(ns.delete)
                nodes.append(Node(name, f"kubenurse-{name}", ip, ns))
            sa_dir = workdir / "serviceaccount"
            sa_dir.mkdir()
            standin.call(lambda s: s.write_serviceaccount(sa_dir, NAMESPACE))

            receiver = OtlpReceiver().start()
            stack.callback(receiver.close)
            collector = [Relay((otlp_ip, 4317), ("127.0.0.1", receiver.grpc_port)),
                         Relay((otlp_ip, 4318), ("127.0.0.1", receiver.http_port))]
            for relay in collector:
                relay.start()
                stack.callback(relay.close)

            nginx = Nginx(workdir, ingress=(ingress_ip, 443), service=(service_ip, PROBE_PORT),
                          server_name=INGRESS_NAME, cert=workdir / "ingress.pem", key=workdir / "ingress.key",
                          upstreams=[f"{n.ip}:{PROBE_PORT}" for n in nodes])
            nginx.start()
            stack.callback(nginx.stop)

            endpoint = f"http://{otlp_ip}:4317" if otlp_protocol == "grpc" else f"http://{otlp_ip}:4318"
            probes: list[Process] = []
            stack.callback(_stop_all, probes)
            for node in nodes:
                env = {
                    "POD_NAME": node.pod,
                    "NODE_NAME": node.name,
                    "POD_NAMESPACE": NAMESPACE,
                    "KUBENURSE_NAMESPACE": NAMESPACE,
                    "KUBENURSE_NEIGHBOUR_FILTER": ",".join(f"{k}={v}" for k, v in LABELS.items()),
                    "KUBENURSE_NEIGHBOUR_LIMIT": str(neighbour_limit),
                    "KUBERNETES_SERVICE_HOST": api_ip,
                    "KUBERNETES_SERVICE_PORT": "443",
                    "KUBENURSE_SERVICEACCOUNT_DIR": str(sa_dir),
                    "KUBENURSE_SERVICE_URL": f"http://{SERVICE_NAME}:{PROBE_PORT}",
                    "KUBENURSE_INGRESS_URL": f"https://{INGRESS_NAME}",
                    "KUBENURSE_EXTRA_CA": str(workdir / "ingress-ca.pem"),
                    "KUBENURSE_CHECK_INTERVAL": check_interval,
                    # Short timeouts keep the fault tests short; the defaults are 5 s / 6 s.
                    "KUBENURSE_CHECK_CONNECT_TIMEOUT": "1s",
                    "KUBENURSE_CHECK_TIMEOUT": "2s",
                    "KUBENURSE_SHUTDOWN_DURATION": "0s",
                    "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                    "OTEL_EXPORTER_OTLP_PROTOCOL": otlp_protocol,
                    "OTEL_BSP_SCHEDULE_DELAY": "300",
                    "OTEL_METRIC_EXPORT_INTERVAL": "2000",
                }
                node.process = Process(f"probe {node.name}", node.ns.exec_argv(sys.executable, "-m", "probe"),
                                       workdir / f"probe-{node.name}.log", env)
                probes.append(node.process)

            with _marked_environment():  # so a killed session's Prometheus is swept too
                prometheus = stack.enter_context(run_prometheus([n.instance for n in nodes], "1s"))
            for node in nodes:
                wait_port(node.ip, PROBE_PORT, timeout=20, process=node.process)
            cluster = cls(workdir, bridge, nodes, neighbour_limit, dns, nginx, standin, receiver, collector,
                          prometheus, api_ip, otlp_protocol)
            stack.callback(cluster._stop_helpers)
            yield cluster

    def _stop_helpers(self) -> None:
        for helper in self.helpers:
            helper.stop()

    # ---- looking

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def by_instance(self, instance: str) -> Node:
        return next(n for n in self.nodes if n.instance == instance)

    def selected_by(self, target: str) -> list[str]:
        """The nodes whose probe checks `target`, per the contract's hash ring."""
        names = [n.name for n in self.nodes]
        return [n for n in names if target in expected_neighbours(n, names, self.neighbour_limit)]

    def neighbours_of(self, name: str) -> list[str]:
        return expected_neighbours(name, [n.name for n in self.nodes], self.neighbour_limit)

    def alive(self, node: Node) -> dict[str, Any]:
        """/alive of a probe (any status: 500 is a normal answer while a check fails)."""
        request = urllib.request.Request(f"{node.url}/alive")
        try:
            with urllib.request.urlopen(request, timeout=3) as resp:
                return dict(json.load(resp))
        except urllib.error.HTTPError as e:
            return dict(json.load(e))

    def diagnostics(self) -> str:
        parts = [p.tail() for p in [*(n.process for n in self.nodes if n.process), self.dns.process,
                                    self.nginx.process, *self.helpers] if p is not None]
        return "\n".join(parts)

    # ---- faults

    @contextlib.contextmanager
    def blackholed(self, node: Node) -> Iterator[None]:
        """Inside the node's namespace, drop every incoming TCP packet to the probe port."""
        node.ns.nft(f"table inet {BLACKHOLE_TABLE} {{\n  chain input {{\n"
                    f"    type filter hook input priority 0;\n    tcp dport {PROBE_PORT} drop\n  }}\n}}\n")
        try:
            yield
        finally:
            node.ns.delete_table("inet", BLACKHOLE_TABLE)

    @contextlib.contextmanager
    def delayed_path(self, source: Node, target: Node, seconds: float) -> Iterator[None]:
        """Only the path source -> target gets `seconds` before its first response byte: in
        the target's namespace, the source's connections to the probe port are redirected
        to a delaying proxy in front of the target's probe."""
        proxy = Process(
            f"delay proxy {source.name}->{target.name}",
            target.ns.exec_argv(sys.executable, str(Path(__file__).with_name("delay_proxy.py")),
                                str(DELAY_PROXY_PORT), target.ip, str(PROBE_PORT), str(seconds)),
            self.workdir / f"delay-{source.name}-{target.name}.log",
        )
        self.helpers.append(proxy)
        try:
            # Inside the namespace, seen from the root namespace nothing listens there.
            deadline = time.monotonic() + 10
            while "ready" not in proxy.log.read_text(errors="replace"):
                assert proxy.running, proxy.tail()
                assert time.monotonic() < deadline, "delay proxy did not start"
                time.sleep(0.05)
            target.ns.nft(f"table ip {DELAY_TABLE} {{\n  chain prerouting {{\n"
                          f"    type nat hook prerouting priority dstnat;\n"
                          f"    ip saddr {source.ip} tcp dport {PROBE_PORT} redirect to :{DELAY_PROXY_PORT}\n"
                          f"  }}\n}}\n")
            try:
                yield
            finally:
                # New connections go direct again (an `accept` ahead of the redirect), and those
                # already redirected finish through the proxy before the table goes: on this
                # kernel, deleting a NAT rule strands the connections it translated (their
                # answers stop arriving, and the check hangs until its timeout).
                target.ns.nft(f"insert rule ip {DELAY_TABLE} prerouting ip saddr {source.ip} "
                              f"tcp dport {PROBE_PORT} accept\n")
                time.sleep(seconds + 0.5)
                target.ns.delete_table("ip", DELAY_TABLE)
        finally:
            proxy.stop()
            self.helpers.remove(proxy)

    @contextlib.contextmanager
    def collector_down(self) -> Iterator[None]:
        for relay in self.collector:
            relay.stop()
        try:
            yield
        finally:
            for relay in self.collector:
                relay.start()


@contextlib.contextmanager
def _marked_environment() -> Iterator[None]:
    marker = session_env()
    saved = {k: os.environ.get(k) for k in marker if k == netns.SESSION_ENV}
    os.environ[netns.SESSION_ENV] = marker[netns.SESSION_ENV]
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stop_all(processes: list[Process]) -> None:
    """Stop side by side: each probe flushes its telemetry on the way out."""
    for process in processes:
        process.signal_stop()
    for process in processes:
        process.stop()


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def wait_until(predicate: Callable[[], T], timeout: float, what: str, diagnostics: Callable[[], str] = str) -> T:
    """Poll `predicate` until truthy; fail naming `what` (and with diagnostics) after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except (AssertionError, OSError) as e:
            last = e
        if last and not isinstance(last, Exception):
            return last  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout}s (last: {last!r})\n{diagnostics()}")
        time.sleep(0.25)
