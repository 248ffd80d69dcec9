"""What the kernel can tell about a TCP socket's timing, with a fallback where it cannot.

Two sources (checked on Linux 6.x; docs/measurement.md says what each figure spans):

- `SO_TIMESTAMPNS`: every `recvmsg` returns the kernel's receive time of the data
  (CLOCK_REALTIME), however late the event loop reads it.
- `TCP_INFO.tcpi_rtt`: right after connect, before any data was sent, the one RTT sample
  is the SYN / SYN-ACK round trip: the TCP handshake as the kernel timed it.

`capabilities()` finds out once per process which of the two work here (a gVisor sandbox or
another OS may have neither) so every figure can say where it came from.
"""

from __future__ import annotations

import functools
import socket
import struct
import time
from dataclasses import dataclass

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
TCP_INFO = getattr(socket, "TCP_INFO", 11)
#: struct tcp_info: tcpi_rtt (u32, microseconds) sits at byte 68 on Linux.
_TCPI_RTT_OFFSET = 68
_TCP_INFO_LEN = 104
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


def rx_timestamp_ns(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    """The kernel receive time in `perf_counter_ns` terms, from recvmsg's control messages.

    The kernel's stamp is CLOCK_REALTIME; the offset to the monotonic clock is read right
    after the recvmsg returned, so converting costs no accuracy worth naming (< 1 µs).
    """
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            seconds, nanos = _TIMESPEC.unpack_from(data)
            return seconds * 1_000_000_000 + nanos - (time.time_ns() - time.perf_counter_ns())
    return None


def tcp_rtt_ns(sock: socket.socket) -> int | None:
    """The kernel's smoothed RTT of this connection (ns); None where TCP_INFO is missing."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _TCP_INFO_LEN)
    except (OSError, AttributeError):
        return None
    if len(info) < _TCPI_RTT_OFFSET + 4:
        return None
    (rtt_us,) = struct.unpack_from("@I", info, _TCPI_RTT_OFFSET)
    return rtt_us * 1000 if rtt_us else None


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
                    info = tcp_rtt_ns(client) is not None
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
