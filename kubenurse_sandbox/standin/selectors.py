"""Label and field selectors, parsed and matched the way the Kubernetes API server does.

Label selectors are the probe's own (`probe.labels`: one grammar for what the probe accepts
in KUBENURSE_NEIGHBOUR_FILTER and what the stand-in serves). Field selectors follow
k8s.io/apimachinery `fields.ParseSelector`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from probe.labels import LabelSelector, Requirement, SelectorError, parse_label_selector

__all__ = [
    "FieldSelector", "LabelSelector", "Requirement", "SelectorError", "parse_field_selector", "parse_label_selector",
]


@dataclass(frozen=True)
class FieldSelector:
    terms: tuple[tuple[str, bool, str], ...] = ()  # (field, equal?, value)

    def matches(self, fields: Mapping[str, str]) -> bool:
        return all((fields.get(field, "") == value) == equal for field, equal, value in self.terms)

    @property
    def empty(self) -> bool:
        return not self.terms


def parse_field_selector(text: str, supported: Collection[str]) -> FieldSelector:
    """Parse a `fieldSelector` query value; only the fields in `supported` may be used."""
    terms = []
    for part in text.split(","):
        if not part:
            continue  # fields.ParseSelector skips empty terms too
        # Same operator order as Kubernetes, so `a!=b` is not read as `a!` = `b`.
        op = next((op for op in ("!=", "==", "=") if op in part), None)
        if op is None:
            raise SelectorError(f"invalid selector: '{text}'; can't understand '{part}'")
        field, value = part.split(op, 1)
        if field not in supported:
            raise SelectorError(f"field label not supported: {field}")
        terms.append((field, op != "!=", value))
    return FieldSelector(tuple(terms))
