"""Acting on a running sandbox: one small command language, typed at the sandbox's prompt or
sent to its control endpoint (POST http://127.0.0.1:<port>/command, body = the command),
which is what `kubenurse sandbox [--port P] <command>` does from another terminal."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from kubenurse_sandbox.options import SandboxError
from probe.settings import parse_duration

if TYPE_CHECKING:
    from kubenurse_sandbox.cluster import Sandbox

HELP = """\
commands (NODE is node-2 or just 2):
  status               every node: probe running, cordoned, delay, /ready, /alive, failing checks
  cordon NODE          as kubectl cordon: its probe's /ready turns 503, the others stop checking it
  uncordon NODE        undo cordon
  stop NODE            stop the node's probe; its pod stays listed, so the paths to it fail
  start NODE           start it again
  slow NODE DURATION   delay every connection to NODE by DURATION (200ms, 1.5s; over 6s: timeouts)
  fast NODE            remove the delay
  lossy NODE PERCENT   lose PERCENT of the UDP datagrams to and from NODE (0 to stop)
  mtu NODE BYTES|off   drop UDP datagrams over BYTES to and from NODE (a path MTU black hole)
  api down | api up    an API-server outage (api_server_* checks fail) and its end
  help                 this text
  quit                 stop everything, as Ctrl-C does"""


@dataclass(frozen=True)
class Reply:
    ok: bool
    text: str
    quit: bool = False


class CommandError(Exception):
    pass


class Commands:
    """Runs command lines against a sandbox, one at a time."""

    def __init__(self, sandbox: Sandbox, on_quit: Callable[[], None]) -> None:
        self.sandbox = sandbox
        self.on_quit = on_quit
        self.ready = False  # set once the sandbox is up
        self._lock = asyncio.Lock()

    async def run(self, line: str) -> Reply:
        words = line.split()
        if not words:
            return Reply(True, "")
        verb, args = words[0].lower(), words[1:]
        if verb in ("help", "?", "-h", "--help"):
            return Reply(True, HELP)
        if verb in ("quit", "exit"):
            self.on_quit()
            return Reply(True, "stopping the sandbox", quit=True)
        if not self.ready:
            return Reply(False, "the sandbox is still starting (or already stopping); try again in a moment")
        async with self._lock:
            try:
                return Reply(True, await self._dispatch(verb, args))
            except (CommandError, KeyError, SandboxError) as e:
                message = e.args[0] if e.args else str(e)
                return Reply(False, f"{message}\n(type help for the commands)")

    async def _dispatch(self, verb: str, args: list[str]) -> str:
        s = self.sandbox
        if verb == "status":
            _expect(verb, args, 0)
            return await s.status()
        if verb == "api":
            _expect(verb, args, 1, "api down | api up")
            if args[0] == "down":
                return await s.api_server_down()
            if args[0] == "up":
                return await s.api_server_up()
            raise CommandError("usage: api down | api up")
        simple: dict[str, Callable[[str], str | Awaitable[str]]] = {
            "cordon": s.cordon,
            "uncordon": s.uncordon,
            "stop": s.stop_node,
            "start": s.start_node,
            "fast": s.fast,
        }
        if verb in simple:
            _expect(verb, args, 1, f"{verb} NODE")
            result = simple[verb](self._node(args[0]))
            return result if isinstance(result, str) else await result
        if verb == "slow":
            _expect(verb, args, 2, "slow NODE DURATION  (e.g. slow node-2 200ms)")
            try:
                delay = parse_duration(args[1])
            except ValueError as e:
                raise CommandError(f"{args[1]!r}: {e}") from None
            if delay > 60:
                raise CommandError("at most 60s")
            return s.slow(self._node(args[0]), delay)
        if verb == "lossy":
            _expect(verb, args, 2, "lossy NODE PERCENT  (e.g. lossy node-2 10%)")
            try:
                share = float(args[1].rstrip("%")) / 100
            except ValueError:
                raise CommandError(f"{args[1]!r} is not a percentage") from None
            if not 0 <= share <= 1:
                raise CommandError("between 0% and 100%")
            return s.lossy(self._node(args[0]), share)
        if verb == "mtu":
            _expect(verb, args, 2, "mtu NODE BYTES|off  (e.g. mtu node-2 1400)")
            if args[1] == "off":
                return s.mtu(self._node(args[0]), None)
            if not args[1].isdigit() or not 68 <= int(args[1]) <= 65535:
                raise CommandError(f"{args[1]!r}: a size in bytes, 68 to 65535, or off")
            return s.mtu(self._node(args[0]), int(args[1]))
        raise CommandError(f"unknown command {verb!r}")

    def _node(self, word: str) -> str:
        name = f"node-{word}" if word.isdigit() else word
        self.sandbox.node(name)  # KeyError with the list of nodes
        return name


def _expect(verb: str, args: list[str], count: int, usage: str | None = None) -> None:
    if len(args) != count:
        raise CommandError(f"usage: {usage or verb}")


# The control endpoint ----------------------------------------------------------------------


def control_app(
    commands: Commands, port: Callable[[], int], notice: Callable[[str], None] = lambda _text: None
) -> web.Application:
    """`notice` tells the sandbox's own terminal what was changed from elsewhere."""

    async def command(request: web.Request) -> web.Response:
        # A web page could POST here (it may not read the answer): browsers send Origin, curl
        # and our client do not. The Host check stops DNS rebinding.
        if request.headers.get("Origin"):
            return web.Response(status=403, text="requests from web pages are refused\n")
        if request.host not in (f"127.0.0.1:{port()}", f"localhost:{port()}"):
            return web.Response(status=403, text="use http://127.0.0.1:<port>/command\n")
        line = (await request.text())[:1000]
        reply = await commands.run(line)
        if reply.ok and line.split()[:1] not in ([], ["status"], ["help"]):
            notice(f"[control endpoint] {line.strip()}: {reply.text}")
        return web.Response(status=200 if reply.ok else 400, text=reply.text + "\n")

    async def index(_request: web.Request) -> web.Response:
        usage = f"POST a command to /command, e.g. curl -d 'cordon node-2' http://127.0.0.1:{port()}/command"
        return web.Response(text=f"{usage}\n\n{HELP}\n")

    app = web.Application(client_max_size=4096)
    app.router.add_post("/command", command)
    app.router.add_get("/", index)
    return app


