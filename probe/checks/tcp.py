"""TCP checks: `tcp://HOST:PORT` connects, then closes; a name is resolved first (dns.py).

The connect figure is the kernel's: the time is taken right before the connect syscall, and
right after the connection completed (before anything was sent) `TCP_INFO.tcpi_rtt` holds
the one RTT sample there is, the SYN / SYN-ACK round trip. connect_done = connect_start +
that RTT, so however late the event loop noticed the connection, the figure is the network's.
Where a SYN was resent (or TCP_INFO is missing) the loop's mark of the completed connection
stands in, so the resend's wait is in the figure (kernel.connect_network_ns); the resends
are counted either way.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

from probe import names
from probe.checks import dns, kernel
from probe.checks.result import AttributeValue, Facts, Failure, Kind, Outcome, Phase, Target
from probe.checkurls import TcpEndpoint
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
            return info.lost if info is not None else None

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


def outcome_of(endpoint: TcpEndpoint, resolution: dns.Resolution | None, attempt: Connect | None) -> Outcome:
    """Events are cumulative network time: DNS, then the connect right after it."""
    events: dict[str, float] = {}
    phases: list[Phase] = []
    attributes: dict[str, AttributeValue] = {}
    offset = 0.0
    if resolution is not None:
        phases.append(dns.dns_phase(resolution))
        attributes[names.ATTR_DNS_QUESTION_NAME] = endpoint.host
        attributes[names.ATTR_DNS_ANSWER_COUNT] = len(resolution.records)
        events[names.DNS_START] = 0.0
        if resolution.answered_ns is not None:
            offset = resolution.network_ns / 1e9
            events[names.DNS_DONE] = offset
        if not resolution.ok:
            failure = Failure(names.DNS_DONE, resolution.error_type or "error", resolution.error or "no address")
            return Outcome(phases=tuple(phases), events=events, failure=failure, facts=Facts(attributes=attributes))
    assert attempt is not None
    events[names.CONNECT_START] = offset
    end = attempt.start_ns + attempt.network_ns if attempt.network_ns is not None else None
    source = attempt.source if attempt.ok else None
    phases.append(Phase(names.CONNECT_START, names.CONNECT_DONE, attempt.start_ns, end, source))
    peer, facts = (attempt.address, attempt.port), Facts(retransmits=attempt.retransmits, attributes=attributes)
    if not attempt.ok:
        failure = Failure(names.CONNECT_DONE, attempt.error_type or "error", attempt.error or "no connection")
        return Outcome(phases=tuple(phases), events=events, peer=peer, failure=failure, facts=facts)
    assert attempt.network_ns is not None
    events[names.CONNECT_DONE] = offset + attempt.network_ns / 1e9
    return Outcome(phases=tuple(phases), events=events, peer=peer, duration=events[names.CONNECT_DONE], facts=facts)


class TcpKind(Kind):
    """`tcp://` checks."""

    def __init__(self, settings: Settings, *, resolv_conf: str = dns.RESOLV_CONF) -> None:
        self._timeout = settings.check_timeout
        self._connect_timeout = settings.check_connect_timeout
        self._resolv_conf = resolv_conf

    def attributes(self, target: Target) -> Mapping[str, AttributeValue]:
        assert isinstance(target.spec, TcpEndpoint)
        return {"network.transport": "tcp", "server.address": target.spec.host, "server.port": target.spec.port}

    async def measure(self, target: Target) -> Outcome:
        endpoint = target.spec
        assert isinstance(endpoint, TcpEndpoint)
        started_ns = time.perf_counter_ns()
        resolution = None
        address = endpoint.host
        if not endpoint.is_address:
            resolution = await dns.address_of(endpoint.host, self._timeout, self._resolv_conf)
            if not resolution.ok:
                return outcome_of(endpoint, resolution, None)
            address = resolution.records[0]
        remaining = self._timeout - (time.perf_counter_ns() - started_ns) / 1e9
        attempt = await connect(address, endpoint.port, max(min(self._connect_timeout, remaining), 0.001))
        return outcome_of(endpoint, resolution, attempt)
