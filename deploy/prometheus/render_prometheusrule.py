"""Write the prometheus-operator PrometheusRule from the plain Prometheus rules file.

deploy/prometheus/kubenurse-rules.yaml is the source; the PrometheusRule in
k8s/overlays/prometheus-operator/ carries the same groups. tests/test_alerts.py fails
when the two drift apart. Run from anywhere:

    python deploy/prometheus/render_prometheusrule.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "deploy" / "prometheus" / "kubenurse-rules.yaml"
TARGET = ROOT / "k8s" / "overlays" / "prometheus-operator" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/kubenurse-rules.yaml by
# deploy/prometheus/render_prometheusrule.py; edit the source, then re-run it.
# Your Prometheus' ruleSelector must match the labels below (kube-prometheus-stack
# selects `release: <its release name>` by default; patch the labels to match).
"""


class _Literal(str):
    """Multi-line PromQL stays a readable block scalar."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(
    _Literal, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
)


def _blocks(node: object) -> object:
    if isinstance(node, dict):
        return {key: _blocks(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_blocks(value) for value in node]
    if isinstance(node, str) and "\n" in node:
        return _Literal(node)
    return node


def render(groups: list[dict]) -> str:
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "kubenurse",
            "labels": {"app.kubernetes.io/name": "kubenurse"},
        },
        "spec": {"groups": groups},
    }
    body = yaml.dump(_blocks(rule), Dumper=_Dumper, sort_keys=False, width=100)
    return HEADER + body


def main() -> int:
    groups = yaml.safe_load(SOURCE.read_text())["groups"]
    TARGET.write_text(render(groups))
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
