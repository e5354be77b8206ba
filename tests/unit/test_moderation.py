"""Moderation and end-to-end-encrypted rooms at the relay.

A moderator (the API key) mutes a participant's track: the relay stops forwarding it and
tells subscribers (``track.muted``, ``by: "moderator"``); unmuting forwards it again from a
keyframe asked for at once. A room created with ``e2ee_required`` lets only participants that
encrypt end to end (created with ``e2ee``, or holding a token with the ``e2ee`` claim) publish.
"""

from __future__ import annotations

import pytest

from relay.api.tokens import InvalidToken, decode_token, encode_token
from relay.rtc.rtp import parse_rtp
from relay.sfu.errors import Forbidden, NotFound
from tests.unit.test_api import AUTH, World, assert_error, fixture_sdp, setup_room
from tests.unit.test_sfu import AIORTC_VIDEO_SSRC, VP8_KEYFRAME, Harness, _video_call, rtp
from tests.unit.test_subscription_preferences import ALICE, _plis, _video_to_bob
from tests.unit.test_tokens import SECRET, token_for, token_settings

OFFER = {"type": "offer", "sdp": fixture_sdp("aiortc_offer.sdp")}


def test_a_muted_track_is_not_forwarded_and_unmuting_restarts_on_a_keyframe() -> None:
    h = Harness()
    _alice, _bob, video = _video_call(h)
    sfu, track_id = h.sfu, video.track.track_id

    def send(seq: int, payload: bytes = b"\x90\x10delta") -> None:
        h.receive(rtp(AIORTC_VIDEO_SSRC, 97, seq, 9000 + seq, [], payload), ALICE)

    send(100, VP8_KEYFRAME)
    send(101)
    assert len(_video_to_bob(h, video.ssrc)) == 2
    h.events.clear()
    track = sfu.moderate_track("r", "alice", track_id, True)
    assert track.moderated and track.to_dict()["muted"] and track.to_dict()["moderated"]
    muted = [e for e in h.events if e["type"] == "track.muted"]
    assert muted == [
        {
            "type": "track.muted",
            "room_id": "r",
            "at": muted[0]["at"],
            "participant_id": "alice",
            "track_id": track_id,
            "by": "moderator",
        }
    ]
    h.sent.clear()
    for seq in range(102, 110):
        send(seq, VP8_KEYFRAME if seq == 105 else b"\x90\x10delta")
    assert _video_to_bob(h, video.ssrc) == []  # not even a keyframe gets through
    sfu.moderate_track("r", "alice", track_id, True)  # again: nothing changes, no event
    assert sum(e["type"] == "track.muted" for e in h.events) == 1
    # unmuting asks alice for a keyframe at once and forwards from it, numbering continuous
    h.now += 1.0
    h.sent.clear()
    sfu.moderate_track("r", "alice", track_id, False)
    assert _plis(h) >= 1
    assert [e["by"] for e in h.events if e["type"] == "track.unmuted"] == ["moderator"]
    send(110)  # a delta frame: not a start
    assert _video_to_bob(h, video.ssrc) == []
    send(111, VP8_KEYFRAME)
    send(112)
    seqs = [parse_rtp(d)[1] for d in _video_to_bob(h, video.ssrc)]
    assert len(seqs) == 2 and seqs[1] == (seqs[0] + 1) & 0xFFFF
    with pytest.raises(NotFound) as info:
        sfu.moderate_track("r", "alice", "TR_none", True)
    assert info.value.code == "track_not_found"


async def test_the_api_key_mutes_and_unmutes_and_tokens_may_not() -> None:
    world = World(token_settings(enabled=False))
    async with world.client() as client:
        await setup_room(client, "alice", "bob")
        r = await client.post("/v1/rooms/r1/participants/alice/publisher", json=OFFER, headers=AUTH)
        assert r.status_code == 200, r.text
        track_id = next(iter(world.sfu.get_participant("r1", "alice").tracks))
        path = f"/v1/rooms/r1/participants/alice/tracks/{track_id}"
        for who in ("alice", "bob"):
            assert_error(await client.post(f"{path}/mute", headers=token_for(who)), 403)
        r = await client.post(f"{path}/mute", headers=AUTH)
        assert r.status_code == 204, r.text
        r = await client.get("/v1/rooms/r1/participants/alice", headers=AUTH)
        track = next(t for t in r.json()["tracks"] if t["track_id"] == track_id)
        assert track["muted"] is True and track["moderated"] is True
        assert [(e.type, e.by) for e in world.events if e.type == "track.muted"] == [
            ("track.muted", "moderator")
        ]
        r = await client.post(f"{path}/unmute", headers=AUTH)
        assert r.status_code == 204, r.text
        r = await client.get("/v1/rooms/r1/participants/alice", headers=AUTH)
        track = next(t for t in r.json()["tracks"] if t["track_id"] == track_id)
        assert track["moderated"] is False
        r = await client.post("/v1/rooms/r1/participants/alice/tracks/TR_none/mute", headers=AUTH)
        assert_error(r, 404, "track_not_found")
        r = await client.post(
            f"/v1/rooms/r1/participants/carol/tracks/{track_id}/mute", headers=AUTH
        )
        assert_error(r, 404, "participant_not_found")


