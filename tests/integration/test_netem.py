"""The impairing proxy's rate limit: a UDP flood through it is delivered at the configured rate,
what exceeds the rate waits in the queue (delay first) and is dropped only past the queue's
limit, counted apart from random loss; a new or lifted rate takes effect at once; STUN and DTLS
pass untouched.

No relay here: a UDP socket stands for the relay (the proxy's target) and another for the
client, all on one loop on 127.0.0.1. Every datagram carries its send time, so the far end
sees its one-way delay.
"""

from __future__ import annotations

import asyncio
import statistics
import struct
from dataclasses import dataclass, field

import pytest

from tests.integration.netem import ImpairingProxy, Impairment

pytestmark = pytest.mark.integration

#: the limit the tests set, bits/s
RATE = 1_000_000
#: datagram size, bytes (8 ms on the wire at RATE)
SIZE = 1000
#: how far the measured rate may be from the configured one
TOLERANCE = 0.15
#: first byte of an RTP datagram (version 2): the proxy impairs it; 0x00 is STUN, passed as is
RTP = 0x80
STUN = 0x00


@dataclass
class Endpoint(asyncio.DatagramProtocol):
    """A UDP socket that keeps (arrival time, one-way delay, size, first byte) of what it gets
    and the address it last got something from."""

    loop: asyncio.AbstractEventLoop
    arrivals: list[tuple[float, float, int, int]] = field(default_factory=list)
    peer: tuple[str, int] | None = None
    transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        now = self.loop.time()
        (sent,) = struct.unpack_from("!d", data, 1)
        self.arrivals.append((now, now - sent, len(data), data[0]))
        self.peer = addr

    def send(self, to: tuple[str, int], size: int = SIZE, first: int = RTP) -> None:
        assert self.transport is not None
        head = bytes([first]) + struct.pack("!d", self.loop.time())
        self.transport.sendto(head + bytes(size - len(head)), to)

    def bits_per_second(self, start: float, end: float) -> float:
        """Bits/s of the payloads that arrived in [start, end)."""
        got = sum(size for at, _, size, _ in self.arrivals if start <= at < end)
        return got * 8 / (end - start)

    def delays(self, start: float, end: float) -> list[float]:
        """One-way delays of the datagrams that arrived in [start, end)."""
        return [delay for at, delay, _, _ in self.arrivals if start <= at < end]


@dataclass
class Rig:
    """client -> proxy -> relay stand-in, and back."""

    proxy: ImpairingProxy
    client: Endpoint
    relay: Endpoint

    def sender(self, direction: str) -> tuple[Endpoint, tuple[str, int], Endpoint]:
        """(who sends, to where, who receives) for a flood in ``direction``."""
        if direction == "to_relay":
            return self.client, self.proxy.address, self.relay
        assert self.relay.peer is not None, "the client has not been through the proxy yet"
        return self.relay, self.relay.peer, self.client

    async def flood(self, direction: str, rate: float, seconds: float) -> int:
        """Send SIZE-byte datagrams at ``rate`` bits/s for ``seconds``; how many were sent."""
        source, to, _ = self.sender(direction)
        loop = asyncio.get_running_loop()
        interval = SIZE * 8 / rate
        start = loop.time()
        sent = 0
        while loop.time() - start < seconds:
            due = int((loop.time() - start) / interval) + 1
            while sent < due:
                source.send(to)
                sent += 1
            await asyncio.sleep(0.002)
        return sent

    def close(self) -> None:
        self.proxy.close()
        for end in (self.client, self.relay):
            if end.transport is not None:
                end.transport.close()


async def rig(to_relay: Impairment, to_client: Impairment) -> Rig:
    loop = asyncio.get_running_loop()
    _, relay = await loop.create_datagram_endpoint(
        lambda: Endpoint(loop), local_addr=("127.0.0.1", 0)
    )
    assert relay.transport is not None
    target = relay.transport.get_extra_info("sockname")[:2]
    proxy = await ImpairingProxy.start(target, to_relay, to_client, seed=3)
    _, client = await loop.create_datagram_endpoint(
        lambda: Endpoint(loop), local_addr=("127.0.0.1", 0)
    )
    result = Rig(proxy, client, relay)
    # one datagram through, so that the proxy has its upstream socket and the relay stand-in
    # knows where to answer
    client.send(proxy.address, first=STUN)
    for _ in range(100):
        if relay.peer is not None:
            break
        await asyncio.sleep(0.01)
    assert relay.peer is not None, "the proxy forwarded nothing"
    relay.arrivals.clear()
    return result


