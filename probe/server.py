"""The HTTP(S) endpoints: /, /alive, /alwayshappy, /ready, /metrics."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from probe import names
from probe.checks.rounds import Round
from probe.mesh.routes import add_routes as add_mesh_routes
from probe.neighbours import Neighbour, Neighbourhood
from probe.settings import Settings
from probe.telemetry.incoming import IncomingChecks
from probe.telemetry.metrics import Metrics

HIDDEN_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
# Incoming traceparents are continued at most this often: a flood of traced requests must
# not become a flood of spans (and exporter work) on the receiving side.
SERVER_SPANS_PER_SECOND = 20.0
SERVER_SPAN_BURST = 40.0


class TokenBucket:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate, self._burst, self._clock = rate, burst, clock
        self._tokens, self._last = burst, clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


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
        if name.lower() not in HIDDEN_HEADERS:
            headers.setdefault(name, []).append(value)
    return headers


def _remote_addr(request: web.Request) -> str:
    """`ip:port` like Go's RemoteAddr."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return request.remote or ""
    host, port = str(peer[0]), peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
    results["neighbourhood_state"] = hood.state if not hood.skipped else names.SKIPPED
    if hood.skipped:
        reasons["neighbourhood"] = hood.state.removeprefix("skipped: ")
    results["neighbourhood"] = [n.as_alive() for n in hood.neighbours]
    document: dict[str, object] = {
        "hostname": socket.gethostname(),
        "headers": _headers(request),
        "user_agent": request.headers.get("User-Agent", ""),
        "request_uri": request.path_qs,
        "remote_addr": _remote_addr(request),
        "last_check_result": results,
        "skipped_checks": reasons,
        "discovery": {"stale": hood.stale, **hood.details},
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
    settings: Settings, state: ServerState, metrics: Metrics, tracer: trace.Tracer | None = None
) -> web.Application:
    tracer = tracer or trace.NoOpTracer()
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
        # (bounded by client_max_size, 413 above it) before answering.
        if request.body_exists:
            await request.read()
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


async def start_servers(settings: Settings, app: web.Application) -> web.AppRunner:
    """Listen on the HTTP port, and the HTTPS port with KUBENURSE_USE_TLS; ListenError if not."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    sites: list[web.BaseSite] = [web.TCPSite(runner, settings.listen_host, settings.http_port, reuse_address=True)]
    if settings.use_tls:
        sites.append(
            web.TCPSite(
                runner, settings.listen_host, settings.https_port,
                ssl_context=server_ssl_context(settings), reuse_address=True,
            )
        )
    ports = (("KUBENURSE_HTTP_PORT", settings.http_port), ("KUBENURSE_HTTPS_PORT", settings.https_port))
    for site, (variable, port) in zip(sites, ports, strict=False):
        try:
            await site.start()
        except OSError as e:  # taken, privileged, or the host is not an address of this machine
            await runner.cleanup()
            raise listen_error(settings.listen_host, port, variable, e) from None
    return runner
