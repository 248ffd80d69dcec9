"""Whom the token-carrying clients trust (issue 23 item 5), and CA files reloaded on change
(item 2): real TLS servers with throwaway CAs, the real checker and event reporter."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from probe import names
from probe.checks.pipeline import Pipeline
from probe.checks.result import Target
from probe.checkurls import HttpGet
from probe.discovery.kube import ServiceAccount
from probe.mesh.events import NodeEventReporter
from probe.settings import load_settings
from probe.trust import Reloading, cluster_ca, kubeconfig_ca
from tests.conftest import StartTarget

pytestmark = pytest.mark.timeout(30)

TOKEN = "s3cret-token"


def tls_for(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


def serviceaccount(directory: Path, ca: trustme.CA | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "token").write_text(TOKEN)
    if ca is not None:
        ca.cert_pem.write_to_path(str(directory / "ca.crt"))
    return directory


async def run_checks(env: dict[str, str], *targets: Target) -> dict[str, str]:
    checker = Pipeline(load_settings(env))
    await checker.start()
    try:
        return {t.check_type: (await checker.check(t)).summary for t in targets}
    finally:
        await checker.close()


def api_target(port: int, check_type: str = names.API_SERVER_DIRECT) -> Target:
    return Target(check_type, f"https://127.0.0.1:{port}/version", HttpGet(send_token=True))


async def test_api_server_checks_trust_the_cluster_ca_only(start_target: StartTarget, tmp_path: Path) -> None:
    cluster, neighbours = trustme.CA(), trustme.CA()
    # A server with a certificate from KUBENURSE_EXTRA_CA (in the TLS overlay: any probe's).
    impostor = await start_target(ssl_context=tls_for(neighbours))
    real = await start_target(ssl_context=tls_for(cluster))
    extra_ca = tmp_path / "extra.pem"
    neighbours.cert_pem.write_to_path(str(extra_ca))
    env = {
        "KUBENURSE_SERVICEACCOUNT_DIR": str(serviceaccount(tmp_path / "sa", cluster)),
        "KUBENURSE_EXTRA_CA": str(extra_ca),
        "KUBENURSE_INSECURE": "true",  # does not cover the token-carrying checks either
    }
    results = await run_checks(
        env, api_target(impostor.port), api_target(real.port, names.API_SERVER_DNS),
        Target(names.ME_SERVICE, f"{impostor.url}/alwayshappy"),
    )
    assert results[names.API_SERVER_DIRECT].startswith(f"{names.TLS_HANDSHAKE_DONE}: "), results
    assert "certificate" in results[names.API_SERVER_DIRECT], results
    assert results[names.API_SERVER_DNS] == "ok", "the cluster's own CA is trusted"
    assert results[names.ME_SERVICE] == "ok", "other checks still trust KUBENURSE_EXTRA_CA"
    assert not any("Authorization" in r for r in impostor.requests), "the token never reached the impostor"
    assert any(r.get("Authorization") == f"Bearer {TOKEN}" for r in real.requests)


async def test_api_server_checks_do_not_trust_the_system_cas(start_target: StartTarget, tmp_path: Path) -> None:
    # No ca.crt and no kubeconfig: nothing is trusted, not even what the system CAs vouch for.
    cluster = trustme.CA()
    real = await start_target(ssl_context=tls_for(cluster))
    env = {"KUBENURSE_SERVICEACCOUNT_DIR": str(serviceaccount(tmp_path / "sa", None))}
    results = await run_checks(env, api_target(real.port))
    assert results[names.API_SERVER_DIRECT].startswith(f"{names.TLS_HANDSHAKE_DONE}: "), results
    assert real.requests == []


def kubeconfig(path: Path, cluster: dict[str, Any]) -> Path:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "other", "cluster": {"server": "https://10.0.0.1"}},
                     {"name": "lab", "cluster": {"server": "https://127.0.0.1:6443", **cluster}}],
        "contexts": [{"name": "c", "context": {"cluster": "lab", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
    }))
    return path


async def test_outside_a_cluster_the_kubeconfig_ca(start_target: StartTarget, tmp_path: Path) -> None:
    cluster = trustme.CA()
    real = await start_target(ssl_context=tls_for(cluster))
    data = base64.b64encode(cluster.cert_pem.bytes()).decode()
    config = kubeconfig(tmp_path / "config", {"certificate-authority-data": data})
    env = {"KUBENURSE_SERVICEACCOUNT_DIR": str(serviceaccount(tmp_path / "sa", None)), "KUBECONFIG": str(config)}
    assert (await run_checks(env, api_target(real.port)))[names.API_SERVER_DIRECT] == "ok"


def test_kubeconfig_ca_file_is_relative_to_the_kubeconfig(tmp_path: Path) -> None:
    config = kubeconfig(tmp_path / "config", {"certificate-authority": "pki/ca.crt"})
    ca = kubeconfig_ca(str(config))
    assert ca is not None and ca.cafile == str(tmp_path / "pki" / "ca.crt")
    assert kubeconfig_ca(str(kubeconfig(tmp_path / "bare", {}))) is None
    # The service account's ca.crt wins over a kubeconfig.
    sa = serviceaccount(tmp_path / "sa", trustme.CA())
    settings = load_settings({"KUBENURSE_SERVICEACCOUNT_DIR": str(sa), "KUBECONFIG": str(config)})
    found = cluster_ca(settings)
    assert found is not None and found.cafile == str(sa / "ca.crt")


async def test_extra_ca_is_reloaded_when_it_changes(start_target: StartTarget, tmp_path: Path) -> None:
    old, new = trustme.CA(), trustme.CA()
    server = await start_target(ssl_context=tls_for(new))
    extra_ca = tmp_path / "extra.pem"
    old.cert_pem.write_to_path(str(extra_ca))
    checker = Pipeline(load_settings({"KUBENURSE_EXTRA_CA": str(extra_ca)}))
    target = Target("renewed", f"{server.url}/alwayshappy")
    await checker.start()
    try:
        assert (await checker.check(target)).error_event == names.TLS_HANDSHAKE_DONE
        # As the kubelet updates a mounted config map: a new file swapped in.
        new.cert_pem.write_to_path(str(tmp_path / "extra.pem.new"))
        os.replace(tmp_path / "extra.pem.new", extra_ca)
        assert (await checker.check(target)).summary == "ok"
    finally:
        await checker.close()


def test_a_broken_reload_keeps_the_previous_value(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("1")

    def build() -> int:
        return int(path.read_text())

    value = Reloading(build, lambda: [str(path)], "number")
    assert value.get() == 1
    path.write_text("not a number")
    with pytest.raises(ValueError):
        build()
    value._build = lambda: (_ for _ in ()).throw(ValueError("half written"))  # type: ignore[assignment]
    assert value.get() == 1 and value.reloads == 0
    value._build = build  # type: ignore[assignment]
    path.write_text("22")
    assert value.get() == 22 and value.reloads == 1


@pytest.fixture
async def redirecting_api(tmp_path: Path) -> AsyncIterator[tuple[ServiceAccount, list[str]]]:
    """An events endpoint that answers 307 to a second server, which records what reaches it."""
    ca = trustme.CA()
    reached: list[str] = []

    async def elsewhere(request: web.Request) -> web.Response:
        reached.append(request.headers.get("Authorization", ""))
        return web.json_response({}, status=201)

    sink = web.Application()
    sink.router.add_route("*", "/{tail:.*}", elsewhere)
    sink_runner = web.AppRunner(sink)
    await sink_runner.setup()
    sink_site = web.TCPSite(sink_runner, "127.0.0.1", 0, ssl_context=tls_for(ca))
    await sink_site.start()
    sink_port = sink_runner.addresses[0][1]

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"https://localhost:{sink_port}{request.path}")

    app = web.Application()
    app.router.add_post("/api/v1/namespaces/{namespace}/events", redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls_for(ca))
    await site.start()
    credentials = ServiceAccount(str(serviceaccount(tmp_path / "sa", ca)), "127.0.0.1", runner.addresses[0][1])
    await credentials.load()
    yield credentials, reached
    await runner.cleanup()
    await sink_runner.cleanup()


async def test_the_event_reporter_follows_no_redirect(redirecting_api: tuple[ServiceAccount, list[str]]) -> None:
    from tests.test_mesh_events import FakeView

    credentials, reached = redirecting_api
    reporter = NodeEventReporter(
        credentials, FakeView(), namespace="kubenurse", pod="p1",  # type: ignore[arg-type]
        own_node=lambda: "node-1", eligible_nodes=lambda: ["node-2", "node-3"],
    )
    try:
        assert await reporter.run_once() == []
    finally:
        await reporter.close()
    assert list(reporter.posted.values()) == [307]
    assert reached == [], "nothing (and no token) went where the redirect pointed"


# --- issue 23 item 2: the serving certificate, renewed on disk -------------------------------


def write_pair(ca: trustme.CA, directory: Path) -> tuple[Path, Path, bytes]:
    """A fresh certificate and key for 127.0.0.1, swapped in as the kubelet updates a secret
    (new files renamed over the old); returns the paths and the certificate's DER."""
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = directory / "tls.crt", directory / "tls.key"
    for path, pem in ((cert, leaf.cert_chain_pems[0]), (key, leaf.private_key_pem)):
        pem.write_to_path(str(path) + ".new")
        os.replace(str(path) + ".new", path)
    return cert, key, ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


