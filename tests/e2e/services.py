"""The cluster's services, each a real program on a bridge address in the root namespace:
dnsmasq (cluster DNS), nginx (the ingress with TLS and the Service in front of the
probes), the API-server stand-in (on a thread with its own event loop) and a TCP relay
that puts the in-process OTLP receiver on the bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from kubenurse_sandbox.standin import ApiServerStandin
from tests.e2e.netns import SESSION_ENV, session_id, which

T = TypeVar("T")


def session_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment marked with this session (see netns.sweep_leftovers)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", SESSION_ENV: str(session_id())}
    env.update(extra or {})
    return env


class Process:
    """A child process with its output in a log file; stop() is idempotent."""

    def __init__(self, name: str, argv: list[str], log: Path, env: Mapping[str, str] | None = None,
                 stop_signal: int = signal.SIGTERM) -> None:
        self.name = name
        self.log = log
        self._stop_signal = stop_signal
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=session_env(env),
                                         stdin=subprocess.DEVNULL)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def signal_stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(self._stop_signal)

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is not None:
            return
        self.signal_stop()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"--- {self.name} ({self.log}):\n" + "\n".join(text)


def wait_port(host: str, port: int, timeout: float = 10.0, process: Process | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if process is not None and not process.running:
                raise RuntimeError(f"{process.name} exited\n{process.tail()}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


# --------------------------------------------------------------------------- DNS


class Dnsmasq:
    """Cluster DNS: answers the given names from host records, nothing else, on one address."""

    def __init__(self, workdir: Path, address: str, records: Mapping[str, str]) -> None:
        self.workdir = workdir
        self.address = address
        self.records = dict(records)
        self.process: Process | None = None

    def start(self) -> None:
        if self.process is not None and self.process.running:
            return
        binary = which("dnsmasq")
        assert binary, "dnsmasq is not installed"
        argv = [
            binary,
            "--keep-in-foreground",
            "--conf-file=/dev/null",  # no /etc/dnsmasq.conf or conf-dir
            "--no-resolv",  # no upstream: nothing leaves the bridge
            "--no-hosts",
            "--local=/cluster.local/",
            f"--listen-address={self.address}",
            "--bind-interfaces",
            "--except-interface=lo",
            "--port=53",
            "--user=root",
            f"--pid-file={self.workdir}/dnsmasq.pid",
            "--log-facility=-",
            *(f"--host-record={name},{ip}" for name, ip in self.records.items()),
        ]
        self.process = Process("dnsmasq", argv, self.workdir / "dnsmasq.log")
        # dnsmasq serves TCP on the same port as UDP: connecting tells us it is up.
        wait_port(self.address, 53, process=self.process)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


# --------------------------------------------------------------------------- ingress and Service


class Nginx:
    """The ingress (HTTPS, a certificate from a throwaway CA) and the Service (plain HTTP),
    both proxying to every probe. A pod that does not answer costs one short connect
    attempt and is then skipped for a while, as a Service's endpoints controller would."""

    def __init__(self, workdir: Path, *, ingress: tuple[str, int], service: tuple[str, int],
                 server_name: str, cert: Path, key: Path, upstreams: Iterable[str]) -> None:
        self.workdir = workdir
        self.ingress = ingress
        self.service = service
        prefix = workdir / "nginx"
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        servers = "\n".join(f"    server {u} max_fails=1 fail_timeout=3s;" for u in upstreams)
        self.config = prefix / "nginx.conf"
        self.config.write_text(f"""
user root;
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 512; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/tmp/body;
  proxy_temp_path {prefix}/tmp/proxy;
  fastcgi_temp_path {prefix}/tmp/fastcgi;
  uwsgi_temp_path {prefix}/tmp/uwsgi;
  scgi_temp_path {prefix}/tmp/scgi;
  upstream kubenurse {{
{servers}
  }}
  proxy_connect_timeout 300ms;
  proxy_read_timeout 5s;
  proxy_next_upstream error timeout;
  server {{
    listen {ingress[0]}:{ingress[1]} ssl;
    server_name {server_name};
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location / {{ proxy_pass http://kubenurse; }}
  }}
  server {{
    listen {service[0]}:{service[1]};
    location / {{ proxy_pass http://kubenurse; }}
  }}
}}
""")
        self.process: Process | None = None

    def start(self) -> None:
        binary = which("nginx")
        assert binary, "nginx is not installed"
        prefix = self.workdir / "nginx"
        # SIGQUIT: graceful stop of master and workers.
        self.process = Process("nginx", [binary, "-p", str(prefix), "-c", str(self.config)],
                               self.workdir / "nginx.log", stop_signal=signal.SIGQUIT)
        wait_port(*self.ingress, process=self.process)
        wait_port(*self.service, process=self.process)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


