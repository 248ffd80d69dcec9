"""The read-only Kubernetes API the stand-in serves: /version, get, list and watch.

Errors are Kubernetes `Status` objects with the reasons and codes the real server uses, so
clients' error handling (ApiException.status, reason) sees what it would see in a cluster.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from probe.settings import GO_BOOLS

from . import objects
from .objects import KIND_NAMES, Obj
from .selectors import SelectorError, parse_field_selector, parse_label_selector
from .store import Change, Store, Stored, Watcher, object_key

VERSION_INFO = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0",
    "gitCommit": "70d3cc986aa8221cd1dfb1121852688902d3bf53",
    "gitTreeState": "clean",
    "buildDate": "2024-12-11T17:59:15Z",
    "goVersion": "go1.23.3",
    "compiler": "gc",
    "platform": "linux/amd64",
}


class ApiError(Exception):
    """Answered as a Kubernetes Status with this code and reason."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> Obj:
        status: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
        status |= {"message": self.message, "reason": self.reason}
        if self.details:
            status["details"] = self.details
        status["code"] = self.code
        return status

    def response(self) -> web.Response:
        return web.json_response(self.status(), status=self.code)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def too_old(rv: int, floor: int) -> ApiError:
    return ApiError(410, "Expired", f"too old resource version: {rv} ({floor})")


def parse_bool(query: Any, name: str) -> bool:
    value = query.get(name, "")
    if value == "":
        return False
    if value in GO_BOOLS:  # as given: Go does not trim a query value
        return GO_BOOLS[value]
    raise bad_request(f'{name}: Invalid value: "{value}": strconv.ParseBool: parsing "{value}": invalid syntax')


def _parse_int(query: Any, name: str) -> int | None:
    value = query.get(name, "")
    if value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise bad_request(f'{name}: Invalid value: "{value}": must be an integer') from None


def with_kind(kind: str, body: bytes) -> bytes:
    """An object's JSON with kind/apiVersion, as single GETs and watch events carry them."""
    return b'{"kind":"%s","apiVersion":"v1",%s' % (KIND_NAMES[kind].encode(), body[1:])


#: The metadata-only representation (`Accept: application/json;as=PartialObjectMetadata...`).
PARTIAL = "PartialObjectMetadata"
_PARTIAL_HEAD = b'{"kind":"PartialObjectMetadata","apiVersion":"meta.k8s.io/v1","metadata":'


def partial(obj: Obj) -> bytes:
    """An object as PartialObjectMetadata: its metadata only (managedFields included)."""
    return _PARTIAL_HEAD + json.dumps(obj["metadata"], separators=(",", ":")).encode() + b"}"


def event_line(kind: str, type_: str, obj: Stored, metadata_only: bool = False) -> bytes:
    body = partial(obj.obj) if metadata_only else with_kind(kind, obj.body)
    return b'{"type":"%s","object":%s}\n' % (type_.encode(), body)


def bookmark_line(kind: str, rv: int, metadata_only: bool = False) -> bytes:
    head = {"kind": PARTIAL, "apiVersion": "meta.k8s.io/v1"} if metadata_only else {
        "kind": KIND_NAMES[kind], "apiVersion": "v1"}
    meta = {**head, "metadata": {"resourceVersion": str(rv)}}
    return json.dumps({"type": "BOOKMARK", "object": meta}, separators=(",", ":")).encode() + b"\n"


def metadata_only(request: web.Request, watch: bool) -> bool:
    """Whether the client asked for PartialObjectMetadata(List), as the API server reads
    `Accept`: the first acceptable media type wins; none acceptable is 406."""
    want = PARTIAL if watch else PARTIAL + "List"
    offered = [part.strip() for part in request.headers.get("Accept", "application/json").split(",")]
    for media in offered:
        kind, *raw = (p.strip() for p in media.split(";"))
        params = dict(p.partition("=")[::2] for p in raw)
        if kind not in ("application/json", "application/*", "*/*"):
            continue
        if "as" not in params:
            return False
        if params == {"as": want, "g": "meta.k8s.io", "v": "v1"}:
            return True
    raise ApiError(
        406,
        "NotAcceptable",
        f"only the following media types are accepted: application/json, application/json;as={want};g=meta.k8s.io;v=v1",
    )


def error_line(error: ApiError) -> bytes:
    return json.dumps({"type": "ERROR", "object": error.status()}, separators=(",", ":")).encode() + b"\n"


