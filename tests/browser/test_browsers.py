"""Real browsers in group calls through `relay serve`, using the demo page at /demo.

Headless Chromium and Firefox ESR with fake cameras and microphones, and an aiortc client, in
a network namespace the tests make and remove. Each page reports its state and getStats()
summary to the test every second (the demo page's `report` option).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import Call
from tests.browser.harness import CONSENT_TIMEOUT, ROOT, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

#: framesDecoded must grow by this much for every (receiver, publisher) pair.
FRAMES = 60
#: inbound audio packetsReceived must grow by this much (50 packets: one second of Opus).
AUDIO_PACKETS = 50
#: Generous: two browsers starting at once on two cores take several seconds to join.
MEDIA_TIMEOUT = 60.0
#: Written when set, e.g. RELAY_DEMO_SCREENSHOT=docs/demo-3party.png
SCREENSHOT_ENV = "RELAY_DEMO_SCREENSHOT"


def counters(call: Call, expect: dict[str, set[str]]) -> dict[tuple[str, str], tuple[int, int]]:
    """(receiver, publisher) -> (video framesDecoded, audio packetsReceived) from the pages."""
    result = {}
    for receiver, publishers in expect.items():
        for publisher in publishers:
            video = call.inbound(receiver, publisher, "video")
            audio = call.inbound(receiver, publisher, "audio")
            result[(receiver, publisher)] = (
                int(video.get("framesDecoded") or 0),
                int(audio.get("packetsReceived") or 0),
            )
    return result


def wait_for_media(call: Call, expect: dict[str, set[str]]) -> dict[str, Any]:
    """Every page decodes video and receives audio from every publisher it should, and keeps
    doing so: framesDecoded grows by FRAMES and packetsReceived by AUDIO_PACKETS."""

    def show() -> str:
        now = counters(call, expect)
        return f"media: {now}, tiles: { {r: call.report(r).get('tiles') for r in expect} }"

    wait_until(
        lambda: all(v > 0 and a > 0 for v, a in counters(call, expect).values()),
        MEDIA_TIMEOUT,
        what=lambda: f"first frames and audio packets ({show()})",
    )
    start = counters(call, expect)
    started = time.monotonic()

    def grown() -> bool:
        now = counters(call, expect)
        return all(
            now[k][0] - start[k][0] >= FRAMES and now[k][1] - start[k][1] >= AUDIO_PACKETS
            for k in start
        )

    wait_until(grown, MEDIA_TIMEOUT, what=lambda: f"{FRAMES} more frames each ({show()})")
    window = time.monotonic() - started
    end = counters(call, expect)
    return {
        "window_s": round(window, 1),
        "fps": {
            f"{r}<-{p}": round((end[(r, p)][0] - start[(r, p)][0]) / window, 1) for r, p in end
        },
    }


def first_remote_frame(call: Call, label: str) -> dict[str, float]:
    """Seconds from page load (navigation start) to the first frame of each publisher."""
    return {k: round(v / 1000, 2) for k, v in (call.report(label).get("firstFrame") or {}).items()}


def note(request: pytest.FixtureRequest, name: str, value: Any) -> None:
    """Keep a measurement in the JUnit report and print it (visible with -s or -rP)."""
    request.node.user_properties.append((name, value))
    print(f"{name}: {json.dumps(value)}")


def left(participant: str) -> Callable[[dict[str, Any]], bool]:
    """Matches the ``participant.left`` event of ``participant``."""
    return lambda e: e.get("type") == "participant.left" and e.get("participant_id") == participant


# --------------------------------------------------------------------------------------------


def test_chromium_firefox_and_aiortc_in_one_room(
    call: Call, request: pytest.FixtureRequest
) -> None:
    """Three participants, three WebRTC stacks: everyone gets everyone else's video and audio.

    The aiortc client is in the room first; then Chromium joins the way a person does (the
    page asks the relay's development endpoint for a token) and Firefox the way a signaling
    server's client does (a token in the page's URL)."""
    aiortc = call.aiortc("aiortc")
    chromium = call.open_page("chromium", "chromium", token=False, devtools=True)
    call.open_page("firefox", "firefox")
    for label in ("chromium", "firefox"):
        call.wait_joined(label)
    expect = {"chromium": {"firefox", "aiortc"}, "firefox": {"chromium", "aiortc"}}
    window = wait_for_media(call, expect)
    browsers = ("chromium", "firefox")
    wait_until(
        lambda: all(
            aiortc.video_frames.get(b, 0) >= FRAMES and aiortc.audio_frames.get(b, 0) >= 50
            for b in browsers
        ),
        MEDIA_TIMEOUT,
        what=lambda: (
            f"aiortc to decode both browsers ({aiortc.video_frames}, {aiortc.audio_frames})"
        ),
    )
    for label in browsers:
        report = call.report(label)
        assert sorted(report["tiles"]) == sorted(expect[label])
        assert report["mode"] == "sendrecv"
        assert report["states"]["publisher"] == report["states"]["subscriber"] == "connected"
    # Every browser's own media reaches the relay as one audio and one video track.
    room = call.api("GET", f"/v1/rooms/{call.room}").json()
    kinds = {
        p["participant_id"]: sorted(t["kind"] for t in p["tracks"]) for p in room["participants"]
    }
    assert kinds == {name: ["audio", "video"] for name in ("aiortc", "chromium", "firefox")}

    note(request, "media window", window)
    for label in browsers:
        note(
            request,
            f"{label}: page load to first remote frame (s)",
            first_remote_frame(call, label),
        )
        note(request, f"{label}: page load to each step (ms)", call.report(label).get("marks"))
    note(
        request,
        "aiortc: join to first frame (s)",
        {k: round(v - aiortc.joined_at, 2) for k, v in aiortc.first_frame_at.items()},
    )

    assert chromium.cdp is not None
    png = chromium.cdp.screenshot()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    shot = call.folder / "demo-3party.png"
    shot.write_bytes(png)
    target = os.environ.get(SCREENSHOT_ENV)
    if target:
        path = Path(target) if Path(target).is_absolute() else ROOT / target
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, path)
        print(f"screenshot written to {path}")

    # The buttons: mute and unmute, then leave; Firefox's page drops the tile at once.
    page = chromium.cdp
    badge = "document.querySelector('.tile.local .badges').textContent"
    page.evaluate("document.getElementById('mute-audio').click()")
    page.evaluate("document.getElementById('mute-video').click()")
    assert page.evaluate(badge) == "· mic off, camera off"
    assert page.evaluate("document.getElementById('mute-video').textContent") == "Start camera"
    page.evaluate("document.getElementById('mute-audio').click()")
    page.evaluate("document.getElementById('mute-video').click()")
    assert page.evaluate(badge) == ""
    page.evaluate("document.getElementById('leave').click()")
    wait_until(
        lambda: call.events.find(lambda e: left("chromium")(e) and e["reason"] == "left"),
        10,
        what="participant.left (left) after the Leave button",
    )
    wait_until(
        lambda: call.report("firefox").get("tiles") == ["aiortc"],
        10,
        what=lambda: f"Firefox to drop the tile ({call.report('firefox').get('tiles')})",
    )
    assert page.evaluate("document.getElementById('join').hidden") is False
    wait_until(lambda: call.report("chromium").get("state") == "left", 10, what="the page to leave")


def test_receive_only_browser_gets_the_others_media(call: Call) -> None:
    """A Firefox that is refused camera and microphone joins receive-only (no publisher
    connection, a subscriber connection whose m-lines it answers recvonly) and still gets
    both others' video and audio."""
    call.aiortc("aiortc")
    call.open_page("chromium", "chromium")
    call.open_page("firefox", "listener", camera=False)
    listener = call.wait_joined("listener")
    call.wait_joined("chromium")
    assert listener["mode"] == "recvonly"
    assert listener["states"]["publisher"] == "none"
    wait_for_media(call, {"listener": {"chromium", "aiortc"}})
    participant = call.api("GET", f"/v1/rooms/{call.room}/participants/listener").json()
    assert participant["tracks"] == []
    assert participant["state"] == "connected"
    assert len(participant["subscriptions"]) == 4
    # The others have no tile for someone who publishes nothing.
    assert "listener" not in call.report("chromium")["tiles"]


