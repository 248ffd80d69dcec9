"""The UDP echo every probe answers on its HTTP port number: neighbours' UDP checks send
their trains here (probe/checks/udp.py).

A datagram goes back exactly as it came, so an answer is never larger than its question,
and only within budgets no stranger can stretch: datagrams over MAX_DATAGRAM are ignored, each
source address may have BYTES_PER_SECOND_PER_SOURCE (a train of ten neighbours' datagrams is
about 20 KB), all sources together BYTES_PER_SECOND, and sources on privileged ports or on
our own port are never answered (two echoes must not be made to talk to each other, and a
spoofed source must not turn us against a DNS or NTP server).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from probe.checks.udp import MAX_BIG, train_of
from probe.ratelimit import TokenBucket

log = logging.getLogger("probe.udpecho")
Datagram = bytes | bytearray | memoryview

#: The largest datagram echoed: the checks' full-size datagrams are at most MAX_BIG.
MAX_DATAGRAM = MAX_BIG
#: Per source address: bytes a second and the burst. A probe sends each neighbour one train
#: a round (3.5 KB on a 1,500-byte path, 18 KB on jumbo frames or loopback); this leaves room
#: for short intervals and for several pods behind one address, and bounds what a spoofed
#: source can have sent to it.
BYTES_PER_SECOND_PER_SOURCE = 1024 * 1024
BURST_PER_SOURCE = 2 * 1024 * 1024
#: All sources together.
BYTES_PER_SECOND = 4 * 1024 * 1024
BURST = 8 * 1024 * 1024
#: Source addresses whose budget is remembered (the oldest is forgotten beyond this).
MAX_SOURCES = 8192
#: Trains remembered per source: what arrived of each, so the sender can tell which way a
#: datagram was lost (there, or on the way back); as many as a mesh report carries a path's.
TRAINS_PER_SOURCE = 10
#: The receive buffer asked for (the kernel caps it at twice net.core.rmem_max): a loop busy
#: for a moment (a scrape, a collection) must not drop trains, which would read as loss.
RECEIVE_BUFFER = 4 * 1024 * 1024
#: Datagrams read in one wakeup at most, so a flood cannot hold the loop.
READS_PER_WAKEUP = 64
#: The kernel's count of datagrams dropped at this socket (its buffer full), with each datagram.
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)


@dataclass
class EchoStats:
    echoed: int = 0
    echoed_bytes: int = 0
    too_large: int = 0
    over_budget: int = 0
    refused_source: int = 0
    errors: int = 0
    #: Datagrams the kernel dropped at the echo's own socket (the probe too busy to read):
    #: the senders count them lost, though the network delivered them.
    socket_drops: int = 0
    state: str = "off"

    def as_alive(self) -> dict[str, object]:
        return {
            "state": self.state,
            "echoed": self.echoed,
            "ignored_too_large": self.too_large,
            "ignored_over_budget": self.over_budget,
            "ignored_source_port": self.refused_source,
            "send_errors": self.errors,
            "dropped_at_socket": self.socket_drops,
        }


class UdpEcho:
    """The echo's rules: which datagrams are answered, and what arrived of each train."""

    def __init__(self, own_port: int, clock: Any = time.monotonic) -> None:
        self.own_port = own_port
        self.stats = EchoStats()
        self._clock = clock
        self._sources: OrderedDict[str, TokenBucket] = OrderedDict()
        self._all = TokenBucket(BYTES_PER_SECOND, BURST, clock)
        #: source address -> train id -> datagrams of it that arrived (the latest trains).
        self._arrived: OrderedDict[str, OrderedDict[int, int]] = OrderedDict()
        #: How an answer is sent (start_echo sets it to the socket's sendto).
        self.send: Callable[[Datagram, tuple[Any, ...]], object] = lambda _data, _addr: None
        #: Held while datagrams are taken in (the echo's thread) and while the arrivals are
        #: read (the mesh report, on the event loop).
        self.lock = threading.Lock()

    def datagram_received(self, data: Datagram, addr: tuple[Any, ...]) -> None:
        if len(data) > MAX_DATAGRAM:
            self.stats.too_large += 1
            return
        host, port = str(addr[0]), int(addr[1])
        if port < 1024 or port == self.own_port:
            self.stats.refused_source += 1
            return
        self._note_arrival(host, data)
        budget = self._sources.get(host)
        if budget is None:
            budget = TokenBucket(BYTES_PER_SECOND_PER_SOURCE, BURST_PER_SOURCE, self._clock)
            self._sources[host] = budget
            if len(self._sources) > MAX_SOURCES:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(host)
        if not budget.take(len(data)) or not self._all.take(len(data)):
            self.stats.over_budget += 1
            return
        try:
            self.send(data, addr)
        except OSError:  # our send buffer is full, or an ICMP error for an earlier answer
            self.stats.errors += 1  # not sent: the sender counts it lost (so /alive shows it)
            return
        self.stats.echoed += 1
        self.stats.echoed_bytes += len(data)

    def _note_arrival(self, host: str, data: Datagram) -> None:
        train = train_of(data)
        if train is None:
            return
        trains = self._arrived.get(host)
        if trains is None:
            trains = self._arrived[host] = OrderedDict()
            if len(self._arrived) > MAX_SOURCES:
                self._arrived.popitem(last=False)
        trains[train] = trains.get(train, 0) + 1
        if len(trains) > TRAINS_PER_SOURCE:
            trains.popitem(last=False)

    def recent(self, limit: int = 4096) -> dict[int, int]:
        """Train id -> datagrams that arrived, over the latest trains of every source (the
        sources heard from last first): what the mesh report tells the senders."""
        out: dict[int, int] = {}
        with self.lock:
            for trains in reversed(self._arrived.values()):
                for train, count in trains.items():
                    if len(out) >= limit:
                        return out
                    out[train] = count
        return out

    def arrived(self, host: str) -> dict[int, int]:
        """Of the latest trains from `host`: train id -> datagrams that arrived here."""
        with self.lock:
            return dict(self._arrived.get(host, {}))


