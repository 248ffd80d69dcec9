"""A TCP proxy that can add latency: how the sandbox makes one node slow without root.

There is no `tc netem` to lean on, so every node's pod address is served by one of these
in front of the probe. Bytes travelling towards the upstream are held back `delay` seconds
each (latency, not a bandwidth cap: chunks queue up and each leaves `delay` after it
arrived), so every check *to* that node takes `delay` longer. Replies pass straight through.

With `udp=True` it forwards UDP on the same address and port too (the probes' UDP echo),
delayed the same way, losing a share `loss` of the datagrams in each direction, and every
datagram over `max_datagram` bytes (a path whose MTU is smaller than its ends believe).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("kubenurse_sandbox")

Address = tuple[str, int]
#: Upstreams to try, in order, for one new connection (empty: refuse it by closing).
Upstreams = Callable[[], Sequence[Address]]

CONNECT_TIMEOUT = 5.0
CHUNK = 64 * 1024


class DelayProxy:
    """Listens on `host:port` and forwards each connection to the first upstream that accepts it."""

    def __init__(self, host: str, port: int, upstreams: Upstreams, *, delay: float = 0.0, udp: bool = False) -> None:
        self.host = host
        self.port = port
        self.delay = delay
        #: UDP only: the share of datagrams lost each way, and the largest that passes.
        self.loss = 0.0
        self.max_datagram = 65535
        self._upstreams = upstreams
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._udp = udp
        self._udp_listener: asyncio.DatagramTransport | None = None
        #: client address -> the socket its datagrams go upstream from (replies come back to it).
        self._udp_clients: dict[Address, asyncio.DatagramTransport] = {}
        self._udp_pending: dict[Address, asyncio.Future[tuple[asyncio.DatagramTransport, Any]]] = {}

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)
            self.port = self._server.sockets[0].getsockname()[1]
        if self._udp and self._udp_listener is None:
            loop = asyncio.get_running_loop()
            self._udp_listener, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(self._from_client), local_addr=(self.host, self.port)
            )

    async def stop(self) -> None:
        """Stop listening and cut every open connection (as a node going down would)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        listener, self._udp_listener = self._udp_listener, None
        if listener is not None:
            listener.close()
        for client in self._udp_clients.values():
            client.close()
        self._udp_clients.clear()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=2.0)
        if server is not None:
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            connected = await self._connect()
            if connected is None:
                return  # nothing accepts: the client sees the connection closed
            up_reader, upstream = connected
            await asyncio.gather(self._pipe(reader, upstream, delayed=True), self._pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass  # one side reset the connection: both ends close below
        except asyncio.CancelledError:
            # stop() cuts the connection. Ending quietly: a cancelled connection task makes
            # asyncio's stream callback log a CancelledError traceback (Python 3.11).
            pass
        finally:
            self._connections.discard(task)
            for w in (writer, upstream):
                if w is not None:
                    w.transport.abort()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        for host, port in self._upstreams():
            try:
                return await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
            except (OSError, TimeoutError):
                continue
        return None

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, delayed: bool = False) -> None:
        if not delayed:
            while chunk := await source.read(CHUNK):
                sink.write(chunk)
                await sink.drain()
        else:
            await self._delayed_pipe(source, sink)
        with contextlib.suppress(OSError):
            if sink.can_write_eof():
                sink.write_eof()

    async def _delayed_pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward() -> None:
            while True:
                due, chunk = await queue.get()
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if not chunk:
                    return
                sink.write(chunk)
                await sink.drain()

        forwarder = asyncio.create_task(forward())
        try:
            while True:
                chunk = await source.read(CHUNK)
                queue.put_nowait((loop.time() + self.delay, chunk))
                if not chunk:
                    break
            await forwarder
        finally:
            forwarder.cancel()

    # -- UDP -------------------------------------------------------------------------------

    def _passes(self, data: bytes) -> bool:
        return len(data) <= self.max_datagram and random.random() >= self.loss

    def _later(self, send: Callable[[], None]) -> None:
        if self.delay > 0:
            asyncio.get_running_loop().call_later(self.delay, send)
        else:
            send()

    def _from_client(self, data: bytes, client: Address) -> None:
        if not self._passes(data):
            return
        asyncio.get_running_loop().create_task(self._forward(data, client))

    async def _forward(self, data: bytes, client: Address) -> None:
        upstream = self._udp_clients.get(client)
        if upstream is None:
            # One socket per client, even for a train's datagrams arriving together.
            pending = self._udp_pending.get(client)
            if pending is None:
                upstreams = self._upstreams()
                if not upstreams or self._udp_listener is None:
                    return
                loop = asyncio.get_running_loop()
                pending = self._udp_pending[client] = asyncio.ensure_future(loop.create_datagram_endpoint(
                    lambda: _Datagrams(lambda reply, _addr: self._to_client(reply, client)),
                    remote_addr=upstreams[0],
                ))
            try:
                upstream, _ = await pending
            except OSError:
                return
            finally:
                self._udp_pending.pop(client, None)
            self._udp_clients[client] = upstream
        self._later(lambda: upstream.sendto(data) if not upstream.is_closing() else None)

    def _to_client(self, data: bytes, client: Address) -> None:
        listener = self._udp_listener
        if listener is not None and self._passes(data):
            self._later(lambda: listener.sendto(data, client) if not listener.is_closing() else None)


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, received: Callable[[bytes, Address], None]) -> None:
        self._received = received

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._received(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP refusal from a stopped probe: its datagrams are lost, as on a real path

