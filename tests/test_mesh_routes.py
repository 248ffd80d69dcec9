"""The mesh endpoints on a real server: a bounded number of answers at once, and
KUBENURSE_MESH_PORT serving them apart from everything else."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from probe.mesh.routes import MAX_RESPONSES, add_routes
from probe.neighbours import Neighbour, StaticNeighbours
from probe.settings import Settings
from tests.test_mesh_collect import free_port, ip
from tests.test_server import HOST, RunProbe, run_probe  # noqa: F401 - fixture


async def test_concurrent_mesh_requests_beyond_the_cap_get_429() -> None:
    """The first view waits for a probe that never answers (2 s); meanwhile MAX_RESPONSES
    viewers wait for it and every other gets 429 with Retry-After at once."""
    port = free_port()

    async def hang(_r: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response()

    hanging = web.Application()
    hanging.router.add_get("/mesh/report", hang)
    hanging_runner = web.AppRunner(hanging, shutdown_timeout=0.1)
    await hanging_runner.setup()
    await web.TCPSite(hanging_runner, ip(2), port).start()

    app = web.Application()
    settings = Settings(http_port=port, pod_name="pod-1", node_name="n1")
    add_routes(
        app, settings, last_round=lambda: None, neighbourhood=StaticNeighbours.unavailable("test").current,
        not_ready=lambda: None, eligible=lambda: (Neighbour("pod-2", ip(2), "", "n2"),),
    )
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, ip(1), port).start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async def get(path: str) -> tuple[int, str | None, float]:
                started = time.monotonic()
                async with session.get(f"http://{ip(1)}:{port}{path}") as response:
                    await response.read()
                    return response.status, response.headers.get("Retry-After"), time.monotonic() - started

            answers = await asyncio.gather(*(get("/mesh.json") for _ in range(3 * MAX_RESPONSES)))
            refused = [a for a in answers if a[0] == 429]
            served = [a for a in answers if a[0] == 200]
            assert len(served) == MAX_RESPONSES and len(refused) == 2 * MAX_RESPONSES, answers
            assert all(a[1] == "1" and a[2] < 1.0 for a in refused), refused
            # The view is built now: everyone is served from it, at once.
            again = await asyncio.gather(*(get("/mesh.json") for _ in range(MAX_RESPONSES)))
            assert {a[0] for a in again} == {200}
    finally:
        await runner.cleanup()
        await hanging_runner.cleanup()


async def test_mesh_port_serves_the_mesh_and_nothing_else(run_probe: RunProbe) -> None:  # noqa: F811
    mesh_port = free_port()
    p = await run_probe({"KUBENURSE_MESH_PORT": str(mesh_port)})
    base = f"http://{HOST}:{mesh_port}"
    async with aiohttp.ClientSession() as session:
        for path, status in (("/mesh.json", 200), ("/mesh", 200), ("/mesh/report", 200), ("/alwayshappy", 404),
                             ("/alive", 404), ("/metrics", 404)):
            async with session.get(base + path) as response:
                assert response.status == status, path
        async with session.get(base + "/mesh/report") as response:
            assert (await response.json())["node"] == "node-a"
    for path, status in (("/mesh.json", 404), ("/mesh", 404), ("/mesh/report", 404), ("/alwayshappy", 200)):
        assert (await p.get(path))[0] == status, path


def test_mesh_port_must_be_its_own() -> None:
    from probe.settings import SettingsError, load_settings

    assert load_settings({}).mesh_port is None
    assert load_settings({"KUBENURSE_MESH_PORT": " "}).mesh_port is None, "empty: the normal ports"
    assert load_settings({"KUBENURSE_MESH_PORT": "8081"}).mesh_port == 8081
    with pytest.raises(SettingsError, match=r"KUBENURSE_MESH_PORT.*9000"):
        load_settings({"KUBENURSE_HTTP_PORT": "9000", "KUBENURSE_MESH_PORT": "9000"})


@pytest.mark.timeout(180)
def test_200_viewers_at_300_peers_leave_alwayshappy_under_a_second() -> None:
    """The probe's own server with 300 peers, 200 clients asking /mesh.json back to back for
    5 s (the benchmark's machinery, in processes of their own); a neighbour's /alwayshappy,
    timed every 50 ms meanwhile, answers within a second every time, and RSS stays bounded."""
    from bench.bench_mesh import load

    figures = load(300, seconds=5.0)
    assert figures.statuses.get(200, 0) > 200, figures.statuses
    assert set(figures.statuses) <= {200, 429}, figures.statuses
    assert figures.pings and not figures.ping_failures
    worst = max(figures.pings)
    print(f"/alwayshappy max {worst * 1000:.0f} ms over {len(figures.pings)}; RSS {figures.rss_idle:.0f} -> "
          f"{figures.rss_peak:.0f} MB peak; answers {figures.statuses}")
    assert worst < 1.0, f"/alwayshappy took {worst:.2f} s under load"
    assert figures.rss_peak - figures.rss_first < 100, "RSS grew by more than 100 MB under load"


async def test_own_neighbours_are_asked_without_a_whole_cluster_list() -> None:
    """A discovery that names only this probe's neighbours (no `eligible`/`listed`): they are
    still asked, and the paths towards them are kept."""
    from probe.mesh.collect import View
    from probe.neighbours import Neighbourhood
    from tests.test_mesh_collect import report

    port = free_port()
    peer_app = web.Application()

    async def answer(_r: web.Request) -> web.Response:
        return web.Response(body=report(2, [1]).encode(), content_type="application/json")

    peer_app.router.add_get("/mesh/report", answer)
    peer_runner = web.AppRunner(peer_app, shutdown_timeout=0.1)
    await peer_runner.setup()
    await web.TCPSite(peer_runner, ip(2), port).start()
    hood = Neighbourhood(neighbours=(Neighbour("pod-2", ip(2), "", "n2"),))
    app = web.Application()
    view = add_routes(
        app, Settings(http_port=port, pod_name="pod-1", node_name="n1"), last_round=lambda: None,
        neighbourhood=lambda: hood, not_ready=lambda: None,
    )
    try:
        built: View = await view.view()
    finally:
        await view.close()
        await peer_runner.cleanup()
    import json

    document = json.loads(built.plain)
    assert [(n["node"], n["reached"]) for n in document["nodes"]] == [("n1", True), ("n2", True)]
    assert [(p["from"], p["to"]) for p in document["paths"]] == [("n2", "n1")]
