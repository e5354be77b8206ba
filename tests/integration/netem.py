"""An impairing UDP proxy: loss, delay, jitter (and so reordering), seeded.

These kernels have no netem qdisc, so tests put this proxy between a client and the relay. Each
client address gets its own upstream socket, so the relay sees one distinct address per client.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass


@dataclass
class Impairment:
    loss: float = 0.0  # probability a datagram is dropped
    delay: float = 0.0  # seconds, mean one-way delay added
    jitter: float = 0.0  # seconds, uniform +- around the delay (reorders packets)

    def plan(self, rnd: random.Random) -> float | None:
        """When to deliver a datagram (seconds from now), or None to drop it."""
        if self.loss and rnd.random() < self.loss:
            return None
        return max(
            0.0, self.delay + (rnd.uniform(-self.jitter, self.jitter) if self.jitter else 0.0)
        )


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, proxy: ImpairingProxy, client: tuple[str, int]) -> None:
        self.proxy = proxy
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.proxy._relay(
            self.proxy.to_client, data, lambda d: self.proxy.transport.sendto(d, self.client)
        )


class ImpairingProxy(asyncio.DatagramProtocol):
    """Listens on 127.0.0.1:<port>; forwards to `target` with `to_relay` impairment and back
    with `to_client` impairment."""

    def __init__(
        self, target: tuple[str, int], to_relay: Impairment, to_client: Impairment, seed: int = 1
    ) -> None:
        self.target = target
        self.to_relay = to_relay
        self.to_client = to_client
        self.random = random.Random(seed)
        self.transport: asyncio.DatagramTransport | None = None
        self.upstreams: dict[tuple[str, int], _Upstream] = {}
        self.pending: dict[tuple[str, int], list[bytes]] = {}
        self.dropped = 0
        self.forwarded = 0
        self.loop = asyncio.get_event_loop()

    @classmethod
    async def start(
        cls,
        target: tuple[str, int],
        to_relay: Impairment,
        to_client: Impairment,
        seed: int = 1,
        host: str = "127.0.0.1",
    ) -> ImpairingProxy:
        loop = asyncio.get_running_loop()
        _, proxy = await loop.create_datagram_endpoint(
            lambda: cls(target, to_relay, to_client, seed), local_addr=(host, 0)
        )
        return proxy

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[:2]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        upstream = self.upstreams.get(addr)
        if upstream is None:
            upstream = self.upstreams[addr] = _Upstream(self, addr)
            self.pending[addr] = [data]
            host = self.address[0]
            self.loop.create_task(self._open(upstream, host))
            return
        if upstream.transport is None:
            self.pending[addr].append(data)
            return
        self._relay(self.to_relay, data, lambda d: upstream.transport.sendto(d, self.target))

    async def _open(self, upstream: _Upstream, host: str) -> None:
        await self.loop.create_datagram_endpoint(lambda: upstream, local_addr=(host, 0))
        for data in self.pending.pop(upstream.client, []):
            self._relay(self.to_relay, data, lambda d: upstream.transport.sendto(d, self.target))

    def _relay(self, impairment: Impairment, data: bytes, send) -> None:
        # STUN and DTLS pass untouched: the impairment is for media, as on a lossy path a
        # handshake would just be retried; it keeps test set-up time predictable.
        if data and data[0] < 64:
            send(data)
            return
        after = impairment.plan(self.random)
        if after is None:
            self.dropped += 1
            return
        self.forwarded += 1
        if after <= 0:
            send(data)
        else:
            self.loop.call_later(after, send, data)

    def close(self) -> None:
        for upstream in self.upstreams.values():
            if upstream.transport is not None:
                upstream.transport.close()
        if self.transport is not None:
            self.transport.close()
