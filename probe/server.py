"""The HTTP(S) endpoints: /, /alive, /alwayshappy, /ready, /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from probe import names, resources
from probe.checks.result import CheckResult
from probe.checks.rounds import Round
from probe.mesh.report import NotReady
from probe.mesh.routes import add_routes as add_mesh_routes
from probe.neighbours import Neighbour, Neighbourhood
from probe.ratelimit import TokenBucket
from probe.settings import Settings
from probe.telemetry.incoming import IncomingChecks
from probe.telemetry.metrics import Metrics
from probe.trust import Reloading

#: Headers whose values /alive echoes: what kubenurse's clients, scrapers, kubelet probes,
#: ingress controllers and meshes send to say where a request came from and how it
#: travelled. /alive answers whoever asks, so any other header (a credential a proxy added,
#: X-Auth-Key, X-Forwarded-Client-Cert, X-Userinfo, ...) is shown by name only: an
#: allow-list cannot miss a credential named in a way nobody foresaw.
ECHOED_HEADERS = frozenset(
    name.lower()
    for name in (
        "Host", "User-Agent", "Accept", "Accept-Encoding", "Accept-Language", "Cache-Control", "Connection",
        "Content-Length", "Content-Type", "Pragma", "Te", "Upgrade",
        "Via", "Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Port", "X-Forwarded-Proto",
        "X-Forwarded-Scheme", "X-Forwarded-Prefix", "X-Real-Ip", "X-Scheme", "X-Original-Uri", "X-Original-Url",
        "X-Original-Forwarded-For", "X-Request-Id", "X-Request-Start", "X-Correlation-Id", "X-Amzn-Trace-Id",
        "X-Envoy-Attempt-Count", "X-Envoy-External-Address", "X-Envoy-Expected-Rq-Timeout-Ms",
        "X-Prometheus-Scrape-Timeout-Seconds",
        "Traceparent", "Tracestate", "Baggage", "X-B3-Traceid", "X-B3-Spanid", "X-B3-Parentspanid",
        "X-B3-Sampled", "X-B3-Flags", "B3",
        "KUBENURSE-NEIGHBOUR-ORIGIN",
    )
)
#: Longest header value /alive echoes; longer ones are cut (with "..." at the end).
MAX_ECHOED_VALUE = 512


def echoed_header(name: str) -> bool:
    """Whether /alive shows this header's value (otherwise only its name)."""
    return name.lower() in ECHOED_HEADERS


def _cut(value: str, limit: int = MAX_ECHOED_VALUE) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


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
    #: The UDP echo's recent arrivals (train id -> datagrams), for the mesh report.
    udp_arrivals: Callable[[], Mapping[int, int]] = dict
    #: More facts for /alive (e.g. OTLP export counts).
    extra: Callable[[], dict[str, object]] = dict
    #: Every pod that may be checked, before the limit (the mesh view asks them all).
    eligible: Callable[[], tuple[Neighbour, ...]] = tuple
    #: Every running pod, and whether it may be checked (the mesh view shows those that may not).
    listed: Callable[[], tuple[tuple[Neighbour, bool], ...]] | None = None


