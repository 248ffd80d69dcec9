"""TCP checks: `tcp://HOST:PORT` connects, then closes; a name is resolved first (dns.py).

The connect figure is the kernel's: the time is taken right before the connect syscall, and
right after the connection completed (before anything was sent) `TCP_INFO.tcpi_rtt` holds
the one RTT sample there is, the SYN / SYN-ACK round trip. connect_done = connect_start +
that RTT, so however late the event loop noticed the connection, the figure is the network's.
Where TCP_INFO is missing, the loop's mark stands in.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry import trace

from probe import names
from probe.checks import dns, kernel, netspan
from probe.checks.result import CheckResult, Target
from probe.checkurls import DnsQuery, TcpEndpoint, parse_tcp_url
from probe.settings import Settings


@dataclass(frozen=True)
class Connect:
    """One connect attempt: where, when it started (perf ns), its network time, or why not."""

    address: str
    port: int
    start_ns: int
    network_ns: int | None
    error_type: str | None = None
    error: str | None = None
    #: SYNs the kernel resent before the connection was made (or given up).
    retransmits: int | None = None
    #: Where `network_ns` came from: kernel.KERNEL (the handshake RTT) or kernel.LOOP.
    source: str = kernel.KERNEL

    @property
    def ok(self) -> bool:
        return self.error is None


async def connect(address: str, port: int, timeout: float) -> Connect:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    loop = asyncio.get_running_loop()
    where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    with kernel.ConnectingSocket(family, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        start_ns = time.perf_counter_ns()

        def resent() -> int | None:
            info = kernel.tcp_info(sock)
            return info.total_retrans if info is not None else None

        try:
            async with asyncio.timeout(timeout):
                # Awaited directly (no task in between): the connect syscall runs right now.
                await loop.sock_connect(sock, (address, port))
        except TimeoutError:
            error = f"timeout: no answer from {where} within {timeout:.2g}s"
            return Connect(address, port, start_ns, None, "timeout", error, resent())
        except ConnectionRefusedError:
            error = f"connection refused by {where}"
            return Connect(address, port, start_ns, None, "connection_refused", error, resent())
        except OSError as e:
            return Connect(address, port, start_ns, None, type(e).__name__, f"{where}: {e.strerror or e}", resent())
        network_ns, source = kernel.connect_network_ns(sock, start_ns, sock.connect_seen_ns or time.perf_counter_ns())
        return Connect(address, port, start_ns, network_ns, retransmits=resent(), source=source)


async def _address(endpoint: TcpEndpoint, timeout: float, resolv_conf: str) -> dns.Resolution:
    """A, and AAAA when the name has no A record."""
    resolution = await dns.resolve(DnsQuery(endpoint.host, "A"), timeout, resolv_conf)
    if resolution.error_type == dns.NODATA:
        spent = resolution.network_ns
        resolution = await dns.resolve(DnsQuery(endpoint.host, "AAAA"), timeout, resolv_conf)
        resolution.network_ns += spent
    return resolution


def result_of(target: Target, resolution: dns.Resolution | None, attempt: Connect | None) -> CheckResult:
    """Events are cumulative network time: DNS, then the connect right after it."""
    events: dict[str, float] = {}
    offset = 0.0
    if resolution is not None:
        events[names.DNS_START] = 0.0
        if resolution.answered_ns is not None:
            offset = resolution.network_ns / 1e9
            events[names.DNS_DONE] = offset
        if not resolution.ok:
            return CheckResult(
                target.check_type, f"{names.DNS_DONE}: {resolution.error}", target,
                error_event=names.DNS_DONE, events=events, error_type=resolution.error_type,
            )
    assert attempt is not None
    events[names.CONNECT_START] = offset
    if not attempt.ok:
        return CheckResult(
            target.check_type, f"{names.CONNECT_DONE}: {attempt.error}", target,
            error_event=names.CONNECT_DONE, events=events, error_type=attempt.error_type,
            retransmits=attempt.retransmits,
        )
    assert attempt.network_ns is not None
    events[names.CONNECT_DONE] = offset + attempt.network_ns / 1e9
    return CheckResult(
        target.check_type, names.OK, target, duration=events[names.CONNECT_DONE], events=events,
        retransmits=attempt.retransmits,
    )


class TcpChecker:
    """Performs `tcp://` checks; `record` is called with each result inside the check's span."""

    def __init__(
        self,
        settings: Settings,
        *,
        record: Callable[[CheckResult], None] = lambda _r: None,
        tracer: trace.Tracer | None = None,
        resolv_conf: str = dns.RESOLV_CONF,
    ) -> None:
        self._timeout = settings.check_timeout
        self._connect_timeout = settings.check_connect_timeout
        self._record = record
        self._tracer = tracer or trace.get_tracer(names.TRACER_NAME)
        self._resolv_conf = resolv_conf

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def check(self, target: Target) -> CheckResult:
        clock = netspan.Clock()
        span = netspan.start(self._tracer, target, clock)
        with trace.use_span(span, end_on_exit=False):
            phases: list[netspan.Phase] = []
            attributes: dict[str, str | int] = {"network.transport": "tcp"}
            try:
                result = await self._check(target, clock, phases, attributes)
            except Exception as e:  # never let one check take the round down
                result = CheckResult(
                    target.check_type, f"{names.ROUND_TRIP_ERROR}: {type(e).__name__}: {e}", target,
                    error_event=names.ROUND_TRIP_ERROR, error_type=type(e).__name__,
                )
            netspan.finish(self._tracer, span, result, clock, phases, attributes)
            self._record(result)
        return result

    async def _check(
        self, target: Target, clock: netspan.Clock, phases: list[netspan.Phase], attributes: dict[str, str | int]
    ) -> CheckResult:
        endpoint = parse_tcp_url(target.url)
        attributes["server.address"], attributes["server.port"] = endpoint.host, endpoint.port
        resolution = None
        address = endpoint.host
        if not endpoint.is_address:
            resolution = await _address(endpoint, self._timeout, self._resolv_conf)
            phases.append(dns.dns_phase(resolution))
            attributes[names.ATTR_DNS_QUESTION_NAME] = endpoint.host
            attributes[names.ATTR_DNS_ANSWER_COUNT] = len(resolution.records)
            if not resolution.ok:
                return result_of(target, resolution, None)
            address = resolution.records[0]
        remaining = self._timeout - (time.perf_counter_ns() - clock.start_ns) / 1e9
        attempt = await connect(address, endpoint.port, max(min(self._connect_timeout, remaining), 0.001))
        end = attempt.start_ns + attempt.network_ns if attempt.network_ns is not None else None
        phases.append(netspan.Phase("connect", attempt.start_ns, end, names.CONNECT_DONE))
        attributes["network.peer.address"], attributes["network.peer.port"] = address, endpoint.port
        if attempt.retransmits is not None:
            attributes[names.ATTR_TCP_RETRANSMITS] = attempt.retransmits
        if attempt.ok and attempt.source != kernel.KERNEL:
            attributes[names.ATTR_TIMING_SOURCE] = attempt.source
        return result_of(target, resolution, attempt)
