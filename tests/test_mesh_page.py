"""The /mesh page in a real headless browser (Debian chromium driven by Playwright), on a
sandbox of real probes: every node rendered, a stopped node's verdict within 10 s, and a
screenshot written as a test artefact (no assertion on pixel colours)."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from probe.mesh.collect import mesh_document
from probe.mesh.routes import PAGE
from probe.mesh.verdicts import CheckView, Evidence, NodeView, PathView, assess, judge
from tests.test_sandbox import REPO, Sandbox, eventually, get, start_sandbox

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTEFACTS = Path(os.environ.get("KUBENURSE_TEST_ARTEFACTS", REPO / "test-artefacts"))
CHROMIUM_ARGS = [
    "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


def _missing(what: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing (CI=true: .ci/run installs it)")
    pytest.skip(f"{what} is missing")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright (pip install playwright)")
    if not Path(CHROMIUM).exists():
        _missing("chromium (apt install chromium)")
    profile = tempfile.mkdtemp(prefix="kubenurse-chromium-")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1200, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    # A lossy train waits the check timeout for its stragglers: at 2 s rather than the
    # probe's 6 s, the trains a loss verdict needs come three times as fast.
    running = start_sandbox("--nodes", "5", "--no-prometheus", "--timeout", "2s")
    for base in running.nodes.values():
        eventually(lambda base=base: (get(base + "/alwayshappy")[0] == 200, base), 15, "probes listening")
    yield running
    if running.process.poll() is None:
        running.stop()


def test_page_is_self_contained_and_small(sandbox: Sandbox) -> None:
    status, body = get(sandbox.nodes["node-1"] + "/mesh")
    assert status == 200
    assert len(body.encode()) < 200 * 1024
    for external in ("http://", "https://", "//cdn", "<link", "src="):
        assert external not in body, external


def test_page_renders_every_node_and_names_a_stopped_node(sandbox: Sandbox, browser) -> None:  # type: ignore[no-untyped-def]
    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    base = sandbox.nodes["node-1"]
    page.goto(base + "/mesh")
    page.wait_for_selector(".verdict[data-kind='ok']", timeout=15_000)
    for node in sandbox.nodes:
        assert page.locator(f"#nodes tr[data-node='{node}']").count() == 1, node
        assert page.locator(f"table.matrix th:text-is('{node}')").count() >= 1, node
    # Each of the 5 probes checks 3 neighbours (the sandbox's limit): 15 paths, all ok.
    # Polled from here: wait_for_function evaluates a string, which the page's CSP forbids.
    deadline = time.monotonic() + 10
    while page.locator("table.matrix td.ok").count() != 15:
        assert time.monotonic() < deadline, "15 ok paths never showed"
        page.wait_for_timeout(100)

    sandbox.command("stop", "node-4")
    stopped = time.monotonic()
    page.wait_for_selector(".verdict[data-kind='node_unreachable'][data-subject='node-4']", timeout=10_000)
    elapsed = time.monotonic() - stopped
    text = page.locator("#verdicts").inner_text()
    assert "node-4 is unreachable" in text
    assert page.locator("table.matrix td.fail[data-to='node-4']").count() == 3
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTEFACTS / "mesh-node-stopped.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("KUBENURSE_DOCS_SCREENSHOTS") == "1":
        shutil.copy(shot, REPO / "docs" / "mesh-node-stopped.png")
    print(f"verdict on the page {elapsed:.1f} s after `stop` returned; screenshot {shot}")

    # Filtering: only the nodes with problems, then by name.
    page.check("#problems")
    assert page.locator("#nodes tbody tr").count() == 4  # node-4 and the 3 probes that check it
    page.fill("#filter", "node-4")
    assert page.locator("#nodes tbody tr").count() == 1
    # Nothing but the probe was asked for anything.
    assert requests and all(u.startswith(base) for u in requests), requests
    sandbox.command("start", "node-4")


def test_a_lossy_node_is_named_with_the_way_it_loses(sandbox: Sandbox, browser) -> None:  # type: ignore[no-untyped-def]
    """`lossy node-5 40%` in the sandbox: the page names node-5's link, with the evidence of
    every probe that checks it; the screenshot is the one in docs/measurement.md."""
    page = browser.new_page()
    base = sandbox.nodes["node-1"]
    page.goto(base + "/mesh")
    page.wait_for_selector("#verdicts .verdict", timeout=15_000)
    sandbox.command("lossy", "node-5", "40%")
    try:
        page.wait_for_selector(".verdict[data-kind='node_lossy'][data-subject='node-5']", timeout=40_000)
        verdict = page.locator(".verdict[data-kind='node_lossy']")
        text = verdict.inner_text()
        assert "node-5 loses packets" in text and "datagrams lost" in text, text
        # The sandbox's proxy drops in each direction; the way is named once the losses since
        # the fault are enough to tell (the verdict may form before).
        try:
            page.wait_for_function(
                "() => [...document.querySelectorAll(\".verdict[data-kind='node_lossy']\")]"
                ".some(v => v.innerText.includes('both ways'))",
                timeout=40_000,
            )
        finally:
            text = verdict.inner_text()
        assert "both ways" in text, text
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTEFACTS / "mesh-node-lossy.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("KUBENURSE_DOCS_SCREENSHOTS") == "1":
            shutil.copy(shot, REPO / "docs" / "mesh-node-lossy.png")
    finally:
        sandbox.command("lossy", "node-5", "0")


@contextlib.contextmanager
def serving(document: dict[str, object], delay: float = 0.0) -> Iterator[str]:
    """The page and a hand-written /mesh.json on a loopback server (no probes needed);
    /mesh.json answers after `delay` seconds."""
    body = json.dumps(document).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/mesh":
                time.sleep(delay)
            content, kind = (PAGE, "text/html") if self.path == "/mesh" else (body, "application/json")
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.end_headers()
            self.wfile.write(content)

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/mesh"
    finally:
        server.shutdown()


TEMPLATE = "http://127.0.0.1:1/explore?trace={trace_id}"


def test_failing_path_links_to_its_trace(browser) -> None:  # type: ignore[no-untyped-def]
    """With KUBENURSE_TRACE_URL_TEMPLATE the document carries trace URLs; the page makes the
    failing cell a link to it. Served from a hand-written document (no tracing needed)."""
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    evidence = Evidence(
        [NodeView("a"), NodeView("b"), NodeView("c")],
        [
            PathView("a", "b", False, None, "connect_done", trace),
            PathView("a", "c", True, 0.001, None, "1" * 32),
            PathView("b", "a", True, 0.001), PathView("b", "c", True, 0.001),
            PathView("c", "a", True, 0.001), PathView("c", "b", True, 0.001),
        ],
        [CheckView("a", "api_server_direct", True, 0.002)],
    )
    document = mesh_document(evidence, judge(evidence), source="a", generated_at=0, trace_url_template=TEMPLATE)
    with serving(document) as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector(".verdict[data-kind='path_broken']", timeout=10_000)
        link = page.locator("td.fail[data-from='a'][data-to='b'] a")
        assert link.get_attribute("href") == TEMPLATE.format(trace_id=trace)
        # A working path is not framed as a link, though it has a trace too.
        assert page.locator("td.ok a").count() == 0


def test_a_large_cluster_is_drawn_and_filtering_brings_the_cells_back(browser) -> None:  # type: ignore[no-untyped-def]
    n, limit, down = 120, 10, 7
    name = [f"node-{i:03d}" for i in range(n)]
    paths = [
        PathView(name[i], name[j], j != down, 0.001, None if j != down else "connect_done", f"{i:016x}{k:016x}")
        for i in range(n) if i != down for k in range(1, limit + 1) for j in [(i + k) % n]
    ]
    evidence = Evidence([NodeView(x, reached=i != down) for i, x in enumerate(name)], paths, [])
    document = mesh_document(evidence, judge(evidence), source="a", generated_at=0, trace_url_template=TEMPLATE)
    with serving(document) as url:
        page = browser.new_page()
        # The trace backend of the template: answered here, nothing leaves the machine.
        browser.route("http://127.0.0.1:1/**", lambda route: route.fulfill(body="a trace"))
        page.goto(url)
        page.wait_for_selector(".verdict[data-kind='node_unreachable'][data-subject='node-007']", timeout=10_000)
        assert page.locator("#matrix-canvas").count() == 1 and page.locator("table.matrix").count() == 0
        assert page.locator("#nodes tbody tr").count() == n
        # Row node-000 (index 0), column node-007: a failing path; a click opens its trace.
        box = page.locator("#matrix-canvas").bounding_box()
        cell = box["width"] / n
        with page.expect_popup() as popup:
            page.mouse.click(box["x"] + (down + 0.5) * cell, box["y"] + 0.5 * cell)
        assert popup.value.url == TEMPLATE.format(trace_id=f"{0:016x}{down:016x}")
        page.fill("#filter", "node-00")
        assert page.locator("#nodes tbody tr").count() == 10
        assert page.locator("table.matrix td.fail[data-to='node-007']").count() == 7  # node-000..006 check it


def cluster(n: int, *, slow: int, dead: int, cordoned: int | None = None, limit: int = 10) -> dict[str, object]:
    """n nodes each checking the next `limit` on the ring; `slow` answers 200 ms late, `dead`
    answers nothing (no report, its paths fail), `cordoned` is left out of the checks."""
    name = [f"node-{i:04d}" for i in range(n)]
    paths = []
    for i in range(n):
        if i in (dead, cordoned):
            continue
        k = 0
        for j in range(i + 1, i + n):
            j %= n
            if j == cordoned:
                continue
            ok = j != dead
            latency = (0.0012 + (i * 7 + j) % 5 * 0.0001 + (0.2 if j == slow else 0.0)) if ok else None
            paths.append(PathView(name[i], name[j], ok, latency, None if ok else "connect_done", f"{i:016x}{j:016x}"))
            k += 1
            if k == limit:
                break
    checks = [
        CheckView(x, t, True, 0.004)
        for i, x in enumerate(name) if i not in (dead, cordoned)
        for t in ("api_server_direct", "api_server_dns", "me_service", "dns_cluster")
    ]
    nodes = [
        NodeView(x, f"kubenurse-{x[5:]}-x7k2p", f"10.1.{i // 250}.{i % 250 + 2}", reached=i != dead,
                 unreached_reason="connection refused (no probe listening)" if i == dead else None,
                 ready=i != cordoned, checked=i != cordoned,
                 not_ready_reason="node cordoned, unschedulable or gone" if i == cordoned else None)
        for i, x in enumerate(name)
    ]
    evidence = Evidence(nodes, paths, checks)
    assessment = assess(evidence)
    return mesh_document(
        evidence, assessment.verdicts, source="kubenurse-0000-x7k2p", generated_at=1_800_000_000,
        rule=assessment.rule, trace_url_template=TEMPLATE,
    )


def fits(page, width: int = 1280) -> None:  # type: ignore[no-untyped-def]
    scroll = page.locator("body").evaluate("b => document.documentElement.scrollWidth")
    assert scroll <= width, f"the page is {scroll} px wide"


def test_200_nodes_one_slow_one_dead_fit_1280px_and_are_named(browser) -> None:  # type: ignore[no-untyped-def]
    document = cluster(200, slow=17, dead=123, cordoned=150)
    kinds = sorted((v["kind"], v["subject"]) for v in document["verdicts"])  # type: ignore[index, union-attr]
    assert kinds == [("node_slow", "node-0017"), ("node_unreachable", "node-0123")]
    with serving(document, delay=1.0) as url:
        page = browser.new_page()
        page.set_viewport_size({"width": 1280, "height": 1000})
        page.goto(url)
        # Before the first answer: something to read, not an empty page.
        assert "Asking every probe" in page.locator("#verdicts").inner_text()
        page.wait_for_selector(".verdict[data-kind='node_unreachable'][data-subject='node-0123']", timeout=10_000)
        page.wait_for_selector(".verdict[data-kind='node_slow'][data-subject='node-0017']", timeout=10_000)
        fits(page)
        dead = page.locator("#nodes tr[data-node='node-0123']").inner_text()
        assert "no answer" in dead and "connection refused" in dead
        assert "Error" not in page.locator("body").inner_text(), "words, not exception names"
        cordoned = page.locator("#nodes tr[data-node='node-0150']").inner_text()
        assert "node cordoned" in cordoned
        # A node whose only failing path goes to the dead node reads healthy.
        healthy = page.locator("#nodes tr[data-node='node-0120']").inner_text()
        assert "all 9" in healthy and "+1 to a node that is down" in healthy, healthy
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTEFACTS / "mesh-200-nodes.png"
        page.screenshot(path=str(shot), full_page=False)
        assert shot.stat().st_size > 10_000
        if os.environ.get("KUBENURSE_DOCS_SCREENSHOTS") == "1":
            shutil.copy(shot, REPO / "docs" / "mesh-200-nodes.png")


def test_2000_nodes_render_within_1280px_and_keep_a_single_fault_visible(browser) -> None:  # type: ignore[no-untyped-def]
    document = cluster(2000, slow=400, dead=1234)
    with serving(document) as url:
        page = browser.new_page()
        page.set_viewport_size({"width": 1280, "height": 1000})
        started = time.monotonic()
        page.goto(url)
        page.wait_for_selector(".verdict[data-kind='node_unreachable'][data-subject='node-1234']", timeout=20_000)
        rendered = time.monotonic() - started
        assert page.locator("#nodes tbody tr").count() == 2000
        fits(page)
        box = page.locator("#matrix-canvas").bounding_box()
        assert box["width"] <= 900
        # The dead node's column shows red somewhere in its block.
        red = page.locator("#matrix-canvas").evaluate(
            """c => { const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data; let n = 0;
                      for (let i = 0; i < d.length; i += 4) if (d[i] > 200 && d[i + 1] < 80) n++; return n; }"""
        )
        assert red > 0
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTEFACTS / "mesh-2000-nodes.png"), full_page=False)
        print(f"2,000 nodes rendered in {rendered:.1f} s")
