"""The mesh endpoints: `/mesh/report` (this probe), `/mesh.json` (the cluster), `/mesh` (the page)."""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from typing import Any

from aiohttp import web

from probe.checks.rounds import Round
from probe.mesh.collect import REPORT_PATH, MeshView, Peer, own_report
from probe.neighbours import Neighbour, Neighbourhood
from probe.settings import Settings

#: Where build_app leaves the view, for the node-event reporter.
MESH_VIEW = web.AppKey("mesh_view", MeshView)
#: The page, read once: one self-contained file (no build step, no external resources).
PAGE = resources.files("probe.mesh").joinpath("page.html").read_bytes()


def own_node(settings: Settings, neighbourhood: Neighbourhood) -> str:
    node = settings.node_name or neighbourhood.details.get("node")
    return node if isinstance(node, str) and node else settings.pod_name


def add_routes(
    app: web.Application,
    settings: Settings,
    *,
    last_round: Callable[[], Round | None],
    neighbourhood: Callable[[], Neighbourhood],
    ready: Callable[[], bool],
    eligible: Callable[[], tuple[Neighbour, ...]] = tuple,
) -> MeshView:
    def report() -> dict[str, Any]:
        return own_report(
            last_round(), node=own_node(settings, neighbourhood()), pod=settings.pod_name, ready=ready()
        )

    def seeds() -> list[Peer]:
        return [Peer(n.node_name, n.pod_name, n.pod_ip) for n in eligible()]

    view = MeshView(
        report,
        seeds=seeds,
        source=settings.pod_name,
        port=settings.http_port,
        trace_url_template=settings.trace_url_template,
        max_age=min(settings.check_interval, 2.0),
    )

    async def report_handler(_request: web.Request) -> web.Response:
        return web.json_response(report(), dumps=_compact)

    async def mesh_json(request: web.Request) -> web.Response:
        response = web.json_response(await view.document(), dumps=_compact)
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            response.enable_compression()  # 200 nodes: ~415 KB of JSON every refresh, ~10x less gzipped
        return response

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
    app.on_cleanup.append(close)
    app[MESH_VIEW] = view
    return view


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))
