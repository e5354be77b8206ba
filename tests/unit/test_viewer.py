"""WHEP viewers in the SFU core, sans-I/O: a viewer's m-line whose track ended takes the next
track of its kind that its scope publishes, on the same SSRC, with sequence numbers and
timestamps that go on from where they stopped (a publisher that reconnects, as broadcast
tools do, is watched again without a new WHEP session)."""

from __future__ import annotations

from pathlib import Path

from relay.client.peer import RemoteDescription
from relay.rtc.rtp import is_rtcp, parse_rtp
from tests.unit.harness import Harness
from tests.unit.test_sfu import (
    AIORTC_AUDIO_SSRC,
    AIORTC_VIDEO_SSRC,
    VP8_KEYFRAME,
    aiortc_offer,
    rtp,
)

VIEWER = ("10.0.0.9", 9000)
FIXTURES = Path(__file__).parent.parent / "fixtures" / "sdp"


def viewer_offer(sdp: str | None = None) -> str:
    """A publisher's offer (aiortc's by default) turned into a viewer's: recvonly, no SSRCs,
    msid or simulcast lines."""
    text = (sdp or aiortc_offer()).replace("a=sendrecv", "a=recvonly")
    text = text.replace("a=sendonly", "a=recvonly")
    drop = ("a=ssrc", "a=msid:", "a=rid:", "a=simulcast:")
    lines = [line for line in text.splitlines() if not line.startswith(drop)]
    return "\r\n".join(lines) + "\r\n"


def publish(h: Harness, pid: str, addr: tuple[str, int], offer: str | None = None) -> None:
    h.peers.pop((pid, "publisher"), None)  # a participant id used again: a new client
    h.sfu.add_participant("r", pid, auto_subscribe=False)
    h.publish(pid, offer or aiortc_offer())
    h.connect(h.sfu.get_participant("r", pid).publisher_leg, addr)


def watch(h: Harness, pid: str = "viewer", offer: str | None = None, **scope: str) -> str:
    h.sfu.add_participant("r", pid, can_publish=False, auto_subscribe=False)
    offer = viewer_offer(offer)
    answer = h.sfu.viewer_offer("r", pid, h.as_peer(pid, "subscriber", offer), **scope)
    h.peer(pid, "subscriber").set_remote_description(RemoteDescription.parse(answer))
    h.connect(h.sfu.get_participant("r", pid).subscriber_leg, VIEWER)
    return answer


def send_media(h: Harness, addr: tuple[str, int], seq: int, ts: int, count: int = 3) -> None:
    """``count`` audio packets and ``count`` VP8 keyframe packets from the publisher at ``addr``."""
    for i in range(count):
        h.receive(rtp(AIORTC_AUDIO_SSRC, 96, seq + i, ts + 960 * i, [(1, b"0")]), addr)
        h.receive(
            rtp(AIORTC_VIDEO_SSRC, 97, seq + i, ts + 3000 * i, [(1, b"1")], VP8_KEYFRAME), addr
        )


def received(h: Harness) -> dict[int, list[tuple[int, int, int]]]:
    """(payload type, seq, ts) of the media the viewer got, by SSRC."""
    out: dict[int, list[tuple[int, int, int]]] = {}
    for data, addr in h.sent:
        if addr != VIEWER or is_rtcp(data):
            continue
        pt, seq, ts, ssrc, *_ = parse_rtp(data)
        out.setdefault(ssrc, []).append((pt, seq, ts))
    return out


