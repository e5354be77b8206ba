"""WHIP (RFC 9725) and WHEP over HTTP, against the real SFU core in process (no media)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from relay.api.tokens import encode_token
from relay.api.whip import WhipSessions, parse_ice_fragment
from relay.config import ConfigError, WhipSettings, load_settings
from relay.rtc import sdp as sdpmod
from relay.sfu.events import ParticipantLeft
from tests.unit.test_api import AUTH, World, assert_error, fixture_sdp, make_settings

SECRET = "a-test-secret-that-is-long-enough-0123456789"
SDP = {"Content-Type": "application/sdp"}
FRAG = {"Content-Type": "application/trickle-ice-sdpfrag"}
CHROME = fixture_sdp("chrome_offer.sdp")


def viewer_offer(sdp: str = CHROME, ufrag: str = "vwer") -> str:
    """A Chrome offer turned into a viewer's: recvonly, no SSRCs, its own ICE credentials."""
    text = sdp.replace("a=sendrecv", "a=recvonly").replace("a=sendonly", "a=recvonly")
    lines = [line for line in text.splitlines() if not line.startswith(("a=ssrc", "a=msid:"))]
    return "\r\n".join(lines).replace("a=ice-ufrag:gjKa", f"a=ice-ufrag:{ufrag}") + "\r\n"


def token(room: str, participant: str, **flags: bool) -> str:
    return encode_token(room, participant, secret=SECRET, expires_at=time.time() + 600, **flags)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def make_world(**whip: object) -> World:
    settings = make_settings(max_body_bytes=65536)
    settings = dataclasses.replace(
        settings,
        auth=dataclasses.replace(settings.auth, token_secret=SECRET),
        whip=dataclasses.replace(settings.whip, **whip),
    )
    return World(settings)


@pytest.fixture
def world() -> World:
    return make_world()


@pytest.fixture
async def client(world: World) -> AsyncIterator[httpx.AsyncClient]:
    async with world.client() as c:
        r = await c.post("/v1/rooms", json={"room_id": "r1"}, headers=AUTH)
        assert r.status_code == 201
        r = await c.post("/v1/rooms", json={"room_id": "r2"}, headers=AUTH)
        assert r.status_code == 201
        yield c


async def publish(client: httpx.AsyncClient, **params: str) -> httpx.Response:
    return await client.post("/whip/r1", content=CHROME, headers={**AUTH, **SDP}, params=params)


# --------------------------------------------------------------------------------------------
# WHIP: POST


async def test_post_answers_201_with_location_etag_and_publishes(
    client: httpx.AsyncClient, world: World
) -> None:
    r = await publish(client)
    assert r.status_code == 201, r.text
    assert r.headers["content-type"] == "application/sdp"
    location = r.headers["location"]
    assert location.startswith("/whip/r1/")
    etag = r.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and len(etag) > 2
    assert "link" not in r.headers  # no ICE servers configured
    answer = sdpmod.parse_sdp(r.text)
    assert [m.direction for m in answer.media[:2]] == ["recvonly", "recvonly"]
    participant = location.rsplit("/", 1)[1]
    info = (await client.get(f"/v1/rooms/r1/participants/{participant}", headers=AUTH)).json()
    assert sorted(t["kind"] for t in info["tracks"]) == ["audio", "video"]
    # a WHIP participant publishes only: no subscriptions, even to tracks published later
    p = world.sfu.get_participant("r1", participant)
    assert p.can_publish and not p.can_subscribe and not p.auto_subscribe


async def test_post_with_participant_query(client: httpx.AsyncClient) -> None:
    r = await publish(client, participant="cam1")
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/whip/r1/cam1"
    r = await publish(client, participant="cam1")
    assert_error(r, 409, "participant_exists")
    r = await publish(client, participant="bad/id")
    assert r.status_code in (404, 422)


