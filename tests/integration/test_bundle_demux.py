"""A native publisher that signals no a=ssrc and no a=extmap (so sends no mid extension): its
packets can only be routed by payload type (RFC 8843 §9.2), and an aiortc subscriber must
decode its video and its audio."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.client.peer import ClientPeer, RemoteDescription, UdpClientPeer
from relay.rtc.sdp import parse_sdp
from tests.integration.clients import CallClient, wait_for
from tests.integration.conftest import add_participant, add_room, api_client, read_drops
from tests.integration.encoded import EncodedSender, Stream

pytestmark = pytest.mark.integration

CAPTURE = Path(__file__).parent.parent / "fixtures" / "sdp" / "chrome_offer.sdp"


async def test_publisher_without_ssrc_or_extmap_is_forwarded_and_decoded(relay) -> None:
    room = "native"
    async with api_client(relay) as http:
        await add_room(http, room)
        viewer = CallClient(relay.api, relay.key, room, "viewer")
        await viewer.join()
        await viewer.subscribe()
        await add_participant(http, room, "native")
        peer = ClientPeer()
        # Chromium's captured offer without a=ssrc, a=ssrc-group or a=extmap lines
        offer = peer.adopt_offer(CAPTURE.read_text(), drop=("a=ssrc", "a=extmap"))
        assert "a=ssrc" not in offer and "a=extmap" not in offer
        r = await http.post(
            f"/v1/rooms/{room}/participants/native/publisher", json={"type": "offer", "sdp": offer}
        )
        assert r.status_code == 200, r.text
        answer = parse_sdp(r.json()["sdp"])
        # the capture's data channel is answered too (it has no codecs)
        accepted = {
            m.kind: m.codecs[0]
            for m in answer.media
            if m.port != 0 and m.kind in ("audio", "video")
        }
        assert accepted["audio"].name == "opus" and accepted["video"].name == "VP8"
        assert any(m.kind == "application" and m.port != 0 for m in answer.media)
        remote = RemoteDescription.parse(r.json()["sdp"])
        peer.set_remote_description(remote)
        drops_before = await read_drops(http)
        try:
            async with UdpClientPeer.connect(peer, remote.address) as udp:
                await udp.connected(timeout=15)
                video = Stream(0x1234ABCD, accepted["video"].payload_type, [])
                audio = Stream(0x5678EF01, accepted["audio"].payload_type, [])
                async with EncodedSender(udp, "green", video, audio) as sender:
                    decoded = await wait_for(
                        lambda: (
                            viewer.received.frames.get("green", 0) >= 30
                            and viewer.received.tones.get("green", 0) >= 3
                        ),
                        30,
                    )
                    drops = await read_drops(http)
                    assert not sender.errors, sender.errors
                    assert decoded, (
                        viewer.received,
                        {k: v - drops_before.get(k, 0) for k, v in drops.items() if v},
                        relay.log()[-2000:],
                    )
            # nothing of the native client's media was dropped as unroutable
            assert drops["unknown_ssrc"] == drops_before.get("unknown_ssrc", 0)
            assert set(viewer.received.frames) == {"green"}
        finally:
            await viewer.close()
