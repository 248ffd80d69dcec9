"""DNS checks: one resolution, timed by the kernel, as the pod's applications would do it.

`dns://NAME` goes through the pod's resolver the way glibc does: the nameservers, search
list, ndots, timeout and attempts of /etc/resolv.conf (read at every check, as it may
change). `dns://SERVER[:PORT]/NAME` asks that one server. Both send over UDP and repeat over
TCP when the answer came back truncated.

Queries go through sockets of our own (dnspython only builds and parses the messages), so
each figure is network time: from right after the send syscall to the kernel's receive
timestamp of the answer (SO_TIMESTAMPNS), plus, over TCP, the handshake RTT from TCP_INFO.
Where the kernel has neither, the event loop's marks stand in (`kernel.capabilities()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dns.entropy
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from probe import names
from probe.checks import kernel
from probe.checks.result import AttributeValue, Facts, Failure, Kind, Outcome, Phase, Target
from probe.checkurls import DNS_PORT, DnsQuery, is_ip
from probe.settings import Settings

RESOLV_CONF = "/etc/resolv.conf"
UDP_BUFSIZE = 65535

TIMEOUT = "timeout"
NXDOMAIN = "NXDOMAIN"
NODATA = "NODATA"


# --- /etc/resolv.conf ------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolverConfig:
    """What glibc takes from /etc/resolv.conf (resolv.conf(5)); its defaults."""

    nameservers: tuple[tuple[str, int], ...] = (("127.0.0.1", DNS_PORT),)
    search: tuple[str, ...] = ()
    ndots: int = 1
    timeout: float = 5.0
    attempts: int = 2


def parse_resolv_conf(text: str) -> ResolverConfig:
    servers: list[tuple[str, int]] = []
    search: tuple[str, ...] = ()
    options: dict[str, float] = {}
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if not words:
            continue
        keyword, args = words[0], words[1:]
        if keyword == "nameserver" and args and is_ip(args[0].split("%", 1)[0]):
            servers.append((args[0], DNS_PORT))
        elif keyword in ("search", "domain") and args:  # the last of them wins
            search = tuple(a.rstrip(".") for a in args if a.rstrip("."))
        elif keyword == "options":
            for option in args:
                key, _, value = option.partition(":")
                with contextlib.suppress(ValueError):
                    options[key] = float(value)
    return ResolverConfig(
        nameservers=tuple(servers[:3]) or ResolverConfig.nameservers,  # glibc uses the first 3
        search=search,
        ndots=min(int(options.get("ndots", 1)), 15),
        timeout=max(min(options.get("timeout", 5.0), 30.0), 0.001),
        attempts=max(min(int(options.get("attempts", 2)), 5), 1),
    )


def read_resolv_conf(path: str = RESOLV_CONF) -> ResolverConfig:
    try:
        return parse_resolv_conf(Path(path).read_text())
    except OSError:
        return ResolverConfig()


def candidates(name: str, config: ResolverConfig) -> list[str]:
    """The names glibc tries, in order: with enough dots (or a trailing dot) the name as given
    first, else the search list first."""
    if name.endswith("."):
        return [name]
    searched = [f"{name}.{domain}." for domain in config.search]
    if name.count(".") >= config.ndots:
        return [f"{name}.", *searched]
    return [*searched, f"{name}."]


# --- one query, one answer ---------------------------------------------------------------


class QueryFailed(Exception):
    """A server gave no usable answer: timeout, refused, malformed."""

    def __init__(self, error_type: str, text: str, network_ns: int) -> None:
        super().__init__(text)
        self.error_type = error_type
        self.network_ns = network_ns


@dataclass(frozen=True)
class Exchange:
    response: dns.message.Message
    transport: str
    #: Network time of this exchange (ns): send to kernel receive, plus the TCP handshake.
    network_ns: int
    #: perf_counter_ns when the answer arrived (kernel time where available).
    answered_ns: int


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


async def _readable(sock: socket.socket, read: Callable[[], bool]) -> None:
    """Call `read` each time `sock` is readable until it returns True."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if done.done():
            return
        try:
            if read():
                done.set_result(None)
        except BlockingIOError:
            pass
        except OSError as e:
            done.set_exception(e)

    loop.add_reader(sock.fileno(), ready)
    try:
        await done
    finally:
        loop.remove_reader(sock.fileno())


