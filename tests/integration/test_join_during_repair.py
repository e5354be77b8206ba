"""A subscriber that joins while the relay is repairing a loss on the publisher's leg.

The race, forced: a video packet of the publisher is lost, the relay sees the gap and NACKs it,
and the publisher's retransmission (with everything it sends after it) is held in the
impairing proxy until the late subscriber's connection is up; then the retransmission is
released first. The late subscriber must still start cleanly (on a keyframe, never on the
retransmission), decode at least 95% of the frames with no freeze over 1 s, and the relay must
not ask the publisher for more keyframes than the loss needs.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.integration.clients import CallClient, wait_for
from tests.integration.conftest import read_metrics, start_relay, stop_relay
from tests.integration.netem import ImpairingProxy, Impairment

pytestmark = pytest.mark.integration

WINDOW = 10.0


class RaceProxy(ImpairingProxy):
    """Drops one video packet towards the relay, lets ``let_through`` more pass so the relay
    sees the gap, then holds everything else towards the relay (media and RTCP; STUN and DTLS
    pass) until :meth:`release`, which sends the held retransmissions first."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.video_ssrc: int | None = None
        self.armed = False
        self.let_through = 0
        self.dropped_seq: int | None = None
        self.held: list[tuple[bytes, object]] = []
        self.holding = False

    def arm(self, video_ssrc: int, let_through: int = 3) -> None:
        self.video_ssrc = video_ssrc
        self.let_through = let_through
        self.armed = True

    def _relay(self, impairment: Impairment, data: bytes, send) -> None:
        if impairment is self.to_relay and len(data) >= 12 and 127 < data[0] < 192:
            is_rtcp = 63 < data[1] & 0x7F < 96
            ssrc = int.from_bytes(data[8:12], "big")
            if self.holding:
                self.held.append((data, send))
                return
            if self.armed and not is_rtcp and ssrc == self.video_ssrc:
                if self.dropped_seq is None:
                    self.dropped_seq = int.from_bytes(data[2:4], "big")
                    self.dropped += 1
                    return
                self.let_through -= 1
                if self.let_through <= 0:
                    self.holding = True
        super()._relay(impairment, data, send)

    def release(self) -> int:
        """Send what was held: the publisher's retransmissions (not its media SSRC) first."""
        self.holding = self.armed = False
        held, self.held = self.held, []
        is_media = [int.from_bytes(d[8:12], "big") == self.video_ssrc for d, _ in held]
        for (data, send), media in zip(held, is_media, strict=True):
            if not media:
                send(data)
        for (data, send), media in zip(held, is_media, strict=True):
            if media:
                send(data)
        return len(held)


async def test_late_subscriber_during_repair_starts_clean(tmp_path) -> None:
    relay = start_relay(tmp_path)
    proxy: RaceProxy | None = None
    clients: list[CallClient] = []
    headers = {"Authorization": f"Bearer {relay.key}"}
    try:
        proxy = await RaceProxy.start(("127.0.0.1", relay.media_port), Impairment(), Impairment())
        room = "repair"
        httpx.post(f"{relay.api}/v1/rooms", json={"room_id": room}, headers=headers)
        red = CallClient(relay.api, relay.key, room, "red", proxies={"publisher": proxy.address})
        green = CallClient(relay.api, relay.key, room, "green")
        blue = CallClient(relay.api, relay.key, room, "blue")
        clients = [red, green, blue]
        await red.join()
        await green.join()
        await green.subscribe()
        await red.publish(audio=False, moving=True, size=(320, 240))
        assert await wait_for(lambda: green.received.frames.get("red", 0) > 15, 30)
        async with httpx.AsyncClient(base_url=relay.api, headers=headers, timeout=10) as http:
            stats = (await http.get(f"/v1/rooms/{room}/participants/red/stats")).json()
            video_ssrc = next(t["ssrc"] for t in stats["inbound"] if t["kind"] == "video")
            before = await read_metrics(http)
            proxy.arm(video_ssrc)
            assert await wait_for(lambda: proxy.holding, 10), "the proxy never started holding"
            # the relay has seen the gap: its NACK and the publisher's retransmission are in
            # flight, the retransmission held; now the late subscriber joins
            await blue.join()
            await blue.subscribe()

            async def connected() -> bool:
                r = await http.get(f"/v1/rooms/{room}/participants/blue")
                return r.json()["state"] == "connected"

            deadline = time.monotonic() + 15
            while not await connected():
                assert time.monotonic() < deadline, "the late subscriber never connected"
                await asyncio.sleep(0.01)
            held = proxy.release()
            assert held > 0 and proxy.dropped_seq is not None
            assert await wait_for(lambda: blue.received.frames.get("red", 0) > 0, 10), (
                "the late subscriber decoded nothing",
                relay.log()[-3000:],
            )
            start, sent_before = time.monotonic(), red.video_track.frame_count
            await asyncio.sleep(WINDOW)
            end, sent = time.monotonic(), red.video_track.frame_count - sent_before
            after = await read_metrics(http)
            stats = (await http.get(f"/v1/rooms/{room}/participants/red/stats")).json()
            blue_stats = (await http.get(f"/v1/rooms/{room}/participants/blue/stats")).json()
        decoded = blue.received.frames_between("red", start, end)
        freeze = blue.received.longest_freeze("red", start, end)
        video = next(t for t in stats["inbound"] if t["kind"] == "video")
        blue_video = next(t for t in blue_stats["outbound"] if t["kind"] == "video")
        keyframe_requests = (
            after["relay_keyframe_requests_total"] - before["relay_keyframe_requests_total"]
        )
        report = (
            f"late subscriber: {decoded}/{sent} frames ({decoded / sent:.1%}), longest freeze "
            f"{freeze:.2f} s; {held} datagrams held; keyframe requests {keyframe_requests:.0f}, "
            f"lost unrepaired {video['lost_unrepaired']}, retransmissions received "
            f"{video['retransmissions_received']}; NACKs from the late subscriber "
            f"{blue_video['nacks_received']}"
        )
        print(report)
        assert decoded / sent >= 0.95 and freeze <= 1.0, report
        # its leg loses nothing, so a numbering without gaps gives it nothing to NACK
        assert blue_video["nacks_received"] == 0, report
        # one for the late subscriber's start, one more if the held repair came too late
        # for the relay's own recovery (it gives up after a second) and nothing else
        assert keyframe_requests <= 1 + min(1, video["lost_unrepaired"]), report
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        if proxy is not None:
            proxy.close()
        stop_relay(relay)
