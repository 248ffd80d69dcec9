"""DNS and TCP checks: how far the reported figure is from the truth, with kernel timestamps
and with event-loop marks, as the number of checks running at once grows.

- DNS: a nameserver in a process of its own answers every A query DELAY after the kernel
  received it (bench.dns_delay_server); the probe's `dns_done` minus DELAY is its error.
  The server's own lateness (answers sent after their due time: its process was not
  scheduled in time) is shown apart: that part of the error is not the probe's.
- TCP: connect to a loopback listener; the true handshake is tens of microseconds, so the
  reported `connect_done` is almost all error.

Each figure is measured twice in the same run, with the same code: once as it ships (kernel
receive timestamps, TCP_INFO RTT) and once with those two sources switched off, which makes
the checkers fall back to the event loop's marks, as they do on a kernel without them. K
checks start together, as a round starts them.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

from bench.core import Row, fetch, free_port, percentile, running
from probe import names
from probe.checks import kernel
from probe.checks.pipeline import Pipeline
from probe.checks.result import Target
from probe.checkurls import parse_dns_url, parse_tcp_url
from probe.settings import Settings

DELAY = 0.020
CONCURRENCY = (1, 15, 30)
ROUNDS = 40


@contextmanager
def dns_delay_server() -> Iterator[int]:
    port = free_port()
    argv = [sys.executable, "-m", "bench.dns_delay_server", str(port), str(DELAY)]
    # Ready once it answers its TCP health port (port + 0 over TCP: it listens on both).
    with running(argv, f"http://127.0.0.1:{port}/ready"):
        yield port


async def errors_of(check: Pipeline, target: Target, event: str, k: int, truth: float) -> list[float]:
    errors: list[float] = []
    for _ in range(3):  # warm up
        await check.check(target)
    for _ in range(ROUNDS):
        results = await asyncio.gather(*(check.check(target) for _ in range(k)))
        for result in results:
            assert result.ok, result.summary
            errors.append(result.events[event] - truth)
    return errors


@contextmanager
def loop_marks() -> Iterator[None]:
    """Switch the kernel sources off: the checkers then use event-loop time."""
    with (
        mock.patch.object(kernel, "rx_timestamp_ns", lambda _anc: None),
        mock.patch.object(kernel, "tcp_info", lambda _sock: None),
    ):
        yield


def summary(errors: list[float]) -> str:
    return f"mean {statistics.fmean(errors) * 1e3:.2f} ms, p99 {percentile(errors, 0.99) * 1e3:.2f} ms"


async def run_async() -> list[Row]:
    rows: list[Row] = []
    caps = kernel.capabilities()
    rows.append(("kinds: timing source here", caps.describe()))
    settings = Settings()
    with dns_delay_server() as port:
        dns_url = f"dns://127.0.0.1:{port}/bench.test"
        dns_target = Target("bench", dns_url, parse_dns_url(dns_url))
        lateness = f"http://127.0.0.1:{port}/lateness"
        for k in CONCURRENCY:
            fetch(lateness)
            kernel_errors = await errors_of(Pipeline(settings), dns_target, names.DNS_DONE, k, DELAY)
            late = json.loads(fetch(lateness))
            with loop_marks():
                loop_errors = await errors_of(Pipeline(settings), dns_target, names.DNS_DONE, k, DELAY)
            rows.append((f"dns_done - true {DELAY * 1e3:.0f} ms, K={k}, kernel", summary(kernel_errors)))
            rows.append((f"dns_done - true {DELAY * 1e3:.0f} ms, K={k}, loop marks", summary(loop_errors)))
            rows.append((f"dns server's own lateness, K={k}", summary(late)))
    server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0, backlog=1024)
    async with server:
        tcp_port = server.sockets[0].getsockname()[1]
        tcp_url = f"tcp://127.0.0.1:{tcp_port}"
        tcp_target = Target("bench", tcp_url, parse_tcp_url(tcp_url))
        for k in CONCURRENCY:
            kernel_errors = await errors_of(Pipeline(settings), tcp_target, names.CONNECT_DONE, k, 0.0)
            with loop_marks():
                loop_errors = await errors_of(Pipeline(settings), tcp_target, names.CONNECT_DONE, k, 0.0)
            rows.append((f"tcp connect_done (true ~0.03 ms), K={k}, kernel", summary(kernel_errors)))
            rows.append((f"tcp connect_done (true ~0.03 ms), K={k}, loop marks", summary(loop_errors)))
    return rows


def run() -> list[Row]:
    return asyncio.run(run_async())


if __name__ == "__main__":
    for label, value in run():
        print(f"{label}: {value}")
