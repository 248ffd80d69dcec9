"""What an extra check's URL asks for: its kind (by scheme) and, for DNS and TCP, the parts.

Pure functions: settings validates with them at start, and the DNS and TCP checkers read
their targets with the same ones, so what was accepted is what gets checked.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import dns.rdatatype

from probe import names

DNS_PORT = 53
SCHEMES = {
    "http": names.KIND_HTTP,
    "https": names.KIND_HTTP,
    "dns": names.KIND_DNS,
    "tcp": names.KIND_TCP,
    "udp": names.KIND_UDP,
}


@dataclass(frozen=True)
class DnsQuery:
    """`dns://NAME` (the pod's resolver) or `dns://SERVER[:PORT]/NAME` (that server)."""

    name: str
    rdtype: str = "A"
    #: (address, port) to ask directly; None: the pod's resolver (/etc/resolv.conf).
    server: tuple[str, int] | None = None


@dataclass(frozen=True)
class TcpEndpoint:
    host: str
    port: int

    @property
    def is_address(self) -> bool:
        return is_ip(self.host)


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def kind_of(url: str) -> str:
    """The check kind of a URL; ValueError for a scheme no kind has."""
    scheme = urlsplit(url.strip()).scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme or '(none)'!r}: use http, https, dns, tcp or udp")
    return SCHEMES[scheme]


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


def parse_tcp_url(url: str) -> TcpEndpoint:
    parts = urlsplit(url.strip())
    if parts.scheme.lower() != "tcp":
        raise ValueError("not a tcp:// URL")
    if not parts.hostname:
        raise ValueError("has no host")
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(str(e)) from None
    if not port:
        raise ValueError("has no port (tcp://HOST:PORT)")
    if parts.path.strip("/") or parts.query:
        raise ValueError("takes no path or query (tcp://HOST:PORT)")
    return TcpEndpoint(parts.hostname, port)


@dataclass(frozen=True)
class UdpEndpoint:
    host: str
    port: int


def parse_udp_url(url: str) -> UdpEndpoint:
    parts = urlsplit(url.strip())
    if parts.scheme.lower() != "udp":
        raise ValueError("not a udp:// URL")
    if not parts.hostname:
        raise ValueError("has no host")
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(str(e)) from None
    if not port:
        raise ValueError("has no port (udp://HOST:PORT)")
    if parts.path.strip("/") or parts.query:
        raise ValueError("takes no path or query (udp://HOST:PORT)")
    return UdpEndpoint(parts.hostname, port)