async def get_on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """One keep-alive GET /alwayshappy on an open connection; the status line."""
    writer.write(b"GET /alwayshappy HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    status = await reader.readline()
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    await reader.readexactly(len(b"I'm happy\n"))
    return status


async def test_a_renewed_serving_certificate_is_served_without_dropping_connections(tmp_path: Path) -> None:
    from probe.app import Probe
    from probe.neighbours import Neighbourhood, StaticNeighbours
    from tests.conftest import free_port

    ca = trustme.CA()
    cert, key, first = write_pair(ca, tmp_path)
    port = free_port()
    settings = load_settings({
        "KUBENURSE_LISTEN_HOST": "127.0.0.1", "KUBENURSE_HTTP_PORT": str(free_port()),
        "KUBENURSE_HTTPS_PORT": str(port), "KUBENURSE_USE_TLS": "true",
        "KUBENURSE_CERT_FILE": str(cert), "KUBENURSE_CERT_KEY": str(key), "KUBENURSE_CHECK_INTERVAL": "1s",
    })
    client = ssl.create_default_context()
    ca.configure_trust(client)
    probe = Probe(settings, StaticNeighbours(Neighbourhood()))
    await probe.start()
    try:
        async def connect(server_hostname: str | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=server_hostname)

        def served(writer: asyncio.StreamWriter) -> bytes:
            return bytes(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))

        old_reader, old_writer = await connect()
        assert served(old_writer) == first
        assert (await get_on(old_reader, old_writer)).startswith(b"HTTP/1.1 200")

        _, _, renewed = write_pair(ca, tmp_path)
        for name in (None, "localhost"):  # neighbours connect by IP (no SNI); names send SNI
            reader, writer = await connect(name)
            assert served(writer) == renewed, f"a new connection (SNI {name}) gets the renewed certificate"
            assert (await get_on(reader, writer)).startswith(b"HTTP/1.1 200")
            writer.close()
        # The connection opened before the renewal is still served, with its certificate.
        assert (await get_on(old_reader, old_writer)).startswith(b"HTTP/1.1 200")
        assert served(old_writer) == first
        old_writer.close()

        # Half a renewal (a key that is not the certificate's): the last good one stays.
        ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(key))
        reader, writer = await connect()
        assert served(writer) == renewed
        writer.close()
        assert probe.servers is not None and probe.servers.certificate is not None
        assert probe.servers.certificate.reloads == 1
    finally:
        await probe.stop()
