"""/mesh.json and `kubenurse mesh` from a loopback cluster of real probes (the sandbox: the
API-server stand-in, one probe process per node), in each fault the sandbox can make."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.test_sandbox import REPO, Sandbox, eventually, get, start_sandbox

#: The sandbox's check interval here (half its default): a fault must show within two rounds
#: once it is in place. Stopping a probe itself takes about its 1 s shutdown duration before that.
ROUND = 0.5
TWO_ROUNDS = 2 * ROUND
SLACK = 3.0


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    running = start_sandbox("--nodes", "4", "--no-prometheus", "--interval", f"{ROUND * 1000:.0f}ms")
    yield running
    if running.process.poll() is None:
        running.stop()


def mesh(base: str) -> dict[str, Any]:
    status, body = get(f"{base}/mesh.json")
    assert status == 200, body
    return json.loads(body)


def verdicts(document: dict[str, Any]) -> list[tuple[str, str]]:
    return [(v["kind"], v["subject"]) for v in document["verdicts"]]


def until(
    base: str, wanted: list[tuple[str, str]], timeout: float, confidence: str | None = None, paths: int = 0
) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    def check() -> tuple[bool, object]:
        seen.append(mesh(base))
        found = seen[-1]["verdicts"]
        sure = confidence is None or all(v["confidence"] == confidence for v in found)
        # Each check starts at its own offset into the interval: wait for the paths asked for.
        enough = len({(p["from"], p["to"]) for p in seen[-1]["paths"]}) >= paths
        return verdicts(seen[-1]) == wanted and sure and enough, found

    eventually(check, timeout, f"verdicts {wanted}")
    return seen[-1]


def kubenurse_mesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "probe", "mesh", *args], capture_output=True, text=True, timeout=30, cwd=REPO
    )


def test_healthy_cluster_every_node_and_path(sandbox: Sandbox) -> None:
    base = sandbox.nodes["node-1"]
    document = until(base, [("ok", "cluster")], timeout=15, paths=12)
    assert [n["node"] for n in document["nodes"]] == ["node-1", "node-2", "node-3", "node-4"]
    assert all(n["reached"] and n["ready"] for n in document["nodes"])
    # The sandbox checks 3 neighbours each: every ordered pair, all reached through the walk.
    pairs = {(p["from"], p["to"]) for p in document["paths"]}
    assert len(pairs) == 12 and all(p["ok"] for p in document["paths"])
    assert {c["type"] for c in document["checks"]} >= {"api_server_direct", "api_server_dns", "me_service"}
    assert document["source"] == "kubenurse-node-1"
    result = kubenurse_mesh(base)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[sure] ok cluster" in result.stdout and "node-4" in result.stdout


def test_stopped_node_is_unreachable(sandbox: Sandbox) -> None:
    assert "probe stopped" in sandbox.command("stop", "node-3").stdout
    started = time.monotonic()
    try:
        document = until(sandbox.nodes["node-1"], [("node_unreachable", "node-3")], TWO_ROUNDS + SLACK)
        print(f"stop: verdict after {time.monotonic() - started:.1f} s")
        assert document["verdicts"][0]["confidence"] == "sure"
        assert [n["reached"] for n in document["nodes"] if n["node"] == "node-3"] == [False]
        failing = [p for p in document["paths"] if p["to"] == "node-3"]
        assert failing and not any(p["ok"] for p in failing)
        assert all(p["error_event"] for p in failing)
        result = kubenurse_mesh(sandbox.nodes["node-2"])
        assert result.returncode == 1
        assert "node_unreachable node-3" in result.stdout and "(no answer: connection refused" in result.stdout
    finally:
        sandbox.command("start", "node-3")
    until(sandbox.nodes["node-1"], [("ok", "cluster")], timeout=20)


def test_slow_node(sandbox: Sandbox) -> None:
    sandbox.command("slow", "node-4", "200ms")
    started = time.monotonic()
    try:
        document = until(sandbox.nodes["node-2"], [("node_slow", "node-4")], TWO_ROUNDS + SLACK)
        print(f"slow: verdict after {time.monotonic() - started:.1f} s")
        towards = [p["latency_seconds"] for p in document["paths"] if p["to"] == "node-4"]
        assert towards and min(towards) >= 0.2
    finally:
        sandbox.command("fast", "node-4")
    until(sandbox.nodes["node-1"], [("ok", "cluster")], timeout=10)


def test_cordoned_node_is_not_a_fault(sandbox: Sandbox) -> None:
    sandbox.command("cordon", "node-2")
    try:
        def cordoned() -> tuple[bool, object]:
            document = mesh(sandbox.nodes["node-2"])
            me = [n for n in document["nodes"] if n["node"] == "node-2"]
            return bool(me) and not me[0]["ready"], document["nodes"]

        eventually(cordoned, TWO_ROUNDS + SLACK, "node-2 not ready in its own view")
        # The others stop checking it; nothing is wrong.
        def unchecked() -> tuple[bool, object]:
            document = mesh(sandbox.nodes["node-1"])
            return "node-2" not in {p["to"] for p in document["paths"]}, document["paths"]

        eventually(unchecked, TWO_ROUNDS + SLACK, "node-2 no longer checked")
        # Still shown in every probe's view, with the reason, and the columns keep their places.
        seen_from_node_1 = mesh(sandbox.nodes["node-1"])
        (shown,) = [n for n in seen_from_node_1["nodes"] if n["node"] == "node-2"]
        assert shown["ready"] is False and shown["checked"] is False
        assert "cordoned" in shown["not_ready_reason"]
        assert [n["node"] for n in seen_from_node_1["nodes"]] == ["node-1", "node-2", "node-3", "node-4"]
        until(sandbox.nodes["node-1"], [("ok", "cluster")], TWO_ROUNDS + SLACK)
        # Each probe serves its last view while it builds the next: node-2's may still be
        # from before node-4 was fast again.
        seen_from_node_2 = until(sandbox.nodes["node-2"], [("ok", "cluster")], TWO_ROUNDS + SLACK)
        assert any("node-2" in e for e in seen_from_node_2["verdicts"][0]["evidence"])
    finally:
        sandbox.command("uncordon", "node-2")


def test_api_server_down(sandbox: Sandbox) -> None:
    until(sandbox.nodes["node-1"], [("ok", "cluster")], timeout=15)
    sandbox.command("api", "down")
    started = time.monotonic()
    try:
        # A check against a dead API server can take its whole timeout (6 s) to fail; until
        # every probe has had a failing round the verdict is `likely`, then `sure`.
        until(sandbox.nodes["node-1"], [("api_server", "api-server")], 6 + TWO_ROUNDS + SLACK)
        print(f"api down: verdict after {time.monotonic() - started:.1f} s")
        document = until(sandbox.nodes["node-1"], [("api_server", "api-server")], 6 + TWO_ROUNDS + SLACK, "sure")
        # Discovery keeps the last neighbours: the mesh is still whole.
        assert all(n["reached"] for n in document["nodes"]) and len(document["nodes"]) == 4
        assert kubenurse_mesh(sandbox.nodes["node-1"]).returncode == 1
    finally:
        sandbox.command("api", "up")
    until(sandbox.nodes["node-1"], [("ok", "cluster")], timeout=20)


def test_mesh_command_without_a_probe_exits_2() -> None:
    result = kubenurse_mesh("http://127.0.0.1:9")
    assert result.returncode == 2
    assert "no probe answered" in result.stderr


def test_report_is_compact_and_bad_requests_leave_the_probe_serving(sandbox: Sandbox) -> None:
    base = sandbox.nodes["node-1"]
    status, body = get(f"{base}/mesh/report")
    report = json.loads(body)
    assert status == 200 and report["node"] == "node-1"
    assert set(report) == {"node", "pod", "ready", "not_ready", "round_age_seconds", "results", "udp", "echo"}
    assert {r["to"] for r in report["results"] if "to" in r} == {"node-2", "node-3", "node-4"}
    assert "\n" not in body
    assert get(f"{base}/mesh.json?x=" + "a" * 2000)[0] == 200
    status, gzipped = _gzip_get(f"{base}/mesh.json")
    assert status == 200 and json.loads(gzipped)["source"] == "kubenurse-node-1"
    status, _ = get(f"{base}/mesh/nothing")
    assert status == 404
    assert get(f"{base}/alwayshappy")[0] == 200


def _gzip_get(url: str) -> tuple[int, str]:
    import gzip
    import urllib.request

    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        return response.status, gzip.decompress(response.read()).decode()


# --- steady under load ---------------------------------------------------------------------------

#: Rounds a verdict must hold (one view a round), with both cores kept busy.
STEADY_ROUNDS = 20


@contextlib.contextmanager
def cpu_burners(seconds: float) -> Iterator[None]:
    """One busy process per core, ended when the block ends (or after `seconds` at most)."""
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass\n"
    burners = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(os.cpu_count() or 2)]
    try:
        yield
    finally:
        for b in burners:
            b.kill()
            b.wait()


def steady(base: str, wanted: list[tuple[str, str]], rounds: int = STEADY_ROUNDS) -> list[list[tuple[str, str]]]:
    """Once `wanted` shows, the verdicts of one view per round for `rounds` rounds."""
    until(base, wanted, 15)
    seen = []
    for _ in range(rounds):
        time.sleep(ROUND)
        seen.append(verdicts(mesh(base)))
    return seen


@pytest.mark.timeout(300)
def test_slow_stop_and_cordon_each_give_one_steady_verdict_with_the_machine_loaded(sandbox: Sandbox) -> None:
    base = sandbox.nodes["node-1"]
    until(base, [("ok", "cluster")], timeout=15, paths=12)
    with cpu_burners(4 * (STEADY_ROUNDS + 20)):
        sandbox.command("slow", "node-4", "200ms")
        try:
            seen = steady(base, [("node_slow", "node-4")])
        finally:
            sandbox.command("fast", "node-4")
        assert all(s == [("node_slow", "node-4")] for s in seen), [s for s in seen if s != [("node_slow", "node-4")]]
        until(base, [("ok", "cluster")], timeout=20)

        sandbox.command("stop", "node-3")
        try:
            seen = steady(base, [("node_unreachable", "node-3")])
        finally:
            sandbox.command("start", "node-3")
        assert all(s == [("node_unreachable", "node-3")] for s in seen), seen
        until(base, [("ok", "cluster")], timeout=20)

        sandbox.command("cordon", "node-2")
        try:
            def not_checked() -> tuple[bool, object]:
                document = mesh(base)
                return "node-2" not in {p["to"] for p in document["paths"]}, document["paths"]

            eventually(not_checked, 10, "node-2 no longer checked")
            seen = steady(base, [("ok", "cluster")])
            shown = [n for n in mesh(base)["nodes"] if n["node"] == "node-2"]
            assert shown and shown[0]["ready"] is False and "cordoned" in shown[0]["not_ready_reason"]
        finally:
            sandbox.command("uncordon", "node-2")
        assert all(s == [("ok", "cluster")] for s in seen), seen
