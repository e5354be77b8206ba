"""Simulcast on constrained paths: a subscriber's layer follows its bandwidth, and loss on the
publisher's leg does not freeze the picture.

A Chromium publisher sends VP8 simulcast, three layers of a 1280x720 fake camera (``q``
320x180, ``h`` 640x360, ``f`` 1280x720; the helpers of test_simulcast.py). Subscribers are
receive-only Chromium pages whose picture sizes and decoding progress come from getStats()
(``frameWidth``/``frameHeight``/``framesDecoded`` of their inbound-rtp, every 200 ms).

Test A: two subscribers. "limited" reaches the relay through the impairing proxy, whose
relay -> browser direction is limited to 400 kbit/s (a token bucket in front of a 100 ms
bottleneck queue; the relay's candidates in the subscriber offer the page applies point at the
proxy); "unlimited" connects directly. The relay must give "limited" the lowest layer, which it
decodes without a freeze of more than a second, while "unlimited" decodes the top layer
throughout (from when it reaches it: a relay may start a subscriber lower while its estimate of
the path grows); once the limit is lifted, "limited" reaches the top layer within 15 s. A
timeline of "limited" (its pictures, the relay's estimate of its path and the layer its stream
carries, the proxy's queue) is printed, and is in every assertion's message.

Test B: 3 % seeded random loss both ways on the publisher's leg (the publisher behind the
proxy), one subscriber: no freeze of more than a second over 10 s once it decodes.

Neither page asks the relay for picture sizes of its own (the demo page's tile wishes are
answered in the page), and the publisher keeps all its layers active, so that only the
bandwidth chooses the layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.browser.conftest import Call
from tests.browser.harness import (
    MEDIA_PORT,
    PEER_ADDRESS,
    RELAY_ADDRESS,
    VIA_PROXY_JS,
    NamespaceLoop,
    wait_until,
)
from tests.browser.test_simulcast import (
    CAMERA,
    JOIN_TIMEOUT,
    KEEP_LAYERS_ACTIVE,
    LAYER_HEIGHTS,
    NO_PAGE_WISHES,
    REPORT_MS,
    last_stats,
    open_chromium,
    publish_simulcast,
    publisher_timeline,
    received,
    relay_outbound,
    video_track,
    vp8_room,
)
from tests.integration.netem import ImpairingProxy, Impairment

pytestmark = [pytest.mark.browser, pytest.mark.timeout(200)]

#: the limited subscriber's path from the relay, bits/s
LIMIT = 400_000
LOWEST = LAYER_HEIGHTS["q"]
MIDDLE = LAYER_HEIGHTS["h"]
TOP = LAYER_HEIGHTS["f"]
#: from the subscriptions to the limited subscriber decoding the lowest layer and the
#: unlimited one the top
SETTLE_TIMEOUT = 30.0
#: from the first report on the lowest layer to the start of the watch: the switch's keyframe
#: and what the bottleneck queue still held
SETTLE = 1.0
#: how long the limited subscriber is watched on the lowest layer (and the other on the top)
WATCH = 10.0
#: the longest time between two decoded frames a viewer tolerates
MAX_FREEZE = 1.0
#: ... as measured from the 200 ms reports: a frame decoded just after a report is seen one
#: report later
FREEZE_LIMIT = MAX_FREEZE + REPORT_MS / 1000
#: decoded frames over WATCH at least (15 fps: 150 expected)
MIN_FRAMES = 60
#: from lifting the limit to the limited subscriber decoding the top layer
LIFT_TIMEOUT = 15.0
#: how often the relay's stats and the proxy's counters are sampled
SAMPLE = 0.5

#: test B: loss each way on the publisher's leg, and the seed of the proxy's randomness
PUBLISHER_LOSS = 0.03
SEED = 11

#: Runs in a page before its own scripts: the relay's candidates (and m-line ports) in the SDP
#: that a POST to a path ending in __PATH__ returns (the publisher's answer, or the subscriber
#: offer) are replaced by the proxy's address, so that the page's media goes through it.
VIA_PROXY = (
    """
