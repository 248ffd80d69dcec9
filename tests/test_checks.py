"""Checks against real local servers: plain HTTP, HTTPS with a throwaway CA, 500, a hanging
server, a refused port, a name that does not resolve."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import trustme

from probe import names
from probe.checks.pipeline import Pipeline
from probe.checks.result import CheckResult, Failure, Target
from probe.checks.rounds import FailureLog, Prober
from probe.checkurls import HttpGet, UdpEndpoint
from probe.neighbours import Neighbour, Neighbourhood, StaticNeighbours
from probe.settings import Settings, load_settings
from tests.conftest import StartTarget, free_port

PLAIN_EVENTS = [
    names.CONNECT_START,
    names.CONNECT_DONE,
    names.GOT_CONN,
    names.WROTE_REQUEST,
    names.GOT_FIRST_RESP_BYTE,
]


async def run_check(settings: Settings, target: Target) -> CheckResult:
    recorded: list[CheckResult] = []
    checker = Pipeline(settings, record=recorded.append)
    await checker.start()
    try:
        result = await checker.check(target)
    finally:
        await checker.close()
    assert recorded == [result], "every check is recorded exactly once"
    return result


def assert_ordered(events: dict[str, float]) -> None:
    offsets = list(events.values())
    assert offsets == sorted(offsets), events
    assert all(o >= 0 for o in offsets)


async def test_plain_http_ok_has_phase_events_in_order(start_target: StartTarget) -> None:
    server = await start_target()
    result = await run_check(Settings(), Target("extra", f"{server.url}/alwayshappy"))
    assert result.summary == "ok"
    assert result.status_code == 200 and result.error_event is None
    assert list(result.events) == PLAIN_EVENTS  # an IP literal: no DNS
    assert_ordered(dict(result.events))
    assert result.duration is not None
    assert result.duration >= result.events[names.WROTE_REQUEST]


async def test_name_is_resolved_each_time(start_target: StartTarget) -> None:
    server = await start_target()
    url = f"http://localhost:{server.port}/alwayshappy"
    first = await run_check(Settings(), Target("extra", url))
    second = await run_check(Settings(), Target("extra", url))
    for result in (first, second):
        assert result.ok, result.summary
        assert list(result.events)[:2] == [names.DNS_START, names.DNS_DONE]
        assert_ordered(dict(result.events))


async def test_https_with_extra_ca_times_tls_separately(
    start_target: StartTarget, server_tls: ssl.SSLContext, ca_file: Path
) -> None:
    server = await start_target(ssl_context=server_tls)
    settings = Settings(extra_ca_file=str(ca_file))
    result = await run_check(settings, Target("extra", f"{server.url}/alwayshappy"))
    assert result.ok, result.summary
    assert list(result.events) == [
        names.CONNECT_START,
        names.CONNECT_DONE,
        names.TLS_HANDSHAKE_START,
        names.TLS_HANDSHAKE_DONE,
        names.GOT_CONN,
        names.WROTE_REQUEST,
        names.GOT_FIRST_RESP_BYTE,
    ]
    assert_ordered(dict(result.events))
    # The handshake (key exchange, certificate chain, two round trips) takes longer than a
    # loopback TCP connect, and lies inside the request: the phases are told apart.
    tls = result.events[names.TLS_HANDSHAKE_DONE] - result.events[names.TLS_HANDSHAKE_START]
    connect = result.events[names.CONNECT_DONE] - result.events[names.CONNECT_START]
    assert tls > connect, (tls, connect)
    assert tls < result.duration


async def test_untrusted_certificate_fails_at_tls(start_target: StartTarget, server_tls: ssl.SSLContext) -> None:
    server = await start_target(ssl_context=server_tls)
    result = await run_check(Settings(), Target("extra", f"{server.url}/alwayshappy"))
    assert result.error_event == names.TLS_HANDSHAKE_DONE
    # In words for people: whose certificate, and why it was not accepted.
    assert result.summary == (
        f"tls_handshake_done: certificate of 127.0.0.1:{server.port} not accepted: "
        "unable to get local issuer certificate"
    )
    assert result.error_type == "ClientConnectorCertificateError"
    assert result.status_code is None and result.duration is None
    assert names.TLS_HANDSHAKE_START in result.events and names.TLS_HANDSHAKE_DONE not in result.events


async def test_insecure_skips_verification(start_target: StartTarget, server_tls: ssl.SSLContext) -> None:
    server = await start_target(ssl_context=server_tls)
    result = await run_check(Settings(insecure=True), Target("extra", f"{server.url}/alwayshappy"))
    assert result.ok, result.summary


async def test_status_500_is_an_error_with_duration(start_target: StartTarget) -> None:
    server = await start_target()
    result = await run_check(Settings(), Target("extra", f"{server.url}/status/500"))
    assert result.status_code == 500
    assert result.error_event == "status_code_500"
    assert result.summary == "status_code_500: unexpected status code 500 Internal Server Error"
    assert result.duration is not None and result.duration > 0


async def test_refused_port_fails_at_connect() -> None:
    port = free_port()
    result = await run_check(Settings(), Target("extra", f"http://127.0.0.1:{port}/"))
    assert result.error_event == names.CONNECT_DONE
    # Not aiohttp's "Cannot connect to host ... ssl:<...TimedSSLContext object at 0x...>".
    assert result.summary == f"connect_done: connection refused by 127.0.0.1:{port}"
    assert result.error_type == "ClientConnectorError"
    assert list(result.events) == [names.CONNECT_START]


async def test_hanging_server_times_out_as_round_trip_error(start_target: StartTarget) -> None:
    server = await start_target()
    settings = Settings(check_timeout=0.5)
    started = time.monotonic()
    result = await run_check(settings, Target("extra", f"{server.url}/hang"))
    elapsed = time.monotonic() - started
    assert result.error_event == names.ROUND_TRIP_ERROR
    assert result.summary == (
        f"round_trip_error: no answer from 127.0.0.1:{server.port} within 0.5s (timeout) after wrote_request"
    )
    assert names.WROTE_REQUEST in result.events and names.GOT_FIRST_RESP_BYTE not in result.events
    assert 0.45 < elapsed < 2.0


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root for a private netns")
def test_unresolvable_name_fails_at_dns() -> None:
    # In a fresh network namespace no resolver is reachable, so the lookup fails at once
    # and for real, without a single packet leaving this machine.
    script = (
        "import asyncio, json\n"
        "from probe.checks.result import Target\n"
        "from probe.settings import Settings\n"
        "from tests.test_checks import run_check\n"
        "r = asyncio.run(run_check(Settings(), Target('extra', 'http://kubernetes.invalid:8080/')))\n"
        "print(json.dumps({'event': r.error_event, 'summary': r.summary, 'events': list(r.events)}))\n"
    )
    out = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", script],
        capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent.parent,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["event"] == names.DNS_DONE
    assert result["events"] == [names.DNS_START]
    assert result["summary"].startswith("dns_done: could not resolve kubernetes.invalid: ")


async def test_token_goes_to_api_server_checks_only(
    start_target: StartTarget, server_tls: ssl.SSLContext, ca: trustme.CA, tmp_path: Path
) -> None:
    api = await start_target(ssl_context=server_tls)
    other = await start_target(ssl_context=server_tls)
    (tmp_path / "token").write_text("s3cret-token\n")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))  # trusted via the service-account CA
    settings = load_settings(
        {
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(api.port),
            "KUBERNETES_SERVICE_DNS": "localhost",
            "KUBENURSE_SERVICEACCOUNT_DIR": str(tmp_path),
            "KUBENURSE_SERVICE_URL": other.url,
            "KUBENURSE_INGRESS_URL": other.url,
            "KUBENURSE_EXTRA_CHECKS": f"version:{other.url}/version",
        }
    )
    hood = Neighbourhood(neighbours=(Neighbour("pod-b", "127.0.0.1", "127.0.0.1", "node-b"),))
    checker = Pipeline(settings)
    await checker.start()
    try:
        prober = Prober(settings, StaticNeighbours(hood), checker.check)
        round_ = await prober.run_round()
    finally:
        await checker.close()
    api_results = {k: round_.results[k].summary for k in (names.API_SERVER_DIRECT, names.API_SERVER_DNS)}
    assert api_results == {names.API_SERVER_DIRECT: "ok", names.API_SERVER_DNS: "ok"}
    assert [r["path"] for r in api.requests] == ["/version", "/version"]
    assert all(r.get("Authorization") == "Bearer s3cret-token" for r in api.requests)
    assert sorted(r["path"] for r in other.requests) == ["/alwayshappy", "/alwayshappy", "/version"]
    assert not any("Authorization" in r for r in other.requests), "token leaked beyond the API server"


async def test_round_runs_checks_concurrently(start_target: StartTarget) -> None:
    servers = [await start_target() for _ in range(4)]
    for server in servers:
        server.delay = 0.4
    extra = "|".join(f"t{i}:{s.url}/alwayshappy" for i, s in enumerate(servers))
    settings = load_settings({"KUBENURSE_EXTRA_CHECKS": extra})
    checker = Pipeline(settings)
    await checker.start()
    try:
        round_ = await Prober(settings, StaticNeighbours.unavailable("test"), checker.check).run_round()
    finally:
        await checker.close()
    assert all(round_.results[f"t{i}"].ok for i in range(4))
    assert 0.4 <= round_.duration < 1.2, "a round takes as long as its slowest check, not the sum"


async def test_a_hanging_check_never_overlaps_itself_and_others_keep_their_cadence(
    start_target: StartTarget,
) -> None:
    server = await start_target()
    settings = load_settings(
        {
            "KUBENURSE_EXTRA_CHECKS": f"hang:{server.url}/hang|fine:{server.url}/alwayshappy",
            "KUBENURSE_CHECK_INTERVAL": "100ms",
            "KUBENURSE_CHECK_TIMEOUT": "400ms",
        }
    )
    checker = Pipeline(settings)
    await checker.start()
    in_flight: dict[str, int] = {"hang": 0, "fine": 0}
    most: dict[str, int] = {"hang": 0, "fine": 0}

    async def counted(target: Target) -> CheckResult:
        in_flight[target.check_type] += 1
        most[target.check_type] = max(most[target.check_type], in_flight[target.check_type])
        try:
            return await checker.check(target)
        finally:
            in_flight[target.check_type] -= 1

    prober = Prober(settings, StaticNeighbours.unavailable("test"), counted)
    task = asyncio.create_task(prober.run())
    await asyncio.sleep(2.0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await checker.close()
    hangs = [r for r in server.requests if r["path"] == "/hang"]
    fine = [r for r in server.requests if r["path"] == "/alwayshappy"]
    # 2 s at 100 ms: the quick check ran about 20 times, whatever the hanging one did (in
    # kubenurse's rounds it would have waited for the hang: 5 times). The hanging one ran
    # about 2 s / 0.5 s (timeout, then the next tick) times, never two at once.
    assert len(fine) >= 15, f"the quick check lost its cadence: {len(fine)} runs in 2 s"
    assert 2 <= len(hangs) <= 6
    assert most == {"hang": 1, "fine": 1}
    assert prober.skipped_ticks >= 8  # the hanging check's missed ticks were dropped, not queued
    assert prober.last_round is not None
    assert prober.last_round.results["hang"].error_event == names.ROUND_TRIP_ERROR
    assert prober.last_round.results["fine"].ok


def test_start_offsets_are_deterministic_and_spread_over_part_of_the_interval() -> None:
    from probe.checks.rounds import SLOT_SIZE, SPREAD, slots_for, start_offset

    assert slots_for(14) == 1  # a default round (4 built-in + 10 neighbours) starts as one
    types = [f"path_node-{i}" for i in range(200)]
    slots = slots_for(len(types))
    assert slots == -(-200 // SLOT_SIZE)
    offsets = [start_offset(t, 5.0, slots) for t in types]
    assert offsets == [start_offset(t, 5.0, slots) for t in types]  # the same phase every interval
    assert all(0 <= o < SPREAD * 5.0 for o in offsets)
    # Every slot is used, and none holds far more than its share.
    per_slot = {o: offsets.count(o) for o in set(offsets)}
    assert len(per_slot) == slots
    assert max(per_slot.values()) <= 2 * SLOT_SIZE


def test_skipped_checks_say_why() -> None:
    from probe.checks.targets import plan_round

    plan = plan_round(Settings(check_me_service=False), StaticNeighbours.unavailable("x").current())
    reasons = {r.check_type: r.skip_reason for r in plan.skipped}
    assert reasons == {
        names.API_SERVER_DIRECT: "KUBERNETES_SERVICE_HOST not set (not in a cluster)",
        names.API_SERVER_DNS: "KUBERNETES_SERVICE_HOST not set (not in a cluster)",
        names.ME_INGRESS: "KUBENURSE_INGRESS_URL not set",
        names.ME_SERVICE: "disabled by KUBENURSE_CHECK_ME_SERVICE",
        names.DNS_CLUSTER: "KUBERNETES_SERVICE_HOST not set (not in a cluster)",
    }
    assert plan.targets == ()


def test_neighbour_targets_use_pod_ip_port_and_origin_header() -> None:
    from probe.checks.targets import plan_round

    hood = Neighbourhood(neighbours=(Neighbour("pod-b", "10.0.0.7", "192.0.2.1", "node-b"),))
    plan = plan_round(Settings(pod_name="pod-a", http_port=8080), hood)
    target, echo = plan.targets  # HTTP, and UDP to the echo on the same port number
    assert (target.check_type, target.url) == ("path_node-b", "http://10.0.0.7:8080/alwayshappy")
    assert (echo.check_type, echo.spec) == ("path_node-b", UdpEndpoint("10.0.0.7", 8080))
    assert echo.neighbour == target.neighbour
    assert target.spec == HttpGet(headers=((names.NEIGHBOUR_ORIGIN_HEADER, "pod-a"),))
    assert target.neighbour == hood.neighbours[0]
    tls = plan_round(Settings(pod_name="pod-a", use_tls=True, https_port=9443), hood)
    assert tls.targets[0].url == "https://10.0.0.7:9443/alwayshappy"


def test_failure_log_does_not_flood(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    failures = FailureLog(clock=lambda: now[0])
    broken = CheckResult(check_type="path_x", failure=Failure(names.CONNECT_DONE, "ConnectionRefusedError", "refused"))
    with caplog.at_level("INFO", logger="probe.checks"):
        for _ in range(100):  # 100 rounds, 5 s apart: 500 s
            failures.update(broken)
            now[0] += 5
        failures.update(CheckResult(check_type="path_x"))
    lines = [r for r in caplog.records if r.getMessage() == "check failed"]
    assert len(lines) == 2  # the first failure and one reminder after 300 s
    assert lines[1].failures == 61  # type: ignore[attr-defined]
    assert [r.getMessage() for r in caplog.records][-1] == "check recovered"


async def test_token_never_follows_a_redirect(start_target: StartTarget, tmp_path: Path) -> None:
    elsewhere = await start_target()
    api = await start_target()
    (tmp_path / "token").write_text("s3cret-token")
    settings = Settings(serviceaccount_dir=str(tmp_path))
    redirect = f"{api.url}/redirect?to={elsewhere.url}/version"
    result = await run_check(settings, Target(names.API_SERVER_DIRECT, redirect, HttpGet(send_token=True)))
    assert result.error_event == "status_code_302"
    assert elsewhere.requests == []
    # Without a token, redirects are followed as Go's client does.
    followed = await run_check(settings, Target("extra", redirect))
    assert followed.ok and [r["path"] for r in elsewhere.requests] == ["/version"]
    assert "Authorization" not in elsewhere.requests[0]


async def test_insecure_never_covers_the_token(
    start_target: StartTarget, server_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    impostor = await start_target(ssl_context=server_tls)  # its CA is trusted nowhere here
    (tmp_path / "token").write_text("s3cret-token")
    settings = Settings(insecure=True, serviceaccount_dir=str(tmp_path))
    version = f"{impostor.url}/version"
    api = await run_check(settings, Target(names.API_SERVER_DIRECT, version, HttpGet(send_token=True)))
    other = await run_check(settings, Target("extra", f"{impostor.url}/alwayshappy"))
    assert api.error_event == names.TLS_HANDSHAKE_DONE
    assert other.ok
    assert [r["path"] for r in impostor.requests] == ["/alwayshappy"]


async def test_two_probe_pods_on_one_node_are_both_checked_and_a_failing_one_is_not_hidden(
    start_target: StartTarget, caplog: pytest.LogCaptureFixture
) -> None:
    """A rolling update puts two probe pods on a node for a while. Both share the node's
    `path_<node>` type (the contract's labels have no pod), so the node's result is the worse
    of the two, naming the pod, and the log does not flap between failed and recovered."""
    healthy = await start_target(host="127.0.0.2")
    settings = load_settings({
        "KUBENURSE_HTTP_PORT": str(healthy.port), "KUBENURSE_CHECK_INTERVAL": "100ms",
        "KUBENURSE_CHECK_NEIGHBOURHOOD_UDP": "false",  # these neighbours answer HTTP only
    })
    hood = Neighbourhood(neighbours=(
        Neighbour("pod-new", "127.0.0.2", "127.0.0.2", "node-b"),
        Neighbour("pod-old", "127.0.0.3", "127.0.0.3", "node-b"),  # nothing listens: refused
    ))
    checker = Pipeline(settings)
    await checker.start()
    caplog.set_level(logging.INFO, logger="probe.checks")
    prober = Prober(settings, StaticNeighbours(hood), checker.check)
    try:
        for _ in range(5):
            round_ = await prober.run_round()
            result = round_.results["path_node-b"]
            assert not result.ok
            assert result.error_event == names.CONNECT_DONE
            assert "pod-old" in result.summary
    finally:
        await checker.close()
    assert len([r for r in healthy.requests if r["path"] == "/alwayshappy"]) == 5  # pod-new checked too
    failed = [r for r in caplog.records if r.getMessage() == "check failed"]
    recovered = [r for r in caplog.records if r.getMessage() == "check recovered"]
    assert len(failed) == 1 and not recovered, "the log flapped"
    assert getattr(failed[0], "check", "") == "path_node-b/pod-old"


async def test_a_slot_sends_its_udp_trains_first_and_its_other_checks_a_moment_later() -> None:
    """The echo answering a train must not be busy with this probe's HTTP check to it (its
    delay would be in the round trip): in a slot the trains go first, the rest UDP_LEAD later,
    and a path's train shares its HTTP check's slot. The trains' first look is the moment the
    rest starts, so the lead costs no wakeup of its own."""
    from probe.checks.rounds import UDP_LEAD
    from probe.checks.wakeups import awake_at

    hood = Neighbourhood(tuple(Neighbour(f"kubenurse-n{i}", f"10.0.0.{i}", f"10.0.1.{i}", f"n{i}") for i in range(3)))
    started: dict[str, float] = {}
    awake: dict[str, float | None] = {}

    async def note(target: Target) -> CheckResult:
        started[target.key] = asyncio.get_running_loop().time()
        awake[target.key] = awake_at.get()
        return CheckResult(check_type=target.check_type, target=target)

    settings = Settings(check_interval=10.0)
    prober = Prober(settings, StaticNeighbours(hood), note)
    task = asyncio.create_task(prober.run())
    try:
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(started) == 6:
                break
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    udp = {k.split("/")[0]: t for k, t in started.items() if k.endswith("(udp)")}
    http = {k.split("/")[0]: t for k, t in started.items() if not k.endswith("(udp)")}
    assert set(udp) == set(http) == {"path_n0", "path_n1", "path_n2"}, started
    for path, at in http.items():
        assert at - udp[path] >= UDP_LEAD * 0.9, (path, at - udp[path])
    for key, moment in awake.items():
        if key.endswith("(udp)"):
            http_key = key.removesuffix(" (udp)")
            assert moment is not None and moment <= started[http_key] < moment + 0.01, (key, moment, started)
            assert awake[http_key] is None


async def test_a_slots_trains_are_checked_together_in_one_task() -> None:
    """A task a train cost more than the train's own Python: the prober hands a slot's UDP
    trains to check_many at once (the HTTP checks stay one task each)."""
    hood = Neighbourhood(tuple(Neighbour(f"kubenurse-n{i}", f"10.0.0.{i}", f"10.0.1.{i}", f"n{i}") for i in range(4)))
    batches: list[list[str]] = []
    single: list[str] = []

    async def one(target: Target) -> CheckResult:
        single.append(target.key)
        return CheckResult(check_type=target.check_type, target=target)

    async def many(targets: Sequence[Target]) -> list[CheckResult]:
        batches.append([t.key for t in targets])
        return [CheckResult(check_type=t.check_type, target=t) for t in targets]

    prober = Prober(Settings(check_interval=10.0), StaticNeighbours(hood), one, check_many=many)
    task = asyncio.create_task(prober.run())
    try:
        for _ in range(100):
            await asyncio.sleep(0.01)
            if prober.rounds:
                break
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert len(batches) == 1 and sorted(batches[0]) == [f"path_n{i}/kubenurse-n{i} (udp)" for i in range(4)], batches
    assert sorted(single) == [f"path_n{i}/kubenurse-n{i}" for i in range(4)]
    assert prober.last_round is not None and set(prober.last_round.udp) == {f"path_n{i}" for i in range(4)}
