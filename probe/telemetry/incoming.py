"""Memory of which neighbours checked us lately (kubenurse_neighbourhood_incoming_checks).

An origin counts only when discovery knows a pod of that name and the request came from
that pod's IP: anyone can send a `KUBENURSE-NEIGHBOUR-ORIGIN` header, and 200 invented
names would otherwise push the gauge to 200 and hide a node nobody reaches.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from probe.neighbours import same_sender

ORIGIN_MEMORY_SECONDS = 60.0
# A hostile client could send a new origin per request; the map must stay bounded.
MAX_ORIGINS = 10_000


class IncomingChecks:
    """Distinct `KUBENURSE-NEIGHBOUR-ORIGIN` values seen in the last 60 s."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        window: float = ORIGIN_MEMORY_SECONDS,
        pod_ip: Callable[[str], str | None] = lambda _name: None,
    ) -> None:
        self._clock = clock
        self._window = window
        #: The IP of a pod discovery knows by that name, else None.
        self._pod_ip = pod_ip
        self._seen: dict[str, float] = {}
        #: Origins not counted (unknown pod, or sent from another address), for /alive.
        self.refused = 0

    def saw(self, origin: str, sender: str) -> bool:
        """Count `origin`, seen on a request from `sender`, if it is a known pod at that
        address; whether it was counted."""
        known = self._pod_ip(origin)
        if known is None or not same_sender(known, sender):
            self.refused += 1
            return False
        self._remember(origin)
        return True

    def _remember(self, origin: str) -> None:
        if origin in self._seen:
            del self._seen[origin]  # re-insert so the dict stays ordered by last sight
        elif len(self._seen) >= MAX_ORIGINS:
            self._prune()
            if len(self._seen) >= MAX_ORIGINS:
                del self._seen[next(iter(self._seen))]
        self._seen[origin] = self._clock()

    def _prune(self) -> None:
        horizon = self._clock() - self._window
        while self._seen:
            origin, seen_at = next(iter(self._seen.items()))
            if seen_at >= horizon:
                break
            del self._seen[origin]

    def count(self) -> int:
        self._prune()
        return len(self._seen)

    def origins(self) -> list[str]:
        self._prune()
        return sorted(self._seen)