(() => {
  const proxy = { host: __HOST__, port: __PORT__ };
  const path = __PATH__;
  const seen = (window.relayTestViaProxy = { rewritten: 0 });
"""
    + VIA_PROXY_JS
    + """  const original = window.fetch;
  window.fetch = async function (input, init) {
    const url = typeof input === 'string' ? input : (input && input.url) || '';
    const method = ((init && init.method) || 'GET').toUpperCase();
    if (method !== 'POST' || !url.endsWith(path)) return original.apply(this, arguments);
    const response = await original.apply(this, arguments);
    if (!response.ok) return response;
    const body = await response.json();
    body.sdp = viaProxy(body.sdp);
    seen.rewritten += 1;
    seen.sdp = body.sdp;
    return new Response(JSON.stringify(body), {
      status: response.status,
      headers: { 'Content-Type': 'application/json' },
    });
  };
})();
"""
)


def via_proxy(proxy: ImpairingProxy, path: str) -> str:
    host, port = proxy.address
    return (
        VIA_PROXY.replace("__HOST__", json.dumps(host))
        .replace("__PORT__", str(port))
        .replace("__PATH__", json.dumps(path))
    )


@contextlib.contextmanager
def impairing_proxy(
    call: Call, to_relay: Impairment, to_client: Impairment
) -> Iterator[ImpairingProxy]:
    """An impairing proxy in front of the relay's media port, on a loop of its own in the
    namespace: the call's loop also parses the pages' reports and the relay's stats, and
    would hold packets up for tens of milliseconds at a time (delay the relay's estimator
    would read as queueing on the path)."""
    loop = NamespaceLoop(call.loop.namespace)
    loop.start()
    try:
        proxy = loop.run(
            ImpairingProxy.start(
                (RELAY_ADDRESS, MEDIA_PORT), to_relay, to_client, seed=SEED, host=PEER_ADDRESS
            )
        )
        try:
            yield proxy
        finally:
            loop.loop.call_soon_threadsafe(proxy.close)
            with contextlib.suppress(Exception):
                loop.run(asyncio.sleep(0))
    finally:
        loop.stop()


# --------------------------------------------------------------------------------------------
# Decoding progress from the 200 ms reports


def page_reports(call: Call, label: str, since: float, until: float) -> list[dict[str, Any]]:
    """``label``'s reports that arrived in [since, until] (monotonic), with their arrival
    time as ``_at``."""
    with call.collector.lock:
        history = list(call.collector.reports.get(f"{call.room}.{label}.rtp", []))
    return [{**report, "_at": at} for at, report in history if since <= at <= until]


def longest_freeze(reports: list[dict[str, Any]]) -> tuple[float, float]:
    """(seconds, arrival of its first report) of the longest run of reports over which
    framesDecoded did not grow, timed by the page's own clock: from the first report with a
    count to the first with a larger one (or the last report)."""
    points = [(r["_at"], r["now"] / 1000, received(r)["framesDecoded"]) for r in reports]
    if not points:
        return 0.0, 0.0
    longest, longest_at = 0.0, points[0][0]
    run_at, run_clock, run_frames = points[0]
    for at, clock, frames in points[1:]:
        if frames > run_frames:
            if clock - run_clock > longest:
                longest, longest_at = clock - run_clock, run_at
            run_at, run_clock, run_frames = at, clock, frames
    if points[-1][1] - run_clock > longest:
        longest, longest_at = points[-1][1] - run_clock, run_at
    return longest, longest_at


def frames_between(reports: list[dict[str, Any]]) -> int:
    if not reports:
        return 0
    return received(reports[-1])["framesDecoded"] - received(reports[0])["framesDecoded"]


def freeze_counts(reports: list[dict[str, Any]]) -> int | None:
    """Growth of Chromium's own freezeCount over the reports (its freezes are much shorter
    than a second: three frame intervals), or None if it has none."""

    def count(report: dict[str, Any]) -> int | None:
        values = [e.get("freezeCount") for e in report.get("inbound") or []]
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    if not reports:
        return None
    first, last = count(reports[0]), count(reports[-1])
    return None if first is None or last is None else last - first


# --------------------------------------------------------------------------------------------
# The limited subscriber's timeline

#: the outbound stats' fields the relay had when this test was written: any other one (the
#: layer a stream is on, its target...) is shown in the timeline as it is
KNOWN_OUTBOUND = {
    "track_id",
    "kind",
    "direction",
    "ssrc",
    "packets",
    "bytes",
    "packets_lost",
    "fraction_lost",
    "jitter",
    "round_trip_time",
    "bitrate",
    "nacks_received",
    "retransmissions",
    "retransmission_bytes",
    "retransmissions_repeat_suppressed",
    "retransmissions_budget_suppressed",
    "forwarded",
    "reason",
    "preferences",
}


def mbit(value: Any) -> str:
    return f"{value / 1e6:.2f}M" if isinstance(value, int | float) else str(value)


class Timeline:
    """What the limited subscriber saw (its reports), what the relay thought of its path and
    sent it (its stats, sampled every SAMPLE seconds), what the proxy did, and the test's own
    marks, on one clock (seconds since the start)."""

    def __init__(self, call: Call, track_id: str, proxy: ImpairingProxy) -> None:
        self.call = call
        self.track_id = track_id
        self.proxy = proxy
        self.start = time.monotonic()
        self.samples: list[tuple[float, str]] = []
        self.marks: list[tuple[float, str]] = []
        self.last_sample = 0.0
        #: (time, bytes) the proxy had delivered to the limited subscriber at the last sample
        self.delivered = (0.0, 0)

    def mark(self, text: str, at: float | None = None) -> float:
        at = time.monotonic() if at is None else at
        self.marks.append((at, text))
        return at

    def since(self, at: float) -> str:
        return f"{at - self.start:.1f} s"

    def sample(self) -> None:
        """The relay's view of the limited subscriber (its path estimate, what its stream
        carries, and the publisher's layers for comparison) and the proxy's counters."""
        self.last_sample = time.monotonic()
        room = f"/v1/rooms/{self.call.room}/participants"
        parts: list[str] = []
        try:
            stats = self.call.api("GET", f"{room}/limited/stats").json()
            delivery = stats.get("subscriber_delivery") or {}
            out: dict[str, Any] = next(
                (o for o in stats.get("outbound") or [] if o["track_id"] == self.track_id), {}
            )
            publisher = self.call.api("GET", f"{room}/publisher/stats").json()
            inbound: dict[str, Any] = next(
                (t for t in publisher.get("inbound") or [] if t["track_id"] == self.track_id), {}
            )
        except Exception as error:  # the sample is a diagnostic: keep the reason
            self.samples.append((self.last_sample, f"relay    stats unavailable: {error!r}"))
            return
        by_rid = {
            layer.get("rid"): layer.get("bitrate") or 0 for layer in inbound.get("layers", [])
        }
        sent = out.get("bitrate") or 0
        nearest = min(by_rid, key=lambda rid: abs(by_rid[rid] - sent)) if by_rid else None
        extra = {k: v for k, v in out.items() if k not in KNOWN_OUTBOUND}
        parts.append(
            f"relay    estimate {mbit(delivery.get('estimated_bitrate'))} "
            f"{delivery.get('estimator_state')} loss {delivery.get('loss_fraction')} "
            f"queuing {delivery.get('queuing_delay')} delivery {mbit(delivery.get('delivery_rate'))}"
            f" allocated {mbit(delivery.get('allocated_bitrate'))} probes "
            f"{delivery.get('probe_clusters')} last {mbit(delivery.get('last_probe_bitrate'))}"
            f" | to limited {mbit(sent)} (~{nearest}) packets {out.get('packets')} nacks "
            f"{out.get('nacks_received')} rtx {out.get('retransmissions')}"
            + (f" {json.dumps(extra)}" if extra else "")
            + " | publisher "
            + " ".join(f"{rid}:{mbit(rate)}" for rid, rate in by_rid.items())
        )
        link = self.proxy.links["to_client"]
        queued_bytes, queued_for = self.proxy.queued("to_client")
        at, delivered = self.delivered
        self.delivered = (self.last_sample, link.delivered_bytes)
        rate = (link.delivered_bytes - delivered) * 8 / (self.last_sample - at) if at else None
        parts.append(
            f"proxy    limit {mbit(self.proxy.to_client.rate)} delivered {mbit(rate)} "
            f"({link.delivered} datagrams), queue {queued_bytes} B, its oldest "
            f"{queued_for * 1000:.0f} ms old, queue drops {link.queue_dropped}, longest wait "
            f"{link.max_queue_delay * 1000:.0f} ms"
        )
        for text in parts:
            self.samples.append((self.last_sample, text))

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """wait_until, sampling every SAMPLE seconds meanwhile; fails with the timeline."""
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() - self.last_sample >= SAMPLE:
                self.sample()
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
        rows = list(self.samples)
        for label, every in (("limited", 0.5), ("unlimited", 2.0)):
            shown, height = -every, None
            for report in page_reports(self.call, label, self.start, time.monotonic()):
                got = received(report)
                # every ``every`` seconds, and whenever the picture's height changes
                if report["_at"] - shown < every and got["frameHeight"] == height:
                    continue
                shown, height = report["_at"], got["frameHeight"]
                entry = max(
                    report.get("inbound") or [{}],
                    key=lambda e: e.get("lastPacketReceivedTimestamp") or 0,
                )
                rows.append(
                    (
                        report["_at"],
                        f"{label:9}{got['frameWidth']}x{got['frameHeight']} framesDecoded "
                        f"{got['framesDecoded']} packetsReceived {got.get('packetsReceived')} "
                        f"freezeCount {entry.get('freezeCount')} pliCount {entry.get('pliCount')} "
                        f"nackCount {entry.get('nackCount')}",
                    )
                )
        rows += [(at, f">>> {text}") for at, text in self.marks]
        rows.sort(key=lambda row: row[0])
        lines = [f"{at - self.start:7.2f}  {text}" for at, text in rows]
        return "--- limited subscriber timeline (s since the publisher's layers were up)\n" + (
            "\n".join(lines)
        )


def first_report(
    call: Call, label: str, since: float, ok: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    """``label``'s first report after ``since`` for which ``ok`` holds."""
    return next((r for r in page_reports(call, label, since, time.monotonic()) if ok(r)), None)


