"""Chromium publishes a camera and opens a data channel on the same connection: the relay's
answer accepts the data channel (in the BUNDLE group, a=sctp-port) and Chromium opens it over
SCTP with the relay and sends its video, which the relay receives. Chat between browsers:
tests/browser/test_datachannel_chat.py."""

from __future__ import annotations

import json

import pytest

from tests.browser.conftest import Call
from tests.browser.harness import launch_chromium, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

#: Run in the demo page (same origin as the API): a connection with a data channel and the
#: fake camera, offered to the relay as participant PARTICIPANT with token TOKEN.
PUBLISH = """
(async () => {
  const pc = new RTCPeerConnection();
  window.testPc = pc;
  window.testChannel = pc.createDataChannel('chat');
  const stream = await navigator.mediaDevices.getUserMedia({ video: true });
  pc.addTransceiver(stream.getVideoTracks()[0], { direction: 'sendonly' });
  await pc.setLocalDescription(await pc.createOffer());
  const response = await fetch(PATH, {
    method: 'POST',
    headers: { Authorization: `Bearer ${TOKEN}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ type: 'offer', sdp: pc.localDescription.sdp }),
  });
  const answer = await response.json();
  if (!response.ok) return { offer: pc.localDescription.sdp, error: answer };
  await pc.setRemoteDescription(answer);
  return { offer: pc.localDescription.sdp, answer: answer.sdp };
})()
"""


def test_chromium_data_channel_accepted_and_video_received(call: Call) -> None:
    token = call.participant("sender")
    page = launch_chromium(
        call.world.namespace, f"{call.relay.api}/demo", call.folder, "sender", devtools=True
    )
    call.browsers["sender"] = page
    cdp = page.cdp
    assert cdp is not None

    def session() -> str | None:
        try:
            return cdp.page_session()
        except (StopIteration, RuntimeError):
            return None

    page_session = wait_until(session, 20, what="Chromium's DevTools page target")
    # the demo page itself, loaded (not the about:blank document a new tab starts with)
    loaded = "location.pathname === '/demo' && document.readyState === 'complete'"
    wait_until(lambda: cdp.evaluate(loaded), 20, what="the demo page")
    path = f"/v1/rooms/{call.room}/participants/sender/publisher"
    script = PUBLISH.replace("PATH", json.dumps(path)).replace("TOKEN", json.dumps(token))
    result = cdp.call(
        "Runtime.evaluate",
        {"expression": script, "awaitPromise": True, "returnByValue": True},
        session=page_session,
    )
    assert "exceptionDetails" not in result, result
    value = result["result"]["value"]
    assert "answer" in value, value
    assert "m=application" in value["offer"]
    answer = value["answer"].replace("\r\n", "\n")
    assert "\nm=application 0 " not in answer
    assert "UDP/DTLS/SCTP webrtc-datachannel\n" in answer and "\na=sctp-port:5000\n" in answer
    assert "\na=group:BUNDLE 0 1\n" in answer

    wait_until(
        lambda: cdp.evaluate("window.testPc.connectionState") == "connected",
        30,
        what=lambda: f"Chromium's connection ({cdp.evaluate('window.testPc.connectionState')})",
    )

    def video_packets() -> int:
        r = call.api("GET", f"/v1/rooms/{call.room}/participants/sender/stats")
        return sum(t["packets"] for t in r.json()["inbound"] if t["kind"] == "video")

    wait_until(lambda: video_packets() > 100, 20, what=lambda: f"video ({video_packets()})")
    wait_until(
        lambda: cdp.evaluate("window.testChannel.readyState") == "open",
        20,
        what=lambda: f"the data channel ({cdp.evaluate('window.testChannel.readyState')})",
    )
