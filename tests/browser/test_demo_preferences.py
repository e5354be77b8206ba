"""The demo page tells the relay what each remote tile wants of its video, and pauses the
simulcast layers of its own camera that nobody receives.

Two Chromium pages publish a 960x540 fake camera with three simulcast layers (q 240x135, h
480x270, f 960x540: libwebrtc sends three layers from 960x540 up). Each page asks (``PUT .../subscriptions/{track_id}``) for no more than its remote tile shows, in
device pixels rounded up to 90/180/360/720...; the relay's stats show these ``preferences``.
One page's remote tile is then made 320x180 CSS pixels: its subscription asks for 180 pixels,
the relay forwards a layer that fits (q), announces the publisher's other layers as unused
(``publisher.layers``) and the publisher's page pauses those it has been sending for 3 s
(``active: false``), all but the lowest, which it always sends. The page sends its paused
layers again every 10 s for about 4 s (the relay moves subscribers only among the layers it
receives), so that check waits for up to two such rounds. Hiding the
tile (``display: none``, which the page's IntersectionObserver notices) pauses the subscription
at the relay; showing it again resumes it and frames decode again.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pytest

from tests.browser.conftest import Call
from tests.browser.harness import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

#: the pages' fake camera: 16:9, big enough for three layers of 240x135, 480x270 and 960x540
CAMERA = {"width": "960", "height": "540", "fps": "15"}
#: the page's steps for max_height and max_width
HEIGHTS = [90, 180, 360, 720, 1080, 2160]
WIDTHS = [160, 320, 640, 1280, 1920, 3840]
#: page load to joined and first frames (two browsers starting at once on two cores)
JOIN_TIMEOUT = 60.0
#: a tile change to the relay's stats: the page's 500 ms debounce, the PUT, the stats call
WISH_TIMEOUT = 5.0
#: the small tile, in CSS pixels (its content box: the tile's 2 px border comes on top)
SMALL = (320, 180)


def video_track(call: Call, publisher: str) -> str:
    participant = call.api("GET", f"/v1/rooms/{call.room}/participants/{publisher}").json()
    ids = [t["track_id"] for t in participant["tracks"] if t["kind"] == "video"]
    assert len(ids) == 1, participant
    return ids[0]


def subscription(call: Call, subscriber: str, track_id: str) -> dict[str, Any]:
    """The relay's outbound stats entry of ``subscriber`` for ``track_id`` ({} if none)."""
    r = call.api("GET", f"/v1/rooms/{call.room}/participants/{subscriber}/stats")
    assert r.status_code == 200, r.text
    return next((o for o in r.json()["outbound"] if o["track_id"] == track_id), {})


def published_layers(call: Call, publisher: str) -> list[dict[str, Any]]:
    """rid, size and bitrate of each layer of the publisher's video at the relay."""
    r = call.api("GET", f"/v1/rooms/{call.room}/participants/{publisher}/stats")
    assert r.status_code == 200, r.text
    video = [t for t in r.json()["inbound"] if t["kind"] == "video"]
    return [
        {k: layer.get(k) for k in ("rid", "width", "height", "bitrate")}
        for t in video
        for layer in t.get("layers") or []
    ]


def tile_view(call: Call, viewer: str, publisher: str) -> dict[str, Any]:
    """Size of the viewer's tile of the publisher (content box, CSS px), the device pixel
    ratio, the picture's size and the page's visibility."""
    cdp = call.browsers[viewer].cdp
    assert cdp is not None
    expression = f"""(() => {{
      const tile = document.querySelector('.tile[data-participant="{publisher}"]');
      if (!tile) return null;
      const style = getComputedStyle(tile);
      const border = (side) => parseFloat(style[`border${{side}}Width`]) || 0;
      const rect = tile.getBoundingClientRect();
      const video = tile.querySelector('video');
      return JSON.stringify({{
        width: rect.width - border('Left') - border('Right'),
        height: rect.height - border('Top') - border('Bottom'),
        ratio: devicePixelRatio,
        videoWidth: video.videoWidth,
        videoHeight: video.videoHeight,
        visibility: document.visibilityState,
      }});
    }})()"""
    text = cdp.evaluate(expression)
    return json.loads(text) if text else {}


def expected_wish(view: dict[str, Any]) -> tuple[int, int]:
    """(max_width, max_height) for a tile: the picture covers it (object-fit: cover), in
    device pixels, each rounded up to its step."""
    aspect = view["videoWidth"] / view["videoHeight"]
    width = max(view["width"], view["height"] * aspect) * view["ratio"]
    height = max(view["height"], view["width"] / aspect) * view["ratio"]
    return (
        next(s for s in WIDTHS if s >= math.ceil(width - 0.01)),
        next(s for s in HEIGHTS if s >= math.ceil(height - 0.01)),
    )


