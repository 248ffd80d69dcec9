"""UDP checks and the UDP echo on real loopback sockets: a train to a real echo, a closed
port, an echo that drops full-size datagrams, a flood from a thousand source ports; and what
a user sees of each on /metrics, in the span and on /alive."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import cast

import aiohttp
import pytest
from opentelemetry.trace import StatusCode

from probe import names
from probe.app import Probe
from probe.checks import udp
from probe.checks.pipeline import Pipeline
from probe.checks.result import Target
from probe.checks.targets import plan_round
from probe.checkurls import parse_udp_url
from probe.neighbours import Neighbour, Neighbourhood, StaticNeighbours
from probe.settings import Settings, load_settings
from probe.udpecho import (
    BURST,
    BURST_PER_SOURCE,
    BYTES_PER_SECOND_PER_SOURCE,
    MAX_DATAGRAM,
    TRAINS_PER_SOURCE,
    UdpEcho,
    start_echo,
)
from tests.conftest import free_port
from tests.kind_helpers import Spans, new_metrics, series


@pytest.fixture
async def echo() -> AsyncIterator[tuple[int, UdpEcho]]:
    port = free_port()
    transport, protocol = await start_echo("127.0.0.1", port)
    assert transport is not None, protocol.stats.state
    yield port, protocol
    transport.close()


class BigDropper(asyncio.DatagramProtocol):
    """An echo behind a path that loses every datagram over `limit` bytes (an MTU black hole)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) <= self.limit and self.transport is not None:
            self.transport.sendto(data, addr)


async def check(url: str, timeout: float = 1.0) -> tuple[object, dict[str, float], Spans]:
    metrics = new_metrics()
    spans = Spans()
    checker = Pipeline(Settings(check_timeout=timeout), record=metrics.record, tracer=spans.tracer)
    result = await checker.check(Target("echo", url, parse_udp_url(url)))
    return result, series(metrics, "echo"), spans


async def test_a_train_comes_back_whole(echo: tuple[int, UdpEcho]) -> None:
    port, protocol = echo
    result, seen, spans = await check(f"udp://127.0.0.1:{port}")
    assert result.ok, result.summary  # type: ignore[attr-defined]
    assert (result.facts.udp.sent, result.facts.udp.lost) == (udp.TRAIN, 0)  # type: ignore[attr-defined]
    rtts = result.facts.udp.rtts  # type: ignore[attr-defined]
    assert len(rtts) == udp.TRAIN and all(0 < r < 0.05 for r in rtts), rtts
    assert protocol.stats.echoed == udp.TRAIN
    assert seen == {
        'kubenurse_udp_packets_sent_total{type="echo"}': udp.TRAIN,
        'kubenurse_udp_packets_lost_total{type="echo"}': 0,
        'kubenurse_udp_rtt_seconds_count{type="echo"}': udp.TRAIN,
    }
    (span,) = spans.named("check echo (udp)")
    attrs = dict(span.attributes or {})
    assert attrs[names.ATTR_UDP_SENT] == udp.TRAIN and attrs[names.ATTR_UDP_LOST] == 0
    assert attrs["network.transport"] == "udp"


async def test_full_size_lost_small_back_is_mtu() -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: BigDropper(1400), local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    try:
        result, seen, spans = await check(f"udp://127.0.0.1:{port}", timeout=0.5)
    finally:
        transport.close()
    big = udp.TRAIN // udp.BIG_EVERY
    assert not result.ok  # type: ignore[attr-defined]
    assert result.error_event == names.MTU, result.summary  # type: ignore[attr-defined]
    assert result.facts.udp.lost == big and result.facts.udp.sent == udp.TRAIN  # type: ignore[attr-defined]
    assert seen['kubenurse_errors_total{event="mtu",type="echo"}'] == 1
    assert seen['kubenurse_udp_packets_lost_total{type="echo"}'] == big
    assert "don't fragment" in result.summary  # type: ignore[attr-defined]
    (span,) = spans.named("check echo (udp)")
    assert span.status.status_code == StatusCode.ERROR


async def test_nothing_listening_is_refused() -> None:
    result, seen, _ = await check(f"udp://127.0.0.1:{free_port()}")
    assert result.error_event == names.ROUND_TRIP_ERROR  # type: ignore[attr-defined]
    assert "refused" in result.summary, result.summary  # type: ignore[attr-defined]
    assert 'kubenurse_httpclient_requests_total{code="round_trip_error",type="echo"}' not in seen


