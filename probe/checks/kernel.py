"""What the kernel can tell about a TCP socket's timing, with a fallback where it cannot.

Two sources (checked on Linux 6.x; docs/measurement.md says what each figure spans):

- `SO_TIMESTAMPNS`: every `recvmsg` returns the kernel's receive time of the data
  (CLOCK_REALTIME), however late the event loop reads it.
- `TCP_INFO.tcpi_rtt`: right after connect, before any data was sent, the one RTT sample
  is the SYN / SYN-ACK round trip: the TCP handshake as the kernel timed it. That holds only
  when no SYN was resent: after a resent SYN the sample is the last SYN's (or none), and the
  second the kernel waited before resending is in no RTT. `TCP_INFO.tcpi_total_retrans`
  (SYNs included, checked on Linux 6.18) says whether that happened; then the connect ends
  when the socket became writable (`TcpInfo.resent`).

`capabilities()` finds out once per process which of the two work here (a gVisor sandbox or
another OS may have neither) so every figure can say where it came from.
"""

from __future__ import annotations

import functools
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
TCP_INFO = getattr(socket, "TCP_INFO", 11)
#: struct tcp_info: tcpi_rtt (u32, microseconds) sits at byte 68 on Linux.
_TCPI_RTT_OFFSET = 68
#: tcpi_total_retrans (u32): segments resent over the connection's life, SYNs included.
_TCPI_TOTAL_RETRANS_OFFSET = 100
#: tcpi_dsack_dups (u32, Linux 5.4+): resent segments the peer already had (it said so with a
#: D-SACK): a tail loss probe sent while the server was still working on the answer.
_TCPI_DSACK_DUPS_OFFSET = 216
_TCP_INFO_LEN = 220
_TIMESPEC = struct.Struct("@qq")
#: Room for one SCM_TIMESTAMPNS control message.
ANCILLARY_SIZE = socket.CMSG_SPACE(_TIMESPEC.size) if hasattr(socket, "CMSG_SPACE") else 0

KERNEL = "kernel"
LOOP = "loop"


def enable_rx_timestamps(sock: socket.socket) -> bool:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except (OSError, AttributeError):
        return False
    return True


def clock_offset_ns() -> int:
    """CLOCK_REALTIME less perf_counter, now: what turns the kernel's receive stamps into
    perf_counter moments. Take it just before sending what the stamped data answers."""
    return time.time_ns() - time.perf_counter_ns()


def rx_timestamp_ns(ancdata: list[tuple[int, int, bytes]], offset_ns: int | None = None) -> int | None:
    """The kernel receive time in `perf_counter_ns` terms, from recvmsg's control messages.

    The kernel's stamp is CLOCK_REALTIME, which can be stepped while perf_counter runs on: a
    VM's guest agent stepped it 0.5 ms forward every 100 ms on our CI machines, and NTP steps
    it on a clock that is far off. Converted with the offset of the moment it was read, a
    stamp read after a step is off by the step (the figure then shrinks by it). `offset_ns`
    (clock_offset_ns()) taken when the request or train was sent confines that to a step
    within the network's own time; without it the offset is read now.
    """
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            seconds, nanos = _TIMESPEC.unpack_from(data)
            return seconds * 1_000_000_000 + nanos - (clock_offset_ns() if offset_ns is None else offset_ns)
    return None


@dataclass(frozen=True)
class TcpInfo:
    """What TCP_INFO says about a connection's timing and its losses."""

    #: The kernel's smoothed RTT (ns); None before any sample.
    rtt_ns: int | None
    #: Segments the kernel resent on this connection so far, SYNs included.
    total_retrans: int
    #: Of those, the ones the peer reported as duplicates (nothing had been lost).
    dsack_dups: int = 0

    @property
    def resent(self) -> bool:
        return self.total_retrans > 0

    @property
    def lost(self) -> int:
        """Resends that repaired a loss: a tail loss probe that arrived twice (a slow answer,
        not a lost packet) is not one."""
        return max(self.total_retrans - self.dsack_dups, 0)