def evaluate(call: Call, label: str, expression: str) -> Any:
    cdp = call.browsers[label].cdp
    assert cdp is not None
    return cdp.evaluate(expression)


def frames(call: Call, viewer: str, publisher: str) -> int:
    return int(call.inbound(viewer, publisher, "video").get("framesDecoded") or 0)


def test_tiles_ask_for_their_size_pause_when_hidden_and_unused_layers_stop(call: Call) -> None:
    pages = ("alice", "bob")
    for label in pages:
        call.open_page("chromium", label, devtools=True, **CAMERA)
    for label in pages:
        call.wait_joined(label, JOIN_TIMEOUT)
    other = {"alice": "bob", "bob": "alice"}
    wait_until(
        lambda: all(frames(call, v, p) > 0 for v, p in other.items()),
        JOIN_TIMEOUT,
        what=lambda: (
            f"first frames ({ {v: call.inbound(v, p, 'video') for v, p in other.items()} })"
        ),
    )
    tracks = {p: video_track(call, p) for p in pages}
    started = time.monotonic()

    # the camera is published as three layers (what the relay receives of them is printed)
    for label in pages:
        layers = call.report(label).get("layers")
        assert layers is not None and sorted(layers) == ["f", "h", "q"], layers
    print(f"layers at the relay: { {p: published_layers(call, p) for p in pages} }")

    # 1. each subscription asks for what its tile shows
    def wish_matches(viewer: str) -> dict[str, Any] | None:
        view = tile_view(call, viewer, other[viewer])
        if not view.get("videoHeight"):
            return None
        sub = subscription(call, viewer, tracks[other[viewer]])
        prefs = sub.get("preferences") or {}
        width, height = expected_wish(view)
        ok = prefs.get("max_height") == height and prefs.get("max_width") == width
        return {"view": view, "subscription": sub} if ok and not prefs.get("paused") else None

    for viewer in pages:
        found = wait_until(
            lambda v=viewer: wish_matches(v),
            WISH_TIMEOUT + 5,
            what=lambda v=viewer: (
                f"{v}'s subscription to {other[v]}'s video to ask for its tile: "
                f"tile {tile_view(call, v, other[v])}, relay "
                f"{subscription(call, v, tracks[other[v]]).get('preferences')}"
            ),
        )
        assert found["view"]["visibility"] == "visible", found
        print(f"{viewer}: tile {found['view']} -> {found['subscription']['preferences']}")

    # ... and gets the best layer within it (h: 480x270 for 360 pixels), once the publisher's
    # bandwidth estimate has started it (no layer is paused before it was sent)
    for viewer in pages:
        wait_until(
            lambda v=viewer: call.inbound(v, other[v], "video").get("frameHeight") == 270,
            20,
            what=lambda v=viewer: (
                f"{v} to decode {other[v]}'s 270-pixel layer ({call.inbound(v, other[v], 'video')}, "
                f"layers {published_layers(call, other[v])}, "
                f"{other[v]}'s page sends {call.report(other[v]).get('layers')})"
            ),
        )
    print(f"both on the 270-pixel layer {time.monotonic() - started:.1f} s after first frames")

    # 2. alice's tile of bob shrinks to 320x180: she asks for 180 pixels, gets a layer within
    # them, and bob's page pauses the layers nobody receives
    width, height = SMALL
    evaluate(
        call,
        "alice",
        f"""(() => {{
          const tile = document.querySelector('.tile[data-participant="bob"]');
          Object.assign(tile.style, {{ flex: 'none', aspectRatio: 'auto',
            width: '{width + 4}px', height: '{height + 4}px' }});
          return tile.getBoundingClientRect().height;
        }})()""",
    )
    shrunk = time.monotonic()
    view = tile_view(call, "alice", "bob")
    assert (round(view["width"]), round(view["height"])) == SMALL, view
    wait_until(
        lambda: (
            (subscription(call, "alice", tracks["bob"]).get("preferences") or {}).get("max_height")
            == height
        ),
        WISH_TIMEOUT,
        what=lambda: (
            f"max_height {height} at the relay "
            f"({subscription(call, 'alice', tracks['bob']).get('preferences')})"
        ),
    )
    prefs = subscription(call, "alice", tracks["bob"])["preferences"]
    assert prefs == {
        "paused": False,
        "max_width": width,
        "max_height": height,
        "max_fps": None,
        "priority": 0,
    }
    asked = time.monotonic() - shrunk
    # bob's other subscription (his own tile of alice) is untouched
    assert subscription(call, "bob", tracks["alice"])["preferences"]["max_height"] != height
    wait_until(
        lambda: 0 < (call.inbound("alice", "bob", "video").get("frameHeight") or 0) <= height,
        15,
        what=lambda: (
            f"alice to decode bob's video at most {height} pixels high "
            f"({call.inbound('alice', 'bob', 'video')}, layers {published_layers(call, 'bob')})"
        ),
    )
    decoded_small = time.monotonic() - shrunk
    # publisher.layers for bob's video says which layers nobody receives; bob's page stops them
    event = wait_until(
        lambda: next(
            (
                e
                for _, e in reversed(list(call.events))
                if e.get("type") == "publisher.layers"
                and e.get("track_id") == tracks["bob"]
                and e.get("unused")
            ),
            None,
        ),
        10,
        what="publisher.layers with unused layers for bob's video",
    )
    print(f"publisher.layers: {event}")

    # bob's page pauses what the latest publisher.layers calls unused (not while it probes)
    def paused_as_announced() -> list[str] | None:
        latest = [
            e
            for _, e in call.events
            if e.get("type") == "publisher.layers" and e.get("track_id") == tracks["bob"]
        ][-1]
        layers = call.report("bob").get("layers") or {}
        inactive = sorted(rid for rid, sent in layers.items() if not sent)
        # the lowest layer is always sent; a layer the browser has not started yet (its
        # bandwidth estimate) is not paused either
        unused = set(latest["unused"]) - {"q"}
        return inactive if inactive and set(inactive) <= unused else None

    inactive = wait_until(
        paused_as_announced,
        25,
        what=lambda: f"bob's page to pause the unused layers ({call.report('bob').get('layers')})",
    )
    assert "q" not in inactive, inactive
    print(
        f"small tile: asked {asked:.1f} s, decoded at <= {height} px {decoded_small:.1f} s after "
        f"the resize; bob pauses {inactive}; layers at the relay {published_layers(call, 'bob')}"
    )

    # 3. hidden: the subscription is paused at the relay, and nothing more decodes
    evaluate(
        call,
        "alice",
        "document.querySelector('.tile[data-participant=\"bob\"]').style.display = 'none'",
    )
    hidden_at = time.monotonic()

    def paused() -> dict[str, Any] | None:
        sub = subscription(call, "alice", tracks["bob"])
        ok = sub.get("forwarded") is False and (sub.get("preferences") or {}).get("paused")
        return sub if ok else None

    sub = wait_until(
        paused,
        WISH_TIMEOUT,
        what=lambda: (
            f"the hidden tile's subscription to pause ({subscription(call, 'alice', tracks['bob'])})"
        ),
    )
    paused_after = time.monotonic() - hidden_at
    # audio goes on, and bob's own subscription to alice is untouched
    audio = next(
        o
        for o in call.api("GET", f"/v1/rooms/{call.room}/participants/alice/stats").json()[
            "outbound"
        ]
        if o["kind"] == "audio"
    )
    assert audio["forwarded"] and not audio["preferences"]["paused"], audio
    assert subscription(call, "bob", tracks["alice"])["forwarded"] is True
    time.sleep(1.5)  # frames in flight, and the page's once-a-second report
    before = frames(call, "alice", "bob")
    packets = sub["packets"]
    time.sleep(2.0)
    assert frames(call, "alice", "bob") - before <= 2, "frames decoded while paused"
    assert subscription(call, "alice", tracks["bob"])["packets"] - packets <= 2

    # 4. shown again: forwarded again, from a keyframe, and frames decode
    evaluate(
        call,
        "alice",
        "document.querySelector('.tile[data-participant=\"bob\"]').style.display = ''",
    )
    shown_at = time.monotonic()
    wait_until(
        lambda: subscription(call, "alice", tracks["bob"]).get("forwarded") is True,
        WISH_TIMEOUT,
        what=lambda: (
            f"the shown tile's subscription to resume ({subscription(call, 'alice', tracks['bob'])})"
        ),
    )
    resumed_after = time.monotonic() - shown_at
    prefs = subscription(call, "alice", tracks["bob"])["preferences"]
    assert prefs == {
        "paused": False,
        "max_width": width,
        "max_height": height,
        "max_fps": None,
        "priority": 0,
    }
    before = frames(call, "alice", "bob")
    wait_until(
        lambda: frames(call, "alice", "bob") - before >= 15,
        10,
        what=lambda: f"frames to decode again ({call.inbound('alice', 'bob', 'video')})",
    )
    decoding_after = time.monotonic() - shown_at
    assert 0 < (call.inbound("alice", "bob", "video").get("frameHeight") or 0) <= height
    print(
        f"hidden -> paused at the relay {paused_after:.1f} s; shown -> forwarded "
        f"{resumed_after:.1f} s, 15 frames decoded {decoding_after:.1f} s; "
        f"whole test from first frames {time.monotonic() - started:.0f} s"
    )
