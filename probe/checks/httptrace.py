"""Per-phase timing of one HTTP request: network time, not the probe's.

A check shares one event loop with every other check and with the probe's own server, so
the moment a callback runs says little about when something happened on the wire. Each
phase is therefore timed where it happens:

- DNS: inside the resolver call (probe.checks.resolver), on its own thread;
- TCP connect: from right before the `connect` syscall, lasting the SYN / SYN-ACK round
  trip the kernel measured (`TCP_INFO.tcpi_rtt`, read before anything was sent); when a SYN
  was resent (`TCP_INFO.tcpi_total_retrans`), until the loop saw the connection complete,
  so the kernel's wait before the resend is in the figure (`Timeline.sources` says so);
- TLS: from right after the ClientHello's `send` to the kernel receive time of the server
  flight that completed the handshake, summed over the handshake's round trips (TLS 1.2
  has two), so time the client spent between flights is not in it;
- request written: the `send` that carried its last byte (its start: on loopback the peer
  receives inside that syscall and may answer before it returns);
- first response byte: the kernel receive time of the first segment of the answer
  (`SO_TIMESTAMPNS` via `recvmsg`; for TLS, of the segment that decrypted to the first
  application data, so session tickets arriving first do not count).

The hooks are public ones (aiohttp 3.14, asyncio): the connector's `socket_factory` gives a socket
subclass whose `connect`/`send`/`recv`/`recv_into` asyncio calls directly, and an
`SSLContext` subclass whose `sslobject_class` sees the handshake end and the first
decrypted bytes. aiohttp's trace signals remain as the fallback marks where the kernel
gives nothing (`Timeline.source` says which was used).

A Timeline keeps, for every event, the moment it happened (`marks`, `perf_counter_ns`) and,
for every phase, its network duration (`network`). The figures a check reports
(`offsets()`) put the phases end to end: the time from the start of the check to each event
counting only network time, so the request duration is DNS + connect + TLS + send + wait for
the first byte and never the time a check waited for the loop.
"""

from __future__ import annotations

import socket
import ssl
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohappyeyeballs import AddrInfoType

from probe import names
from probe.checks import kernel
from probe.checks.result import PHASES

_current: ContextVar[Timeline | None] = ContextVar("kubenurse_timeline", default=None)

_START_OF = {done: start for _, start, done in PHASES}


@dataclass
class Timeline:
    """One request's phases: when each event happened and how much network time each took."""

    #: event -> perf_counter_ns of the moment it happened (the best source available).
    marks: dict[str, int] = field(default_factory=dict)
    #: done event -> network duration (ns) of the phase that ends with it.
    network: dict[str, int] = field(default_factory=dict)
    tls: bool = False
    #: The address of the last connect attempt (the one that succeeded, or failed last).
    peer: tuple[str, int] | None = None
    #: The socket of the connection being made (TLS hooks find it here).
    sock: TimedSocket | None = None
    #: Where the connect and first-byte figures came from: kernel.KERNEL or kernel.LOOP.
    source: str = kernel.LOOP
    #: The first TLS connection of this request (its peer's certificates: certs.py).
    ssl_object: ssl.SSLObject | None = None
    #: done event -> source, for a phase timed otherwise than `source` says (a connect
    #: whose SYN was resent is timed by the loop).
    sources: dict[str, str] = field(default_factory=dict)

    def retransmits(self) -> int | None:
        """Segments the kernel resent on this request's connection (SYNs included)."""
        return self.sock.retransmits() if self.sock is not None and self.sock.timeline is self else None

    def mark(self, event: str, at_ns: int | None = None) -> None:
        """A fallback mark: the first one wins, a measured one (`put`) overrides it."""
        if event not in self.marks:
            self.marks[event] = time.perf_counter_ns() if at_ns is None else at_ns

    def put(self, event: str, at_ns: int, network_ns: int | None = None) -> None:
        """A measured event, overriding any fallback mark; `network_ns` for a done event."""
        self.marks[event] = at_ns
        if network_ns is not None:
            self.network[event] = max(0, network_ns)

    def phase_ns(self, done: str) -> int | None:
        """Network duration of the phase ending with `done`; None if it did not end."""
        if done not in self.marks:
            return None
        if done in self.network:
            return self.network[done]
        start = _START_OF.get(done)
        if start is None or start not in self.marks:
            return 0
        return max(0, self.marks[done] - self.marks[start])

    def offsets(self) -> dict[str, float]:
        """Seconds of network time from the start of the check to each event that happened,
        in phase order: the phases laid end to end, without the probe's own waits."""
        out: dict[str, float] = {}
        cursor = 0
        for event in names.EVENTS:
            if event not in self.marks:
                continue
            if event in _START_OF:
                cursor += self.phase_ns(event) or 0
            out[event] = cursor / 1e9
        return out

    def duration(self) -> float | None:
        """Network time from the start of the check to the first byte of the answer."""
        return self.offsets().get(names.GOT_FIRST_RESP_BYTE)

    def last_phase_started(self) -> str | None:
        """The `*_done` event of the connection phase (dns, connect, tls) that started but did
        not finish, if any."""
        for _, start, done in reversed(PHASES[:3]):
            if start in self.marks and done not in self.marks:
                return done
        return None


