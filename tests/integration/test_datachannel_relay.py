"""Data channels relayed by the relay between aiortc participants (aiortc's own SCTP and DCEP
against the relay's, relay/rtc/sctp.py and relay/rtc/dcep.py): what one sends on its
publisher connection reaches the others on their subscriber connections, with the label,
ordering and reliability of its channel and the sender in the channel's protocol; a channel
whose protocol is ``to:<id>`` reaches that participant only; a flood is refused and counted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from aiortc import RTCDataChannel, RTCSessionDescription

from tests.integration.clients import CallClient, new_peer_connection, wait_for
from tests.integration.conftest import (
    RunningRelay,
    api_client,
    new_room,
    start_relay,
    stop_relay,
)
from tests.integration.test_workers import wait_workers_ready

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

#: a low rate limit, so that a flood is quick to cause
LIMITS = """
[datachannels]
messages_per_second = 20
burst_seconds = 2.0
max_message_bytes = 4096
"""


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRelay]:
    running = start_relay(tmp_path_factory.mktemp("datachannels"), extra=LIMITS)
    yield running
    stop_relay(running)


class ChatClient(CallClient):
    """A participant with data channels only: it opens channels on its publisher connection
    and records what arrives on the channels the relay opens on its subscriber connection."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.channels: dict[str, RTCDataChannel] = {}
        #: (label, protocol, ordered, maxRetransmits, message)
        self.inbox: list[tuple[str, str, bool, int | None, str | bytes]] = []
        self.remote_channels: list[RTCDataChannel] = []

    async def publish_channels(self, channels: dict[str, dict]) -> str:
        self.pub = new_peer_connection()
        for name, options in channels.items():
            self.channels[name] = self.pub.createDataChannel(**options)
        await self.pub.setLocalDescription(await self.pub.createOffer())
        r = await self.http.post(
            f"{self._base()}/publisher",
            json={"type": "offer", "sdp": self.pub.localDescription.sdp},
        )
        assert r.status_code == 200, r.text
        answer = r.json()["sdp"]
        await self.pub.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        opened = await wait_for(
            lambda: all(c.readyState == "open" for c in self.channels.values()), 20
        )
        assert opened, {n: c.readyState for n, c in self.channels.items()}
        return answer

    async def subscribe(self) -> None:
        self.sub = new_peer_connection()
        self.sub.on("datachannel", self._on_datachannel)
        await self.negotiate()

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        self.remote_channels.append(channel)

        @channel.on("message")
        def on_message(message: str | bytes) -> None:
            self.inbox.append(
                (channel.label, channel.protocol, channel.ordered, channel.maxRetransmits, message)
            )

    def texts(self) -> list[tuple[str, str, str | bytes]]:
        return [(label, protocol, m) for label, protocol, _, _, m in self.inbox]


async def chat_room(relay: RunningRelay, names: list[str], channels: dict[str, dict]):
    room = new_room(relay, "chat")
    clients = [ChatClient(relay.api, relay.key, room, name) for name in names]
    for c in clients:
        await c.join()
    for c in clients:
        await c.publish_channels(channels)
    for c in clients:
        await c.subscribe()
    return room, clients


async def test_room_wide_and_one_to_one_messages(relay: RunningRelay) -> None:
    room, clients = await chat_room(
        relay,
        ["red", "green", "blue"],
        {
            "chat": {"label": "chat"},
            "fast": {"label": "reactions", "ordered": False, "maxRetransmits": 0},
            "dm": {"label": "chat", "protocol": "to:blue"},
        },
    )
    red, green, blue = clients
    try:
        # every subscriber gets the others' room-wide channels once they are connected
        assert await wait_for(lambda: all(len(c.remote_channels) >= 4 for c in clients), 20), [
            [(ch.label, ch.protocol) for ch in c.remote_channels] for c in clients
        ]
        assert await wait_for(
            lambda: all(ch.readyState == "open" for c in clients for ch in c.remote_channels), 10
        )
        red.channels["chat"].send("hello from red")
        red.channels["chat"].send(b"\x00\x01binary")
        red.channels["fast"].send("+1")
        red.channels["dm"].send("psst blue")
        for i in range(20):
            red.channels["chat"].send(f"n{i}")
        assert await wait_for(lambda: len(green.inbox) >= 23 and len(blue.inbox) >= 24, 20), (
            green.inbox,
            blue.inbox,
        )
        await asyncio.sleep(0.5)
        # label, ordering, reliability and the sender preserved; order kept on "chat"
        chat = [m for label, proto, m in green.texts() if label == "chat"]
        assert chat == ["hello from red", b"\x00\x01binary"] + [f"n{i}" for i in range(20)]
        assert ("reactions", "from:red", False, 0, "+1") in green.inbox
        assert all(proto == "from:red" for _, proto, _ in green.texts())
        # the one-to-one channel reached blue only, marked as such
        assert ("chat", "from:red;to:blue", "psst blue") in blue.texts()
        assert not any(m == "psst blue" for _, _, m in green.texts())
        assert red.inbox == []  # nothing comes back to the sender
        # and the other way: blue answers red only
        blue_dm = blue.pub.createDataChannel("chat", protocol="to:red")
        assert await wait_for(lambda: blue_dm.readyState == "open", 10)
        blue_dm.send("hi red")
        assert await wait_for(lambda: ("chat", "from:blue;to:red", "hi red") in red.texts(), 10), (
            red.inbox
        )
        await asyncio.sleep(0.3)
        assert not any(m == "hi red" for _, _, m in green.texts())
        metrics = relay.metrics()
        assert metrics["relay_datachannel_messages_total"] >= 25
    finally:
        for c in clients:
            await c.close()


