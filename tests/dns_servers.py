"""Real DNS servers on loopback for tests: dnsmasq answering from its records, an upstream
that answers SERVFAIL (dnsmasq relays it), and a socket that never answers.

dnsmasq listens on port 53 of a random 127.x.y.z address, so a resolv.conf (which has no
port syntax) can point at it, as a pod's does.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.rcode
import pytest

DNSMASQ = shutil.which("dnsmasq") or (os.path.exists("/usr/sbin/dnsmasq") and "/usr/sbin/dnsmasq") or None
#: Four TXT strings of 200+ bytes: the answer does not fit 512 bytes, so UDP truncates it.
BIG_TXT = tuple("x" * 200 + c for c in "abcd")


def require_dnsmasq() -> str:
    """The dnsmasq binary; skip without it, except in CI where a missing tool fails."""
    if DNSMASQ:
        return DNSMASQ
    if os.environ.get("CI") == "true":
        pytest.fail("dnsmasq (Debian package dnsmasq-base) is required in CI")
    pytest.skip("dnsmasq (Debian package dnsmasq-base) not installed")


@dataclass(frozen=True)
class DnsServers:
    address: str  # dnsmasq, port 53
    servfail_port: int  # the upstream that answers SERVFAIL (on 127.0.0.1)
    silent_port: int  # bound on 127.0.0.1, never answers

    @property
    def dnsmasq(self) -> str:
        return f"{self.address}:53"


def _servfail_upstream(sock: socket.socket, stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            data, peer = sock.recvfrom(4096)
        except TimeoutError:
            continue
        except OSError:
            return
        response = dns.message.make_response(dns.message.from_wire(data))
        response.set_rcode(dns.rcode.SERVFAIL)
        sock.sendto(response.to_wire(), peer)


def _free_loopback_address() -> str:
    for _ in range(50):
        address = f"127.{random.randint(1, 254)}.{random.randint(0, 254)}.{random.randint(1, 254)}"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((address, 53))
            except OSError:
                continue
        return address
    raise RuntimeError("no free 127.x.y.z:53")


@contextmanager
def run_dns_servers(records: dict[str, str]) -> Iterator[DnsServers]:
    """dnsmasq with `records` (name -> IP) under the zone `test` (everything else in it is
    NXDOMAIN), `big.test` TXT records that need TCP, and `*.broken.test` forwarded to an
    upstream answering SERVFAIL."""
    binary = require_dnsmasq()
    address = _free_loopback_address()
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.bind(("127.0.0.1", 0))
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    stop = threading.Event()
    thread = threading.Thread(target=_servfail_upstream, args=(upstream, stop), daemon=True)
    thread.start()
    with tempfile.TemporaryDirectory(prefix="dnsmasq-") as tmp:
        argv = [
            binary,
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            f"--listen-address={address}",
            "--bind-interfaces",
            "--port=53",
            "--user=root",
            f"--pid-file={tmp}/dnsmasq.pid",
            "--log-facility=-",
            "--local=/test/",
            f"--server=/broken.test/127.0.0.1#{upstream.getsockname()[1]}",
            *(f"--host-record={name},{ip}" for name, ip in records.items()),
            *(f"--txt-record=big.test,{text}" for text in BIG_TXT),
        ]
        log = Path(tmp) / "dnsmasq.log"
        with log.open("wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 10
            while True:  # dnsmasq serves TCP on the same port: connecting tells us it is up
                assert process.poll() is None, f"dnsmasq exited: {log.read_text()}"
                try:
                    socket.create_connection((address, 53), timeout=0.2).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "dnsmasq did not start"
                    time.sleep(0.05)
            yield DnsServers(address, upstream.getsockname()[1], silent.getsockname()[1])
        finally:
            process.terminate()
            process.wait(5)
            stop.set()
            thread.join(2)
            upstream.close()
            silent.close()
