"""Loss on a real path: two network namespaces on a bridge, nftables dropping packets between
them, a probe in one checking a probe (and dnsmasq) in the other, read from outside: its
/metrics and /alive, compared with curl through the same rule.

- the first SYN of every connection dropped: connect_done and the request duration read
  curl's `time_connect` (the kernel resends after 1 s), one retransmission a check;
- the first response segment dropped: the first-byte time holds the resend;
- every other DNS query dropped: dns_done holds the resolver's 1 s timeout;
- 10% random loss each way: retransmissions counted, UDP loss between 10% and 32%;
- packets over 1,400 bytes dropped: the UDP check and the neighbour's UDP path fail at `mtu`, HTTP
  unaffected, and the mesh names the path (`path_mtu client->target`).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e import netns
from tests.e2e.services import Process, wait_port

PORT = 8080
TABLE = "loss"


@dataclass
class LossNet:
    bridge: netns.Bridge
    client: netns.Namespace
    target: netns.Namespace
    workdir: Path

    @property
    def target_ip(self) -> str:
        return self.target.address

    def curl(self, url: str, field: str, times: int = 3) -> list[float]:
        # -4: glibc asks A and AAAA at once otherwise, and the DNS rule would drop one of each pair.
        argv = self.client.exec_argv(
            "curl", "-4", "-s", "-o", "/dev/null", "--max-time", "10", "-w", f"%{{{field}}}", url
        )
        return [float(netns.run(*argv, timeout=15)) for _ in range(times)]

    @contextmanager
    def rule(self, where: netns.Namespace, chain: str, *statements: str) -> Iterator[None]:
        hook = "input" if chain == "input" else "output"
        body = "\n".join(f"    {s}" for s in statements)
        head = f"table inet {TABLE} {{\n  chain {chain} {{\n    type filter hook {hook} priority 0;\n"
        where.nft(f"{head}{body}\n  }}\n}}\n")
        try:
            yield
        finally:
            where.delete_table("inet", TABLE)

    @contextmanager
    def probe(
        self, checks: str, interval: str = "1500ms", neighbours: tuple[str, ...] = (), **more: str
    ) -> Iterator[Probe]:
        """The client probe; with `neighbours` (NODE=IP) it has that neighbourhood, as a pod
        that discovery gave it, so it checks them as paths and its /mesh.json asks them."""
        log = self.workdir / f"probe-{time.monotonic_ns()}.log"
        env = {
            "KUBENURSE_HTTP_PORT": str(PORT),
            "KUBENURSE_CHECK_INTERVAL": interval,
            "KUBENURSE_CHECK_TIMEOUT": "5s",
            "KUBENURSE_CHECK_CONNECT_TIMEOUT": "5s",
            "KUBENURSE_EXTRA_CHECKS": checks,
            "KUBENURSE_LOG_LEVEL": "warning",
            "KUBENURSE_SHUTDOWN_DURATION": "0s",  # no load balancer to drain: stop at once
            "POD_NAME": "client",
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            **more,
        }
        argv = [sys.executable, "-m", "kubenurse_sandbox.fixed", *neighbours] if neighbours else [
            sys.executable, "-m", "probe"]
        process = Process("client probe", self.client.exec_argv(*argv), log, env)
        try:
            wait_port(self.client.address, PORT, process=process)
            yield Probe(f"http://{self.client.address}:{PORT}", process)
        finally:
            process.stop()


@dataclass
class Probe:
    base: str
    process: Process

    def get(self, path: str) -> str:
        """The body, whatever the status (/alive answers 500 while a check fails)."""
        try:
            with urllib.request.urlopen(self.base + path, timeout=5) as resp:
                return resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.read().decode()

    def values(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        out = {}
        for family in text_string_to_metric_families(self.get("/metrics")):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def wait_for(self, done: Callable[[dict], bool], what: str, timeout: float = 30.0) -> dict:
        """Metrics once `done(metrics)`."""
        deadline = time.monotonic() + timeout
        while not done(values := self.values()):
            assert self.process.running, self.process.tail()
            assert time.monotonic() < deadline, f"{what} not within {timeout} s\n{self.process.tail()}"
            time.sleep(0.2)
        return values

    def wait_verdict(self, kind: str, timeout: float = 30.0) -> list[dict]:
        """/mesh.json's verdicts once one of `kind` is among them."""
        deadline = time.monotonic() + timeout
        while True:
            verdicts = json.loads(self.get("/mesh.json"))["verdicts"]
            if any(v["kind"] == kind for v in verdicts):
                return verdicts
            assert self.process.running, self.process.tail()
            assert time.monotonic() < deadline, f"no {kind} verdict within {timeout} s: {verdicts}"
            time.sleep(0.5)

    def wait_checks(self, check_type: str, n: int, timeout: float = 30.0) -> dict[tuple[str, frozenset], float]:
        """Metrics once `check_type` has been checked `n` times (any outcome)."""
        deadline = time.monotonic() + timeout
        while True:
            values = self.values()
            done = sum(v for (name, labels), v in values.items()
                       if name == "kubenurse_httpclient_requests_total" and ("type", check_type) in labels)
            done = done or sum(v for (name, labels), v in values.items()
                               if name == "kubenurse_udp_packets_sent_total" and ("type", check_type) in labels)
            if done >= n:
                return values
            assert self.process.running, self.process.tail()
            assert time.monotonic() < deadline, f"{check_type}: {done} of {n} checks\n{self.process.tail()}"
            time.sleep(0.2)