# --------------------------------------------------------------------------- API server


class ThreadedStandin:
    """The API-server stand-in on a thread with its own event loop, so sync tests can
    drive it: ``call(lambda s: s.add_pod(...))`` and ``run(lambda s: s.down())``."""

    def __init__(self, host: str, port: int, extra_names: Iterable[str] = ()) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="standin", daemon=True)
        self._thread.start()

        async def create() -> ApiServerStandin:
            server = ApiServerStandin(host, port, extra_names=list(extra_names))
            await server.start()
            return server

        self.server = self._submit(create())

    def _submit(self, coroutine: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def run(self, coroutine: Callable[[ApiServerStandin], Coroutine[Any, Any, T]], timeout: float = 10.0) -> T:
        return self._submit(coroutine(self.server), timeout)

    def call(self, fn: Callable[[ApiServerStandin], T], timeout: float = 10.0) -> T:
        async def on_loop() -> T:
            return fn(self.server)

        return self._submit(on_loop(), timeout)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self.run(lambda s: s.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


# --------------------------------------------------------------------------- OTLP on the bridge


class Relay:
    """Forwards TCP from `listen` to `target`, byte for byte, on one thread.

    The OTLP receiver listens on loopback only, which a namespace cannot reach; the relay
    puts it on the bridge. stop() closes the listener and every relayed connection (a
    collector that went away: connections refused); start() listens again on the same port.
    """

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.listen = listen
        self.target = target
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()

    def start(self) -> None:
        if self._thread is not None:
            return
        server = socket.create_server(self.listen, reuse_port=False)
        server.setblocking(False)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, args=(server,), name=f"relay-{self.listen[1]}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping.set()
        self._wake_w.send(b"x")
        self._thread.join(10)
        self._thread = None

    def close(self) -> None:
        self.stop()
        self._wake_r.close()
        self._wake_w.close()

    def _serve(self, server: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        peers: dict[socket.socket, socket.socket] = {}
        sel.register(server, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)

        def drop(sock: socket.socket) -> None:
            other = peers.pop(sock, None)
            for s in (sock, other):
                if s is None:
                    continue
                peers.pop(s, None)
                with contextlib.suppress(KeyError, ValueError):
                    sel.unregister(s)
                s.close()

        try:
            while not self._stopping.is_set():
                for key, _ in sel.select(timeout=0.5):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._wake_r:
                        with contextlib.suppress(OSError):
                            sock.recv(64)
                        continue
                    if sock is server:
                        try:
                            client, _ = server.accept()
                        except OSError:
                            continue
                        try:
                            upstream = socket.create_connection(self.target, timeout=2)
                        except OSError:
                            client.close()
                            continue
                        for s in (client, upstream):
                            s.setblocking(False)
                        peers[client], peers[upstream] = upstream, client
                        sel.register(client, selectors.EVENT_READ)
                        sel.register(upstream, selectors.EVENT_READ)
                        continue
                    if sock not in peers:
                        continue
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        drop(sock)
                        continue
                    if not data:
                        drop(sock)
                        continue
                    try:
                        peers[sock].setblocking(True)
                        peers[sock].settimeout(5)
                        peers[sock].sendall(data)
                        peers[sock].setblocking(False)
                    except OSError:
                        drop(sock)
        finally:
            for sock in list(peers):
                drop(sock)
            sel.close()
            server.close()
