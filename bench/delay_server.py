"""A target with a known delay, in its own process, that knows the truth about each answer:
`python -m bench.delay_server PORT DELAY_SECONDS [CERTFILE KEYFILE]` (HTTPS with the files).

Every answer is sent DELAY after its request arrived. What the server reports as the truth
is measured, not assumed: from the kernel's receive timestamp of the request (SO_TIMESTAMPNS)
to right after the `send` of the answer, so its own scheduling lateness is in the figure
(it is real time the client waited) and a client's only extra is the loopback itself. Over
TLS it also reports the handshake: from the kernel receive time of the ClientHello to the
`send` of its reply flight, which, plus one loopback round trip (microseconds), is
what the client waited for.

One thread, a selector and a heap of due answers: nothing here waits on anything else.

- `GET /served`: JSON list of the true hold times (seconds) in the order requests arrived;
- `GET /served?by=id`: JSON `{id: {"hold": s, "tls": s | null}}` for requests that had
  `?id=...` in their query;
- `GET /reset`: forget both.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import selectors
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from probe.checks import kernel

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


@dataclass
class Conn:
    sock: socket.socket
    tls: ssl.SSLObject | None = None
    incoming: ssl.MemoryBIO | None = None
    outgoing: ssl.MemoryBIO | None = None
    handshaken: bool = False
    hello_at: int | None = None
    tls_ns: int | None = None
    request: bytearray = field(default_factory=bytearray)
    answered: bool = False


class DelayServer:
    def __init__(self, port: int, delay: float, tls: ssl.SSLContext | None) -> None:
        self.delay_ns = int(delay * 1e9)
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", port), backlog=1024)
        self.listener.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.due: list[tuple[int, int, Conn, bytes, int, str | None]] = []
        self.seq = itertools.count()
        self.holds: list[float] = []
        self.by_id: dict[str, dict[str, float | None]] = {}

    def serve(self) -> None:
        while True:
            timeout = None
            if self.due:
                timeout = max(0.0, (self.due[0][0] - time.perf_counter_ns()) / 1e9)
            for key, _ in self.selector.select(timeout):
                if key.fileobj is self.listener:
                    self._accept()
                    continue
                try:
                    self._readable(key.data)
                except Exception as e:  # one bad client must not take the target down
                    print(f"delay server: dropped a connection: {e!r}", file=sys.stderr)
                    self._close(key.data)
            now = time.perf_counter_ns()
            while self.due and self.due[0][0] <= now:
                _, _, conn, answer, arrived, request_id = heapq.heappop(self.due)
                sent = self._send(conn, answer)
                hold = (sent - arrived) / 1e9
                self._close(conn)
                if request_id is None:
                    continue  # a control request
                self.holds.append(hold)
                if request_id:
                    tls = conn.tls_ns / 1e9 if conn.tls_ns is not None else None
                    self.by_id[request_id] = {"hold": hold, "tls": tls}

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            kernel.enable_rx_timestamps(sock)
            conn = Conn(sock)
            if self.tls is not None:
                conn.incoming, conn.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
                conn.tls = self.tls.wrap_bio(conn.incoming, conn.outgoing, server_side=True)
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _readable(self, conn: Conn) -> None:
        try:
            data, ancdata, _, _ = conn.sock.recvmsg(65536, kernel.ANCILLARY_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        arrived = kernel.rx_timestamp_ns(ancdata) or time.perf_counter_ns()
        if conn.tls is None:
            self._request(conn, data, arrived)
            return
        assert conn.incoming is not None
        conn.incoming.write(data)
        if not conn.handshaken:
            if conn.hello_at is None:
                conn.hello_at = arrived
            try:
                conn.tls.do_handshake()
                conn.handshaken = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                self._close(conn)
                return
            flushed = self._flush(conn)
            if conn.tls_ns is None and flushed is not None:
                conn.tls_ns = flushed - conn.hello_at
            if not conn.handshaken:
                return
        plain = bytearray()
        while True:
            try:
                chunk = conn.tls.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
            except ssl.SSLError:
                self._close(conn)
                return
            if not chunk:
                break
            plain += chunk
        self._flush(conn)
        if plain:
            self._request(conn, bytes(plain), arrived)

    def _request(self, conn: Conn, data: bytes, arrived: int) -> None:
        conn.request += data
        if conn.answered or b"\r\n\r\n" not in conn.request:
            return
        conn.answered = True
        target = conn.request.split(b" ", 2)[1].decode("latin-1")
        url = urlsplit(target)
        if url.path == "/served":
            body = json.dumps(self.by_id if parse_qs(url.query).get("by") == ["id"] else self.holds).encode()
            self._answer_now(conn, body)
        elif url.path == "/reset":
            self.holds.clear()
            self.by_id.clear()
            self._answer_now(conn, b"ok")
        else:
            request_id = parse_qs(url.query).get("id", [""])[0]
            heapq.heappush(self.due, (arrived + self.delay_ns, next(self.seq), conn, ANSWER, arrived, request_id))

    def _answer_now(self, conn: Conn, body: bytes) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        heapq.heappush(self.due, (0, next(self.seq), conn, head + body, 0, None))

    def _send(self, conn: Conn, payload: bytes) -> int:
        """Send `payload`; the moment the send began."""
        if conn.tls is not None:
            try:
                conn.tls.write(payload)
            except ssl.SSLError:
                return time.perf_counter_ns()
            return self._flush(conn) or time.perf_counter_ns()
        return self._sendall(conn, payload)

    def _flush(self, conn: Conn) -> int | None:
        """Send what TLS has to send; the moment the send began, None if nothing was due."""
        assert conn.outgoing is not None
        pending = conn.outgoing.read()
        return self._sendall(conn, pending) if pending else None

    def _sendall(self, conn: Conn, payload: bytes) -> int:
        started = time.perf_counter_ns()
        try:
            conn.sock.setblocking(True)  # answers are tiny: a blocking send never waits here
            conn.sock.sendall(payload)
            conn.sock.setblocking(False)
        except OSError:
            pass  # the client went away (a probe stopped with answers still due)
        return started

    def _close(self, conn: Conn) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        conn.sock.close()


def main() -> None:
    port, delay = int(sys.argv[1]), float(sys.argv[2])
    context = None
    if len(sys.argv) >= 5:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(sys.argv[3], sys.argv[4])
    DelayServer(port, delay, context).serve()


if __name__ == "__main__":
    main()
