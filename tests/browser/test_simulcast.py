"""A Chromium publisher sending VP8 simulcast, and two Chromium subscribers that want different
layers of it.

The publisher's page adds its video with three encodings (``q`` at a quarter of the camera's
size, ``h`` at half, ``f`` at full size) from a 1280x720 fake camera; the relay must answer
them (``a=simulcast``) so that Chromium really sends three RTP streams. Two receive-only
subscribers first both get the 1280x720 layer; then one limits the track to 180 pixels high
through the control API (``PUT .../subscriptions/{track_id}``) and must get the 320x180 layer
while the other, which sets nothing, keeps the 1280x720 one. Pausing the limited subscription
stops its packets at the relay and its decoding in the browser (not the other's); resuming it
starts again from a keyframe within about a second.

On failure the test prints every page's last statistics and the publisher's send estimate and
per-layer frame rates second by second (a missing top layer may be the publisher's own doing:
its estimate fell), and the ``call`` fixture prints the relay's log.

All three pages get a small script before the demo page loads (DevTools, as in
test_extensions.py): it adds the encodings on the publisher, keeps the page's peer
connections, and POSTs a getStats() summary (outbound video per rid, inbound video) to the
collector every 200 ms, finer than the demo page's own one-second report.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from typing import Any

import pytest

from tests.browser.conftest import Call
from tests.browser.harness import BidiSession, launch_chromium, launch_firefox_bidi, wait_until
from tests.browser.test_extensions import _session

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

#: the publisher's fake camera (the page asks getUserMedia for this size and rate)
CAMERA = {"width": "1280", "height": "720", "fps": "15"}
ENCODINGS = [
    {"rid": "q", "scaleResolutionDownBy": 4},
    {"rid": "h", "scaleResolutionDownBy": 2},
    {"rid": "f"},
]
#: the picture height of each layer from a 1280x720 camera
LAYER_HEIGHTS = {"q": 180, "h": 360, "f": 720}
#: the limited subscriber's wish, and the largest picture it may then get
MAX_HEIGHT = 180
#: how often the pages' script reports getStats() (milliseconds)
REPORT_MS = 200

#: page load to three layers encoded (the send estimate must ramp up to enable the top one)
LAYERS_TIMEOUT = 30.0
#: page load to joined, and to the subscribers' first decoded frames
JOIN_TIMEOUT = 45.0
#: first frames to both subscribers on the top layer, and from the max_height request to both
#: decoding the layer they should
SWITCH_TIMEOUT = 15.0
#: how long "keeps decoding" and "stays paused" are watched
WATCH = 2.0
#: framesDecoded must grow at least this much over WATCH (15 fps: 30 expected)
MIN_FRAMES = 10
#: after the pause request, time for packets and frames in flight to drain
SETTLE = 1.0
#: resume request to the next decoded frame: a keyframe within 1 s, plus the 200 ms reports
RESUME_LIMIT = 1.0 + 0.5

#: Runs in each page before its own scripts: keeps every RTCPeerConnection, on the publisher
#: adds the simulcast encodings to the video transceiver, and reports getStats() often.
WRAPPER = """
(() => {
  const SIMULCAST = __SIMULCAST__;
  const ENCODINGS = __ENCODINGS__;
  const REPORT = __REPORT__;
  const INTERVAL = __INTERVAL__;
  const test = (window.relayTest = { pcs: [], sdp: [], simulcast: false, errors: [] });
  const Original = window.RTCPeerConnection;
  const proto = Original.prototype;
  window.RTCPeerConnection = class extends Original {
    constructor(...args) {
      super(...args);
      test.pcs.push(this);
    }
  };
  if (SIMULCAST) {
    const add = proto.addTransceiver;
    proto.addTransceiver = function (trackOrKind, init) {
      const kind = typeof trackOrKind === 'string' ? trackOrKind : trackOrKind.kind;
      if (kind === 'video' && !(init && init.sendEncodings)) {
        init = { ...(init || {}), sendEncodings: ENCODINGS.map((e) => ({ ...e })) };
        test.simulcast = true;
      }
      return add.call(this, trackOrKind, init);
    };
  }
  // the m-, a=simulcast, a=rid and a=ssrc-group lines of every description, for diagnostics
  const keep = (side, description) => {
    if (!description || !description.sdp) return;
    const lines = description.sdp.split(/\\r?\\n/)
      .filter((l) => /^(m=|a=simulcast:|a=rid:|a=ssrc-group:)/.test(l));
    test.sdp.push({ side, type: description.type, lines });
    test.sdp.splice(0, Math.max(0, test.sdp.length - 6));
  };
  const setLocal = proto.setLocalDescription;
  proto.setLocalDescription = function (description) {
    keep('local', description);
    return setLocal.apply(this, arguments);
  };
  const setRemote = proto.setRemoteDescription;
  proto.setRemoteDescription = function (description) {
    keep('remote', description);
    return setRemote.apply(this, arguments);
  };

  const summary = async (pc, into) => {
    const report = await pc.getStats();
    report.forEach((s) => {
      if (s.type === 'outbound-rtp' && s.kind === 'video') {
        into.outbound.push({
          rid: s.rid === undefined ? null : s.rid,
          ssrc: s.ssrc,
          active: s.active,
          framesEncoded: s.framesEncoded || 0,
          frameWidth: s.frameWidth || 0,
          frameHeight: s.frameHeight || 0,
          framesPerSecond: s.framesPerSecond,
          packetsSent: s.packetsSent || 0,
          targetBitrate: s.targetBitrate,
          qualityLimitationReason: s.qualityLimitationReason,
          scalabilityMode: s.scalabilityMode,
          encoderImplementation: s.encoderImplementation,
        });
      } else if (s.type === 'inbound-rtp' && s.kind === 'video') {
        into.inbound.push({
          ssrc: s.ssrc,
          mid: s.mid,
          framesDecoded: s.framesDecoded || 0,
          keyFramesDecoded: s.keyFramesDecoded || 0,
          frameWidth: s.frameWidth || 0,
          frameHeight: s.frameHeight || 0,
          packetsReceived: s.packetsReceived || 0,
          lastPacketReceivedTimestamp: s.lastPacketReceivedTimestamp || 0,
          pliCount: s.pliCount || 0,
          firCount: s.firCount || 0,
          nackCount: s.nackCount === undefined ? null : s.nackCount,
          freezeCount: s.freezeCount === undefined ? null : s.freezeCount,
          framesDropped: s.framesDropped === undefined ? null : s.framesDropped,
          framesReceived: s.framesReceived === undefined ? null : s.framesReceived,
        });
      } else if (s.type === 'candidate-pair' && s.nominated && s.availableOutgoingBitrate) {
        into.availableOutgoingBitrate = s.availableOutgoingBitrate;
      }
    });
  };
  // a call that never settles (Firefox has left a getStats pending for good) must not stop
  // the reports: each is given up after a few seconds, and said so in errors
  const bounded = (promise, what) => Promise.race([
    promise,
    new Promise((_, reject) => setTimeout(() => reject(new Error(what + ' timed out')), 3000)),
  ]);
  let busy = false;
  setInterval(async () => {
    if (busy) return;
    busy = true;
    try {
      const payload = {
        now: performance.now(),
        simulcast: test.simulcast,
        outbound: [],
        inbound: [],
        availableOutgoingBitrate: null,
        sdp: test.sdp,
        errors: test.errors.slice(-3),
      };
      for (const pc of test.pcs) {
        if (pc.signalingState === 'closed') continue;
        try {
          await bounded(summary(pc, payload), 'getStats');
        } catch (error) {
          test.errors.push(String(error));
        }
      }
      test.last = payload;
      await bounded(
        fetch(REPORT, { method: 'POST', mode: 'no-cors', body: JSON.stringify(payload) }),
        'report',
      );
    } catch (error) {
      test.errors.push(String(error));
    } finally {
      busy = false;
    }
  }, INTERVAL);
})();
"""


def wrapper(report_url: str, *, simulcast: bool) -> str:
    return (
        WRAPPER.replace("__SIMULCAST__", json.dumps(simulcast))
        .replace("__ENCODINGS__", json.dumps(ENCODINGS))
        .replace("__REPORT__", json.dumps(report_url))
        .replace("__INTERVAL__", str(REPORT_MS))
    )


def open_chromium(
    call: Call,
    label: str,
    *,
    publish: bool,
    simulcast: bool = True,
    prelude: str = "",
    **fragment: str,
) -> None:
    """Chromium on the demo page as ``label`` with :data:`WRAPPER` installed: a publisher
    (with ``simulcast``, its video in the three encodings) or a receive-only subscriber."""
    fragment["token"] = call.participant(label, can_publish=publish)
    fragment["participant"] = label
    if not publish:
        fragment["recvonly"] = "1"
    url = call.page_url(f"{call.room}.{label}", **fragment)
    page = launch_chromium(
        call.world.namespace, "about:blank", call.folder, label, camera=publish, devtools=True
    )
    call.browsers[label] = page
    assert page.cdp is not None
    session = wait_until(_session(page.cdp), 20, what=f"{label}: Chromium's DevTools page target")
    script = prelude + wrapper(
        call.collector.url(f"{call.room}.{label}.rtp"), simulcast=publish and simulcast
    )
    page.cdp.call("Page.enable", session=session)
    page.cdp.call("Page.addScriptToEvaluateOnNewDocument", {"source": script}, session=session)
    page.cdp.call("Page.navigate", {"url": url}, session=session)
    # a page driven over DevTools may otherwise count as in the background (throttled timers)
    page.cdp.call("Page.bringToFront", session=session)
    page.cdp.call("Emulation.setFocusEmulationEnabled", {"enabled": True}, session=session)


# --------------------------------------------------------------------------------------------
# Reading the pages' reports and the relay's statistics


def rtp(call: Call, label: str) -> tuple[float, dict[str, Any]]:
    """(arrival time, report) of the latest getStats() summary of ``label``'s page."""
    return call.collector.latest_at(f"{call.room}.{label}.rtp") or (0.0, {})


