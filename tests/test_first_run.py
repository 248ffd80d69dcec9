"""What a new user meets on a first run, each once found wrong: a closed pipe after --help,
--help without the mesh endpoints, the log-level error in other words than the docs,
`node=None` in logfmt, "1 probes", `kubenurse mesh --port`, a 1x1 matrix, and the
sandbox's `7/8 ok` next to "every check ok"."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kubenurse_sandbox.cluster import checks_column
from probe import logs
from probe.mesh import terminal
from probe.mesh.verdicts import CheckView, Evidence, NodeView, judge
from probe.settings import SettingsError, load_settings
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def clean_env(**settings: str) -> dict[str, str]:
    ours = ("KUBENURSE_", "OTEL_", "KUBERNETES_", "POD_", "NODE_", "KUBECONFIG")
    return {**{k: v for k, v in os.environ.items() if not k.startswith(ours)}, **settings}


# --- the command ----------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["mesh", "--help"]])
def test_output_into_a_closed_pipe_is_no_error(args: list[str]) -> None:
    """`kubenurse --help | head -3`: the reader leaves before the writer is done."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the probe writes a byte
    try:
        done = subprocess.run(
            [sys.executable, "-m", "probe", *args], stdout=write_end, stderr=subprocess.PIPE, text=True,
            env=clean_env(), timeout=30,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 0


def test_help_names_every_endpoint_and_where_the_settings_are_explained() -> None:
    done = subprocess.run([sys.executable, "-m", "probe", "--help"], capture_output=True, text=True, env=clean_env())
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for endpoint in ("/alive", "/alwayshappy", "/ready", "/metrics", "/mesh ", "/mesh.json"):
        assert endpoint in text, endpoint
    assert "docs/reference.md" in text and (ROOT / "docs" / "reference.md").exists()


def test_the_log_level_error_uses_the_words_of_the_docs() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"KUBENURSE_LOG_LEVEL": "verbose"})
    assert str(caught.value).endswith("must be one of debug, info, warning, error"), caught.value
    reference = (ROOT / "docs" / "reference.md").read_text()
    assert "`debug`, `info`, `warning` or `error`" in reference
    assert load_settings({"KUBENURSE_LOG_LEVEL": "Warning"}).log_level == "WARNING"


@pytest.fixture
def logfmt() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buffer = io.StringIO()
    logs.configure("logfmt")
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffer)
    yield buffer
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_logfmt_leaves_out_a_field_without_value(logfmt: io.StringIO) -> None:
    logging.getLogger("probe.test").info("probe started", extra={"node": None, "pod": "pod-a", "zero": 0})
    line = logfmt.getvalue()
    assert "node=" not in line and "None" not in line, line
    assert "pod=pod-a" in line and "zero=0" in line, line


# --- kubenurse mesh -----------------------------------------------------------------------------


def one_probe_document() -> dict[str, object]:
    """/mesh.json of a cluster of one, with its verdicts made by the real rules."""
    evidence = Evidence(
        nodes=[NodeView("node-1", "pod-1", "127.0.0.2")],
        checks=[CheckView("node-1", "me_service", True, 0.001)],
    )
    return {
        "generated_at": "2026-12-07T05:00:00Z",
        "source": "pod-1",
        "nodes": [{"node": "node-1", "pod": "pod-1", "pod_ip": "127.0.0.2", "ready": True, "reached": True}],
        "paths": [],
        "checks": [],
        "verdicts": [v.as_json() for v in judge(evidence)],
    }


def test_one_probe_gets_no_matrix_and_counts_in_the_singular() -> None:
    text = terminal.render(one_probe_document())
    assert "1 node, 0 paths" in text and "1 nodes" not in text, text
    assert "1 probe," in text and "1 probes" not in text and "1 other check," in text, text
    assert "no path between nodes" in text
    assert " 1\n" not in text.split("no path", 1)[1], "no 1x1 matrix after the note"
    several = {**one_probe_document(), "nodes": [{"node": n, "reached": True, "ready": True} for n in ("a", "b")]}
    assert "2 nodes" in terminal.render(several) and "a  " in terminal.render(several)


@pytest.fixture
def sandbox_like() -> Iterator[int]:
    """A /mesh.json answered where a sandbox started with --port P puts node-1: 127.0.0.2:P."""
    document = json.dumps(one_probe_document()).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/mesh.json" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(document)

        def log_message(self, *args: object) -> None:
            pass

    port = free_port("127.0.0.2")
    server = ThreadingHTTPServer(("127.0.0.2", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield port
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("form", ["separate", "equals"])
def test_mesh_port_asks_the_sandbox_on_that_port(sandbox_like: int, form: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    args = ["--port", str(sandbox_like)] if form == "separate" else [f"--port={sandbox_like}"]
    status = terminal.main(args, out=out, err=err)
    assert status == 0, err.getvalue()
    assert "mesh as seen by pod-1" in out.getvalue()


@pytest.mark.parametrize("args", [["--port"], ["--port", "x"], ["--port", "70000"], ["--port", "1", "http://a"]])
def test_mesh_port_needs_a_port_alone(args: list[str]) -> None:
    err = io.StringIO()
    assert terminal.main(args, out=io.StringIO(), err=err) == 2
    assert "--port" in err.getvalue() or "one URL" in err.getvalue()


# --- the sandbox ------------------------------------------------------------------------------------


def test_sandbox_status_counts_only_the_checks_performed() -> None:
    healthy = {**dict.fromkeys(["api_server_direct", "api_server_dns", "me_ingress", "me_service"], "ok"),
               "path_node-2": "ok", "path_node-3": "ok", "path_node-4": "ok", "dns_cluster": "skipped"}
    assert checks_column(healthy) == "7/7 ok (1 skipped)"
    assert checks_column({**healthy, "me_ingress": "connect_done: refused"}) == "6/7 ok (1 skipped)"
    assert checks_column({"a": "ok"}) == "1/1 ok"
    assert checks_column({}) == "-"


def test_what_the_readme_promises_of_the_sandbox_matches_how_status_counts() -> None:
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "`7/7 ok (1 skipped)`" in readme
    assert checks_column({"x": "ok", "dns_cluster": "skipped"}).startswith("1/1 ok")
