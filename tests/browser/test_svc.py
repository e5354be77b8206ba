"""A Chromium publisher sending VP9 SVC (scalabilityMode L3T3: three spatial layers, each with
three temporal layers, in one RTP stream) from a 1280x720 fake camera, and two Chromium
subscribers: one limited to 360 pixels high through the control API
(``PUT .../subscriptions/{track_id}`` with ``max_height``), which must decode the 640x360
spatial layer the relay filters the stream down to, and one without limits, which must decode
the 1280x720 top layer; both without a freeze (no second without a new decoded frame).

The same with AV1 L3T3 (layers told by the dependency descriptor), and, for temporal layers
alone (L1T3 in VP8, VP9 and AV1), a subscriber's ``max_fps`` of 8 on a 15 fps camera: it
decodes half the frames (temporal layers 0 and 1), the other all of them, both without a
freeze, and all of them again once the limit is lifted.

The relay turns the limit into the stream's ``max_spatial`` (the layer allocation, from the
track's ``svc.resolutions``; ``max_fps`` into ``max_temporal`` from ``svc.frame_rates``:
``relay.sfu.svc.choose_layers``); it forwards spatial layers 0..max_spatial of every picture, the
RTP marker on the end of the highest one, with the sequence numbers closed up over what it
drops.

The pages are driven as in test_simulcast.py (its getStats() script every 200 ms), the
publisher's video given ``sendEncodings: [{scalabilityMode}]`` instead of simulcast
encodings, and the subscriber pages' own subscription wishes kept from the relay.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Any

import pytest

from tests.browser.conftest import Call
from tests.browser.harness import launch_chromium, wait_until
from tests.browser.test_extensions import _session
from tests.browser.test_simulcast import (
    NO_PAGE_WISHES,
    REPORT_MS,
    WRAPPER,
    fresh,
    last_stats,
    received,
    reports_since,
    rtp,
    set_subscription,
)
from tests.browser.test_simulcast_bandwidth import impairing_proxy, via_proxy
from tests.integration.netem import Impairment

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

#: the publisher's fake camera
CAMERA = {"width": "1280", "height": "720", "fps": "15"}
#: the height of each spatial layer of L3T3 from a 1280x720 camera
SPATIAL_HEIGHTS = (180, 360, 720)
#: the limited subscriber's wish: the middle spatial layer
MAX_HEIGHT = 360
SUBSCRIBERS = ("limited", "unlimited")

#: page load to every spatial layer encoded (the send estimate must ramp up for the top one)
LAYERS_TIMEOUT = 45.0
JOIN_TIMEOUT = 45.0
#: first frames, and from the max_height request to both decoding the layer they should
SWITCH_TIMEOUT = 15.0
#: how long "keeps decoding without a freeze" is watched
WATCH = 4.0
#: framesDecoded must grow at least this much over WATCH (15 fps: 60 expected)
MIN_FRAMES = 25
#: the longest run without a new decoded frame allowed (the reports come every 200 ms)
MAX_STALL = 1.0
#: from the first report on the new layer to the watch: frames sent before the relay switched
#: (in the subscriber's jitter buffer, or repaired) may still be decoded meanwhile
SETTLE = 1.0


def svc_wrapper(report_url: str, scalability_mode: str | None) -> str:
    """The simulcast test's page script, the publisher's video with one encoding in
    ``scalability_mode`` (None: a subscriber's page, nothing added)."""
    encodings = [{"scalabilityMode": scalability_mode}] if scalability_mode else []
    return (
        WRAPPER.replace("__SIMULCAST__", json.dumps(scalability_mode is not None))
        .replace("__ENCODINGS__", json.dumps(encodings))
        .replace("__REPORT__", json.dumps(report_url))
        .replace("__INTERVAL__", str(REPORT_MS))
    )


def open_page(
    call: Call, label: str, *, scalability_mode: str | None, codec: str, prelude: str = ""
) -> None:
    """Chromium on the demo page as ``label``: the publisher (one video encoding in
    ``scalability_mode``) or a receive-only subscriber (``prelude``: a script of its own
    before the page's)."""
    publish = scalability_mode is not None
    fragment = {
        "token": call.participant(label, can_publish=publish),
        "participant": label,
        "simulcast": "0",
        "codec": codec,
        **CAMERA,
    }
    if not publish:
        fragment["recvonly"] = "1"
    url = call.page_url(f"{call.room}.{label}", **fragment)
    page = launch_chromium(
        call.world.namespace, "about:blank", call.folder, label, camera=publish, devtools=True
    )
    call.browsers[label] = page
    assert page.cdp is not None
    session = wait_until(_session(page.cdp), 20, what=f"{label}: Chromium's DevTools page target")
    script = (
        prelude
        + ("" if publish else NO_PAGE_WISHES)
        + svc_wrapper(call.collector.url(f"{call.room}.{label}.rtp"), scalability_mode)
    )
    page.cdp.call("Page.enable", session=session)
    page.cdp.call("Page.addScriptToEvaluateOnNewDocument", {"source": script}, session=session)
    page.cdp.call("Page.navigate", {"url": url}, session=session)
    page.cdp.call("Page.bringToFront", session=session)
    page.cdp.call("Emulation.setFocusEmulationEnabled", {"enabled": True}, session=session)


def outbound(call: Call) -> dict[str, Any]:
    """The publisher's outbound video (the one encoding)."""
    entries = rtp(call, "publisher")[1].get("outbound") or []
    return entries[0] if entries else {}


def subscribers_state(call: Call) -> str:
    return "; ".join(
        f"{label}: {json.dumps(received(rtp(call, label)[1]))}" for label in SUBSCRIBERS
    )


def longest_stall(reports: list[dict[str, Any]], until_ms: float) -> float:
    """The longest run (seconds) over the reports (page time) without framesDecoded growing."""
    longest = 0.0
    run_start: float | None = None
    value = -1
    for report in reports:
        frames = received(report)["framesDecoded"]
        if frames > value:
            if run_start is not None:
                longest = max(longest, (report["now"] - run_start) / 1000)
            run_start, value = report["now"], frames
    if run_start is not None:
        longest = max(longest, (until_ms - run_start) / 1000)
    return longest


def timeline(call: Call, label: str, since: float) -> str:
    """``label``'s reports since ``since`` (monotonic), one line each, for diagnostics."""
    lines = []
    for report in reports_since(call, label, since):
        for e in report.get("inbound") or []:
            lines.append(
                f"{report['now'] / 1000:9.2f} {label} {e['frameWidth']}x{e['frameHeight']} "
                + " ".join(
                    f"{k} {e.get(k)}"
                    for k in (
                        "framesDecoded",
                        "keyFramesDecoded",
                        "packetsReceived",
                        "nackCount",
                        "pliCount",
                        "freezeCount",
                        "framesDropped",
                        "framesReceived",
                    )
                )
            )
    return "\n".join(lines)


def svc_room(call: Call, codec: str) -> None:
    """The test's room again, with only ``codec``."""
    assert call.api("DELETE", f"/v1/rooms/{call.room}").status_code == 204
    body = {"room_id": call.room, "codec_preference": [codec]}
    r = call.api("POST", "/v1/rooms", json=body)
    assert r.status_code == 201, r.text


def publish(call: Call, codec: str, scalability_mode: str, *, full_size: bool = True) -> str:
    """The publisher joins and encodes in ``scalability_mode`` (with ``full_size``, up to the
    camera's 720p); its video track's id."""
    open_page(call, "publisher", scalability_mode=scalability_mode, codec=codec.lower())
    call.wait_joined("publisher", JOIN_TIMEOUT)
    started = time.monotonic()
    wait_until(
        lambda: (
            (outbound(call).get("frameHeight") == SPATIAL_HEIGHTS[-1] or not full_size)
            and outbound(call).get("framesEncoded")
            and outbound(call).get("scalabilityMode") == scalability_mode
        ),
        LAYERS_TIMEOUT,
        what=lambda: f"the publisher to encode {scalability_mode}: {outbound(call)}",
    )
    print(
        f"{scalability_mode} encoded at {outbound(call).get('frameHeight')}p "
        f"{time.monotonic() - started:.1f} s after joining"
    )
    info = call.api("GET", f"/v1/rooms/{call.room}/participants/publisher").json()
    video = [t for t in info["tracks"] if t["kind"] == "video"]
    assert len(video) == 1 and video[0]["codec"] == f"video/{codec}", video
    assert not video[0]["simulcast_layers"], video  # one RTP stream
    return str(video[0]["track_id"])


def subscribe(call: Call, track_id: str) -> None:
    for label in SUBSCRIBERS:
        open_page(call, label, scalability_mode=None, codec="")
    for label in SUBSCRIBERS:
        call.wait_joined(label, JOIN_TIMEOUT)
    wait_until(
        lambda: all(received(rtp(call, label)[1])["framesDecoded"] > 0 for label in SUBSCRIBERS),
        JOIN_TIMEOUT,
        what=lambda: f"both subscribers' first frames ({subscribers_state(call)})",
    )


def limited_and_unlimited(call: Call, track_id: str) -> None:
    """max_height 360 for one subscriber: it decodes 640x360, the other 1280x720, and both go
    on decoding without a stall of more than a second."""
    wait_until(
        lambda: all(
            received(rtp(call, label)[1])["frameHeight"] == SPATIAL_HEIGHTS[-1]
            for label in SUBSCRIBERS
        ),
        SWITCH_TIMEOUT,
        interval=0.1,
        what=lambda: f"both subscribers to decode 720p at first ({subscribers_state(call)})",
    )
    wish = set_subscription(call, "limited", track_id, max_height=MAX_HEIGHT)
    assert wish["max_height"] == MAX_HEIGHT, wish
    asked = time.monotonic()

    def on_their_layers() -> bool:
        (at_l, limited), (at_u, unlimited) = rtp(call, "limited"), rtp(call, "unlimited")
        return (
            at_l > asked
            and at_u > asked
            and received(limited)["frameHeight"] == MAX_HEIGHT
            and received(unlimited)["frameHeight"] == SPATIAL_HEIGHTS[-1]
        )

    wait_until(
        on_their_layers,
        SWITCH_TIMEOUT,
        interval=0.1,
        what=lambda: (
            f"the limited subscriber to decode {MAX_HEIGHT}p and the unlimited one "
            f"{SPATIAL_HEIGHTS[-1]}p ({subscribers_state(call)}; publisher {outbound(call)})"
        ),
    )
    print(f"max_height {MAX_HEIGHT}: on their layers {time.monotonic() - asked:.1f} s after asking")
    watch_both(call, {"limited": MAX_HEIGHT, "unlimited": SPATIAL_HEIGHTS[-1]}, asked)


def limit_lifted(call: Call, track_id: str) -> None:
    """The limit lifted: the limited subscriber goes up to 720p (at a keyframe the relay asks
    the publisher for) and both go on without a freeze."""
    wish = set_subscription(call, "limited", track_id, max_height=None)
    assert wish["max_height"] is None, wish
    asked = time.monotonic()
    wait_until(
        lambda: (
            rtp(call, "limited")[0] > asked
            and received(rtp(call, "limited")[1])["frameHeight"] == SPATIAL_HEIGHTS[-1]
        ),
        SWITCH_TIMEOUT,
        interval=0.1,
        what=lambda: f"the limited subscriber back on 720p ({subscribers_state(call)})",
    )
    print(f"limit lifted: 720p {time.monotonic() - asked:.1f} s after asking")
    watch_both(call, dict.fromkeys(SUBSCRIBERS, SPATIAL_HEIGHTS[-1]), asked)


def watch_both(call: Call, heights_wanted: dict[str, int], asked: float) -> None:
    """From the request (``asked``) on, neither subscriber goes a second without a new frame;
    then for WATCH seconds (after SETTLE, for the frames sent before the relay switched) both
    decode, each only at its height."""
    time.sleep(SETTLE)
    mark = time.monotonic()
    start = {label: fresh(call, label, mark) for label in SUBSCRIBERS}
    time.sleep(WATCH)
    for label in SUBSCRIBERS:
        end = fresh(call, label, mark + WATCH)
        seen = [start[label], *reports_since(call, label, mark), end]
        grown = received(end)["framesDecoded"] - received(start[label])["framesDecoded"]
        stall = longest_stall([*reports_since(call, label, asked), end], end["now"])
        heights = sorted({received(r)["frameHeight"] for r in seen})
        freezes = [
            e.get("freezeCount") for r in (start[label], end) for e in r.get("inbound") or []
        ]
        print(
            f"{label}: {grown} frames in {WATCH:.0f} s, heights {heights}, freezeCount "
            f"{freezes}; longest stall since the request {stall:.2f} s"
        )
        assert grown >= MIN_FRAMES, (
            f"{label} decoded {grown} frames in {WATCH:.0f} s\n{timeline(call, label, mark)}"
        )
        assert stall <= MAX_STALL, (
            f"{label} went {stall:.2f} s without a new frame\n{timeline(call, label, asked)}"
        )
        want = heights_wanted[label]
        assert heights == [want], (
            f"{label} decoded heights {heights}, not only {want}\n{timeline(call, label, mark)}"
        )


def frames_over(call: Call, seconds: float) -> dict[str, tuple[int, float, list[int]]]:
    """(frames decoded, longest stall, heights) of each subscriber over the next ``seconds``."""
    mark = time.monotonic()
    start = {label: fresh(call, label, mark) for label in SUBSCRIBERS}
    time.sleep(seconds)
    out = {}
    for label in SUBSCRIBERS:
        end = fresh(call, label, mark + seconds)
        seen = [start[label], *reports_since(call, label, mark), end]
        grown = received(end)["framesDecoded"] - received(start[label])["framesDecoded"]
        heights = sorted({received(r)["frameHeight"] for r in seen})
        out[label] = (grown, longest_stall(seen, end["now"]), heights)
    return out


def relay_views(call: Call, track_id: str) -> dict[str, dict[str, Any]]:
    """Each subscriber's video as the relay forwards it: the layers within the stream, the
    bit rate, and the bandwidth estimate and allocation behind them."""
    views = {}
    for label in SUBSCRIBERS:
        r = call.api("GET", f"/v1/rooms/{call.room}/participants/{label}/stats")
        assert r.status_code == 200, r.text
        stats = r.json()
        video = next((o for o in stats["outbound"] if o["track_id"] == track_id), {})
        delivery = stats["subscriber_delivery"] or {}
        views[label] = {
            "svc_layers": video.get("svc_layers"),
            "bitrate": video.get("bitrate"),
            **{
                key: delivery.get(key)
                for key in (
                    "estimated_bitrate",
                    "allocated_bitrate",
                    "estimator_state",
                    "probe_clusters",
                    "last_probe_bitrate",
                    "delivery_rate",
                )
            },
        }
    return views


class RelayTimeline:
    """:func:`relay_views` every half second on a thread of its own, while in a ``with``
    block: how the relay's choices moved, for a failure's diagnostics."""

    def __init__(self, call: Call, track_id: str) -> None:
        self.call, self.track_id = call, track_id
        self.samples: list[tuple[float, dict[str, dict[str, Any]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RelayTimeline:
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            with contextlib.suppress(Exception):  # a diagnostic must not fail the test
                views = relay_views(self.call, self.track_id)
                self.samples.append((time.monotonic() - self._start, views))

    def __str__(self) -> str:
        keys = ("svc_layers", "estimated_bitrate", "allocated_bitrate", "probe_clusters")
        return "\n".join(
            f"  {at:5.1f} s "
            + "; ".join(
                f"{label}: " + ", ".join(f"{k}={view.get(k)}" for k in keys)
                for label, view in views.items()
            )
            for at, views in self.samples
        )


def temporal_limit(call: Call, track_id: str) -> None:
    """max_fps 8 for one subscriber of a 15 fps stream in three temporal layers: it decodes
    about half the frames (temporal layers 0 and 1), the other all of them, both the same
    picture and without a stall; the limit lifted, it gets every frame again. (The picture
    size is the publisher's choice: a busy machine makes Chromium encode below the camera's.)"""
    for wish, low, high in ((8, 0.3, 0.7), (None, 0.85, 1.15)):
        with RelayTimeline(call, track_id) as moves:
            answer = set_subscription(call, "limited", track_id, max_fps=wish)
            assert answer["max_fps"] == wish, answer
            time.sleep(1.5)  # the layer statistics (once a second), then a switching point
            mark = time.monotonic()
            outbound_heights = {outbound(call).get("frameHeight")}
            seen = frames_over(call, WATCH)
            outbound_heights.add(outbound(call).get("frameHeight"))
            # every picture size the publisher encoded meanwhile (it adapts to its machine)
            for report in reports_since(call, "publisher", mark - 1.0):
                outbound_heights.update(o.get("frameHeight") for o in report.get("outbound") or [])
            relay_view = relay_views(call, track_id)
        print(f"max_fps {wish}: (frames, longest stall, heights) over {WATCH:.0f} s: {seen}")
        limited, unlimited = seen["limited"], seen["unlimited"]
        assert unlimited[0] >= MIN_FRAMES, f"{seen}; the relay from the request on:\n{moves}"
        ratio = limited[0] / unlimited[0]
        assert low <= ratio <= high, (
            f"max_fps {wish}: limited/unlimited frames {ratio:.2f} (watched from 1.5 s); "
            f"the relay from the request on:\n{moves}"
        )
        # what the relay says it forwards: temporal layers 0 and 1 of three, then all
        want_temporal = 1 if wish is not None else None
        assert relay_view["limited"]["svc_layers"]["max_temporal"] == want_temporal, relay_view
        for label, (_frames, stall, heights) in seen.items():
            assert stall <= MAX_STALL, (
                f"{label} went {stall:.2f} s without a new frame after max_fps {wish}\n"
                + timeline(call, label, mark - 2.0)
            )
            assert heights and 0 not in heights, f"{label} decoded heights {heights}"
        assert set(limited[2]) <= set(unlimited[2]) | outbound_heights, (seen, outbound_heights)


@pytest.mark.parametrize(("codec", "mode"), [("VP8", "L1T3"), ("VP9", "L1T3"), ("AV1", "L1T3")])
def test_chromium_temporal_layers_follow_max_fps(call: Call, codec: str, mode: str) -> None:
    """One stream of three temporal layers from Chromium; a subscriber's max_fps halves the
    frames it gets, without freezing, and lifting it brings them all back."""
    try:
        svc_room(call, codec)
        track_id = publish(call, codec, mode, full_size=False)
        subscribe(call, track_id)
        temporal_limit(call, track_id)
    except AssertionError:
        print(last_stats(call))
        raise


@pytest.mark.parametrize(("codec", "mode"), [("VP9", "L3T3"), ("AV1", "L3T3")])
def test_chromium_svc_subscribers_get_the_spatial_layer_they_asked_for(
    call: Call, codec: str, mode: str
) -> None:
    """One SVC stream from Chromium; a subscriber limited to 360p decodes 360p, an unlimited
    one 720p, both without freezing."""
    try:
        svc_room(call, codec)
        track_id = publish(call, codec, mode)
        subscribe(call, track_id)
        limited_and_unlimited(call, track_id)
        limit_lifted(call, track_id)
        stats = call.api("GET", f"/v1/rooms/{call.room}/participants/limited/stats").json()
        print(f"the relay's outbound stats of the limited subscriber: {json.dumps(stats)}")
    except AssertionError:
        print(last_stats(call))
        raise


#: the rate-limited subscriber's path from the relay, bits/s: below what the 360p spatial
#: layer (with the 180p one under it) takes with the relay's margin for moving up
RATE_LIMIT = 300_000


@pytest.mark.parametrize(("codec", "mode"), [("VP9", "L3T3"), ("AV1", "L3T3")])
def test_chromium_svc_a_rate_limited_subscriber_gets_a_lower_spatial_layer(
    call: Call, codec: str, mode: str
) -> None:
    """One SVC stream from Chromium; a subscriber behind a 300 kbit/s bottleneck (the
    impairing proxy's token bucket) decodes a lower spatial layer, chosen by its bandwidth
    estimate alone, an unlimited one 720p; both without a stall of more than a second."""
    with impairing_proxy(call, Impairment(), Impairment(rate=RATE_LIMIT)) as proxy:
        try:
            svc_room(call, codec)
            publish(call, codec, mode)
            open_page(
                call,
                "limited",
                scalability_mode=None,
                codec="",
                prelude=via_proxy(proxy, "/subscriber"),
            )
            open_page(call, "unlimited", scalability_mode=None, codec="")
            for label in SUBSCRIBERS:
                call.wait_joined(label, JOIN_TIMEOUT)
            started = time.monotonic()

            def settled() -> bool:
                limited, unlimited = rtp(call, "limited")[1], rtp(call, "unlimited")[1]
                return (
                    0 < received(limited)["frameHeight"] < SPATIAL_HEIGHTS[-1]
                    and received(limited)["framesDecoded"] > 0
                    and received(unlimited)["frameHeight"] == SPATIAL_HEIGHTS[-1]
                )

            wait_until(
                settled,
                LAYERS_TIMEOUT,
                interval=0.2,
                what=lambda: (
                    f"the rate-limited subscriber to decode a lower spatial layer and the "
                    f"unlimited one {SPATIAL_HEIGHTS[-1]}p ({subscribers_state(call)}; relay: "
                    f"{json.dumps(limited_delivery(call))})"
                ),
            )
            print(
                f"{mode} {codec} at {RATE_LIMIT // 1000} kbit/s: settled "
                f"{time.monotonic() - started:.1f} s after joining ({subscribers_state(call)})"
            )
            time.sleep(SETTLE)
            height = received(rtp(call, "limited")[1])["frameHeight"]
            watch_both(
                call, {"limited": height, "unlimited": SPATIAL_HEIGHTS[-1]}, time.monotonic()
            )
            delivery = limited_delivery(call)
            print(f"the limited subscriber's path as the relay sees it: {json.dumps(delivery)}")
            assert proxy.links["to_client"].delivered > 0, "the limited one bypassed the proxy"
        except AssertionError:
            print(last_stats(call))
            raise


def limited_delivery(call: Call) -> dict[str, Any]:
    stats = call.api("GET", f"/v1/rooms/{call.room}/participants/limited/stats").json()
    return stats.get("subscriber_delivery") or {}