def event_for(change: Change, accepts: Callable[[Obj], bool], metadata_only: bool = False) -> bytes | None:
    """What one watcher sees of a change, given its namespace and selectors.

    As in the API server's watch cache: an object that starts matching is ADDED, one that
    stops matching is DELETED (its previous state, stamped with the change's version).
    """
    new_ok = accepts(change.new.obj)
    if change.type != "MODIFIED":
        return event_line(change.kind, change.type, change.new, metadata_only) if new_ok else None
    old_ok = change.old is not None and accepts(change.old.obj)
    if old_ok and new_ok:
        return event_line(change.kind, "MODIFIED", change.new, metadata_only)
    if new_ok:
        return event_line(change.kind, "ADDED", change.new, metadata_only)
    if old_ok and change.old is not None:
        return event_line(change.kind, "DELETED", change.old.stamped(change.rv), metadata_only)
    return None


def _encode_continue(rv: int, last_key: str) -> str:
    # The real server's format: base64url of {"v","rv","start"}, start just after the last key.
    token = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": last_key + "\x00"}).encode()
    return base64.urlsafe_b64encode(token).rstrip(b"=").decode()


def _decode_continue(token: str) -> tuple[int, str]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if data["v"] != "meta.k8s.io/v1" or not isinstance(data["rv"], int) or not data["start"]:
            raise ValueError("unknown continue token")
        return data["rv"], str(data["start"])
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise bad_request(f"continue key is not valid: {exc}") from None


@dataclass
class WatchSettings:
    bookmark_interval: float
    max_watch_seconds: float
    #: A fault to act out: "short_watches" (every watch sends one bookmark, or its first
    #: events, and ends), "gone_after_list" (every resumed watch answers 410 at once).
    fault: str | None = None


#: Told what each request was sent: (request, body bytes, watch events).
Meter = Callable[[web.Request, int, int], None]