async def test_an_e2ee_room_lets_only_encrypting_participants_publish() -> None:
    world = World(token_settings(enabled=False))
    async with world.client() as client:
        r = await client.post(
            "/v1/rooms", json={"room_id": "r1", "e2ee_required": True}, headers=AUTH
        )
        assert r.status_code == 201 and r.json()["e2ee_required"] is True
        for pid, e2ee in (("alice", True), ("bob", False), ("carol", False)):
            r = await client.post(
                "/v1/rooms/r1/participants",
                json={"participant_id": pid, "e2ee": e2ee},
                headers=AUTH,
            )
            assert r.status_code == 201 and r.json()["e2ee"] is e2ee, r.text
        joined = [e for e in world.events if e.type == "participant.joined"]
        assert [(e.participant_id, e.e2ee, e.e2ee_required) for e in joined] == [
            ("alice", True, True),
            ("bob", False, True),
            ("carol", False, True),
        ]
        base = "/v1/rooms/r1/participants"
        assert (
            await client.post(f"{base}/alice/publisher", json=OFFER, headers=AUTH)
        ).status_code == 200
        # bob was created without e2ee: not even the API key may make him publish here
        assert_error(
            await client.post(f"{base}/bob/publisher", json=OFFER, headers=AUTH),
            403,
            "e2ee_required",
        )
        assert not world.sfu.get_participant("r1", "bob").tracks
        assert_error(
            await client.post(f"{base}/carol/publisher", json=OFFER, headers=token_for("carol")),
            403,
            "e2ee_required",
        )
        # carol's token says she encrypts: she may publish, and shows so from then on
        r = await client.post(
            f"{base}/carol/publisher", json=OFFER, headers=token_for("carol", e2ee=True)
        )
        assert r.status_code == 200, r.text
        r = await client.get(f"{base}/carol", headers=AUTH)
        assert r.json()["e2ee"] is True and r.json()["tracks"]
        # bob still subscribes to the others' (encrypted) tracks
        r = await client.get(f"{base}/bob", headers=AUTH)
        assert len(r.json()["subscriptions"]) == 4
        # a room without the requirement takes anyone's offer
        await setup_room(client, "dave", room="r2")
        r = await client.post("/v1/rooms/r2/participants/dave/publisher", json=OFFER, headers=AUTH)
        assert r.status_code == 200, r.text


def test_the_e2ee_claim_is_optional_and_must_be_a_boolean() -> None:
    plain = encode_token("r1", "alice", secret=SECRET, expires_at=2e9)
    assert decode_token(plain, SECRET, 1e9).e2ee is False
    marked = encode_token("r1", "alice", secret=SECRET, expires_at=2e9, e2ee=True)
    assert decode_token(marked, SECRET, 1e9).e2ee is True
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    claims = {"room": "r1", "sub": "alice", "can_publish": True, "can_subscribe": True}
    claims.update(exp=2e9, e2ee="yes")
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    with pytest.raises(InvalidToken, match="e2ee"):
        decode_token(f"{head}.{body}.{b64(sig)}", SECRET, 1e9)


def test_the_core_refuses_with_the_e2ee_code() -> None:
    h = Harness()
    h.sfu.create_room(room_id="e", e2ee_required=True)
    h.sfu.add_participant("e", "bob")
    with pytest.raises(Forbidden) as info:
        h.sfu.publisher_offer("e", "bob", fixture_sdp("aiortc_offer.sdp"))
    assert info.value.code == "e2ee_required" and info.value.status == 403