def fresh(call: Call, label: str, after: float, timeout: float = 5.0) -> dict[str, Any]:
    """The first report of ``label``'s page that arrived after ``after`` (monotonic)."""

    def newer() -> dict[str, Any] | None:
        at, report = rtp(call, label)
        return report if at > after and report else None

    return wait_until(newer, timeout, interval=0.05, what=f"a fresh stats report of {label}")


def reports_since(call: Call, label: str, since: float) -> list[dict[str, Any]]:
    """Every report of ``label``'s page that arrived after ``since`` (monotonic)."""
    with call.collector.lock:
        history = list(call.collector.reports.get(f"{call.room}.{label}.rtp", []))
    return [report for at, report in history if at > since]


def layers(report: dict[str, Any]) -> dict[str | None, dict[str, Any]]:
    """rid -> outbound-rtp video summary of the publisher."""
    return {o["rid"]: o for o in report.get("outbound") or []}


def received(report: dict[str, Any]) -> dict[str, Any]:
    """The subscriber's inbound video: frames decoded (all its inbound-rtp video entries) and
    the picture size of the one that received a packet last."""
    entries = report.get("inbound") or []
    if not entries:
        return {"framesDecoded": 0, "frameWidth": 0, "frameHeight": 0, "ssrcs": []}
    last = max(entries, key=lambda e: e["lastPacketReceivedTimestamp"])
    return {
        "framesDecoded": sum(e["framesDecoded"] for e in entries),
        "keyFramesDecoded": sum(e["keyFramesDecoded"] for e in entries),
        "frameWidth": last["frameWidth"],
        "frameHeight": last["frameHeight"],
        "packetsReceived": sum(e["packetsReceived"] for e in entries),
        "ssrcs": [e["ssrc"] for e in entries],
    }


