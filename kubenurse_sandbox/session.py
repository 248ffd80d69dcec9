"""One sandbox run: bring the cluster up, tell the user where everything is, take commands
until quit / Ctrl-C / SIGTERM, then take it all down (children, sockets, temp files)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time

from aiohttp import web

from kubenurse_sandbox.cluster import Sandbox, reason
from kubenurse_sandbox.control import HELP, Commands, control_app, read_lines
from kubenurse_sandbox.options import Options, SandboxError

#: Waiting for the first all-ok rounds is reported after this long at most.
HEALTHY_WITHIN = 20.0
PROMPT = "sandbox> "


class Console:
    """Prints for the user; keeps a prompt after the output when stdin is a terminal."""

    def __init__(self) -> None:
        self.interactive = os.isatty(0)

    def say(self, text: str) -> None:
        if text:
            print(text, flush=True)
        self.prompt()

    def notice(self, text: str) -> None:
        """Something that happened on its own: replaces the waiting prompt's line."""
        if self.interactive:
            print("\r\033[K", end="")
        self.say(text)

    def prompt(self) -> None:
        if self.interactive:
            print(PROMPT, end="", flush=True)


def summary(sandbox: Sandbox, control_port: int) -> str:
    assert sandbox.api_server is not None and sandbox.service is not None and sandbox.ingress is not None
    port = sandbox.probe_port
    n = len(sandbox.nodes)
    lines = [
        f"kubenurse sandbox: {n} probe{'s' if n != 1 else ''}, one per node of a pretend cluster, all on loopback",
        "",
        "  node     pod                  /alive                              /metrics",
    ]
    for node in sandbox.nodes.values():
        s = node.spec
        alive, metrics = f"http://{s.address}:{port}/alive", f"http://{s.address}:{port}/metrics"
        lines.append(f"  {s.name:<8} {s.pod:<20} {alive:<35} {metrics}")
    first = next(iter(sandbox.nodes.values())).spec.address
    lines += [
        "",
        f"  Mesh view   http://{first}:{port}/mesh   who reaches whom, and where it is broken (any probe's /mesh);",
        f"              in a terminal: kubenurse mesh http://{first}:{port}",
        "",
        "  Stand-ins (not Kubernetes; what each probe checks besides its neighbours):",
        f"  API server  {sandbox.api_server.url}   api_server_direct; api_server_dns through the name localhost",
        f"  Service     http://127.0.0.1:{sandbox.service.port}"
        "   me_service: round-robin over the ready probes, like a ClusterIP Service",
        f"  ingress     http://127.0.0.1:{sandbox.ingress.port}"
        "   me_ingress: forwards to the Service, like an ingress controller",
    ]
    if sandbox.prometheus_url:
        lines += [
            f"  Prometheus  {sandbox.prometheus_url}   scrapes every probe each second (first data in ~10 s)",
            f"              p90 per check: {sandbox.prometheus_graph_url()}",
        ]
    elif sandbox.options.prometheus:
        lines.append(
            "  Prometheus  not installed: with `prometheus` on PATH (Debian/Ubuntu: apt install prometheus;"
            " else https://prometheus.io/download/) the sandbox runs one scraping every probe"
        )
    else:
        lines.append("  Prometheus  off (--no-prometheus)")
    lines += [
        f"  logs        {sandbox.dir / 'logs'}  (removed on exit)",
        "",
        f"  A node's address is a proxy in front of its probe (the probe listens on 127.0.1.x:{port}),",
        "  so `slow` can delay every check to that node.",
        "",
        f"Commands: type them here, or from another terminal: kubenurse sandbox --port {control_port} <command>",
        f"(or: curl -d 'status' http://127.0.0.1:{control_port}/command)",
        HELP,
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


async def _serve_control(commands: Commands, port: int, console: Console) -> tuple[web.AppRunner, int]:
    bound: list[int] = [port]
    app = control_app(commands, lambda: bound[0], console.notice)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise SandboxError(
            f"cannot listen on 127.0.0.1:{port} ({reason(e)}): another sandbox? "
            f"(`kubenurse sandbox --port {port} status`) or choose another --port"
        ) from None
    bound[0] = runner.addresses[0][1]
    return runner, bound[0]


async def _take_commands(commands: Commands, console: Console) -> None:
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    read_lines(asyncio.get_running_loop(), queue)
    console.prompt()
    while (line := await queue.get()) is not None:
        reply = await commands.run(line)
        if reply.quit:
            return
        console.say(reply.text)
    if console.interactive:  # Ctrl-D at the prompt; a closed pipe just means no prompt
        print()
        commands.on_quit()


async def _report_health(sandbox: Sandbox, console: Console, started: float) -> None:
    sick = await sandbox.wait_healthy(HEALTHY_WITHIN)
    took = time.monotonic() - started
    if sick:
        console.notice(f"after {took:.0f} s not every check is ok yet on {', '.join(sick)}; try `status`")
    else:
        n = len(sandbox.nodes)
        probes = {1: "the probe answers", 2: "both probes answer"}.get(n, f"all {n} probes answer")
        # dns_cluster is off here (no cluster DNS on loopback): "every check" is every one performed.
        console.notice(f"ready after {took:.1f} s: {probes} /alive 200, every check performed ok")


async def run(options: Options) -> int:
    started = time.monotonic()
    console = Console()
    stop = asyncio.Event()
    sandbox = Sandbox(options, say=console.notice)
    commands = Commands(sandbox, stop.set)
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stop.set()
        if signals > 1:  # impatient: kill the children now instead of waiting for them
            sandbox.kill_all()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal)
    control: web.AppRunner | None = None
    tasks: list[asyncio.Task[None]] = []
    code = 0
    try:
        control, control_port = await _serve_control(commands, options.port, console)
        starting = asyncio.create_task(sandbox.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not starting.done():
            starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        if starting.cancelled():
            return 0
        starting.result()  # SandboxError: reported below
        commands.ready = True
        print(summary(sandbox, control_port), flush=True)
        tasks = [
            asyncio.create_task(_report_health(sandbox, console, started)),
            asyncio.create_task(_take_commands(commands, console)),
        ]
        await stop.wait()
    except SandboxError as e:
        print(f"kubenurse sandbox: {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        commands.ready = False
        if console.interactive:
            print()
        print("stopping the sandbox ...", flush=True)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if control is not None:
            await control.cleanup()
        await sandbox.close(hurry=signals > 1)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
        print("sandbox stopped: every process ended, temporary files removed", flush=True)
    return code