async def test_post_needs_application_sdp(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/whip/r1", content=CHROME, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert_error(r, 415, "unsupported_media_type")
    r = await client.post("/whip/r1", content=CHROME, headers=AUTH)
    assert_error(r, 415, "unsupported_media_type")
    # parameters of the media type are fine
    r = await client.post(
        "/whip/r1", content=CHROME, headers={**AUTH, "Content-Type": "application/SDP; x=1"}
    )
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    "body",
    ["", "hello", "v=0\r\nm=audio\r\n", CHROME.replace("a=ice-pwd", "a=x-pwd")],
    ids=["empty", "text", "truncated", "no-ice-pwd"],
)
async def test_post_refuses_bad_sdp_and_creates_nobody(
    client: httpx.AsyncClient, world: World, body: str
) -> None:
    r = await client.post("/whip/r1", content=body, headers={**AUTH, **SDP})
    assert_error(r, 400, "bad_sdp")
    assert world.sfu.get_room("r1").participants == {}


async def test_post_refused_by_the_core_removes_the_participant(
    client: httpx.AsyncClient, world: World
) -> None:
    # parses, but no m-line the relay can take (a data channel only, in the legacy
    # "DTLS/SCTP 5000" form the relay does not answer; it takes "UDP/DTLS/SCTP")
    sdp = fixture_sdp("chrome_offer.sdp")
    head, _, rest = sdp.partition("m=audio")
    data = "m=application" + rest.split("m=application", 1)[1]
    data = data.replace("UDP/DTLS/SCTP webrtc-datachannel", "DTLS/SCTP 5000")
    r = await client.post("/whip/r1", content=head + data, headers={**AUTH, **SDP})
    assert_error(r, 400, "bad_sdp")
    assert world.sfu.get_room("r1").participants == {}
    assert [type(e) for e in world.events if isinstance(e, ParticipantLeft)] == [ParticipantLeft]


async def test_post_errors(client: httpx.AsyncClient) -> None:
    r = await client.post("/whip/nope", content=CHROME, headers={**AUTH, **SDP})
    assert_error(r, 404, "room_not_found")
    r = await client.post("/whip/r1", content="x" * 70000, headers={**AUTH, **SDP})
    assert_error(r, 413)


async def test_post_credentials(client: httpx.AsyncClient) -> None:
    r = await client.post("/whip/r1", content=CHROME, headers=SDP)
    assert_error(r, 401, "unauthorized")
    r = await client.post("/whip/r1", content=CHROME, headers={**SDP, **bearer("nope")})
    assert_error(r, 401)
    forged = token("r1", "cam").rsplit(".", 1)[0] + ".AAAA"
    r = await client.post("/whip/r1", content=CHROME, headers={**SDP, **bearer(forged)})
    assert_error(r, 401)
    assert "invalid_token" in r.headers["www-authenticate"]
    # a token of another room, or one that may not publish: 403
    r = await client.post("/whip/r1", content=CHROME, headers={**SDP, **bearer(token("r2", "c"))})
    assert_error(r, 403, "forbidden")
    no_publish = bearer(token("r1", "c", can_publish=False))
    r = await client.post("/whip/r1", content=CHROME, headers={**SDP, **no_publish})
    assert_error(r, 403)
    # a token may not name another participant
    r = await client.post(
        "/whip/r1",
        content=CHROME,
        headers={**SDP, **bearer(token("r1", "c"))},
        params={"participant": "someone"},
    )
    assert_error(r, 403)
    r = await client.post(
        "/whip/r1",
        content=CHROME,
        headers={**SDP, **bearer(token("r1", "c"))},
        params={"participant": "c"},
    )
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/whip/r1/c"


async def test_post_with_token_creates_or_uses_its_participant(
    client: httpx.AsyncClient, world: World
) -> None:
    r = await client.post("/whip/r1", content=CHROME, headers={**SDP, **bearer(token("r1", "a"))})
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/whip/r1/a"
    assert "a" in world.sfu.get_room("r1").participants
    # one session per participant
    r = await client.post("/whip/r1", content=CHROME, headers={**SDP, **bearer(token("r1", "a"))})
    assert_error(r, 409, "session_exists")
    # a participant the signaling server made is used as it is
    r = await client.post("/v1/rooms/r1/participants", json={"participant_id": "b"}, headers=AUTH)
    assert r.status_code == 201
    r = await client.post("/whip/r1", content=CHROME, headers={**SDP, **bearer(token("r1", "b"))})
    assert r.status_code == 201, r.text
    assert world.sfu.get_participant("r1", "b").auto_subscribe
    # one that publishes through the control API already: 409
    r = await client.post("/v1/rooms/r1/participants", json={"participant_id": "c"}, headers=AUTH)
    r = await client.post(
        "/v1/rooms/r1/participants/c/publisher", json={"type": "offer", "sdp": CHROME}, headers=AUTH
    )
    assert r.status_code == 200, r.text
    r = await client.post("/whip/r1", content=CHROME, headers={**SDP, **bearer(token("r1", "c"))})
    assert_error(r, 409, "already_publishing")


