"""What the UDP train costs: a probe with ten neighbours, planned as in a cluster (each
neighbour's HTTP check, and with the train on its UDP train too), against a target probe
that answers them all (its HTTP server and its UDP echo). CPU per round of both processes
and the checking probe's RSS, with the train off and on, in one run.

In a cluster every probe plays both parts, checking ten neighbours and answering theirs, so
the figure that matters is both processes' CPU together; each side is shown too.

Off and on run side by side (two checking probes, two targets, on 127.0.0.2 and 127.0.0.3),
so whatever else the machine does at the time weighs on both alike.

    python -m bench.bench_udp            # at the default 5 s interval, and at 0.5 s
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass

from bench.core import fetch, free_port, running, scrape_value

Row = tuple[str, str]
NEIGHBOURS = 10


def cpu_seconds(pid: int) -> float:
    """CPU time of the process's threads, in nanoseconds' precision (/proc/PID/stat counts
    clock ticks, too coarse for a round's few milliseconds)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:  # the thread ended in between
            pass
    return total / 1e9


def _env(port: int, host: str, interval: float, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "KUBENURSE_LISTEN_HOST": host,
        "KUBENURSE_HTTP_PORT": str(port),
        "KUBENURSE_CHECK_INTERVAL": f"{int(interval * 1000)}ms",
        "KUBENURSE_SHUTDOWN_DURATION": "0s",
        **extra,
    }


@dataclass
class Pair:
    """A checking probe and the target probe that is its ten neighbours."""

    port: int
    address: str
    udp: bool
    checker: subprocess.Popen[bytes]
    target: subprocess.Popen[bytes]

    def read(self) -> tuple[float, float, float, float, float, float]:
        """(rounds done, checker CPU s, target CPU s, RSS MB, datagrams sent, lost)."""
        text = fetch(f"http://127.0.0.1:{self.port}/metrics")
        return (
            scrape_value(text, "kubenurse_httpclient_requests_total") / NEIGHBOURS,
            cpu_seconds(self.checker.pid),
            cpu_seconds(self.target.pid),
            scrape_value(text, "process_resident_memory_bytes") / 1e6,
            scrape_value(text, "kubenurse_udp_packets_sent_total"),
            scrape_value(text, "kubenurse_udp_packets_lost_total"),
        )


@contextmanager
def pair(address: str, udp: bool, interval: float) -> Iterator[Pair]:
    port = free_port()
    target_env = _env(port, address, 60.0)
    env = _env(port, "127.0.0.1", interval, KUBENURSE_CHECK_NEIGHBOURHOOD_UDP="true" if udp else "false")
    neighbours = [f"bench-{i}={address}" for i in range(NEIGHBOURS)]
    with (
        running([sys.executable, "-m", "probe"], f"http://{address}:{port}/alwayshappy", env=target_env) as target,
        running([sys.executable, "-m", "kubenurse_sandbox.fixed", *neighbours],
                f"http://127.0.0.1:{port}/alwayshappy", env=env) as checker,
    ):
        yield Pair(port, address, udp, checker, target)


def rows_at(interval: float, rounds: int) -> list[Row]:
    """Off and on side by side, at the same time: whatever else the machine does, both see it."""
    with pair("127.0.0.2", False, interval) as off_pair, pair("127.0.0.3", True, interval) as on_pair:
        time.sleep(max(3.0, 2 * interval))  # imports done, the first rounds run
        before = off_pair.read(), on_pair.read()
        time.sleep(rounds * interval)
        after = off_pair.read(), on_pair.read()
    (off0, on0), (off1, on1) = before, after
    if not on1[4] or on1[5]:  # a train that is not answered costs less: no figure then
        raise RuntimeError(f"the UDP trains lost {on1[5]:.0f} of {on1[4]:.0f} datagrams on loopback")

    def per_round(start: tuple[float, ...], end: tuple[float, ...], i: int) -> float:
        return (end[i] - start[i]) / (end[0] - start[0]) * 1000

    off = [per_round(off0, off1, 1), per_round(off0, off1, 2)]
    on = [per_round(on0, on1, 1), per_round(on0, on1, 2)]
    at = f"{interval:g} s interval"
    both_off, both_on = sum(off), sum(on)
    return [
        (f"UDP train ({at}): checking probe CPU ms per round off / on",
         f"{off[0]:.2f} / {on[0]:.2f}  ({on[0] / off[0]:.2f}x; {on1[0] - on0[0]:.0f} rounds)"),
        (f"UDP train ({at}): target CPU ms per round off / on", f"{off[1]:.2f} / {on[1]:.2f}  ({on[1] / off[1]:.2f}x)"),
        (f"UDP train ({at}): both together off / on", f"{both_off:.2f} / {both_on:.2f}  ({both_on / both_off:.2f}x)"),
        (f"UDP train ({at}): checking probe RSS (MB) off / on", f"{off1[3]:.1f} / {on1[3]:.1f}"),
    ]


def _children(pid: int) -> list[int]:
    """The probe processes a sandbox started (its children running `-m probe`)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if ppid == pid and b"probe" in argv:
            found.append(int(entry))
    return found


@contextmanager
def sandbox(nodes: int, interval: float, udp: bool) -> Iterator[list[int]]:
    """A sandbox of `nodes` probes, each checking every other (the default round: API server
    direct and by name over TLS to the stand-in, Service, ingress, neighbours); the probes' pids."""
    argv = [sys.executable, "-m", "probe", "sandbox", "--nodes", str(nodes), "--port", "0",
            "--neighbour-limit", str(nodes - 1), "--interval", f"{int(interval * 1000)}ms", "--no-prometheus"]
    proc = subprocess.Popen([*argv, *([] if udp else ["--no-udp"])], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(pids := _children(proc.pid)) < nodes:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the sandbox did not start its probes")
            time.sleep(0.5)
        yield pids
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _per_probe_round(
    set_up: Callable[[bool], AbstractContextManager[list[int]]], settle: float, rounds: int, interval: float
) -> tuple[float, float]:
    """CPU ms per probe per round of two set-ups, UDP off and on, side by side."""
    with set_up(False) as off, set_up(True) as on:
        time.sleep(settle)
        before = [sum(map(cpu_seconds, pids)) for pids in (off, on)]
        time.sleep(rounds * interval)
        after = [sum(map(cpu_seconds, pids)) for pids in (off, on)]
        nodes = len(on)
    off_ms, on_ms = ((b - a) / nodes / rounds * 1000 for a, b in zip(before, after, strict=True))
    return off_ms, on_ms


def deployed_rows(nodes: int = 11, interval: float = 5.0, rounds: int = 12) -> list[Row]:
    """Every probe both checks ten neighbours and answers ten, with the default round's own
    checks: CPU per probe per round, all the probes of a sandbox together, off and on side
    by side."""
    # Settled once discovery listed everyone and the first rounds ran.
    off_ms, on_ms = _per_probe_round(
        lambda udp: sandbox(nodes, interval, udp), max(20.0, 3 * interval), rounds, interval
    )
    label = f"UDP train, {nodes} sandbox probes ({nodes - 1} neighbours each, {interval:g} s)"
    return [(f"{label}: CPU ms per probe per round off / on", f"{off_ms:.2f} / {on_ms:.2f}  ({on_ms / off_ms:.2f}x)")]


@contextmanager
def mesh(nodes: int, subnet: int, interval: float, udp: bool) -> Iterator[list[int]]:
    """`nodes` probes talking directly, each checking every other (HTTP, and with `udp` the
    UDP train) and answering them: a cluster's neighbourhood without the sandbox's relays
    (its proxies forward every datagram on their own, which spreads a train out); the pids."""
    port = free_port()
    addresses = [f"127.0.{subnet}.{i + 2}" for i in range(nodes)]
    with ExitStack() as stack:
        pids = []
        for i, address in enumerate(addresses):
            env = _env(port, address, interval, NODE_NAME=f"node-{i}", KUBENURSE_SHUTDOWN_DURATION="0s",
                       KUBENURSE_CHECK_NEIGHBOURHOOD_UDP="true" if udp else "false")
            others = [f"node-{j}={other}" for j, other in enumerate(addresses) if j != i]
            proc = stack.enter_context(running([sys.executable, "-m", "kubenurse_sandbox.fixed", *others],
                                               f"http://{address}:{port}/alwayshappy", env=env))
            pids.append(proc.pid)
        yield pids


def direct_rows(nodes: int = 11, interval: float = 5.0, rounds: int = 12) -> list[Row]:
    """Every probe checks ten neighbours and answers ten, directly: CPU per probe per round,
    off and on side by side."""
    off_ms, on_ms = _per_probe_round(
        lambda udp: mesh(nodes, 2 if udp else 1, interval, udp), max(10.0, 2 * interval), rounds, interval
    )
    label = f"UDP train, {nodes} probes checking each other directly ({interval:g} s)"
    return [(f"{label}: CPU ms per probe per round off / on", f"{off_ms:.2f} / {on_ms:.2f}  ({on_ms / off_ms:.2f}x)")]


def run() -> list[Row]:
    return [*direct_rows(), *deployed_rows(), *rows_at(5.0, 16), *rows_at(0.5, 40)]


if __name__ == "__main__":
    for label, value in (direct_rows() if sys.argv[1:] == ["direct"] else run()):
        print(f"{label}: {value}")
