"""The HTTP(S) endpoints: /, /alive, /alwayshappy, /ready, /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from probe import names, resources
from probe.checks.result import CheckResult
from probe.checks.rounds import Round
from probe.mesh.routes import add_routes as add_mesh_routes
from probe.neighbours import Neighbour, Neighbourhood
from probe.ratelimit import TokenBucket
from probe.settings import Settings
from probe.telemetry.incoming import IncomingChecks
from probe.telemetry.metrics import Metrics

HIDDEN_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
# Proxies in front of the probe add credentials of their own (oauth2-proxy's
# X-Auth-Request-Access-Token, X-Forwarded-Access-Token, API gateways' X-Api-Key, ...):
# /alive answers whoever asks, so any header named like a credential is left out too.
SECRET_HEADER = re.compile(
    r"token|api-?key|secret|passw(or)?d|credential|session|cookie|auth(orization|-request)|signature|jwt",
    re.IGNORECASE,
)


def hidden_header(name: str) -> bool:
    return name.lower() in HIDDEN_HEADERS or SECRET_HEADER.search(name) is not None


# Incoming traceparents are continued at most this often: a flood of traced requests must
# not become a flood of spans (and exporter work) on the receiving side.
SERVER_SPANS_PER_SECOND = 20.0
SERVER_SPAN_BURST = 40.0


@dataclass
class ServerState:
    """What the handlers read; the app keeps it current."""

    last_round: Callable[[], Round | None]
    neighbourhood: Callable[[], Neighbourhood]
    #: False while this pod's node is unschedulable, cordoned or gone.
    node_schedulable: Callable[[], bool] = lambda: True
    incoming: IncomingChecks = field(default_factory=IncomingChecks)
    shutting_down: bool = False
    #: More facts for /alive (e.g. OTLP export counts).
    extra: Callable[[], dict[str, object]] = dict
    #: Every pod that may be checked, before the limit (the mesh view asks them all).
    eligible: Callable[[], tuple[Neighbour, ...]] = tuple


def _headers(request: web.Request) -> dict[str, list[str]]:
    """Request headers as Go's http.Header prints them (name -> list of values), minus secrets."""
    headers: dict[str, list[str]] = {}
    for name, value in request.headers.items():
        if not hidden_header(name):
            headers.setdefault(name, []).append(value)
    return headers


def _remote_addr(request: web.Request) -> str:
    """`ip:port` like Go's RemoteAddr."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return request.remote or ""
    host, port = str(peer[0]), peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _udp_text(result: CheckResult) -> str:
    """A neighbour's UDP path as /alive shows it: the verdict, then what the train found."""
    udp = result.facts.udp
    if udp is None:
        return result.summary
    found = f"{udp.lost} of {udp.sent} datagrams lost"
    if result.duration is not None:
        found += f", median round trip {result.duration * 1e3:.2f} ms"
    return f"{result.summary} ({found})"


def _discovery(hood: Neighbourhood) -> dict[str, object]:
    """What /alive says about discovery. With none running (no API server configured) there
    is nothing to be stale: say that it is off and why, rather than `"stale": false`."""
    if hood.skipped and not hood.details:
        return {"running": False, "reason": hood.state.removeprefix("skipped: ")}
    return {"running": True, "stale": hood.stale, **hood.details}


def alive_document(request: web.Request, state: ServerState) -> tuple[dict[str, object], int]:
    last = state.last_round()
    hood = last.neighbourhood if last else state.neighbourhood()
    results: dict[str, object] = {}
    reasons: dict[str, str] = {}
    if last is not None:
        for check_type, result in sorted(last.results.items()):
            results[check_type] = result.summary
            if result.skip_reason:
                reasons[check_type] = result.skip_reason
    udp = {check_type: _udp_text(result) for check_type, result in sorted(last.udp.items())} if last else {}
    results["neighbourhood_state"] = hood.state if not hood.skipped else names.SKIPPED
    if hood.skipped:
        reasons["neighbourhood"] = hood.skip_reason or ""
    results["neighbourhood"] = [n.as_alive() for n in hood.neighbours]
    document: dict[str, object] = {
        "hostname": socket.gethostname(),
        "headers": _headers(request),
        "user_agent": request.headers.get("User-Agent", ""),
        "request_uri": request.path_qs,
        "remote_addr": _remote_addr(request),
        "last_check_result": results,
        "skipped_checks": reasons,
        "udp_paths": udp,
        "discovery": _discovery(hood),
        "incoming_checks": state.incoming.count(),
        **state.extra(),
    }
    if last is not None:
        document["last_round"] = {
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last.finished_at)),
            "duration_seconds": round(last.duration, 6),
        }
    healthy = last is not None and last.healthy
    return document, 200 if healthy else 500


