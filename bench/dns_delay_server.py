"""`python -m bench.dns_delay_server PORT DELAY`: a nameserver on 127.0.0.1:PORT (UDP) that
answers every A query with one record DELAY seconds after the kernel received the query;
GET /ready on TCP PORT answers 200 once it is up (for bench.core.running), and GET /lateness
the seconds each answer went out after its due time since the last /lateness (then clears).

Built for a known delay under bursts: the answer is spliced from the query's bytes (no
parsing), and each send is scheduled from the query's kernel receive timestamp, so a burst
of K queries waiting in the socket does not make the later ones late.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
import time

from probe.checks import kernel

#: flags (response, recursion desired+available), 1 question, 1 answer, 0, 0
HEADER_TAIL = struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0)
#: name = pointer to the question's name, A, IN, TTL 60, 4 bytes: 10.0.0.1
ANSWER = bytes.fromhex("c00c") + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([10, 0, 0, 1])


LATENESS: list[float] = []


def serve_udp(sock: socket.socket, delay: float) -> None:
    loop = asyncio.get_running_loop()

    def send(answer: bytes, peer: object, due_ns: float) -> None:
        sock.sendto(answer, peer)
        LATENESS.append((time.perf_counter_ns() - due_ns) / 1e9)

    def ready() -> None:
        while True:
            try:
                query, ancdata, _, peer = sock.recvmsg(512, kernel.ANCILLARY_SIZE)
            except BlockingIOError:
                return
            received_ns = kernel.rx_timestamp_ns(ancdata) or time.perf_counter_ns()
            answer = query[:2] + HEADER_TAIL + query[12:] + ANSWER
            # loop.time() is time.monotonic(); perf_counter_ns shares its clock on Linux.
            due_ns = received_ns + delay * 1e9
            loop.call_at(loop.time() + (due_ns - time.perf_counter_ns()) / 1e9, send, answer, peer, due_ns)

    loop.add_reader(sock.fileno(), ready)


async def health(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    request = await reader.readuntil(b"\r\n\r\n")
    body = b""
    if request.startswith(b"GET /lateness"):
        body = json.dumps(LATENESS).encode()
        LATENESS.clear()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    writer.close()


async def main(port: int, delay: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    sock.setblocking(False)
    kernel.enable_rx_timestamps(sock)
    serve_udp(sock, delay)
    server = await asyncio.start_server(health, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), float(sys.argv[2])))
