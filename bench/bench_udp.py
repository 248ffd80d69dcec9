"""What the UDP train costs: a probe with ten neighbours' HTTP checks, with and without a UDP
train to each, against a real target probe (its UDP echo). CPU per round and RSS, in one run.

    python -m bench.bench_udp
"""

from __future__ import annotations

import time

from bench.core import cpu_seconds, fetch, free_port, probe_process, scrape_value

Row = tuple[str, str]
NEIGHBOURS = 10
INTERVAL = 0.5  # seconds: faster than the default 5 s, for more rounds in a short run


def cost(target_port: int, udp: bool, seconds: float = 15.0) -> tuple[float, float, float]:
    """(CPU ms per round, RSS MB, rounds) of a probe checking the target as ten neighbours."""
    url = f"http://127.0.0.1:{target_port}"
    checks = [f"n{i}:{url}/alwayshappy" for i in range(NEIGHBOURS)]
    if udp:
        checks += [f"u{i}:udp://127.0.0.1:{target_port}" for i in range(NEIGHBOURS)]
    port = free_port()
    env = {"KUBENURSE_CHECK_INTERVAL": f"{int(INTERVAL * 1000)}ms"}
    with probe_process(port, "|".join(checks), env) as proc:
        time.sleep(3.0)
        text = fetch(f"http://127.0.0.1:{port}/metrics")
        rounds0 = scrape_value(text, "kubenurse_httpclient_requests_total") / NEIGHBOURS
        cpu0 = cpu_seconds(proc.pid)
        time.sleep(seconds)
        text = fetch(f"http://127.0.0.1:{port}/metrics")
        rounds1 = scrape_value(text, "kubenurse_httpclient_requests_total") / NEIGHBOURS
        cpu1 = cpu_seconds(proc.pid)
        rss = scrape_value(text, "process_resident_memory_bytes") / 1e6
    rounds = rounds1 - rounds0
    return (cpu1 - cpu0) / rounds * 1000, rss, rounds


def run() -> list[Row]:
    target = free_port()
    with probe_process(target, "", {"KUBENURSE_CHECK_INTERVAL": "10s"}):
        off_cpu, off_rss, off_rounds = cost(target, udp=False)
        on_cpu, on_rss, on_rounds = cost(target, udp=True)
    return [
        ("UDP train off: CPU ms per round (10 neighbours)", f"{off_cpu:.2f}  ({off_rounds:.0f} rounds)"),
        ("UDP train on: CPU ms per round (10 neighbours)", f"{on_cpu:.2f}  ({on_rounds:.0f} rounds)"),
        ("UDP train: CPU per round on / off", f"{on_cpu / off_cpu:.2f}"),
        ("UDP train off / on: RSS (MB)", f"{off_rss:.1f} / {on_rss:.1f}"),
    ]


if __name__ == "__main__":
    for label, value in run():
        print(f"{label}: {value}")