def build_app(
    settings: Settings, state: ServerState, metrics: Metrics, tracer: trace.Tracer | None = None,
    limits: ServerLimits | None = None,
) -> web.Application:
    tracer = tracer or trace.NoOpTracer()
    body_timeout = (limits or ServerLimits()).idle_timeout
    budget = TokenBucket(SERVER_SPANS_PER_SECOND, SERVER_SPAN_BURST)

    async def root(_request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently("/alive")

    async def alive(request: web.Request) -> web.Response:
        document, status = alive_document(request, state)
        return web.Response(
            text=json.dumps(document, indent=2) + "\n", status=status, content_type="application/json"
        )

    async def always_happy(request: web.Request) -> web.Response:
        origin = request.headers.get(names.NEIGHBOUR_ORIGIN_HEADER)
        if origin:
            state.incoming.saw(origin[:253])
        if "traceparent" in request.headers and budget.take():
            context = propagate.extract(request.headers)
            with tracer.start_as_current_span(
                "GET /alwayshappy",
                context=context,
                kind=SpanKind.SERVER,
                attributes={
                    "http.request.method": request.method,
                    "url.path": request.path,
                    "http.route": "/alwayshappy",
                    "client.address": request.remote or "",
                    "http.response.status_code": 200,
                    **({"kubenurse.neighbour.origin": origin[:253]} if origin else {}),
                },
            ):
                return web.Response(text="I'm happy\n")
        return web.Response(text="I'm happy\n")

    async def ready(_request: web.Request) -> web.Response:
        if state.shutting_down:
            return web.Response(text="shutting down\n", status=503)
        if not state.node_schedulable():
            return web.Response(text="node unschedulable, cordoned or gone\n", status=503)
        return web.Response(text="ready\n")

    async def metrics_handler(request: web.Request) -> web.Response:
        accept = ",".join(request.headers.getall("Accept", []))
        # Collection is synchronous and grows with the neighbourhood: keep it off the loop.
        body, content_type = await asyncio.get_running_loop().run_in_executor(None, metrics.exposition, accept)
        response = web.Response(body=body, headers={"Content-Type": content_type})
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            response.enable_compression()
        return response

    @web.middleware
    async def limit_body(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        # No handler reads a body, so client_max_size alone never applies: read it here
        # (bounded by client_max_size, 413 above it, and in time, 408) before answering.
        if request.body_exists:
            try:
                async with asyncio.timeout(body_timeout):
                    await request.read()
            except TimeoutError:
                raise web.HTTPRequestTimeout(headers={"Connection": "close"}) from None
        return await handler(request)

    app = web.Application(client_max_size=64 * 1024, middlewares=[limit_body])
    app.router.add_get("/", root)
    app.router.add_get("/alive", alive)
    app.router.add_get("/alwayshappy", always_happy)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics_handler)
    add_mesh_routes(
        app, settings, last_round=state.last_round, neighbourhood=state.neighbourhood, eligible=state.eligible,
        ready=lambda: not state.shutting_down and state.node_schedulable(),
    )
    return app


def server_ssl_context(settings: Settings) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.cert_file or "", settings.cert_key)
    return context


class ListenError(Exception):
    """A server cannot listen; the message names the address and the settings behind it."""


def listen_error(host: str | None, port: int, port_variable: str, error: OSError) -> ListenError:
    address = f"[{host}]:{port}" if host and ":" in host else f"{host or '*'}:{port}"
    # asyncio's own text repeats the address; the errno's text alone says why.
    if isinstance(error, socket.gaierror) or not error.errno:
        reason = str(error.strerror or error).lower()  # e.g. a host name that does not resolve
    else:
        reason = os.strerror(error.errno).lower()
    host_setting = f"KUBENURSE_LISTEN_HOST={host}" if host else "KUBENURSE_LISTEN_HOST unset"
    return ListenError(f"cannot listen on {address} ({port_variable}={port}, {host_setting}): {reason}")


@dataclass(frozen=True)
class ServerLimits:
    """What one client may hold of the server. aiohttp's keep-alive timer runs from the
    moment a connection opens and after each answer, and closes the connection if no whole
    request arrived by then: `idle_timeout` bounds idle and slow-header connections alike
    (aiohttp's default is 3,630 s)."""

    idle_timeout: float = 15.0
    #: How long a body left unread (413, 408) is drained before the connection closes, so the
    #: client reads the answer rather than a reset (aiohttp's default is 10 s).
    linger: float = 2.0
    #: At most this many connections at once (and fewer when the file limit is lower).
    max_connections: int = 4096
    #: Files kept free for the checks, discovery and exports, below the open-files limit.
    reserve_files: int = 512
    #: After this many connections at once, give the memory back once they are gone (each
    #: idle connection costs ~5 KB that the heap otherwise keeps).
    trim_after: int = 1000


#: Never fewer connections than this, however low the file limit.
MIN_CONNECTIONS = 32
EVICTION_LOG_SECONDS = 60.0

