"""`kubenurse sandbox`, run the way a new user runs it: as a command, reading what it prints,
acting on it from another terminal (the CLI), from its prompt (stdin) and over its control
endpoint, then pressing Ctrl-C and looking for anything left behind (/proc, no psutil)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

SANDBOX = [sys.executable, "-m", "probe", "sandbox"]
REPO = Path(__file__).resolve().parent.parent
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- helpers -------------------------------------------------------------------------------


def http(method: str, url: str, body: str | None = None, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body.encode() if body is not None else None, method=method)
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with _DIRECT.open(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def get(url: str) -> tuple[int, str]:
    return http("GET", url)


def eventually(check: Callable[[], tuple[bool, object]], timeout: float, what: str) -> None:
    """Poll `check` (-> (done, detail)) until done or the deadline; fail with the last detail."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, detail = check()
        except OSError as e:  # not listening yet / refused
            done, detail = False, repr(e)
        if done:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout} s; last seen: {detail}")
        time.sleep(0.2)


def alive(base: str) -> tuple[int, dict[str, Any]]:
    status, body = get(f"{base}/alive")
    return status, json.loads(body)


def histogram(base: str, check_type: str) -> tuple[float, float]:
    """(sum, count) of kubenurse_httpclient_request_duration_seconds for one check type."""
    _, text = get(f"{base}/metrics")
    values = {"sum": 0.0, "count": 0.0}
    for part in values:
        m = re.search(
            rf'^kubenurse_httpclient_request_duration_seconds_{part}\{{type="{re.escape(check_type)}"\}} (\S+)$',
            text,
            re.M,
        )
        if m:
            values[part] = float(m[1])
    return values["sum"], values["count"]


