"""Which checks a round performs, from the settings and the current neighbourhood."""

from __future__ import annotations

from dataclasses import dataclass

from probe import names
from probe.checks.result import CheckResult, Skip, Target, Why
from probe.checkurls import DnsQuery, HttpGet, UdpEndpoint, is_ip
from probe.neighbours import Neighbourhood
from probe.settings import Settings

_TOKEN = HttpGet(send_token=True)


def _skip(check_type: str, why: Why, variable: str) -> CheckResult:
    return CheckResult(check_type=check_type, skip=Skip(why, variable))


@dataclass(frozen=True)
class Plan:
    targets: tuple[Target, ...]
    skipped: tuple[CheckResult, ...]


def _api_server_targets(settings: Settings) -> tuple[list[Target], list[CheckResult]]:
    targets: list[Target] = []
    skipped: list[CheckResult] = []
    port = settings.kubernetes_service_port
    if not settings.check_api_server_direct:
        skipped.append(_skip(names.API_SERVER_DIRECT, Why.DISABLED, "KUBENURSE_CHECK_API_SERVER_DIRECT"))
    elif not settings.kubernetes_service_host:
        skipped.append(_skip(names.API_SERVER_DIRECT, Why.NOT_IN_CLUSTER, "KUBERNETES_SERVICE_HOST"))
    else:
        host = settings.kubernetes_service_host
        host = f"[{host}]" if ":" in host else host
        targets.append(Target(names.API_SERVER_DIRECT, f"https://{host}:{port}/version", _TOKEN))
    if not settings.check_api_server_dns:
        skipped.append(_skip(names.API_SERVER_DNS, Why.DISABLED, "KUBENURSE_CHECK_API_SERVER_DNS"))
    elif not settings.in_cluster and settings.kubernetes_service_dns is None:
        skipped.append(_skip(names.API_SERVER_DNS, Why.NOT_IN_CLUSTER, "KUBERNETES_SERVICE_HOST"))
    else:
        url = f"https://{settings.api_server_dns_name}:{port}/version"
        targets.append(Target(names.API_SERVER_DNS, url, _TOKEN))
    return targets, skipped


def _url_target(check_type: str, enabled: bool, url: str | None, variable: str) -> Target | CheckResult:
    if not enabled:
        return _skip(check_type, Why.DISABLED, f"KUBENURSE_CHECK_{check_type.upper()}")
    if not url:
        return _skip(check_type, Why.NOT_SET, variable)
    return Target(check_type, f"{url}/alwayshappy")


def plan_round(settings: Settings, neighbourhood: Neighbourhood) -> Plan:
    """Targets and skipped checks of one round."""
    targets, skipped = _api_server_targets(settings)
    s = settings
    for item in (
        _url_target(names.ME_INGRESS, s.check_me_ingress, s.ingress_url, "KUBENURSE_INGRESS_URL"),
        _url_target(names.ME_SERVICE, s.check_me_service, s.service_url, "KUBENURSE_SERVICE_URL"),
    ):
        if isinstance(item, Target):
            targets.append(item)
        else:
            skipped.append(item)
    if not s.check_dns_cluster:
        skipped.append(_skip(names.DNS_CLUSTER, Why.DISABLED, "KUBENURSE_CHECK_DNS_CLUSTER"))
    elif not s.in_cluster and s.kubernetes_service_dns is None:
        skipped.append(_skip(names.DNS_CLUSTER, Why.NOT_IN_CLUSTER, "KUBERNETES_SERVICE_HOST"))
    elif is_ip(s.api_server_dns_name):
        skipped.append(_skip(names.DNS_CLUSTER, Why.NOTHING_TO_RESOLVE, "KUBERNETES_SERVICE_DNS"))
    else:
        name = s.api_server_dns_name
        targets.append(Target(names.DNS_CLUSTER, f"dns://{name}", DnsQuery(name.rstrip("."))))
    targets.extend(Target(check.name, check.url, check.target) for check in settings.extra_checks)
    if settings.check_neighbourhood and not neighbourhood.skipped:
        scheme, port = ("https", settings.https_port) if settings.use_tls else ("http", settings.http_port)
        origin = HttpGet(headers=((names.NEIGHBOUR_ORIGIN_HEADER, settings.pod_name),))
        for n in neighbourhood.neighbours:
            host = f"[{n.pod_ip}]" if ":" in n.pod_ip else n.pod_ip
            url = f"{scheme}://{host}:{port}/alwayshappy"
            targets.append(Target(names.path_type(n.node_name), url, origin, n))
            if settings.check_neighbourhood_udp:  # the echo listens on the HTTP port number
                echo = UdpEndpoint(n.pod_ip, settings.http_port)
                targets.append(Target(names.path_type(n.node_name), f"udp://{host}:{settings.http_port}", echo, n))
    return Plan(tuple(targets), tuple(skipped))