def _network_ns(before_ns: int, sent_ns: int, rx_ns: int) -> int:
    """Send to answer. The send time is taken right after the send syscall; on loopback the
    server can answer before that syscall has returned, then the time before it counts."""
    return rx_ns - sent_ns if rx_ns >= sent_ns else max(rx_ns - before_ns, 0)


def _rx_ns(ancdata: list[tuple[int, int, bytes]], offset_ns: int) -> int:
    return kernel.rx_timestamp_ns(ancdata, offset_ns) or time.perf_counter_ns()


async def _udp(query: dns.message.Message, server: tuple[str, int], timeout: float) -> Exchange:
    with socket.socket(_family(server[0]), socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        kernel.enable_rx_timestamps(sock)
        sent_ns = time.perf_counter_ns()
        answer: list[tuple[dns.message.Message, int]] = []

        def read() -> bool:
            data, ancdata, _, _ = sock.recvmsg(UDP_BUFSIZE, kernel.ANCILLARY_SIZE)
            rx_ns = _rx_ns(ancdata, offset_ns)
            try:
                response = dns.message.from_wire(data, ignore_trailing=True, raise_on_truncation=False)
            except dns.exception.DNSException:
                return False  # not an answer to us: keep waiting, as glibc does
            if not query.is_response(response):
                return False
            answer.append((response, rx_ns))
            return True

        try:
            # A connected UDP socket only hears from the server, and hears its ICMP refusals.
            sock.connect(server)
            wire = query.to_wire()
            offset_ns = kernel.clock_offset_ns()
            before_ns = time.perf_counter_ns()
            sock.send(wire)
            sent_ns = time.perf_counter_ns()
            async with asyncio.timeout(timeout):
                await _readable(sock, read)
        except TimeoutError:
            raise QueryFailed(
                TIMEOUT, f"no answer from {_where(server)} within {timeout:.2g}s", int(timeout * 1e9)
            ) from None
        except ConnectionRefusedError:
            network = time.perf_counter_ns() - sent_ns
            raise QueryFailed("refused", f"{_where(server)} refused (nothing listens on that port)", network) from None
        except OSError as e:
            raise QueryFailed(type(e).__name__, f"{_where(server)}: {e.strerror or e}", 0) from None
    response, rx_ns = answer[0]
    return Exchange(response, "udp", _network_ns(before_ns, sent_ns, rx_ns), rx_ns)


async def _tcp(query: dns.message.Message, server: tuple[str, int], timeout: float) -> Exchange:
    loop = asyncio.get_running_loop()
    wire = query.to_wire()
    buffer = bytearray()
    last_rx = [0]
    with kernel.ConnectingSocket(_family(server[0]), socket.SOCK_STREAM) as sock:
        sock.setblocking(False)

        def read() -> bool:
            data, ancdata, _, _ = sock.recvmsg(UDP_BUFSIZE, kernel.ANCILLARY_SIZE)
            if not data:
                raise ConnectionResetError("closed before the whole answer came")
            last_rx[0] = _rx_ns(ancdata, offset_ns)
            buffer.extend(data)
            return len(buffer) >= 2 and len(buffer) >= 2 + struct.unpack_from("!H", buffer)[0]

        connect_ns = time.perf_counter_ns()
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, server)
                handshake_ns, _ = kernel.connect_network_ns(
                    sock, connect_ns, sock.connect_seen_ns or time.perf_counter_ns()
                )
                kernel.enable_rx_timestamps(sock)
                offset_ns = kernel.clock_offset_ns()
                before_ns = time.perf_counter_ns()
                await loop.sock_sendall(sock, struct.pack("!H", len(wire)) + wire)
                sent_ns = time.perf_counter_ns()
                await _readable(sock, read)
        except TimeoutError:
            raise QueryFailed(
                TIMEOUT, f"no answer from {_where(server)} over TCP within {timeout:.2g}s", int(timeout * 1e9)
            ) from None
        except ConnectionRefusedError:
            raise QueryFailed("refused", f"{_where(server)} refused the TCP connection", 0) from None
        except OSError as e:
            raise QueryFailed(type(e).__name__, f"{_where(server)} over TCP: {e.strerror or e}", 0) from None
    length = struct.unpack_from("!H", buffer)[0]
    try:
        response = dns.message.from_wire(bytes(buffer[2 : 2 + length]), ignore_trailing=True)
    except dns.exception.DNSException as e:
        raise QueryFailed("malformed", f"malformed answer from {_where(server)}: {e}", 0) from None
    return Exchange(response, "tcp", handshake_ns + _network_ns(before_ns, sent_ns, last_rx[0]), last_rx[0])


