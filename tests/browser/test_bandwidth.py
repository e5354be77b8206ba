"""A Chromium publisher's send bitrate through the relay, with the relay's congestion-control
feedback (transport-wide-cc, or REMB from the relay's own estimate) and without any.

The page sends a moving noise picture (640x480, 15 fps) instead of the fake camera's easily
compressed one, so that libwebrtc's encoder uses every bit its estimate allows (its ceiling
for 640x480 is about 1.7 Mbit/s). With transport-cc feedback the estimate ramps up within
seconds; with none, it stays at its loss-based start value.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.browser.conftest import Call, World, make_world
from tests.browser.harness import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

#: seconds after the page joined at which the send rate is measured, and over how long
AT = 15.0
SPAN = 3.0


@pytest.fixture(params=["auto", "remb", "none"], scope="module")
def feedback_world(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[World]:
    extra = f'\n[rtp]\ncongestion_control = "{request.param}"\n'
    yield from make_world(tmp_path_factory.mktemp(f"bwe-{request.param}"), extra)


def send_rate(call: Call, label: str) -> tuple[float, float | None]:
    """(bits/s of outbound bytes over the last SPAN seconds, availableOutgoingBitrate)."""
    samples: list[tuple[float, int, float | None]] = []
    deadline = time.monotonic() + SPAN + 2.5
    while time.monotonic() < deadline:
        outbound = (call.report(label).get("stats") or {}).get("outbound") or {}
        if outbound.get("bytesSent"):
            sample = (
                time.monotonic(),
                int(outbound["bytesSent"]),
                outbound.get("availableOutgoingBitrate"),
            )
            if not samples or sample[1] != samples[-1][1]:
                samples.append(sample)
        if len(samples) >= 2 and samples[-1][0] - samples[0][0] >= SPAN:
            break
        time.sleep(0.2)
    assert len(samples) >= 2, "the page reported no outbound statistics"
    (t0, b0, _), (t1, b1, available) = samples[0], samples[-1]
    return (b1 - b0) * 8 / (t1 - t0), available


def test_chromium_send_rate_after_15_s(feedback_world: World, request) -> None:
    mode = request.node.callspec.params["feedback_world"]
    call = Call(feedback_world, request.node.name)
    try:
        call.open_page("chromium", "sender", width="640", height="480", fps="15", source="noise")
        call.wait_joined("sender")
        joined = time.monotonic()
        wait_until(lambda: time.monotonic() - joined >= AT - SPAN, AT + 5, what="15 s")
        rate, available = send_rate(call, "sender")
        print(
            f"congestion_control={mode}: Chromium sends {rate / 1e6:.2f} Mbit/s after "
            f"{AT:.0f} s (availableOutgoingBitrate {available}, "
            f"video {call.report('sender').get('stats', {}).get('outbound', {}).get('video')})"
        )
        if mode in ("auto", "remb"):
            assert rate >= 1.2e6, (rate, available, call.relay.log()[-3000:])
        else:
            # without feedback libwebrtc keeps its start estimate: the feedback is the ramp
            assert rate < 1.0e6, (rate, available)
    finally:
        call.close()
