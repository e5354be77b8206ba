"""A publisher that also opens a data channel: the relay rejects the m=application line and
takes the rest, and a publisher with nothing but a data channel gets a clear 400."""

from __future__ import annotations

import pytest
from aiortc import RTCSessionDescription

from tests.integration.clients import (
    IDENTITIES,
    CallClient,
    ColourTrack,
    new_peer_connection,
    wait_for,
)
from tests.integration.conftest import new_room

pytestmark = pytest.mark.integration


def parse_sdp_sections(sdp: str) -> list[str]:
    """The m-sections of an SDP, each from its m= line."""
    return ["m=" + section for section in sdp.split("\r\nm=")[1:]]


async def test_video_with_a_data_channel_is_forwarded_and_the_channel_rejected(relay) -> None:
    room = new_room(relay, "datachannel")
    red = CallClient(relay.api, relay.key, room, "red")
    green = CallClient(relay.api, relay.key, room, "green")
    try:
        for c in (red, green):
            await c.join()
        await green.subscribe()

        red.pub = new_peer_connection()
        red.pub.createDataChannel("chat")
        red.video_track = ColourTrack(IDENTITIES["red"][0])
        red.pub.addTransceiver(red.video_track, direction="sendonly")
        await red.pub.setLocalDescription(await red.pub.createOffer())
        offer = red.pub.localDescription.sdp
        assert [s.split()[0] for s in parse_sdp_sections(offer)] == ["m=video", "m=application"]
        r = await red.http.post(f"{red._base()}/publisher", json={"type": "offer", "sdp": offer})
        assert r.status_code == 200, r.text
        answer = r.json()["sdp"]
        video, application = parse_sdp_sections(answer)
        assert application.startswith("m=application 0 ")
        assert not video.startswith("m=video 0 ")
        mids = [line.split(":", 1)[1] for line in answer.splitlines() if line.startswith("a=mid:")]
        bundle = next(line for line in answer.splitlines() if line.startswith("a=group:BUNDLE"))
        assert bundle.split()[1:] == [mids[0]]  # the rejected mid is not in the group
        await red.pub.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

        assert await wait_for(lambda: green.received.frames.get("red", 0) >= 20, 30), (
            green.received,
            relay.log()[-3000:],
        )
        assert red.pub.connectionState == "connected"
    finally:
        for c in (red, green):
            await c.close()


async def test_data_channel_only_offer_is_400_bad_sdp(relay) -> None:
    room = new_room(relay, "datachannel")
    client = CallClient(relay.api, relay.key, room, "blue")
    try:
        await client.join()
        client.pub = new_peer_connection()
        client.pub.createDataChannel("chat")
        await client.pub.setLocalDescription(await client.pub.createOffer())
        offer = client.pub.localDescription.sdp
        r = await client.http.post(
            f"{client._base()}/publisher", json={"type": "offer", "sdp": offer}
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "bad_sdp"
        assert "data channels are not supported yet" in error["message"]
        assert "audio and video only" in error["message"]
    finally:
        await client.close()