async def test_echo_ignores_large_datagrams_and_privileged_or_own_ports(echo: tuple[int, UdpEcho]) -> None:
    port, protocol = echo
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect(("127.0.0.1", port))
        sock.send(b"x" * (MAX_DATAGRAM + 1))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(loop.sock_recv(sock, 65536), 0.3)
        sock.send(b"small")
        assert await asyncio.wait_for(loop.sock_recv(sock, 65536), 2) == b"small"
    # A datagram "from" the echo's own port: two echoes must not be set talking to each other.
    with protocol.lock:  # as the echo's thread takes datagrams in
        protocol.datagram_received(b"loop", ("127.0.0.1", port))
        protocol.datagram_received(b"dns", ("127.0.0.1", 53))
        # The answer can reach us before the echo's thread counts it: the lock waits for that.
        assert protocol.stats.too_large == 1 and protocol.stats.refused_source == 2
        assert protocol.stats.echoed == 1


async def test_a_flood_from_a_thousand_ports_gets_a_bounded_answer(echo: tuple[int, UdpEcho]) -> None:
    port, protocol = echo
    size = 1400
    socks = []
    try:
        for _ in range(1000):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        started = time.monotonic()
        rounds = 5

        def flood() -> None:  # from a thread, so the echo's loop is free to read
            for _ in range(rounds):
                for i, sock in enumerate(socks):
                    sock.sendto(b"f" * size, ("127.0.0.1", port))
                    if i % 100 == 99:
                        time.sleep(0.005)  # the budget, not the socket buffer, is what bounds it

        await asyncio.to_thread(flood)
        await asyncio.sleep(0.2)
        elapsed = time.monotonic() - started
        received = 0
        for sock in socks:
            while True:
                try:
                    received += len(sock.recv(65536))
                except BlockingIOError:
                    break
    finally:
        for sock in socks:
            sock.close()
    sent = rounds * 1000 * size
    # One source address: its budget, plus what refilled meanwhile, and never more than came in.
    bound = BURST_PER_SOURCE + elapsed * BYTES_PER_SECOND_PER_SOURCE + size
    assert received <= bound, (received, bound)
    assert received == protocol.stats.echoed_bytes
    assert protocol.stats.over_budget > 0
    assert received < sent / 2
    assert BURST >= BURST_PER_SOURCE


def test_each_neighbour_gets_a_udp_target_unless_turned_off() -> None:
    hood = Neighbourhood(
        neighbours=(Neighbour("pod-b", "10.0.0.2", "10.1.0.2", "node-b"),)
    )
    settings = Settings(http_port=8080)
    planned = plan_round(settings, hood).targets
    udp_targets = [t for t in planned if t.kind == names.KIND_UDP]
    assert [(t.check_type, t.url) for t in udp_targets] == [("path_node-b", "udp://10.0.0.2:8080")]
    assert len({t.key for t in planned}) == len(planned)
    off = plan_round(Settings(http_port=8080, check_neighbourhood_udp=False), hood).targets
    assert not [t for t in off if t.kind == names.KIND_UDP]


async def test_a_probe_answers_udp_and_checks_it(tmp_path: object) -> None:
    port = free_port()
    settings = load_settings(
        {
            "KUBENURSE_LISTEN_HOST": "127.0.0.1",
            "KUBENURSE_HTTP_PORT": str(port),
            "KUBENURSE_CHECK_INTERVAL": "200ms",
            "KUBENURSE_EXTRA_CHECKS": f"self_udp:udp://127.0.0.1:{port}",
            "POD_NAME": "pod-a",
        }
    )
    probe = Probe(settings, StaticNeighbours.unavailable("test"))
    await probe.start()
    try:
        deadline = time.monotonic() + 10
        while probe.prober.rounds < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/alive") as resp:
                alive = json.loads(await resp.text())
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                text = await resp.text()
    finally:
        await probe.stop()
    assert alive["last_check_result"]["self_udp"] == "ok"
    assert alive["udp_echo"]["state"] == "on" and alive["udp_echo"]["echoed"] >= 2 * udp.TRAIN
    assert 'kubenurse_udp_packets_sent_total{type="self_udp"}' in text
    assert 'kubenurse_udp_packets_lost_total{type="self_udp"} 0.0' in text


