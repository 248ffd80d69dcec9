"""What discovery costs at 5,000 nodes: selection time, cache memory, churn, and how soon a
new pod gets checked. Printed, not asserted: `python bench/bench_discovery.py`.

The API-server stand-in runs in a child process (driven over stdin/stdout), so the
numbers of this process are the probe's alone: memory by tracemalloc (allocations made
under probe/discovery and probe/neighbours still held after the first sync) and by RSS.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from probe.app import Probe
from probe.discovery import make_discovery
from probe.discovery.cache import Reflector
from probe.discovery.source import KubeDiscovery
from probe.neighbours import NodeInfo, PodInfo, ring_hash, select_neighbours
from probe.settings import Settings

SIZE = 5000
NS = "kubenurse"
LABELS = {"app.kubernetes.io/name": "kubenurse"}
FILTER = "app.kubernetes.io/name=kubenurse"
OURS = ("*/probe/discovery/*", "*/probe/neighbours.py")

Results = list[tuple[str, str]]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def _mb(size: float) -> str:
    return f"{size / 1e6:.1f} MB"


def _p50(fn: Callable[[], object], repetitions: int) -> float:
    times = []
    for _ in range(repetitions):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


async def _until(check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not reached")
        await asyncio.sleep(0.001)


# The stand-in, in a child process ---------------------------------------------------------


def _serve_standin(folder: str, size: int, kubelets: bool = False) -> None:
    """Child process: a stand-in with `size` probe pods on `size` nodes, plus node-me;
    one JSON command per stdin line, one JSON answer per stdout line. `kubelets`: realistic
    nodes (~14 KB each), heartbeats as real kubelets send them, bookmarks every minute."""
    from kubenurse_sandbox.standin import ApiServerStandin

    def pod(api: ApiServerStandin, name: str, node: str, ip: str) -> None:
        api.add_pod(name, namespace=NS, node_name=node, pod_ip=ip, labels=LABELS)

    def churn(api: ApiServerStandin, round_: int) -> dict[str, int]:
        """Status-only pod changes (most real pod events), pods replaced, nodes (un)cordoned."""
        events = 0
        for i in range(0, size, 2):
            api.update_pod(f"kubenurse-{i}", lambda p: p["metadata"].setdefault("annotations", {}).update(
                {"churn": str(round_)}), namespace=NS)
            events += 1
        for i in range(min(500, size)):
            api.delete_pod(f"kubenurse-{i}", namespace=NS)
            pod(api, f"kubenurse-{i}", f"node-{i}", f"10.{i // 256}.{i % 256}.{round_ + 2}")
            pods_rv = api.resource_version
            node = f"node-{size - 1 - i}"
            api.cordon(node) if round_ % 2 == 0 else api.uncordon(node)
            events += 3
        return {"events": events, "pods_rv": pods_rv, "nodes_rv": api.resource_version}

    async def main() -> None:
        # No bookmarks: the stand-in's watch stalls when one falls due with events queued
        # (see the report); the probe's idle timeout would recover, but cost seconds here.
        if kubelets:
            api = ApiServerStandin(bookmark_interval=60.0, history_size=100_000, realistic_nodes=True)
        else:
            api = ApiServerStandin(bookmark_interval=3600.0, history_size=100_000)
        api.add_node("node-me")
        for i in range(size):
            api.add_node(f"node-{i}")
            pod(api, f"kubenurse-{i}", f"node-{i}", f"10.{i // 256}.{i % 256}.1")
        await api.start()
        if kubelets:
            # Every node every 5 minutes, and 1% of them turning a condition over every 10 s.
            api.start_heartbeats(period=300.0, flapping=0.01, flap_period=10.0)
        api.write_serviceaccount(folder, NS)
        print(json.dumps({"port": api.port, "rv": api.resource_version}), flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            command = json.loads(line)
            op, answer = command.pop("op"), {}
            if op == "churn":
                answer.update(churn(api, command["round"]))
            elif op == "add_node":
                api.add_node(command["name"])
            elif op == "add_pod":
                pod(api, command["name"], command["node"], command["ip"])
            elif op == "delete_pod":
                api.delete_pod(command["name"], namespace=NS)
            elif op == "meter":
                answer["bytes"] = dict(api.sent_bytes)
                answer["events"] = dict(api.sent_events)
                answer["requests"] = dict(Counter(r.user_agent for r in api.requests))
            elif op == "fault":
                api.fault = command["fault"]
                if api.fault:
                    api.end_watches()
            elif op in ("cordon", "uncordon"):
                getattr(api, op)(command["name"])
            elif op == "lists":
                lists = [r for r in api.requests if r.verb == "list"]
                answer["lists"] = sum(1 for r in lists if "continue" not in r.query)
                answer["pages"] = len(lists)
            answer["rv"] = api.resource_version
            print(json.dumps(answer), flush=True)
        await api.stop()

    asyncio.run(main())


class Standin:
    """The parent's handle on the child process."""

    def __init__(self, folder: Path, size: int, kubelets: bool = False) -> None:
        self.folder = folder
        self._process = subprocess.Popen(
            [sys.executable, __file__, "--serve-standin", str(folder), str(size), *(["kubelets"] if kubelets else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.port = int(self._answer()["port"])

    def _answer(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError("stand-in process ended")
        return dict(json.loads(line))

    def call(self, op: str, **arguments: object) -> dict[str, Any]:
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self._process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def settings(self, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "kubernetes_service_host": "127.0.0.1",
            "kubernetes_service_port": self.port,
            "serviceaccount_dir": str(self.folder),
            "neighbour_filter": FILTER,
            "pod_name": "kubenurse-me",
            "node_name": "node-me",
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]


# Selection -------------------------------------------------------------------------------


def bench_selection() -> Results:
    pods = [PodInfo(f"kubenurse-{i}", f"node-{i}", f"10.{i // 256}.{i % 256}.1", "192.168.0.1", "Running")
            for i in range(SIZE)]
    nodes = {f"node-{i}": NodeInfo(f"node-{i}") for i in range(SIZE)}

    def select(limit: int) -> object:
        return select_neighbours(pods, nodes, own_pod="kubenurse-7", own_node="node-7", limit=limit)

    ring_hash.cache_clear()
    started = time.perf_counter()
    select(10)
    cold = time.perf_counter() - started
    return [
        ("select 10 among 5,000, first time (hashes every node)", _ms(cold)),
        ("select 10 among 5,000, p50 of 50", _ms(_p50(lambda: select(10), 50))),
        ("order all 5,000 (limit 0), p50 of 20", _ms(_p50(lambda: select(0), 20))),
    ]


# The cache at 5,000 ------------------------------------------------------------------------


def _ours(snapshot: tracemalloc.Snapshot) -> int:
    filtered = snapshot.filter_traces([tracemalloc.Filter(True, pattern, all_frames=True) for pattern in OURS])
    return sum(stat.size for stat in filtered.statistics("filename"))


def _reflectors(source: KubeDiscovery) -> list[Reflector[Any]]:
    assert source.kube_neighbours is not None and source.kube_neighbours.pods is not None
    return [source.kube_neighbours.pods, *source.nodes.reflectors()]


def _deep_size(source: KubeDiscovery) -> int:
    """Bytes held by the caches: dicts, records and their strings (shared ones once)."""
    seen: set[int] = set()
    total = 0
    for reflector in _reflectors(source):
        total += sys.getsizeof(reflector.items)
        for key, record in reflector.items.items():
            for value in (key, record, *(getattr(record, f) for f in record.__slots__)):
                if id(value) not in seen and not isinstance(value, bool):
                    seen.add(id(value))
                    total += sys.getsizeof(value)
    return total


async def _synced(source: KubeDiscovery, pods_rv: int, nodes_rv: int) -> None:
    pods, nodes = _reflectors(source)[0], source.nodes.cluster
    assert nodes is not None
    await _until(lambda: int(pods.resource_version or 0) >= pods_rv and int(nodes.resource_version or 0) >= nodes_rv)


async def bench_cache(folder: Path) -> Results:
    standin = Standin(folder, SIZE)
    results: Results = []
    try:
        # Timed without tracemalloc, which slows allocation-heavy code several times.
        timed = make_discovery(standin.settings())
        assert isinstance(timed, KubeDiscovery)
        gc.collect()
        rss_before = _rss()
        started = time.perf_counter()
        await timed.start()
        await _until(lambda: len(timed.neighbours.current().neighbours) == 10)
        synced = time.perf_counter() - started
        gc.collect()
        rss_after = _rss()
        await timed.stop()

        source = make_discovery(standin.settings())
        assert isinstance(source, KubeDiscovery)
        gc.collect()
        tracemalloc.start(8)
        await source.start()
        await _until(lambda: len(source.neighbours.current().neighbours) == 10)
        gc.collect()
        held = _ours(tracemalloc.take_snapshot())
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        before = _deep_size(source)
        results += [
            ("first list of 5,000 pods + the ring front's nodes -> selection", f"{synced:.2f} s"),
            ("cache memory held after the first list (tracemalloc)", _mb(held)),
            ("peak traced memory of the whole process during the first list", _mb(peak)),
            ("RSS growth over the first list", _mb(rss_after - rss_before)),
        ]

        async def churn(round_: int) -> int:
            answer = standin.call("churn", round=round_)
            await _synced(source, answer["pods_rv"], answer["nodes_rv"])
            source.neighbours.current()
            return int(answer["events"])

        started = time.perf_counter()
        events = await churn(0) + await churn(1)
        churn_time = time.perf_counter() - started
        # Steady state from here: what the Python heap and the RSS still gain per round.
        gc.collect()
        rss_early = _rss()
        tracemalloc.start(1)
        heap_early = tracemalloc.get_traced_memory()[0]
        later = 0
        for round_ in range(2, 8):
            later += await churn(round_)
        gc.collect()
        heap_growth = tracemalloc.get_traced_memory()[0] - heap_early
        tracemalloc.stop()
        after = _deep_size(source)
        results += [
            (f"{events:,} watch events (2 rounds of churn), written and applied", f"{churn_time:.2f} s"),
            ("cache records before churn (deep size)", _mb(before)),
            (f"cache records after {events + later:,} events (flat = about the same)", _mb(after)),
            (f"Python heap growth over the last {later:,} events (tracemalloc)", _mb(heap_growth)),
            (f"RSS growth over the last {later:,} events (allocator, not objects)", _mb(_rss() - rss_early)),
        ]

        results.append(("current() when nothing changed, p50",
                        f"{_p50(source.neighbours.current, 10_000) * 1e6:.2f} µs"))
        pods = _reflectors(source)[0]

        def one_change() -> None:
            info = pods.items["kubenurse-42"]
            pods.items[info.name] = PodInfo(info.name, info.node_name, info.pod_ip, info.host_ip, info.phase,
                                            not info.terminating)
            pods.data_revision += 1
            source.neighbours.current()

        results.append(("current() after one pod changed (selects again), p50", _ms(_p50(one_change, 50))))
        lists = standin.call("lists")
        results.append(("lists in all of the above (2 sources x pods, cordoned nodes, ring-front nodes; pages of 500)",
                        f"{lists['lists']} ({lists['pages']} pages)"))
        await source.stop()
    finally:
        standin.close()
    return results


# What the API server sends one probe at 5,000 nodes (issue 12) ----------------------------

#: Steady-state windows (seconds): long enough for many heartbeats to land.
WINDOW_AFTER = float(os.environ.get("BENCH_WATCH_WINDOW", "60"))
WINDOW_BEFORE = WINDOW_AFTER / 2


def _agent(pod: str) -> str:
    return f"kubenurse-otel/discovery (pod {pod})"


def _ring_predecessors(victim: str, names: list[str], count: int) -> list[str]:
    """The `count` nodes just before `victim` on the ring: `victim` is in their next ten."""
    order = sorted(names, key=ring_hash)
    at = order.index(victim)
    return [order[(at - k) % len(order)] for k in range(1, count + 1)]


async def _steady(standin: Standin, agents: list[str], window: float) -> tuple[float, float, float]:
    """(bytes/s, events/s, CPU s/s) per probe over `window` seconds, averaged over `agents`."""
    first = standin.call("meter")
    cpu = time.process_time()
    await asyncio.sleep(window)
    cpu = time.process_time() - cpu
    last = standin.call("meter")
    sent = sum(last["bytes"].get(a, 0) - first["bytes"].get(a, 0) for a in agents)
    events = sum(last["events"].get(a, 0) - first["events"].get(a, 0) for a in agents)
    per = len(agents) * window
    return sent / per, events / per, cpu / per


async def bench_watch_cost(folder: Path, probes: int = 3, others: int = 9) -> Results:
    standin = Standin(folder, SIZE, kubelets=True)
    names = [f"node-{i}" for i in range(SIZE)]
    victim = "node-100"
    try:
        # After: narrow watches (the default, limit 10): `probes` on the nodes just before
        # the victim (they check it), `others` spread over the ring (a fair mean: adjacent
        # probes share their ring front, and with it their luck with flapping nodes).
        sources = []
        spread = names[1000 :: (SIZE - 1000) // others][:others]
        for node in _ring_predecessors(victim, names, probes) + spread:
            pod = "kubenurse-" + node.removeprefix("node-")
            source = make_discovery(standin.settings(pod_name=pod, node_name=node))
            assert isinstance(source, KubeDiscovery)
            sources.append(source)
        started = time.perf_counter()
        await asyncio.gather(*(s.start() for s in sources))
        await _until(lambda: all(len(s.neighbours.current().neighbours) == 10 for s in sources))
        synced = time.perf_counter() - started
        checking = sources[:probes]
        assert all(victim in {n.node_name for n in s.neighbours.current().neighbours} for s in checking)
        agents = [_agent(s.settings.pod_name) for s in sources]
        first = standin.call("meter")
        first_bytes = sum(first["bytes"].get(a, 0) for a in agents) / len(agents)
        await asyncio.sleep(5.0)
        after = await _steady(standin, agents, WINDOW_AFTER)
        watches = statistics.mean(s.nodes.watching() + 1 for s in sources)

        def dropped() -> bool:
            return all(victim not in {n.node_name for n in s.neighbours.current().neighbours} for s in checking)

        cordoned = time.perf_counter()
        standin.call("cordon", name=victim)
        await _until(dropped, timeout=30)
        cordon_time = time.perf_counter() - cordoned
        standin.call("uncordon", name=victim)
        await _until(lambda: all(victim in {n.node_name for n in s.neighbours.current().neighbours} for s in checking),
                     timeout=30)
        back_time = time.perf_counter() - cordoned - cordon_time
        requests = standin.call("meter")["requests"]
        per_probe_requests = statistics.mean(requests.get(a, 0) for a in agents)
        for s in sources:
            await s.stop()

        # Before: one full watch of every node (what every probe did, and LIMIT=0 still does).
        full = make_discovery(standin.settings(pod_name="kubenurse-full", node_name="node-me", neighbour_limit=0))
        assert isinstance(full, KubeDiscovery)
        started = time.perf_counter()
        await full.start()
        await _until(lambda: len(full.neighbours.current().neighbours) == SIZE)
        full_synced = time.perf_counter() - started
        full_first = standin.call("meter")["bytes"].get(_agent("kubenurse-full"), 0)
        await asyncio.sleep(5.0)
        before = await _steady(standin, [_agent("kubenurse-full")], WINDOW_BEFORE)
        await full.stop()
    finally:
        standin.close()
    kb = 1000.0
    return [
        ("5,000 realistic nodes (~14 KB), heartbeats every 5 min + 1% flapping every 10 s", ""),
        (f"before (full node watch): bytes/s sent to one probe, {WINDOW_BEFORE:g} s window",
         f"{before[0] / kb:,.1f} KB/s"),
        ("before: watch events/s to one probe", f"{before[1]:.2f}"),
        ("before: probe CPU on discovery", f"{before[2] * 100:.2f} %"),
        ("before: first list (bytes, time to selection)", f"{full_first / 1e6:.1f} MB, {full_synced:.2f} s"),
        (f"after (narrow watches, limit 10): bytes/s to one probe, mean of {len(agents)}, {WINDOW_AFTER:g} s",
         f"{after[0]:,.0f} B/s"),
        ("after: watch events/s to one probe", f"{after[1]:.3f}"),
        ("after: probe CPU on discovery", f"{after[2] * 100:.3f} %"),
        (f"after: first lists per probe (bytes; time to selection, {len(agents)} starting at once)",
         f"{first_bytes / 1e6:.2f} MB, {synced:.2f} s"),
        ("after: open watches per probe (pods, cordoned nodes, each node)", f"{watches:.1f}"),
        ("after: requests per probe over the whole run", f"{per_probe_requests:.0f}"),
        (f"cordon -> dropped by all {probes} probes checking that node", _ms(cordon_time)),
        (f"uncordon -> checked again by all {probes}", _ms(back_time)),
    ]


# A misbehaving API server (issue 11): what the probe sends it ------------------------------


async def bench_faults(folder: Path, window: float = 45.0) -> Results:
    """Requests per minute one probe sends while every watch ends at once ("short_watches")
    or every resumed watch answers 410 ("gone_after_list"), with production pacing."""
    standin = Standin(folder, 50)
    results: Results = []
    try:
        source = make_discovery(standin.settings(pod_name="kubenurse-0", node_name="node-0"))
        assert isinstance(source, KubeDiscovery)
        await source.start()
        agent = _agent("kubenurse-0")
        for fault in (None, "short_watches", "gone_after_list"):
            standin.call("fault", fault=fault)
            before = standin.call("meter")["requests"].get(agent, 0)
            cpu, rss = time.process_time(), _rss()
            await asyncio.sleep(window)
            sent = standin.call("meter")["requests"].get(agent, 0) - before
            cpu = time.process_time() - cpu
            hood = source.neighbours.current()
            retrying = hood.details.get("retrying") or {}
            results.append((
                f"fault {fault or 'none'}: requests/min to the API server ({window:g} s from its start), "
                "discovery CPU, RSS, watches retrying",
                f"{sent * 60 / window:.0f}/min, {cpu / window * 100:.2f} %, {_mb(rss)}, "
                f"{len(retrying) if isinstance(retrying, dict) else 0}",
            ))
        await source.stop()
    finally:
        standin.close()
    return results


# From a new pod to its first check --------------------------------------------------------


def _port_free_on(*hosts: str) -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        try:
            for host in hosts:
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


def _has_pod(probe: Probe, name: str) -> Callable[[], bool]:
    return lambda: any(n.pod_name == name for n in probe.neighbours.current().neighbours)


async def bench_latency(folder: Path, repetitions: int = 5, interval: float = 1.0) -> Results:
    standin = Standin(folder, 0)
    port = _port_free_on("127.0.0.1", "127.0.0.2")
    hits: list[float] = []

    async def happy(_request: web.Request) -> web.Response:
        hits.append(time.monotonic())
        return web.Response(text="I'm happy\n")

    app = web.Application()
    app.router.add_get("/alwayshappy", happy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.2", port).start()
    settings = standin.settings(listen_host="127.0.0.1", http_port=port, check_interval=interval,
                                check_api_server_dns=False)
    probe = Probe(settings)
    await probe.start()
    seen, checked = [], []
    try:
        for k in range(repetitions):
            standin.call("add_node", name=f"node-{k}")
            hits.clear()
            started = time.monotonic()
            standin.call("add_pod", name=f"new-{k}", node=f"node-{k}", ip="127.0.0.2")
            await _until(_has_pod(probe, f"new-{k}"))
            seen.append(time.monotonic() - started)
            await _until(lambda: bool(hits))
            checked.append(hits[0] - started)
            standin.call("delete_pod", name=f"new-{k}")
            await _until(lambda: not probe.neighbours.current().neighbours)
            await asyncio.sleep(interval * (k + 1) / (repetitions + 1))  # land at other points of a round
    finally:
        await probe.stop()
        await runner.cleanup()
        standin.close()
    return [
        (f"pod added -> in current() via the watch, p50 of {repetitions}", _ms(statistics.median(seen))),
        (f"pod added -> first check received, interval {interval:g} s, p50 / max",
         f"{_ms(statistics.median(checked))} / {_ms(max(checked))}"),
    ]


# Import cost (what the in-cluster path avoids) ---------------------------------------------

_RSS = """
import json, sys
def rss():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmRSS'))
import probe.app, probe.discovery
base = rss()
for name in sys.argv[1:]:
    __import__(name)
print(json.dumps([base, rss()]))
"""


def bench_imports() -> Results:
    def run(*modules: str) -> list[int]:
        out = subprocess.run([sys.executable, "-c", _RSS, *modules], capture_output=True, text=True, check=True)
        return list(json.loads(out.stdout))

    base, _ = run()
    _, with_kube = run("kubernetes_asyncio.config")
    return [
        ("RSS after importing the probe (in-cluster discovery, no kubernetes_asyncio)", _mb(base)),
        ("extra RSS of kubernetes_asyncio.config (KUBECONFIG mode only)", _mb(with_kube - base)),
    ]


async def _run() -> Results:
    results = bench_selection()
    with tempfile.TemporaryDirectory() as tmp:
        results += await bench_watch_cost(Path(tmp) / "sa-watch")
        results += await bench_faults(Path(tmp) / "sa-faults")
        results += await bench_cache(Path(tmp) / "sa-cache")
        results += await bench_latency(Path(tmp) / "sa-latency")
    results += bench_imports()
    return results


def run() -> list[tuple[str, str]]:
    """(label, value) pairs."""
    return asyncio.run(_run())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-standin"]:
        _serve_standin(sys.argv[2], int(sys.argv[3]), sys.argv[4:5] == ["kubelets"])
    else:
        if sys.argv[1:2] == ["watch"]:  # only the watch cost at 5,000 nodes
            with tempfile.TemporaryDirectory() as folder:
                rows = asyncio.run(bench_watch_cost(Path(folder) / "sa"))
        elif sys.argv[1:2] == ["faults"]:  # only a misbehaving API server
            with tempfile.TemporaryDirectory() as folder:
                rows = asyncio.run(bench_faults(Path(folder) / "sa"))
        else:
            rows = run()
        width = max(len(label) for label, _ in rows)
        for label, value in rows:
            print(f"{label:<{width}}  {value}")