def _where(server: tuple[str, int]) -> str:
    host = f"[{server[0]}]" if ":" in server[0] else server[0]
    return f"{host}:{server[1]}"


async def exchange(query: dns.message.Message, server: tuple[str, int], timeout: float) -> Exchange:
    """Ask one server over UDP, and over TCP when the UDP answer was truncated."""
    started = time.perf_counter_ns()
    udp = await _udp(query, server, timeout)
    if not udp.response.flags & dns.flags.TC:
        return udp
    remaining = timeout - (time.perf_counter_ns() - started) / 1e9
    if remaining <= 0:
        raise QueryFailed(TIMEOUT, f"no answer from {_where(server)} within {timeout:.2g}s", udp.network_ns)
    try:
        tcp = await _tcp(query, server, remaining)
    except QueryFailed as e:
        raise QueryFailed(e.error_type, f"answer truncated, then {e}", udp.network_ns + e.network_ns) from None
    return Exchange(tcp.response, "tcp", udp.network_ns + tcp.network_ns, tcp.answered_ns)


# --- a whole resolution -------------------------------------------------------------------


@dataclass
class Resolution:
    """What resolving one name gave: records, or why not; and how long the network took."""

    name: str
    rdtype: str
    records: list[str] = field(default_factory=list)
    #: The last response code received ("NOERROR", "NXDOMAIN", ...); None without any answer.
    rcode: str | None = None
    server: tuple[str, int] | None = None
    transport: str = "udp"
    network_ns: int = 0
    first_sent_ns: int = 0
    answered_ns: int | None = None
    error_type: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.records)


def _records(response: dns.message.Message, rdtype: dns.rdatatype.RdataType) -> list[str]:
    return [rr.to_text() for rrset in response.answer if rrset.rdtype == rdtype for rr in rrset]


async def resolve(query: DnsQuery, timeout: float, resolv_conf: str = RESOLV_CONF) -> Resolution:
    """Resolve as the query says, within `timeout` seconds in all."""
    rdtype = dns.rdatatype.from_text(query.rdtype)
    if query.server is not None:
        config = ResolverConfig(nameservers=(query.server,), timeout=timeout, attempts=1)
        names_to_try = [f"{query.name}."]
    else:
        config = read_resolv_conf(resolv_conf)
        names_to_try = candidates(query.name, config)
    result = Resolution(query.name, query.rdtype, first_sent_ns=time.perf_counter_ns())
    deadline = time.monotonic() + timeout
    failures: list[Resolution] = []
    for qname in names_to_try:
        outcome = await _resolve_one(qname, rdtype, config, deadline, result)
        if outcome.ok or (outcome.error_type == TIMEOUT and time.monotonic() >= deadline):
            return outcome
        failures.append(outcome)
    # Like glibc, say what the name as given got (a search-list NXDOMAIN says less), with
    # the network time of the whole resolution, every name tried.
    given = f"{query.name}."
    chosen = next((o for o in failures if o.name == given), failures[-1])
    chosen.network_ns = result.network_ns
    answered = [o.answered_ns for o in failures if o.answered_ns is not None]
    if chosen.answered_ns is not None:
        chosen.answered_ns = max(answered)
    return chosen


async def address_of(host: str, timeout: float, resolv_conf: str = RESOLV_CONF) -> Resolution:
    """A host name's address for a kind that connects to it (tcp://, udp://): A, and AAAA
    when the name has no A record; the network time of both lookups."""
    resolution = await resolve(DnsQuery(host, "A"), timeout, resolv_conf)
    if resolution.error_type == NODATA:
        spent = resolution.network_ns
        resolution = await resolve(DnsQuery(host, "AAAA"), timeout, resolv_conf)
        resolution.network_ns += spent
    return resolution