def height_is(height: int) -> Callable[[dict[str, Any]], bool]:
    def ok(report: dict[str, Any]) -> bool:
        got = received(report)
        return got["framesDecoded"] > 0 and got["frameHeight"] == height

    return ok


# --------------------------------------------------------------------------------------------
# Test A


def subscribe(call: Call, track_id: str, proxy: ImpairingProxy) -> None:
    """The subscribers "limited" (through the proxy) and "unlimited" join and are subscribed
    to the video."""
    open_chromium(
        call,
        "limited",
        publish=False,
        prelude=NO_PAGE_WISHES + via_proxy(proxy, "/subscriber"),
    )
    open_chromium(call, "unlimited", publish=False, prelude=NO_PAGE_WISHES)
    for label in ("limited", "unlimited"):
        call.wait_joined(label, JOIN_TIMEOUT)

    def subscribed(label: str) -> bool:
        r = call.api("GET", f"/v1/rooms/{call.room}/participants/{label}")
        return r.status_code == 200 and track_id in r.json()["subscriptions"]

    wait_until(
        lambda: subscribed("limited") and subscribed("unlimited"),
        JOIN_TIMEOUT,
        what="both subscribers to be subscribed to the publisher's video",
    )


def test_limited_subscriber_gets_the_lowest_layer_then_the_top_once_the_limit_is_lifted(
    call: Call,
) -> None:
    """Behind 400 kbit/s, the lowest layer without a freeze over a second; the limit lifted,
    the top layer within 15 s; meanwhile the unlimited subscriber stays on the top layer."""
    timeline: Timeline | None = None
    with impairing_proxy(call, Impairment(), Impairment(rate=LIMIT)) as proxy:
        try:
            vp8_room(call)
            track_id = publish_simulcast(call, prelude=KEEP_LAYERS_ACTIVE)
            timeline = Timeline(call, track_id, proxy)
            subscribe(call, track_id, proxy)
            timeline.mark("both subscribed")
            limited_phases(call, timeline, proxy)
            print(timeline.render())
            print(publisher_timeline(call))
        except AssertionError:
            if timeline is not None:
                print(timeline.render())
            print(last_stats(call))
            raise