async def test_a_flood_is_refused_and_counted(relay: RunningRelay) -> None:
    room, clients = await chat_room(relay, ["red", "green"], {"chat": {"label": "chat"}})
    red, green = clients
    try:
        assert await wait_for(
            lambda: green.remote_channels and green.remote_channels[0].readyState == "open", 20
        )
        rate_limited = 'relay_datachannel_dropped_total{reason="rate_limited"}'
        start = relay.metrics()
        started = time.monotonic()
        for i in range(300):
            red.channels["chat"].send(f"flood {i}")
        with pytest.raises(ValueError, match="4096"):  # a=max-message-size: aiortc checks it
            red.channels["chat"].send("x" * 5000)

        def arrived() -> float:
            now = relay.metrics()["relay_datachannel_messages_total"]
            return now - start.get("relay_datachannel_messages_total", 0)

        # every message reached the relay (aiortc paces them by its congestion window)
        assert await wait_for(lambda: arrived() >= 300, 30), arrived()
        elapsed = time.monotonic() - started
        dropped = relay.metrics()[rate_limited] - start.get(rate_limited, 0)
        assert await wait_for(lambda: len(green.texts()) >= 300 - dropped, 10)
        await asyncio.sleep(0.3)
        relayed = [m for _, _, m in green.texts()]
        assert len(relayed) + dropped == 300
        # the burst (20 messages/s for 2 s) passes, then 20 a second: the rest is refused
        assert 40 <= len(relayed) <= 40 + 20 * elapsed + 2, (len(relayed), elapsed)
        assert dropped > 0, (dropped, elapsed)
        numbers = [int(m.split()[1]) for m in relayed]
        assert numbers[:40] == list(range(40))
        assert numbers == sorted(numbers)  # in order
        # after the flood the sender may talk again
        await asyncio.sleep(1.0)
        red.channels["chat"].send("calm again")
        assert await wait_for(lambda: "calm again" in [m for _, _, m in green.texts()], 10)
    finally:
        for c in clients:
            await c.close()


async def test_closing_a_channel_closes_it_at_the_others(relay: RunningRelay) -> None:
    room, clients = await chat_room(relay, ["red", "green"], {"chat": {"label": "chat"}})
    red, green = clients
    try:
        assert await wait_for(
            lambda: green.remote_channels and green.remote_channels[0].readyState == "open", 20
        )
        red.channels["chat"].close()
        assert await wait_for(lambda: green.remote_channels[0].readyState == "closed", 10)
        # the connection itself stays up and a new channel works
        again = red.pub.createDataChannel("chat2")
        assert await wait_for(lambda: again.readyState == "open", 10)
        again.send("still here")
        assert await wait_for(lambda: ("chat2", "from:red", "still here") in green.texts(), 10), (
            green.inbox
        )
    finally:
        for c in clients:
            await c.close()


async def test_chat_across_two_workers(tmp_path) -> None:
    """With two worker processes and spread placement, the room's participants sit on both:
    their messages go through the front to the other worker (both ways, one-to-one too)."""
    relay = start_relay(
        tmp_path,
        extra='[workers]\ncount = 2\nplacement = "spread"\n',
        media_ports=2,
    )
    try:
        wait_workers_ready(relay)
        room, clients = await chat_room(
            relay,
            ["red", "green", "blue"],
            {"chat": {"label": "chat"}, "dm": {"label": "chat", "protocol": "to:red"}},
        )
        try:
            async with api_client(relay) as http:
                r = await http.get(f"/v1/rooms/{room}")
            placed = {p["participant_id"]: p["worker"] for p in r.json()["participants"]}
            assert set(placed.values()) == {0, 1}, placed
            assert await wait_for(lambda: all(len(c.remote_channels) >= 2 for c in clients), 20)
            for c in clients:
                c.channels["chat"].send(f"hi from {c.participant_id}")
                c.channels["dm"].send(f"dm from {c.participant_id}")
            red, green, blue = clients
            want = {
                red: {
                    ("chat", "from:green", "hi from green"),
                    ("chat", "from:blue", "hi from blue"),
                    ("chat", "from:green;to:red", "dm from green"),
                    ("chat", "from:blue;to:red", "dm from blue"),
                },
                green: {("chat", "from:red", "hi from red"), ("chat", "from:blue", "hi from blue")},
                blue: {
                    ("chat", "from:red", "hi from red"),
                    ("chat", "from:green", "hi from green"),
                },
            }
            assert await wait_for(lambda: all(w <= set(c.texts()) for c, w in want.items()), 20), (
                placed,
                {c.participant_id: c.texts() for c in clients},
            )
            await asyncio.sleep(0.3)
            assert all(set(c.texts()) == w for c, w in want.items())
        finally:
            for c in clients:
                await c.close()
    finally:
        stop_relay(relay)
