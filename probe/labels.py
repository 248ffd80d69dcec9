"""Kubernetes label selectors, parsed as the API server parses them.

Used to validate KUBENURSE_NEIGHBOUR_FILTER at start-up (a typo should exit 2, not
silently select nobody); the API server does the matching (the selector goes into the
list and watch requests as given).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Key: optional DNS-subdomain prefix and a name segment; value: up to 63 name characters.
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY_RE = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}$")
_VALUE_RE = re.compile(rf"^({_NAME})?$")
_SET_RE = re.compile(r"^(?P<key>[^\s!=()]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_EQ_RE = re.compile(r"^(?P<key>[^\s!=()<>]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s!=(),<>]*)$")
# `a>5`, `a<3`: Gt and Lt, with an integer value.
_CMP_RE = re.compile(r"^(?P<key>[^\s!=()<>]+)\s*(?P<op>[<>])\s*(?P<value>[^\s!=(),<>]*)$")


class SelectorError(ValueError):
    pass


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "in", "notin", "exists", "!exists", "gt", "lt"
    values: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Selector:
    requirements: tuple[Requirement, ...]


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise SelectorError("unbalanced ')'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise SelectorError("unbalanced '('")
    parts.append(text[start:])
    return parts


def _key(key: str) -> str:
    if not _KEY_RE.match(key):
        raise SelectorError(f"invalid label key {key!r}")
    return key


def _value(value: str) -> str:
    if not _VALUE_RE.match(value):
        raise SelectorError(f"invalid label value {value!r}")
    return value


def _requirement(term: str) -> Requirement:
    if m := _SET_RE.match(term):
        values = frozenset(_value(v.strip()) for v in m["values"].split(","))
        return Requirement(_key(m["key"]), m["op"], values)
    if m := _EQ_RE.match(term):
        op = "notin" if m["op"] == "!=" else "in"
        return Requirement(_key(m["key"]), op, frozenset({_value(m["value"])}))
    if m := _CMP_RE.match(term):
        if not re.fullmatch(r"-?\d+", m["value"]):
            raise SelectorError(f"for '>' and '<' the value must be an integer, not {m['value']!r}")
        return Requirement(_key(m["key"]), "gt" if m["op"] == ">" else "lt", frozenset({m["value"]}))
    if term.startswith("!"):
        return Requirement(_key(term[1:].strip()), "!exists")
    return Requirement(_key(term), "exists")


def parse_selector(text: str) -> Selector:
    """Parse a label selector as `kubectl -l` accepts it; raise SelectorError if malformed."""
    text = text.strip()
    if not text:
        return Selector(())
    terms = [t.strip() for t in _split_top_level(text)]
    if any(not t for t in terms):
        raise SelectorError("empty requirement")
    return Selector(tuple(_requirement(t) for t in terms))