server_log = logging.getLogger("probe.server")


def connection_cap(limits: ServerLimits, file_limit: int) -> int:
    return max(MIN_CONNECTIONS, min(limits.max_connections, file_limit - limits.reserve_files))


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, seen by the guard on its way in and out."""

    __slots__ = ("_guard", "_inner", "_transport")

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard) -> None:
        self._inner, self._guard = inner, guard
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._guard.admit(self)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard.release(self)
        self._inner.connection_lost(exc)

    def abort(self) -> None:
        if self._transport is not None and isinstance(self._transport, asyncio.WriteTransport):
            self._transport.abort()


class ConnectionGuard:
    """A protocol factory in front of aiohttp's that keeps at most `cap` connections open.

    When full, the oldest connection is dropped to make room: a flood of idle connections
    is always older than the neighbour or scraper that just connected, whose request lasts
    milliseconds. Refusing the newcomer instead would hand the port to whoever came first.
    """

    def __init__(self, factory: Callable[[], asyncio.Protocol], cap: int, trim_after: int = 1000) -> None:
        self._factory, self.cap, self._trim_after = factory, cap, trim_after
        self._live: dict[_Guarded, None] = {}  # insertion order: oldest first
        self.evicted = 0
        self.trims = 0
        self._peak = 0
        self._evicted_unlogged = 0
        self._next_eviction_log = float("-inf")

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self._factory(), self)

    @property
    def count(self) -> int:
        return len(self._live)

    def admit(self, connection: _Guarded) -> None:
        while len(self._live) >= self.cap:
            oldest = next(iter(self._live))
            del self._live[oldest]
            oldest.abort()
            self._note_eviction()
        self._live[connection] = None
        self._peak = max(self._peak, len(self._live))

    def release(self, connection: _Guarded) -> None:
        self._live.pop(connection, None)
        if self._peak >= self._trim_after and len(self._live) <= self._peak // 4:
            self._peak = len(self._live)
            # Soon, not now: a wave of closes arrives as one burst of callbacks.
            asyncio.get_running_loop().call_later(1.0, self._trim)

    def _trim(self) -> None:
        if resources.give_memory_back():
            self.trims += 1

    def _note_eviction(self) -> None:
        self.evicted += 1
        self._evicted_unlogged += 1
        now = time.monotonic()
        if now >= self._next_eviction_log:
            self._next_eviction_log = now + EVICTION_LOG_SECONDS
            server_log.warning(
                "too many connections: closing the oldest",
                extra={"max_connections": self.cap, "closed": self._evicted_unlogged},
            )
            self._evicted_unlogged = 0


class Servers:
    """The listening sockets and the connections they accepted; `cleanup()` stops both."""

    def __init__(self, runner: web.AppRunner, guard: ConnectionGuard, listeners: list[asyncio.Server]) -> None:
        self.runner, self.guard, self._listeners = runner, guard, listeners

    async def cleanup(self) -> None:
        for listener in self._listeners:
            listener.close()
        await self.runner.cleanup()


async def start_servers(settings: Settings, app: web.Application, limits: ServerLimits | None = None) -> Servers:
    """Listen on the HTTP port, and the HTTPS port with KUBENURSE_USE_TLS; ListenError if not."""
    limits = limits or ServerLimits()
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=1.0,
        keepalive_timeout=limits.idle_timeout, lingering_time=limits.linger,
    )
    await runner.setup()
    assert runner.server is not None
    file_limit = resources.file_limit()
    guard = ConnectionGuard(runner.server, connection_cap(limits, file_limit), limits.trim_after)
    if guard.cap < limits.max_connections:
        server_log.info("open-files limit lowers the connection cap", extra={
            "max_connections": guard.cap, "open_files_limit": file_limit,
        })
    loop = asyncio.get_running_loop()
    # Not web.TCPSite: it would hand aiohttp's protocol factory to asyncio, not the guard.
    ports: list[tuple[int, ssl.SSLContext | None]] = [(settings.http_port, None)]
    if settings.use_tls:
        ports.append((settings.https_port, server_ssl_context(settings)))
    listeners: list[asyncio.Server] = []
    variables = {settings.http_port: "KUBENURSE_HTTP_PORT", settings.https_port: "KUBENURSE_HTTPS_PORT"}
    try:
        for port, context in ports:
            try:
                listeners.append(
                    await loop.create_server(
                        guard, settings.listen_host, port, ssl=context, reuse_address=True,
                        ssl_handshake_timeout=limits.idle_timeout if context else None,
                    )
                )
            except OSError as e:  # taken, privileged, or the host is not an address of this machine
                variable = "KUBENURSE_HTTPS_PORT" if context is not None else variables[port]
                raise listen_error(settings.listen_host, port, variable, e) from None
    except BaseException:
        await Servers(runner, guard, listeners).cleanup()
        raise
    return Servers(runner, guard, listeners)
