"""Waking the loop as seldom as the checks allow: on this probe's scale every wakeup of an
idle process costs more CPU than the Python it runs (a 2-core VM: about 0.2 ms a wakeup), so
checks that may as well wait for the same moment wait for the very same loop time."""

from __future__ import annotations

import asyncio
from contextvars import ContextVar

#: A loop time at which the loop wakes anyway (the rest of the slot starts then), set by the
#: prober in a check's own context: a check with a moment to wait for that lies within its
#: leeway waits for this one instead of waking the loop once more.
awake_at: ContextVar[float | None] = ContextVar("awake_at", default=None)


async def sleep_until(when: float) -> None:
    """Sleep until loop time `when`. Unlike asyncio.sleep, which counts from the moment it is
    called, sleepers given the same `when` wake in one turn of the loop."""
    loop = asyncio.get_running_loop()
    if when <= loop.time():
        return
    future: asyncio.Future[None] = loop.create_future()
    handle = loop.call_at(when, _release, future)
    try:
        await future
    finally:
        handle.cancel()


def _release(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class SharedDeadline:
    """Moments asked for within `slack` of each other become one: the first asked for, plus
    `slack`, which those asked for up to `slack` after it share."""

    def __init__(self, slack: float) -> None:
        self._slack = slack
        self._at = float("-inf")

    def at(self, wanted: float) -> float:
        if not wanted <= self._at <= wanted + self._slack:
            self._at = wanted + self._slack
        return self._at
