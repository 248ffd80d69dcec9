"""Host plumbing for the namespace cluster: a bridge, one network namespace per node,
nftables rules inside a namespace, and the sweep of what a killed session left behind.

Everything this module creates carries the session's id (the pytest process id) in its
name, so a later session can tell leftovers of a dead session from the resources of a
session that is still running next to it:

- namespaces  ``kne2e<pid>-<node>``
- links       ``ke2<pid hex>br`` (the bridge) and ``ke2<pid hex>v<i>`` (the host end of
  each veth; the namespace end is called eth0)
- files       ``/etc/netns/kne2e<pid>-<node>/`` (the namespace's resolv.conf) and the
  session's work directory ``/tmp/kne2e-<pid>/``
- processes   started with ``KNE2E_SESSION=<pid>`` in their environment

Traffic stays on the bridge: namespaces get an address on the bridge's /24 and no default
route, and nothing is routed or forwarded anywhere else.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

NS_PREFIX = "kne2e"
LINK_PREFIX = "ke2"
SESSION_ENV = "KNE2E_SESSION"
NETNS_ETC = Path("/etc/netns")
WORK_ROOT = Path("/tmp")

_NS_RE = re.compile(rf"^{NS_PREFIX}(\d+)-")
_LINK_RE = re.compile(rf"^{LINK_PREFIX}([0-9a-f]+)(?:br|v\d+)$")
_WORK_RE = re.compile(rf"^{NS_PREFIX}-(\d+)$")
_WORK_IN_CMDLINE = re.compile(rf"/tmp/{NS_PREFIX}-(\d+)/".encode())


class CommandError(RuntimeError):
    pass


def run(*argv: str, check: bool = True, timeout: float = 15.0, input: str | None = None) -> str:
    """Run a command; stdout on success, CommandError naming the command and its stderr otherwise."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise CommandError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def session_id() -> int:
    return os.getpid()


def _alive(pid: int) -> bool:
    """A running process (a zombie waiting for its parent to reap it counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _processes() -> Iterator[tuple[int, int, bytes, list[bytes]]]:
    """(pid, parent pid, command line, environment) of every process we can read."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        yield int(proc.name), ppid, cmdline, environ


def _owner(cmdline: bytes, environ: list[bytes]) -> int | None:
    """The session that started this process: its environment marker, or (for programs
    such as nginx that overwrite their environment) the session's work directory in its
    command line."""
    marker = next((e for e in environ if e.startswith(SESSION_ENV.encode() + b"=")), None)
    if marker is not None and marker.split(b"=", 1)[1].isdigit():
        return int(marker.split(b"=", 1)[1])
    m = _WORK_IN_CMDLINE.search(cmdline)
    return int(m[1]) if m else None


# --------------------------------------------------------------------------- capability


def unsupported_reason() -> str | None:
    """Why the namespace cluster cannot run here, or None when it can.

    Tries the real thing (a namespace, a bridge, a veth pair, an nft table inside the
    namespace) with throwaway names, and removes it again.
    """
    if os.geteuid() != 0:
        return "needs root (network namespaces, bridge, nftables)"
    for tool in ("ip", "nft"):
        if not which(tool):
            return f"{tool} is not installed"
    probe = f"{NS_PREFIX}{session_id()}-capcheck"
    bridge = f"{LINK_PREFIX}{session_id():x}v99"
    try:
        run(which("ip") or "ip", "netns", "add", probe)
    except (CommandError, OSError) as e:
        return f"ip netns unsupported here: {e}"
    try:
        ip = which("ip") or "ip"
        run(ip, "link", "add", bridge, "type", "bridge")
        run(ip, "link", "del", bridge)
        run(ip, "link", "add", bridge, "type", "veth", "peer", "name", "eth0", "netns", probe)
        run(ip, "link", "del", bridge)
        run(ip, "netns", "exec", probe, which("nft") or "nft", "add", "table", "inet", "capcheck")
    except (CommandError, OSError) as e:
        return f"bridge/veth/nftables unsupported here: {e}"
    finally:
        with contextlib.suppress(CommandError, OSError):
            run(which("ip") or "ip", "link", "del", bridge, check=False)
        with contextlib.suppress(CommandError, OSError):
            run(which("ip") or "ip", "netns", "del", probe, check=False)
    return None


# --------------------------------------------------------------------------- sweep