def relay_outbound(call: Call, subscriber: str, track_id: str) -> dict[str, Any]:
    """The relay's outbound entry for ``track_id`` in ``subscriber``'s stats."""
    r = call.api("GET", f"/v1/rooms/{call.room}/participants/{subscriber}/stats")
    assert r.status_code == 200, r.text
    return next((o for o in r.json()["outbound"] if o["track_id"] == track_id), {})


def set_subscription(call: Call, subscriber: str, track_id: str, **wish: Any) -> dict[str, Any]:
    path = f"/v1/rooms/{call.room}/participants/{subscriber}/subscriptions/{track_id}"
    r = call.api("PUT", path, json=wish)
    assert r.status_code == 200, f"PUT {path} {wish}: {r.status_code} {r.text}"
    return r.json()


def publisher_timeline(call: Call) -> str:
    """The publisher's send estimate and each layer's frame rate, one sample per second (the
    last 30): shows whether the publisher itself stopped sending a layer."""
    with call.collector.lock:
        history = list(call.collector.reports.get(f"{call.room}.publisher.rtp", []))
    samples: list[str] = []
    last = -1.0
    for at, report in history:
        if at - last < 1.0:
            continue
        last = at
        estimate = (report.get("availableOutgoingBitrate") or 0) / 1e6
        fps = " ".join(
            f"{rid}:{round(o.get('framesPerSecond') or 0)}"
            for rid, o in sorted(layers(report).items(), key=lambda item: str(item[0]))
        )
        samples.append(f"{estimate:.1f}M[{fps}]")
    return "publisher estimate (Mbit/s) and fps per layer, each second: " + " ".join(samples[-30:])


def last_stats(call: Call) -> str:
    """Every page's latest stats summary (the 200 ms one and the demo page's own), for a
    failure's diagnostics."""
    parts = []
    now = time.monotonic()
    for label in call.browsers:
        at, report = rtp(call, label)
        age = f"{now - at:.1f} s old" if at else "none"
        parts.append(f"--- {label} getStats summary ({age}): {json.dumps(report)}")
        demo = call.report(label)
        brief = {k: demo.get(k) for k in ("state", "error", "mode", "tiles", "states", "stats")}
        parts.append(f"--- {label} demo page report: {json.dumps(brief)}")
    parts.append(f"--- {publisher_timeline(call)}")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------


SUBSCRIBERS = ("limited", "unlimited")


def test_chromium_simulcast_layers_follow_subscriber_wishes(call: Call) -> None:
    """Simulcast from Chromium; each subscriber gets the layer it wants; pause and resume."""
    try:
        vp8_room(call)
        # the demo page's own wishes (tile sizes, unused layers) would confound the test's
        track_id = publish_simulcast(call, prelude=KEEP_LAYERS_ACTIVE)
        subscribe(call, track_id)
        limit_one_subscriber(call, track_id)
        pause_and_resume(call, track_id, keep_layer=True)
        print(publisher_timeline(call))
    except AssertionError:
        print(last_stats(call))
        raise