async def test_the_echo_counts_what_arrived_of_each_train(echo: tuple[int, UdpEcho]) -> None:
    port, protocol = echo
    first = await udp.send_train("127.0.0.1", port, 1.0)
    second = await udp.send_train("127.0.0.1", port, 1.0)
    arrived = protocol.arrived("127.0.0.1")
    assert arrived == {first.train_id: udp.TRAIN, second.train_id: udp.TRAIN}
    assert protocol.arrived("127.0.0.2") == {}
    protocol.datagram_received(b"not a train", ("127.0.0.1", 40000))
    assert protocol.arrived("127.0.0.1") == arrived


async def test_a_path_keeps_its_recent_trains(echo: tuple[int, UdpEcho]) -> None:
    port, protocol = echo
    url = f"udp://127.0.0.1:{port}"
    checker = Pipeline(Settings(check_timeout=1.0))
    target = Target("echo", url, parse_udp_url(url))
    results = [await checker.check(target) for _ in range(udp.WINDOW + 2)]
    last = results[-1].facts.udp
    assert last is not None and len(last.trains) == udp.WINDOW
    assert last.window == (udp.WINDOW * udp.TRAIN, 0)
    ids = [t[0] for t in last.trains]
    assert ids == [r.facts.udp.trains[-1][0] for r in results[2:]]  # type: ignore[union-attr]
    # The echo remembers the latest trains of a source, as many as a mesh report carries.
    assert set(ids[-TRAINS_PER_SOURCE:]) == set(protocol.arrived("127.0.0.1"))


def test_an_outage_is_not_loss_in_the_window() -> None:
    """Trains of which nothing came back (the node was down) stay out of the loss window:
    the path is not 'lossy' for ten trains after it is back."""
    from probe.checks.result import UdpLoss

    loss = UdpLoss(10, 0, trains=((1, 10, 0), (2, 10, 0), (3, 10, 9), (4, 10, 10)))
    assert loss.window == (20, 1)


async def test_echoes_are_first_read_after_the_last_trains_slowest_round_trip() -> None:
    assert udp.first_look(None) == udp.FIRST_LOOK
    quick = udp.Train("127.0.0.1", 1, rtts_ns=[50_000, 90_000])
    assert udp.first_look(quick) == udp.FIRST_LOOK
    slow = udp.Train("127.0.0.1", 1, rtts_ns=[20_000_000, 40_000_000])  # a path 40 ms away
    assert udp.first_look(slow) == pytest.approx(0.061)
    assert udp.first_look(udp.Train("127.0.0.1", 1, rtts_ns=[3_000_000_000])) == udp.LAST_LOOK


