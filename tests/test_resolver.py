"""A DNS server that swallows queries must not starve the probe: name lookups run on threads
of their own, so /metrics (rendered on the loop's shared executor) and the shutdown do not
wait for them.

The test runs a real probe in a private network and mount namespace whose resolv.conf points
at a UDP socket that reads every query and never answers: glibc's getaddrinfo then waits out
its full timeouts, as it does when a cluster's DNS is black-holed. Nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from probe.checks.resolver import TimedResolver

IN_CI = os.environ.get("CI") == "true"

INNER = r'''
import json, os, signal, socket, subprocess, sys, threading, time, urllib.request

swallower = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
swallower.bind(("127.0.0.1", 53))
def swallow():
    while True:
        swallower.recvfrom(4096)  # read, never answer
threading.Thread(target=swallow, daemon=True).start()

port = 18080
env = {**os.environ,
       "KUBENURSE_LISTEN_HOST": "127.0.0.1", "KUBENURSE_HTTP_PORT": str(port),
       "KUBENURSE_CHECK_INTERVAL": "200ms", "KUBENURSE_SHUTDOWN_DURATION": "1s",
       "KUBENURSE_EXTRA_CHECKS": "|".join(f"bh{i}:http://blackholed-{i}.test:9/" for i in range(12))}
probe = subprocess.Popen([sys.executable, "-m", "probe"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
base = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + 20
while True:
    try:
        urllib.request.urlopen(base + "/alwayshappy", timeout=2).read()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise SystemExit("probe did not start")
        time.sleep(0.1)
time.sleep(3.0)  # every lookup is now stuck in glibc's timeouts, and more keep coming
scrapes = []
for _ in range(5):
    started = time.monotonic()
    urllib.request.urlopen(base + "/metrics", timeout=30).read()
    scrapes.append(time.monotonic() - started)
    time.sleep(0.2)
started = time.monotonic()
probe.send_signal(signal.SIGTERM)
try:
    probe.wait(timeout=40)
except subprocess.TimeoutExpired:
    probe.kill()
print(json.dumps({"scrapes": scrapes, "exit_seconds": time.monotonic() - started, "rc": probe.returncode}))
'''


def test_lookups_do_not_use_the_loops_shared_executor() -> None:
    # The mechanism, without root: aiohttp's default resolver would run getaddrinfo through
    # loop.run_in_executor(None, ...), the pool /metrics and the shutdown flush use.
    import asyncio

    async def resolve() -> None:
        loop = asyncio.get_running_loop()
        used: list[object] = []
        original = loop.run_in_executor

        def spy(executor: object, *args: object) -> object:
            used.append(executor)
            return original(executor, *args)  # type: ignore[arg-type]

        loop.run_in_executor = spy  # type: ignore[method-assign]
        hosts = await TimedResolver().resolve("localhost", 80)
        assert hosts and all(h["port"] == 80 for h in hosts)
        assert None not in used

    asyncio.run(resolve())


@pytest.mark.skipif(
    not IN_CI and (os.geteuid() != 0 or not shutil.which("unshare")),
    reason="needs root (and unshare) for private network and mount namespaces",
)
def test_a_black_holed_dns_server_starves_neither_metrics_nor_the_shutdown(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:5 attempts:2\n")
    inner = tmp_path / "inner.py"
    inner.write_text(INNER)
    command = (
        f"mount --bind {resolv} /etc/resolv.conf && ip link set lo up && "
        f"exec {sys.executable} {inner}"
    )
    out = subprocess.run(
        ["unshare", "-m", "-n", "sh", "-c", command],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # Before: every scrape waited ~5 s behind stuck lookups on the shared executor.
    assert max(result["scrapes"]) < 1.0, result
    # Grace (1 s) plus a second, whatever lookups are still stuck in glibc.
    assert result["exit_seconds"] < 1.0 + 1.0 + 0.5, result
    assert result["rc"] == 0, result