def vp8_room(call: Call) -> None:
    """The test's room again, with VP8 only, whatever the relay's default preference."""
    assert call.api("DELETE", f"/v1/rooms/{call.room}").status_code == 204
    body = {"room_id": call.room, "codec_preference": ["VP8"]}
    assert call.api("POST", "/v1/rooms", json=body).status_code == 201


def publisher_state(call: Call) -> str:
    _, report = rtp(call, "publisher")
    answers = [d for d in report.get("sdp") or [] if d["type"] == "answer"]
    return (
        f"publisher outbound video: {json.dumps(report.get('outbound'))}; "
        f"availableOutgoingBitrate {report.get('availableOutgoingBitrate')}; "
        f"simulcast asked: {report.get('simulcast')}; "
        f"relay's answer: {json.dumps(answers[-1]['lines'] if answers else None)}"
    )


def subscribers_state(call: Call) -> str:
    return "; ".join(
        f"{label}: {json.dumps(received(rtp(call, label)[1]))}" for label in SUBSCRIBERS
    )


def video_track(call: Call) -> str:
    """The id of the publisher's one video track (VP8), from the control API."""
    publisher = call.api("GET", f"/v1/rooms/{call.room}/participants/publisher").json()
    video = [t for t in publisher["tracks"] if t["kind"] == "video"]
    assert len(video) == 1, publisher
    assert video[0]["codec"] == "video/VP8", video
    print(f"the relay's video track: {json.dumps(video[0])}")
    return video[0]["track_id"]


def publish_simulcast(call: Call, prelude: str = "") -> str:
    """Step 1: the publisher joins and sends three layers q/h/f; its video track's id."""
    open_chromium(call, "publisher", publish=True, prelude=prelude, codec="vp8", **CAMERA)
    call.wait_joined("publisher", JOIN_TIMEOUT)
    started = time.monotonic()

    def three_layers() -> bool:
        found = layers(rtp(call, "publisher")[1])
        return set(found) == set(LAYER_HEIGHTS) and all(
            o["framesEncoded"] > 0 for o in found.values()
        )

    wait_until(
        three_layers,
        LAYERS_TIMEOUT,
        what=lambda: (
            f"3 outbound-rtp video streams q/h/f with frames encoded ({publisher_state(call)})"
        ),
    )
    # the layers have the sizes the subscribers' checks rely on (the camera gave 1280x720)
    wait_until(
        lambda: (
            {rid: o["frameHeight"] for rid, o in layers(rtp(call, "publisher")[1]).items()}
            == LAYER_HEIGHTS
        ),
        LAYERS_TIMEOUT,
        what=lambda: f"layer heights {LAYER_HEIGHTS} ({publisher_state(call)})",
    )
    print(f"three layers encoded {time.monotonic() - started:.1f} s after joining")
    print(publisher_state(call))
    return video_track(call)


def subscribe(call: Call, track_id: str) -> None:
    """Two receive-only subscribers join, are subscribed to the video and decode it."""
    for label in SUBSCRIBERS:
        open_chromium(call, label, publish=False, prelude=NO_PAGE_WISHES)
    for label in SUBSCRIBERS:
        call.wait_joined(label, JOIN_TIMEOUT)

    def subscribed(label: str) -> bool:
        r = call.api("GET", f"/v1/rooms/{call.room}/participants/{label}")
        return r.status_code == 200 and track_id in r.json()["subscriptions"]

    wait_until(
        lambda: all(subscribed(label) for label in SUBSCRIBERS),
        JOIN_TIMEOUT,
        what="both subscribers to be subscribed to the publisher's video",
    )
    wait_until(
        lambda: all(received(rtp(call, label)[1])["framesDecoded"] > 0 for label in SUBSCRIBERS),
        JOIN_TIMEOUT,
        what=lambda: f"both subscribers' first frames ({subscribers_state(call)})",
    )


def limited_ok(report: dict[str, Any]) -> bool:
    return 0 < received(report)["frameHeight"] <= MAX_HEIGHT


def unlimited_ok(report: dict[str, Any]) -> bool:
    return received(report)["frameHeight"] == LAYER_HEIGHTS["f"]


