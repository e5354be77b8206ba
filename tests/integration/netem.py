"""An impairing UDP proxy: loss, delay, jitter (and so reordering), and a rate limit with a
bottleneck queue, seeded.

These kernels have no netem qdisc, so tests put this proxy between a client and the relay. Each
client address gets its own upstream socket, so the relay sees one distinct address per client.

Each direction (``to_relay``, ``to_client``) has its own :class:`Impairment` and its own link
state. A datagram first meets random loss, then the direction's rate limit (a token bucket in
front of a FIFO queue, as at a router's bottleneck: what exceeds the rate waits, so the delay
grows before anything is lost, and a datagram that would overflow the queue is dropped at its
tail), then the added delay and jitter. An :class:`Impairment`'s fields may be changed while
the proxy runs, on the proxy's loop or from another thread (``proxy.to_client.rate = None``
lifts a limit: what waits is sent at once, at the latest one datagram's time at the old rate
later, and what comes next passes without waiting).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

Send = Callable[[bytes], None]


@dataclass
class Impairment:
    loss: float = 0.0  # probability a datagram is dropped
    delay: float = 0.0  # seconds, mean one-way delay added
    jitter: float = 0.0  # seconds, uniform +- around the delay (reorders packets)
    #: bits/s of UDP payload the direction carries, None for no limit
    rate: float | None = None
    #: the bottleneck queue, in seconds of sending at ``rate`` (its bytes follow the rate)
    queue: float = 0.1
    #: the bottleneck queue in bytes, instead of ``queue`` seconds when set
    queue_bytes: int | None = None
    #: bytes of tokens the bucket holds when idle: a burst that passes without waiting
    burst: int = 1500

    def plan(self, rnd: random.Random) -> float | None:
        """When to deliver a datagram (seconds from now), or None to drop it."""
        if self.loss and rnd.random() < self.loss:
            return None
        return self.added_delay(rnd)

    def added_delay(self, rnd: random.Random) -> float:
        """The delay (and jitter) added to one datagram, in seconds."""
        return max(
            0.0, self.delay + (rnd.uniform(-self.jitter, self.jitter) if self.jitter else 0.0)
        )

    def queue_limit(self) -> float:
        """Bytes the bottleneck queue holds at most (meaningful with a ``rate``)."""
        if self.queue_bytes is not None:
            return self.queue_bytes
        return (self.rate or 0.0) * self.queue / 8


@dataclass
class LinkStats:
    """What one direction of the proxy did with the media datagrams it got (STUN and DTLS,
    which pass untouched, are not counted)."""

    #: dropped by the random ``loss``
    lost: int = 0
    #: dropped at the tail of the full bottleneck queue
    queue_dropped: int = 0
    #: sent on (after the queue; the added delay may still be running)
    delivered: int = 0
    delivered_bytes: int = 0
    #: the longest a delivered datagram waited in the queue, in seconds
    max_queue_delay: float = 0.0


class _Link:
    """One direction's token bucket and queue, on the proxy's loop.

    The bucket is kept as the instant ``empty_at`` at which it holds no token: it holds
    ``(t - empty_at) * rate / 8`` bytes at time ``t``, at most ``burst``. Taking ``n`` bytes
    moves ``empty_at`` by ``n * 8 / rate``. A datagram leaves at the instant the bucket holds
    its size; when the loop wakes late, the datagrams that should have left meanwhile leave
    together and the rate over time stays exact."""

    def __init__(
        self, proxy: ImpairingProxy, impairment: Callable[[], Impairment], stats: LinkStats
    ) -> None:
        self.proxy = proxy
        self.impairment = impairment
        self.stats = stats
        #: (arrival time, datagram, its send)
        self.queue: deque[tuple[float, bytes, Send]] = deque()
        self.queued_bytes = 0
        self.empty_at = 0.0
        #: when the datagram before the head left (the head waits from then, or its arrival)
        self.last_departure = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def admit(self, data: bytes, send: Send) -> None:
        impairment = self.impairment()
        if impairment.loss and self.proxy.random.random() < impairment.loss:
            self.stats.lost += 1
            self.proxy.dropped += 1
            return
        now = self.proxy.loop.time()
        self.drain(now)
        if impairment.rate is None and not self.queue:
            self.deliver(data, send, 0.0)
            return
        if self.queue and self.queued_bytes + len(data) > impairment.queue_limit():
            self.stats.queue_dropped += 1
            self.proxy.queue_dropped += 1
            return
        self.queue.append((now, data, send))
        self.queued_bytes += len(data)
        self.drain(now)

    def drain(self, now: float) -> None:
        """Send every queued datagram whose tokens have come, and wake up for the next."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.queue:
            arrival, data, send = self.queue[0]
            rate = self.impairment().rate
            if rate is None:
                departure = now
            else:
                burst = max(self.impairment().burst, len(data))
                ready = max(arrival, self.last_departure)
                empty_at = max(self.empty_at, ready - burst * 8 / rate)
                departure = max(ready, empty_at + len(data) * 8 / rate)
                if departure > now:
                    self.timer = self.proxy.loop.call_at(departure, self._wake)
                    return
                self.empty_at = empty_at + len(data) * 8 / rate
            self.queue.popleft()
            self.queued_bytes -= len(data)
            self.last_departure = departure
            self.deliver(data, send, departure - arrival)

    def _wake(self) -> None:
        self.timer = None
        self.drain(self.proxy.loop.time())

    def deliver(self, data: bytes, send: Send, waited: float) -> None:
        self.stats.delivered += 1
        self.stats.delivered_bytes += len(data)
        self.stats.max_queue_delay = max(self.stats.max_queue_delay, waited)
        self.proxy.forwarded += 1
        after = self.impairment().added_delay(self.proxy.random)
        if after <= 0:
            send(data)
        else:
            self.proxy.loop.call_later(after, send, data)

    def queue_delay(self) -> float:
        """How long the oldest datagram in the queue has waited so far, in seconds."""
        try:
            arrival = self.queue[0][0]
        except IndexError:  # empty (possibly emptied meanwhile, when read from another thread)
            return 0.0
        return self.proxy.loop.time() - arrival

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        self.queued_bytes = 0


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, proxy: ImpairingProxy, client: tuple[str, int]) -> None:
        self.proxy = proxy
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.proxy._relay(self.proxy.to_client, data, self.proxy._to(self.client))


