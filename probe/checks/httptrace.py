"""Per-phase timing of one HTTP request, with aiohttp's public hooks only (NOTES.md).

aiohttp's own signals give DNS, "connection created" (DNS + TCP + TLS together), headers
sent and response headers parsed. Two more public hooks split TCP from TLS:
`TCPConnector(socket_factory=...)` runs right before each connect attempt, and asyncio
calls `SSLContext.wrap_bio` when the TLS handshake starts. Those hooks carry no request
context, so the timeline of the request in flight lives in a ContextVar: every check runs
in its own task, and asyncio runs the connect (and the protocol callbacks it schedules)
in that task's context.
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

_current: ContextVar[Timeline | None] = ContextVar("kubenurse_timeline", default=None)


@dataclass
class Timeline:
    """Monotonic timestamps (ns) of one request's phases; the first occurrence wins."""

    start_ns: int = field(default_factory=time.perf_counter_ns)
    wall_start_ns: int = field(default_factory=time.time_ns)
    marks: dict[str, int] = field(default_factory=dict)
    tls: bool = False
    #: The address of the last connect attempt (the one that succeeded, or failed last).
    peer: tuple[str, int] | None = None
    #: The first TLS connection of this request (its peer's certificates: certs.py).
    ssl_object: ssl.SSLObject | None = None

    def mark(self, event: str, at_ns: int | None = None) -> None:
        if event not in self.marks:
            self.marks[event] = time.perf_counter_ns() if at_ns is None else at_ns

    def offsets(self) -> dict[str, float]:
        """Seconds from request start to each event that happened, in phase order."""
        return {e: (self.marks[e] - self.start_ns) / 1e9 for e in names.EVENTS if e in self.marks}

    def wall_ns(self, event: str) -> int:
        """Wall-clock time of an event, for span timestamps."""
        return self.wall_start_ns + (self.marks[event] - self.start_ns)

    def last_phase_started(self) -> str | None:
        """The `*_done` event of the phase that started but did not finish, if any."""
        for start, done in (
            (names.TLS_HANDSHAKE_START, names.TLS_HANDSHAKE_DONE),
            (names.CONNECT_START, names.CONNECT_DONE),
            (names.DNS_START, names.DNS_DONE),
        ):
            if start in self.marks and done not in self.marks:
                return done
        return None


def begin() -> Timeline:
    """Start the timeline of the request about to be sent from this task."""
    timeline = Timeline()
    _current.set(timeline)
    return timeline


def _mark(event: str) -> None:
    timeline = _current.get()
    if timeline is not None:
        timeline.mark(event)


class TimedSocket(socket.socket):
    """A socket that notes when the first byte of the answer arrives.

    asyncio's transports read through `recv`/`recv_into` of the very socket the connector
    made, so this is the moment the bytes left the kernel, before any parsing: the figure
    Go's httptrace calls GotFirstResponseByte. Only bytes after the request was written
    count (TLS handshake records come before it).
    """

    timeline: Timeline | None = None

    def recv(self, *args: Any) -> bytes:
        data = super().recv(*args)
        self._saw_bytes()
        return data

    def recv_into(self, *args: Any) -> int:
        n = super().recv_into(*args)
        self._saw_bytes()
        return n

    def _saw_bytes(self) -> None:
        timeline = self.timeline
        if (
            timeline is not None
            and names.WROTE_REQUEST in timeline.marks
            and names.GOT_FIRST_RESP_BYTE not in timeline.marks
        ):
            timeline.mark(names.GOT_FIRST_RESP_BYTE)


def socket_factory(addr_info: AddrInfoType) -> socket.socket:
    """Called by the connector right before it connects: the TCP connect starts now."""
    family, type_, proto, _, address = addr_info
    sock = TimedSocket(family=family, type=type_, proto=proto)
    timeline = _current.get()
    if timeline is not None:
        sock.timeline = timeline
        timeline.mark(names.CONNECT_START)
        timeline.peer = (str(address[0]), int(address[1]))
    return sock


class TimedSSLContext(ssl.SSLContext):
    """An SSLContext that notes when asyncio starts a handshake with it."""

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        timeline = _current.get()
        if timeline is not None:
            now = time.perf_counter_ns()
            timeline.tls = True
            timeline.mark(names.CONNECT_DONE, now)
            timeline.mark(names.TLS_HANDSHAKE_START, now)
        ssl_object = super().wrap_bio(*args, **kwargs)
        if timeline is not None and timeline.ssl_object is None:
            timeline.ssl_object = ssl_object
        return ssl_object


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
    # Fallback for a reused connection (its socket belongs to an earlier timeline): aiohttp
    # has no first-byte signal; this fires once the status line and headers are parsed.
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
