"""UDP checks: a train of datagrams to a probe's UDP echo, counting what came back.

`udp://HOST:PORT` (and every neighbour, on its HTTP port number, unless
KUBENURSE_CHECK_NEIGHBOURHOOD_UDP=false) gets TRAIN datagrams a round, sent together. Each
carries a marker, the train's id and its sequence number; one in BIG_EVERY is as large as
the path MTU allows (the route's MTU, at most MAX_BIG) and sent with don't-fragment set, so a
path that silently drops full-size packets (an MTU mismatch on an overlay) shows as `mtu`
while the small ones still come back.

Each round trip is the send syscall's start to the kernel's receive timestamp of the echo
(SO_TIMESTAMPNS), so the figure is the network's however late the loop reads it. A datagram
not back within the check timeout is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from probe import names
from probe.checks import dns, kernel
from probe.checks.result import AttributeValue, Facts, Failure, Kind, Outcome, Phase, Target, UdpLoss
from probe.checks.wakeups import SharedDeadline, awake_at, sleep_until
from probe.checkurls import UdpEndpoint, is_ip
from probe.settings import Settings

#: Datagrams per train (a round), and which of them are full-size: two small, two full-size.
#: Each datagram costs the sender and the echo about 40 µs of CPU (a 2-core VM), a train
#: another 400 µs or so whatever its length (the echo's wakeup most of it); eight a train read
#: 1.34x the probe's CPU per round with ten neighbours, four 1.28x (the budget is 1.33x).
#: Two full-size datagrams, so that random loss rarely takes every one of them (`mtu`).
TRAIN = 4
BIG_EVERY = 2
#: The largest "full-size" datagram (a jumbo-frame path is checked at this size; loopback's
#: 64 KiB MTU would otherwise ask for 64 KiB datagrams). The echo accepts up to this.
MAX_BIG = 9000
SMALL = 64
#: When the echoes are first read: a pod network's round trip is well under this. A path
#: whose last train took longer is first read a little after that train's slowest echo (at
#: most LAST_LOOK), so a slow path's train is still read in one wakeup, not one per echo.
FIRST_LOOK = 0.005
LAST_LOOK = 0.1
#: Trains sent within this of each other are first read at one moment, in one wakeup.
LOOK_SLACK = 0.002
#: Trains of a path kept for its loss over time (the mesh's loss verdicts: 80 datagrams), and
#: paths kept.
WINDOW = 20
MAX_PATHS = 10_000
#: Paths whose socket is kept open between trains (beyond this the oldest is closed).
MAX_OPEN_PATHS = 256
_MAGIC = b"KNUE"
_HEADER = struct.Struct("!4sQI")  # marker, train id, sequence number


def train_of(datagram: bytes | bytearray | memoryview) -> int | None:
    """The train id a check's datagram carries; None for any other datagram."""
    if len(datagram) < _HEADER.size:
        return None
    magic, train_id, _ = _HEADER.unpack_from(datagram)
    return int(train_id) if magic == _MAGIC else None
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
IP_MTU = getattr(socket, "IP_MTU", 14)
IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
IPV6_PMTUDISC_DO = getattr(socket, "IPV6_PMTUDISC_DO", 2)
IPV6_MTU = getattr(socket, "IPV6_MTU", 24)


@dataclass
class Train:
    """What one train found: counts by size, the round trips, the path MTU it assumed."""

    address: str
    port: int
    #: The id every datagram of this train carries: the echo counts what it received by it.
    train_id: int = 0
    mtu: int = 0
    big_size: int = 0
    small_sent: int = 0
    small_lost: int = 0
    big_sent: int = 0
    big_lost: int = 0
    #: Round trips (ns) of the datagrams that came back, in sequence order.
    rtts_ns: list[int] = field(default_factory=list)
    #: Why no datagram could be sent or heard (refused, unreachable), if so.
    error: str | None = None
    error_type: str | None = None
    #: Where the round trips came from: kernel.KERNEL (receive stamps) or kernel.LOOP.
    source: str = kernel.KERNEL
    #: perf_counter_ns just before its first datagram was sent.
    started_ns: int = 0

    @property
    def sent(self) -> int:
        return self.small_sent + self.big_sent

    @property
    def lost(self) -> int:
        return self.small_lost + self.big_lost

    @property
    def mtu_problem(self) -> bool:
        """Every full-size datagram lost while some small ones came back."""
        return self.big_sent > 0 and self.big_lost == self.big_sent and self.small_lost < self.small_sent