def begin() -> Timeline:
    """Start the timeline of the request about to be sent from this task."""
    timeline = Timeline()
    _current.set(timeline)
    return timeline


def current() -> Timeline | None:
    return _current.get()


def _mark(event: str) -> None:
    timeline = _current.get()
    if timeline is not None:
        timeline.mark(event)


class TimedSocket(kernel.ConnectingSocket):
    """A client socket that times its own connect, sends and receives.

    asyncio calls `connect`, `send`, `recv` and `recv_into` of this very object, so each
    timestamp is taken at the system call (or, for received data, by the kernel), whenever
    the event loop gets round to the callback.
    """

    timeline: Timeline | None = None
    _kernel_rx = False
    _sends = 0
    _tls = False
    _handshaking = False
    _tls_started_ns: int | None = None
    #: Handshake round trips: [time the client's flight was sent, last receive of the reply].
    _flights: list[list[int]]
    _flight_sent_ns: int | None = None
    _app_write = False
    _request_started_ns: int | None = None
    _request_sent_ns: int | None = None
    _answered = False
    #: Bytes received so far on this connection.
    _rx_total = 0
    #: After a TLS handshake: (end offset, first byte's arrival) of each record received.
    _records: list[tuple[int, int]] | None = None
    _record_left = 0
    _record_header = b""
    _record_started: tuple[int, int] = (0, 0)
    #: Resends (kernel.TcpInfo.lost) when the current request took the connection, and at close.
    _retrans_base = 0
    _retrans_at_close: int | None = None
    #: kernel.clock_offset_ns() at the last send: what the answer's receive stamps convert with.
    _offset_ns: int | None = None

    def setup(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self._flights = []
        self._kernel_rx = kernel.capabilities().rx_timestamps and kernel.enable_rx_timestamps(self)

    # -- connect -------------------------------------------------------------------------

    def connect(self, address: Any) -> None:
        timeline = self.timeline
        if timeline is not None:
            timeline.put(names.CONNECT_START, time.perf_counter_ns())
        super().connect(address)

    def _connected(self, timeline: Timeline) -> None:
        """Before the first byte is sent, the kernel's one RTT sample is the handshake's,
        unless a SYN was resent (kernel.connect_network_ns)."""
        started = timeline.marks.get(names.CONNECT_START)
        if started is None:
            timeline.mark(names.CONNECT_DONE)
            return
        network, source = kernel.connect_network_ns(self, started, self.connect_seen_ns or time.perf_counter_ns())
        timeline.put(names.CONNECT_DONE, started + network, network)
        timeline.source = kernel.KERNEL if self._kernel_rx else kernel.LOOP
        if source != timeline.source:
            timeline.sources[names.CONNECT_DONE] = source

    # -- losses --------------------------------------------------------------------------

    def _resent_so_far(self) -> int | None:
        if self._retrans_at_close is not None:
            return self._retrans_at_close
        info = kernel.tcp_info(self)
        return info.lost if info is not None else None

    def retransmits(self) -> int | None:
        """Segments resent since the current request took this connection."""
        total = self._resent_so_far()
        return None if total is None else max(total - self._retrans_base, 0)

    def close(self) -> None:
        # asyncio closes the socket a loop turn after the answer was read: keep the count.
        if self._retrans_at_close is None and self.fileno() >= 0:
            info = kernel.tcp_info(self)
            if info is not None:
                self._retrans_at_close = info.lost
        super().close()

    # -- send ----------------------------------------------------------------------------

    def send(self, data: Any, *args: Any) -> int:
        self._offset_ns = kernel.clock_offset_ns()
        before = time.perf_counter_ns()
        sent = super().send(data, *args)
        self._sent(before)
        return sent

    def sendmsg(self, *args: Any) -> int:
        self._offset_ns = kernel.clock_offset_ns()
        before = time.perf_counter_ns()
        sent = super().sendmsg(*args)
        self._sent(before)
        return sent

    def _sent(self, before: int) -> None:
        # The bytes left when the syscall began: on loopback the peer gets them inside the
        # syscall and may even answer before it returns, so the syscall's end is no start.
        # A reused connection carries the request of whichever task writes to it now.
        timeline = _current.get() or self.timeline
        if timeline is None:
            return
        if timeline is not self.timeline:
            self._rebind(timeline)
        elif self._answered:
            return  # after the answer (a TLS close_notify, say): nothing left to time
        self._sends += 1
        if self._sends == 1 and names.CONNECT_START in timeline.marks:
            self._connected(timeline)
        if self._tls and self._handshaking:
            if self._tls_started_ns is None:
                self._tls_started_ns = before
            self._flight_sent_ns = before
            return
        if self._tls and not self._app_write:
            return  # the client's Finished, or an alert: not the request
        if self._request_started_ns is None:
            self._request_started_ns = before
            timeline.put(names.GOT_CONN, before)
        self._request_sent_ns = before
        timeline.put(names.WROTE_REQUEST, before, before - self._request_started_ns)

    def _rebind(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self._retrans_base = self._resent_so_far() or 0
        self._app_write = False
        self._request_started_ns = self._request_sent_ns = None
        self._answered = False
        timeline.tls = self._tls
        timeline.sock = self
        if self._kernel_rx:
            timeline.source = kernel.KERNEL

    # -- receive -------------------------------------------------------------------------

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if not self._timing():
            return super().recv(bufsize, flags)
        buffer = bytearray(min(bufsize, 65536))  # asyncio asks for 256 KiB; the rest can wait
        n = self.recv_into(buffer, len(buffer), flags)
        return bytes(buffer[:n])

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if not self._timing():
            return super().recv_into(buffer, nbytes, flags)
        view = memoryview(buffer)
        if nbytes:
            view = view[:nbytes]
        if not self._kernel_rx:
            n = super().recv_into(view, 0, flags)
            if n:
                now = time.perf_counter_ns()
                self._received(now, now)
                self._rx_total += n
            return n
        if self._records is not None:
            return self._recv_record(view, flags)
        # A read that finds several segments queued (the loop was busy) is stamped with the
        # last one's arrival. One byte first gets the first segment's own stamp, where the
        # kernel kept the segments apart (it merges small ones and keeps the latest stamp).
        n, ancdata, _, _ = self.recvmsg_into([view[:1]], kernel.ANCILLARY_SIZE, flags)
        if not n:
            return 0
        first = kernel.rx_timestamp_ns(ancdata, self._offset_ns)
        if first is None:
            self._unstamped()
        last = first
        if len(view) > 1:
            try:
                more, ancdata, _, _ = self.recvmsg_into([view[1:]], kernel.ANCILLARY_SIZE, flags)
            except (BlockingIOError, InterruptedError):
                more = 0
            if more:
                n += more
                last = kernel.rx_timestamp_ns(ancdata, self._offset_ns) or first
        now = time.perf_counter_ns()
        self._received(first or now, last or now)
        self._rx_total += n
        return n

    def _recv_record(self, view: memoryview, flags: int) -> int:
        """After a TLS handshake: read no further than the end of the current TLS record, so
        every record's first byte gets its own arrival stamp. A session ticket that arrived
        just before the answer, both read at once by a busy loop, must not pass for the
        answer's first byte; which record decrypted to the answer is known at `tls_app_read`.
        """
        assert self._records is not None
        header = self._record_header
        want = 5 - len(header) if self._record_left == 0 else self._record_left
        n, ancdata, _, _ = self.recvmsg_into([view[: min(len(view), want)]], kernel.ANCILLARY_SIZE, flags)
        if not n:
            return 0
        at = kernel.rx_timestamp_ns(ancdata, self._offset_ns)
        if at is None:
            self._unstamped()
            at = time.perf_counter_ns()
        if self._record_left == 0:
            if not header:
                self._record_started = (self._rx_total, at)
            header += bytes(view[:n])
            if len(header) == 5:
                length = int.from_bytes(header[3:5], "big")
                start, started_at = self._record_started
                self._records.append((start + 5 + length, started_at))
                self._record_left, self._record_header = length, b""
            else:
                self._record_header = header
        else:
            self._record_left -= n
        self.first_received_ns = at
        self._rx_total += n
        return n

    def _unstamped(self) -> None:
        """Data came without a kernel stamp: this figure is the loop's, and says so."""
        if self.timeline is not None:
            self.timeline.source = kernel.LOOP

    def _timing(self) -> bool:
        """Still something to time: the handshake or the answer's first byte."""
        return self.timeline is not None and not self._answered

    def _received(self, first: int, last: int) -> None:
        """Data arrived: `first` and `last` are the arrival times of its first and last segment."""
        timeline = self.timeline
        assert timeline is not None
        self.first_received_ns = first
        if self._tls:
            if self._handshaking:
                if self._flight_sent_ns is not None:
                    self._flights.append([self._flight_sent_ns, last])
                    self._flight_sent_ns = None
                elif self._flights:
                    self._flights[-1][1] = last
            return  # the first byte of a TLS answer is known once it decrypts (TimedSSLObject)
        if self._request_sent_ns is not None:
            self._first_byte(timeline, first)

    def _first_byte(self, timeline: Timeline, at: int) -> None:
        if self._request_sent_ns is None or self._answered:
            return
        self._answered = True
        timeline.put(names.GOT_FIRST_RESP_BYTE, at, at - self._request_sent_ns)

    # -- TLS (called by TimedSSLObject) --------------------------------------------------

    def tls_begin(self) -> None:
        self._tls = self._handshaking = True

    def tls_done(self, unread: int) -> None:
        """The handshake completed with `unread` received bytes not yet consumed by TLS."""
        self._handshaking = False
        if unread == 0 and self._kernel_rx:
            self._records = []  # from here, TLS records begin at a known offset
        timeline = self.timeline
        if timeline is None or self._tls_started_ns is None or not self._flights:
            return
        network = sum(end - start for start, end in self._flights)
        timeline.put(names.TLS_HANDSHAKE_START, self._tls_started_ns)
        timeline.put(names.TLS_HANDSHAKE_DONE, self._tls_started_ns + network, network)

    def tls_app_write(self) -> None:
        # The request is encrypted before it is sent: a reused connection changes hands here.
        timeline = _current.get()
        if timeline is not None and timeline is not self.timeline:
            self._rebind(timeline)
        self._app_write = True

    def tls_app_read(self, unread: int) -> None:
        """Application data decrypted; `unread` received bytes are not yet consumed by TLS,
        so the record that carried it ends at offset `_rx_total - unread`."""
        timeline = self.timeline
        if timeline is None or self._answered:
            return
        at = getattr(self, "first_received_ns", time.perf_counter_ns())
        if self._records:
            consumed = self._rx_total - unread
            carried = [started for end, started in self._records if end <= consumed]
            if carried:
                at = carried[-1]
        self._records = None
        self._first_byte(timeline, at)


def socket_factory(addr_info: AddrInfoType) -> socket.socket:
    """Called by the connector right before it connects."""
    family, type_, proto, _, address = addr_info
    sock = TimedSocket(family=family, type=type_, proto=proto)
    timeline = _current.get()
    if timeline is not None:
        sock.setup(timeline)
        timeline.sock = sock
        timeline.mark(names.CONNECT_START)
        timeline.peer = (str(address[0]), int(address[1]))
    return sock


class TimedSSLObject(ssl.SSLObject):
    """Tells its socket when the handshake completed and when application data arrived."""

    _timed_socket: TimedSocket | None = None
    _incoming: ssl.MemoryBIO | None = None

    def _unread(self) -> int:
        return self._incoming.pending if self._incoming is not None else -1

    def do_handshake(self) -> None:
        super().do_handshake()  # raises SSLWantReadError until the server's flight is in
        if self._timed_socket is not None:
            self._timed_socket.tls_done(self._unread())

    def write(self, data: Any) -> int:
        if self._timed_socket is not None:
            self._timed_socket.tls_app_write()
        return super().write(data)

    def read(self, len: int = 1024, buffer: Any = None) -> Any:  # ssl's own signature
        data = super().read(len, buffer)
        if data and self._timed_socket is not None:
            self._timed_socket.tls_app_read(self._unread())
        return data


class TimedSSLContext(ssl.SSLContext):
    """An SSLContext whose connections report their handshake to the request's timeline."""

    sslobject_class = TimedSSLObject

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        obj = super().wrap_bio(*args, **kwargs)
        timeline = _current.get()
        if timeline is not None:
            now = time.perf_counter_ns()
            timeline.tls = True
            timeline.mark(names.CONNECT_DONE, now)
            timeline.mark(names.TLS_HANDSHAKE_START, now)
            if timeline.ssl_object is None:
                timeline.ssl_object = obj
            sock = timeline.sock
            if isinstance(obj, TimedSSLObject) and sock is not None:
                obj._timed_socket = sock
                incoming = args[0] if args else kwargs.get("incoming")
                obj._incoming = incoming if isinstance(incoming, ssl.MemoryBIO) else None
                sock.tls_begin()
        return obj


async def _on_dns_start(_s: aiohttp.ClientSession, _c: SimpleNamespace, _p: Any) -> None:
    _mark(names.DNS_START)


async def _on_dns_end(_s: aiohttp.ClientSession, _c: SimpleNamespace, _p: Any) -> None:
    _mark(names.DNS_DONE)


async def _on_connection_created(_s: aiohttp.ClientSession, _c: SimpleNamespace, _p: Any) -> None:
    timeline = _current.get()
    if timeline is None:
        return
    now = time.perf_counter_ns()
    timeline.mark(names.TLS_HANDSHAKE_DONE if timeline.tls else names.CONNECT_DONE, now)
    timeline.mark(names.GOT_CONN, now)


async def _on_connection_reused(_s: aiohttp.ClientSession, _c: SimpleNamespace, _p: Any) -> None:
    _mark(names.GOT_CONN)


async def _on_headers_sent(_s: aiohttp.ClientSession, _c: SimpleNamespace, _p: Any) -> None:
    _mark(names.WROTE_REQUEST)


async def _on_request_end(_s: aiohttp.ClientSession, _c: SimpleNamespace, _p: Any) -> None:
    # Fallback where no receive was seen by a TimedSocket: aiohttp has no first-byte
    # signal; this fires once the status line and headers are parsed.
    _mark(names.GOT_FIRST_RESP_BYTE)


def trace_config() -> aiohttp.TraceConfig:
    config = aiohttp.TraceConfig()
    config.on_dns_resolvehost_start.append(_on_dns_start)
    config.on_dns_resolvehost_end.append(_on_dns_end)
    config.on_connection_create_end.append(_on_connection_created)
    config.on_connection_reuseconn.append(_on_connection_reused)
    config.on_request_headers_sent.append(_on_headers_sent)
    config.on_request_end.append(_on_request_end)
    return config


def failed_event(error: BaseException, timeline: Timeline) -> str:
    """The kubenurse event where a request that got no answer failed."""
    if isinstance(error, aiohttp.ClientConnectorDNSError):
        return names.DNS_DONE
    if isinstance(error, aiohttp.ClientConnectorCertificateError | aiohttp.ClientConnectorSSLError | ssl.SSLError):
        return names.TLS_HANDSHAKE_DONE
    if isinstance(error, aiohttp.ClientConnectorError):
        # Refused/unreachable during connect, or a TLS failure asyncio reported as OSError.
        return timeline.last_phase_started() or names.CONNECT_DONE
    if names.GOT_CONN not in timeline.marks:
        # Timed out (or broke) before a connection was had: blame the phase in progress.
        return timeline.last_phase_started() or names.ROUND_TRIP_ERROR
    return names.ROUND_TRIP_ERROR
