"""Memory of which neighbours checked us lately (kubenurse_neighbourhood_incoming_checks)."""

from __future__ import annotations

import time
from collections.abc import Callable

ORIGIN_MEMORY_SECONDS = 60.0
# A hostile client could send a new origin per request; the map must stay bounded.
MAX_ORIGINS = 10_000


class IncomingChecks:
    """Distinct `KUBENURSE-NEIGHBOUR-ORIGIN` values seen in the last 60 s."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window: float = ORIGIN_MEMORY_SECONDS) -> None:
        self._clock = clock
        self._window = window
        self._seen: dict[str, float] = {}

    def saw(self, origin: str) -> None:
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
