"""A list+watch cache (a "reflector") of one Kubernetes collection, decoded to small records.

One paginated list, then one long watch after another, each resuming from the last
resource version seen (events and bookmarks move it), so the API server serves a few
bytes per change instead of the whole collection per interval. A 410 Gone (an ERROR
event or status) means the version left the server's history: list again, consistently.
Errors reconnect with exponential backoff and jitter; every request has a client-side
deadline, and a watch that stays silent past `idle_timeout` (bookmarks arrive about once a
minute) is treated as a dead connection.

Only `decode(object) -> record` sees the JSON, one object at a time: a list page is walked
item by item (no tree of 500 pods in memory at once) and each watch line is one object.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import aiohttp

from probe.discovery.kube import ApiError, ConfigError, KubeClient

log = logging.getLogger("probe.discovery")


class Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)


@dataclass(frozen=True)
class Timing:
    """Deadlines and pacing of the API conversation (production defaults)."""

    #: One list page or GET, end to end.
    request_timeout: float = 30.0
    connect_timeout: float = 10.0
    #: Server-side watch length (timeoutSeconds), drawn from [watch_seconds, 2*watch_seconds)
    #: so thousands of probes do not reconnect in step.
    watch_seconds: float = 300.0
    #: The client gives up on a watch this long after its server-side end.
    watch_grace: float = 30.0
    #: No byte (event or bookmark) for this long: the connection is dead.
    idle_timeout: float = 150.0
    backoff_initial: float = 0.8
    backoff_max: float = 30.0
    page_size: int = 500
    #: start() waits this long for the first lists before the first round.
    initial_sync: float = 3.0


class Backoff:
    """Exponential delays with jitter: initial * 2^n capped at max, each scaled by [0.5, 1)."""

    def __init__(self, initial: float, maximum: float, rng: random.Random) -> None:
        self._initial, self._max, self._rng = initial, maximum, rng
        self._attempt = 0

    def next(self) -> float:
        delay = min(self._max, self._initial * (2**self._attempt))
        self._attempt = min(self._attempt + 1, 32)
        return delay * (0.5 + self._rng.random() / 2)

    def reset(self) -> None:
        self._attempt = 0


class _QuietRetry(Exception):
    """The watch ended at once without a single line: retry after a backoff, no alarm."""


_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _skip_ws(text: str, i: int) -> int:
    match = _WS.match(text, i)
    return match.end() if match else i


def iter_list(text: str) -> Iterator[tuple[str | None, Any]]:
    """The members of a Kubernetes List document one at a time: (key, value) for the
    top-level members and (None, item) for each element of `items`, so a caller never
    holds more than one decoded item."""
    decode = _DECODER.raw_decode

    def expect(i: int, char: str) -> int:
        if text[i : i + 1] != char:
            raise ValueError(f"expected {char!r} at offset {i} of a list response")
        return _skip_ws(text, i + 1)

    i = expect(_skip_ws(text, 0), "{")
    if text[i : i + 1] == "}":
        return
    while True:
        key, i = decode(text, i)
        if not isinstance(key, str):
            raise ValueError("list response: member name is not a string")
        i = expect(_skip_ws(text, i), ":")
        if key == "items" and text[i : i + 1] == "[":
            i = _skip_ws(text, i + 1)
            more = text[i : i + 1] != "]"
            while more:
                item, i = decode(text, i)
                yield None, item
                i = _skip_ws(text, i)
                if text[i : i + 1] == ",":
                    i = _skip_ws(text, i + 1)
                elif text[i : i + 1] == "]":
                    more = False
                else:
                    raise ValueError(f"expected ',' or ']' at offset {i} of a list response")
            i += 1
        else:
            value, i = decode(text, i)
            yield key, value
        i = _skip_ws(text, i)
        if text[i : i + 1] == "}":
            return
        i = expect(i, ",")


def describe(error: BaseException) -> str:
    """One line for /alive and the logs."""
    if isinstance(error, TimeoutError | aiohttp.ServerTimeoutError):
        return "timed out"
    if isinstance(error, ApiError | ConfigError):
        return str(error)
    if isinstance(error, aiohttp.ClientConnectorError):
        reason = error.os_error.strerror or str(error.os_error) or type(error.os_error).__name__
        return f"cannot connect to {error.host}:{error.port}: {reason}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


class Reflector(Generic[T]):
    """The cached records of one collection (e.g. the pods of a namespace matching a label
    selector), kept current by list+watch. Read `items` any time; the revisions tell
    readers whether anything changed since they last looked."""

    def __init__(
        self,
        client: KubeClient,
        kind: str,
        path: str,
        decode: Callable[[Mapping[str, Any]], T],
        *,
        label_selector: str = "",
        field_selector: str = "",
        timing: Timing = Timing(),
        rng: random.Random | None = None,
    ) -> None:
        self.kind = kind
        self._client = client
        self._path = path
        self._decode = decode
        self._selectors = {
            k: v for k, v in (("labelSelector", label_selector), ("fieldSelector", field_selector)) if v
        }
        self._timing = timing
        self._rng = rng or random.Random()
        self._backoff = Backoff(timing.backoff_initial, timing.backoff_max, self._rng)
        self.items: dict[str, T] = {}
        #: The last version seen; None: list (again) before watching.
        self.resource_version: str | None = None
        # First list: "0" lets the server answer from its watch cache. After a 410, ""
        # asks for a consistent read so the cache cannot step back in time.
        self._list_version = "0"
        self.synced = asyncio.Event()
        #: Bumped when `items` changes (a record, not just the raw object, differs).
        self.data_revision = 0
        #: Bumped when `connected`/`error` change.
        self.status_revision = 0
        self.connected = False
        self.error: str | None = None
        #: Wall-clock time the cache was last known current (list, watch start, any line).
        self.last_sync: float | None = None
        self.disconnected_since: float | None = None  # monotonic, for the outage length
        self.disconnected_at: float | None = None  # wall clock, for /alive
        self.relists_after_gone = 0
        self._gone_in_a_row = 0

    # The loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """List and watch until cancelled."""
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                await self._watch()
            except ApiError as e:
                if e.expired:
                    self._gone(e)
                    if self._gone_in_a_row > 1:  # 410 right after a fresh list: do not spin
                        await asyncio.sleep(self._backoff.next())
                    continue
                self._failed(e)
                await asyncio.sleep(self._backoff.next())
            except _QuietRetry:
                await asyncio.sleep(self._backoff.next())
            except (aiohttp.ClientError, TimeoutError, ValueError, ConfigError, OSError) as e:
                self._failed(e)
                await asyncio.sleep(self._backoff.next())
            except Exception as e:  # a bug or an object shaped unlike any seen: keep discovery alive
                log.exception("unexpected discovery failure", extra={"kind": self.kind})
                self._failed(e)
                await asyncio.sleep(self._backoff.next())

    async def _list(self) -> None:
        items: dict[str, T] = {}
        params = {**self._selectors, "limit": str(self._timing.page_size)}
        if self._list_version:
            params["resourceVersion"] = self._list_version
        version = ""
        while True:
            body = await self._client.get(self._path, params, timeout=self._timing.request_timeout)
            metadata = self._read_page(body.decode(), items)
            del body
            version = str(metadata.get("resourceVersion", ""))
            token = metadata.get("continue")
            if not token:
                break
            # A continued list is pinned to the first page's version by the token itself.
            params = {**self._selectors, "limit": str(self._timing.page_size), "continue": str(token)}
        if not version:
            raise ApiError(0, "BadList", f"{self.kind} list without metadata.resourceVersion")
        if items != self.items:
            self.items = items
            self.data_revision += 1
        self.resource_version = version
        self._backoff.reset()
        self._mark_connected()
        self.synced.set()
        log.debug("listed", extra={"kind": self.kind, "count": len(items), "resource_version": version})

    def _read_page(self, text: str, into: dict[str, T]) -> Mapping[str, Any]:
        metadata: Mapping[str, Any] = {}
        for key, value in iter_list(text):
            if key is None:
                record = self._decode(value)
                into[record.name] = record
            elif key == "metadata" and isinstance(value, dict):
                metadata = value
        return metadata

    async def _watch(self) -> None:
        seconds = int(self._timing.watch_seconds * (1 + self._rng.random()))
        params = {
            **self._selectors,
            "watch": "true",
            "allowWatchBookmarks": "true",
            "resourceVersion": self.resource_version or "",
            "timeoutSeconds": str(max(seconds, 1)),
        }
        started, lines = time.monotonic(), 0
        async with self._client.stream(
            self._path, params, total=seconds + self._timing.watch_grace, idle=self._timing.idle_timeout
        ) as stream:
            self._mark_connected()
            async for line in stream:
                self._apply(json.loads(line))
                lines += 1
                if lines == 1:
                    self._backoff.reset()
                    self._gone_in_a_row = 0
        if not lines and time.monotonic() - started < 1.0:
            raise _QuietRetry
        self._backoff.reset()

    def _apply(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            raise ApiError(int(obj.get("code") or 0), str(obj.get("reason", "")), str(obj.get("message", "")))
        metadata = obj.get("metadata") or {}
        self.last_sync = time.time()
        if kind in ("ADDED", "MODIFIED"):
            record = self._decode(obj)
            if self.items.get(record.name) != record:
                self.items[record.name] = record
                self.data_revision += 1
        elif kind == "DELETED":
            if self.items.pop(str(metadata.get("name", "")), None) is not None:
                self.data_revision += 1
        elif kind != "BOOKMARK":
            raise ApiError(0, "BadEvent", f"unknown watch event type {kind!r}")
        if version := metadata.get("resourceVersion"):
            self.resource_version = str(version)

    # Status -----------------------------------------------------------------------------

    def _mark_connected(self) -> None:
        self.last_sync = time.time()
        if not self.connected:
            if self.disconnected_since is not None:
                log.info(
                    "API server reachable again",
                    extra={"kind": self.kind, "outage_seconds": round(time.monotonic() - self.disconnected_since, 3)},
                )
            self.connected, self.error = True, None
            self.disconnected_since = self.disconnected_at = None
            self.status_revision += 1

    def _failed(self, error: BaseException) -> None:
        text = f"{self.kind}: {describe(error)}"
        if self.disconnected_since is None:
            self.disconnected_since, self.disconnected_at = time.monotonic(), time.time()
        if self.connected or text != self.error:  # log changes, not every retry
            log.warning("discovery request failed", extra={"kind": self.kind, "error": text})
            self.connected, self.error = False, text
            self.status_revision += 1

    def _gone(self, error: ApiError) -> None:
        log.info("resource version expired; listing again", extra={"kind": self.kind, "error": str(error)})
        self.relists_after_gone += 1
        self._gone_in_a_row += 1
        self.resource_version = None
        self._list_version = ""