def limited_phases(call: Call, timeline: Timeline, proxy: ImpairingProxy) -> None:
    """The limited subscriber settles on the lowest layer, the unlimited one reaches the top;
    both are watched for WATCH seconds; the limit is lifted and the limited one reaches the top
    while the unlimited one stays there."""
    opened = timeline.start
    phases: dict[str, str] = {}

    def summary() -> str:
        return "; ".join(f"{k}: {v}" for k, v in phases.items())

    def decoding(report: dict[str, Any]) -> bool:
        return received(report)["framesDecoded"] > 0

    # settling: the limited subscriber on the lowest layer, the unlimited one on the top
    found: dict[str, dict[str, Any]] = {}

    def settled() -> bool:
        for key, label, ok in (
            ("limited first", "limited", decoding),
            ("limited lowest", "limited", height_is(LOWEST)),
            ("unlimited first", "unlimited", decoding),
            ("unlimited top", "unlimited", height_is(TOP)),
        ):
            if key not in found:
                report = first_report(call, label, opened, ok)
                if report is not None:
                    found[key] = report
                    timeline.mark(key, report["_at"])
        return "limited lowest" in found and "unlimited top" in found

    def heights(label: str, since: float, until: float | None = None) -> list[int]:
        """The picture heights of ``label``'s reports in [since, until] once it decodes."""
        end = time.monotonic() if until is None else until
        return [
            received(r)["frameHeight"]
            for r in page_reports(call, label, since, end)
            if received(r)["framesDecoded"] > 0
        ]

    try:
        timeline.wait(
            settled,
            SETTLE_TIMEOUT,
            f"the limited subscriber ({LIMIT / 1000:.0f} kbit/s) to decode the lowest layer "
            f"({LOWEST} pixels high) and the unlimited one the top layer ({TOP})",
        )
    except AssertionError as error:
        first = found.get("limited first")
        link = proxy.links["to_client"]
        raise AssertionError(
            f"within {SETTLE_TIMEOUT:.0f} s of the subscriptions, the limited subscriber "
            + (
                "decoded the lowest layer"
                if "limited lowest" in found
                else f"never decoded the {LOWEST} layer: the heights it decoded were "
                f"{sorted(set(heights('limited', opened)))}"
            )
            + ", its first frame came "
            + (f"{first['_at'] - opened:.1f} s after its page opened" if first else "never")
            + f"; the unlimited one decoded heights {sorted(set(heights('unlimited', opened)))}; "
            f"the proxy delivered {link.delivered} datagrams to the limited one and dropped "
            f"{link.queue_dropped} at its queue\n{error}"
        ) from None
    assert proxy.links["to_client"].delivered > 0, "the limited subscriber bypassed the proxy"
    first, lowest = found["limited first"], found["limited lowest"]
    reports = page_reports(call, "limited", first["_at"], lowest["_at"])
    phases["limited, first frame to the lowest layer"] = (
        f"{lowest['_at'] - first['_at']:.1f} s, {frames_between(reports)} frames, heights "
        f"{sorted(set(heights('limited', first['_at'], lowest['_at'])))}"
    )
    u_first, u_top = found["unlimited first"], found["unlimited top"]
    phases["unlimited, first frame to the top layer"] = (
        f"{u_top['_at'] - u_first['_at']:.1f} s, heights "
        f"{sorted(set(heights('unlimited', u_first['_at'], u_top['_at'])))}"
    )

    # watched: the limited subscriber on the lowest layer, the unlimited one on the top
    start = max(lowest["_at"] + SETTLE, u_top["_at"])
    end = start + WATCH
    timeline.mark(f"watch for {WATCH:.0f} s", start)
    timeline.watch(end - time.monotonic())
    limited = page_reports(call, "limited", start, end)
    unlimited = page_reports(call, "unlimited", start, end)
    freeze, freeze_at = longest_freeze(limited)
    frames = frames_between(limited)
    u_freeze, u_freeze_at = longest_freeze(unlimited)
    u_frames = frames_between(unlimited)
    phases["limited, watched"] = (
        f"{frames} frames in {WATCH:.0f} s, longest freeze {freeze:.2f} s (from "
        f"{timeline.since(freeze_at)}), freezeCount +{freeze_counts(limited)}, heights "
        f"{sorted(set(heights('limited', start, end)))}"
    )
    phases["unlimited, watched"] = (
        f"{u_frames} frames, longest freeze {u_freeze:.2f} s (from {timeline.since(u_freeze_at)})"
        f", heights {sorted(set(heights('unlimited', start, end)))}"
    )
    timeline.mark(summary())
    assert limited and all(h == LOWEST for h in heights("limited", start, end)), (
        f"the limited subscriber left the lowest layer while limited: {summary()}\n"
        f"{timeline.render()}"
    )
    assert freeze <= FREEZE_LIMIT and frames >= MIN_FRAMES, (
        f"the limited subscriber froze on the lowest layer: {summary()}\n{timeline.render()}"
    )

    # the limit lifted: the limited subscriber up to the top layer
    proxy.to_client.rate = None
    lifted = timeline.mark("limit lifted")
    top = timeline.wait(
        lambda: first_report(call, "limited", lifted, height_is(TOP)),
        LIFT_TIMEOUT,
        f"the limited subscriber, its limit lifted, to decode the top layer ({TOP}) [{summary()}]",
    )
    middle = first_report(call, "limited", lifted, height_is(MIDDLE))
    reports = page_reports(call, "limited", lifted, top["_at"])
    up_freeze, up_freeze_at = longest_freeze(reports)
    phases["limited, lifted to the top layer"] = (
        f"{MIDDLE} after "
        + (f"{middle['_at'] - lifted:.1f} s" if middle and middle["_at"] <= top["_at"] else "-")
        + f", {TOP} after {top['_at'] - lifted:.1f} s, {frames_between(reports)} frames, "
        f"longest freeze {up_freeze:.2f} s (from {timeline.since(up_freeze_at)})"
    )
    timeline.mark(f"limited: first report at {TOP}", top["_at"])

    # the unlimited subscriber on the top layer throughout: from reaching it to now
    unlimited = page_reports(call, "unlimited", u_top["_at"], time.monotonic())
    u_freeze, u_freeze_at = longest_freeze(unlimited)
    phases["unlimited, from the top layer on"] = (
        f"{frames_between(unlimited)} frames, longest freeze {u_freeze:.2f} s (from "
        f"{timeline.since(u_freeze_at)}), heights {sorted(set(heights('unlimited', u_top['_at'])))}"
    )
    timeline.mark(summary())
    print(f"limited subscriber at {LIMIT / 1000:.0f} kbit/s: {summary()}")
    assert all(h == TOP for h in heights("unlimited", u_top["_at"])), (
        f"the unlimited subscriber left the top layer: {summary()}\n{timeline.render()}"
    )
    assert u_freeze <= FREEZE_LIMIT, (
        f"the unlimited subscriber froze: {summary()}\n{timeline.render()}"
    )


