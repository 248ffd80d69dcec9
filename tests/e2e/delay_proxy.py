"""A delaying TCP proxy, run inside a node's namespace: ``python delay_proxy.py LISTEN_PORT
TARGET_HOST TARGET_PORT DELAY_SECONDS``.

Each connection is relayed to the target; the first bytes of the answer are held back for
DELAY, so the client sees the added latency between sending its request and the first
response byte (and nowhere else: connect stays local and fast). Standalone on purpose: it
runs under `ip netns exec` with nothing of the project imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    try:
        first = True
        while data := await reader.read(65536):
            if first and delay:
                await asyncio.sleep(delay)
                first = False
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.close()


async def main(listen_port: int, host: str, port: int, delay: float) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        print(time.time(), "accepted", client_w.get_extra_info("peername"), flush=True)
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        except (OSError, TimeoutError):
            client_w.close()
            return
        await asyncio.gather(pump(client_r, up_w, 0.0), pump(up_r, client_w, delay))
        print(time.time(), "done", client_w.get_extra_info("peername"), flush=True)

    server = await asyncio.start_server(handle, "0.0.0.0", listen_port, reuse_address=True)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