def sweep_leftovers() -> list[str]:
    """Remove what sessions that no longer run left behind; returns what was removed.

    A session still running (another pytest next to us) is left alone: its id is a live pid.
    """
    me = session_id()
    removed: list[str] = []

    def dead(pid: int) -> bool:
        return pid != me and not _alive(pid)

    # Processes first, so nothing holds a namespace or a port any more; their children too
    # (nginx workers carry neither marker nor path).
    processes = list(_processes())
    doomed: set[int] = set()
    for pid, _ppid, cmdline, environ in processes:
        owner = _owner(cmdline, environ)
        if owner is not None and dead(owner):
            doomed.add(pid)
    doomed |= {pid for pid, ppid, _c, _e in processes if ppid in doomed}
    for pid in sorted(doomed):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            removed.append(f"process {pid}")
    ip = which("ip") or "ip"
    for line in run(ip, "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.strip() else ""
        m = _NS_RE.match(name)
        if m and dead(int(m[1])):
            run(ip, "netns", "del", name, check=False)
            removed.append(f"netns {name}")
    for line in run(ip, "-o", "link", "show", check=False).splitlines():
        parts = line.split(":", 2)
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@", 1)[0]
        m = _LINK_RE.match(name)
        if m and dead(int(m[1], 16)):
            run(ip, "link", "del", name, check=False)
            removed.append(f"link {name}")
    if NETNS_ETC.is_dir():
        for entry in NETNS_ETC.iterdir():
            m = _NS_RE.match(entry.name)
            if m and dead(int(m[1])):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(f"dir {entry}")
        with contextlib.suppress(OSError):
            NETNS_ETC.rmdir()  # only when empty: it may hold other people's namespaces
    for entry in WORK_ROOT.iterdir():
        m = _WORK_RE.match(entry.name)
        if m and dead(int(m[1])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(f"dir {entry}")
    return removed


# --------------------------------------------------------------------------- network


def free_subnet() -> ipaddress.IPv4Network:
    """A 10.244.N.0/24 no interface or route of this machine uses yet (N = 0 when free)."""
    ip = which("ip") or "ip"
    used = run(ip, "-4", "-o", "addr", "show", check=False) + run(ip, "-4", "route", "show", "table", "all",
                                                                     check=False)
    for n in range(256):
        net = ipaddress.ip_network(f"10.244.{n}.0/24")
        if f"10.244.{n}." not in used:
            return net
    raise RuntimeError("no free 10.244.N.0/24 on this machine")


@dataclass
class Bridge:
    """The "cluster network": a bridge in the root namespace with some host addresses."""

    name: str
    subnet: ipaddress.IPv4Network

    def host(self, index: int) -> str:
        return str(self.subnet.network_address + index)

    @classmethod
    def create(cls, subnet: ipaddress.IPv4Network) -> Bridge:
        bridge = cls(f"{LINK_PREFIX}{session_id():x}br", subnet)
        ip = which("ip") or "ip"
        run(ip, "link", "add", bridge.name, "type", "bridge")
        run(ip, "link", "set", bridge.name, "up")
        return bridge

    def add_address(self, index: int) -> str:
        address = self.host(index)
        run(which("ip") or "ip", "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", self.name)
        return address

    def delete(self) -> None:
        run(which("ip") or "ip", "link", "del", self.name, check=False)


@dataclass
class Namespace:
    """One "node": a network namespace with eth0 on the bridge and its own resolv.conf."""

    name: str
    address: str
    index: int

    @classmethod
    def create(cls, node: str, index: int, bridge: Bridge, address: str, nameserver: str) -> Namespace:
        ns = cls(f"{NS_PREFIX}{session_id()}-{node}", address, index)
        ip = which("ip") or "ip"
        # resolv.conf first: `ip netns exec` bind-mounts /etc/netns/<ns>/* over /etc/*.
        etc = NETNS_ETC / ns.name
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {nameserver}\noptions timeout:1 attempts:1\n")
        run(ip, "netns", "add", ns.name)
        host_end = f"{LINK_PREFIX}{session_id():x}v{index}"
        run(ip, "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
        run(ip, "link", "set", host_end, "master", bridge.name, "up")
        run(ip, "-n", ns.name, "addr", "add", f"{address}/{bridge.subnet.prefixlen}", "dev", "eth0")
        run(ip, "-n", ns.name, "link", "set", "lo", "up")
        run(ip, "-n", ns.name, "link", "set", "eth0", "up")
        return ns

    def exec_argv(self, *argv: str) -> list[str]:
        return [which("ip") or "ip", "netns", "exec", self.name, *argv]

    def nft(self, script: str) -> None:
        run(*self.exec_argv(which("nft") or "nft", "-f", "-"), input=script)

    def delete_table(self, family: str, table: str) -> None:
        run(*self.exec_argv(which("nft") or "nft", "delete", "table", family, table), check=False)

    def tables(self) -> str:
        return run(*self.exec_argv(which("nft") or "nft", "list", "tables"), check=False)

    def delete(self) -> None:
        ip = which("ip") or "ip"
        # Anything still running inside would keep the namespace alive after `del`.
        for pid in run(ip, "netns", "pids", self.name, check=False).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        run(ip, "netns", "del", self.name, check=False)
        shutil.rmtree(NETNS_ETC / self.name, ignore_errors=True)
        with contextlib.suppress(OSError):
            NETNS_ETC.rmdir()


def wait_gone(names: list[str], timeout: float = 5.0) -> None:
    """Namespace deletion tears the veth down asynchronously; wait for the links to go."""
    deadline = time.monotonic() + timeout
    ip = which("ip") or "ip"
    while time.monotonic() < deadline:
        links = run(ip, "-o", "link", "show", check=False)
        if not any(f" {n}@" in links or f" {n}:" in links for n in names):
            return
        time.sleep(0.05)
