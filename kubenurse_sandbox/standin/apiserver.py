"""A Kubernetes API server stand-in for tests and the local sandbox.

It serves the read side of pods and nodes (get, list, watch) over HTTPS with its own
throwaway CA and bearer-token auth, and behaves like kube-apiserver wherever a client can
tell: Status errors, resource versions, continue tokens, bookmarks, 410 Gone. The test or
sandbox changes the cluster through plain methods (add_pod, cordon, ...); every change is
pushed to open watches at once. It can also fake outages (down/up), token rotation, history
compaction and watch timeouts, and it records every request so tests can count them.
"""

from __future__ import annotations

import asyncio
import base64
import heapq
import ipaddress
import json
import os
import random
import re
import secrets
import socket
import ssl
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import trustme
from aiohttp import web

from . import objects
from .handlers import Api, ApiError, WatchSettings, parse_bool
from .objects import Obj, TaintSpec
from .store import Store, object_key

# Names the real API server's certificate carries, so both api_server checks verify.
CLUSTER_NAMES = (
    "localhost",
    "127.0.0.1",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
_PATH = re.compile(r"^/api/v1/(?:namespaces/(?P<ns>[^/]+)/)?(?P<kind>pods|nodes)(?:/(?P<name>[^/]+))?/?$")


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it. `verb` is the Kubernetes audit verb."""

    method: str
    path: str
    query: dict[str, str]
    kind: str | None  # "pods", "nodes", "version" or None for other paths
    verb: str  # get, list, watch (or the lower-case method for anything else)
    namespace: str | None
    name: str | None
    authorized: bool
    time: float  # time.monotonic()
    user_agent: str = ""

    @property
    def is_watch(self) -> bool:
        return self.verb == "watch"


def _describe(request: web.Request, authorized: bool) -> RequestRecord:
    match = _PATH.match(request.path)
    kind = match["kind"] if match else ("version" if request.path.rstrip("/") == "/version" else None)
    try:
        watch = parse_bool(request.query, "watch")
    except ApiError:
        watch = False
    if request.method not in ("GET", "HEAD"):
        verb = request.method.lower()
    elif watch:
        verb = "watch"
    else:
        verb = "list" if match and not match["name"] else "get"
    return RequestRecord(
        method=request.method,
        path=request.path,
        query=dict(request.query),
        kind=kind,
        verb=verb,
        namespace=match["ns"] if match else None,
        name=match["name"] if match else None,
        authorized=authorized,
        time=time.monotonic(),
        user_agent=request.headers.get("User-Agent", ""),
    )


def _new_token() -> str:
    return "standin-" + secrets.token_urlsafe(32)


def _write_atomically(path: Path, data: bytes) -> None:
    # A reader polling the file never sees it half written, as with the kubelet's swaps.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class ApiServerStandin:
    """The stand-in. Call every method from the event loop's thread (it is not thread-safe).

    history_size: changes kept for resuming watches; older versions get 410 Expired.
    bookmark_interval: seconds between BOOKMARK events on watches that allow them, sent (as
        kube-apiserver does) only when that kind's version moved past what the watch was sent.
    max_watch_seconds: how long a watch without timeoutSeconds lasts (kube-apiserver: 30-60 min).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        extra_names: Iterable[str] = (),
        token: str | None = None,
        history_size: int = 1000,
        bookmark_interval: float = 1.0,
        max_watch_seconds: float = 1800.0,
        request_log_size: int = 100_000,
        realistic_nodes: bool = False,
    ) -> None:
        self.host = host
        self._port = port
        self._ca = trustme.CA()
        bound_to = [] if host in ("0.0.0.0", "::") else [host]
        names = dict.fromkeys([*CLUSTER_NAMES, *bound_to, *extra_names])  # no duplicates, order kept
        self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ca.issue_cert(*names).configure_cert(self._ssl)
        self.ca_pem: bytes = self._ca.cert_pem.bytes()
        self.token = token or _new_token()
        self._tokens = {self.token}
        self._serviceaccount_dirs: list[Path] = []
        self._store = Store(history_size)
        self._watch_settings = WatchSettings(bookmark_interval, max_watch_seconds)
        self._api = Api(self._store, self._watch_settings, self._meter)
        #: Body bytes and watch events sent, by the client's User-Agent.
        self.sent_bytes: Counter[str] = Counter()
        self.sent_events: Counter[str] = Counter()
        self._realistic = realistic_nodes
        self._heartbeats: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        # Bounded so a long sandbox run cannot grow without limit; tests see everything.
        self.requests: deque[RequestRecord] = deque(maxlen=request_log_size)
        self._node_count = 0

    # Addresses -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port; fixed by the first start() when 0 was asked for."""
        return self._port

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        if _is_ipv6(host):
            host = f"[{host}]"
        return f"https://{host}:{self._port}"

    @property
    def resource_version(self) -> int:
        return self._store.rv

    @property
    def is_up(self) -> bool:
        return self._site is not None

    # Lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        self._api.add_routes(app)
        # handler_cancellation: a watch whose client went away ends (and unsubscribes) at once.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await self.up()

    async def stop(self) -> None:
        self.stop_heartbeats()
        self._store.end_watches()
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner = self._site = None

    async def up(self) -> None:
        """Listen again (same port, CA and state) after down()."""
        if self._runner is None:
            raise RuntimeError("start() first")
        if self._site is not None:
            return
        family = socket.AF_INET6 if _is_ipv6(self.host) else socket.AF_INET
        # Binding ourselves learns an ephemeral port before serving, and keeps it for later ups.
        sock = socket.create_server((self.host, self._port), family=family)
        self._port = sock.getsockname()[1]
        self._site = web.SockSite(self._runner, sock, ssl_context=self._ssl)
        await self._site.start()

    async def down(self) -> None:
        """An outage: stop listening and drop every open connection, watches included."""
        if self._site is None or self._runner is None:
            return
        await self._site.stop()
        self._site = None
        server = self._runner.server
        if server is None:
            return
        for connection in server.connections:
            if connection.transport is not None:
                connection.transport.abort()
        # Connection loss cancels the handlers (handler_cancellation); wait until they are gone,
        # so on return no watch is left subscribed.
        deadline = asyncio.get_running_loop().time() + 2.0
        while server.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.001)

    def end_watches(self) -> None:
        """End every open watch stream now, cleanly; clients have to resume."""
        self._store.end_watches()

    def compact(self) -> None:
        """Forget the event history: resuming from any version handed out so far gets 410."""
        self._store.compact()

    @property
    def watch_count(self) -> int:
        """Watch streams open right now."""
        return self._store.watcher_count

    @property
    def fault(self) -> str | None:
        """A misbehaviour to act out on watches: None, "short_watches" (each sends one
        bookmark, or its first events, then ends) or "gone_after_list" (each resumed watch
        answers 410 Expired at once)."""
        return self._watch_settings.fault

    @fault.setter
    def fault(self, value: str | None) -> None:
        if value not in (None, "short_watches", "gone_after_list"):
            raise ValueError(f"unknown fault {value!r}")
        self._watch_settings.fault = value

    def _meter(self, request: web.Request, size: int, events: int) -> None:
        agent = request.headers.get("User-Agent", "")
        self.sent_bytes[agent] += size
        self.sent_events[agent] += events

    # Heartbeats --------------------------------------------------------------------------

    def heartbeat(self, name: str, *, flap: str | None = None) -> Obj:
        """What a kubelet's status update does: every condition's lastHeartbeatTime moves
        (a MODIFIED event); `flap` also turns that condition over."""
        return self.update_node(name, lambda node: objects.heartbeat(node, flap))

    def start_heartbeats(
        self, *, period: float = 300.0, flapping: float = 0.01, flap_period: float = 10.0, seed: int = 1
    ) -> None:
        """Kubelet-like status updates from now on: every node once per `period` (spread
        evenly), and a `flapping` fraction of the nodes turning a condition over every
        `flap_period` on top."""
        self.stop_heartbeats()
        self._heartbeats = asyncio.create_task(self._beat(period, flapping, flap_period, seed))

    def stop_heartbeats(self) -> None:
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            self._heartbeats = None

    async def _beat(self, period: float, flapping: float, flap_period: float, seed: int) -> None:
        rng = random.Random(seed)
        loop = asyncio.get_running_loop()
        start = loop.time()
        names = list(self._store.keys("nodes"))
        due: list[tuple[float, int, str, bool]] = []
        for i, name in enumerate(names):
            heapq.heappush(due, (start + rng.random() * period, i, name, False))
        for i, name in enumerate(rng.sample(names, round(len(names) * flapping))):
            heapq.heappush(due, (start + rng.random() * flap_period, len(names) + i, name, True))
        while due:
            at, i, name, flaps = heapq.heappop(due)
            if (wait := at - loop.time()) > 0:
                await asyncio.sleep(wait)
            if self._store.get("nodes", name) is not None:
                self.heartbeat(name, flap=objects.FLAPPING_CONDITION if flaps else None)
            heapq.heappush(due, (at + (flap_period if flaps else period), i, name, flaps))

    # Authentication --------------------------------------------------------------------

    def set_token(self, token: str, *, keep_old: bool = False) -> None:
        self._tokens = {*self._tokens, token} if keep_old else {token}
        self.token = token

    def rotate_token(self, directory: str | Path | None = None, *, keep_old: bool = False) -> str:
        """A new token, rewritten into `directory` (default: every written serviceaccount dir)."""
        self.set_token(_new_token(), keep_old=keep_old)
        for target in [Path(directory)] if directory is not None else self._serviceaccount_dirs:
            _write_atomically(target / "token", self.token.encode())
        return self.token

    def write_serviceaccount(self, directory: str | Path, namespace: str = "default") -> Path:
        """`token`, `ca.crt` and `namespace` as Kubernetes mounts them into a pod."""
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        # No trailing newlines: kubelet writes none, and some clients send the token verbatim.
        _write_atomically(target / "token", self.token.encode())
        _write_atomically(target / "ca.crt", self.ca_pem)
        _write_atomically(target / "namespace", namespace.encode())
        if target not in self._serviceaccount_dirs:
            self._serviceaccount_dirs.append(target)
        return target

    def write_kubeconfig(self, path: str | Path, namespace: str = "default") -> Path:
        """A kubeconfig for this server (JSON, which is valid YAML)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        ca_data = base64.b64encode(self.ca_pem).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": {"server": self.url, "certificate-authority-data": ca_data}}],
            "users": [{"name": "standin", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "standin",
                    "context": {"cluster": "standin", "user": "standin", "namespace": namespace},
                }
            ],
            "current-context": "standin",
        }
        _write_atomically(target, json.dumps(config, indent=2).encode())
        return target

    def _authorized(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and token.strip() in self._tokens

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self._site is None:
            # The connection was mid-handshake when down() ran; it belongs to the outage too.
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=503)
        authorized = self._authorized(request.headers.get("Authorization"))
        self.requests.append(_describe(request, authorized))
        # Authentication comes before routing on the real server: unknown paths get 401 too.
        if not authorized:
            return ApiError(401, "Unauthorized", "Unauthorized").response()
        try:
            return await handler(request)
        except web.HTTPMethodNotAllowed:
            return ApiError(
                405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
            ).response()
        except web.HTTPNotFound:
            return ApiError(404, "NotFound", "the server could not find the requested resource").response()

    # Request log -----------------------------------------------------------------------

    def count(
        self,
        kind: str | None = None,
        *,
        verb: str | None = None,
        watch: bool | None = None,
        authorized: bool | None = None,
        since: float | None = None,
    ) -> int:
        """Requests matching every filter given, e.g. count("pods", verb="list")."""
        return sum(
            1
            for r in self.requests
            if (kind is None or r.kind == kind)
            and (verb is None or r.verb == verb)
            and (watch is None or r.is_watch == watch)
            and (authorized is None or r.authorized == authorized)
            and (since is None or r.time >= since)
        )

    def clear_requests(self) -> None:
        self.requests.clear()

    # Nodes -----------------------------------------------------------------------------

    def add_node(
        self,
        name: str,
        *,
        unschedulable: bool = False,
        taints: Iterable[TaintSpec] = (),
        labels: Mapping[str, str] | None = None,
        internal_ip: str | None = None,
    ) -> Obj:
        self._node_count += 1
        n = self._node_count
        ip = internal_ip or f"10.128.{n // 250 % 256}.{n % 250 + 1}"
        node = objects.new_node(name, unschedulable, taints, labels, ip)
        if self._realistic:
            objects.make_realistic(node, seed=n)
        return self._store.create("nodes", name, node)

    def node(self, name: str) -> Obj | None:
        stored = self._store.get("nodes", name)
        return json.loads(stored.body) if stored else None

    def update_node(self, name: str, mutate: Callable[[Obj], object]) -> Obj:
        """Change a copy of the node in place with `mutate`; stored as one MODIFIED event."""
        return self._store.update("nodes", name, mutate)

    def cordon(self, name: str) -> Obj:
        """spec.unschedulable plus the node controller's NoSchedule taint, in one write."""
        return self.update_node(name, objects.cordon)

    def uncordon(self, name: str) -> Obj:
        return self.update_node(name, objects.uncordon)

    def taint_node(self, name: str, key: str, *, value: str = "", effect: str = "NoSchedule") -> Obj:
        taint = objects.parse_taint({"key": key, "value": value, "effect": effect})
        return self.update_node(name, lambda node: objects.add_taint(node, taint))

    def untaint(self, name: str, key: str, *, effect: str | None = None) -> Obj:
        return self.update_node(name, lambda node: objects.remove_taint(node, key, effect))

    def delete_node(self, name: str) -> Obj:
        return self._store.delete("nodes", name)

    # Pods ------------------------------------------------------------------------------

    def add_pod(
        self,
        name: str,
        *,
        namespace: str,
        node_name: str | None,
        pod_ip: str | None,
        host_ip: str | None = None,
        labels: Mapping[str, str] | None = None,
        phase: str = "Running",
    ) -> Obj:
        """A pod; host_ip defaults to its node's InternalIP when that node exists."""
        if host_ip is None and node_name and (node := self._store.get("nodes", node_name)):
            host_ip = objects.internal_ip(node.obj)
        pod = objects.new_pod(name, namespace, node_name, pod_ip, host_ip, labels, phase)
        return self._store.create("pods", object_key(namespace, name), pod)

    def pod(self, name: str, *, namespace: str) -> Obj | None:
        stored = self._store.get("pods", object_key(namespace, name))
        return json.loads(stored.body) if stored else None

    def update_pod(self, name: str, mutate: Callable[[Obj], object], *, namespace: str) -> Obj:
        """Change a copy of the pod in place with `mutate`; stored as one MODIFIED event."""
        return self._store.update("pods", object_key(namespace, name), mutate)

    def set_pod_phase(self, name: str, phase: str, *, namespace: str) -> Obj:
        return self.update_pod(name, lambda pod: pod["status"].__setitem__("phase", phase), namespace=namespace)

    def mark_pod_terminating(self, name: str, *, namespace: str, grace_period_seconds: int = 30) -> Obj:
        """What a graceful delete does first: deletionTimestamp set, the pod still listed."""

        def terminate(pod: Obj) -> None:
            pod["metadata"]["deletionTimestamp"] = objects.now()
            pod["metadata"]["deletionGracePeriodSeconds"] = grace_period_seconds

        return self.update_pod(name, terminate, namespace=namespace)

    def delete_pod(self, name: str, *, namespace: str) -> Obj:
        """The pod is gone at once (as after the kubelet confirms, or a forced delete)."""
        return self._store.delete("pods", object_key(namespace, name))


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


__all__ = ["ApiServerStandin", "RequestRecord"]