def tcp_info(sock: socket.socket) -> TcpInfo | None:
    """The connection's TCP_INFO; None where the kernel has none (not Linux, closed socket)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _TCP_INFO_LEN)
    except (OSError, AttributeError):
        return None
    if len(info) < _TCPI_TOTAL_RETRANS_OFFSET + 4:
        return None
    (rtt_us,) = struct.unpack_from("@I", info, _TCPI_RTT_OFFSET)
    (retrans,) = struct.unpack_from("@I", info, _TCPI_TOTAL_RETRANS_OFFSET)
    dsack = struct.unpack_from("@I", info, _TCPI_DSACK_DUPS_OFFSET)[0] if len(info) >= _TCP_INFO_LEN else 0
    return TcpInfo(rtt_us * 1000 if rtt_us else None, retrans, dsack)


class ConnectingSocket(socket.socket):
    """A socket that notes when the event loop saw its non-blocking connect complete.

    asyncio's `sock_connect` (and aiohttp through it) reads `SO_ERROR` from this very object
    in the writability callback, so the first such read after `connect` is the moment the
    loop learnt of the SYN-ACK: late by the loop's own lateness, but never early, and with
    every resent SYN's wait in it.
    """

    connect_called_ns: int | None = None
    connect_seen_ns: int | None = None

    def connect(self, address: Any) -> None:
        self.connect_called_ns = time.perf_counter_ns()
        super().connect(address)  # non-blocking: raises BlockingIOError while in progress
        self.connect_seen_ns = time.perf_counter_ns()  # completed at once

    def getsockopt(self, level: int, option: int, *args: Any) -> Any:
        value = super().getsockopt(level, option, *args)
        if (
            level == socket.SOL_SOCKET
            and option == socket.SO_ERROR
            and self.connect_called_ns is not None
            and self.connect_seen_ns is None
        ):
            self.connect_seen_ns = time.perf_counter_ns()
        return value


def connect_network_ns(sock: socket.socket, started_ns: int, seen_ns: int) -> tuple[int, str]:
    """The handshake's network time and where it came from, right after the connect completed
    (before anything was sent): the kernel's RTT sample when no SYN was resent; otherwise,
    from `started_ns` to `seen_ns` (when the loop saw the connection), which holds the
    kernel's wait before each resend."""
    info = tcp_info(sock)
    if info is None or info.rtt_ns is None or info.resent:
        return max(seen_ns - started_ns, 0), LOOP
    return info.rtt_ns, KERNEL


@dataclass(frozen=True)
class Capabilities:
    """Which kernel timing sources work on this machine."""

    rx_timestamps: bool
    tcp_info: bool

    @property
    def source(self) -> str:
        return KERNEL if self.rx_timestamps and self.tcp_info else LOOP

    def describe(self) -> str:
        if self.source == KERNEL:
            return "kernel receive timestamps (SO_TIMESTAMPNS) and TCP_INFO handshake RTT"
        missing = [n for n, ok in (("SO_TIMESTAMPNS", self.rx_timestamps), ("TCP_INFO", self.tcp_info)) if not ok]
        return f"event-loop marks ({', '.join(missing)} not available here): figures include the probe's own delays"


#: A socket with receive timestamps on, kept open for the life of the process. The kernel
#: turns timestamping on for the whole host only when a socket asks for it, and does so
#: lazily (a deferred work item): without a keeper, every check's first packets would race
#: that switch and could arrive unstamped, and the capability probe itself could fail.
_keeper: socket.socket | None = None


@functools.cache
def capabilities() -> Capabilities:
    """Try both sources once on a loopback connection (and keep timestamping switched on)."""
    global _keeper
    rx = info = False
    try:
        if _keeper is None:
            _keeper = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            enable_rx_timestamps(_keeper)
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            with socket.create_connection(server.getsockname(), timeout=2) as client:
                peer, _ = server.accept()
                with peer:
                    measured = tcp_info(client)
                    info = measured is not None and measured.rtt_ns is not None
                    if enable_rx_timestamps(client):
                        client.settimeout(2)
                        for _ in range(20):  # the kernel switches timestamping on lazily
                            peer.sendall(b"x")
                            _, ancdata, _, _ = client.recvmsg(1, ANCILLARY_SIZE)
                            rx = rx_timestamp_ns(ancdata) is not None
                            if rx:
                                break
                            time.sleep(0.005)
    except OSError:
        pass
    return Capabilities(rx_timestamps=rx, tcp_info=info)
