"""A target with a known delay, in its own process (as a real server would be):
`python -m bench.delay_server PORT DELAY_SECONDS`. Every answer takes DELAY; GET /served
returns, as JSON, how long each answer really took on the server side (a sleep overshoots
by the event loop's granularity, so that, not DELAY, is the true figure)."""

from __future__ import annotations

import asyncio
import json
import sys
import time

from aiohttp import web


def main() -> None:
    port, delay = int(sys.argv[1]), float(sys.argv[2])
    served: list[float] = []

    async def handle(_request: web.Request) -> web.Response:
        started = time.perf_counter()
        await asyncio.sleep(delay)
        served.append(time.perf_counter() - started)
        return web.Response(text="ok")

    async def report(_request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(served))

    async def reset(_request: web.Request) -> web.Response:
        served.clear()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/served", report)
    app.router.add_get("/reset", reset)
    app.router.add_get("/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