def send(port: int, words: list[str]) -> int:
    """`kubenurse sandbox [--port P] <command>`: run it in the sandbox on 127.0.0.1:P."""
    url = f"http://127.0.0.1:{port}/command"
    request = urllib.request.Request(url, data=" ".join(words).encode(), method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP proxy
    try:
        with opener.open(request, timeout=30) as response:
            print(response.read().decode().rstrip())
            return 0
    except urllib.error.HTTPError as e:
        print(e.read().decode().rstrip(), file=sys.stderr)
        return 1
    except OSError as e:
        reason = getattr(e, "reason", e)
        print(
            f"kubenurse sandbox: no sandbox answers on 127.0.0.1:{port} ({reason});"
            " start one with `kubenurse sandbox`, or give its --port",
            file=sys.stderr,
        )
        return 1


# The prompt --------------------------------------------------------------------------------


def read_lines(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None]) -> None:
    """Feed stdin's lines into `queue` (None at end of input) from a daemon thread.

    os.read on fd 0 rather than sys.stdin: no Python-level lock for interpreter shutdown to
    trip over, and no O_NONBLOCK left on a terminal shared with the shell."""

    def reader() -> None:
        pending = b""
        try:
            while chunk := _read_stdin():
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    loop.call_soon_threadsafe(queue.put_nowait, line.decode(errors="replace"))
            loop.call_soon_threadsafe(queue.put_nowait, None)
        except RuntimeError:
            pass  # the loop is closed: the sandbox has stopped

    threading.Thread(target=reader, name="sandbox-stdin", daemon=True).start()


def _read_stdin() -> bytes:
    try:
        return os.read(0, 4096)
    except OSError:
        return b""
