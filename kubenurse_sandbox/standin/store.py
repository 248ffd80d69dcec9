"""The stand-in's state: objects, the global resource version, the event history, watchers.

Like etcd behind a real API server there is one resource-version counter for everything,
bumped by every write. Stored objects are never mutated after being stored: an update works
on a fresh copy, so list responses, history and open watches can share them safely.
Every method is synchronous and must be called from the event loop's thread; that makes
"subscribe, then read the history" atomic for watches.
"""

from __future__ import annotations

import asyncio
import json
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .objects import KIND_NAMES, Obj

KINDS = tuple(KIND_NAMES)


def _encode(obj: Obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Stored:
    """An object and its JSON encoding (without kind/apiVersion, as list items are)."""

    obj: Obj
    body: bytes

    @classmethod
    def of(cls, obj: Obj) -> Stored:
        return cls(obj, _encode(obj))

    def stamped(self, rv: int) -> Stored:
        """This object as it looks with another resourceVersion (for DELETED events)."""
        return Stored.of({**self.obj, "metadata": {**self.obj["metadata"], "resourceVersion": str(rv)}})


@dataclass(frozen=True)
class Change:
    rv: int
    kind: str
    type: str  # ADDED, MODIFIED or DELETED
    old: Stored | None  # state before the change (None for ADDED)
    new: Stored  # state after; for DELETED the last state, stamped with the deletion's rv


@dataclass(eq=False)
class Watcher:
    kind: str
    # None ends the stream (end_watches).
    queue: asyncio.Queue[Change | None] = field(default_factory=asyncio.Queue)


def object_key(namespace: str | None, name: str) -> str:
    # The etcd key suffix, so list order is the real server's order.
    return f"{namespace}/{name}" if namespace is not None else name


class Store:
    def __init__(self, history_size: int) -> None:
        self.rv = 0
        self._objects: dict[str, dict[str, Stored]] = {kind: {} for kind in KINDS}
        self._sorted_keys: dict[str, list[str] | None] = dict.fromkeys(KINDS)
        self._history: deque[Change] = deque(maxlen=max(history_size, 1))
        self._floor = 0  # changes with rv <= floor are no longer in the history
        self._watchers: set[Watcher] = set()
        #: The version of each kind's last change: what kube-apiserver's watch cache of that
        #: resource has seen, and so the version its bookmarks carry.
        self.kind_rv: dict[str, int] = dict.fromkeys(KINDS, 0)

    # Reads -------------------------------------------------------------------------------

    def get(self, kind: str, key: str) -> Stored | None:
        return self._objects[kind].get(key)

    def keys(self, kind: str) -> list[str]:
        """All keys of a kind in list order; cached until an object is added or removed."""
        keys = self._sorted_keys[kind]
        if keys is None:
            keys = self._sorted_keys[kind] = sorted(self._objects[kind])
        return keys

    def key_range(self, kind: str, namespace: str | None) -> tuple[int, int]:
        """Index range in keys(kind) holding the given namespace (all when None)."""
        keys = self.keys(kind)
        if namespace is None:
            return 0, len(keys)
        # "0" sorts right after "/", so this brackets exactly the keys "namespace/...".
        return bisect_left(keys, f"{namespace}/"), bisect_left(keys, f"{namespace}0")

    @property
    def floor(self) -> int:
        return self._floor

    def changes_since(self, rv: int) -> list[Change] | None:
        """Changes after rv, or None when some of them were already dropped (410 Gone)."""
        if rv < self._floor:
            return None
        return [change for change in self._history if change.rv > rv]

    # Writes ------------------------------------------------------------------------------

    def create(self, kind: str, key: str, obj: Obj) -> Obj:
        if key in self._objects[kind]:
            raise ValueError(f'{kind} "{key}" already exists')
        self._sorted_keys[kind] = None
        return self._write(kind, key, "ADDED", None, obj)

    def update(self, kind: str, key: str, mutate: Callable[[Obj], object]) -> Obj:
        old = self._require(kind, key)
        obj: Obj = json.loads(old.body)  # a deep copy, faster than copy.deepcopy
        mutate(obj)
        return self._write(kind, key, "MODIFIED", old, obj)

    def delete(self, kind: str, key: str) -> Obj:
        old = self._require(kind, key)
        del self._objects[kind][key]
        self._sorted_keys[kind] = None
        self.rv += 1
        last = old.stamped(self.rv)
        self._record(Change(self.rv, kind, "DELETED", old, last))
        return last.obj

    def bump(self) -> int:
        """Advance the resource version as an unrelated write (a Lease, an Event) would."""
        self.rv += 1
        return self.rv

    def compact(self) -> None:
        # The bump makes every resourceVersion a client already holds too old, while a
        # fresh list (which returns the new rv) can still be watched from.
        self.bump()
        self._history.clear()
        self._floor = self.rv

    def _require(self, kind: str, key: str) -> Stored:
        try:
            return self._objects[kind][key]
        except KeyError:
            raise KeyError(f'{kind} "{key}" not found') from None

    def _write(self, kind: str, key: str, type_: str, old: Stored | None, obj: Obj) -> Obj:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        new = self._objects[kind][key] = Stored.of(obj)
        self._record(Change(self.rv, kind, type_, old, new))
        return json.loads(new.body)  # callers get a copy they may change freely

    def _record(self, change: Change) -> None:
        if len(self._history) == self._history.maxlen:
            self._floor = self._history[0].rv
        self._history.append(change)
        self.kind_rv[change.kind] = change.rv
        for watcher in self._watchers:
            if watcher.kind == change.kind:
                watcher.queue.put_nowait(change)

    # Watchers ----------------------------------------------------------------------------

    def subscribe(self, kind: str) -> Watcher:
        watcher = Watcher(kind)
        self._watchers.add(watcher)
        return watcher

    def unsubscribe(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def end_watches(self) -> None:
        for watcher in self._watchers:
            watcher.queue.put_nowait(None)

    @property
    def watcher_count(self) -> int:
        return len(self._watchers)
