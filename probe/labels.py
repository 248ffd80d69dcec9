"""Kubernetes label selectors, parsed and matched as the API server does.

The one copy of the grammar: settings validates KUBENURSE_NEIGHBOUR_FILTER with it at
start-up (a typo exits 2 instead of silently selecting nobody; the selector then goes
into the list and watch requests as given, and the API server does the matching), and
the API-server stand-in parses and matches `labelSelector` with it, so the probe accepts
exactly what the stand-in accepts.

Grammar and semantics follow k8s.io/apimachinery `labels.Parse`: `a=b`, `a==b`, `a!=b`,
`a in (x,y)`, `a notin (x)`, `a`, `!a`, `a>1`, `a<1`, comma-separated. `!=` and `notin`
also match objects that lack the label, as in Kubernetes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass


class SelectorError(ValueError):
    """The selector cannot be used (the API server would answer 400 BadRequest)."""


_SPECIAL = frozenset({"!=", "==", "=", "!", "(", ")", ",", "<", ">"})
# Identifiers are any run of characters that are neither whitespace nor special, as in the
# Kubernetes lexer; validity of keys and values is checked after parsing.
_TOKEN = re.compile(r"!=|==|=|!|\(|\)|,|<|>|[^\s!=(),<>]+")
_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_NAME_RE = re.compile(_NAME)
_DNS_SUBDOMAIN_RE = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*")


@dataclass(frozen=True)
class Requirement:
    """One term of a label selector. `=`/`==` are stored as `in`, `!=` as `notin`."""

    key: str
    op: str  # "exists", "!", "in", "notin", "gt", "lt"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.op == "exists":
            return value is not None
        if self.op == "!":
            return value is None
        if self.op == "in":
            return value is not None and value in self.values
        if self.op == "notin":
            return value is None or value not in self.values
        return _compare_int(value, self.op, next(iter(self.values)))


def _compare_int(value: str | None, op: str, bound: str) -> bool:
    # Gt/Lt match only labels whose value is an integer, like the API server.
    try:
        number = int(value) if value is not None else None
    except ValueError:
        return False
    if number is None:
        return False
    return number > int(bound) if op == "gt" else number < int(bound)


@dataclass(frozen=True)
class LabelSelector:
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements


class _Parser:
    def __init__(self, text: str) -> None:
        self._tokens = _TOKEN.findall(text)
        self._pos = 0

    def peek(self) -> str | None:
        return self._tokens[self._pos] if self._pos < len(self._tokens) else None

    def take(self) -> str | None:
        token = self.peek()
        self._pos += 1
        return token

    def identifier(self) -> str:
        token = self.take()
        if token is None or token in _SPECIAL:
            raise SelectorError(f"found '{token or ''}', expected: identifier")
        return token

    def selector(self) -> LabelSelector:
        if self.peek() is None:
            return LabelSelector()
        requirements = [self.requirement()]
        while (token := self.take()) is not None:
            if token != ",":
                raise SelectorError(f"found '{token}', expected: ',' or 'end of string'")
            requirements.append(self.requirement())
        return LabelSelector(tuple(requirements))

    def requirement(self) -> Requirement:
        if self.peek() == "!":
            self.take()
            return Requirement(_label_key(self.identifier()), "!")
        key = _label_key(self.identifier())
        op = self.peek()
        if op is None or op == ",":
            return Requirement(key, "exists")
        self.take()
        if op in ("=", "==", "!="):
            # `a=` is legal and means the empty value.
            value = "" if self.peek() in (None, ",") else self.identifier()
            return Requirement(key, "notin" if op == "!=" else "in", frozenset({_label_value(value)}))
        if op in ("<", ">"):
            bound = self.identifier()
            if not re.fullmatch(r"-?\d+", bound):
                raise SelectorError(f"for 'Gt', 'Lt' operators, the value must be an integer: {bound!r}")
            return Requirement(key, "gt" if op == ">" else "lt", frozenset({bound}))
        if op in ("in", "notin"):
            return Requirement(key, op, frozenset(_label_value(v) for v in self.value_set()))
        raise SelectorError(f"found '{op}', expected: in, notin, =, ==, !=, gt, lt")

    def value_set(self) -> set[str]:
        if (token := self.take()) != "(":
            raise SelectorError(f"found '{token or ''}', expected: '('")
        values: set[str] = set()
        want_value = True
        while (token := self.take()) != ")":
            if token is None:
                raise SelectorError("found '', expected: ')'")
            if token == ",":
                if want_value:  # an empty entry, as in `(a,,b)` or `()`, is the empty value
                    values.add("")
                want_value = True
            elif token in _SPECIAL or not want_value:
                raise SelectorError(f"found '{token}', expected: ',' or ')'")
            else:
                values.add(token)
                want_value = False
        if want_value:
            values.add("")
        return values


def _label_key(key: str) -> str:
    prefix, slash, name = key.rpartition("/")
    valid_prefix = not slash or (len(prefix) <= 253 and _DNS_SUBDOMAIN_RE.fullmatch(prefix))
    if not valid_prefix or len(name) > 63 or not _NAME_RE.fullmatch(name):
        raise SelectorError(f"invalid label key {key!r}")
    return key


def _label_value(value: str) -> str:
    if value and (len(value) > 63 or not _NAME_RE.fullmatch(value)):
        raise SelectorError(f"invalid label value {value!r}")
    return value


def parse_label_selector(text: str) -> LabelSelector:
    """Parse a label selector as `kubectl -l` and the `labelSelector` query accept it;
    raises SelectorError on bad syntax or names."""
    return _Parser(text).selector()