def canonical_name(name: str) -> str:
    """A header name as Go's textproto spells it (`x-request-id` -> `X-Request-Id`)."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def _headers(request: web.Request) -> tuple[dict[str, list[str]], list[str]]:
    """The allow-listed request headers as Go's http.Header prints them (canonical name ->
    list of values), and the names of the others (values withheld)."""
    headers: dict[str, list[str]] = {}
    withheld: dict[str, None] = {}
    for raw_name, value in request.headers.items():
        name = canonical_name(raw_name)
        if echoed_header(name):
            headers.setdefault(name, []).append(_cut(value))
        else:
            withheld[name] = None
    return headers, list(withheld)


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
        return {"running": False, "reason": hood.skip_reason or hood.state}
    return {"running": True, "stale": hood.stale, **hood.details}


def alive_document(request: web.Request, state: ServerState) -> tuple[dict[str, object], int]:
    last = state.last_round()
    live = state.neighbourhood()  # discovery as it is now (retry counts move during an outage)
    hood = last.neighbourhood if last else live
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
    headers, withheld = _headers(request)
    document: dict[str, object] = {
        "hostname": socket.gethostname(),
        "headers": headers,
        "headers_withheld": withheld,
        "user_agent": _cut(request.headers.get("User-Agent", "")),
        "request_uri": _cut(request.path_qs, 2 * MAX_ECHOED_VALUE),
        "remote_addr": _remote_addr(request),
        "last_check_result": results,
        "skipped_checks": reasons,
        "udp_paths": udp,
        "discovery": _discovery(live),
        "incoming_checks": state.incoming.count(),
        "incoming_origins_not_counted": state.incoming.refused,
        **state.extra(),
    }
    if last is not None:
        document["last_round"] = {
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last.finished_at)),
            "duration_seconds": round(last.duration, 6),
        }
    healthy = last is not None and last.healthy
    return document, 200 if healthy else 500


def not_ready(state: ServerState) -> NotReady | None:
    """Why /ready answers 503, or None."""
    if state.shutting_down:
        return NotReady.SHUTTING_DOWN
    return None if state.node_schedulable() else NotReady.NODE_UNSCHEDULABLE


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
            peer = request.transport.get_extra_info("peername") if request.transport else None
            state.incoming.saw(origin[:253], str(peer[0]) if peer else "")
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

    async def answered(request: web.Request, _response: web.StreamResponse) -> None:
        for guard in request.app[GUARDS]:
            guard.answered(request.transport)

    app = web.Application(client_max_size=64 * 1024, middlewares=[limit_body])
    app[GUARDS] = []
    app.on_response_prepare.append(answered)
    app.router.add_get("/", root)
    app.router.add_get("/alive", alive)
    app.router.add_get("/alwayshappy", always_happy)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics_handler)
    add_mesh_routes(
        app, settings, last_round=state.last_round, neighbourhood=state.neighbourhood, eligible=state.eligible,
        listed=state.listed, not_ready=lambda: not_ready(state), udp_arrivals=lambda: state.udp_arrivals(),
    )
    return app


#: The connection guards serving an app (filled by start_servers): the app tells them when
#: each request is answered, so they know what a connection's request still holds.
GUARDS: web.AppKey[list[ConnectionGuard]] = web.AppKey("guards", list)


def server_ssl_context(settings: Settings) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.cert_file or "", settings.cert_key)
    return context


def reloading_server_ssl_context(settings: Settings) -> tuple[ssl.SSLContext, Reloading[ssl.SSLContext]]:
    """The HTTPS listener's context, and the certificate behind it, read again when
    KUBENURSE_CERT_FILE or KUBENURSE_CERT_KEY change on disk (cert-manager renews, the
    kubelet swaps the secret's files). Each handshake picks the current one in the
    ClientHello callback (called with or without SNI), so connections already open keep
    theirs and none is dropped; a half-written renewal keeps the previous certificate."""
    current = Reloading(
        lambda: server_ssl_context(settings),
        lambda: (settings.cert_file or "", settings.cert_key or settings.cert_file or ""),
        "serving certificate",
    )
    listener = server_ssl_context(settings)

    def pick(ssl_object: ssl.SSLObject, _server_name: str | None, _context: ssl.SSLContext) -> None:
        ssl_object.context = current.get()

    listener.sni_callback = pick
    return listener, current


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
    # Header memory. aiohttp's defaults let one request hold ~1 MB of headers (128 fields of
    # 8,190 bytes) while they arrive: 400 such connections took RSS to 831 MB. kubenurse's
    # clients (neighbours, Prometheus, the kubelet, an ingress or a mesh in between) send
    # 5-30 fields and under 4 KB; a browser on /mesh adds its cookies.
    #: Header fields per request, and the longest request line or field (aiohttp: 128, 8,190).
    max_header_fields: int = 64
    max_field_size: int = 8190
    #: Bytes of one request's line and headers (aiohttp counts neither in total): over that
    #: the client gets 431 and the connection closes.
    max_request_head: int = 16 * 1024
    #: All connections' bytes not yet handled, together: past it the connection holding the
    #: most is closed (a flood of half-sent headers, however many connections it spreads on).
    pending_budget: int = 8 * 1024 * 1024
    #: RSS the server keeps under (None: the container's memory limit minus a margin, or
    #: 160 MB without one, `resources.memory_ceiling`). Above it, every connection in the
    #: middle of sending a request or not reading its answer is closed, biggest first.
    memory_ceiling: int | None = None
    #: How often RSS is read while connections are open. Once it rose `trim_growth` past
    #: where it was last trimmed (the high-water mark), free heap pages go back to the
    #: kernel, at most once per `trim_every` (a trim takes a few milliseconds).
    memory_check_every: float = 1.0
    trim_growth: int = 8 * 1024 * 1024
    trim_every: float = 2.0


#: RSS is read again after this many bytes of request heads, besides once a second.
RSS_CHECK_BYTES = 2 * 1024 * 1024
#: Never fewer connections than this, however low the file limit.
MIN_CONNECTIONS = 32
EVICTION_LOG_SECONDS = 60.0

server_log = logging.getLogger("probe.server")


def connection_cap(limits: ServerLimits, file_limit: int) -> int:
    return max(MIN_CONNECTIONS, min(limits.max_connections, file_limit - limits.reserve_files))


TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\n"
    b"Connection: close\r\nContent-Length: 28\r\n\r\nrequest headers too large\r\n\r\n"
)


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, seen by the guard on its way in and out."""

    __slots__ = ("_guard", "_inner", "_transport", "closed", "handling", "pending", "tail")

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard) -> None:
        self._inner, self._guard = inner, guard
        self._transport: asyncio.BaseTransport | None = None
        #: Bytes received since the last answer began: what the parser and the request being
        #: handled hold of this connection's input.
        self.pending = 0
        #: The current request's head is complete (its body may follow) and not yet answered.
        self.handling = False
        #: The last bytes of the head so far, to find its end across two reads.
        self.tail = b""
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._guard.admit(self)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.closed or not self._guard.received(self, data):
            return  # closed for holding too much: the parser never sees it
        self._inner.data_received(data)

    def buffered(self) -> int:
        """Bytes this connection holds: unhandled input plus output the client did not read."""
        writable = isinstance(self._transport, asyncio.WriteTransport) and not self.closed
        return self.pending + (self._transport.get_write_buffer_size() if writable else 0)  # type: ignore[union-attr]

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
        self.closed = True
        if self._transport is not None and isinstance(self._transport, asyncio.WriteTransport):
            self._transport.abort()

    def refuse(self) -> None:
        """Answer 431 and close, without the parser seeing any more: a client that sent too
        much reads why (a bad request gets a 4xx). One that reads nothing is cut off."""
        transport = self._transport
        self.closed = True
        if not isinstance(transport, asyncio.WriteTransport) or transport.is_closing():
            return
        if transport.get_write_buffer_size():
            transport.abort()  # it is not reading its answers: nothing to explain to
            return
        transport.write(TOO_LARGE)
        transport.close()