async def test_post_while_draining(client: httpx.AsyncClient, world: World) -> None:
    world.sfu.drain()
    r = await publish(client)
    assert_error(r, 503)


async def test_link_headers_only_when_configured() -> None:
    world = make_world(
        ice_servers=("stun:stun.example.net:3478", "turn:turn.example.net?transport=udp"),
        ice_username="user",
        ice_credential="pass",
    )
    async with world.client() as c:
        await c.post("/v1/rooms", json={"room_id": "r1"}, headers=AUTH)
        r = await c.post("/whip/r1", content=CHROME, headers={**AUTH, **SDP})
        assert r.status_code == 201, r.text
        links = r.headers.get_list("link")
        assert links == [
            '<stun:stun.example.net:3478>; rel="ice-server"',
            '<turn:turn.example.net?transport=udp>; rel="ice-server"; username="user"; '
            'credential="pass"; credential-type="password"',
        ]


def test_whip_settings_are_checked() -> None:
    assert load_settings(None, {}).whip == WhipSettings()
    env = {"RELAY_WHIP__ICE_SERVERS": "stun:a.example:3478,turns:b.example"}
    assert load_settings(None, env).whip.ice_servers == ("stun:a.example:3478", "turns:b.example")
    for name, value in [
        ("RELAY_WHIP__ICE_SERVERS", "http://x"),
        ("RELAY_WHIP__ICE_SERVERS", "stun:a b"),
        ("RELAY_WHIP__ICE_CREDENTIAL", 'a"b'),
    ]:
        with pytest.raises(ConfigError):
            load_settings(None, {name: value})


# --------------------------------------------------------------------------------------------
# WHIP: DELETE


async def test_delete_ends_the_session(client: httpx.AsyncClient, world: World) -> None:
    r = await publish(client)
    location = r.headers["location"]
    participant = location.rsplit("/", 1)[1]
    r = await client.delete(location)
    assert_error(r, 401)
    r = await client.delete(location, headers=bearer(token("r1", "other")))
    assert_error(r, 403)
    r = await client.delete(location.replace("/r1/", "/r2/"), headers=AUTH)
    assert_error(r, 404, "session_not_found")
    r = await client.delete(location, headers=AUTH)
    assert r.status_code == 204
    assert participant not in world.sfu.get_room("r1").participants
    left = [e for e in world.events if isinstance(e, ParticipantLeft)]
    assert [(e.participant_id, e.reason) for e in left] == [(participant, "left")]
    r = await client.delete(location, headers=AUTH)
    assert_error(r, 404, "session_not_found")


async def test_delete_with_the_participants_token(client: httpx.AsyncClient) -> None:
    own = bearer(token("r1", "cam"))
    r = await client.post("/whip/r1", content=CHROME, headers={**SDP, **own})
    r = await client.delete(r.headers["location"], headers=own)
    assert r.status_code == 204


async def test_session_ends_with_its_participant(client: httpx.AsyncClient) -> None:
    r = await publish(client, participant="cam")
    r = await client.delete("/v1/rooms/r1/participants/cam", headers=AUTH)
    assert r.status_code == 204
    r = await client.delete("/whip/r1/cam", headers=AUTH)
    assert_error(r, 404, "session_not_found")
    # and the id may be used again
    r = await publish(client, participant="cam")
    assert r.status_code == 201


def test_sessions_are_bounded() -> None:
    from relay.api.whip import Session

    sessions = WhipSessions(limit=2)
    for i in range(3):
        sessions.add(Session("whip", "r", f"p{i}", '"e"', "u", "p"))
    assert len(sessions) == 2
    assert sessions.get("whip", "r", "p0") is None
    assert sessions.get("whip", "r", "p2") is not None


# --------------------------------------------------------------------------------------------
# WHIP: PATCH