def _path_mtu(sock: socket.socket, v6: bool) -> int:
    try:
        if v6:
            return int(sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU))
        return int(sock.getsockopt(socket.IPPROTO_IP, IP_MTU))
    except OSError:
        return 1500


def _dont_fragment(sock: socket.socket, v6: bool) -> None:
    try:
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
    except OSError:
        pass


def _where(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def first_look(last: Train | None) -> float:
    """When to first read a path's echoes, from its last train's slowest round trip."""
    if last is None or not last.rtts_ns:
        return FIRST_LOOK
    return min(max(FIRST_LOOK, 1.5 * max(last.rtts_ns) / 1e9 + 0.001), LAST_LOOK)


class PathSocket:
    """A path's UDP socket: connected to the echo (only it is heard, and its ICMP refusals
    are), don't-fragment and kernel receive stamps on. UdpKind keeps one per path from train
    to train, so a train costs its sends and reads, not a socket's set-up."""

    def __init__(self, address: str, port: int, source: str | None = None) -> None:
        """Raises OSError (no route, a bad address) with the socket closed."""
        self.v6 = ":" in address
        self.peer = (address, port)
        self.sock = socket.socket(socket.AF_INET6 if self.v6 else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            self.kernel_rx = kernel.capabilities().rx_timestamps and kernel.enable_rx_timestamps(self.sock)
            _dont_fragment(self.sock, self.v6)
            if source is not None and (":" in source) == self.v6:
                self.sock.bind((source, 0))
            self.sock.connect((address, port))
        except OSError:
            self.sock.close()
            raise

    def clear_error(self) -> None:
        """Forget an ICMP error an earlier train's late datagram earned: it is not this train's."""
        with contextlib.suppress(OSError):
            self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)

    def close(self) -> None:
        self.sock.close()


async def send_train(
    address: str, port: int, timeout: float, count: int = TRAIN, source: str | None = None,
    look: float = FIRST_LOOK, looks: SharedDeadline | None = None, path: PathSocket | None = None,
) -> Train:
    """Send `count` datagrams to the echo at address:port and wait up to `timeout` for them,
    from `source` (the probe's listen address, so the echo sees the pod's own) if given;
    the echoes are first read after `look`, at the moment `looks` shares among the trains
    sent about together, if given. Through `path` if given (it stays open), else through a
    socket of its own."""
    if path is None:
        try:
            own = PathSocket(address, port, source)
        except OSError as e:
            train = Train(address, port, _train_id())
            train.error, train.error_type = f"{_where(address, port)}: {e.strerror or e}", type(e).__name__
            return train
        try:
            (train,) = await send_trains([(address, port, own)], timeout, count, [look], looks)
            return train
        finally:
            own.close()
    (train,) = await send_trains([(address, port, path)], timeout, count, [look], looks)
    return train


async def send_trains(
    paths: Sequence[tuple[str, int, PathSocket]], timeout: float, count: int = TRAIN,
    looks: Sequence[float] | None = None, shared: SharedDeadline | None = None,
) -> list[Train]:
    """A train through each open path, sent one after the other, then read together: the
    echoes are first read at one moment (the latest of the paths' `looks`, shared with other
    trains sent about then through `shared`), in one wakeup; only a train not yet whole then
    waits on its socket, up to `timeout`."""
    loop = asyncio.get_running_loop()
    flights = []
    for address, port, path in paths:
        path.clear_error()
        flights.append(_Flight(Train(address, port, _train_id()), path, count))
    # The round trips are the kernel's stamps, so the echoes may be read late at no cost to
    # the figures: one look reads healthy paths' whole trains in one wakeup (a wakeup per
    # datagram was most of a train's CPU). Without kernel stamps an echo is timed when it is
    # read: then each is read as it comes.
    stamped = all(f.path.kernel_rx for f in flights)
    look = min(max(looks or [FIRST_LOOK]), timeout) if stamped else 0.0
    if look > 0 and any(not f.done.done() for f in flights):
        sent_at = loop.time()
        look_at = shared.at(sent_at + look) if shared is not None else sent_at + look
        awake = awake_at.get()
        if awake is not None and look_at <= awake <= sent_at + min(LAST_LOOK, timeout):
            look_at = awake  # the loop wakes then anyway
        look = look_at - sent_at
        await sleep_until(look_at)
    waiting = []
    for flight in flights:
        flight.read()
        if not flight.done.done():
            loop.add_reader(flight.path.sock.fileno(), flight.read)
            waiting.append(flight)
    try:
        if waiting:
            await asyncio.wait([f.done for f in waiting], timeout=max(timeout - look, 0.0))
    finally:
        for flight in waiting:
            loop.remove_reader(flight.path.sock.fileno())
    return [flight.finish() for flight in flights]


def _train_id() -> int:
    return int.from_bytes(os.urandom(8), "big")  # unguessable: peers see train ids


class _Flight:
    """One train on its way: sent when made, then read (`read`, until `done`), then `finish`ed
    into its counts and round trips."""

    def __init__(self, train: Train, path: PathSocket, count: int) -> None:
        train.started_ns = time.perf_counter_ns()
        self.train, self.path = train, path
        self.sent_ns: dict[int, int] = {}
        self.back: dict[int, int] = {}
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not path.kernel_rx:
            train.source = kernel.LOOP
        train.mtu = _path_mtu(path.sock, path.v6)
        train.big_size = max(min(train.mtu, MAX_BIG) - (48 if path.v6 else 28), SMALL)
        self.offset_ns = kernel.clock_offset_ns()  # the echoes' stamps are converted with it
        try:
            self._send(count)
        except OSError as e:
            self._fail(e)

    def _send(self, count: int) -> None:
        train, sock = self.train, self.path.sock
        # Built first, so the datagrams leave back to back: the echo reads a train in one wakeup.
        bigs = [seq % BIG_EVERY == BIG_EVERY - 1 for seq in range(count)]
        payloads = [
            _HEADER.pack(_MAGIC, train.train_id, seq).ljust(train.big_size if big else SMALL, b"\0")
            for seq, big in enumerate(bigs)
        ]
        for seq, payload in enumerate(payloads):
            before = time.perf_counter_ns()
            try:
                sock.send(payload)
            except (BlockingIOError, InterruptedError):
                pass  # a full send buffer: the datagram counts as sent and lost
            except ConnectionRefusedError:
                raise  # an ICMP refusal of an earlier datagram, reported by this send
            except OSError as e:
                if e.errno == 90:  # EMSGSIZE: the kernel learnt a smaller path MTU
                    train.mtu = _path_mtu(sock, self.path.v6)
                elif not self.sent_ns:
                    raise
            self.sent_ns[seq] = before
            if bigs[seq]:
                train.big_sent += 1
            else:
                train.small_sent += 1

    def _fail(self, error: OSError) -> None:
        train = self.train
        if self.done.done():
            return
        if isinstance(error, ConnectionRefusedError):
            train.error = f"{_where(train.address, train.port)} refused (nothing answers UDP on that port)"
            train.error_type = "connection_refused"
        else:
            train.error = f"{_where(train.address, train.port)}: {error.strerror or error}"
            train.error_type = type(error).__name__
        self.done.set_result(None)

    def read(self) -> None:
        sock, train, sent_ns, back = self.path.sock, self.train, self.sent_ns, self.back
        while not self.done.done():
            try:
                data, ancdata, _, _ = sock.recvmsg(MAX_BIG, kernel.ANCILLARY_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # ICMP port unreachable and the like
                self._fail(e)
                return
            at = kernel.rx_timestamp_ns(ancdata, self.offset_ns) if self.path.kernel_rx else None
            if at is None:
                train.source = kernel.LOOP
                at = time.perf_counter_ns()
            if len(data) < _HEADER.size:
                continue
            magic, got_id, seq = _HEADER.unpack_from(data)
            if magic != _MAGIC or got_id != train.train_id or seq not in sent_ns or seq in back:
                continue
            back[seq] = at
            if len(back) == len(sent_ns):
                self.done.set_result(None)

    def finish(self) -> Train:
        train = self.train
        for seq, started in sorted(self.sent_ns.items()):
            if seq in self.back:
                train.rtts_ns.append(max(self.back[seq] - started, 0))
            elif seq % BIG_EVERY == BIG_EVERY - 1:
                train.big_lost += 1
            else:
                train.small_lost += 1
        return train


# --- the check -----------------------------------------------------------------------------


def outcome_of(
    train: Train, started_ns: int, resolution: dns.Resolution | None = None,
    history: tuple[tuple[int, int, int], ...] = (),
) -> Outcome:
    """ok while anything came back and full-size datagrams are not the ones going missing."""
    rtts = sorted(train.rtts_ns)
    phases = [dns.dns_phase(resolution)] if resolution is not None else []
    end = started_ns + rtts[-1] if rtts else None
    phases.append(Phase("udp_train", names.ROUND_TRIP_ERROR, started_ns, end, train.source, label="udp train"))
    facts = Facts(
        udp=UdpLoss(train.sent, train.lost, tuple(ns / 1e9 for ns in train.rtts_ns), history, train.mtu),
        attributes={names.ATTR_UDP_MTU: train.mtu},
    )
    return Outcome(
        phases=tuple(phases),
        peer=(train.address, train.port),
        timing_source=train.source,
        facts=facts,
        failure=_failure(train),
        duration=rtts[len(rtts) // 2] / 1e9 if rtts else None,
    )


def _failure(train: Train) -> Failure | None:
    where = _where(train.address, train.port)
    if train.error is not None and not train.rtts_ns:
        return Failure(names.ROUND_TRIP_ERROR, train.error_type or "error", train.error)
    if not train.rtts_ns:
        text = f"no datagram came back from {where} (0 of {train.sent} within the timeout)"
        return Failure(names.ROUND_TRIP_ERROR, "timeout", text)
    if train.mtu_problem:
        size = train.big_size + (48 if ":" in train.address else 28)
        return Failure(names.MTU, "mtu", (
            f"full-size datagrams ({size} bytes, don't fragment) to {where} lost, "
            f"small ones came back: the path drops packets its MTU ({train.mtu}) allows"
        ))
    return None


@dataclass
class _PathMemory:
    """What a path's last trains told: its last WINDOW trains (id, sent, came back), for the
    mesh's loss verdicts, and when to first read its next train's echoes."""

    trains: deque[tuple[int, int, int]] = field(default_factory=lambda: deque(maxlen=WINDOW))
    look: float = FIRST_LOOK


class UdpKind(Kind):
    """`udp://` checks, and the neighbours' UDP paths."""

    def __init__(self, settings: Settings, *, resolv_conf: str = dns.RESOLV_CONF) -> None:
        self._timeout = settings.check_timeout
        self._resolv_conf = resolv_conf
        self._source = settings.listen_host
        #: Target key -> what the path's last trains told (oldest forgotten first past MAX_PATHS).
        self._memory: OrderedDict[str, _PathMemory] = OrderedDict()
        #: The first looks of the trains sent about together (a slot's): one wakeup reads them.
        self._look_at = SharedDeadline(LOOK_SLACK)
        #: Target key -> its path's socket, kept open between trains.
        self._paths: OrderedDict[str, PathSocket] = OrderedDict()

    def _recall(self, key: str) -> _PathMemory:
        memory = self._memory.pop(key, None) or _PathMemory()
        self._memory[key] = memory
        while len(self._memory) > MAX_PATHS:  # departed neighbours are forgotten, oldest first
            self._memory.popitem(last=False)
        return memory

    def _path(self, key: str, address: str, port: int) -> PathSocket | None:
        """The target's open socket to address:port, opened if need be; None if it cannot be
        (send_train then tries with a socket of its own, and says why it failed)."""
        path = self._paths.pop(key, None)
        if path is not None and path.peer != (address, port):
            path.close()  # the name now resolves elsewhere
            path = None
        if path is None:
            try:
                path = PathSocket(address, port, self._source)
            except OSError:
                return None
        self._paths[key] = path
        while len(self._paths) > MAX_OPEN_PATHS:
            self._paths.popitem(last=False)[1].close()
        return path

    def _close_path(self, key: str) -> None:
        path = self._paths.pop(key, None)
        if path is not None:
            path.close()

    async def close(self) -> None:
        while self._paths:
            self._paths.popitem()[1].close()

    def attributes(self, target: Target) -> Mapping[str, AttributeValue]:
        assert isinstance(target.spec, UdpEndpoint)
        return {"network.transport": "udp", "server.address": target.spec.host, "server.port": target.spec.port}

    async def measure(self, target: Target) -> Outcome:
        endpoint = target.spec
        assert isinstance(endpoint, UdpEndpoint)
        started_ns = time.perf_counter_ns()
        address, resolution = endpoint.host, None
        if not is_ip(address):
            resolution = await dns.address_of(endpoint.host, self._timeout, self._resolv_conf)
            if not resolution.ok:
                failure = Failure(names.DNS_DONE, resolution.error_type or "error", resolution.error or "no address")
                return Outcome(phases=(dns.dns_phase(resolution),), failure=failure)
            address = resolution.records[0]
        remaining = self._timeout - (time.perf_counter_ns() - started_ns) / 1e9
        sent_ns = time.perf_counter_ns()
        memory = self._recall(target.key)
        path = self._path(target.key, address, endpoint.port)
        train = await send_train(
            address, endpoint.port, max(remaining, 0.001), source=self._source, look=memory.look,
            looks=self._look_at, path=path,
        )
        return self._outcome(target.key, memory, train, path is not None, sent_ns, resolution)

    async def measure_many(self, targets: Sequence[Target]) -> Sequence[Outcome | BaseException]:
        """Trains to many targets at once (a slot's neighbours): sent one after the other and
        first read together, in one wakeup, with no task of their own. A target named by a
        DNS name, or whose socket cannot be opened, is measured on its own."""
        alone: list[Target] = []
        batch: list[tuple[Target, _PathMemory, tuple[str, int, PathSocket]]] = []
        for target in targets:
            endpoint = target.spec
            assert isinstance(endpoint, UdpEndpoint)
            path = self._path(target.key, endpoint.host, endpoint.port) if is_ip(endpoint.host) else None
            if path is None:
                alone.append(target)
            else:
                batch.append((target, self._recall(target.key), (endpoint.host, endpoint.port, path)))
        measuring = asyncio.gather(*(self.measure(t) for t in alone), return_exceptions=True) if alone else None
        trains = await send_trains(
            [where for _, _, where in batch], self._timeout,
            looks=[memory.look for _, memory, _ in batch], shared=self._look_at,
        ) if batch else []
        outcomes: dict[str, Outcome | BaseException] = {
            target.key: self._outcome(target.key, memory, train, True, train.started_ns)
            for (target, memory, _), train in zip(batch, trains, strict=True)
        }
        if measuring is not None:
            outcomes.update(zip((t.key for t in alone), await measuring, strict=True))
        return [outcomes[target.key] for target in targets]

    def _outcome(
        self, key: str, memory: _PathMemory, train: Train, kept_path: bool, sent_ns: int,
        resolution: dns.Resolution | None = None,
    ) -> Outcome:
        if train.error is not None and kept_path:  # the next train starts afresh
            self._close_path(key)
        memory.look = first_look(train)
        if not train.sent:
            return outcome_of(train, sent_ns, resolution)
        memory.trains.append((train.train_id, train.sent, train.sent - train.lost))
        return outcome_of(train, sent_ns, resolution, tuple(memory.trains))