def limit_one_subscriber(call: Call, track_id: str) -> None:
    """Step 2: with no limits both subscribers get the 1280x720 layer; then max_height 180 for
    one: it gets the 320x180 layer, the other keeps the 1280x720 one, and both keep decoding
    (every report of the next WATCH seconds at those sizes)."""
    started = time.monotonic()
    wait_until(
        lambda: all(
            unlimited_ok(report) for report in (rtp(call, label)[1] for label in SUBSCRIBERS)
        ),
        SWITCH_TIMEOUT,
        interval=0.1,
        what=lambda: (
            f"both subscribers, with no limits yet, to decode the {LAYER_HEIGHTS['f']} layer "
            f"({subscribers_state(call)}; {publisher_state(call)})"
        ),
    )
    print(f"no limits: both subscribers on the top layer after {time.monotonic() - started:.1f} s")

    wish = set_subscription(call, "limited", track_id, max_height=MAX_HEIGHT)
    assert wish["max_height"] == MAX_HEIGHT, wish
    asked = time.monotonic()

    def switched() -> bool:
        (at_l, limited), (at_u, unlimited) = rtp(call, "limited"), rtp(call, "unlimited")
        return at_l > asked and at_u > asked and limited_ok(limited) and unlimited_ok(unlimited)

    wait_until(
        switched,
        SWITCH_TIMEOUT,
        interval=0.1,
        what=lambda: (
            f"the limited subscriber to decode at most {MAX_HEIGHT} pixels high and the "
            f"unlimited one {LAYER_HEIGHTS['f']} ({subscribers_state(call)}; "
            f"{publisher_state(call)})"
        ),
    )
    switch_time = time.monotonic() - asked
    # and both keep decoding, at those sizes
    before = {label: received(rtp(call, label)[1]) for label in SUBSCRIBERS}
    mark = time.monotonic()
    time.sleep(WATCH)
    after = {label: fresh(call, label, mark + WATCH) for label in SUBSCRIBERS}
    for label in SUBSCRIBERS:
        now = received(after[label])
        grown = now["framesDecoded"] - before[label]["framesDecoded"]
        assert grown >= MIN_FRAMES, (
            f"{label} decoded {grown} frames in {WATCH:.0f} s after the switch: "
            f"before {before[label]}, after {now}"
        )
    # the limited one never gets more than it asked for; the unlimited one may drop below the
    # top layer for a while when the publisher stops sending it (its send estimate fell)
    sizes = {
        label: [
            (received(r)["frameWidth"], received(r)["frameHeight"])
            for r in reports_since(call, label, mark)
        ]
        for label in SUBSCRIBERS
    }
    assert sizes["limited"] and all(0 < h <= MAX_HEIGHT for _, h in sizes["limited"]), (
        f"the limited subscriber got a larger picture in the {WATCH:.0f} s after the switch: "
        f"sizes {sizes['limited']}"
    )
    print(
        f"max_height {MAX_HEIGHT}: both subscribers on their layer {switch_time:.1f} s after the "
        f"request ({subscribers_state(call)}); sizes over the next {WATCH:.0f} s: {sizes}"
    )


def pause_and_resume(call: Call, track_id: str, *, keep_layer: bool) -> None:
    """Step 3: the limited subscription paused: no packets at the relay, no frames decoded
    for WATCH seconds (the other subscriber goes on); resumed: frames again within about a
    second (and, with ``keep_layer``, still the small layer)."""
    wish = set_subscription(call, "limited", track_id, paused=True)
    assert wish["paused"] is True and wish["forwarded"] is False, wish
    time.sleep(SETTLE)
    packets_0 = relay_outbound(call, "limited", track_id).get("packets")
    frames_0 = received(fresh(call, "limited", time.monotonic()))["framesDecoded"]
    unlimited_0 = received(rtp(call, "unlimited")[1])["framesDecoded"]
    watch_from = time.monotonic()
    time.sleep(WATCH)
    packets_1 = relay_outbound(call, "limited", track_id).get("packets")
    frames_1 = received(fresh(call, "limited", watch_from + WATCH))["framesDecoded"]
    unlimited_1 = received(fresh(call, "unlimited", watch_from + WATCH))["framesDecoded"]
    print(
        f"paused: relay packets {packets_0} -> {packets_1}, limited framesDecoded "
        f"{frames_0} -> {frames_1} over {WATCH:.0f} s from {SETTLE:.0f} s after the request; "
        f"unlimited framesDecoded {unlimited_0} -> {unlimited_1}"
    )
    assert packets_0 is not None and packets_1 == packets_0, (
        f"the relay kept sending the paused track: packets {packets_0} -> {packets_1} in "
        f"{WATCH:.0f} s ({relay_outbound(call, 'limited', track_id)})"
    )
    assert frames_1 == frames_0, (
        f"the paused subscriber kept decoding: framesDecoded {frames_0} -> {frames_1}"
    )
    assert unlimited_1 - unlimited_0 >= MIN_FRAMES, (
        f"the other subscriber stopped too: framesDecoded {unlimited_0} -> {unlimited_1}"
    )

    # ... and resumed: a keyframe, and decoding again within about a second
    resumed_at = time.monotonic()
    wish = set_subscription(call, "limited", track_id, paused=False)
    assert wish["paused"] is False, wish

    def decoding_again() -> tuple[float, dict[str, Any]] | None:
        at, report = rtp(call, "limited")
        if at > resumed_at and received(report)["framesDecoded"] > frames_1:
            return at, report
        return None

    at, report = wait_until(
        decoding_again,
        10,
        interval=0.05,
        what=lambda: f"the resumed subscriber to decode again ({subscribers_state(call)})",
    )
    resume_time = at - resumed_at
    packets_2 = relay_outbound(call, "limited", track_id).get("packets")
    print(
        f"resumed: first decoded frame reported {resume_time:.2f} s after the request "
        f"({received(report)}); relay packets {packets_1} -> {packets_2}"
    )
    assert resume_time <= RESUME_LIMIT, (
        f"the resumed subscriber decoded again only {resume_time:.2f} s after the request "
        f"(limit {RESUME_LIMIT:.1f} s): {received(report)}"
    )
    assert packets_2 is not None and packets_2 > packets_1, (packets_1, packets_2)
    if keep_layer:
        assert limited_ok(report), f"the resumed subscriber left its layer: {received(report)}"