def value(values: dict, name: str, **labels: str) -> float:
    return values.get((name, frozenset(labels.items())), 0.0)


def mean(values: dict, event: str, check_type: str) -> float:
    name = "kubenurse_httpclient_trace_request_duration_seconds"
    count = value(values, f"{name}_count", event=event, type=check_type)
    assert count, f"no {event} for {check_type}"
    return value(values, f"{name}_sum", event=event, type=check_type) / count


def checks(values: dict, check_type: str) -> float:
    return sum(v for (name, labels), v in values.items()
               if name == "kubenurse_httpclient_requests_total" and ("type", check_type) in labels)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LossNet]:
    reason = netns.unsupported_reason()
    for program in ("dnsmasq", "curl"):
        if not reason and not netns.which(program):
            reason = f"{program} is not installed"
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    netns.sweep_leftovers()
    workdir = tmp_path_factory.mktemp("loss")
    bridge = netns.Bridge.create(netns.free_subnet())
    made: list[netns.Namespace] = []
    processes: list[Process] = []
    try:
        bridge.add_address(1)
        target_ip = bridge.host(3)
        client = netns.Namespace.create("lossc", 2, bridge, bridge.host(2), target_ip)
        made.append(client)
        # Two tries of one second each, so a dropped query is answered by the second.
        (netns.NETNS_ETC / client.name / "resolv.conf").write_text(
            f"nameserver {target_ip}\noptions timeout:1 attempts:2\n"
        )
        target = netns.Namespace.create("losst", 3, bridge, target_ip, target_ip)
        made.append(target)
        target_env = {"KUBENURSE_HTTP_PORT": str(PORT), "POD_NAME": "target", "KUBENURSE_LOG_LEVEL": "warning",
                      "KUBENURSE_SHUTDOWN_DURATION": "0s"}
        processes.append(Process("target probe", target.exec_argv(sys.executable, "-m", "probe"),
                                 workdir / "target.log", target_env))
        dnsmasq = [
            netns.which("dnsmasq") or "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", f"--listen-address={target_ip}", "--bind-interfaces", "--port=53", "--user=root",
            f"--pid-file={workdir}/dnsmasq.pid", f"--host-record=target.test,{target_ip}",
        ]
        processes.append(Process("dnsmasq", target.exec_argv(*dnsmasq), workdir / "dnsmasq.log"))
        wait_port(target_ip, PORT, process=processes[0])
        wait_port(target_ip, 53, process=processes[1])
        yield LossNet(bridge, client, target, workdir)
    finally:
        for process in processes:
            process.stop()
        for ns in made:
            ns.delete()
        bridge.delete()


def syn_drop(port: int) -> str:
    return f"tcp dport {port} tcp flags & (syn|ack) == syn numgen inc mod 2 == 0 drop"


def test_resent_syn_is_in_connect_and_duration(net: LossNet) -> None:
    url = f"http://{net.target_ip}:{PORT}/alwayshappy"
    with net.rule(net.target, "input", syn_drop(PORT), syn_drop(53)):
        curl = statistics.fmean(net.curl(url, "time_connect"))
        assert curl > 0.9, curl  # the rule works: the kernel resent the SYN after 1 s
        with net.probe(f"web:{url}|dnstcp:tcp://{net.target_ip}:53") as probe:
            values = probe.wait_checks("web", 3)
            values = probe.wait_checks("dnstcp", 3)
    for check_type in ("web", "dnstcp"):
        connect = mean(values, "connect_done", check_type) - mean(values, "connect_start", check_type)
        assert abs(connect - curl) <= 0.1 * curl, (check_type, connect, curl)
        n = checks(values, check_type)
        assert value(values, "kubenurse_tcp_retransmits_total", type=check_type) == n, (check_type, n)
    duration = value(values, "kubenurse_httpclient_request_duration_seconds_sum", type="web") / value(
        values, "kubenurse_httpclient_request_duration_seconds_count", type="web")
    assert duration >= 0.9 * curl, duration


def test_resent_response_is_in_the_first_byte(net: LossNet) -> None:
    url = f"http://{net.target_ip}:{PORT}/alwayshappy"
    clean = statistics.fmean(net.curl(url, "time_starttransfer"))
    # The answer's first segment (it starts with the status line) is lost once: the target resends.
    status_line = "@ih,0,64 0x485454502f312e31"  # "HTTP/1.1" at the start of the TCP payload
    with net.rule(net.client, "input", f"tcp sport {PORT} {status_line} numgen inc mod 2 == 0 drop"):
        curl = statistics.fmean(net.curl(url, "time_starttransfer"))
        assert curl > clean + 0.005, (clean, curl)
        # Kept alive, as curl's connection is: closing at once would send a FIN right behind
        # the lost segment, and the target would resend at the FIN's SACK (a real 2 ms).
        with net.probe(f"web:{url}", KUBENURSE_REUSE_CONNECTIONS="true") as probe:
            values = probe.wait_checks("web", 3)
    first_byte = mean(values, "got_first_resp_byte", "web")
    assert abs(first_byte - curl) <= 0.1 * curl + 0.005, (first_byte, curl)