def limited(direction: str, **fields: float) -> tuple[Impairment, Impairment]:
    """(to_relay, to_client) with ``fields`` on ``direction`` only."""
    return (
        (Impairment(**fields), Impairment())  # type: ignore[arg-type]
        if direction == "to_relay"
        else (Impairment(), Impairment(**fields))  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("direction", ["to_relay", "to_client"])
async def test_a_flood_is_delivered_at_the_rate_and_the_excess_dropped_at_the_queue(
    direction: str,
) -> None:
    """2.5 times the rate for 1.5 s: the far end gets the rate (within 15 %), the delay grows
    to the queue's 100 ms and stays there, the rest is dropped at the queue's tail (not as
    random loss), and the other direction is untouched."""
    r = await rig(*limited(direction, rate=RATE))
    try:
        _, _, receiver = r.sender(direction)
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = await r.flood(direction, 2.5 * RATE, 1.5)
        end = loop.time()
        await asyncio.sleep(0.2)  # the queue empties
        # from when the queue has filled to the end of the flood (the link is busy throughout)
        measured = receiver.bits_per_second(start + 0.2, end)
        stats = r.proxy.links[direction]
        other = r.proxy.links["to_client" if direction == "to_relay" else "to_relay"]
        early = receiver.delays(start, start + 0.03)
        late = receiver.delays(start + 0.3, end)
        outcome = (
            f"{measured / 1e6:.3f} Mbit/s delivered of {RATE / 1e6:.3f}; {sent} sent, {stats}; "
            f"delays first 30 ms {[round(d, 3) for d in early]}, after 0.3 s "
            f"{min(late):.3f}-{max(late):.3f} s (median {statistics.median(late):.3f})"
        )
        print(outcome)
        assert abs(measured - RATE) <= TOLERANCE * RATE, outcome
        assert stats.lost == 0 and r.proxy.dropped == 0, outcome
        assert stats.queue_dropped > 0 and r.proxy.queue_dropped == stats.queue_dropped, outcome
        assert stats.delivered + stats.queue_dropped == sent, outcome
        assert len(receiver.arrivals) == sent - stats.queue_dropped, outcome
        # delay before loss: the queue fills to its 100 ms at the rate, then drops at the tail
        assert early and min(early) < 0.03, outcome
        # (the median: a loop that wakes late shifts single datagrams' delays)
        assert 0.085 <= statistics.median(late) <= 0.11 and max(late) <= 0.15, outcome
        assert 0.08 <= stats.max_queue_delay <= 0.13, outcome
        assert other.delivered == 0 and other.queue_dropped == 0, outcome
    finally:
        r.close()


async def test_below_the_queue_limit_the_excess_waits_and_nothing_is_dropped() -> None:
    """A burst of 10 datagrams at once (10 kB, under the 12.5 kB queue) and then a flow at 80 %
    of the rate: everything arrives, the burst spread at the rate (8 ms apart), the flow with
    no lasting delay."""
    r = await rig(Impairment(rate=RATE), Impairment())
    try:
        loop = asyncio.get_running_loop()
        for _ in range(10):
            r.client.send(r.proxy.address)
        await asyncio.sleep(0.2)
        burst = [at for at, _, _, _ in r.relay.arrivals]
        gaps = [b - a for a, b in zip(burst, burst[1:], strict=False)]
        spread = burst[-1] - burst[0] if burst else 0.0
        flow_start = loop.time()
        sent = await r.flood("to_relay", 0.8 * RATE, 1.0)
        await asyncio.sleep(0.1)
        stats = r.proxy.links["to_relay"]
        flow = r.relay.delays(flow_start, loop.time())
        outcome = (
            f"burst arrived over {spread * 1000:.1f} ms, gaps (ms) "
            f"{[round(g * 1000, 1) for g in gaps]}; flow: {sent} sent, delays "
            f"{min(flow):.4f}-{max(flow):.4f} s; {stats}"
        )
        print(outcome)
        assert len(burst) == 10, outcome
        # the first passes on the bucket's burst, the other 9 leave one per 8 ms
        assert 9 * 0.008 * 0.85 <= spread <= 9 * 0.008 * 1.15 + 0.005, outcome
        assert stats.queue_dropped == 0 and stats.lost == 0, outcome
        assert stats.delivered == 10 + sent and len(flow) == sent, outcome
        # under the rate, a datagram waits at most for the one before it
        assert max(flow) < 0.03, outcome
    finally:
        r.close()


async def test_a_new_rate_and_a_lifted_one_take_effect_at_once() -> None:
    """A flood at 2.5 Mbit/s towards the client through a 1 Mbit/s limit; raised to 2 Mbit/s,
    the far end gets 2 Mbit/s from then on; lifted (``rate = None``), what waited arrives at
    once and then everything does, without delay. STUN passes untouched throughout."""
    r = await rig(Impairment(), Impairment(rate=RATE))
    try:
        loop = asyncio.get_running_loop()
        flood = asyncio.ensure_future(r.flood("to_client", 2.5 * RATE, 2.4))
        start = loop.time()
        await asyncio.sleep(0.8)
        assert r.relay.peer is not None
        r.relay.send(r.relay.peer, first=STUN)
        raised = loop.time()
        r.proxy.to_client.rate = 2 * RATE
        await asyncio.sleep(0.8)
        lifted = loop.time()
        r.proxy.to_client.rate = None
        sent = await flood
        end = loop.time()
        await asyncio.sleep(0.1)
        stats = r.proxy.links["to_client"]
        first = r.client.bits_per_second(start + 0.2, raised)
        second = r.client.bits_per_second(raised + 0.1, lifted)
        third = r.client.bits_per_second(lifted + 0.05, end)
        # the queue, 100 ms at the old rate, is delivered right after the lift
        backlog_done = max(
            (at for at, delay, _, _ in r.client.arrivals if at - delay < lifted), default=0.0
        )
        after = r.client.delays(lifted + 0.05, end)
        stun = [(at, delay) for at, delay, _, kind in r.client.arrivals if kind == STUN]
        outcome = (
            f"{first / 1e6:.2f} / {second / 1e6:.2f} / {third / 1e6:.2f} Mbit/s at 1 Mbit/s, "
            f"2 Mbit/s and lifted (2.5 offered); the backlog delivered "
            f"{(backlog_done - lifted) * 1000:.1f} ms after the lift; delays after the lift "
            f"{min(after):.4f}-{max(after):.4f} s; STUN {stun}; {sent} sent, {stats}"
        )
        print(outcome)
        assert abs(first - RATE) <= TOLERANCE * RATE, outcome
        assert abs(second - 2 * RATE) <= TOLERANCE * 2 * RATE, outcome
        assert abs(third - 2.5 * RATE) <= TOLERANCE * 2.5 * RATE, outcome
        assert backlog_done - lifted < 0.02, outcome
        assert max(after) < 0.02, outcome
        # STUN did not wait behind the full queue
        assert len(stun) == 1 and stun[0][1] < 0.02, outcome
    finally:
        r.close()


async def test_random_loss_and_queue_drops_are_counted_apart() -> None:
    """10 % seeded loss and a rate limit on one direction, flooded at twice the rate: both
    kinds of drop happen and each is counted as itself; without a rate, only loss."""
    r = await rig(Impairment(loss=0.1, rate=RATE), Impairment(loss=0.1))
    try:
        sent = await r.flood("to_relay", 2 * RATE, 0.6)
        back = await r.flood("to_client", 2 * RATE, 0.5)
        await asyncio.sleep(0.2)
        up, down = r.proxy.links["to_relay"], r.proxy.links["to_client"]
        outcome = f"to_relay: {sent} sent, {up}; to_client: {back} sent, {down}"
        print(outcome)
        assert 0.05 * sent <= up.lost <= 0.15 * sent, outcome
        assert up.queue_dropped > 0 and up.lost + up.queue_dropped + up.delivered == sent, outcome
        assert down.queue_dropped == 0 and 0 < down.lost <= 0.2 * back, outcome
        assert down.lost + down.delivered == back, outcome
        assert r.proxy.dropped == up.lost + down.lost, outcome
        assert r.proxy.queue_dropped == up.queue_dropped, outcome
    finally:
        r.close()
