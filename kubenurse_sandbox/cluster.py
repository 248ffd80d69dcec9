"""The sandbox cluster: an API-server stand-in, one probe process per stand-in node, a
delaying proxy at each node's pod address, a Service and an ingress stand-in, Prometheus.

Addresses (all loopback; 127.0.0.0/8 needs no setup on Linux):

- node-k's pod IP is 127.0.0.(k+1). The stand-in lists it, neighbours check it on the probe
  port, and a DelayProxy listens there (so `slow` can delay every check *to* that node).
- node-k's probe itself listens on 127.0.1.(k+1), same port, and the proxy forwards to it.
  Same port on another address because neighbours are checked on KUBENURSE_HTTP_PORT.
- 127.0.0.1: the control endpoint, the API server, the Service, the ingress, Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from kubenurse_sandbox import children
from kubenurse_sandbox.options import MAX_NODES, Options, SandboxError
from kubenurse_sandbox.proxy import Address, DelayProxy
from kubenurse_sandbox.real import Child, RealApiServer, start_jaeger
from kubenurse_sandbox.standin import ApiServerStandin
from probe.settings import KNOWN_VARIABLES

NAMESPACE = "kubenurse"
APP_LABEL = {"app.kubernetes.io/name": "kubenurse"}
NEIGHBOUR_FILTER = "app.kubernetes.io/name=kubenurse"
#: Probes answer /ready 503 this long after SIGTERM (kubenurse: 5 s; short here so `stop` and Ctrl-C are quick).
PROBE_SHUTDOWN = "1s"
#: How long a child may take to exit after SIGTERM before it is killed.
STOP_GRACE = 8.0
#: How long a starting probe may take to listen (imports and start-up take ~1 s).
LISTEN_TIMEOUT = 20.0
PROMETHEUS_QUERY = (
    "histogram_quantile(0.9, sum by (le, type) (rate(kubenurse_httpclient_request_duration_seconds_bucket[30s])))"
)


@dataclass(frozen=True)
class NodeSpec:
    index: int  # 1-based

    @property
    def name(self) -> str:
        return f"node-{self.index}"

    @property
    def pod(self) -> str:
        return f"kubenurse-{self.name}"

    @property
    def address(self) -> str:
        """The pod IP: where neighbours, the Service and the user reach this probe."""
        return f"127.0.0.{self.index + 1}"

    @property
    def inner_address(self) -> str:
        """Where the probe process itself listens, behind the proxy."""
        return f"127.0.1.{self.index + 1}"


@dataclass
class Node:
    spec: NodeSpec
    proxy: DelayProxy
    process: subprocess.Popen[bytes] | None = None
    cordoned: bool = False
    stopping: bool = False  # `stop` is under way
    #: The probe accepts connections (until then the Service leaves it out).
    listening: bool = False
    log_path: Path = field(default_factory=Path)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def reason(error: OSError) -> str:
    """`Address already in use`, without create_server's "(while attempting to bind ...)"."""
    return os.strerror(error.errno) if error.errno else str(error)


def checks_column(checks: dict[str, object]) -> str:
    """`status`'s checks column: ok out of the checks performed. A skipped check (dns_cluster:
    the sandbox has no cluster DNS) is not counted, so a healthy node reads `7/7 ok`."""
    performed = [v for v in checks.values() if v != "skipped"]
    if not performed:
        return "-"
    text = f"{sum(1 for v in performed if v == 'ok')}/{len(performed)} ok"
    skipped = len(checks) - len(performed)
    return f"{text} ({skipped} skipped)" if skipped else text


def _try_bind(host: str, port: int) -> OSError | None:
    try:
        with socket.create_server((host, port)):
            return None
    except OSError as e:
        return e


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_loopback(specs: list[NodeSpec]) -> None:
    """Every node address must be bindable (Linux: all of 127/8; macOS: only after aliasing)."""
    last = specs[-1]
    for host in (last.address, last.inner_address):
        error = _try_bind(host, 0)
        if error is not None:
            raise SandboxError(
                f"cannot listen on {host} ({reason(error)}); the sandbox gives every node its own "
                f"loopback address 127.0.0.2-{last.address} and 127.0.1.2-{last.inner_address}"
                " (Linux has them all; on macOS add them first: sudo ifconfig lo0 alias 127.0.0.2 up, ...)"
            )


