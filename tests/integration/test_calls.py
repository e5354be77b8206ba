"""Real calls between aiortc clients through `relay serve`: the HTTP API and the UDP port.

Each participant publishes its own colour and tone; each subscriber must decode exactly the
other participants' colours and tones.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.integration.clients import CallClient, wait_for
from tests.integration.conftest import new_room

pytestmark = pytest.mark.integration


async def _start(relay, room: str, identities: list[str]) -> list[CallClient]:
    clients = [CallClient(relay.api, relay.key, room, name) for name in identities]
    for c in clients:
        await c.join()
    for c in clients:
        await c.subscribe()
        await c.publish()
    return clients


def _decodes(client: CallClient, names: set[str], frames: int = 20, tones: int = 2) -> bool:
    got = client.received
    return all(got.frames.get(n, 0) >= frames and got.tones.get(n, 0) >= tones for n in names)


async def _close(clients: list[CallClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def test_one_to_one_call_both_ways(relay) -> None:
    room = new_room(relay, "call")
    alice, bob = clients = await _start(relay, room, ["red", "green"])
    try:
        assert await wait_for(lambda: _decodes(alice, {"green"}) and _decodes(bob, {"red"}), 30), (
            alice.received,
            bob.received,
            relay.log()[-3000:],
        )
        # nobody hears or sees themselves
        assert "red" not in alice.received.frames and "red" not in alice.received.tones
        assert "green" not in bob.received.frames and "green" not in bob.received.tones
        metrics = relay.metrics()
        assert metrics["relay_packets_out_total"] > 0
        stats = httpx.get(
            f"{relay.api}/v1/rooms/{room}/participants/red/stats",
            headers={"Authorization": f"Bearer {relay.key}"},
        ).json()
        assert {s["kind"] for s in stats["inbound"]} == {"audio", "video"}
        assert all(s["packets"] > 0 for s in stats["inbound"] + stats["outbound"])
    finally:
        await _close(clients)


async def test_three_party_call(relay) -> None:
    room = new_room(relay, "call")
    clients = await _start(relay, room, ["red", "green", "blue"])
    try:
        everyone = {"red", "green", "blue"}
        assert await wait_for(
            lambda: all(_decodes(c, everyone - {c.identity}) for c in clients), 45
        ), [(c.identity, c.received) for c in clients]
        for c in clients:
            assert c.identity not in c.received.frames
    finally:
        await _close(clients)


async def test_late_joiner_gets_media_fast(relay) -> None:
    room = new_room(relay, "call")
    early = await _start(relay, room, ["red", "green"])
    late: list[CallClient] = []
    try:
        assert await wait_for(lambda: _decodes(early[0], {"green"}), 30)
        late = await _start(relay, room, ["blue"])
        blue = late[0]
        assert await wait_for(lambda: _decodes(blue, {"red", "green"}, frames=5), 30), blue.received
        first = max(blue.received.first_frame_at[n] for n in ("red", "green")) - blue.joined_at
        print(f"late joiner first frame from both publishers after {first:.2f} s")
        # the earlier participants now also get the late joiner
        assert await wait_for(lambda: all(_decodes(c, {"blue"}) for c in early), 30)
    finally:
        await _close(early + late)


async def test_participant_leaving(relay) -> None:
    room = new_room(relay, "call")
    clients = await _start(relay, room, ["red", "green", "blue"])
    red, green, blue = clients
    headers = {"Authorization": f"Bearer {relay.key}"}
    try:
        assert await wait_for(lambda: _decodes(red, {"green", "blue"}), 45)
        before = red.renegotiations
        await blue.leave()
        r = httpx.get(f"{relay.api}/v1/rooms/{room}", headers=headers).json()
        assert sorted(p["participant_id"] for p in r["participants"]) == ["green", "red"]
        for p in r["participants"]:
            assert all(t["participant_id"] != "blue" for t in p["tracks"])
            assert len(p["subscriptions"]) == 2  # only each other's audio and video
        assert await wait_for(lambda: red.renegotiations > before, 10)
        # the others keep decoding each other, and no longer get blue
        blue_frames = red.received.frames.get("blue", 0)
        green_frames = red.received.frames.get("green", 0)
        await asyncio.sleep(3)
        assert red.received.frames.get("green", 0) > green_frames + 10
        assert red.received.frames.get("blue", 0) <= blue_frames + 5
        r = httpx.get(f"{relay.api}/v1/rooms/{room}/participants/blue", headers=headers)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "participant_not_found"
    finally:
        await _close(clients)