# --------------------------------------------------------------------------------------------
# Firefox as the limited subscriber: does it decode across the relay's layer switches?
#
# The relay switches the subscription between simulcast layers at a keyframe with sequence
# numbers and timestamps continuous but each layer's own VP8 PictureID and TL0PICIDX. Firefox
# has no DevTools pipe here, so its numbers are the demo page's own report (every second:
# framesDecoded, frameWidth/Height, framesPerSecond, packetsLost of the receiver's inbound-rtp):
# a stall shows as two or more reports in a row with the same framesDecoded. The relay's view of
# the same subscription (packets sent, NACKs received) is sampled alongside.

#: The demo page now acts on its own: a subscriber tile asks the relay for its size
#: (PUT .../subscriptions/{track_id}), and the publisher pauses the layers publisher.layers calls
#: unused. Either would confound the test's own max_height requests, so in these tests the
#: publisher keeps every layer active and the subscriber page's subscription requests are
#: answered in the page (and counted) without reaching the relay.
KEEP_LAYERS_ACTIVE = """
(() => {
  const set = RTCRtpSender.prototype.setParameters;
  RTCRtpSender.prototype.setParameters = function (parameters, ...rest) {
    if (parameters && parameters.encodings) {
      for (const encoding of parameters.encodings) encoding.active = true;
    }
    return set.call(this, parameters, ...rest);
  };
})();
"""
NO_PAGE_WISHES = """
(() => {
  const original = window.fetch;
  const blocked = (window.relayTestBlockedWishes = []);
  window.fetch = function (input, init) {
    const url = typeof input === 'string' ? input : (input && input.url) || '';
    const method = ((init && init.method) || (input && input.method) || 'GET').toUpperCase();
    if (method === 'PUT' && url.includes('/subscriptions/')) {
      blocked.push(init && init.body);
      return Promise.resolve(new Response('{}', {
        status: 200, headers: { 'Content-Type': 'application/json' },
      }));
    }
    return original.apply(this, arguments);
  };
})();
"""

#: a run of reports without a new decoded frame longer than this is a stall (the page reports
#: every second, so one interval is normal and two are a stall of more than a second)
FIREFOX_STALL = 1.5
#: after a switch, stalls are looked for this long, and decoding must go on this long after
FIREFOX_SWITCH_WATCH = 3.0
FIREFOX_KEEP_WATCH = 5.0
#: frames over FIREFOX_KEEP_WATCH (15 fps: 75 expected)
FIREFOX_MIN_FRAMES = 30