class Api:
    """aiohttp handlers over a Store. Authentication is the caller's middleware."""

    def __init__(self, store: Store, settings: WatchSettings, meter: Meter | None = None) -> None:
        self._store = store
        self._settings = settings
        self._meter: Meter = meter or (lambda _request, _size, _events: None)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/version", self.version)
        app.router.add_get("/version/", self.version)  # what kubernetes_asyncio's VersionApi asks for
        app.router.add_get("/api/v1/pods", self.collection)
        app.router.add_get("/api/v1/namespaces/{namespace}/pods", self.collection)
        app.router.add_get("/api/v1/namespaces/{namespace}/pods/{name}", self.item)
        app.router.add_get("/api/v1/nodes", self.collection)
        app.router.add_get("/api/v1/nodes/{name}", self.item)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response(VERSION_INFO)

    async def item(self, request: web.Request) -> web.StreamResponse:
        kind = _kind_of(request)
        name = request.match_info["name"]
        stored = self._store.get(kind, object_key(request.match_info.get("namespace"), name))
        if stored is None:
            return ApiError(404, "NotFound", f'{kind} "{name}" not found', {"name": name, "kind": kind}).response()
        return web.Response(body=with_kind(kind, stored.body), content_type="application/json")

    async def collection(self, request: web.Request) -> web.StreamResponse:
        try:
            if parse_bool(request.query, "watch"):
                return await self._watch(request)
            return self._list(request)
        except ApiError as error:
            return error.response()

    def _filter(self, request: web.Request, kind: str) -> tuple[Callable[[Obj], bool], bool]:
        """The watcher/list predicate, and whether any selector was given."""
        namespace = request.match_info.get("namespace")
        try:
            labels = parse_label_selector(request.query.get("labelSelector", ""))
            fields = parse_field_selector(request.query.get("fieldSelector", ""), objects.supported_fields(kind))
        except SelectorError as exc:
            raise bad_request(str(exc)) from None

        def accepts(obj: Obj) -> bool:
            return (
                (namespace is None or obj["metadata"].get("namespace") == namespace)
                and labels.matches(objects.labels(obj))
                and (fields.empty or fields.matches(objects.fields(kind, obj)))
            )

        return accepts, not (labels.empty and fields.empty)

    def _list(self, request: web.Request) -> web.Response:
        kind = _kind_of(request)
        accepts, selective = self._filter(request, kind)
        partial_only = metadata_only(request, watch=False)
        limit = _parse_int(request.query, "limit") or 0
        if request.query.get("resourceVersion") == "0" and "continue" not in request.query:
            # Served from the watch cache, which (kube-apiserver 1.32) ignores `limit`.
            limit = 0
        rv, start = self._store.rv, ""
        if token := request.query.get("continue"):
            rv, start = _decode_continue(token)
            if rv < self._store.floor:
                raise ApiError(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a "
                    "consistent list result. You can start a new list without the continue parameter.",
                )
        keys = self._store.keys(kind)
        lo, hi = self._store.key_range(kind, request.match_info.get("namespace"))
        index = max(lo, bisect_left(keys, start))
        bodies: list[bytes] = []
        meta: Obj = {"resourceVersion": str(rv)}
        while index < hi:
            stored = self._store.get(kind, keys[index])
            index += 1
            if stored is None or not accepts(stored.obj):
                continue
            bodies.append(partial(stored.obj) if partial_only else stored.body)
            if len(bodies) == limit and index < hi:
                meta["continue"] = _encode_continue(rv, keys[index - 1])
                if not selective:
                    meta["remainingItemCount"] = hi - index
                break
        list_kind = {"kind": PARTIAL + "List", "apiVersion": "meta.k8s.io/v1"} if partial_only else {
            "kind": KIND_NAMES[kind] + "List", "apiVersion": "v1"}
        head = json.dumps({**list_kind, "metadata": meta}, separators=(",", ":"))
        body = b'%s,"items":[%s]}' % (head[:-1].encode(), b",".join(bodies))
        self._meter(request, len(body), 0)
        return web.Response(body=body, content_type="application/json")

    async def _watch(self, request: web.Request) -> web.StreamResponse:
        kind = _kind_of(request)
        accepts, _ = self._filter(request, kind)
        partial_only = metadata_only(request, watch=True)
        bookmarks = parse_bool(request.query, "allowWatchBookmarks")
        timeout = _parse_int(request.query, "timeoutSeconds") or 0
        # Like the real server, the server-side limit applies when the client sets none.
        duration = float(timeout) if timeout > 0 else self._settings.max_watch_seconds
        since = _parse_int(request.query, "resourceVersion") or 0
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        # Subscribing and reading the history happen without an await in between, so no
        # change is lost or sent twice.
        watcher = self._store.subscribe(kind)
        fault = self._settings.fault
        try:
            if fault == "gone_after_list" and since:
                first, resumable = [error_line(too_old(since, self._store.rv))], False
            else:
                first, resumable = self._first_events(kind, since, accepts, partial_only)
            await response.prepare(request)
            for line in first:
                await self._write(request, response, line)
            if fault == "short_watches":
                if bookmarks:
                    await self._write(request, response, bookmark_line(kind, self._store.rv, partial_only))
            elif resumable:
                await self._stream(request, response, watcher, accepts, bookmarks, duration, partial_only)
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away; nothing more to send
        finally:
            self._store.unsubscribe(watcher)
        return response

    async def _write(self, request: web.Request, response: web.StreamResponse, line: bytes) -> None:
        self._meter(request, len(line), 1)
        await response.write(line)

    def _first_events(
        self, kind: str, since: int, accepts: Callable[[Obj], bool], partial_only: bool
    ) -> tuple[list[bytes], bool]:
        """The events a new watch starts with, and whether it goes on after them."""
        if since == 0:
            # No resourceVersion (or "0"): the current state as synthetic ADDED events.
            stored = (self._store.get(kind, key) for key in self._store.keys(kind))
            lines = [event_line(kind, "ADDED", s, partial_only) for s in stored if s is not None and accepts(s.obj)]
            return lines, True
        changes = self._store.changes_since(since)
        if changes is None:
            # Like the real server: a 200 stream with one ERROR event, then the end.
            return [error_line(too_old(since, self._store.floor))], False
        events = (event_for(change, accepts, partial_only) for change in changes if change.kind == kind)
        return [line for line in events if line is not None], True

    async def _stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        watcher: Watcher,
        accepts: Callable[[Obj], bool],
        bookmarks: bool,
        duration: float,
        partial_only: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + duration
        interval = self._settings.bookmark_interval
        next_bookmark = loop.time() + interval
        while (now := loop.time()) < deadline:
            wait = min(deadline, next_bookmark) - now if bookmarks else deadline - now
            try:
                # Queued changes first: wait_for(get(), 0) would time out without taking one
                # on Python 3.11, and a due bookmark would then spin forever.
                if not watcher.queue.empty():
                    change = watcher.queue.get_nowait()
                else:
                    change = await asyncio.wait_for(watcher.queue.get(), max(wait, 0))
            except TimeoutError:
                # Only bookmark with nothing queued: the bookmark's version must not pass
                # an event this watcher has not been sent yet.
                if bookmarks and loop.time() >= next_bookmark and watcher.queue.empty():
                    await self._write(request, response, bookmark_line(watcher.kind, self._store.rv, partial_only))
                    next_bookmark = loop.time() + interval
                continue
            if change is None:
                return  # end_watches()
            if (line := event_for(change, accepts, partial_only)) is not None:
                await self._write(request, response, line)


def _kind_of(request: web.Request) -> str:
    return "nodes" if request.path.startswith("/api/v1/nodes") else "pods"