CANDIDATE = "a=candidate:1 1 udp 2122194687 192.0.2.9 5000 typ host"


def trickle(ufrag: str = "gjKa", pwd: str = "1h/DLXLdCcF7QXR9Ae+MQxzM") -> str:
    return f"a=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n{CANDIDATE}\r\n"


async def test_patch_with_candidates_is_204(client: httpx.AsyncClient) -> None:
    r = await publish(client)
    location, etag = r.headers["location"], r.headers["etag"]
    r = await client.patch(location, content=trickle(), headers={**AUTH, **FRAG, "If-Match": etag})
    assert r.status_code == 204 and r.content == b""
    assert "etag" not in r.headers
    # without If-Match, or candidates alone (no credentials): still only candidates
    r = await client.patch(location, content=CANDIDATE + "\r\n", headers={**AUTH, **FRAG})
    assert r.status_code == 204
    r = await client.patch(location, content="a=end-of-candidates\r\n", headers={**AUTH, **FRAG})
    assert r.status_code == 204


async def test_patch_errors(client: httpx.AsyncClient) -> None:
    r = await publish(client)
    location, etag = r.headers["location"], r.headers["etag"]
    r = await client.patch(
        location, content=trickle(), headers={**AUTH, **FRAG, "If-Match": '"stale"'}
    )
    assert_error(r, 412, "precondition_failed")
    r = await client.patch(location, content=trickle(), headers={**AUTH, **SDP, "If-Match": etag})
    assert_error(r, 415, "unsupported_media_type")
    r = await client.patch(location, content=trickle(), headers=FRAG)
    assert_error(r, 401)
    r = await client.patch("/whip/r1/nobody", content=trickle(), headers={**AUTH, **FRAG})
    assert_error(r, 404, "session_not_found")
    r = await client.patch(location, content="not sdp\r\n", headers={**AUTH, **FRAG})
    assert_error(r, 400, "bad_sdp")
    # a restart needs both credentials, valid ones
    r = await client.patch(location, content="a=ice-ufrag:new1\r\n", headers={**AUTH, **FRAG})
    assert_error(r, 400, "bad_sdp")
    r = await client.patch(location, content=trickle("n!w1", "x" * 22), headers={**AUTH, **FRAG})
    assert_error(r, 400, "bad_sdp")


