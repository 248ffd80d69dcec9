"""Shared fixtures: throwaway CAs, real local target servers, free ports."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from aiohttp import web

# In CI (CI=true) a test that would skip fails instead (tests/ci_skips.py).
pytest_plugins = ["tests.ci_skips", "pytester"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@dataclass
class Target:
    """A real local HTTP(S) server the probe checks. Records what it received."""

    url: str
    port: int
    requests: list[dict[str, str]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    delay: float = 0.0
    status: int = 200


async def _start_target(
    host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None, port: int = 0
) -> tuple[Target, web.AppRunner]:
    target = Target(url="", port=0)

    async def handle(request: web.Request) -> web.StreamResponse:
        target.requests.append({"path": request.path, **dict(request.headers)})
        target.in_flight += 1
        target.max_in_flight = max(target.max_in_flight, target.in_flight)
        try:
            if request.path == "/hang":
                await asyncio.sleep(3600)
            if target.delay:
                await asyncio.sleep(target.delay)
            if request.path == "/redirect":
                raise web.HTTPFound(request.query["to"])
            status = target.status
            if request.path.startswith("/status/"):
                status = int(request.path.removeprefix("/status/"))
            return web.Response(status=status, text="answer\n")
        finally:
            target.in_flight -= 1

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    bound = runner.addresses[0][1]
    scheme = "https" if ssl_context else "http"
    netloc = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
    target.url, target.port = f"{scheme}://{netloc}", bound
    return target, runner


StartTarget = Callable[..., Awaitable[Target]]


@pytest.fixture
async def start_target() -> AsyncIterator[StartTarget]:
    runners: list[web.AppRunner] = []

    async def start(host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None, port: int = 0) -> Target:
        target, runner = await _start_target(host, ssl_context, port)
        runners.append(runner)
        return target

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture(scope="session")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    """Server side TLS for localhost/127.0.0.1, signed by the throwaway CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context
