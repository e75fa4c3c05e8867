"""Peer reference for the HL7 benchmark: a bare asyncio MLLP server that parses each message
with the ``hl7`` package and answers AA, storing nothing. The ceiling a listener that also
writes to a database can approach.

    python bench/_mllp_peer.py --port P
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket

import hl7
from _mllp import END, START


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            try:
                data = await reader.readuntil(END)
            except asyncio.IncompleteReadError:
                break
            text = data[data.index(START) + 1 : -2].decode("utf-8")
            message = hl7.parse(text)
            ack = str(message.create_ack("AA"))
            writer.write(START + ack.encode("utf-8") + b"\r" + END)
            await writer.drain()
    finally:
        writer.close()


async def main(host: str, port: int) -> None:
    server = await asyncio.start_server(handle, host, port, limit=10 * 1024 * 1024)
    print(f"mllp peer listening on {host}:{server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(main(args.host, args.port))
