"""`kubenurse mesh` renders what the document says, and nothing a peer wrote drives the terminal."""

from __future__ import annotations

import io
import json

from probe.mesh.collect import mesh_document
from probe.mesh.terminal import healthy, main, render
from probe.mesh.verdicts import Evidence, NodeView, PathView, assess
from tests.test_mesh_page import serving


def document() -> dict[str, object]:
    names = ["a", "b", "c", "d"]
    paths = [PathView(x, y, True, 0.3 if y == "c" else 0.001) for x in names for y in names if x != y and x != "d"]
    nodes = [NodeView("a"), NodeView("b"), NodeView("c"),
             NodeView("d", reached=False, unreached_reason="no answer in time"),
             NodeView("e", ready=False, checked=False, not_ready_reason="node cordoned, unschedulable or gone")]
    evidence = Evidence(nodes, paths, [])
    assessment = assess(evidence)
    return mesh_document(evidence, assessment.verdicts, source="a", generated_at=0, rule=assessment.rule)


def test_the_matrix_takes_slowness_from_the_document() -> None:
    doc = document()
    text = render(doc)
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip().startswith(("a ", "b ", "d ", "e "))}
    assert " s" in rows["a"] and rows["a"].count(" s") == 1, text
    # Change the document's state, not the latency: the terminal follows the document.
    for p in doc["paths"]:  # type: ignore[attr-defined]
        p["state"] = "ok"
    assert " s " not in render(doc)
    assert "(no answer: no answer in time)" in text
    assert "(not checked: node cordoned" in text
    assert "?" in rows["d"], "a probe that did not answer has a marked row"
    assert not healthy(doc)


def test_escape_sequences_from_the_document_are_not_printed() -> None:
    evil = "\x1b[2J\x1b]0;owned\x07\u202enode"
    doc = {
        "source": evil, "generated_at": evil,
        "nodes": [{"node": evil, "reached": False, "unreached_reason": evil}],
        "paths": [{"from": evil, "to": evil, "ok": True, "state": evil}],
        "verdicts": [{"kind": evil, "subject": evil, "confidence": evil, "summary": evil, "evidence": [evil]}],
    }
    text = render(doc)
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert "?[2J" in text


def test_exit_status_from_a_served_document() -> None:
    with serving(document()) as url:
        out = io.StringIO()
        assert main([url.removesuffix("/mesh")], out=out) == 1
    assert "node_slow c" in out.getvalue()
    ok = {"source": "a", "generated_at": "now", "nodes": [], "paths": [],
          "verdicts": [{"kind": "ok", "subject": "cluster", "confidence": "sure", "summary": "fine", "evidence": []}]}
    with serving(ok) as url:
        assert main([url.removesuffix("/mesh")], out=io.StringIO()) == 0
    json.dumps(ok)