class ImpairingProxy(asyncio.DatagramProtocol):
    """Listens on 127.0.0.1:<port>; forwards to `target` with `to_relay` impairment and back
    with `to_client` impairment.

    ``dropped`` counts the datagrams the random loss dropped, ``queue_dropped`` those the full
    bottleneck queues dropped, ``forwarded`` those sent on; ``links`` has the same per
    direction (:class:`LinkStats`)."""

    def __init__(
        self, target: tuple[str, int], to_relay: Impairment, to_client: Impairment, seed: int = 1
    ) -> None:
        self.target = target
        self.to_relay = to_relay
        # one object for both directions would make them share their link
        self.to_client = dataclasses.replace(to_client) if to_client is to_relay else to_client
        self.random = random.Random(seed)
        self.transport: asyncio.DatagramTransport | None = None
        self.upstreams: dict[tuple[str, int], _Upstream] = {}
        self.pending: dict[tuple[str, int], list[bytes]] = {}
        self.dropped = 0
        self.queue_dropped = 0
        self.forwarded = 0
        self.links = {"to_relay": LinkStats(), "to_client": LinkStats()}
        self._links = {
            "to_relay": _Link(self, lambda: self.to_relay, self.links["to_relay"]),
            "to_client": _Link(self, lambda: self.to_client, self.links["to_client"]),
        }
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

    def queued(self, direction: str) -> tuple[int, float]:
        """(bytes, seconds the oldest has waited) in ``direction``'s queue now."""
        link = self._links[direction]
        return link.queued_bytes, link.queue_delay()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def _to(self, client: tuple[str, int]) -> Send:
        def send(data: bytes) -> None:
            if self.transport is not None:
                self.transport.sendto(data, client)

        return send

    def _upstream_send(self, upstream: _Upstream) -> Send:
        def send(data: bytes) -> None:
            if upstream.transport is not None:
                upstream.transport.sendto(data, self.target)

        return send

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
        self._relay(self.to_relay, data, self._upstream_send(upstream))

    async def _open(self, upstream: _Upstream, host: str) -> None:
        await self.loop.create_datagram_endpoint(lambda: upstream, local_addr=(host, 0))
        for data in self.pending.pop(upstream.client, []):
            self._relay(self.to_relay, data, self._upstream_send(upstream))

    def _relay(self, impairment: Impairment, data: bytes, send: Send) -> None:
        # STUN and DTLS pass untouched: the impairment is for media, as on a lossy path a
        # handshake would just be retried; it keeps test set-up time predictable.
        if data and data[0] < 64:
            send(data)
            return
        direction = "to_relay" if impairment is self.to_relay else "to_client"
        self._links[direction].admit(data, send)

    def close(self) -> None:
        for link in self._links.values():
            link.close()
        for upstream in self.upstreams.values():
            if upstream.transport is not None:
                upstream.transport.close()
        if self.transport is not None:
            self.transport.close()
