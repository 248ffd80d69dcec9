"""What a check's URL asks for: one typed target per check kind, chosen by the URL's scheme.

Pure functions, below settings: settings parses every extra check's URL here once, keeps the
typed target, and the check of that kind (probe/checks/<kind>.py) reads it as it is: what was
accepted is what gets checked. A new kind adds its target type, its parser and its schemes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import dns.rdatatype

from probe import names

DNS_PORT = 53


@dataclass(frozen=True)
class HttpGet:
    """A GET of the URL; the service-account token only where `send_token` (the API server)."""

    kind: ClassVar[str] = names.KIND_HTTP
    send_token: bool = False
    #: (name, value) pairs sent with the request.
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class DnsQuery:
    """`dns://NAME` (the pod's resolver) or `dns://SERVER[:PORT]/NAME` (that server)."""

    kind: ClassVar[str] = names.KIND_DNS

    name: str
    rdtype: str = "A"
    #: (address, port) to ask directly; None: the pod's resolver (/etc/resolv.conf).
    server: tuple[str, int] | None = None


@dataclass(frozen=True)
class TcpEndpoint:
    """`tcp://HOST:PORT`: connect, then close."""

    kind: ClassVar[str] = names.KIND_TCP
    host: str
    port: int

    @property
    def is_address(self) -> bool:
        return is_ip(self.host)


@dataclass(frozen=True)
class UdpEndpoint:
    """`udp://HOST:PORT`: a train of datagrams to a probe's UDP echo (probe/checks/udp.py)."""

    kind: ClassVar[str] = names.KIND_UDP
    host: str
    port: int


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse(url: str) -> Spec:
    """The typed target of a check URL, by its scheme; ValueError saying what is wrong."""
    scheme = urlsplit(url.strip()).scheme.lower()
    if scheme not in SCHEMES:
        *others, last = SCHEMES
        raise ValueError(f"unknown scheme {scheme or '(none)'!r}: use {', '.join(others)} or {last}")
    return SCHEMES[scheme](url)


def _check_name(name: str) -> str:
    name = name.strip().rstrip(".")
    if not name:
        raise ValueError("has no name to resolve")
    if len(name) > 253 or any(not 0 < len(label) <= 63 for label in name.split(".")):
        raise ValueError(f"{name!r} is not a DNS name")
    return name


def parse_dns_url(url: str) -> DnsQuery:
    parts = urlsplit(url.strip())
    if parts.scheme.lower() != "dns":
        raise ValueError("not a dns:// URL")
    query = parse_qs(parts.query)
    rdtype = query.pop("type", ["A"])[-1].upper()
    if query:
        raise ValueError(f"unknown parameter {sorted(query)[0]!r} (only type=...)")
    try:
        dns.rdatatype.from_text(rdtype)
    except dns.rdatatype.UnknownRdatatype:
        raise ValueError(f"unknown query type {rdtype!r}") from None
    if not parts.path:  # dns://NAME: the pod's resolver
        return DnsQuery(_check_name(parts.netloc), rdtype)
    path = parts.path.strip("/")
    if "/" in path:
        raise ValueError(f"{path!r} is not a DNS name")
    server = parts.hostname
    if server is None:  # dns:///NAME: the pod's resolver too (RFC 4501's form)
        return DnsQuery(_check_name(path), rdtype)
    if not is_ip(server):
        raise ValueError(f"server {server!r} must be an IP address")
    try:
        port = parts.port or DNS_PORT
    except ValueError as e:
        raise ValueError(str(e)) from None
    return DnsQuery(_check_name(path), rdtype, (server, port))


def _host_port(url: str, scheme: str) -> tuple[str, int]:
    """HOST and PORT of `scheme://HOST:PORT`, nothing else allowed."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() != scheme:
        raise ValueError(f"not a {scheme}:// URL")
    if not parts.hostname:
        raise ValueError("has no host")
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(str(e)) from None
    if not port:
        raise ValueError(f"has no port ({scheme}://HOST:PORT)")
    if parts.path.strip("/") or parts.query:
        raise ValueError(f"takes no path or query ({scheme}://HOST:PORT)")
    return parts.hostname, port


def parse_tcp_url(url: str) -> TcpEndpoint:
    return TcpEndpoint(*_host_port(url, "tcp"))


def parse_udp_url(url: str) -> UdpEndpoint:
    return UdpEndpoint(*_host_port(url, "udp"))


def parse_http_url(_url: str) -> HttpGet:
    """A plain GET (settings checks the URL itself: probe.settings.parse_url)."""
    return HttpGet()


#: What a check performs, one type per kind.
Spec = HttpGet | DnsQuery | TcpEndpoint | UdpEndpoint
#: URL scheme -> the parser of its kind's target. One line per scheme of each kind.
SCHEMES: Mapping[str, Callable[[str], Spec]] = {
    "http": parse_http_url,
    "https": parse_http_url,
    "dns": parse_dns_url,
    "tcp": parse_tcp_url,
    "udp": parse_udp_url,
}