def test_closed_tab_times_out_and_the_others_drop_its_tile(call: Call) -> None:
    """A browser that disappears without leaving (killed: no DELETE, no DTLS close) is timed
    out after the consent timeout; the others get participant.left (timeout) and their page
    drops its tile without reloading."""
    firefox = call.open_page("firefox", "firefox")
    call.open_page("chromium", "chromium")
    wait_for_media(call, {"chromium": {"firefox"}, "firefox": {"chromium"}})
    assert "firefox" in call.report("chromium")["tiles"]

    killed_at = time.monotonic()
    firefox.kill()
    found = wait_until(
        lambda: call.events.find(left("firefox")),
        CONSENT_TIMEOUT + 15,
        what="participant.left for the killed browser",
    )
    arrived, event = found
    elapsed = arrived - killed_at
    assert event["reason"] == "timeout", event
    # Detected by the consent timer (1 s housekeeping), not earlier and not much later.
    assert CONSENT_TIMEOUT - 1.5 <= elapsed <= CONSENT_TIMEOUT + 3, elapsed
    print(f"participant.left (timeout) {elapsed:.1f} s after the browser was killed")

    def page_dropped_tile() -> bool:
        report = call.report("chromium")
        seen = any(left("firefox")(e) for e in report.get("events", []))
        return seen and "firefox" not in report.get("tiles", ["firefox"])

    wait_until(page_dropped_tile, 10, what="the Chromium page to drop the Firefox tile")
    gone = [e for e in call.report("chromium")["events"] if left("firefox")(e)]
    assert gone[-1]["reason"] == "timeout"
    # The call goes on for who is left: the relay offers Chromium nothing of Firefox anymore.
    participant = call.api("GET", f"/v1/rooms/{call.room}/participants/chromium").json()
    assert participant["subscriptions"] == []