def test_viewer_follows_a_publisher_that_comes_back() -> None:
    h = Harness()
    publish(h, "cam", ("10.0.0.1", 4000))
    watch(h)
    viewer = h.sfu.get_participant("r", "viewer")
    ssrcs = {s.track.kind: s.ssrc for s in viewer.subscriptions.values()}
    h.sent.clear()
    send_media(h, ("10.0.0.1", 4000), seq=100, ts=5000)
    before = received(h)
    assert set(before) == {ssrcs["audio"], ssrcs["video"]}
    assert {pt for pt, _, _ in before[ssrcs["video"]]} == {97}

    # the publisher goes and comes back as another participant (a WHIP reconnect)
    h.sfu.remove_participant("r", "cam", "left")
    assert viewer.subscriptions == {}
    h.now += 2.0
    publish(h, "cam-again", ("10.0.0.3", 4000))
    tracks = {t.kind: t for t in h.sfu.get_participant("r", "cam-again").tracks.values()}
    assert {s.track.kind: s.track for s in viewer.subscriptions.values()} == tracks
    h.sent.clear()
    send_media(h, ("10.0.0.3", 4000), seq=40000, ts=123456)
    after = received(h)
    # the same SSRCs and payload types, the numbering going on where it stopped
    assert set(after) == set(before)
    for kind, step in (("audio", 960), ("video", 3000)):
        old, new = before[ssrcs[kind]], after[ssrcs[kind]]
        assert {pt for pt, _, _ in new} == {pt for pt, _, _ in old}
        assert [seq for _, seq, _ in new] == [(old[-1][1] + 1 + i) & 0xFFFF for i in range(3)]
        gap = (new[0][2] - old[-1][2]) & 0xFFFFFFFF
        assert 0 < gap < 2**31, gap  # forward
        assert [(ts - new[0][2]) & 0xFFFFFFFF for _, _, ts in new] == [0, step, 2 * step]


def test_viewer_of_one_participant_follows_only_that_participant() -> None:
    h = Harness()
    publish(h, "cam", ("10.0.0.1", 4000))
    watch(h, publisher_id="cam")
    viewer = h.sfu.get_participant("r", "viewer")
    h.sfu.remove_participant("r", "cam", "left")
    publish(h, "other", ("10.0.0.2", 4000))
    assert viewer.subscriptions == {}
    publish(h, "cam", ("10.0.0.3", 4000))
    assert {s.track.participant_id for s in viewer.subscriptions.values()} == {"cam"}
    assert len(viewer.subscriptions) == 2


def test_viewer_takes_only_a_track_in_the_format_it_was_answered() -> None:
    h = Harness()
    publish(h, "cam", ("10.0.0.1", 4000))
    watch(h)  # answered VP8 on the video m-line
    viewer = h.sfu.get_participant("r", "viewer")
    h.sfu.remove_participant("r", "cam", "left")
    h264_only = aiortc_offer().replace(
        "UDP/TLS/RTP/SAVPF 97 98 99 100 101 102", "UDP/TLS/RTP/SAVPF 99 100"
    )
    publish(h, "h264", ("10.0.0.2", 4000), h264_only)
    assert [s.track.kind for s in viewer.subscriptions.values()] == ["audio"]


def test_viewer_of_one_track_does_not_follow() -> None:
    h = Harness()
    publish(h, "cam", ("10.0.0.1", 4000))
    video = next(t for t in h.sfu.get_participant("r", "cam").tracks.values() if t.kind == "video")
    watch(h, track_id=video.track_id)
    viewer = h.sfu.get_participant("r", "viewer")
    h.sfu.remove_participant("r", "cam", "left")
    publish(h, "cam", ("10.0.0.3", 4000))
    assert viewer.subscriptions == {}


def test_viewer_follows_a_simulcast_publisher_that_comes_back() -> None:
    h = Harness()
    simulcast = (FIXTURES / "chrome_simulcast_offer.sdp").read_text()
    publish(h, "cam", ("10.0.0.1", 4000), simulcast)
    watch(h, offer=(FIXTURES / "chrome_offer.sdp").read_text())
    viewer = h.sfu.get_participant("r", "viewer")
    ssrcs = {s.track.kind: s.ssrc for s in viewer.subscriptions.values()}
    assert len(ssrcs) == 2
    h.sfu.remove_participant("r", "cam", "left")
    publish(h, "cam-again", ("10.0.0.3", 4000), simulcast)
    subs = {s.track.kind: s for s in viewer.subscriptions.values()}
    assert {k: s.ssrc for k, s in subs.items()} == ssrcs
    assert all(s.active and s.track.participant_id == "cam-again" for s in subs.values())
    # the video stream is placed on one of the new track's layers
    assert subs["video"].stream.track in subs["video"].track.layers