class FirefoxTimeline:
    """The Firefox subscriber's demo reports and the relay's outbound stats for it, with the
    test's own marks (requests), on one clock (seconds since the start)."""

    def __init__(self, call: Call, label: str, track_id: str) -> None:
        self.call = call
        self.label = label
        self.track_id = track_id
        self.start = time.monotonic()
        self.relay: list[tuple[float, dict[str, Any]]] = []
        self.marks: list[tuple[float, str]] = []

    def mark(self, text: str) -> float:
        now = time.monotonic()
        self.marks.append((now, text))
        return now

    def video(self, report: dict[str, Any]) -> dict[str, Any]:
        """The demo page's own summary of its inbound video (every second)."""
        stats = report.get("stats") or {}
        return ((stats.get("inbound") or {}).get("publisher") or {}).get("video") or {}

    def fine(self, report: dict[str, Any]) -> dict[str, Any]:
        """The injected script's inbound-rtp video entry (every 200 ms), with Firefox's own
        pliCount, nackCount, freezeCount where it has them."""
        entries = report.get("inbound") or []
        if not entries:
            return {}
        last = dict(max(entries, key=lambda e: e["lastPacketReceivedTimestamp"]))
        last["framesDecoded"] = sum(e["framesDecoded"] for e in entries)
        return last

    def reports(self, since: float = 0.0) -> list[tuple[float, dict[str, Any]]]:
        """(arrival, inbound video) of the 200 ms reports if there are any, else of the demo
        page's own."""
        with self.call.collector.lock:
            rtp = list(self.call.collector.reports.get(f"{self.call.room}.{self.label}.rtp", []))
            demo = list(self.call.collector.reports.get(f"{self.call.room}.{self.label}", []))
        if rtp:
            return [(at, self.fine(r)) for at, r in rtp if at > since and self.fine(r)]
        return [(at, self.video(r)) for at, r in demo if at > since and self.video(r)]

    @property
    def stall_limit(self) -> float:
        """The longest run without a new frame allowed: a second with the 200 ms reports
        (plus one interval), one and a half with the demo page's one-second ones."""
        with self.call.collector.lock:
            fine = bool(self.call.collector.reports.get(f"{self.call.room}.{self.label}.rtp"))
        return 1.0 + REPORT_MS / 1000 if fine else FIREFOX_STALL

    def latest(self) -> tuple[float, dict[str, Any]]:
        found = self.reports()
        return found[-1] if found else (0.0, {})

    def sample_relay(self) -> None:
        with contextlib.suppress(Exception):
            out = relay_outbound(self.call, self.label, self.track_id)
            self.relay.append((time.monotonic(), out))

    def wait(self, predicate: Any, timeout: float, what: str) -> Any:
        """wait_until, sampling the relay's stats twice a second meanwhile."""
        deadline = time.monotonic() + timeout
        last_sample = 0.0
        while True:
            if time.monotonic() - last_sample >= 0.5:
                self.sample_relay()
                last_sample = time.monotonic()
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"timed out after {timeout:.0f} s waiting for {what}\n{self.render()}"
                )
            time.sleep(0.1)

    def watch(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        self.wait(lambda: time.monotonic() >= end, seconds + 5, "time to pass")

    def render(self) -> str:
        rows: list[tuple[float, str]] = []
        for at, v in self.reports():
            rows.append(
                (
                    at,
                    f"firefox  {v.get('frameWidth')}x{v.get('frameHeight')} "
                    f"framesDecoded {v.get('framesDecoded')} "
                    f"packetsReceived {v.get('packetsReceived')} ssrc {v.get('ssrc')} "
                    + " ".join(
                        f"{k} {v[k]}"
                        for k in (
                            "framesPerSecond",
                            "packetsLost",
                            "codec",
                            "keyFramesDecoded",
                            "framesReceived",
                            "framesDropped",
                            "pliCount",
                            "firCount",
                            "nackCount",
                            "freezeCount",
                        )
                        if k in v
                    ),
                )
            )
        previous: dict[str, Any] = {}
        for at, out in self.relay:
            if (
                previous
                and (
                    out.get("packets") == previous.get("packets")
                    or at - previous.get("_at", 0) < 0.9
                )
                and out.get("nacks_received") == previous.get("nacks_received")
            ):
                continue
            rows.append(
                (
                    at,
                    f"relay    packets {out.get('packets')} nacks_received "
                    f"{out.get('nacks_received')} retransmissions {out.get('retransmissions')} "
                    f"lost {out.get('packets_lost')} max_height "
                    f"{(out.get('preferences') or {}).get('max_height')}",
                )
            )
            previous = {**out, "_at": at}
        rows += [(at, f">>> {text}") for at, text in self.marks]
        rows.sort(key=lambda row: row[0])
        lines = [f"{at - self.start:7.2f}  {text}" for at, text in rows]
        return "--- Firefox subscriber timeline (s since start)\n" + "\n".join(lines)

    def longest_stall(self, since: float, until: float) -> tuple[float, float]:
        """(duration, start) of the longest run of reports in [since, until] over which
        framesDecoded did not grow: from the first report with a value to the first with a
        larger one (or ``until``)."""
        points = [(at, v.get("framesDecoded") or 0) for at, v in self.reports(since) if at <= until]
        longest, longest_at = 0.0, since
        run_start, run_value = since, None
        for at, frames in points:
            if run_value is None or frames > run_value:
                if run_value is not None and at - run_start > longest:
                    longest, longest_at = at - run_start, run_start
                run_start, run_value = at, frames
        if run_value is not None and until - run_start > longest:
            longest, longest_at = until - run_start, run_start
        return longest, longest_at


def firefox_log_lines(call: Call, label: str) -> str:
    """Lines of the Firefox logs (its output, and libwebrtc's MOZ_LOG files) that mention
    video decoding, frames or VP8, and the last few lines of each."""
    parts = []
    paths = [call.folder / f"{label}.log", *sorted(call.folder.glob(f"{label}-moz.log*"))]
    for path in paths:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError as error:
            parts.append(f"--- {path}: {error}")
            continue
        wanted = [
            line
            for line in lines
            if re.search(
                r"vp8|decod|picture|key ?frame|frame buffer|dropping|freeze|ref.?finder|stash",
                line,
                re.I,
            )
        ]
        parts.append(
            f"--- {path} ({len(lines)} lines), {len(wanted)} matching "
            f"vp8/decod/picture/keyframe/dropping/freeze (last 60):\n"
            + "\n".join(wanted[-60:])
            + "\n--- its last lines:\n"
            + "\n".join(lines[-10:])
        )
    return "\n".join(parts)


def test_firefox_limited_subscriber_decodes_across_layer_switches(call: Call) -> None:
    """Simulcast from Chromium; a Firefox ESR subscriber is switched by its max_height from the
    1280x720 layer to the 320x180 one and back, and decodes across both switches without a
    stall of more than a second."""
    timeline: FirefoxTimeline | None = None
    bidi: BidiSession | None = None
    try:
        vp8_room(call)
        track_id = publish_simulcast(call, prelude=KEEP_LAYERS_ACTIVE)
        timeline = FirefoxTimeline(call, "limited", track_id)
        bidi = open_firefox(call, "limited")
        call.wait_joined("limited", JOIN_TIMEOUT)
        timeline.mark("joined")
        firefox_switches(call, timeline, track_id)
        print(timeline.render())
        print(publisher_timeline(call))
    except AssertionError:
        if timeline is not None:
            print(timeline.render())
        print(last_stats(call))
        print(firefox_log_lines(call, "limited"))
        raise
    finally:
        if bidi is not None:
            bidi.close()


#: the Firefox remote agent's port (inside the namespace)
BIDI_PORT = 9230


def open_firefox(call: Call, label: str) -> BidiSession:
    """Firefox ESR as a receive-only subscriber on the demo page, with :data:`WRAPPER` added
    before the page's scripts over WebDriver BiDi (its 200 ms reports go to ``label.rtp``)."""
    fragment = {"token": call.participant(label, can_publish=False), "participant": label}
    url = call.page_url(f"{call.room}.{label}", recvonly="1", **fragment)
    page = launch_firefox_bidi(call.world.namespace, call.folder, label, BIDI_PORT)
    call.browsers[label] = page
    bidi = BidiSession(BIDI_PORT)
    script = NO_PAGE_WISHES + wrapper(
        call.collector.url(f"{call.room}.{label}.rtp"), simulcast=False
    )
    call.loop.run(bidi.open_with_script(url, script), timeout=60)
    return bidi


def firefox_switches(call: Call, timeline: FirefoxTimeline, track_id: str) -> None:
    def height() -> int:
        return timeline.latest()[1].get("frameHeight") or 0

    def frames() -> int:
        return timeline.latest()[1].get("framesDecoded") or 0

    # before any limit: the top layer, decoding
    timeline.wait(lambda: frames() > 0, JOIN_TIMEOUT, "Firefox's first decoded frames")
    timeline.mark("first frames")
    timeline.wait(
        lambda: height() == LAYER_HEIGHTS["f"],
        SWITCH_TIMEOUT,
        f"Firefox, with no limit, to decode the {LAYER_HEIGHTS['f']} layer",
    )
    timeline.mark("on the top layer")
    before = frames()
    timeline.watch(FIREFOX_SWITCH_WATCH)
    grown = frames() - before
    assert grown >= MIN_FRAMES, (
        f"Firefox decoded {grown} frames in {FIREFOX_SWITCH_WATCH:.0f} s before the limit\n"
        f"{timeline.render()}"
    )

    for wish, ok, name in (
        (MAX_HEIGHT, lambda h: 0 < h <= MAX_HEIGHT, f"at most {MAX_HEIGHT}"),
        (None, lambda h: h == LAYER_HEIGHTS["f"], f"{LAYER_HEIGHTS['f']} again"),
    ):
        answer = set_subscription(call, "limited", track_id, max_height=wish)
        assert answer["max_height"] == wish, answer
        asked = timeline.mark(f"PUT max_height {wish}")
        seen = timeline.wait(
            lambda ok=ok, asked=asked: (
                timeline.latest()[0] > asked and ok(height()) and timeline.latest()[0]
            ),
            SWITCH_TIMEOUT,
            f"Firefox to decode {name} pixels high after max_height {wish}",
        )
        timeline.mark(f"first report {name} ({seen - asked:.1f} s after the request)")
        timeline.watch(seen + FIREFOX_SWITCH_WATCH - time.monotonic())
        switch_stall, switch_stall_at = timeline.longest_stall(asked, seen + FIREFOX_SWITCH_WATCH)
        timeline.mark(
            f"longest run without a new frame from the request to {FIREFOX_SWITCH_WATCH:.0f} s "
            f"after the switch: {switch_stall:.2f} s (from {switch_stall_at - timeline.start:.2f} s)"
        )
        # and it goes on decoding, at the size it should
        kept_from = time.monotonic()
        start_frames = frames()
        # (longer after a stall, to see whether and when Firefox recovers)
        stalled = switch_stall > timeline.stall_limit
        timeline.watch(FIREFOX_KEEP_WATCH * (2 if stalled else 1))
        grown = frames() - start_frames
        timeline.mark(f"{grown} frames over {time.monotonic() - kept_from:.0f} s")
        assert not stalled, (
            f"Firefox's framesDecoded stalled {switch_stall:.1f} s (from "
            f"{switch_stall_at - timeline.start:.1f} s) across the switch after max_height "
            f"{wish}\n{timeline.render()}"
        )
        heights = [v.get("frameHeight") or 0 for _, v in timeline.reports(kept_from)]
        stall, stall_at = timeline.longest_stall(kept_from, time.monotonic())
        assert grown >= FIREFOX_MIN_FRAMES and stall <= timeline.stall_limit, (
            f"after max_height {wish}, Firefox decoded {grown} frames in "
            f"{FIREFOX_KEEP_WATCH:.0f} s (longest stall {stall:.1f} s)\n{timeline.render()}"
        )
        assert heights and all(ok(h) for h in heights), (
            f"after max_height {wish}, Firefox's picture heights {heights}\n{timeline.render()}"
        )