async def test_read_late_is_free_with_kernel_stamps_and_avoided_without(
    echo: tuple[int, UdpEcho], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The echoes of a train are read once, late, only where the kernel stamped their arrival:
    timed by the loop, a late read would be in every round trip."""
    port, _ = echo
    stamped = await udp.send_train("127.0.0.1", port, 1.0, look=0.05)
    assert stamped.source == "kernel" and len(stamped.rtts_ns) == udp.TRAIN
    assert max(stamped.rtts_ns) < 40_000_000, stamped.rtts_ns
    capabilities = udp.kernel.capabilities()
    monkeypatch.setattr(
        udp.kernel, "capabilities", lambda: type(capabilities)(rx_timestamps=False, tcp_info=capabilities.tcp_info)
    )
    unstamped = await udp.send_train("127.0.0.1", port, 1.0, look=0.05)
    assert unstamped.source == "loop" and len(unstamped.rtts_ns) == udp.TRAIN
    assert max(unstamped.rtts_ns) < 40_000_000, unstamped.rtts_ns  # not read after the 50 ms look


def test_an_answer_the_echo_could_not_send_is_shown_not_lost_silently() -> None:
    echo = UdpEcho(8080)

    def full(_data: object, _addr: object) -> None:
        raise BlockingIOError("send buffer full")

    echo.send = full
    echo.datagram_received(b"x" * 64, ("127.0.0.1", 40000))
    assert echo.stats.echoed == 0 and echo.stats.as_alive()["send_errors"] == 1


async def test_datagrams_dropped_at_the_echos_own_socket_are_shown(echo: tuple[int, UdpEcho]) -> None:
    """An echo too busy to read lets the socket overflow: the senders count that as loss the
    network did not cause, so the echo says how many the kernel dropped at its socket."""
    port, protocol = echo
    with open("/proc/sys/net/core/rmem_max") as f:
        most = 2 * int(f.read())  # the kernel's cap on the echo's receive buffer
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", port))
        with protocol.lock:  # the echo's thread cannot take datagrams in meanwhile
            for _ in range(most // 9000 + 200):  # over the buffer
                sock.send(b"x" * 9000)
        await asyncio.sleep(0.3)  # now the echo reads what its socket kept
        sock.send(b"after")  # the kernel's count comes with the next datagram queued
        await asyncio.sleep(0.2)
    assert protocol.stats.socket_drops > 0, protocol.stats
    assert protocol.stats.as_alive()["dropped_at_socket"] == protocol.stats.socket_drops


async def test_a_path_keeps_its_socket_and_starts_afresh_after_an_error(echo: tuple[int, UdpEcho]) -> None:
    """A path's trains leave from one socket (the echo sees one source port); a train that
    failed (refused) closes it, and the next train does not inherit the refusal."""
    port, echo_protocol = echo
    sources: list[int] = []
    original = echo_protocol.send
    echo_protocol.send = lambda data, addr: (sources.append(addr[1]), original(data, addr))[1]
    url = f"udp://127.0.0.1:{port}"
    kind = udp.UdpKind(Settings(check_timeout=1.0))
    target = Target("echo", url, parse_udp_url(url))
    try:
        for _ in range(3):
            assert (await kind.measure(target)).failure is None
        assert len(sources) == 3 * udp.TRAIN and len(set(sources)) == 1, set(sources)
        # A late datagram of an earlier train earned an ICMP refusal: not this train's.
        path = kind._paths[target.key]
        stray = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stray.bind(("127.0.0.1", 0))
        stray_port = stray.getsockname()[1]
        stray.close()
        path.sock.connect(("127.0.0.1", stray_port))
        path.sock.send(b"to nobody")  # refused: an error now waits on the socket
        await asyncio.sleep(0.05)
        path.sock.connect(("127.0.0.1", port))
        outcome = await kind.measure(target)
        assert outcome.failure is None, outcome.failure
        refused_url = f"udp://127.0.0.1:{free_port()}"
        refused = Target("refused", refused_url, parse_udp_url(refused_url))
        assert (await kind.measure(refused)).failure is not None
        assert refused.key not in kind._paths  # closed: the next train starts with a new socket
    finally:
        await kind.close()
    assert not kind._paths


async def test_trains_sent_together_are_first_read_at_one_moment() -> None:
    from probe.checks.wakeups import SharedDeadline

    looks = SharedDeadline(0.002)
    first = looks.at(10.0)
    assert first == pytest.approx(10.002)
    assert looks.at(10.001) == first and looks.at(10.002) == first  # within the slack: the same
    assert looks.at(9.0) == pytest.approx(9.002)  # earlier than the shared moment allows: its own
    assert looks.at(10.5) == pytest.approx(10.502)


async def test_sleepers_given_one_moment_wake_in_one_turn_of_the_loop() -> None:
    from probe.checks.wakeups import sleep_until

    loop = asyncio.get_running_loop()
    turns = 0

    def tick() -> None:
        nonlocal turns
        turns += 1
        if len(woke) < 10:  # until every sleeper woke: then the loop is left alone
            loop.call_soon(tick)

    woke: list[int] = []

    async def sleeper(when: float) -> None:
        await sleep_until(when)
        woke.append(turns)

    when = loop.time() + 0.03
    sleepers = []
    for _ in range(10):
        sleepers.append(asyncio.create_task(sleeper(when)))
        await asyncio.sleep(0.001)  # created a moment apart, as a slot's checks are
    loop.call_soon(tick)
    await asyncio.gather(*sleepers)
    assert len(set(woke)) == 1, woke


async def test_a_trains_first_look_is_the_moment_the_loop_wakes_anyway(echo: tuple[int, UdpEcho]) -> None:
    """Given the moment the rest of its slot starts (within its leeway), a train is first read
    then, in that wakeup, instead of waking the loop once more; a moment past its leeway is
    not waited for."""
    from probe.checks.wakeups import awake_at

    port, _ = echo
    loop = asyncio.get_running_loop()

    async def train(awake_in: float) -> tuple[udp.Train, float, float]:
        start = loop.time()
        awake_at.set(start + awake_in)  # this task's own context, as the prober sets it
        done = await udp.send_train("127.0.0.1", port, 1.0)
        return done, start + awake_in, loop.time()

    whole, awake, returned = await asyncio.create_task(train(0.04))
    assert len(whole.rtts_ns) == udp.TRAIN
    assert awake <= returned < awake + 0.02, (awake, returned)
    assert max(whole.rtts_ns) < 30_000_000, "a late read is not in the round trips"
    early, awake, returned = await asyncio.create_task(train(udp.LAST_LOOK + 0.2))
    assert len(early.rtts_ns) == udp.TRAIN and returned < awake - 0.1, (awake, returned)


async def test_a_step_of_the_real_time_clock_while_a_train_is_out_is_not_in_its_round_trips(
    echo: tuple[int, UdpEcho], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel stamps arrivals in CLOCK_REALTIME, which a VM's guest agent or NTP can step
    (our CI machines: 0.5 ms forward every 100 ms). Stepped after the echoes arrived and before
    they were read, converting with the offset of the moment they were read would take the step
    off every round trip; the offset of the moment the train left does not."""
    import time as real_time

    port, _ = echo
    step_ns = 50_000_000
    stepped = False

    class SteppedClock:
        def __getattr__(self, name: str) -> object:
            return getattr(real_time, name)

        @staticmethod
        def time_ns() -> int:
            return real_time.time_ns() + (step_ns if stepped else 0)

    monkeypatch.setattr(udp.kernel, "time", SteppedClock())

    def step() -> None:
        nonlocal stepped
        stepped = True

    asyncio.get_running_loop().call_later(0.02, step)  # the echoes are back by then, unread
    train = await udp.send_train("127.0.0.1", port, 1.0, look=0.04)
    assert stepped and train.source == "kernel" and len(train.rtts_ns) == udp.TRAIN
    assert all(0 < rtt < 20_000_000 for rtt in train.rtts_ns), train.rtts_ns


async def test_the_echo_answers_while_the_event_loop_is_busy(echo: tuple[int, UdpEcho]) -> None:
    """The echo reads in a thread of its own: a train arriving while the probe's loop is busy
    (a check, a request) is answered at once, so the loop's business is in no neighbour's round
    trip."""
    port, _ = echo
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", port))
        sock.settimeout(1.0)
        udp.kernel.enable_rx_timestamps(sock)
        offset = udp.kernel.clock_offset_ns()
        sent = time.perf_counter_ns()
        sock.send(udp._HEADER.pack(udp._MAGIC, 7, 0).ljust(udp.SMALL, b"\0"))
        time.sleep(0.2)  # the loop is stuck: no callback of it runs
        data, ancdata, _, _ = sock.recvmsg(udp.SMALL, udp.kernel.ANCILLARY_SIZE)
    back = udp.kernel.rx_timestamp_ns(ancdata, offset)
    assert udp.train_of(data) == 7 and back is not None
    assert back - sent < 50_000_000, f"answered {(back - sent) / 1e6:.1f} ms after the send"


async def test_trains_checked_together_each_get_their_own_result_span_and_series(echo: tuple[int, UdpEcho]) -> None:
    """A slot's trains go out in one task and are read in one wakeup (Pipeline.check_many):
    each still has its own result, span and series, and a refusing path fails alone."""
    port, protocol = echo
    closed = free_port()
    metrics, spans = new_metrics(), Spans()
    checker = Pipeline(Settings(check_timeout=1.0), record=metrics.record, tracer=spans.tracer)
    urls = {"a": f"udp://127.0.0.1:{port}", "b": f"udp://127.0.0.1:{closed}", "c": f"udp://127.0.0.1:{port}"}
    targets = [Target(name, url, parse_udp_url(url)) for name, url in urls.items()]
    results = await checker.check_many(targets)
    assert [r.check_type for r in results] == ["a", "b", "c"]
    a, b, c = results
    for ok in (a, c):
        assert ok.ok and ok.facts.udp is not None and (ok.facts.udp.sent, ok.facts.udp.lost) == (udp.TRAIN, 0)
        assert len(ok.facts.udp.rtts) == udp.TRAIN and ok.timing_source == "kernel"
        sent = f'kubenurse_udp_packets_sent_total{{type="{ok.check_type}"}}'
        assert series(metrics, ok.check_type)[sent] == udp.TRAIN
    assert b.error_event == names.ROUND_TRIP_ERROR and "refused" in b.summary, b.summary
    assert protocol.stats.echoed == 2 * udp.TRAIN
    assert sorted(s.name for s in spans.exporter.get_finished_spans() if s.name.startswith("check")) == [
        "check a (udp)", "check b (udp)", "check c (udp)",
    ]