def test_resent_dns_query_is_in_dns_done(net: LossNet) -> None:
    with net.rule(net.target, "input", "udp dport 53 numgen inc mod 2 == 0 drop"):
        curl = statistics.fmean(net.curl(f"http://target.test:{PORT}/alwayshappy", "time_namelookup"))
        assert curl > 0.9, curl
        with net.probe("name:dns://target.test") as probe:
            values = probe.wait_checks("name", 3)
    dns_done = mean(values, "dns_done", "name")
    assert abs(dns_done - curl) <= 0.1 * curl, (dns_done, curl)


def udp_total(values: dict, name: str) -> float:
    """A UDP counter summed over the echo checks (echo0, echo1, ...)."""
    return sum(v for (n, labels), v in values.items()
               if n == name and any(k == "type" and t.startswith("echo") for k, t in labels))


def test_random_loss_is_counted(net: LossNet) -> None:
    # Four trains a round side by side (a lossy train waits the check timeout for its
    # stragglers): enough datagrams for a fair share within seconds.
    echoes = "|".join(f"echo{i}:udp://{net.target_ip}:{PORT}" for i in range(4))
    webs = "|".join(f"web{i}:http://{net.target_ip}:{PORT}/alwayshappy" for i in range(2))
    checks_ = f"{webs}|{echoes}"
    # Long enough for a resent SYN (1 s) to be seen and counted.
    settings = {"KUBENURSE_CHECK_TIMEOUT": "1500ms", "KUBENURSE_CHECK_CONNECT_TIMEOUT": "1500ms"}
    sent_total, lost_total = "kubenurse_udp_packets_sent_total", "kubenurse_udp_packets_lost_total"
    with net.probe(checks_, interval="500ms", **settings) as probe:
        clean = probe.wait_for(lambda v: udp_total(v, sent_total) >= 50, "50 datagrams")
    assert udp_total(clean, lost_total) == 0
    lossy = "numgen random mod 100 < 10 drop"
    with net.rule(net.target, "input", lossy), net.rule(net.target, "output", lossy), \
            net.probe(checks_, interval="500ms", **settings) as probe:
        values = probe.wait_for(lambda v: udp_total(v, sent_total) >= 240, "240 datagrams", timeout=60)
        alive = json.loads(probe.get("/alive"))
    sent, lost = udp_total(values, sent_total), udp_total(values, lost_total)
    assert 0.10 <= lost / sent <= 0.32, (lost, sent)  # 1 - 0.9 * 0.9 = 19% of the round trips
    resent = sum(value(values, "kubenurse_tcp_retransmits_total", type=f"web{i}") for i in range(2))
    assert resent > 0
    assert "echo0" in alive["last_check_result"]


def test_big_packets_dropped_is_mtu(net: LossNet) -> None:
    checks_ = f"web:http://{net.target_ip}:{PORT}/alwayshappy|echo:udp://{net.target_ip}:{PORT}"
    # A train missing its full-size datagrams waits the check timeout for them: 1.5 s, not 5.
    settings = {"KUBENURSE_CHECK_TIMEOUT": "1500ms", "KUBENURSE_CHECK_CONNECT_TIMEOUT": "1500ms"}
    with (
        net.rule(net.target, "input", "meta length > 1400 drop"),
        net.probe(checks_, neighbours=(f"target={net.target_ip}",), NODE_NAME="client", **settings) as probe,
    ):
        values = probe.wait_checks("echo", 20)
        probe.wait_checks("web", 2)
        alive = json.loads(probe.get("/alive"))
        values = probe.values()
        verdicts = probe.wait_verdict("path_mtu")
    assert value(values, "kubenurse_errors_total", event="mtu", type="echo") >= 1
    assert alive["last_check_result"]["echo"].startswith("mtu: "), alive["last_check_result"]
    assert alive["last_check_result"]["web"] == "ok"
    assert value(values, "kubenurse_httpclient_requests_total", code="200", type="web") >= 2
    # The neighbour's path: its UDP train fails at mtu, its HTTP check does not, and the mesh
    # names the path (one probe's word: a path verdict, not the node's).
    assert alive["udp_paths"]["path_target"].startswith("mtu: "), alive["udp_paths"]
    assert alive["last_check_result"]["path_target"] == "ok", alive["last_check_result"]
    mtu = [v for v in verdicts if v["kind"] == "path_mtu"]
    assert [v["subject"] for v in mtu] == ["client->target"], verdicts
    assert "MTU" in mtu[0]["summary"] and mtu[0]["evidence"], mtu