def test_h264_between_two_chromiums(call: Call) -> None:
    """In a room whose codec preference puts H.264 first, two Chromium pages publish H.264
    through the relay and decode it."""
    # the relay takes the room's preferred codec, not the order of the page's offer
    assert call.api("DELETE", f"/v1/rooms/{call.room}").status_code == 204
    body = {"room_id": call.room, "codec_preference": ["H264", "VP8"]}
    assert call.api("POST", "/v1/rooms", json=body).status_code == 201
    call.open_page("chromium", "alice", codec="h264")
    first = wait_until(
        lambda: call.report("alice") if "capabilities" in call.report("alice") else None,
        30,
        what="the first report of the page",
    )
    if not any(c.lower().startswith("video/h264") for c in first["capabilities"]):
        pytest.skip(
            "the installed Chromium has no H.264 encoder: RTCRtpSender.getCapabilities('video') "
            f"lists {sorted({c.split()[0] for c in first['capabilities']})}"
        )
    call.open_page("chromium", "bob", codec="h264")
    for label in ("alice", "bob"):
        call.wait_joined(label)
    wait_for_media(call, {"alice": {"bob"}, "bob": {"alice"}})
    room = call.api("GET", f"/v1/rooms/{call.room}").json()
    video = {
        p["participant_id"]: [t["codec"] for t in p["tracks"] if t["kind"] == "video"]
        for p in room["participants"]
    }
    assert video == {"alice": ["video/H264"], "bob": ["video/H264"]}
    assert call.inbound("alice", "bob", "video")["codec"] == "H264"
    assert call.inbound("bob", "alice", "video")["codec"] == "H264"