# --------------------------------------------------------------------------------------------
# Test B


def test_publisher_leg_loss_does_not_freeze_the_subscriber(call: Call) -> None:
    """3 % loss each way between the simulcast publisher and the relay: the subscriber decodes
    for 10 s with no freeze over a second."""
    lossy = Impairment(loss=PUBLISHER_LOSS)
    with impairing_proxy(call, lossy, Impairment(loss=PUBLISHER_LOSS)) as proxy:
        try:
            vp8_room(call)
            open_chromium(
                call,
                "publisher",
                publish=True,
                prelude=KEEP_LAYERS_ACTIVE + via_proxy(proxy, "/publisher"),
                codec="vp8",
                width=CAMERA["width"],
                height=CAMERA["height"],
                fps=CAMERA["fps"],
            )
            call.wait_joined("publisher", JOIN_TIMEOUT)
            track_id = wait_until(
                lambda: _has_video(call) and video_track(call), JOIN_TIMEOUT, what="the video"
            )
            open_chromium(call, "viewer", publish=False, prelude=NO_PAGE_WISHES)
            call.wait_joined("viewer", JOIN_TIMEOUT)
            first = wait_until(
                lambda: first_report(
                    call, "viewer", 0.0, lambda r: received(r)["framesDecoded"] > 0
                ),
                JOIN_TIMEOUT,
                interval=0.1,
                what="the viewer's first decoded frame",
            )
            start = first["_at"]
            time.sleep(max(0.0, start + WATCH - time.monotonic()) + 0.3)
            reports = page_reports(call, "viewer", start, start + WATCH)
            freeze, freeze_at = longest_freeze(reports)
            frames = frames_between(reports)
            heights = sorted({received(r)["frameHeight"] for r in reports})
            relay_in = call.api("GET", f"/v1/rooms/{call.room}/participants/publisher/stats").json()
            video: dict[str, Any] = next(
                (t for t in relay_in["inbound"] if t["track_id"] == track_id), {}
            )
            outcome = {
                "frames decoded in the window": frames,
                "longest freeze (s)": round(freeze, 2),
                "freeze from (s into the window)": round(freeze_at - start, 2),
                "Chromium freezeCount growth": freeze_counts(reports),
                "heights decoded": heights,
                "relay inbound video, per layer": [
                    {
                        k: layer.get(k)
                        for k in (
                            "rid",
                            "height",
                            "packets",
                            "packets_lost",
                            "nacks_sent",
                            "retransmissions_received",
                            "lost_unrepaired",
                        )
                    }
                    for layer in video.get("layers", [])
                ],
                "proxy": {direction: vars(stats) for direction, stats in proxy.links.items()},
                "viewer": relay_outbound(call, "viewer", track_id),
            }
            print(f"publisher leg with {PUBLISHER_LOSS:.0%} loss: {json.dumps(outcome)}")
            assert proxy.links["to_relay"].lost > 0, outcome
            assert freeze <= FREEZE_LIMIT, f"the viewer froze for {freeze:.2f} s: {outcome}"
            assert frames >= MIN_FRAMES, f"the viewer decoded too few frames: {outcome}"
        except AssertionError:
            print(last_stats(call))
            raise


def _has_video(call: Call) -> bool:
    r = call.api("GET", f"/v1/rooms/{call.room}/participants/publisher")
    return r.status_code == 200 and any(t["kind"] == "video" for t in r.json()["tracks"])
