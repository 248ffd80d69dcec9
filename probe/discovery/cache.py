"""A list+watch cache (a "reflector") of one Kubernetes collection, decoded to small records.

One paginated list, then one long watch after another, each resuming from the last
resource version seen (events and bookmarks move it), so the API server serves a few
bytes per change instead of the whole collection per interval. A 410 Gone (an ERROR
event or status) means the version left the server's history: list again, consistently.
Errors, and watches that end before `healthy_after` (a proxy that closes them, a server
answering 410 right after every list), reconnect and relist only after an exponential
backoff with jitter (0.8 s doubling to 30 s, as client-go) that resets only once a watch
has stayed up for `healthy_after`: nothing the server does can make this a tight loop.
A failure streak is logged once when it starts and once when it ends, and shown in /alive.
Every request has a client-side deadline; a watch silent for `quiet_after` (bookmarks
arrive about once a minute) shows discovery stale, and past `idle_timeout` the connection
is given up as dead.

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
    #: No byte (event or bookmark) for this long: discovery is shown stale ...
    quiet_after: float = 70.0
    #: ... and for this long: the connection is dead.
    idle_timeout: float = 90.0
    backoff_initial: float = 0.8
    backoff_max: float = 30.0
    #: A watch that ended sooner than this counts as a failure (backoff); one that lasted
    #: this long resets the backoff.
    healthy_after: float = 10.0
    page_size: int = 500
    #: start() waits this long for the first lists before the first round.
    initial_sync: float = 3.0
    #: Requests per second to the API server (a token bucket; watches count), and the burst.
    qps: float = 5.0
    burst: int = 40


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


class ShortWatch(Exception):
    """A watch ended (cleanly or with 410) before it was healthy: retry only after a backoff."""

    def __init__(self, lived: float) -> None:
        super().__init__(f"watch ended after {lived:.1f} s")


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
    if isinstance(error, ApiError | ConfigError | ShortWatch):
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
        metadata_only: bool = False,
        timing: Timing = Timing(),
        rng: random.Random | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.kind = kind
        self._client = client
        self._path = path
        self._decode = decode
        self._selectors = {
            k: v for k, v in (("labelSelector", label_selector), ("fieldSelector", field_selector)) if v
        }
        # Only the metadata of each object (PartialObjectMetadata): list and watch differ.
        self._accept = (
            (_METADATA_LIST, _METADATA_WATCH) if metadata_only else ("application/json", "application/json")
        )
        self._timing = timing
        self._rng = rng or random.Random()
        self._backoff = Backoff(timing.backoff_initial, timing.backoff_max, self._rng)
        self._on_change = on_change
        self.items: dict[str, T] = {}
        #: The last version seen; None: list (again) before watching.
        self.resource_version: str | None = None
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
        #: Failures (and short watches) in a row; 0 when healthy.
        self.failures = 0
        self.last_short: str | None = None
        #: Seconds of the backoff now being waited (None: not waiting).
        self.retry_in: float | None = None
        #: Monotonic time the backoff now being waited ends (None: not waiting).
        self.retry_at: float | None = None
        #: Wall-clock time the last list or watch was started (for /alive during an outage).
        self.last_attempt_at: float | None = None
        self._last_byte = time.monotonic()
        #: Objects the decoder could not read (skipped, logged once per message).
        self.malformed = 0
        self._malformed_seen: set[str] = set()

    # The loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """List and watch until cancelled."""
        while True:
            started = time.monotonic()
            self.last_attempt_at = time.time()
            problem: BaseException | None = None
            try:
                if self.resource_version is None:
                    await self._list()
                await self._watch()
            except ApiError as e:
                if e.expired:
                    self._gone(e)  # relist at once, unless it came quickly (below)
                else:
                    problem = e
            except (aiohttp.ClientError, TimeoutError, ValueError, ConfigError, OSError) as e:
                problem = e
            except Exception as e:  # a bug or a response shaped unlike any seen: keep discovery alive
                if not self.failures:
                    log.exception("unexpected discovery failure", extra={"kind": self.kind})
                problem = e
            lived = time.monotonic() - started
            if problem is None and lived >= self._timing.healthy_after:
                continue  # a watch that served its time (or a 410 after one): resume at once
            if problem is None:
                self._short(ShortWatch(lived))
            else:
                self._failed(problem)
            self.retry_in = self._backoff.next()
            self.retry_at = time.monotonic() + self.retry_in
            try:
                await asyncio.sleep(self.retry_in)
            finally:
                self.retry_in = self.retry_at = None

    async def _list(self) -> None:
        # No resourceVersion: a consistent read, which the server pages by `limit` (with
        # "0" it answers from its watch cache and ignores `limit`: one body of every object).
        items: dict[str, T] = {}
        params = {**self._selectors, "limit": str(self._timing.page_size)}
        version = ""
        while True:
            body = await self._client.get(
                self._path, params, timeout=self._timing.request_timeout, accept=self._accept[0]
            )
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
        first = not self.synced.is_set()
        if items != self.items or first:  # the first list is news even when empty
            self.items = items
            self.synced.set()
            self._changed()
        self.resource_version = version
        self._mark_connected()
        log.debug("listed", extra={"kind": self.kind, "count": len(items), "resource_version": version})

    def _read_page(self, text: str, into: dict[str, T]) -> Mapping[str, Any]:
        metadata: Mapping[str, Any] = {}
        for key, value in iter_list(text):
            if key is None:
                if (record := self._record(value)) is not None:
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
        loop = asyncio.get_running_loop()
        async with self._client.stream(
            self._path,
            params,
            total=seconds + self._timing.watch_grace,
            idle=self._timing.idle_timeout,
            accept=self._accept[1],
        ) as stream:
            self._mark_connected()
            self._last_byte = time.monotonic()
            healthy = loop.call_later(self._timing.healthy_after, self._healthy)
            try:
                async for line in stream:
                    self._last_byte = time.monotonic()
                    self._apply(json.loads(line))
            finally:
                healthy.cancel()

    def _record(self, obj: object) -> T | None:
        """The decoded record, or None (logged once) for an object it cannot read."""
        try:
            if not isinstance(obj, dict):
                raise TypeError(f"expected an object, got {type(obj).__name__}")
            return self._decode(obj)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            self.malformed += 1
            message = f"{type(e).__name__}: {e}"[:200]
            if message not in self._malformed_seen and len(self._malformed_seen) < 100:
                self._malformed_seen.add(message)
                log.warning("skipping an object discovery cannot read", extra={"kind": self.kind, "error": message})
            return None

    def _apply(self, event: Mapping[str, Any]) -> None:
        if not isinstance(event, dict):
            raise ApiError(0, "BadEvent", "watch event is not an object")
        kind = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            obj = {}
        if kind == "ERROR":
            raise ApiError(int(obj.get("code") or 0), str(obj.get("reason", "")), str(obj.get("message", "")))
        metadata = obj.get("metadata")
        if not isinstance(metadata, dict):
            metadata = {}
        self.last_sync = time.time()
        if kind in ("ADDED", "MODIFIED"):
            record = self._record(obj)
            if record is not None and self.items.get(record.name) != record:
                self.items[record.name] = record
                self._changed()
        elif kind == "DELETED":
            if self.items.pop(str(metadata.get("name", "")), None) is not None:
                self._changed()
        elif kind != "BOOKMARK":
            raise ApiError(0, "BadEvent", f"unknown watch event type {kind!r}")
        if version := metadata.get("resourceVersion"):
            self.resource_version = str(version)

    def _changed(self) -> None:
        self.data_revision += 1
        if self._on_change is not None:
            self._on_change()

    def quiet(self, now: float) -> bool:
        """Connected, but no byte for `quiet_after`: the watch may be dead without a sign."""
        return self.connected and now - self._last_byte > self._timing.quiet_after

    # Status -----------------------------------------------------------------------------

    def _mark_connected(self) -> None:
        self.last_sync = time.time()
        if not self.connected:
            # Logged by _healthy() once the watch stays up: a flapping server logs nothing here.
            self.connected, self.error = True, None
            self.disconnected_since = self.disconnected_at = None
            self.status_revision += 1

    def _failed(self, error: BaseException) -> None:
        text = f"{self.kind}: {describe(error)}"
        if self.disconnected_since is None:
            self.disconnected_since, self.disconnected_at = time.monotonic(), time.time()
        self.failures += 1
        if self.failures == 1:  # once per streak; /alive shows the count and the latest error
            log.warning("discovery request failed; retrying with backoff", extra={"kind": self.kind, "error": text})
        else:
            log.debug("discovery request failed again", extra={"kind": self.kind, "error": text})
        if self.connected or text != self.error:
            self.connected, self.error = False, text
            self.status_revision += 1

    def _short(self, error: ShortWatch) -> None:
        """A watch ended too soon: no outage (the cache is current), but a streak to back off."""
        self.failures += 1
        if self.failures == 1:
            log.warning("discovery watch ended early; backing off", extra={"kind": self.kind, "error": str(error)})
        self.last_short = f"{self.kind}: {error}"

    def _healthy(self) -> None:
        """The watch stayed up for `healthy_after`: the streak is over."""
        if self.failures:
            log.info("discovery healthy again", extra={"kind": self.kind, "failures": self.failures})
            self.failures = 0
            self.status_revision += 1
        self._backoff.reset()

    def _gone(self, error: ApiError) -> None:
        log.info("resource version expired; listing again", extra={"kind": self.kind, "error": str(error)})
        self.relists_after_gone += 1
        self.resource_version = None


_METADATA_WATCH = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
_METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
