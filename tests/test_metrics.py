"""/metrics as a user sees it: exactly the contract's series, labels and values."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import probe
from probe import names
from probe.app import Probe
from probe.checks.result import CheckResult, Facts, UdpLoss
from probe.neighbours import Neighbour, Neighbourhood, StaticNeighbours
from probe.settings import load_settings
from probe.telemetry.metrics import Metrics, series_limit
from tests.conftest import StartTarget, free_port

CONTRACT_FAMILIES = {
    "kubenurse_httpclient_request_duration_seconds": ("histogram", {"type"}),
    "kubenurse_httpclient_trace_request_duration_seconds": ("histogram", {"type", "event"}),
    "kubenurse_httpclient_requests": ("counter", {"type", "code"}),
    "kubenurse_errors": ("counter", {"type", "event"}),
    "kubenurse_tcp_retransmits": ("counter", {"type"}),
    "kubenurse_neighbourhood_incoming_checks": ("gauge", set()),
}


async def scrape(port: int, accept: str | None = None) -> tuple[str, str]:
    headers = {"Accept": accept} if accept else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics", headers=headers) as resp,
    ):
        assert resp.status == 200
        return await resp.text(), resp.headers["Content-Type"]


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, name: str, **labels: str) -> float | None:
    for s in samples(text):
        if s.name == name and s.labels == labels:
            return s.value
    return None


async def wait_rounds(probe: Probe, n: int, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while probe.prober.rounds < n:
        assert asyncio.get_running_loop().time() < deadline, "rounds did not run"
        await asyncio.sleep(0.02)


@pytest.fixture
async def running(start_target: StartTarget) -> AsyncIterator[tuple[Probe, int]]:
    good = await start_target()
    port = free_port()
    settings = load_settings(
        {
            "KUBENURSE_LISTEN_HOST": "127.0.0.1",
            "KUBENURSE_HTTP_PORT": str(port),
            "KUBENURSE_CHECK_INTERVAL": "100ms",
            "KUBENURSE_SERVICE_URL": good.url,
            "KUBENURSE_EXTRA_CHECKS": f"broken:http://127.0.0.1:{free_port()}/|fails:{good.url}/status/500",
            "POD_NAME": "pod-a",
        }
    )
    probe = Probe(settings, StaticNeighbours.unavailable("test"))
    await probe.start()
    await wait_rounds(probe, 3)
    yield probe, port
    await probe.stop()


async def test_exactly_the_contract_series(running: tuple[Probe, int]) -> None:
    _, port = running
    text, content_type = await scrape(port)
    assert content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    kubenurse = {name: f for name, f in families.items() if name.startswith("kubenurse_")}
    assert set(kubenurse) == {*CONTRACT_FAMILIES, "kubenurse_build_info"}
    [build] = kubenurse["kubenurse_build_info"].samples
    assert build.value == 1 and build.labels["version"] == probe.__version__, build
    for name, (kind, labels) in CONTRACT_FAMILIES.items():
        family = kubenurse[name]
        assert family.type == kind, name
        assert family.documentation, f"{name} has no HELP"
        for s in family.samples:
            assert set(s.labels) - {"le"} == labels, (name, s.labels)
    assert "target_info" not in families
    assert "otel_scope" not in text
    assert {"process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds"} <= set(families)
    for line in (
        "# TYPE kubenurse_httpclient_request_duration_seconds histogram",
        "# TYPE kubenurse_errors_total counter",
        "# TYPE kubenurse_neighbourhood_incoming_checks gauge",
    ):
        assert line in text


async def test_values_follow_what_happened(running: tuple[Probe, int]) -> None:
    _, port = running
    text, _ = await scrape(port)
    ok = value(text, "kubenurse_httpclient_requests_total", type="me_service", code="200")
    assert ok is not None and ok >= 3
    broken = value(text, "kubenurse_httpclient_requests_total", type="broken", code="round_trip_error")
    assert broken is not None and broken >= 3
    assert value(text, "kubenurse_errors_total", type="broken", event="connect_done") == broken
    fails = value(text, "kubenurse_errors_total", type="fails", event="status_code_500")
    assert fails is not None and fails == value(text, "kubenurse_httpclient_requests_total", type="fails", code="500")
    # One failure is counted once: no other error events for these types.
    errors = {(s.labels["type"], s.labels["event"]) for s in samples(text) if s.name == "kubenurse_errors_total"}
    assert errors == {("broken", "connect_done"), ("fails", "status_code_500")}
    # The duration histogram observes answered requests only (any status), like kubenurse.
    assert value(text, "kubenurse_httpclient_request_duration_seconds_count", type="broken") is None
    assert value(text, "kubenurse_httpclient_request_duration_seconds_count", type="fails") == fails
    events = {
        s.labels["event"]
        for s in samples(text)
        if s.name == "kubenurse_httpclient_trace_request_duration_seconds_count" and s.labels["type"] == "me_service"
    }
    assert events == {"connect_start", "connect_done", "got_conn", "wrote_request", "got_first_resp_byte"}
    # Skipped checks leave no series.
    assert 'type="api_server_direct"' not in text
    les = [
        s.labels["le"] for s in samples(text)
        if s.name == "kubenurse_httpclient_request_duration_seconds_bucket" and s.labels["type"] == "me_service"
    ]
    assert les == ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf"]


async def test_openmetrics_is_negotiated(running: tuple[Probe, int]) -> None:
    _, port = running
    text, content_type = await scrape(port, "application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    assert "kubenurse_httpclient_requests_total{" in text


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool not installed (Debian package prometheus)")
async def test_promtool_accepts_the_exposition(running: tuple[Probe, int]) -> None:
    _, port = running
    text, _ = await scrape(port)
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert lint.returncode == 0, lint.stdout + lint.stderr


async def test_histogram_buckets_setting(start_target: StartTarget) -> None:
    good = await start_target()
    port = free_port()
    settings = load_settings(
        {
            "KUBENURSE_LISTEN_HOST": "127.0.0.1",
            "KUBENURSE_HTTP_PORT": str(port),
            "KUBENURSE_CHECK_INTERVAL": "100ms",
            "KUBENURSE_SERVICE_URL": good.url,
            "KUBENURSE_HISTOGRAM_BUCKETS": "0.001,0.1,1,5.5",
        }
    )
    probe = Probe(settings, StaticNeighbours.unavailable("test"))
    await probe.start()
    try:
        await wait_rounds(probe, 1)
        text, _ = await scrape(port)
    finally:
        await probe.stop()
    les = {
        s.labels["le"] for s in samples(text) if s.name == "kubenurse_httpclient_request_duration_seconds_bucket"
    }
    assert les == {"0.001", "0.1", "1", "5.5", "+Inf"}


async def test_departed_node_series_disappear(start_target: StartTarget) -> None:
    # Neighbours are checked on the probe's own port at their pod IP: give each its own
    # loopback address with a real server on that port.
    port = free_port()
    node_b = await start_target(host="127.0.0.2", port=port)
    node_c = await start_target(host="127.0.0.3", port=port)
    both = Neighbourhood(
        neighbours=(
            Neighbour("pod-b", "127.0.0.2", "127.0.0.2", "node-b"),
            Neighbour("pod-c", "127.0.0.3", "127.0.0.3", "node-c"),
        )
    )
    source = StaticNeighbours(both)
    settings = load_settings(
        {
            "KUBENURSE_LISTEN_HOST": "127.0.0.1",
            "KUBENURSE_HTTP_PORT": str(port),
            "KUBENURSE_CHECK_INTERVAL": "100ms",
            "POD_NAME": "pod-a",
        }
    )
    probe = Probe(settings, source)
    await probe.start()
    try:
        await wait_rounds(probe, 2)
        text, _ = await scrape(port)
        assert value(text, "kubenurse_httpclient_requests_total", type="path_node-b", code="200")
        assert value(text, "kubenurse_httpclient_requests_total", type="path_node-c", code="200")
        assert node_b.requests[0]["KUBENURSE-NEIGHBOUR-ORIGIN"] == "pod-a"
        source.neighbourhood = Neighbourhood(neighbours=both.neighbours[:1])
        await wait_rounds(probe, probe.prober.rounds + 2)
        text, _ = await scrape(port)
    finally:
        await probe.stop()
    assert 'type="path_node-b"' in text
    assert "path_node-c" not in text, "a departed node's series must go"
    assert len(node_c.requests) >= 2


def _ok_result(check_type: str) -> CheckResult:
    events = {event: 0.001 * (i + 1) for i, event in enumerate(names.EVENTS)}  # HTTPS: all nine
    return CheckResult(check_type=check_type, status_code=200, duration=0.01, events=events)


def test_sdk_disabled_still_serves_every_series(monkeypatch: pytest.MonkeyPatch) -> None:
    # OTEL_SDK_DISABLED turns OTLP off (settings); the SDK alone would empty /metrics.
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    metrics = Metrics(buckets=(0.1, 1), incoming=lambda: 3)
    metrics.record(_ok_result("me_service"))
    text, _ = metrics.exposition("text/plain")
    assert value(text.decode(), "kubenurse_httpclient_requests_total", type="me_service", code="200") == 1
    assert value(text.decode(), "kubenurse_neighbourhood_incoming_checks") == 3


def test_a_thousand_node_neighbourhood_keeps_the_contract_labels() -> None:
    # KUBENURSE_NEIGHBOUR_LIMIT=0 on 1,000 nodes over TLS: 9,000 trace series in one metric,
    # far past the SDK's default cap of 2,000 (beyond it, an otel_metric_overflow label).
    metrics = Metrics(buckets=(0.1, 1), incoming=lambda: 0, cardinality_limit=series_limit(0, 0))
    for i in range(1000):
        metrics.record(_ok_result(names.path_type(f"node-{i}")))
    text = metrics.exposition("text/plain")[0].decode()
    assert "otel_metric_overflow" not in text
    trace = {
        (s.labels["type"], s.labels["event"])
        for s in samples(text)
        if s.name == "kubenurse_httpclient_trace_request_duration_seconds_count"
    }
    assert len(trace) == 1000 * len(names.EVENTS)
    assert value(text, "kubenurse_httpclient_requests_total", type="path_node-999", code="200") == 1


def test_series_limit_grows_with_the_neighbour_limit() -> None:
    assert series_limit(10, 0) < series_limit(100, 0) < series_limit(0, 0)
    assert series_limit(10, 3) > series_limit(10, 0)


def test_forget_relies_on_the_sdk_storage_shape() -> None:
    """Metrics.forget edits the SDK's private aggregation storage (it has no public way to
    drop a series). This fails loudly the day the pinned SDK changes that shape."""
    metrics = Metrics(buckets=(0.1, 1), incoming=lambda: 0)
    metrics.record(_ok_result("path_node-b"))
    metrics.record(_ok_result("path_node-c"))
    metrics.exposition("text/plain")
    storages = metrics.provider._measurement_consumer._reader_storages
    keys = [
        key
        for storage in storages.values()
        for matches in storage._instrument_view_instrument_matches.values()
        for match in matches
        for key in match._attributes_aggregation
    ]
    assert ("mapping", (("code", ("str", "200")), ("type", ("str", "path_node-c")))) in keys, keys[:5]
    # Nine trace series, one request count, one request duration.
    assert metrics.forget({"path_node-c"}) == len(names.EVENTS) + 2
    text = metrics.exposition("text/plain")[0].decode()
    assert "path_node-c" not in text and 'type="path_node-b"' in text


def _udp_result(check_type: str, sent: int, lost: int) -> CheckResult:
    rtts = tuple(0.0004 for _ in range(sent - lost))
    return CheckResult(check_type=check_type, facts=Facts(udp=UdpLoss(sent, lost, rtts)))


def test_udp_counts_add_up_per_type_and_go_with_their_node() -> None:
    metrics = Metrics(buckets=(0.001, 1), incoming=lambda: 0)
    for sent, lost in ((8, 0), (8, 3), (8, 8)):
        metrics.record(_udp_result("path_node-b", sent, lost))
    metrics.record(_udp_result("path_node-c", 8, 1))
    text = metrics.exposition("text/plain")[0].decode()
    assert value(text, "kubenurse_udp_packets_sent_total", type="path_node-b") == 24
    assert value(text, "kubenurse_udp_packets_lost_total", type="path_node-b") == 11
    assert value(text, "kubenurse_udp_rtt_seconds_count", type="path_node-b") == 13
    assert value(text, "kubenurse_udp_packets_lost_total", type="path_node-c") == 1
    metrics.forget({"path_node-c"})
    metrics.record(_udp_result("path_node-b", 8, 0))
    text = metrics.exposition("text/plain")[0].decode()
    assert "path_node-c" not in text, "a departed node's UDP series must go"
    assert value(text, "kubenurse_udp_packets_sent_total", type="path_node-b") == 32
    assert "# TYPE kubenurse_udp_packets_sent_total counter" in text
