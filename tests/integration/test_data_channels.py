"""A publisher that also opens a data channel: the relay accepts the m=application line (in
the BUNDLE group, with a=sctp-port and a=max-message-size) next to the video it forwards, and a
publisher with nothing but a data channel is accepted too. With ``[datachannels] enabled =
false`` the line is rejected as before (port 0, out of the BUNDLE group, a 400 when it is all
the offer has). What flows on the channels: tests/integration/test_datachannel_relay.py."""

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
from tests.integration.conftest import new_room, start_relay, stop_relay

pytestmark = pytest.mark.integration


def parse_sdp_sections(sdp: str) -> list[str]:
    """The m-sections of an SDP, each from its m= line."""
    return ["m=" + section for section in sdp.split("\r\nm=")[1:]]


async def test_video_with_a_data_channel_is_forwarded_and_the_channel_accepted(relay) -> None:
    room = new_room(relay, "datachannel")
    red = CallClient(relay.api, relay.key, room, "red")
    green = CallClient(relay.api, relay.key, room, "green")
    try:
        for c in (red, green):
            await c.join()
        await green.subscribe()

        red.pub = new_peer_connection()
        red.video_track = ColourTrack(IDENTITIES["red"][0])
        red.pub.addTransceiver(red.video_track, direction="sendonly")
        # after the transceiver: aiortc's max-bundle shares the transceiver's transport with a
        # data channel made after it; one made before keeps a transport of its own, which
        # aiortc then stops when the answer bundles both (its own bug, not the relay's)
        channel = red.pub.createDataChannel("chat")
        await red.pub.setLocalDescription(await red.pub.createOffer())
        offer = red.pub.localDescription.sdp
        assert [s.split()[0] for s in parse_sdp_sections(offer)] == ["m=video", "m=application"]
        r = await red.http.post(f"{red._base()}/publisher", json={"type": "offer", "sdp": offer})
        assert r.status_code == 200, r.text
        answer = r.json()["sdp"]
        video, application = parse_sdp_sections(answer)
        assert not application.startswith("m=application 0 ")
        assert application.split("\r\n")[0].split()[2:] == ["UDP/DTLS/SCTP", "webrtc-datachannel"]
        assert "a=sctp-port:5000" in application and "a=max-message-size:65536" in application
        assert not video.startswith("m=video 0 ")
        mids = [line.split(":", 1)[1] for line in answer.splitlines() if line.startswith("a=mid:")]
        bundle = next(line for line in answer.splitlines() if line.startswith("a=group:BUNDLE"))
        assert bundle.split()[1:] == mids  # both in the group
        await red.pub.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        assert await wait_for(lambda: channel.readyState == "open", 20)  # SCTP and DCEP ran

        assert await wait_for(lambda: green.received.frames.get("red", 0) >= 20, 30), (
            green.received,
            relay.log()[-3000:],
        )
        assert red.pub.connectionState == "connected"
    finally:
        for c in (red, green):
            await c.close()


async def test_data_channel_only_offer_is_accepted(relay) -> None:
    room = new_room(relay, "datachannel")
    client = CallClient(relay.api, relay.key, room, "blue")
    try:
        await client.join()
        client.pub = new_peer_connection()
        channel = client.pub.createDataChannel("chat")
        await client.pub.setLocalDescription(await client.pub.createOffer())
        offer = client.pub.localDescription.sdp
        r = await client.http.post(
            f"{client._base()}/publisher", json={"type": "offer", "sdp": offer}
        )
        assert r.status_code == 200, r.text
        (application,) = parse_sdp_sections(r.json()["sdp"])
        assert (
            application.startswith("m=application ") and " 0 " not in application.split("\r\n")[0]
        )
        await client.pub.setRemoteDescription(
            RTCSessionDescription(sdp=r.json()["sdp"], type="answer")
        )
        assert await wait_for(lambda: channel.readyState == "open", 20)
    finally:
        await client.close()


async def test_data_channels_off_rejects_them_as_before(tmp_path) -> None:
    relay = start_relay(tmp_path, extra="[datachannels]\nenabled = false\n")
    try:
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
            assert "data channels are turned off" in error["message"]
        finally:
            await client.close()
    finally:
        stop_relay(relay)
