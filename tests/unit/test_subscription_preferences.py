"""What a subscriber wants of a track (PUT .../subscriptions/{track_id}): pausing stops the
track's packets at the relay, resuming starts them again from a keyframe asked for at once;
size and rate limits are kept and shown; bad input gets the documented errors."""

from __future__ import annotations

import pytest

from relay.rtc import rtcp
from relay.rtc.rtp import is_rtcp, parse_rtp
from relay.sfu.errors import BadRequest, NotFound
from tests.unit.test_api import AUTH, World, assert_error, fixture_sdp, make_settings, setup_room
from tests.unit.test_sfu import (
    AIORTC_VIDEO_SSRC,
    VP8_KEYFRAME,
    Harness,
    _video_call,
    rtp,
)

ALICE = ("10.0.0.1", 4000)
BOB = ("10.0.0.2", 5000)


def _video_to_bob(h: Harness, ssrc: int) -> list[bytes]:
    return [
        d
        for d, a in h.sent
        if a == BOB and 127 < d[0] < 192 and not is_rtcp(d) and parse_rtp(d)[3] == ssrc
    ]


def _plis(h: Harness) -> int:
    return sum(
        isinstance(p, rtcp.Pli)
        for d, a in h.sent
        if a == ALICE and 127 < d[0] < 192 and is_rtcp(d)
        for p in rtcp.parse_rtcp(d)
    )


def test_pausing_stops_the_packets_and_resuming_restarts_on_a_keyframe() -> None:
    h = Harness()
    _alice, _bob, video = _video_call(h)
    sfu = h.sfu

    def send(seq: int, payload: bytes = b"\x90\x10delta") -> None:
        h.receive(rtp(AIORTC_VIDEO_SSRC, 97, seq, 9000 + seq, [], payload), ALICE)

    send(100, VP8_KEYFRAME)
    send(101)
    assert len(_video_to_bob(h, video.ssrc)) == 2
    sub = sfu.set_subscription_preferences("r", "bob", video.track.track_id, {"paused": True})
    assert sub.to_dict()["forwarded"] is False and sub.paused
    h.sent.clear()
    before = video.stream.packets_sent
    for seq in range(102, 110):
        send(seq)
    assert _video_to_bob(h, video.ssrc) == [] and video.stream.packets_sent == before
    stats = sfu.participant_stats("r", "bob")["outbound"]
    entry = next(e for e in stats if e["track_id"] == video.track.track_id)
    assert entry["forwarded"] is False and entry["preferences"]["paused"] is True
    # resuming asks alice for a keyframe at once and forwards from it, numbering continuous
    h.now += 1.0
    h.sent.clear()
    sfu.set_subscription_preferences("r", "bob", video.track.track_id, {"paused": False})
    assert _plis(h) == 1
    send(110)  # a delta frame: not a start
    assert _video_to_bob(h, video.ssrc) == []
    send(111, VP8_KEYFRAME)
    send(112)
    seqs = [parse_rtp(d)[1] for d in _video_to_bob(h, video.ssrc)]
    assert len(seqs) == 2 and seqs[1] == (seqs[0] + 1) & 0xFFFF


def test_limits_are_kept_lifted_with_none_and_checked() -> None:
    h = Harness()
    _alice, _bob, video = _video_call(h)
    track_id = video.track.track_id
    sfu = h.sfu
    sub = sfu.set_subscription_preferences("r", "bob", track_id, {"max_height": 180, "max_fps": 15})
    assert sub.preferences() == {
        "paused": False,
        "max_width": None,
        "max_height": 180,
        "max_fps": 15,
        "priority": 0,
    }
    sub = sfu.set_subscription_preferences("r", "bob", track_id, {"max_width": 320})
    assert (sub.max_width, sub.max_height) == (320, 180)  # a field left out is kept
    sub = sfu.set_subscription_preferences("r", "bob", track_id, {"max_height": None})
    assert sub.max_height is None and sub.max_width == 320
    assert sub.active  # limits alone never stop a track with one layer
    sub = sfu.set_subscription_preferences("r", "bob", track_id, {"priority": 7})
    assert sub.priority == 7 and sub.to_dict()["priority"] == 7
    for bad in (
        {"max_width": 0},
        {"max_height": 1.5},
        {"max_fps": 500},
        {"paused": 1},
        {"priority": 11},
        {"priority": 2.5},
        {"priority": True},
    ):
        with pytest.raises(BadRequest):
            sfu.set_subscription_preferences("r", "bob", track_id, bad)
    with pytest.raises(NotFound) as info:
        sfu.set_subscription_preferences("r", "bob", "TR_nothing", {"paused": True})
    assert info.value.code == "subscription_not_found"


async def test_the_control_api_sets_preferences_with_the_documented_errors() -> None:
    world = World(make_settings(max_body_bytes=16384))
    async with world.client() as client:
        await setup_room(client, "alice", "bob")
        r = await client.post(
            "/v1/rooms/r1/participants/alice/publisher",
            json={"type": "offer", "sdp": fixture_sdp("aiortc_offer.sdp")},
            headers=AUTH,
        )
        assert r.status_code == 200, r.text
        track_id = next(iter(world.sfu.get_participant("r1", "alice").tracks))
        path = f"/v1/rooms/r1/participants/bob/subscriptions/{track_id}"
        r = await client.put(path, json={"paused": True, "max_height": 180}, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["track_id"] == track_id and body["publisher_id"] == "alice"
        assert (body["paused"], body["max_height"], body["max_width"]) == (True, 180, None)
        assert body["forwarded"] is False
        r = await client.put(path, json={"max_height": None}, headers=AUTH)
        assert r.json()["max_height"] is None and r.json()["paused"] is True
        for bad in ({"max_width": 0}, {"max_fps": "fast"}, {"paused": "yes"}, {"volume": 3}):
            assert_error(await client.put(path, json=bad, headers=AUTH), 422, "invalid_request")
        r = await client.put(
            "/v1/rooms/r1/participants/bob/subscriptions/TR_none", json={}, headers=AUTH
        )
        assert_error(r, 404, "subscription_not_found")
        r = await client.put(
            f"/v1/rooms/r1/participants/carol/subscriptions/{track_id}", json={}, headers=AUTH
        )
        assert_error(r, 404, "participant_not_found")


async def test_a_participant_token_sets_only_its_own() -> None:
    from tests.unit.test_tokens import token_for, token_settings

    world = World(token_settings(enabled=False))
    async with world.client() as client:
        await setup_room(client, "alice", "bob")
        r = await client.post(
            "/v1/rooms/r1/participants/alice/publisher",
            json={"type": "offer", "sdp": fixture_sdp("aiortc_offer.sdp")},
            headers=AUTH,
        )
        assert r.status_code == 200, r.text
        track_id = next(iter(world.sfu.get_participant("r1", "alice").tracks))
        bob = token_for("bob")
        r = await client.put(
            f"/v1/rooms/r1/participants/bob/subscriptions/{track_id}",
            json={"paused": True},
            headers=bob,
        )
        assert r.status_code == 200, r.text
        r = await client.put(
            f"/v1/rooms/r1/participants/alice/subscriptions/{track_id}",
            json={"paused": True},
            headers=bob,
        )
        assert_error(r, 403)