class ConnectionGuard:
    """A protocol factory in front of aiohttp's that keeps at most `cap` connections open.

    When full, the oldest connection is dropped to make room: a flood of idle connections
    is always older than the neighbour or scraper that just connected, whose request lasts
    milliseconds. Refusing the newcomer instead would hand the port to whoever came first.
    """

    def __init__(
        self, factory: Callable[[], asyncio.Protocol], cap: int, trim_after: int = 1000,
        limits: ServerLimits | None = None,
    ) -> None:
        self._factory, self.cap, self._trim_after = factory, cap, trim_after
        self.limits = limits or ServerLimits()
        self._live: dict[_Guarded, None] = {}  # insertion order: oldest first
        self._by_transport: dict[asyncio.BaseTransport, _Guarded] = {}
        self.evicted = 0
        self.trims = 0
        self._peak = 0
        self._evicted_unlogged = 0
        self._next_eviction_log = float("-inf")
        #: Sum of every live connection's `pending`.
        self.pending = 0
        #: Connections closed for holding too much (a request head over its limit, the budget
        #: across connections, the memory ceiling); `shed`: those closed at the ceiling.
        self.cut = 0
        self.shed = 0
        self.ceiling = self.limits.memory_ceiling or resources.memory_ceiling(resources.memory_limit())
        self._next_cut_log = float("-inf")
        self._last_trim = float("-inf")
        #: RSS when memory was last given back (or at start): growth past it is a high-water mark.
        self._rss_after_trim = resources.rss_bytes()
        #: Most connections open at once since the last trim.
        self._burst_peak = 0
        #: Head bytes received since RSS was last read.
        self._since_rss = 0
        self._watch: asyncio.TimerHandle | None = None

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self._factory(), self)

    @property
    def count(self) -> int:
        return len(self._live)

    def admit(self, connection: _Guarded) -> None:
        while len(self._live) >= self.cap:
            oldest = next(iter(self._live))
            self._forget(oldest)
            oldest.abort()
            self._note_eviction()
        self._live[connection] = None
        if connection._transport is not None:
            self._by_transport[connection._transport] = connection
        self._peak = max(self._peak, len(self._live))
        self._burst_peak = max(self._burst_peak, len(self._live))
        if self._watch is None:
            self._watch = asyncio.get_running_loop().call_later(self.limits.memory_check_every, self._check_memory)

    def _forget(self, connection: _Guarded) -> None:
        if connection in self._live:
            del self._live[connection]
            self.pending -= connection.pending
            connection.pending = 0
        if connection._transport is not None:
            self._by_transport.pop(connection._transport, None)

    # Header memory --------------------------------------------------------------------------

    def received(self, connection: _Guarded, data: bytes) -> bool:
        """Count the bytes of a request head in (up to its blank line); False (and the
        connection refused) when it holds too much. A body is aiohttp's to bound
        (client_max_size, read in 64 KB steps, the rest drained and dropped): what arrives
        after the head, until the answer, is not counted."""
        if connection.handling:
            return True
        seen = connection.tail + data
        end = seen.find(b"\r\n\r\n")
        if end >= 0:
            size = max(0, end + 4 - len(connection.tail))
            connection.handling, connection.tail = True, b""
        else:
            size, connection.tail = len(data), seen[-3:]
        connection.pending += size
        self.pending += size
        self._since_rss += size
        if self._since_rss >= RSS_CHECK_BYTES:  # a flood outruns the once-a-second look
            self._since_rss = 0
            self._relieve(resources.rss_bytes())
            if connection.closed:
                return False
        if connection.pending > self.limits.max_request_head:
            self._cut(connection, "request head too large")
            return False
        while self.pending > self.limits.pending_budget:
            biggest = max(self._live, key=lambda c: c.pending)
            self._cut(biggest, "too many bytes waiting on all connections")
            if biggest is connection:
                return False
        return True

    def answered(self, transport: asyncio.BaseTransport | None) -> None:
        """The answer is on its way: the request's head is let go, what arrives next is the
        next request's head."""
        connection = self._by_transport.get(transport) if transport is not None else None
        if connection is not None:
            self.pending -= connection.pending
            connection.pending, connection.handling = 0, False

    def _cut(self, connection: _Guarded, why: str, *, at_once: bool = False) -> None:
        self._forget(connection)
        if at_once:
            connection.abort()
        else:
            connection.refuse()
        self.cut += 1
        clock = time.monotonic()
        if clock >= self._next_cut_log:
            self._next_cut_log = clock + EVICTION_LOG_SECONDS
            server_log.warning("closing a connection that holds too much", extra={
                "reason": why, "closed_so_far": self.cut,
                "max_request_head": self.limits.max_request_head, "pending_budget": self.limits.pending_budget,
            })

    def _check_memory(self) -> None:
        """Every `memory_check_every` while connections are open (and until memory is back).
        Above the ceiling: close the connections that hold memory. Past the high-water mark
        (RSS `trim_growth` above where it was last trimmed): give free heap pages back to the
        kernel once the burst is over (at most a quarter of its connections left), or at
        once above 3/4 of the ceiling; at most once per `trim_every`. Without it a burst
        leaves RSS at its peak: glibc keeps freed pages for reuse."""
        loop = asyncio.get_running_loop()
        rss = resources.rss_bytes()
        over_mark = rss > self._rss_after_trim + self.limits.trim_growth
        self._watch = (
            loop.call_later(self.limits.memory_check_every, self._check_memory) if self._live or over_mark else None
        )
        self._relieve(rss)

    def _relieve(self, rss: int) -> None:
        self._shed_above_ceiling(rss)
        over_mark = rss > self._rss_after_trim + self.limits.trim_growth
        burst_over = len(self._live) <= self._burst_peak // 4
        urgent = rss > self.ceiling * 3 // 4
        if over_mark and (burst_over or urgent) and time.monotonic() - self._last_trim >= self.limits.trim_every:
            self._last_trim = time.monotonic()
            self._burst_peak = len(self._live)
            # Soon, not now: the connections just closed are gone only after their callbacks.
            asyncio.get_running_loop().call_later(0.2, self._trim, False)

    def _shed_above_ceiling(self, rss: int) -> None:
        """Above the ceiling: close every connection in the middle of a request or not
        reading its answer, biggest first, at once."""
        if rss <= self.ceiling:
            return
        holders = sorted(
            (c for c in self._live if c.handling or c.buffered() > 0), key=_Guarded.buffered, reverse=True
        )
        for connection in holders:
            self._cut(connection, "memory ceiling reached", at_once=True)
            self.shed += 1
        server_log.warning("memory ceiling reached: closed the connections holding memory", extra={
            "rss_bytes": rss, "ceiling_bytes": self.ceiling, "closed": len(holders),
        })

    def release(self, connection: _Guarded) -> None:
        self._forget(connection)
        if self._peak >= self._trim_after and len(self._live) <= self._peak // 4:
            self._peak = len(self._live)
            # Soon, not now: a wave of closes arrives as one burst of callbacks.
            asyncio.get_running_loop().call_later(1.0, self._trim)

    def _trim(self, collect: bool = True) -> None:
        if resources.give_memory_back(collect):
            self.trims += 1
        self._rss_after_trim = resources.rss_bytes()

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

    def __init__(
        self, runner: web.AppRunner, guard: ConnectionGuard, listeners: list[asyncio.Server],
        certificate: Reloading[ssl.SSLContext] | None = None,
    ) -> None:
        self.runner, self.guard, self._listeners = runner, guard, listeners
        #: The HTTPS certificate (reloaded on change), with KUBENURSE_USE_TLS.
        self.certificate = certificate

    async def cleanup(self) -> None:
        for listener in self._listeners:
            listener.close()
        await self.runner.cleanup()


