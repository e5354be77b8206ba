"""A Chromium publisher whose header extensions have ids above 14 (RFC 8285 two-byte form).

The page rewrites its own offer before ``setLocalDescription`` so that transport-wide-cc and
sdes:mid get ids 17 and 16. Chromium then writes its header extensions in the two-byte form,
and only when the answer carries ``a=extmap-allow-mixed``: without it, it sends no extension
at all, so no transport-wide sequence number reaches the relay, no transport-cc feedback goes
back, and the send rate stays at libwebrtc's start estimate. With it, feedback flows and the
rate ramps as in test_bandwidth.py.

The page's scripts are wrapped through DevTools before the demo page loads (the browser starts
on about:blank, gets the wrapper as a script for every new document, then navigates).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable

import pytest

from tests.browser.conftest import Call
from tests.browser.harness import CdpPipe, launch_chromium, wait_until
from tests.browser.test_bandwidth import AT, SPAN, send_rate

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

TWCC_URI = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"
MID_URI = "urn:ietf:params:rtp-hdrext:sdes:mid"
#: ids the page moves these extensions to; Chromium's own offer uses 1-14 only
WIDE_IDS = {TWCC_URI: 17, MID_URI: 16}

#: Runs in the page before its own scripts: moves the extensions of WIDE_IDS in every local
#: offer, and keeps the offers and answers for the test to read.
WRAPPER = """
(() => {
  const wide = WIDE_IDS;
  window.relayTest = { offers: [], answers: [] };
  const munge = (sdp) => sdp.replace(/^a=extmap:\\d+(\\/\\w+)? (\\S+)(\\r?)$/gm,
    (line, direction, uri, cr) => uri in wide
      ? `a=extmap:${wide[uri]}${direction || ''} ${uri}${cr}` : line);
  const setLocal = RTCPeerConnection.prototype.setLocalDescription;
  RTCPeerConnection.prototype.setLocalDescription = function (description) {
    if (description && description.type === 'offer' && description.sdp) {
      description = { type: 'offer', sdp: munge(description.sdp) };
      window.relayTest.offers.push(description.sdp);
    }
    return setLocal.call(this, description);
  };
  const setRemote = RTCPeerConnection.prototype.setRemoteDescription;
  RTCPeerConnection.prototype.setRemoteDescription = function (description) {
    if (description && description.type === 'answer') {
      window.relayTest.answers.push(description.sdp);
    }
    return setRemote.call(this, description);
  };
})();
""".replace("WIDE_IDS", json.dumps(WIDE_IDS))


def open_wrapped_chromium(call: Call, label: str, **fragment: str) -> None:
    """Chromium on the demo page as participant ``label``, with :data:`WRAPPER` in the page."""
    fragment["token"] = call.participant(label)
    fragment["participant"] = label
    url = call.page_url(f"{call.room}.{label}", **fragment)
    page = launch_chromium(call.world.namespace, "about:blank", call.folder, label, devtools=True)
    call.browsers[label] = page
    assert page.cdp is not None
    session = wait_until(_session(page.cdp), 20, what="Chromium's DevTools page target")
    page.cdp.call("Page.enable", session=session)
    page.cdp.call("Page.addScriptToEvaluateOnNewDocument", {"source": WRAPPER}, session=session)
    page.cdp.call("Page.navigate", {"url": url}, session=session)
    # a page driven over DevTools may otherwise count as in the background, where its noise
    # picture's timer (and so the encoder) is throttled in the first seconds
    page.cdp.call("Page.bringToFront", session=session)
    page.cdp.call("Emulation.setFocusEmulationEnabled", {"enabled": True}, session=session)


def _session(cdp: CdpPipe) -> Callable[[], str | None]:
    """A poll for a DevTools session on the page (None until its target exists)."""

    def attach() -> str | None:
        try:
            return cdp.page_session()
        except (StopIteration, RuntimeError):
            return None

    return attach


def relay_counter(call: Call, name: str) -> int:
    """A counter of the relay's /metrics."""
    text = call.api("GET", "/metrics").text
    match = re.search(rf"^relay_{name} (\d+)$", text, re.M)
    assert match, f"relay_{name} missing from /metrics"
    return int(match.group(1))


def inbound_packets(call: Call, label: str) -> dict[str, int]:
    """kind -> packets the relay received on each of the participant's tracks."""
    r = call.api("GET", f"/v1/rooms/{call.room}/participants/{label}/stats")
    assert r.status_code == 200, r.text
    return {t["kind"]: t["packets"] for t in r.json()["inbound"]}


def test_chromium_extension_ids_above_14_keep_transport_cc_feedback(call: Call) -> None:
    open_wrapped_chromium(call, "sender", width="640", height="480", fps="15", source="noise")
    call.wait_joined("sender")
    joined = time.monotonic()
    cdp = call.browsers["sender"].cdp
    assert cdp is not None

    # the offer really carried the wide ids, and the relay answered them with allow-mixed
    offers = cdp.evaluate("window.relayTest.offers")
    answers = cdp.evaluate("window.relayTest.answers")
    assert offers and answers, (offers, answers)
    assert f"a=extmap:17 {TWCC_URI}" in offers[0] and f"a=extmap:16 {MID_URI}" in offers[0]
    answer = answers[0].replace("\r\n", "\n")
    assert "\na=extmap-allow-mixed\n" in answer.split("\nm=")[0]
    assert f"\na=extmap:17 {TWCC_URI}\n" in answer
    assert "transport-cc" in answer

    # the relay receives both tracks and sends transport-cc feedback all along
    wait_until(
        lambda: (
            set(inbound_packets(call, "sender")) == {"audio", "video"}
            and min(inbound_packets(call, "sender").values()) > 50
        ),
        20,
        what=lambda: f"the sender's packets at the relay: {inbound_packets(call, 'sender')}",
    )
    before = relay_counter(call, "twcc_feedback_sent_total")
    packets_before = inbound_packets(call, "sender")
    time.sleep(3)
    sent = relay_counter(call, "twcc_feedback_sent_total") - before
    packets = inbound_packets(call, "sender")
    print(f"transport-cc feedback sent in 3 s: {sent}; packets at the relay: {packets}")
    # about one feedback packet per feedback_interval (50 ms) while media flows
    assert sent >= 20, (sent, call.relay.log()[-3000:])
    assert all(packets[k] > packets_before[k] for k in ("audio", "video")), packets

    # and Chromium's estimate ramps up on that feedback (test_bandwidth.py's figure)
    wait_until(lambda: time.monotonic() - joined >= AT - SPAN, AT + 5, what="15 s")
    rate, available = send_rate(call, "sender")
    video = (call.report("sender").get("stats") or {}).get("outbound", {}).get("video")
    print(
        f"Chromium sends {rate / 1e6:.2f} Mbit/s after {AT:.0f} s "
        f"(availableOutgoingBitrate {available}, video {video})"
    )
    assert rate >= 1.2e6, (rate, available)