def pick_probe_port(specs: list[NodeSpec], wanted: int) -> int:
    """The one port every probe listens on (each on its own addresses)."""
    hosts = [h for s in specs for h in (s.address, s.inner_address)]
    for _attempt in range(20 if wanted == 0 else 1):
        port = wanted or _free_port(specs[0].address)
        for host in hosts:
            if (error := _try_bind(host, port)) is not None:
                if wanted:
                    raise SandboxError(f"port {port} on {host} is in use ({reason(error)}); try --port")
                break
        else:
            return port
    raise SandboxError("found no port free on every node address")


class Sandbox:
    """Starts, changes and stops the sandbox cluster. `say` prints one message for the user."""

    def __init__(self, options: Options, say: Callable[[str], None] = print) -> None:
        if not 1 <= options.nodes <= MAX_NODES:
            raise SandboxError(f"--nodes must be 1-{MAX_NODES}")
        self.options = options
        self.say = say
        self.specs = [NodeSpec(i) for i in range(1, options.nodes + 1)]
        self.dir = Path()
        self.api_server: ApiServerStandin | RealApiServer | None = None
        #: Jaeger (with --real, where built): its process, the probes' OTLP endpoint, its UI.
        self.jaeger: Child | None = None
        self.jaeger_url: str | None = None
        self._otlp_endpoint: str | None = None
        self.nodes: dict[str, Node] = {}
        self.service: DelayProxy | None = None
        self.ingress: DelayProxy | None = None
        self.probe_port = 0
        self.prometheus: subprocess.Popen[bytes] | None = None
        self.prometheus_url: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._rr = 0

    # Ports, from --port P: control P, probes P (on their own addresses), API server P+1,
    # Service P+2, ingress P+3, Prometheus P+4. With --port 0 every one is picked free.
    def _port(self, offset: int) -> int:
        return self.options.port + offset if self.options.port else 0

    # Lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bring everything up; on failure raise SandboxError (close() still cleans up)."""
        check_loopback(self.specs)
        self.probe_port = pick_probe_port(self.specs, self.options.port)
        self.dir = Path(tempfile.mkdtemp(prefix="kubenurse-sandbox-"))
        (self.dir / "logs").mkdir()
        self._session = aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=3))

        if self.options.real:
            try:
                self.api_server = RealApiServer(self.dir / "control-plane", self._port(1))
                if jaeger := await asyncio.to_thread(start_jaeger, self.dir):
                    self.jaeger, self._otlp_endpoint, self.jaeger_url = jaeger
            except RuntimeError as e:
                raise SandboxError(str(e).splitlines()[0]) from None
        else:
            self.api_server = ApiServerStandin("127.0.0.1", self._port(1))
        for spec in self.specs:
            self.api_server.add_node(spec.name, internal_ip=spec.address, labels={"kubernetes.io/hostname": spec.name})
            # Pending until its probe listens, as a real pod is until its container runs: no
            # neighbour checks it before it can answer (which would count errors at start-up).
            self.api_server.add_pod(
                spec.pod, namespace=NAMESPACE, node_name=spec.name, pod_ip=spec.address, labels=APP_LABEL,
                phase="Pending",
            )
        try:
            await self._listen("the API server", self._port(1), self.api_server.start)
        except RuntimeError as e:  # the real one did not come up
            raise SandboxError(str(e).splitlines()[0]) from None
        self.api_server.write_serviceaccount(self.dir / "serviceaccount", NAMESPACE)

        for spec in self.specs:
            proxy = DelayProxy(spec.address, self.probe_port, self._upstream(spec), udp=True)
            self.nodes[spec.name] = Node(spec, proxy, log_path=self.dir / "logs" / f"{spec.name}.log")
        self.service = DelayProxy("127.0.0.1", self._port(2), self._endpoints)
        await self._listen("the Service stand-in", self._port(2), self.service.start)
        service = self.service
        self.ingress = DelayProxy("127.0.0.1", self._port(3), lambda: [("127.0.0.1", service.port)])
        await self._listen("the ingress stand-in", self._port(3), self.ingress.start)

        # Prometheus first: it takes a few seconds to serve, the probes about one.
        if self.options.prometheus and shutil.which("prometheus"):
            self._start_prometheus()
        await asyncio.gather(*(self.start_node(name) for name in self.nodes))
        self._monitor = asyncio.create_task(self._watch_children(), name="sandbox-children")

    async def _listen(self, what: str, port: int, start: Callable[[], Awaitable[None]]) -> None:
        try:
            await start()
        except OSError as e:
            raise SandboxError(f"cannot start {what} on 127.0.0.1:{port} ({reason(e)}); try --port") from None

    async def close(self, *, hurry: bool = False) -> None:
        """Stop everything and remove the temporary directory. `hurry`: kill, do not wait."""
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        grace = 0.0 if hurry else STOP_GRACE
        processes = [n.process for n in self.nodes.values() if n.process is not None]
        if self.prometheus is not None:
            processes.append(self.prometheus)
        await asyncio.gather(*(children.stop(p, grace=grace) for p in processes))
        for proxy in [self.ingress, self.service, *(n.proxy for n in self.nodes.values())]:
            if proxy is not None:
                await proxy.stop()
        if self.api_server is not None:
            await self.api_server.stop()
        if self.jaeger is not None:
            self.jaeger.stop()
        if self._session is not None:
            await self._session.close()
        if self.dir != Path():
            shutil.rmtree(self.dir, ignore_errors=True)

    def kill_all(self) -> None:
        """SIGKILL every child now (a second Ctrl-C); close() then finds them gone."""
        for node in self.nodes.values():
            if node.process is not None:
                children.kill(node.process)
        if self.prometheus is not None:
            children.kill(self.prometheus)

    # The probes ---------------------------------------------------------------------------

    def node(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise KeyError(f"no node {name!r} (nodes: {', '.join(self.nodes)})") from None

    def _upstream(self, spec: NodeSpec) -> Callable[[], list[Address]]:
        return lambda: [(spec.inner_address, self.probe_port)]

    def _endpoints(self) -> list[Address]:
        """The Service's endpoints: ready probes (not cordoned: /ready says 503 there), rotated.
        While a probe starts, before the sandbox has seen it listen, it is tried last and
        directly (its own first round may already ask the Service for itself)."""
        serving = [n for n in self.nodes.values() if n.running and not (n.cordoned or n.stopping)]
        ready = [n.spec for n in serving if n.listening]
        starting = [(n.spec.inner_address, self.probe_port) for n in serving if not n.listening]
        self._rr += 1
        if not ready:
            return starting
        first = self._rr % len(ready)
        return [(s.address, self.probe_port) for s in ready[first:] + ready[:first]] + starting

    def probe_environment(self, spec: NodeSpec) -> dict[str, str]:
        assert self.api_server is not None and self.service is not None and self.ingress is not None
        # The user's KUBENURSE_*/KUBECONFIG must not leak in; OTEL_* do, on purpose.
        env = {k: v for k, v in os.environ.items() if k not in KNOWN_VARIABLES}
        env.update(
            {
                "POD_NAME": spec.pod,
                "NODE_NAME": spec.name,
                "POD_NAMESPACE": NAMESPACE,
                "KUBENURSE_NAMESPACE": NAMESPACE,
                "KUBENURSE_NEIGHBOUR_FILTER": NEIGHBOUR_FILTER,
                "KUBENURSE_NEIGHBOUR_LIMIT": str(self.options.neighbour_limit),
                "KUBENURSE_LISTEN_HOST": spec.inner_address,
                "KUBENURSE_HTTP_PORT": str(self.probe_port),
                "KUBENURSE_CHECK_INTERVAL": self.options.interval,
                "KUBENURSE_SHUTDOWN_DURATION": PROBE_SHUTDOWN,
                "KUBENURSE_SERVICEACCOUNT_DIR": str(self.dir / "serviceaccount"),
                "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                "KUBERNETES_SERVICE_PORT": str(self.api_server.port),
                "KUBERNETES_SERVICE_DNS": "localhost",
                # localhost is in /etc/hosts, which a DNS check does not read: dns_cluster
                # would ask this machine's nameserver and fail.
                "KUBENURSE_CHECK_DNS_CLUSTER": "false",
                "KUBENURSE_SERVICE_URL": f"http://127.0.0.1:{self.service.port}",
                "KUBENURSE_INGRESS_URL": f"http://127.0.0.1:{self.ingress.port}",
                "KUBENURSE_LOG_FORMAT": "logfmt",
                "KUBENURSE_CHECK_NEIGHBOURHOOD_UDP": "true" if self.options.udp else "false",
                "OTEL_SERVICE_NAME": env.get("OTEL_SERVICE_NAME", "kubenurse"),
            }
        )
        if self.options.timeout:
            env["KUBENURSE_CHECK_TIMEOUT"] = self.options.timeout
        if self._otlp_endpoint and self.jaeger_url:
            # Traces to Jaeger; the /mesh page links a slow or failing path to its trace there.
            env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = f"{self._otlp_endpoint}/v1/traces"
            env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
            env["KUBENURSE_TRACE_URL_TEMPLATE"] = f"{self.jaeger_url}/trace/{{trace_id}}"
        return env

    async def start_node(self, name: str) -> str:
        node = self.node(name)
        if node.running:
            return f"{name} is already running"
        await node.proxy.start()
        node.process = children.spawn(
            [sys.executable, "-m", "probe"], env=self.probe_environment(node.spec), log_path=node.log_path
        )
        if not await self._until_listening(node):
            return f"{name}: probe started (pid {node.process.pid}) but not listening yet; see its log"
        assert self.api_server is not None
        pod = self.api_server.pod(node.spec.pod, namespace=NAMESPACE)
        if pod is not None and pod["status"].get("phase") != "Running":
            self.api_server.set_pod_phase(node.spec.pod, "Running", namespace=NAMESPACE)
        return f"{name}: probe started (pid {node.process.pid})"

    async def _until_listening(self, node: Node, timeout: float = LISTEN_TIMEOUT) -> bool:
        """Wait until the probe accepts connections (or exits, or `timeout` passes)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while node.running and loop.time() < deadline:
            try:
                _, writer = await asyncio.open_connection(node.spec.inner_address, self.probe_port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            node.listening = True
            return True
        return False

    async def stop_node(self, name: str) -> str:
        node = self.node(name)
        if node.process is None or not node.running or node.stopping:
            return f"{name} is not running"
        node.stopping = True
        try:
            node.listening = False
            await node.proxy.stop()  # its pod IP now refuses connections, as a dead node's would
            # Still node.process meanwhile: if this is cancelled (Ctrl-C), close() stops it.
            status = await children.stop(node.process, grace=STOP_GRACE)
            node.process = None
        finally:
            node.stopping = False
        return f"{name}: probe stopped (exit status {status}); its pod stays listed, so paths to it fail"

    def cordon(self, name: str) -> str:
        node = self.node(name)
        assert self.api_server is not None
        self.api_server.cordon(name)
        node.cordoned = True
        return f"{name} cordoned: its probe's /ready answers 503, the others stop checking it"

    def uncordon(self, name: str) -> str:
        node = self.node(name)
        assert self.api_server is not None
        self.api_server.uncordon(name)
        node.cordoned = False
        return f"{name} uncordoned"

    def slow(self, name: str, delay: float) -> str:
        self.node(name).proxy.delay = delay
        return f"{name}: requests to {self.node(name).spec.address} now arrive {delay * 1000:g} ms late"

    def lossy(self, name: str, share: float) -> str:
        self.node(name).proxy.loss = share
        if not share:
            return f"{name}: no datagram lost on purpose"
        return f"{name}: {share:.0%} of the UDP datagrams to and from {self.node(name).spec.address} are lost"

    def mtu(self, name: str, size: int | None) -> str:
        proxy = self.node(name).proxy
        proxy.max_datagram = size or 65535
        if size is None:
            return f"{name}: datagrams of any size pass"
        return f"{name}: UDP datagrams over {size} bytes to and from {self.node(name).spec.address} are dropped"

    def fast(self, name: str) -> str:
        self.node(name).proxy.delay = 0.0
        return f"{name}: no added delay"

    async def api_server_down(self) -> str:
        assert self.api_server is not None
        await self.api_server.down()
        return "API server stand-in down: api_server_* checks fail, discovery keeps the last neighbours"

    async def api_server_up(self) -> str:
        assert self.api_server is not None
        await self.api_server.up()
        return "API server stand-in up"

    async def _watch_children(self) -> None:
        """Tell the user when a child dies on its own, with the end of its log."""
        while True:
            await asyncio.sleep(0.5)
            for node in self.nodes.values():
                if node.process is not None and not node.stopping and node.process.poll() is not None:
                    status, node.process = node.process.returncode, None
                    lines = "\n".join(f"    {line}" for line in children.tail(node.log_path))
                    self.say(f"{node.spec.name}: probe exited with status {status}; its log ends with:\n{lines}")
            if self.prometheus is not None and self.prometheus.poll() is not None:
                status, self.prometheus = self.prometheus.returncode, None
                lines = "\n".join(f"    {line}" for line in children.tail(self.dir / "logs" / "prometheus.log"))
                self.say(f"Prometheus exited with status {status}; its log ends with:\n{lines}")

    # Prometheus ---------------------------------------------------------------------------

    def _start_prometheus(self) -> None:
        binary = shutil.which("prometheus")
        assert binary is not None
        port = self._port(4) or _free_port()
        if error := _try_bind("127.0.0.1", port):
            raise SandboxError(f"port {port} for Prometheus is in use ({reason(error)}); try --port, --no-prometheus")
        targets = [
            {
                "targets": [f"{s.inner_address}:{self.probe_port}"],
                "labels": {"node": s.name, "pod": s.pod, "namespace": NAMESPACE},
            }
            for s in self.specs
        ]
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "kubenurse", "static_configs": targets}],
        }
        home = self.dir / "prometheus"
        home.mkdir()
        (home / "prometheus.yml").write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.prometheus = children.spawn(
            [
                binary,
                f"--config.file={home / 'prometheus.yml'}",
                f"--storage.tsdb.path={home / 'data'}",
                "--storage.tsdb.retention.time=1d",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            env={"PATH": "/usr/bin:/bin", "HOME": str(home)},
            log_path=self.dir / "logs" / "prometheus.log",
        )
        self.prometheus_url = f"http://127.0.0.1:{port}"

    def prometheus_graph_url(self) -> str | None:
        if self.prometheus_url is None:
            return None
        query = urllib.parse.urlencode({"g0.expr": PROMETHEUS_QUERY, "g0.tab": "0", "g0.range_input": "5m"})
        return f"{self.prometheus_url}/graph?{query}"

    # Looking at it ------------------------------------------------------------------------

    async def last_slow_trace(self, over: str = "200ms") -> str | None:
        """Jaeger's URL of the newest check trace that took longer than `over`."""
        if not self.jaeger_url:
            return None
        query = urllib.parse.urlencode({"service": "kubenurse", "minDuration": over, "limit": "20", "lookback": "1h"})
        status, body = await self._get(f"{self.jaeger_url}/api/traces?{query}")
        if status != 200:
            return None
        try:
            traces = json.loads(body)["data"] or []
        except (ValueError, KeyError, TypeError):
            return None
        if not traces:
            return None
        newest = max(traces, key=lambda t: max((s.get("startTime", 0) for s in t.get("spans", [])), default=0))
        return f"{self.jaeger_url}/trace/{newest['traceID']}"

    async def _get(self, url: str) -> tuple[int | None, str]:
        assert self._session is not None
        try:
            async with self._session.get(url) as response:
                return response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError) as e:
            return None, type(e).__name__

    async def node_health(self, node: Node) -> tuple[int | None, int | None, dict[str, object]]:
        """(/ready status, /alive status, last_check_result), read from the probe directly
        (not through its proxy, so `slow` does not slow this down)."""
        if not node.running:
            return None, None, {}
        base = f"http://{node.spec.inner_address}:{self.probe_port}"
        (ready, _), (alive, body) = await asyncio.gather(self._get(f"{base}/ready"), self._get(f"{base}/alive"))
        try:
            results = json.loads(body).get("last_check_result", {}) if alive is not None else {}
        except ValueError:
            results = {}
        return ready, alive, results

    async def wait_healthy(self, timeout: float) -> list[str]:
        """Wait until every running probe's /alive is 200; return the names still unhealthy."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            running = [n for n in self.nodes.values() if n.running]
            health = await asyncio.gather(*(self.node_health(n) for n in running))
            sick = [n.spec.name for n, (_, alive, _) in zip(running, health, strict=True) if alive != 200]
            if not sick or loop.time() >= deadline:
                return sick
            await asyncio.sleep(0.25)

    async def status(self) -> str:
        nodes = list(self.nodes.values())
        health = await asyncio.gather(*(self.node_health(n) for n in nodes))
        rows = [("node", "probe", "node state", "delay", "/ready", "/alive", "checks")]
        problems: list[str] = []
        for node, (ready, alive, results) in zip(nodes, health, strict=True):
            checks = {k: v for k, v in results.items() if k not in ("neighbourhood", "neighbourhood_state")}
            for check, value in checks.items():
                if value not in ("ok", "skipped"):
                    problems.append(f"  {node.spec.name} {check}: {str(value)[:160]}")
            rows.append(
                (
                    node.spec.name,
                    "running" if node.running else "stopped",
                    "cordoned" if node.cordoned else "schedulable",
                    f"{node.proxy.delay * 1000:g}ms" if node.proxy.delay else "-",
                    str(ready or "-"),
                    str(alive or "-"),
                    checks_column(checks),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        assert self.api_server is not None
        real = isinstance(self.api_server, RealApiServer)
        what = "API server (real kube-apiserver)" if real else "API server stand-in"
        lines.append(f"{what}: {'up' if self.api_server.is_up else 'down'}")
        if self.jaeger_url:
            lines.append(f"Jaeger: {self.jaeger_url}")
            if slow := await self.last_slow_trace():
                lines.append(f"  last slow check's trace: {slow}")
        if self.prometheus_url:
            lines.append(f"Prometheus: {self.prometheus_url} ({'running' if self.prometheus else 'exited'})")
        if problems:
            lines += ["failing checks:", *problems]
        return "\n".join(lines)
