"""The mesh endpoints: `/mesh/report` (this probe), `/mesh.json` (the cluster), `/mesh` (the page).

The document is bytes made once per view (plain and gzip), the page once at import; the
report is a few KB. At most MAX_RESPONSES of each kind are sent at once; beyond
that a client gets 429 with `Retry-After`, so no number of viewers can take the probe's
loop from its checks and `/alwayshappy`. With KUBENURSE_MESH_PORT they are served on that
port only (and only they are), so a NetworkPolicy can allow the page to operators alone.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from importlib import resources

from aiohttp import web

from probe.checks.rounds import Round
from probe.mesh.collect import REPORT_PATH, MeshView, Peer, peer
from probe.mesh.report import NotReady, Report, own_report
from probe.neighbours import Neighbour, Neighbourhood
from probe.settings import Settings

#: Where build_app leaves the view, for the node-event reporter.
MESH_VIEW = web.AppKey("mesh_view", MeshView)
#: The page, read once: one self-contained file (no build step, no external resources).
PAGE = resources.files("probe.mesh").joinpath("page.html").read_bytes()
MESH_PATHS = ("/mesh", "/mesh.json", REPORT_PATH)
#: Responses of one kind sent at once; more get 429. A response is a copy of ready bytes, so
#: a few at a time keep a slow reader from holding a slot long while the rest wait a second.
MAX_RESPONSES = 16
RETRY_AFTER_SECONDS = 1


def own_node(settings: Settings, neighbourhood: Neighbourhood) -> str:
    node = settings.node_name or neighbourhood.details.get("node")
    return node if isinstance(node, str) and node else settings.pod_name


class Limit:
    """At most `most` responses at once; `None` from `enter` means: answer 429."""

    def __init__(self, most: int) -> None:
        self.most, self.busy, self.refused = most, 0, 0

    def too_busy(self) -> web.Response | None:
        if self.busy >= self.most:
            self.refused += 1
            return web.Response(
                status=429, text="too many mesh requests at once; try again\n",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        return None

    async def send(self, request: web.Request, make: Callable[[], Awaitable[web.Response]]) -> web.StreamResponse:
        refused = self.too_busy()
        if refused is not None:
            return refused
        self.busy += 1
        try:
            response = await make()
            # Sent here, inside the slot: the slot covers the write, not only the handler.
            await response.prepare(request)
            await response.write_eof()
            return response
        finally:
            self.busy -= 1


def add_routes(
    app: web.Application,
    settings: Settings,
    *,
    last_round: Callable[[], Round | None],
    neighbourhood: Callable[[], Neighbourhood],
    not_ready: Callable[[], NotReady | None],
    eligible: Callable[[], tuple[Neighbour, ...]] = tuple,
    listed: Callable[[], Iterable[tuple[Neighbour, bool]]] | None = None,
    udp_arrivals: Callable[[], Mapping[int, int]] = dict,
) -> MeshView:
    def report() -> Report:
        return own_report(
            last_round(), node=own_node(settings, neighbourhood()), pod=settings.pod_name,
            not_ready=not_ready(), now=time.time(), arrivals=udp_arrivals(),
        )

    def peers() -> list[Peer]:
        """Every pod discovery lists: the whole-cluster list, and this probe's own neighbours
        (a discovery without a whole-cluster list still names those)."""
        found = (
            [peer(n.node_name, n.pod_name, n.pod_ip, checked=checked) for n, checked in listed()]
            if listed is not None
            else [peer(n.node_name, n.pod_name, n.pod_ip) for n in eligible()]
        )
        known = {p.pod for p in found}
        own = neighbourhood().neighbours
        found += [peer(n.node_name, n.pod_name, n.pod_ip) for n in own if n.pod_name not in known]
        return found

    view = MeshView(
        report,
        peers=peers,
        source=settings.pod_name,
        port=settings.mesh_port or settings.http_port,
        trace_url_template=settings.trace_url_template,
        max_age=min(settings.check_interval, 2.0),
    )
    reports, documents = Limit(MAX_RESPONSES), Limit(MAX_RESPONSES)

    async def report_handler(request: web.Request) -> web.StreamResponse:
        async def make() -> web.Response:
            return web.Response(body=report().encode(), content_type="application/json", charset="utf-8")

        return await reports.send(request, make)

    async def mesh_json(request: web.Request) -> web.StreamResponse:
        async def make() -> web.Response:
            built = await view.view()
            response = web.Response(
                content_type="application/json", charset="utf-8", headers={"Vary": "Accept-Encoding"}
            )
            # 200 nodes: ~400 KB of JSON every refresh, ~10x less gzipped; both encoded once per view.
            if "gzip" in request.headers.get("Accept-Encoding", ""):
                response.body = built.gzipped
                response.headers["Content-Encoding"] = "gzip"
            else:
                response.body = built.plain
            return response

        return await documents.send(request, make)

    async def page(_request: web.Request) -> web.Response:
        return web.Response(
            body=PAGE,
            content_type="text/html",
            charset="utf-8",
            # The page needs nothing from elsewhere, and may not load anything from elsewhere.
            headers={
                "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; img-src 'self' data:",
                "Cache-Control": "no-cache",
            },
        )

    async def close(_app: web.Application) -> None:
        await view.close()

    app.router.add_get(REPORT_PATH, report_handler)
    app.router.add_get("/mesh.json", mesh_json)
    app.router.add_get("/mesh", page)
    if settings.mesh_port:
        app.middlewares.append(_port_split(settings.mesh_port))
    app.on_cleanup.append(close)
    app[MESH_VIEW] = view
    return view


def _port_split(mesh_port: int) -> Callable[..., Awaitable[web.StreamResponse]]:
    """With a mesh port: the mesh paths there only, and nothing else there."""

    @web.middleware
    async def split(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        on_mesh_port = sockname is not None and sockname[1] == mesh_port
        if (request.path in MESH_PATHS) != on_mesh_port:
            raise web.HTTPNotFound()
        return await handler(request)

    return split