def listening_ports() -> set[int]:
    """Ports in LISTEN state on this machine, from /proc/net/tcp{,6}."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def children_of(pid: int) -> set[int]:
    """Pids whose parent is `pid`, from /proc/*/stat."""
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.add(int(entry.name))
    return found


def processes_mentioning(text: str) -> set[int]:
    """Our own processes whose command line or environment contains `text`."""
    needle = text.encode()
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        for name in ("cmdline", "environ"):
            try:
                if needle in (entry / name).read_bytes():
                    found.add(int(entry.name))
            except OSError:
                pass  # gone, or not ours
    return found


def alive_pid(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Sandbox:
    """A running `kubenurse sandbox` and what it printed."""

    process: subprocess.Popen[str]
    started: float
    output: list[str] = field(default_factory=list)
    nodes: dict[str, str] = field(default_factory=dict)  # node -> http://address:port
    control_port: int = 0
    prometheus: str | None = None
    logs: Path | None = None

    @property
    def text(self) -> str:
        return "\n".join(self.output)

    def wait_output(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            if m := re.search(pattern, self.text, re.M):
                return m
            if self.process.poll() is not None:
                time.sleep(0.2)  # let the reader thread catch the rest
                raise AssertionError(
                    f"sandbox exited ({self.process.returncode}) before printing {pattern!r}:\n{self.text}\n"
                    f"stderr: {self.process.stderr.read() if self.process.stderr else ''}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not printed within {timeout} s:\n{self.text}")
            time.sleep(0.05)

    def ports(self) -> set[int]:
        """Every port the printed output mentions (probes, stand-ins, control, Prometheus)."""
        return {int(p) for p in re.findall(r"127\.0\.[01]\.\d+:(\d+)", self.text)} | {self.control_port}

    def command(self, *words: str) -> subprocess.CompletedProcess[str]:
        """`kubenurse sandbox --port P <words>`, as from another terminal."""
        return subprocess.run(
            [*SANDBOX, "--port", str(self.control_port), *words], capture_output=True, text=True, timeout=30
        )

    def type(self, line: str) -> None:
        """A command at the sandbox's own prompt."""
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20.0) -> int:
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"sandbox still running {timeout} s after {signal.Signals(sig).name}") from None


def start_sandbox(*args: str, env: dict[str, str] | None = None) -> Sandbox:
    process = subprocess.Popen(
        [*SANDBOX, "--port", "0", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    sandbox = Sandbox(process, time.monotonic())

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            sandbox.output.append(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    try:
        sandbox.wait_output(r"^Ctrl-C stops everything\.$")
        for m in re.finditer(r"^\s+(node-\d+)\s+kubenurse-node-\d+\s+(http://[\d.]+:\d+)/alive\s", sandbox.text, re.M):
            sandbox.nodes[m[1]] = m[2]
        sandbox.control_port = int(sandbox.wait_output(r"--port (\d+) <command>")[1])
        if found := re.search(r"^\s+Prometheus\s+(http://127\.0\.0\.1:\d+)\s", sandbox.text, re.M):
            sandbox.prometheus = found[1]
        sandbox.logs = Path(sandbox.wait_output(r"^\s+logs\s+(\S+)")[1])
    except BaseException:
        process.kill()
        process.wait()
        raise
    return sandbox


def assert_all_gone(sandbox: Sandbox, children: set[int]) -> None:
    still = {pid for pid in children if alive_pid(pid)}
    assert not still, f"children still running after the sandbox exited: {still}"
    assert sandbox.logs is not None
    temp_dir = str(sandbox.logs.parent)
    assert not Path(temp_dir).exists(), f"{temp_dir} left behind"
    leftovers = {pid for pid in processes_mentioning(temp_dir) if alive_pid(pid)}
    assert not leftovers, f"processes of the sandbox left behind: {leftovers}"
    used = sandbox.ports()
    # The ports are bound with SO_REUSEADDR and nothing else picks them in this short window.
    assert not used & listening_ports(), f"still listening on {sorted(used & listening_ports())}"


# --- one sandbox of 3 nodes without Prometheus, shared by the tests below (in file order;
# --- the last one stops it) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    running = start_sandbox("--nodes", "3", "--no-prometheus")
    yield running
    if running.process.poll() is None:
        running.stop()


def test_output_names_every_node_and_the_stand_ins(sandbox: Sandbox) -> None:
    assert list(sandbox.nodes) == ["node-1", "node-2", "node-3"]
    addresses = [urllib.parse.urlsplit(url) for url in sandbox.nodes.values()]
    assert [a.hostname for a in addresses] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert len({a.port for a in addresses}) == 1, "every probe on the same port"
    text = sandbox.text
    for stand_in in ("API server", "Service", "ingress"):
        assert re.search(rf"^\s+{stand_in}\s+https?://127\.0\.0\.1:\d+", text, re.M), stand_in
    assert "Stand-ins (not Kubernetes" in text
    assert "Prometheus  off (--no-prometheus)" in text
    assert sandbox.prometheus is None


def test_every_probe_alive_with_ok_paths_within_10_s(sandbox: Sandbox) -> None:
    def all_ok() -> tuple[bool, object]:
        seen = {}
        for node, base in sandbox.nodes.items():
            status, doc = alive(base)
            results = doc["last_check_result"]
            paths = {k: v for k, v in results.items() if k.startswith("path_")}
            others = {f"path_{n}" for n in sandbox.nodes if n != node}
            seen[node] = (status, results)
            if status != 200 or set(paths) != others or set(paths.values()) != {"ok"}:
                return False, seen
            for check in ("api_server_direct", "api_server_dns", "me_ingress", "me_service"):
                if results.get(check) != "ok":
                    return False, seen
        return True, seen

    eventually(all_ok, timeout=10.0 - (time.monotonic() - sandbox.started), what="every /alive 200 with ok paths")
    for base in sandbox.nodes.values():
        assert get(f"{base}/ready")[0] == 200


def test_a_fresh_sandbox_counts_no_errors(sandbox: Sandbox) -> None:
    # The banner says "every check ok": no probe may have counted a failure on the way up
    # (neighbours and the Service only see a probe once it listens).
    wait_healthy(sandbox)
    for node, base in sandbox.nodes.items():
        status, text = get(f"{base}/metrics")
        assert status == 200
        errors = [line for line in text.splitlines() if line.startswith("kubenurse_errors_total{")]
        assert not errors, (node, errors)


def test_cordon_from_another_terminal(sandbox: Sandbox) -> None:
    done = sandbox.command("cordon", "node-2")
    assert done.returncode == 0, done.stderr
    assert "node-2 cordoned" in done.stdout
    sandbox.wait_output(r"^\[control endpoint\] cordon node-2: node-2 cordoned", timeout=5)  # told in its terminal
    node1, node2, node3 = sandbox.nodes["node-1"], sandbox.nodes["node-2"], sandbox.nodes["node-3"]

    eventually(lambda: (get(f"{node2}/ready")[0] == 503, get(f"{node2}/ready")), 5, "node-2 /ready 503")

    def dropped(base: str) -> Callable[[], tuple[bool, object]]:
        def check() -> tuple[bool, object]:
            _, doc = alive(base)
            results = doc["last_check_result"]
            pods = [n["PodName"] for n in results["neighbourhood"]]
            gone = "kubenurse-node-2" not in pods and "path_node-2" not in results
            series = 'type="path_node-2"' in get(f"{base}/metrics")[1]
            return gone and not series, (pods, sorted(results), series)

        return check

    eventually(dropped(node1), 5, "node-2 out of node-1's neighbourhood and metrics")
    eventually(dropped(node3), 5, "node-2 out of node-3's neighbourhood and metrics")
    assert get(f"{node1}/ready")[0] == 200

    done = sandbox.command("uncordon", "2")  # the short form of the node name
    assert done.returncode == 0, done.stderr
    eventually(lambda: (get(f"{node2}/ready")[0] == 200, get(f"{node2}/ready")), 5, "node-2 /ready 200 again")

    def back(base: str) -> Callable[[], tuple[bool, object]]:
        def check() -> tuple[bool, object]:
            status, doc = alive(base)
            results = doc["last_check_result"]
            return status == 200 and results.get("path_node-2") == "ok", results

        return check

    eventually(back(node1), 5, "node-2 back in node-1's checks")
    eventually(back(node3), 5, "node-2 back in node-3's checks")


def test_slow_from_the_prompt_raises_that_paths_latency(sandbox: Sandbox) -> None:
    node1, node3 = sandbox.nodes["node-1"], sandbox.nodes["node-3"]
    fast_sum, fast_count = histogram(node1, "path_node-3")
    assert fast_count >= 1
    assert fast_sum / fast_count < 0.1, "baseline: loopback checks are fast"

    sandbox.type("slow node-3 200ms")
    sandbox.wait_output(r"node-3: requests to 127\.0\.0\.4 now arrive 200 ms late", timeout=5)
    # A check already under way may still finish fast: start counting after the next one.
    first = histogram(node1, "path_node-3")
    eventually(lambda: (histogram(node1, "path_node-3")[1] > first[1], first), 5, "a check of path_node-3")
    before = histogram(node1, "path_node-3")
    other_before = histogram(node1, "path_node-2")
    eventually(lambda: (histogram(node1, "path_node-3")[1] >= before[1] + 3, before), 10, "three slow checks")
    after = histogram(node1, "path_node-3")
    other_after = histogram(node1, "path_node-2")

    mean = (after[0] - before[0]) / (after[1] - before[1])
    assert 0.19 <= mean < 1.0, f"path_node-3 mean {mean:.3f} s with 200 ms added"
    other_mean = (other_after[0] - other_before[0]) / max(1.0, other_after[1] - other_before[1])
    assert other_mean < 0.1, f"path_node-2 should stay fast, mean {other_mean:.3f} s"

    t0 = time.monotonic()
    assert get(f"{node3}/alive")[0] == 200  # slow, not broken
    assert time.monotonic() - t0 >= 0.2

    sandbox.type("fast node-3")
    sandbox.wait_output(r"node-3: no added delay", timeout=5)


def udp_counts(base: str, check_type: str) -> tuple[float, float]:
    """(sent, lost) UDP datagrams of one check type on a probe's /metrics."""
    text = get(f"{base}/metrics")[1]
    found = {"sent": 0.0, "lost": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("type") == check_type and s.name in (
                "kubenurse_udp_packets_sent_total", "kubenurse_udp_packets_lost_total"
            ):
                found["sent" if "sent" in s.name else "lost"] += s.value
    return found["sent"], found["lost"]


def test_mtu_from_the_prompt(sandbox: Sandbox) -> None:
    """`mtu node-3 1000`: the UDP paths to node-3 fail at `mtu`, HTTP to it stays ok. (`lossy`
    is shown on the mesh page: tests/test_mesh_page.py.)"""
    node1 = sandbox.nodes["node-1"]
    eventually(lambda: (udp_counts(node1, "path_node-3")[0] > 0, None), 15, "a first UDP train")
    sandbox.type("mtu node-3 1000")
    sandbox.wait_output(r"node-3: UDP datagrams over 1000 bytes", timeout=5)

    def mtu_failing() -> tuple[bool, object]:
        status, doc = alive(node1)
        text = doc.get("udp_paths", {}).get("path_node-3", "")
        return text.startswith("mtu: "), (status, doc.get("udp_paths"))

    eventually(mtu_failing, 20, "path_node-3 failing at mtu on node-1")
    assert alive(node1)[1]["last_check_result"]["path_node-3"] == "ok", "HTTP to node-3 is unaffected"
    sandbox.type("mtu node-3 off")
    sandbox.wait_output(r"node-3: datagrams of any size pass", timeout=5)


def test_stop_and_start_over_the_control_endpoint(sandbox: Sandbox) -> None:
    url = f"http://127.0.0.1:{sandbox.control_port}/command"
    node1, node3 = sandbox.nodes["node-1"], sandbox.nodes["node-3"]

    status, text = http("POST", url, "stop node-3")
    assert status == 200, text
    with pytest.raises(OSError):
        get(f"{node3}/alive")  # the node's address refuses connections

    def path_fails() -> tuple[bool, object]:
        status, doc = alive(node1)
        result = doc["last_check_result"].get("path_node-3")
        return status == 500 and result not in (None, "ok", "skipped"), (status, result)

    eventually(path_fails, 5, "node-1's path_node-3 failing")
    status, text = http("POST", url, "status")
    assert status == 200
    assert re.search(r"^node-3\s+stopped", text, re.M), text
    assert "failing checks:" in text and "path_node-3" in text

    status, text = http("POST", url, "start node-3")
    assert status == 200, text

    def healed() -> tuple[bool, object]:
        status, doc = alive(node1)
        return status == 200 and doc["last_check_result"].get("path_node-3") == "ok", doc["last_check_result"]

    eventually(healed, 10, "node-1's path_node-3 ok again")
    eventually(lambda: (alive(node3)[0] == 200, alive(node3)[1]["last_check_result"]), 10, "node-3 healthy again")


def test_api_server_outage(sandbox: Sandbox) -> None:
    node1 = sandbox.nodes["node-1"]
    done = sandbox.command("api", "down")
    assert done.returncode == 0, done.stderr

    def api_checks(expect_ok: bool) -> Callable[[], tuple[bool, object]]:
        def check() -> tuple[bool, object]:
            status, doc = alive(node1)
            results = doc["last_check_result"]
            api = [results.get("api_server_direct"), results.get("api_server_dns")]
            paths_ok = results.get("path_node-2") == "ok"  # discovery keeps the last known neighbours
            if expect_ok:
                return status == 200 and api == ["ok", "ok"], results
            return status == 500 and "ok" not in api and paths_ok, results

        return check

    eventually(api_checks(expect_ok=False), 5, "api_server_* failing during the outage")
    done = sandbox.command("api", "up")
    assert done.returncode == 0, done.stderr
    eventually(api_checks(expect_ok=True), 5, "api_server_* ok after the outage")


def test_bad_commands_are_refused_with_the_reason(sandbox: Sandbox) -> None:
    done = sandbox.command("cordon", "node-9")
    assert done.returncode == 1
    assert "no node 'node-9' (nodes: node-1, node-2, node-3)" in done.stderr
    done = sandbox.command("slow", "node-1", "fast")
    assert done.returncode == 1 and "'fast'" in done.stderr
    done = sandbox.command("reboot")
    assert done.returncode == 1 and "unknown command 'reboot'" in done.stderr
    url = f"http://127.0.0.1:{sandbox.control_port}/command"
    # A web page may POST to localhost too; browsers mark it with Origin.
    assert http("POST", url, "stop node-1", {"Origin": "http://evil.example"})[0] == 403
    assert get(f"{sandbox.nodes['node-1']}/ready")[0] == 200


def wait_healthy(sandbox: Sandbox, timeout: float = 10.0) -> None:
    eventually(
        lambda: (all(alive(base)[0] == 200 for base in sandbox.nodes.values()), None), timeout, "every /alive 200"
    )


def test_ctrl_c_exits_0_and_leaves_nothing_behind(sandbox: Sandbox) -> None:
    wait_healthy(sandbox)  # probes fully up: they then take their time to stop, and must be waited for
    children = children_of(sandbox.process.pid)
    assert len(children) >= 3, f"expected the 3 probes as children, found {children}"
    assert sandbox.ports() & listening_ports()

    assert sandbox.stop(signal.SIGINT) == 0
    assert "sandbox stopped" in sandbox.text
    assert_all_gone(sandbox, children)


# --- separate runs ------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed")
def test_with_prometheus_scraping_every_probe_and_sigterm() -> None:
    sandbox = start_sandbox("--nodes", "3")
    try:
        assert sandbox.prometheus, sandbox.text
        assert f"{sandbox.prometheus}/graph?g0.expr=" in sandbox.text

        def query(promql: str) -> list[dict[str, Any]]:
            qs = urllib.parse.urlencode({"query": promql})
            status, body = get(f"{sandbox.prometheus}/api/v1/query?{qs}")
            if status == 503:  # Prometheus itself still starting ("Service Unavailable")
                raise ConnectionError(body)
            assert status == 200, body
            return list(json.loads(body)["data"]["result"])

        def scraped() -> tuple[bool, object]:
            up = {r["metric"]["node"]: r["value"][1] for r in query("up")}
            paths = query('kubenurse_httpclient_request_duration_seconds_count{type=~"path_.*"}')
            return up == dict.fromkeys(sandbox.nodes, "1") and len(paths) == 6, (up, len(paths))

        eventually(scraped, 25, "Prometheus scraping all three probes")
        children = children_of(sandbox.process.pid)
        assert len(children) >= 4, f"3 probes and Prometheus, found {children}"
        assert sandbox.stop(signal.SIGTERM) == 0
        assert_all_gone(sandbox, children)
    finally:
        if sandbox.process.poll() is None:
            sandbox.process.kill()
            sandbox.process.wait()


def test_without_prometheus_installed_it_says_how_to_get_it() -> None:
    # A PATH with python but no prometheus; the probes start by absolute path.
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    sandbox = start_sandbox("--nodes", "1", env=env)
    try:
        assert sandbox.prometheus is None
        assert "Prometheus  not installed" in sandbox.text
        assert "apt install prometheus" in sandbox.text and "https://prometheus.io/download/" in sandbox.text
        wait_healthy(sandbox)
        children = children_of(sandbox.process.pid)
        assert sandbox.stop(signal.SIGINT) == 0
        assert_all_gone(sandbox, children)
    finally:
        if sandbox.process.poll() is None:
            sandbox.process.kill()
            sandbox.process.wait()


async def test_stopping_a_slowed_proxy_mid_request_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    import logging

    from kubenurse_sandbox.proxy import DelayProxy

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
        writer.close()

    upstream = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    proxy = DelayProxy("127.0.0.1", 0, lambda: [("127.0.0.1", port)], delay=5.0)
    await proxy.start()
    clients = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(5)]
    for _, writer in clients:
        writer.write(b"GET /alwayshappy HTTP/1.1\r\n\r\n")
        await writer.drain()
    await asyncio.sleep(0.2)  # the requests now wait in the delay queue
    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        await proxy.stop()
        await asyncio.sleep(0.1)  # the connection tasks' done-callbacks run
    for reader, writer in clients:
        assert await asyncio.wait_for(reader.read(), 2) == b"", "stop() cuts the connection"
        writer.close()
    upstream.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_timeout_reaches_every_probe_and_a_bad_one_exits_2() -> None:
    """--timeout D is the probes' KUBENURSE_CHECK_TIMEOUT (left out: the probe's default)."""
    from types import SimpleNamespace

    from kubenurse_sandbox.cluster import Sandbox as Cluster
    from kubenurse_sandbox.options import Options

    def environment(options: Options) -> dict[str, str]:
        cluster = Cluster(options, say=lambda _line: None)
        cluster.api_server = cluster.service = cluster.ingress = SimpleNamespace(port=1)  # type: ignore[assignment]
        return cluster.probe_environment(cluster.specs[0])

    assert environment(Options(nodes=1, timeout="2s"))["KUBENURSE_CHECK_TIMEOUT"] == "2s"
    assert "KUBENURSE_CHECK_TIMEOUT" not in environment(Options(nodes=1))
    result = subprocess.run([*SANDBOX, "--timeout", "soon"], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 2 and "--timeout 'soon'" in result.stderr, result.stderr
