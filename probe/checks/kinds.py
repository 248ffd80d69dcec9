"""Every check kind, registered by the type of target it measures (probe.checkurls says which
URL schemes parse into which target). A new kind: its target in checkurls.py, its module
here in probe/checks/, and one line below."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from probe.checks.dns import DnsKind
from probe.checks.http import HttpKind
from probe.checks.result import Kind
from probe.checks.tcp import TcpKind
from probe.checks.udp import UdpKind
from probe.checkurls import DnsQuery, HttpGet, TcpEndpoint, UdpEndpoint
from probe.settings import Settings

KINDS: Mapping[type, Callable[[Settings], Kind]] = {
    HttpGet: HttpKind,
    DnsQuery: DnsKind,
    TcpEndpoint: TcpKind,
    UdpEndpoint: UdpKind,
}


def build_kinds(settings: Settings) -> dict[type, Kind]:
    return {spec: make(settings) for spec, make in KINDS.items()}