async def _resolve_one(
    qname: str, rdtype: dns.rdatatype.RdataType, config: ResolverConfig, deadline: float, running: Resolution
) -> Resolution:
    """Ask the nameservers in turn (attempts rounds) for one candidate name. `running` carries
    the network time spent so far over the whole resolution."""
    message = dns.message.make_query(qname, rdtype)
    shown = qname.rstrip(".")
    last: Resolution | None = None
    for _ in range(config.attempts):
        for server in config.nameservers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return last or _timed_out(running, qname, server)
            message.id = dns.entropy.random_16()  # a fresh id per try, as resolvers do
            try:
                answer = await exchange(message, server, min(config.timeout, remaining))
            except QueryFailed as e:
                running.network_ns += e.network_ns
                last = _copy(running, qname, server, error_type=e.error_type, error=str(e))
                continue
            running.network_ns += answer.network_ns
            rcode = dns.rcode.to_text(answer.response.rcode())
            outcome = _copy(running, qname, server, rcode=rcode, transport=answer.transport)
            outcome.answered_ns = answer.answered_ns
            if rcode in ("SERVFAIL", "REFUSED", "NOTIMP", "FORMERR"):  # glibc asks the next server
                outcome.error_type, outcome.error = rcode, f"{rcode} from {_where(server)} for {shown}"
                last = outcome
                continue
            if rcode == "NXDOMAIN":
                outcome.error_type, outcome.error = NXDOMAIN, f"NXDOMAIN: {shown} does not exist"
                return outcome
            outcome.records = _records(answer.response, rdtype)
            if not outcome.records:
                outcome.error_type = NODATA
                outcome.error = f"no {dns.rdatatype.to_text(rdtype)} record for {shown} (empty answer)"
            return outcome
    assert last is not None
    return last


def _copy(running: Resolution, qname: str, server: tuple[str, int], **changes: object) -> Resolution:
    r = Resolution(
        qname, running.rdtype, server=server, network_ns=running.network_ns, first_sent_ns=running.first_sent_ns
    )
    for key, value in changes.items():
        setattr(r, key, value)
    return r


def _timed_out(running: Resolution, qname: str, server: tuple[str, int]) -> Resolution:
    return _copy(running, qname, server, error_type=TIMEOUT, error=f"no answer within the check's {TIMEOUT}")


# --- the check -----------------------------------------------------------------------------


def outcome_of(resolution: Resolution) -> Outcome:
    """A DNS check's outcome: figures, span and failure from what resolving gave."""
    events = {names.DNS_START: 0.0}
    duration = None
    if resolution.answered_ns is not None:
        duration = resolution.network_ns / 1e9
        events[names.DNS_DONE] = duration
    failure = None
    if not resolution.ok:
        failure = Failure(names.DNS_DONE, resolution.error_type or "error", resolution.error or "no answer")
    return Outcome(
        phases=(dns_phase(resolution),), events=events, duration=duration, failure=failure,
        facts=Facts(attributes=span_attributes(resolution)),
    )


def span_attributes(resolution: Resolution) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {
        names.ATTR_DNS_QUESTION_NAME: resolution.name.rstrip("."),
        names.ATTR_DNS_QUESTION_TYPE: resolution.rdtype,
        names.ATTR_DNS_ANSWER_COUNT: len(resolution.records),
        "network.transport": resolution.transport,
    }
    if resolution.rcode is not None:
        attributes[names.ATTR_DNS_RESPONSE_CODE] = resolution.rcode
    if resolution.server is not None:
        attributes["server.address"], attributes["server.port"] = resolution.server
    return attributes


def dns_phase(resolution: Resolution) -> Phase:
    return Phase(names.DNS_START, names.DNS_DONE, resolution.first_sent_ns, resolution.answered_ns)


class DnsKind(Kind):
    """`dns://` checks."""

    def __init__(self, settings: Settings, *, resolv_conf: str = RESOLV_CONF) -> None:
        self._timeout = settings.check_timeout
        self._resolv_conf = resolv_conf

    async def measure(self, target: Target) -> Outcome:
        assert isinstance(target.spec, DnsQuery)
        return outcome_of(await resolve(target.spec, self._timeout, self._resolv_conf))
