"""A Chromium publisher whose SSRCs the relay must learn, on a lossy path.

RID simulcast offers carry no ``a=ssrc`` lines: the relay binds each SSRC to a track when a
packet arrives with the ``sdes:mid`` header extension. Retransmissions on the RTX stream carry
the mid too, and libwebrtc stops sending the mid on the media stream once it has a receiver
report for it. Here Chromium's offer reaches the relay without its ``a=ssrc`` and
``a=ssrc-group`` lines (Chromium's own description keeps them), its media goes through a
seeded impairing proxy that drops 3% of its RTP and RTCP towards the relay, and an aiortc
participant decodes its video: the video must not freeze while the relay asks for and gets
retransmissions on the RTX stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from typing import Any

import pytest
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from tests.browser.conftest import Call
from tests.browser.harness import (
    MEDIA_PORT,
    PEER_ADDRESS,
    RELAY_ADDRESS,
    VIA_PROXY_JS,
    launch_chromium,
    wait_until,
)
from tests.browser.participants import AiortcParticipant
from tests.integration.netem import ImpairingProxy, Impairment

pytestmark = [pytest.mark.browser, pytest.mark.timeout(150)]

#: seconds of video the subscriber must decode without a freeze
WINDOW = 20.0
#: the longest allowed time between two decoded frames
MAX_FREEZE = 1.0
#: the publisher's leg: RTP and RTCP towards the relay lose 3% (STUN and DTLS pass)
TO_RELAY = Impairment(loss=0.03)
TO_CLIENT = Impairment()
SEED = 7
#: camera asked of the publisher: enough packets per frame that losses happen every second
#: one encoding: the demo page publishes simulcast (rids) by default, and this test needs the
#: FID group of a single stream
CAMERA = {"width": "640", "height": "480", "fps": "15", "simulcast": "0"}

#: Installed in the page before its own script runs: the publisher offer the page POSTs loses
#: its SSRC lines, and the relay's candidates in the answer the page applies point at the proxy.
PAGE_SCRIPT = (
    """
(() => {
  const proxy = { host: %(host)s, port: %(port)d };
  const seen = (window.__publisherLeg = {});
  const original = window.fetch.bind(window);
  const withoutSsrcs = (sdp) =>
    sdp.split('\\r\\n').filter((line) => !/^a=ssrc(-group)?:/.test(line)).join('\\r\\n');
"""
    + VIA_PROXY_JS
    + """  window.fetch = async (input, init) => {
    const url = typeof input === 'string' ? input : input.url;
    if (!init || init.method !== 'POST' || !/\\/publisher$/.test(url) || !init.body) {
      return original(input, init);
    }
    const offer = JSON.parse(init.body);
    seen.offer = offer.sdp;
    offer.sdp = withoutSsrcs(offer.sdp);
    seen.sent = offer.sdp;
    const response = await original(input, { ...init, body: JSON.stringify(offer) });
    if (!response.ok) return response;
    const answer = await response.json();
    seen.answer = answer.sdp;
    answer.sdp = viaProxy(answer.sdp);
    seen.applied = answer.sdp;
    return new Response(JSON.stringify(answer), {
      status: response.status,
      headers: { 'Content-Type': 'application/json' },
    });
  };
})();
"""
)


class FrameTimes(AiortcParticipant):
    """A receive-only participant that keeps the arrival time of every decoded video frame."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.frame_times: list[float] = []

    async def _consume(self, track: MediaStreamTrack) -> None:
        if track.kind != "video":
            await super()._consume(track)
            return
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
                self.frame_times.append(time.monotonic())

    def longest_freeze(self, start: float, end: float) -> float:
        times = [start, *(t for t in self.frame_times if start <= t <= end), end]
        return max(b - a for a, b in zip(times, times[1:], strict=False))

    def frames_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.frame_times if start <= t <= end)


def video_section(sdp: str) -> str:
    sections = re.split(r"\r?\n(?=m=)", sdp)
    return next(s for s in sections if s.startswith("m=video"))


def signalled_ssrcs(sdp: str) -> tuple[int, int]:
    """(media SSRC, RTX SSRC) of the video m-line, from its FID group."""
    match = re.search(r"^a=ssrc-group:FID (\d+) (\d+)", video_section(sdp), re.M)
    assert match, f"Chromium's offer has no FID group:\n{sdp}"
    return int(match.group(1)), int(match.group(2))


def rtx_answered(sdp: str) -> bool:
    """The video m-line of an answer keeps VP8 with NACK and its RTX payload type."""
    section = video_section(sdp)
    vp8 = re.search(r"^a=rtpmap:(\d+) VP8/90000", section, re.M)
    if vp8 is None:
        return False
    pt = vp8.group(1)
    nack = re.search(rf"^a=rtcp-fb:{pt} nack\s*$", section, re.M)
    rtx = re.search(rf"^a=fmtp:(\d+) apt={pt}\s*$", section, re.M)
    return bool(nack and rtx and re.search(rf"^a=rtpmap:{rtx.group(1)} rtx/", section, re.M))


