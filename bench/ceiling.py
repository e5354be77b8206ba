"""The ceiling: a bare uvloop UDP forwarder, no SRTP and no header rewriting.

What is left of an SFU's packet path without the media protocols: one dict lookup of the
sender's address, then one ``sendto`` per receiver. What it achieves on a core is the most a
Python forwarder can do on this machine.

Control datagrams (from the load generator, on loopback): ``PING`` -> ``PONG``;
``PUB <room> <participant>`` and ``SUB <room> <participant>`` register the sender's address;
every receiver of a room gets every publisher's datagrams except its own participant's.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket

Address = tuple[str, int]


class Forwarder(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.routes: dict[Address, list[Address]] = {}
        self.publishers: dict[Address, tuple[str, str]] = {}
        self.subscribers: dict[Address, tuple[str, str]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        targets = self.routes.get(addr)
        if targets is not None:
            sendto = self.transport.sendto  # type: ignore[union-attr]
            for target in targets:
                sendto(data, target)
            return
        self._control(data, addr)

    def _control(self, data: bytes, addr: Address) -> None:
        assert self.transport is not None
        if data == b"PING":
            self.transport.sendto(b"PONG", addr)
            return
        parts = data.split()
        if len(parts) != 3 or parts[0] not in (b"PUB", b"SUB"):
            return
        key = (parts[1].decode(), parts[2].decode())
        (self.publishers if parts[0] == b"PUB" else self.subscribers)[addr] = key
        self._rebuild()
        self.transport.sendto(b"OK", addr)

    def _rebuild(self) -> None:
        routes: dict[Address, list[Address]] = {}
        for pub, (room, who) in self.publishers.items():
            routes[pub] = [s for s, (r, w) in self.subscribers.items() if r == room and w != who]
        self.routes = routes


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sock.bind(("127.0.0.1", port))
    transport, _ = await loop.create_datagram_endpoint(Forwarder, sock=sock)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
