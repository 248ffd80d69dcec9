"""The server through real HTTP(S) against a real started Probe, hostile clients, and the
real process's shutdown and logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from probe import __version__, names
from probe.app import Probe
from probe.neighbours import Neighbour, Neighbourhood, StaticNeighbours, StaticReadiness
from probe.settings import load_settings
from probe.telemetry.incoming import MAX_ORIGINS, IncomingChecks
from tests.conftest import StartTarget, free_port

pytestmark = pytest.mark.timeout(30)

HOST = "127.0.0.1"
DISCOVERY = object()  # run_probe(neighbours=DISCOVERY): let the probe choose its own source


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


class Running:
    def __init__(self, probe: Probe, session: aiohttp.ClientSession) -> None:
        self.probe = probe
        self.session = session
        self.port = probe.settings.http_port
        self.base = f"http://{HOST}:{self.port}"

    async def get(self, path: str, **kwargs: object) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.session.get(self.base + path, allow_redirects=False, **kwargs) as r:  # type: ignore[arg-type]
            return r.status, await r.text(), r

    async def alive(self, **kwargs: object) -> tuple[int, dict]:
        status, text, _ = await self.get("/alive", **kwargs)
        return status, json.loads(text)

    async def wait_round(self, at_least: int = 1) -> None:
        async def done() -> bool:
            return self.probe.prober.rounds >= at_least

        await until(done, what=f"{at_least} round(s)")

    async def metric(self, name: str, **labels: str) -> float | None:
        _, text, _ = await self.get("/metrics")
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return None


RunProbe = Callable[..., Awaitable[Running]]


@pytest.fixture
async def run_probe() -> AsyncIterator[RunProbe]:
    probes: list[Probe] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(
        env: dict[str, str] | None = None, neighbours: object = None, wait_round: bool = True
    ) -> Running:
        settings = load_settings(
            {
                "KUBENURSE_LISTEN_HOST": HOST,
                "KUBENURSE_HTTP_PORT": str(free_port()),
                "KUBENURSE_CHECK_INTERVAL": "200ms",
                "POD_NAME": "kubenurse-a",
                "NODE_NAME": "node-a",
                **(env or {}),
            }
        )
        if neighbours is None:
            neighbours = StaticNeighbours(Neighbourhood())
        source = None if neighbours is DISCOVERY else neighbours
        assert source is None or isinstance(source, StaticNeighbours)
        probe = Probe(settings, source)
        await probe.start()
        probes.append(probe)
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        sessions.append(session)
        running = Running(probe, session)
        if wait_round:
            await running.wait_round()
        return running

    yield start
    for session in sessions:
        await session.close()
    for probe in probes:
        await probe.stop()


# --- / and /alive --------------------------------------------------------------------------------


async def test_root_redirects_to_alive(run_probe: RunProbe) -> None:
    p = await run_probe()
    status, _, response = await p.get("/")
    assert status == 301
    assert response.headers["Location"] == "/alive"


async def test_alive_is_500_before_the_first_round(run_probe: RunProbe, start_target: StartTarget) -> None:
    target = await start_target()
    # The first round cannot end while its one check hangs.
    p = await run_probe({"KUBENURSE_EXTRA_CHECKS": f"slow:{target.url}/hang"}, wait_round=False)
    assert p.probe.prober.last_round is None
    status, doc = await p.alive()
    assert status == 500
    assert "slow" not in doc["last_check_result"]
    assert p.probe.prober.last_round is None, "the round ended during the test: it proves nothing"


async def test_alive_document_when_all_checks_pass(run_probe: RunProbe, start_target: StartTarget) -> None:
    target = await start_target()
    # The neighbour is this very probe: its path check hits our own /alwayshappy.
    hood = Neighbourhood(neighbours=(Neighbour("kubenurse-b", HOST, "10.0.0.2", "node-b"),))
    p = await run_probe({"KUBENURSE_EXTRA_CHECKS": f"extra:{target.url}/"}, neighbours=StaticNeighbours(hood))
    headers = {"User-Agent": "test-agent/1", "X-Request-Id": "yes"}
    status, text, response = await p.get("/alive?probe=1", headers=headers)
    assert status == 200, text
    assert response.content_type == "application/json"
    assert text.startswith('{\n  "'), "pretty-printed"
    doc = json.loads(text)
    assert doc["hostname"]
    assert doc["user_agent"] == "test-agent/1"
    assert doc["request_uri"] == "/alive?probe=1"
    assert doc["remote_addr"].startswith(HOST + ":")
    assert doc["headers"]["X-Request-Id"] == ["yes"]  # Go's http.Header shape, as kubenurse prints it
    result = doc["last_check_result"]
    assert result["extra"] == "ok"
    assert result["path_node-b"] == "ok"
    for check in (names.API_SERVER_DIRECT, names.API_SERVER_DNS, names.ME_INGRESS, names.ME_SERVICE):
        assert result[check] == "skipped"
    assert result["neighbourhood_state"] == "ok"
    assert result["neighbourhood"] == [
        {"PodName": "kubenurse-b", "PodIP": HOST, "HostIP": "10.0.0.2", "NodeName": "node-b", "Phase": "Running"}
    ]


async def test_alive_is_500_when_a_check_fails(run_probe: RunProbe, start_target: StartTarget) -> None:
    target = await start_target()
    refused = free_port()
    p = await run_probe({"KUBENURSE_EXTRA_CHECKS": f"good:{target.url}/|refused:http://{HOST}:{refused}/"})
    status, doc = await p.alive()
    assert status == 500
    result = doc["last_check_result"]
    assert result["good"] == "ok"
    # What a user reads: where it failed (the event) and whom it could not reach.
    assert result["refused"].startswith(f"{names.CONNECT_DONE}: "), result["refused"]
    assert f"{HOST}:{refused}" in result["refused"], result["refused"]
    assert "object at 0x" not in result["refused"]


async def test_alive_hides_credentials(run_probe: RunProbe) -> None:
    p = await run_probe()
    secret = {
        "Authorization": "Bearer s3cr3t-token",
        "Cookie": "session=s3cr3t-cookie",
        "Proxy-Authorization": "Basic s3cr3t-proxy",
    }
    status, text, _ = await p.get("/alive", headers={**secret, "X-Forwarded-For": "shown"})
    assert status == 200
    assert "s3cr3t" not in text
    headers = json.loads(text)["headers"]
    assert {k.lower() for k in headers}.isdisjoint(k.lower() for k in secret), headers
    assert headers["X-Forwarded-For"] == ["shown"], "allow-listed headers are echoed as sent"


async def test_alive_outside_a_cluster_says_what_was_skipped(run_probe: RunProbe) -> None:
    p = await run_probe(neighbours=DISCOVERY)
    status, doc = await p.alive()
    assert status == 200, "skipped checks do not count against health"
    result, reasons = doc["last_check_result"], doc["skipped_checks"]
    for check in (names.API_SERVER_DIRECT, names.API_SERVER_DNS, names.ME_INGRESS, names.ME_SERVICE):
        assert result[check] == "skipped"
        assert reasons[check]
    # Every reason reads the same way: the variable that is missing, then what that means.
    assert reasons[names.API_SERVER_DIRECT] == "KUBERNETES_SERVICE_HOST not set (not in a cluster)"
    assert reasons[names.API_SERVER_DNS] == "KUBERNETES_SERVICE_HOST not set (not in a cluster)"
    assert reasons[names.DNS_CLUSTER] == "KUBERNETES_SERVICE_HOST not set (not in a cluster)"
    assert all(re.match(r"[A-Z_]+ not set\b", reason) for reason in reasons.values()), reasons
    assert reasons[names.ME_INGRESS] == "KUBENURSE_INGRESS_URL not set"
    assert reasons[names.ME_SERVICE] == "KUBENURSE_SERVICE_URL not set"
    assert result["neighbourhood_state"] == "skipped"
    assert reasons["neighbourhood"] == "KUBERNETES_SERVICE_HOST not set (not in a cluster) and KUBECONFIG not set"
    assert result["neighbourhood"] == []
    # No discovery runs at all: nothing to be stale, and /alive says so instead of "stale": false.
    assert doc["discovery"] == {"running": False, "reason": reasons["neighbourhood"]}


async def test_ipv6_listen_neighbour_and_extra_check(run_probe: RunProbe, start_target: StartTarget) -> None:
    """kubenurse supports IPv6 (its PR #218): a probe listening on `::`, a neighbour whose pod
    IP is IPv6 (checked at http://[ip]:port/alwayshappy) and an IPv6 extra check."""
    target = await start_target(host="::1")
    port = free_port("::1")
    # The neighbour is this very probe, reached at its IPv6 loopback address.
    hood = Neighbourhood(neighbours=(Neighbour("kubenurse-b", "::1", "fd00::2", "node-b"),))
    p = await run_probe(
        {
            "KUBENURSE_LISTEN_HOST": "::",
            "KUBENURSE_HTTP_PORT": str(port),
            "KUBENURSE_EXTRA_CHECKS": f"v6:{target.url}/healthz/",
        },
        neighbours=StaticNeighbours(hood),
        wait_round=False,
    )
    await p.wait_round()
    async with p.session.get(f"http://[::1]:{port}/alive") as response:
        assert response.status == 200, await response.text()
        doc = await response.json()
    result = doc["last_check_result"]
    assert result["path_node-b"] == "ok" and result["v6"] == "ok", result
    assert doc["remote_addr"].startswith("[::1]:"), doc["remote_addr"]
    assert result["neighbourhood"][0]["PodIP"] == "::1"
    assert target.requests[0]["path"] == "/healthz/", "the extra check's URL is used as given"
    async with p.session.get(f"http://[::1]:{port}/metrics") as response:
        assert 'kubenurse_httpclient_requests_total{code="200",type="path_node-b"}' in await response.text()


# --- /alwayshappy and incoming checks --------------------------------------------------------------


async def test_alwayshappy_counts_distinct_origins_of_known_pods(run_probe: RunProbe) -> None:
    known = Neighbourhood(neighbours=(
        Neighbour("kubenurse-x", HOST, "10.0.0.2", "node-x"),
        Neighbour("kubenurse-y", HOST, "10.0.0.3", "node-y"),
        Neighbour("kubenurse-z", "10.9.9.9", "10.0.0.4", "node-z"),  # not where the requests come from
    ))
    p = await run_probe(neighbours=StaticNeighbours(known), env={"KUBENURSE_CHECK_NEIGHBOURHOOD": "false"})
    assert await p.metric(names.INCOMING_CHECKS) == 0
    for origin in ("kubenurse-x", "kubenurse-y", "kubenurse-x", "kubenurse-z", "invented", "kubenurse-x"):
        status, _, _ = await p.get("/alwayshappy", headers={names.NEIGHBOUR_ORIGIN_HEADER: origin})
        assert status == 200, "a forged origin still gets its answer; it is only not counted"
    status, _, _ = await p.get("/alwayshappy")  # no origin: not counted
    assert status == 200
    assert await p.metric(names.INCOMING_CHECKS) == 2
    assert p.probe.incoming.origins() == ["kubenurse-x", "kubenurse-y"]
    _, doc = await p.alive()
    assert doc["incoming_checks"] == 2 and doc["incoming_origins_not_counted"] == 2


def _known(*names_: str) -> Callable[[str], str | None]:
    return lambda name: "10.0.0.1" if name in names_ or not names_ else None


def test_incoming_origins_expire_after_60_seconds() -> None:
    now = [1000.0]
    incoming = IncomingChecks(clock=lambda: now[0], pod_ip=_known())
    incoming.saw("a", "10.0.0.1")
    now[0] += 10
    incoming.saw("b", "10.0.0.1")
    now[0] += 40
    incoming.saw("a", "10.0.0.1")  # a seen again at +50: its 60 s start over
    assert incoming.count() == 2
    now[0] = 1000 + 65  # b (+10) is 55 s old, a (+50) 15 s
    assert incoming.origins() == ["a", "b"]
    now[0] = 1000 + 70  # b is exactly 60 s old: still remembered
    assert incoming.count() == 2
    now[0] = 1000 + 75
    assert incoming.origins() == ["a"]
    now[0] = 1000 + 110.5
    assert incoming.count() == 0


def test_incoming_origins_are_bounded() -> None:
    now = [0.0]
    incoming = IncomingChecks(clock=lambda: now[0], pod_ip=_known())
    for i in range(MAX_ORIGINS + 50):
        now[0] += 0.001
        incoming.saw(f"pod-{i}", "10.0.0.1")
    assert incoming.count() == MAX_ORIGINS
    origins = set(incoming.origins())
    assert f"pod-{MAX_ORIGINS + 49}" in origins and "pod-0" not in origins, "the oldest make room"
    # Expired ones go first: after the window a newcomer leaves only itself.
    now[0] += 61
    incoming.saw("late", "10.0.0.1")
    assert incoming.origins() == ["late"]


@pytest.mark.parametrize(
    ("origin", "sender", "counted"),
    [
        ("kubenurse-b", "10.0.0.1", True),
        ("kubenurse-b", "::ffff:10.0.0.1", True),  # a dual-stack socket's view of the same sender
        ("kubenurse-b", "10.0.0.9", False),  # a known name from another pod's address
        ("invented", "10.0.0.1", False),  # a name discovery does not know
        ("kubenurse-b", "127.0.0.1", False),  # loopback is no pod IP in a cluster
        ("kubenurse-b", "", False),
    ],
)
def test_an_origin_counts_only_from_its_pods_address(origin: str, sender: str, counted: bool) -> None:
    incoming = IncomingChecks(pod_ip=_known("kubenurse-b"))
    assert incoming.saw(origin, sender) is counted
    assert incoming.count() == int(counted) and incoming.refused == int(not counted)


# --- /ready ---------------------------------------------------------------------------------------


async def test_ready_until_shutdown_begins(run_probe: RunProbe) -> None:
    p = await run_probe()
    assert (await p.get("/ready"))[0] == 200
    p.probe.begin_shutdown()
    assert (await p.get("/ready"))[0] == 503
    assert (await p.get("/alwayshappy"))[0] == 200, "the other endpoints keep answering"


async def test_ready_is_503_while_node_unschedulable(run_probe: RunProbe) -> None:
    p = await run_probe()
    readiness = p.probe.discovery.readiness
    assert isinstance(readiness, StaticReadiness)
    readiness.schedulable = False
    assert (await p.get("/ready"))[0] == 503
    readiness.schedulable = True
    assert (await p.get("/ready"))[0] == 200


# --- /metrics -------------------------------------------------------------------------------------


async def test_metrics_prometheus_text_by_default(run_probe: RunProbe, start_target: StartTarget) -> None:
    target = await start_target()
    p = await run_probe({"KUBENURSE_EXTRA_CHECKS": f"extra:{target.url}/"})
    status, text, response = await p.get("/metrics")
    assert status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    assert "# TYPE kubenurse_httpclient_requests_total counter" in text
    assert "# TYPE kubenurse_neighbourhood_incoming_checks gauge" in text
    assert "# EOF" not in text
    assert await p.metric("kubenurse_httpclient_requests_total", type="extra", code="200") >= 1  # type: ignore[operator]


async def test_metrics_openmetrics_when_asked(run_probe: RunProbe) -> None:
    p = await run_probe()
    accept = "application/openmetrics-text;version=1.0.0;q=0.9,text/plain;version=0.0.4;q=0.5"
    status, text, response = await p.get("/metrics", headers={"Accept": accept})
    assert status == 200
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    assert "kubenurse_neighbourhood_incoming_checks" in text


# --- HTTPS ----------------------------------------------------------------------------------------


async def test_https_serves_the_same_endpoints(run_probe: RunProbe, ca: trustme.CA, tmp_path: Path) -> None:
    leaf = ca.issue_cert("localhost", HOST)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    https_port = free_port()
    p = await run_probe(
        {
            "KUBENURSE_USE_TLS": "true",
            "KUBENURSE_CERT_FILE": str(cert),
            "KUBENURSE_CERT_KEY": str(key),
            "KUBENURSE_HTTPS_PORT": str(https_port),
        }
    )
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    base = f"https://{HOST}:{https_port}"
    expected = {"/": 301, "/alive": 200, "/alwayshappy": 200, "/ready": 200, "/metrics": 200}
    for path, status in expected.items():
        async with p.session.get(base + path, ssl=client_tls, allow_redirects=False) as r:
            assert r.status == status, path
            body = await r.text()
            if path == "/alive":
                assert json.loads(body)["last_check_result"]["neighbourhood_state"] == "ok"
    # A client that does not trust the CA is refused: it really is our certificate.
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await p.session.get(base + "/alwayshappy")
    assert (await p.get("/alwayshappy"))[0] == 200, "plain HTTP still answers"


# --- hostile clients ---------------------------------------------------------------------------------


async def still_serving(p: Running) -> None:
    status, _, _ = await p.get("/alwayshappy")
    assert status == 200


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_other_methods_are_405(run_probe: RunProbe, method: str) -> None:
    p = await run_probe()
    for path in ("/alive", "/alwayshappy", "/ready", "/metrics"):
        async with p.session.request(method, p.base + path, data=b"x") as r:
            assert r.status == 405, (method, path)
    await still_serving(p)


async def test_huge_header_is_rejected(run_probe: RunProbe) -> None:
    p = await run_probe()
    # A header of a few KB (cookies, tokens) is served; 100 KB in one header is refused with
    # an answer, not a dropped connection, and the server goes on serving.
    status, _, _ = await p.get("/alive", headers={"X-Big": "a" * 4_000})
    assert status == 200
    status, text, _ = await p.get("/alive", headers={"X-Huge": "a" * 100_000})
    assert status in (400, 431), (status, text)
    assert "hostname" not in text, "the request must not have reached the handler"
    await still_serving(p)


async def raw_exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "garbage",
    [b"GARBAGE\r\n\r\n", b"GET /alive HTTP/9.9\r\n\r\n", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\0" * 64],
    ids=["not-http", "bad-version", "tls-hello"],
)
async def test_garbage_request_line_is_400(run_probe: RunProbe, garbage: bytes) -> None:
    p = await run_probe()
    answer = await raw_exchange(p.port, garbage)
    assert re.match(rb"HTTP/1\.[01] 400 ", answer), answer[:100]
    await still_serving(p)


async def test_body_above_the_limit_is_413(run_probe: RunProbe) -> None:
    p = await run_probe()
    async with p.session.get(p.base + "/alwayshappy", data=b"x" * 1024) as r:
        assert r.status == 200, "a small body is fine"
    for path in ("/alwayshappy", "/alive"):
        async with p.session.get(p.base + path, data=b"x" * 200_000) as r:
            assert r.status == 413, path
    await still_serving(p)


async def test_slow_client_does_not_block_others(run_probe: RunProbe) -> None:
    p = await run_probe()
    request = f"GET /alive HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: " + "s" * 20
    _, writer = await asyncio.open_connection(HOST, p.port)

    async def dribble() -> None:
        for byte in request.encode():
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.1)

    slow = asyncio.create_task(dribble())
    try:
        await asyncio.sleep(0.3)  # the slow request is under way
        for _ in range(5):
            started = time.monotonic()
            await still_serving(p)
            assert time.monotonic() - started < 0.5
            await asyncio.sleep(0.1)
        assert not slow.done(), "the slow client was still sending: the test measured what it meant to"
    finally:
        slow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await slow
        writer.close()


async def test_many_idle_connections_do_not_block_others(run_probe: RunProbe) -> None:
    p = await run_probe()
    idle = [await asyncio.open_connection(HOST, p.port) for _ in range(200)]
    try:
        started = time.monotonic()
        for _ in range(5):
            await still_serving(p)
        assert time.monotonic() - started < 2.0
        # One of them, finally speaking, is answered too.
        reader, writer = idle[0]
        writer.write(f"GET /alwayshappy HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        assert (await asyncio.wait_for(reader.read(4096), 5)).startswith(b"HTTP/1.1 200 ")
    finally:
        for _, writer in idle:
            writer.close()


@pytest.mark.parametrize(
    "traceparent",
    [
        "garbage",
        "00-00000000000000000000000000000000-0000000000000000-01",
        "ff-" + "a" * 32 + "-" + "b" * 16 + "-01",
        "00-" + "z" * 32 + "-" + "b" * 16 + "-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" + "x" * 4_000,
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # a valid one, for good measure
    ],
    ids=["garbage", "zero-ids", "bad-version", "bad-hex", "long", "valid"],
)
async def test_any_traceparent_is_still_happy(run_probe: RunProbe, traceparent: str) -> None:
    p = await run_probe()
    status, _, _ = await p.get("/alwayshappy", headers={"traceparent": traceparent, "tracestate": "=,=,,"})
    assert status == 200
    await still_serving(p)


# --- the real process ----------------------------------------------------------------------------------


def process_env(**settings: str) -> dict[str, str]:
    ours = ("KUBENURSE_", "OTEL_", "KUBERNETES_", "POD_", "NODE_", "KUBECONFIG")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update({"KUBENURSE_LISTEN_HOST": HOST, "KUBENURSE_CHECK_INTERVAL": "200ms", **settings})
    return env


async def status_of(session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> int | None:
    try:
        async with session.get(url, allow_redirects=False, headers=headers) as r:
            await r.read()
            return r.status
    except (TimeoutError, aiohttp.ClientError):
        return None


async def start_process(env: dict[str, str], session: aiohttp.ClientSession, base: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "probe", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )

    async def ready() -> bool:
        if proc.returncode is not None:
            pytest.fail(f"the probe exited with {proc.returncode}: {(await proc.stderr.read()).decode()}")  # type: ignore[union-attr]
        return await status_of(session, base + "/ready") == 200

    await until(ready, timeout=20, what="/ready 200")
    return proc


async def port_closed(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(HOST, port)
    except OSError:
        return True
    writer.close()
    return False


@pytest.mark.parametrize(
    ("sig", "log_format"), [(signal.SIGTERM, "json"), (signal.SIGINT, "logfmt")], ids=["SIGTERM", "SIGINT"]
)
async def test_signal_starts_the_grace_period_then_exits_0(sig: signal.Signals, log_format: str) -> None:
    port = free_port()
    env = process_env(KUBENURSE_HTTP_PORT=str(port), KUBENURSE_SHUTDOWN_DURATION="1s", KUBENURSE_LOG_FORMAT=log_format)
    base = f"http://{HOST}:{port}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        proc = await start_process(env, session, base)
        try:
            proc.send_signal(sig)
            signalled = time.monotonic()

            async def not_ready() -> bool:
                return await status_of(session, base + "/ready") == 503

            await until(not_ready, timeout=0.5, what="/ready 503 right after the signal")
            assert await status_of(session, base + "/alive") in (200, 500), "/alive answers during the grace period"
            assert await status_of(session, base + "/alwayshappy") == 200
            assert time.monotonic() - signalled < 0.9, "the grace period was still on"
            await session.close()  # no keep-alive connection for the server to wait for
            code = await asyncio.wait_for(proc.wait(), 5)
            elapsed = time.monotonic() - signalled
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert code == 0
    assert 0.9 <= elapsed < 1.0 + 1.5, f"exited {elapsed:.2f}s after the signal"
    assert await port_closed(port)
    stderr = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert lines, "the probe logs something"
    if log_format == "json":
        records = [json.loads(line) for line in lines]
        assert {"time", "level", "msg"} <= set(records[0])
        messages = [r["msg"] for r in records]
    else:
        assert all(re.match(r"^time=\S+ level=\w+ logger=\S+ msg=", line) for line in lines), lines
        with pytest.raises(json.JSONDecodeError):
            json.loads(lines[0])
        messages = [re.search(r'msg=("[^"]*"|\S+)', line)[1].strip('"') for line in lines]  # type: ignore[index]
    assert "probe started" in messages and "shutting down" in messages and messages[-1] == "stopped"


async def test_second_signal_stops_at_once_and_the_log_says_it_would() -> None:
    port = free_port()
    env = process_env(KUBENURSE_HTTP_PORT=str(port), KUBENURSE_SHUTDOWN_DURATION="30s")
    base = f"http://{HOST}:{port}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        proc = await start_process(env, session, base)
        try:
            proc.send_signal(signal.SIGINT)

            async def not_ready() -> bool:
                return await status_of(session, base + "/ready") == 503

            await until(not_ready, timeout=2, what="/ready 503 after the first Ctrl-C")
            await session.close()
            proc.send_signal(signal.SIGINT)
            second = time.monotonic()
            code = await asyncio.wait_for(proc.wait(), 10)
            elapsed = time.monotonic() - second
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert code == 0 and elapsed < 5, f"exited {elapsed:.1f}s after the second signal (grace 30s)"
    records = [json.loads(line) for line in (await proc.stderr.read()).decode().splitlines()]  # type: ignore[union-attr]
    [started] = [r for r in records if r["msg"] == "probe started"]
    assert started["version"] == __version__, "the start-up log says which version runs"
    [shutting] = [r for r in records if r["msg"] == "shutting down"]
    assert shutting["grace_seconds"] == 30 and "30s" in shutting["detail"] and "second Ctrl-C" in shutting["detail"]
    assert [r["msg"] for r in records][-2:] == ["second signal: stopping now", "stopped"]


async def test_a_failing_check_is_logged_once_and_nothing_logs_a_traceback() -> None:
    port, refused = free_port(), free_port()
    env = process_env(
        KUBENURSE_HTTP_PORT=str(port),
        KUBENURSE_CHECK_INTERVAL="100ms",
        KUBENURSE_SHUTDOWN_DURATION="0s",
        KUBENURSE_EXTRA_CHECKS=f"refused:http://{HOST}:{refused}/",
    )
    base = f"http://{HOST}:{port}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        proc = await start_process(env, session, base)
        try:

            async def failed_many_times() -> bool:
                try:
                    async with session.get(base + "/metrics") as r:
                        text = await r.text()
                except aiohttp.ClientError:
                    return False
                for family in text_string_to_metric_families(text):
                    for s in family.samples:
                        if s.name == "kubenurse_httpclient_requests_total" and s.labels.get("type") == "refused":
                            return s.labels.get("code") == names.ROUND_TRIP_ERROR and s.value >= 8
                return False

            await until(failed_many_times, timeout=5, what="8 failed rounds")
            # Scanners' junk must not put tracebacks in the log either.
            assert (await raw_exchange(port, b"GARBAGE\r\n\r\n")).startswith(b"HTTP/1.")
            huge = {"X-Huge": "a" * 100_000}
            assert await status_of(session, base + "/alive", huge) in (400, 431, None)  # None: closed
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 5) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    stderr = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
    assert "Traceback" not in stderr
    records = [json.loads(line) for line in stderr.splitlines()]
    failed = [r for r in records if r["msg"] == "check failed"]
    assert len(failed) == 1, failed
    assert failed[0]["check"] == "refused"
    assert failed[0]["event"] == names.CONNECT_DONE
    assert failed[0]["error"] and failed[0]["error"] not in ("ok", "skipped")
    assert failed[0]["level"] == "warning"


def test_listen_error_names_an_ipv6_address_with_brackets() -> None:
    import errno

    from probe.server import listen_error

    error = listen_error("::1", 8443, "KUBENURSE_HTTPS_PORT", OSError(errno.EADDRINUSE, "whatever asyncio says"))
    assert str(error) == (
        "cannot listen on [::1]:8443 (KUBENURSE_HTTPS_PORT=8443, KUBENURSE_LISTEN_HOST=::1): address already in use"
    )
    unset = listen_error(None, 80, "KUBENURSE_HTTP_PORT", OSError(errno.EACCES, "x"))
    assert str(unset) == (
        "cannot listen on *:80 (KUBENURSE_HTTP_PORT=80, KUBENURSE_LISTEN_HOST unset): permission denied"
    )
