"""Name resolution for the checks: getaddrinfo, as the pod's applications resolve, timed
inside the call and kept off the event loop's shared executor.

aiohttp's default resolver runs getaddrinfo on the loop's default executor, which the
server's `/metrics` and the shutdown share: a black-holed DNS server (5 s per attempt)
then stalls both. Here every lookup runs on a daemon thread of its own, at most
MAX_LOOKUPS awaited at once (a lookup whose check gave up keeps its thread until glibc
returns, and no more): a stuck lookup holds one thread and nothing else, and never holds
up the process's exit. The DNS phase is timed in that thread around the call itself, so time a
lookup waited for a free thread or for the loop is not DNS time.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult

from probe import names
from probe.checks import httptrace

#: Lookups awaited at once; more wait (untimed) for a free slot.
MAX_LOOKUPS = 8
_NUMERIC = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
_Infos = list[tuple[Any, Any, int, str, Any]]


class TimedResolver(AbstractResolver):
    def __init__(self, max_lookups: int = MAX_LOOKUPS) -> None:
        self._slots = asyncio.Semaphore(max_lookups)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        timeline = httptrace.current()
        async with self._slots:
            infos, started, done = await _in_thread(host, port, family)
        if timeline is not None:
            timeline.put(names.DNS_START, started)
            timeline.put(names.DNS_DONE, done, done - started)
        hosts: list[ResolveResult] = []
        for fam, _, proto, _, address in infos:
            if fam == socket.AF_INET6 and len(address) < 3:
                continue  # no IPv6 in this Python build
            hosts.append(
                ResolveResult(
                    hostname=host, host=address[0], port=address[1], family=fam, proto=proto, flags=_NUMERIC
                )
            )
        return hosts

    async def close(self) -> None:
        return None


async def _in_thread(host: str, port: int, family: int) -> tuple[_Infos, int, int]:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[tuple[_Infos, int, int]] = loop.create_future()

    def deliver(outcome: tuple[_Infos, int, int] | BaseException) -> None:
        if future.done():
            return  # the check gave up (timeout) meanwhile
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def lookup() -> None:
        outcome: tuple[_Infos, int, int] | BaseException
        try:
            started = time.perf_counter_ns()
            infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG)
            outcome = (infos, started, time.perf_counter_ns())
        except BaseException as e:  # delivered to the awaiting check
            outcome = e
        with contextlib.suppress(RuntimeError):  # the loop closed while the lookup hung
            loop.call_soon_threadsafe(deliver, outcome)

    threading.Thread(target=lookup, name="kubenurse-dns", daemon=True).start()
    return await future
