"""What the UDP train costs: a probe with ten neighbours, planned as in a cluster (each
neighbour's HTTP check, and with the train on its UDP train too), against a target probe
that answers them all (its HTTP server and its UDP echo). CPU per round of both processes
and the checking probe's RSS, with the train off and on, in one run.

In a cluster every probe plays both parts, checking ten neighbours and answering theirs, so
the figure that matters is both processes' CPU together; each side is shown too.

    python -m bench.bench_udp            # at the default 5 s interval, and at 0.5 s
"""

from __future__ import annotations

import os
import sys
import time

from bench.core import fetch, free_port, running, scrape_value

Row = tuple[str, str]
NEIGHBOURS = 10
TARGET_IP = "127.0.0.2"  # loopback: the ten neighbours are this one target probe


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


def cost(port: int, target_pid: int, udp: bool, interval: float, rounds: int) -> tuple[float, float, float, float]:
    """(checking probe's CPU ms per round, target's CPU ms per round, checking probe's RSS MB,
    rounds measured) over about `rounds` rounds."""
    env = _env(port, "127.0.0.1", interval, BENCH_NEIGHBOURS=str(NEIGHBOURS), BENCH_NEIGHBOUR_IP=TARGET_IP,
               KUBENURSE_CHECK_NEIGHBOURHOOD_UDP="true" if udp else "false")
    argv = [sys.executable, "-m", "bench.neighbour_probe"]
    with running(argv, f"http://127.0.0.1:{port}/alwayshappy", env=env) as proc:
        time.sleep(max(3.0, 2 * interval))  # imports done, the first rounds run
        text = fetch(f"http://127.0.0.1:{port}/metrics")
        done0 = scrape_value(text, "kubenurse_httpclient_requests_total") / NEIGHBOURS
        cpu0, target0 = cpu_seconds(proc.pid), cpu_seconds(target_pid)
        time.sleep(rounds * interval)
        text = fetch(f"http://127.0.0.1:{port}/metrics")
        done1 = scrape_value(text, "kubenurse_httpclient_requests_total") / NEIGHBOURS
        cpu1, target1 = cpu_seconds(proc.pid), cpu_seconds(target_pid)
        rss = scrape_value(text, "process_resident_memory_bytes") / 1e6
        lost = scrape_value(text, "kubenurse_udp_packets_lost_total")
        sent = scrape_value(text, "kubenurse_udp_packets_sent_total")
    if udp and (not sent or lost):  # a train that is not answered costs less: no figure then
        raise RuntimeError(f"the UDP trains lost {lost:.0f} of {sent:.0f} datagrams on loopback")
    done = done1 - done0
    return (cpu1 - cpu0) / done * 1000, (target1 - target0) / done * 1000, rss, done


def rows_at(interval: float, rounds: int) -> list[Row]:
    port = free_port()
    target_env = _env(port, TARGET_IP, 60.0)
    with running([sys.executable, "-m", "probe"], f"http://{TARGET_IP}:{port}/alwayshappy", env=target_env) as target:
        off = cost(port, target.pid, udp=False, interval=interval, rounds=rounds)
        on = cost(port, target.pid, udp=True, interval=interval, rounds=rounds)
    at = f"{interval:g} s interval"
    both_off, both_on = off[0] + off[1], on[0] + on[1]
    return [
        (f"UDP train ({at}): checking probe CPU ms per round off / on",
         f"{off[0]:.2f} / {on[0]:.2f}  ({on[0] / off[0]:.2f}x; {off[3]:.0f} / {on[3]:.0f} rounds)"),
        (f"UDP train ({at}): target CPU ms per round off / on", f"{off[1]:.2f} / {on[1]:.2f}  ({on[1] / off[1]:.2f}x)"),
        (f"UDP train ({at}): both together off / on", f"{both_off:.2f} / {both_on:.2f}  ({both_on / both_off:.2f}x)"),
        (f"UDP train ({at}): checking probe RSS (MB) off / on", f"{off[2]:.1f} / {on[2]:.1f}"),
    ]


def run() -> list[Row]:
    return [*rows_at(5.0, 16), *rows_at(0.5, 40)]


if __name__ == "__main__":
    for label, value in run():
        print(f"{label}: {value}")