def _socket(host: str | None, port: int) -> socket.socket:
    """Bound to `host`, or with None to every address, IPv6 and IPv4 (like the HTTP side)."""
    if host is None:
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        except OSError:  # no IPv6 here
            host = "0.0.0.0"
        else:
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind(("::", port))
            except OSError:
                sock.close()
                raise
            return sock
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Listening:
    """The echo's socket, read by a thread of its own: one preallocated buffer for every
    datagram and the answer sent from it (asyncio's datagram transport allocates 256 KiB a
    datagram, which was most of the echo's CPU).

    A thread, not the event loop: a train that arrives while the loop runs (a check, a
    request) is answered at once rather than after the loop's turn, whose length would be in
    the sender's round trips. Its wakeup is most of what a train costs the echo (about 230 µs
    of CPU on a 2-core VM, woken by a packet from the other core, against 18 µs a datagram)."""

    def __init__(self, sock: socket.socket, echo: UdpEcho) -> None:
        self._sock = sock
        self._echo = echo
        self._buffer = bytearray(MAX_DATAGRAM + 1)
        self._view = memoryview(self._buffer)
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        echo.send = sock.sendto
        self._stop_read, self._stop_write = os.pipe()
        self._thread = threading.Thread(target=self._run, name="udp echo", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._stop_read, select.POLLIN)
        while True:
            try:
                ready = poller.poll()
            except InterruptedError:
                continue
            if any(fd == self._stop_read for fd, _ in ready):
                return
            try:
                self._read()
            except Exception:  # a bug must not end the echo silently
                log.exception("the UDP echo failed to answer")

    def _read(self) -> None:
        echo = self._echo
        with echo.lock:
            for _ in range(READS_PER_WAKEUP):
                try:
                    # MSG_TRUNC: the datagram's real length, so one over the limit is told apart.
                    size, ancdata, _, addr = self._sock.recvmsg_into([self._buffer], 64, socket.MSG_TRUNC)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    echo.stats.errors += 1  # an ICMP error for an earlier answer
                    continue
                for level, kind, data in ancdata:  # present only once something was dropped
                    if level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and len(data) >= 4:
                        echo.stats.socket_drops = int.from_bytes(data[:4], sys.byteorder)
                echo.datagram_received(self._view[:size] if size <= MAX_DATAGRAM else self._buffer, addr)

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return
        os.write(self._stop_write, b"x")
        self._thread.join(timeout=5)
        os.close(self._stop_read)
        os.close(self._stop_write)
        self._sock.close()


async def start_echo(host: str | None, port: int) -> tuple[Listening | None, UdpEcho]:
    """Listen for UDP on host:port; a port that cannot be had is logged and the probe goes on
    (its HTTP side still serves; neighbours will read this node's UDP path as lost)."""
    echo = UdpEcho(port)
    try:
        sock = _socket(host, port)
    except OSError as e:
        echo.stats.state = f"off: cannot listen on UDP port {port}: {e.strerror or e}"
        log.error("no UDP echo", extra={"port": port, "error": e.strerror or str(e)})
        return None, echo
    listening = Listening(sock, echo)
    echo.stats.state = "on"
    return listening, echo
