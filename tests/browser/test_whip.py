"""WHIP and WHEP from a Chromium page with `fetch` (``/demo/whip``), on another origin than the
endpoints (the page at ``localhost``, the endpoints at ``127.0.0.1``: every call is a CORS
request with a preflight).

- WHIP: the page publishes its fake camera and microphone with a participant token; an aiortc
  subscriber joined through the control API decodes both. The page also trickles a candidate
  (204), is refused a PATCH with a stale ETag (412), and restarts ICE through PATCH (200):
  media keeps flowing over the restarted connection. DELETE on the Location ends the session
  within a second.
- WHEP: an aiortc participant publishes red and a 440 Hz tone through the control API; the
  page's recvonly offer is answered with them: it decodes red video and receives the audio.
  That publisher is removed and another publishes green: the page, with no new offer, decodes
  green on the same m-lines.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from relay.api.tokens import encode_token
from tests.browser.conftest import Call, World, make_world
from tests.browser.harness import API_PORT, launch_chromium, wait_until
from tests.browser.participants import AiortcParticipant
from tests.browser.test_browsers import left, note

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

#: The endpoints' origin; the page is served from http://localhost (another origin).
ENDPOINTS = f"http://127.0.0.1:{API_PORT}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The namespace and relay, without load shedding: these tests measure setup times on a
    shared machine, where the event loop's lag alone would refuse the sessions."""
    yield from make_world(tmp_path_factory.mktemp("whip"), "\n[overload]\nenabled = false\n")


def token(call: Call, participant: str, **flags: bool) -> str:
    return encode_token(
        call.room,
        participant,
        secret=call.relay.token_secret,
        expires_at=time.time() + 3600,
        **flags,
    )


def open_whip_page(call: Call, label: str, mode: str, bearer: str, **fragment: str) -> str:
    """Chromium showing /demo/whip from http://localhost; returns its report label."""
    report = f"{call.room}.{label}"
    values = {
        "mode": mode,
        "endpoint": f"{ENDPOINTS}/{mode}/{call.room}",
        "token": bearer,
        "report": call.collector.url(report),
        **fragment,
    }
    url = f"http://localhost:{API_PORT}/demo/whip#{urlencode(values)}"
    call.browsers[label] = launch_chromium(call.world.namespace, url, call.folder, label)
    return report


def page_report(call: Call, report: str) -> dict[str, Any]:
    data = call.collector.latest(report) or {}
    if data.get("state") == "error":
        raise AssertionError(f"the page failed: {data.get('error')} {data.get('log')}")
    return data


def subscriber(call: Call, participant: str) -> AiortcParticipant:
    """An aiortc participant that only subscribes, through the control API."""
    bearer = call.participant(participant, can_publish=False)

    async def start() -> AiortcParticipant:
        client = AiortcParticipant(call.relay.api, bearer, call.room, participant, "blue")
        call.clients.append(client)
        await client.join()
        await client.subscribe()
        return client

    return call.loop.run(start())


def delete_session(call: Call, location: str, bearer: str, participant: str) -> float:
    """DELETE the session; seconds until its participant.left event."""

    async def delete() -> int:
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.delete(location, headers={"Authorization": f"Bearer {bearer}"})
            return r.status_code

    started = time.monotonic()
    assert call.loop.run(delete()) == 204
    found = wait_until(lambda: call.events.find(left(participant)), 5, interval=0.02, what="left")
    return found[0] - started


def wall_time(monotonic: float) -> float:
    return time.time() - (time.monotonic() - monotonic)