async def start_servers(settings: Settings, app: web.Application, limits: ServerLimits | None = None) -> Servers:
    """Listen on the HTTP port, the HTTPS port with KUBENURSE_USE_TLS, and KUBENURSE_MESH_PORT
    when set; ListenError if not."""
    limits = limits or ServerLimits()
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=1.0,
        keepalive_timeout=limits.idle_timeout, lingering_time=limits.linger,
        max_headers=limits.max_header_fields, max_field_size=limits.max_field_size,
        max_line_size=limits.max_field_size,
    )
    await runner.setup()
    assert runner.server is not None
    file_limit = resources.file_limit()
    guard = ConnectionGuard(runner.server, connection_cap(limits, file_limit), limits.trim_after, limits)
    app[GUARDS].append(guard)
    if guard.cap < limits.max_connections:
        server_log.info("open-files limit lowers the connection cap", extra={
            "max_connections": guard.cap, "open_files_limit": file_limit,
        })
    loop = asyncio.get_running_loop()
    # Not web.TCPSite: it would hand aiohttp's protocol factory to asyncio, not the guard.
    ports: list[tuple[int, ssl.SSLContext | None]] = [(settings.http_port, None)]
    certificate = None
    if settings.use_tls:
        listener_context, certificate = reloading_server_ssl_context(settings)
        ports.append((settings.https_port, listener_context))
    listeners: list[asyncio.Server] = []
    if settings.mesh_port:
        ports.append((settings.mesh_port, None))
    variables = {
        settings.http_port: "KUBENURSE_HTTP_PORT", settings.https_port: "KUBENURSE_HTTPS_PORT",
        settings.mesh_port: "KUBENURSE_MESH_PORT",
    }
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
    return Servers(runner, guard, listeners, certificate)