async def test_patch_restarts_ice(client: httpx.AsyncClient, world: World) -> None:
    r = await publish(client, participant="cam")
    location, etag = r.headers["location"], r.headers["etag"]
    old_ufrag = sdpmod.parse_sdp(r.text).media[0].ice_ufrag
    leg = world.sfu.get_participant("r1", "cam").publisher_leg
    assert leg is not None
    new_pwd = "N" * 24
    r = await client.patch(
        location, content=trickle("new1", new_pwd), headers={**AUTH, **FRAG, "If-Match": "*"}
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/trickle-ice-sdpfrag"
    new_etag = r.headers["etag"]
    assert new_etag != etag
    ufrag, pwd, candidates, media = parse_ice_fragment(r.text)
    assert ufrag is not None and pwd is not None and ufrag != old_ufrag
    assert media == ["m=audio 9 UDP/TLS/RTP/SAVPF 0", "a=mid:0"]
    assert candidates == ["a=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host"]
    assert "a=end-of-candidates" in r.text and "a=ice-lite" in r.text
    # the relay now answers checks for its new ufrag with the client's new credentials
    port = world.sfu.port
    assert port.by_ufrag.get(ufrag) is leg and old_ufrag not in port.by_ufrag
    assert (leg.transport.local.ufrag, leg.transport.local.pwd) == (ufrag, pwd)
    assert (leg.transport.remote_ufrag, leg.transport.remote_pwd) == ("new1", new_pwd)
    # the old ETag is stale now; the new one takes candidates
    r = await client.patch(
        location, content=trickle("new1", new_pwd), headers={**AUTH, **FRAG, "If-Match": etag}
    )
    assert_error(r, 412)
    r = await client.patch(
        location, content=trickle("new1", new_pwd), headers={**AUTH, **FRAG, "If-Match": new_etag}
    )
    assert r.status_code == 204


# --------------------------------------------------------------------------------------------
# OPTIONS and CORS


async def test_options_answers_cors_preflight(client: httpx.AsyncClient) -> None:
    preflight = {"Origin": "http://page.example", "Access-Control-Request-Method": "POST"}
    for path, methods, accept in [
        ("/whip/r1", "POST", ("accept-post", "application/sdp")),
        ("/whep/r1", "POST", ("accept-post", "application/sdp")),
        ("/whip/r1/cam", "PATCH", ("accept-patch", "application/trickle-ice-sdpfrag")),
        ("/whep/r1/cam", "DELETE", ("accept-patch", "application/trickle-ice-sdpfrag")),
    ]:
        r = await client.options(path, headers=preflight)  # no credentials in a preflight
        assert r.status_code == 204, (path, r.text)
        assert r.headers["access-control-allow-origin"] == "*"
        assert methods in r.headers["access-control-allow-methods"]
        allowed = r.headers["access-control-allow-headers"].lower()
        assert {"authorization", "content-type", "if-match"} <= {
            h.strip() for h in allowed.split(",")
        }
        exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
        assert {"location", "etag", "link"} <= exposed
        assert r.headers[accept[0]] == accept[1]


async def test_cors_headers_on_answers_and_errors(client: httpx.AsyncClient) -> None:
    r = await publish(client)
    assert r.headers["access-control-allow-origin"] == "*"
    assert "location" in r.headers["access-control-expose-headers"].lower()
    r = await client.post("/whip/r1", content="x", headers=SDP)
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "*"
    # not on the control API
    r = await client.get("/v1/rooms", headers=AUTH)
    assert "access-control-allow-origin" not in r.headers


async def test_cors_headers_on_a_body_refused_before_any_handler(
    client: httpx.AsyncClient,
) -> None:
    # the body limit answers before the WHIP routes run: a page must still read its error
    r = await client.post("/whip/r1", content="v=0\r\n" * 20000, headers={**AUTH, **SDP})
    assert_error(r, 413, "too_large")
    assert r.headers["access-control-allow-origin"] == "*"
    r = await client.post("/v1/rooms", content="x" * 70000, headers=AUTH)
    assert_error(r, 413, "too_large")
    assert "access-control-allow-origin" not in r.headers


async def test_allowed_origin_is_configurable() -> None:
    world = make_world(allow_origin="https://studio.example")
    async with world.client() as c:
        r = await c.options("/whip/r1")
        assert r.headers["access-control-allow-origin"] == "https://studio.example"


async def test_demo_page_is_served(client: httpx.AsyncClient) -> None:
    r = await client.get("/demo/whip")
    assert r.status_code == 200 and "whip.js" in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    r = await client.get("/demo/whip.js")
    assert r.status_code == 200 and "trickle-ice-sdpfrag" in r.text


# --------------------------------------------------------------------------------------------
# WHEP


async def test_whep_answers_with_the_rooms_tracks(client: httpx.AsyncClient, world: World) -> None:
    await publish(client, participant="cam")
    cam = world.sfu.get_participant("r1", "cam")
    tracks = {t.kind: t.track_id for t in cam.tracks.values()}
    r = await client.post("/whep/r1", content=viewer_offer(), headers={**AUTH, **SDP})
    assert r.status_code == 201, r.text
    assert r.headers["content-type"] == "application/sdp"
    location = r.headers["location"]
    assert location.startswith("/whep/r1/") and r.headers["etag"]
    answer = sdpmod.parse_sdp(r.text)
    audio, video, data = answer.media
    assert (audio.mid, audio.direction, audio.port != 0) == ("0", "sendonly", True)
    assert (video.mid, video.direction, video.port != 0) == ("1", "sendonly", True)
    assert data.port == 0  # the data channel is rejected
    assert answer.bundle_mids == ["0", "1"]
    # the viewer's own payload types: opus 111, VP8 96 with its RTX 97
    assert [c.payload_type for c in audio.codecs] == [111]
    assert [(c.name, c.payload_type, c.rtx_payload_type) for c in video.codecs] == [("VP8", 96, 97)]
    assert audio.setup == "passive" and video.ssrcs
    viewer = world.sfu.get_participant("r1", location.rsplit("/", 1)[1])
    assert not viewer.can_publish and not viewer.auto_subscribe
    subs = {s.track.kind: s for s in viewer.subscriptions.values()}
    assert subs["audio"].track.track_id == tracks["audio"]
    assert subs["video"].track.track_id == tracks["video"]
    assert (subs["video"].mid, subs["video"].payload_type) == ("1", 96)
    assert subs["video"].stream.payload_type == 96
    assert subs["video"].negotiated and subs["audio"].negotiated
    # the viewer's extension ids
    ext = {e.uri: e.id for e in video.extmaps}
    assert ext[sdpmod.TWCC_URI] == 3
    leg = viewer.subscriber_leg
    assert leg is not None and leg.transport.remote_ufrag == "vwer"
    assert world.sfu.port.by_ufrag[video.ice_ufrag or ""] is leg


async def test_whep_maps_the_viewers_payload_types(client: httpx.AsyncClient, world: World) -> None:
    await publish(client, participant="cam")
    firefox = viewer_offer(fixture_sdp("firefox_offer.sdp"))
    r = await client.post("/whep/r1", content=firefox, headers={**AUTH, **SDP})
    assert r.status_code == 201, r.text
    answer = sdpmod.parse_sdp(r.text)
    offered = sdpmod.parse_sdp(firefox)
    for m, o in zip(answer.media, offered.media, strict=True):
        if m.port == 0 or m.direction == "inactive":
            continue
        codec = m.codecs[0]
        mine = next(c for c in o.codecs if c.payload_type == codec.payload_type)
        assert mine.name.lower() == codec.name.lower()
    viewer = world.sfu.get_participant("r1", r.headers["location"].rsplit("/", 1)[1])
    video = next(s for s in viewer.subscriptions.values() if s.track.kind == "video")
    vp8 = next(c for m in offered.media for c in m.codecs if c.name == "VP8")
    assert video.payload_type == vp8.payload_type


async def test_whep_chooses_a_participant_or_a_track(
    client: httpx.AsyncClient, world: World
) -> None:
    await publish(client, participant="cam1")
    await publish(client, participant="cam2")
    cam2 = world.sfu.get_participant("r1", "cam2")
    r = await client.post(
        "/whep/r1", content=viewer_offer(), headers={**AUTH, **SDP}, params={"participant": "cam2"}
    )
    assert r.status_code == 201, r.text
    viewer = world.sfu.get_participant("r1", r.headers["location"].rsplit("/", 1)[1])
    assert {s.track.participant_id for s in viewer.subscriptions.values()} == {"cam2"}
    video = next(t for t in cam2.tracks.values() if t.kind == "video")
    r = await client.post(
        "/whep/r1",
        content=viewer_offer(),
        headers={**AUTH, **SDP},
        params={"track": video.track_id},
    )
    assert r.status_code == 201, r.text
    answer = sdpmod.parse_sdp(r.text)
    assert [m.direction for m in answer.media[:2]] == ["inactive", "sendonly"]
    r = await client.post(
        "/whep/r1", content=viewer_offer(), headers={**AUTH, **SDP}, params={"participant": "x"}
    )
    assert_error(r, 404, "participant_not_found")
    r = await client.post(
        "/whep/r1", content=viewer_offer(), headers={**AUTH, **SDP}, params={"track": "x"}
    )
    assert_error(r, 404, "track_not_found")
    # a refused viewer leaves nobody behind
    room = world.sfu.get_room("r1")
    assert len(room.participants) == 4


async def test_whep_with_nothing_to_watch_is_404(client: httpx.AsyncClient, world: World) -> None:
    r = await client.post("/whep/r1", content=viewer_offer(), headers={**AUTH, **SDP})
    assert_error(r, 404, "no_tracks")
    assert world.sfu.get_room("r1").participants == {}
    # a viewer's own participant (token) is left as it was, and may try again
    r = await client.post("/v1/rooms/r1/participants", json={"participant_id": "v"}, headers=AUTH)
    r = await client.post(
        "/whep/r1", content=viewer_offer(), headers={**SDP, **bearer(token("r1", "v"))}
    )
    assert_error(r, 404, "no_tracks")
    assert world.sfu.get_participant("r1", "v").subscriber_leg is None
    # audio only: the video m-line is answered inactive
    audio_only = CHROME.replace("a=group:BUNDLE 0 1 2", "a=group:BUNDLE 0 2")
    head, _, rest = audio_only.partition("m=video")
    audio_only = head + "m=application" + rest.split("m=application", 1)[1]
    r = await client.post("/whip/r1", content=audio_only, headers={**AUTH, **SDP})
    assert r.status_code == 201, r.text
    r = await client.post("/whep/r1", content=viewer_offer(), headers={**AUTH, **SDP})
    assert r.status_code == 201, r.text
    answer = sdpmod.parse_sdp(r.text)
    assert [m.direction for m in answer.media[:2]] == ["sendonly", "inactive"]


async def test_whep_credentials_and_errors(client: httpx.AsyncClient, world: World) -> None:
    await publish(client, participant="cam")
    r = await client.post("/whep/r1", content=viewer_offer(), headers=SDP)
    assert_error(r, 401)
    no_subscribe = bearer(token("r1", "v", can_subscribe=False))
    r = await client.post("/whep/r1", content=viewer_offer(), headers={**SDP, **no_subscribe})
    assert_error(r, 403)
    r = await client.post(
        "/whep/r1", content=viewer_offer(), headers={**SDP, **bearer(token("r2", "v"))}
    )
    assert_error(r, 403)
    r = await client.post("/whep/r1", content="v=0\r\n", headers={**AUTH, **SDP})
    assert_error(r, 400, "bad_sdp")
    r = await client.post(
        "/whep/r1", content=viewer_offer(), headers={**AUTH, "Content-Type": "text/plain"}
    )
    assert_error(r, 415)
    # a viewer's token: its participant is made, subscribes, never publishes
    own = bearer(token("r1", "v"))
    r = await client.post("/whep/r1", content=viewer_offer(), headers={**SDP, **own})
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/whep/r1/v"
    v = world.sfu.get_participant("r1", "v")
    assert not v.can_publish and len(v.subscriptions) == 2
    r = await client.post("/whep/r1", content=viewer_offer(), headers={**SDP, **own})
    assert_error(r, 409, "session_exists")
    r = await client.delete("/whep/r1/v", headers=own)
    assert r.status_code == 204
    assert "v" not in world.sfu.get_room("r1").participants


async def test_whep_patch_restarts_the_viewers_ice(client: httpx.AsyncClient, world: World) -> None:
    await publish(client, participant="cam")
    r = await client.post("/whep/r1", content=viewer_offer(), headers={**AUTH, **SDP})
    location, etag = r.headers["location"], r.headers["etag"]
    viewer = world.sfu.get_participant("r1", location.rsplit("/", 1)[1])
    r = await client.patch(
        location, content=trickle("vwer"), headers={**AUTH, **FRAG, "If-Match": etag}
    )
    assert r.status_code == 204
    r = await client.patch(
        location, content=trickle("vw2r", "P" * 22), headers={**AUTH, **FRAG, "If-Match": etag}
    )
    assert r.status_code == 200, r.text
    assert viewer.subscriber_leg is not None
    assert viewer.subscriber_leg.transport.remote_ufrag == "vw2r"


def test_viewer_codec_matches_format_not_number() -> None:
    offer = sdpmod.parse_sdp(fixture_sdp("chrome_offer.sdp"))
    video = offer.media[1]
    h264 = next(
        c
        for c in video.codecs
        if c.name == "H264"
        and (c.param("profile-level-id") or "").startswith("42e0")
        and c.param("packetization-mode") == "1"
    )
    published = dataclasses.replace(h264, payload_type=100, fmtp=dict(h264.fmtp))
    published.fmtp["profile-level-id"] = "42e01f"
    chosen = sdpmod.viewer_codec(video, published, {"nack", "transport-cc"})
    assert chosen is not None and chosen.name == "H264"
    assert chosen.param("packetization-mode") == "1"
    assert set(chosen.rtcp_fb) <= {"nack", "transport-cc"}
    # another profile is another format: never the Constrained Baseline one
    high = dataclasses.replace(published, fmtp={**published.fmtp, "profile-level-id": "640c1f"})
    other = sdpmod.viewer_codec(video, high)
    assert other is None or (other.param("profile-level-id") or "").startswith("64")
    opus = offer.media[0].codecs[0]
    assert sdpmod.viewer_codec(video, opus) is None