def test_chromium_publishes_with_whip(call: Call, request: pytest.FixtureRequest) -> None:
    viewer = subscriber(call, "viewer")
    bearer = token(call, "whipcam", can_subscribe=False)
    report = open_whip_page(call, "whipcam", "whip", bearer, restart="2")

    def decoded(frames: int) -> bool:
        return (
            viewer.video_frames.get("whipcam", 0) >= frames
            and viewer.audio_frames.get("whipcam", 0) >= frames
        )

    wait_until(lambda: decoded(30), 60, what=lambda: f"frames of whipcam: {viewer.video_frames}")
    page = page_report(call, report)
    assert page["postStatus"] == 201
    assert page["location"] == f"{ENDPOINTS}/whip/{call.room}/whipcam"
    first = wall_time(viewer.first_frame_at["whipcam"]) - page["postedAt"] / 1000
    note(request, "whip_post_to_first_decoded_frame_s", round(first, 3))
    # trickled candidates: 204; a stale ETag: 412
    wait_until(lambda: page_report(call, report).get("staleStatus"), 20, what="the PATCH calls")
    page = page_report(call, report)
    assert page["trickleStatus"] == 204, page
    assert page["staleStatus"] == 412, page
    # the ICE restart through PATCH, and media over the restarted connection
    wait_until(lambda: page_report(call, report).get("restarted"), 30, what="the ICE restart")
    page = page_report(call, report)
    assert page["restartStatus"] == 200 and page["restartEtag"] != page["etag"], page
    frames = viewer.video_frames["whipcam"]
    wait_until(lambda: decoded(frames + 30), 30, what="frames after the ICE restart")

    def restarted_transport() -> dict[str, Any] | None:
        # Chromium moved to a pair of the new ICE generation: its transport now uses the new
        # local ufrag and selected a pair again (the old pair alone would keep media flowing
        # for a while even if the relay had refused the new credentials)
        transport = (page_report(call, report).get("stats") or {}).get("transport") or {}
        new = transport.get("localUfrag") == page["restartUfrag"]
        return transport if new and (transport.get("pairChanges") or 0) >= 2 else None

    transport = wait_until(restarted_transport, 20, what="the new ICE generation")
    assert transport["iceState"] == "connected" and transport["dtlsState"] == "connected"
    assert page_report(call, report)["connection"] == "connected"
    note(request, "whip_frames_after_restart", viewer.video_frames["whipcam"] - frames)
    seconds = delete_session(call, page["location"], bearer, "whipcam")
    note(request, "whip_delete_to_left_s", round(seconds, 3))
    assert seconds < 1.0


def test_chromium_watches_with_whep(call: Call, request: pytest.FixtureRequest) -> None:
    call.aiortc("pub", identity="red")  # red, 440 Hz, through the control API
    bearer = token(call, "watcher", can_publish=False)
    report = open_whip_page(call, "watcher", "whep", bearer)

    def red_decoded() -> dict[str, Any] | None:
        page = page_report(call, report)
        video = ((page.get("stats") or {}).get("inbound") or {}).get("video") or {}
        colour = page.get("colour")
        if (video.get("framesDecoded") or 0) < 30 or not colour:
            return None
        r, g, b = colour
        return page if r > 150 and g < 100 and b < 100 else None

    page = wait_until(red_decoded, 60, what=lambda: f"red frames: {call.collector.latest(report)}")
    assert page["postStatus"] == 201
    assert page["location"] == f"{ENDPOINTS}/whep/{call.room}/watcher"
    audio = page["stats"]["inbound"]["audio"]
    # headless Chromium has no sound device, so it plays (and measures) no audio: the tone's
    # packets arriving on the negotiated m-line is what can be checked
    assert audio["packets"] > 50, audio
    note(request, "whep_post_to_first_frame_s", round(page["firstFrameMs"] / 1000, 3))
    note(request, "whep_colour", page["colour"])

    # the publisher goes and another comes: the page, which cannot renegotiate, shows it on
    # the same m-lines without a new POST
    assert call.api("DELETE", f"/v1/rooms/{call.room}/participants/pub").status_code == 204
    frames = page["stats"]["inbound"]["video"]["framesDecoded"]
    packets = audio["packets"]
    call.aiortc("pub2", identity="green")
    started = time.monotonic()

    def green_decoded() -> dict[str, Any] | None:
        page = page_report(call, report)
        video = ((page.get("stats") or {}).get("inbound") or {}).get("video") or {}
        colour = page.get("colour")
        if (video.get("framesDecoded") or 0) < frames + 30 or not colour:
            return None
        r, g, b = colour
        return page if g > 150 and r < 100 and b < 100 else None

    page = wait_until(
        green_decoded, 60, what=lambda: f"green frames: {call.collector.latest(report)}"
    )
    note(request, "whep_next_publisher_to_green_s", round(time.monotonic() - started, 3))
    assert page["stats"]["inbound"]["audio"]["packets"] > packets + 50
    seconds = delete_session(call, page["location"], bearer, "watcher")
    note(request, "whep_delete_to_left_s", round(seconds, 3))
    assert seconds < 1.0