def dropped_packets(call: Call) -> dict[str, int]:
    """The relay's ``relay_packets_dropped_total`` counters, by reason."""
    text = call.api("GET", "/metrics").text
    found = re.findall(r'^relay_packets_dropped_total\{reason="([^"]+)"\} (\S+)$', text, re.M)
    return {reason: int(float(value)) for reason, value in found}


def inbound_video(call: Call, participant: str) -> dict[str, Any]:
    stats = call.api("GET", f"/v1/rooms/{call.room}/participants/{participant}/stats").json()
    return next((t for t in stats["inbound"] if t["kind"] == "video"), {})


def test_chromium_unsignalled_ssrcs_with_rtx_under_loss(call: Call) -> None:
    """Chromium publishes without signalled SSRCs through 3% loss; aiortc decodes its video
    for 20 s with no gap over 1 s, the relay's video track keeps Chromium's media SSRC and
    retransmissions reach it on the RTX stream."""
    proxy = call.loop.run(
        ImpairingProxy.start(
            (RELAY_ADDRESS, MEDIA_PORT), TO_RELAY, TO_CLIENT, seed=SEED, host=PEER_ADDRESS
        )
    )
    try:
        token = call.participant("viewer", can_publish=False)

        async def subscribe() -> FrameTimes:
            viewer = FrameTimes(call.relay.api, token, call.room, "viewer", "blue")
            call.clients.append(viewer)
            await viewer.join()
            await viewer.subscribe()
            return viewer

        viewer = call.loop.run(subscribe())

        url = call.page_url(
            f"{call.room}.camera",
            **CAMERA,
            token=call.participant("camera"),
            participant="camera",
        )
        page = launch_chromium(
            call.world.namespace, "about:blank", call.folder, "camera", devtools=True
        )
        call.browsers["camera"] = page
        cdp = page.cdp
        assert cdp is not None

        def page_session() -> str | None:
            with contextlib.suppress(StopIteration):
                return cdp.page_session()
            return None

        session = wait_until(page_session, 20, what="Chromium's first page")
        host, port = proxy.address
        script = PAGE_SCRIPT % {"host": json.dumps(host), "port": port}
        # the page's script must be installed before the page loads, which needs Page enabled
        cdp.call("Page.enable", session=session)
        cdp.call("Page.addScriptToEvaluateOnNewDocument", {"source": script}, session=session)
        cdp.call("Page.navigate", {"url": url}, session=session)
        call.wait_joined("camera")

        wait_until(
            lambda: (cdp.evaluate("window.__publisherLeg") or {}).get("applied"),
            20,
            what="the publisher answer",
        )
        leg = cdp.evaluate("window.__publisherLeg")
        assert not re.search(r"^a=ssrc", leg["sent"], re.M), "the offer kept its SSRCs"
        media_ssrc, rtx_ssrc = signalled_ssrcs(leg["offer"])
        assert rtx_answered(leg["answer"]), f"no VP8 with NACK and RTX:\n{leg['answer']}"
        assert f" {host} {port} typ host" in leg["applied"]

        wait_until(
            lambda: len(viewer.frame_times) >= 5,
            45,
            what=lambda: f"the first frames ({len(viewer.frame_times)} so far)",
        )
        start = time.monotonic()
        samples: list[tuple[float, int]] = []
        while time.monotonic() - start < WINDOW:
            samples.append((time.monotonic() - start, len(viewer.frame_times)))
            time.sleep(0.2)
        end = time.monotonic()

        frames = viewer.frames_between(start, end)
        freeze = viewer.longest_freeze(start, end)
        last_frame = max(viewer.frame_times) - start if viewer.frame_times else None
        video = inbound_video(call, "camera")
        drops = dropped_packets(call)
        outcome = {
            "frames decoded in window": frames,
            "longest freeze (s)": round(freeze, 2),
            "last frame at (s into window)": last_frame and round(last_frame, 2),
            "media ssrc (Chromium)": media_ssrc,
            "rtx ssrc (Chromium)": rtx_ssrc,
            "relay inbound video": video,
            "relay drops": drops,
            "proxy": {"dropped": proxy.dropped, "forwarded": proxy.forwarded},
            "frames every 2 s": [n for t, n in samples[::10]],
        }
        print(f"unsignalled SSRCs under loss: {json.dumps(outcome)}")
        assert proxy.dropped > 0, outcome
        assert freeze <= MAX_FREEZE, f"the video froze for {freeze:.2f} s: {outcome}"
        assert frames >= WINDOW * 5, f"too few frames decoded: {outcome}"
        assert video.get("ssrc") == media_ssrc, f"the track left the media SSRC: {outcome}"
        assert video.get("retransmissions_received", 0) > 0, f"no retransmissions: {outcome}"
    finally:
        call.loop.loop.call_soon_threadsafe(proxy.close)
        with contextlib.suppress(Exception):
            call.loop.run(asyncio.sleep(0))
