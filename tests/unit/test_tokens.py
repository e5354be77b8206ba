"""Participant tokens (HS256 JWT), what they may call, and the demo page with its
development token endpoint."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.api.auth import TokenAuthenticator
from relay.api.demo import CONTENT_SECURITY_POLICY, host_of
from relay.api.errors import Unauthorized
from relay.api.tokens import (
    MAX_TOKEN_LENGTH,
    ExpiredToken,
    InvalidToken,
    decode_token,
    encode_token,
)
from relay.config import (
    AuthSettings,
    DemoSettings,
    Settings,
    load_settings,
    settings_as_dict,
)
from relay.sfu.events import ParticipantLeft
from tests.unit.test_api import AUTH, World, aiortc_answer, assert_error, fixture_sdp

SECRET = "0123456789abcdef0123456789abcdef-test"
NOW = 1_800_000_000.0
STATIC = Path(__file__).resolve().parents[2] / "relay" / "static"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(header: dict[str, Any] | str, claims: dict[str, Any] | str, secret: str = SECRET) -> str:
    """A JWT made by hand, the way any JWT library would make it."""
    h = header if isinstance(header, str) else json.dumps(header)
    c = claims if isinstance(claims, str) else json.dumps(claims)
    signing_input = f"{b64(h.encode())}.{b64(c.encode())}"
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def claims(**overrides: Any) -> dict[str, Any]:
    base = {
        "room": "r1",
        "sub": "alice",
        "can_publish": True,
        "can_subscribe": True,
        "exp": NOW + 60,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


HS256 = {"alg": "HS256", "typ": "JWT"}


# --------------------------------------------------------------------------------------------
# The token format


def test_round_trip() -> None:
    token = encode_token(
        "r1", "alice", secret=SECRET, expires_at=NOW + 60, can_publish=False, can_subscribe=True
    )
    decoded = decode_token(token, SECRET, NOW)
    assert decoded.room_id == "r1" and decoded.participant_id == "alice"
    assert decoded.can_publish is False and decoded.can_subscribe is True
    assert decoded.expires_at == NOW + 60
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "HS256", "typ": "JWT"}


def test_tokens_from_other_jwt_libraries_are_accepted() -> None:
    # Member order, spacing, no "typ", and claims the relay does not use are all fine.
    token = sign('{"typ": "JWT",\n "alg": "HS256"}', claims(iat=NOW - 5, iss="signaling"))
    assert decode_token(token, SECRET, NOW).participant_id == "alice"
    assert decode_token(sign({"alg": "HS256"}, claims()), SECRET, NOW).room_id == "r1"
    assert decode_token(sign(HS256, claims(exp=int(NOW) + 1)), SECRET, NOW).expires_at == NOW + 1


def test_expired_and_not_yet_valid() -> None:
    with pytest.raises(ExpiredToken, match="expired"):
        decode_token(sign(HS256, claims(exp=NOW)), SECRET, NOW)
    with pytest.raises(ExpiredToken, match="expired"):
        decode_token(sign(HS256, claims(exp=NOW - 3600)), SECRET, NOW)
    with pytest.raises(ExpiredToken, match="nbf"):
        decode_token(sign(HS256, claims(nbf=NOW + 10)), SECRET, NOW)
    assert decode_token(sign(HS256, claims(nbf=NOW)), SECRET, NOW)


def test_forged_tokens() -> None:
    genuine = sign(HS256, claims())
    with pytest.raises(InvalidToken, match="signature"):
        decode_token(genuine, SECRET + "x", NOW)
    with pytest.raises(InvalidToken, match="signature"):
        decode_token(sign(HS256, claims(), secret="another-secret-another-secret-32"), SECRET, NOW)
    header, _, signature = genuine.split(".")
    elevated = b64(json.dumps(claims(room="r2")).encode())
    with pytest.raises(InvalidToken, match="signature"):
        decode_token(f"{header}.{elevated}.{signature}", SECRET, NOW)
    with pytest.raises(InvalidToken):
        decode_token(f"{header}.{elevated}.", SECRET, NOW)


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "none", "typ": "JWT"},
        {"alg": "None"},
        {"alg": "HS512"},
        {"alg": "RS256"},
        {"alg": "hs256"},
        {"typ": "JWT"},
        {"alg": ["HS256"]},
    ],
)
def test_only_hs256(header: dict[str, Any]) -> None:
    with pytest.raises(InvalidToken, match="algorithm"):
        decode_token(sign(header, claims()), SECRET, NOW)
    unsigned = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims()).encode())}."
    with pytest.raises(InvalidToken):
        decode_token(unsigned, SECRET, NOW)


def test_unusual_headers() -> None:
    with pytest.raises(InvalidToken, match="type"):
        decode_token(sign({"alg": "HS256", "typ": "JOSE+JSON"}, claims()), SECRET, NOW)
    with pytest.raises(InvalidToken, match="critical"):
        decode_token(sign({"alg": "HS256", "crit": ["exp"]}, claims()), SECRET, NOW)


@pytest.mark.parametrize("missing", ["room", "sub", "can_publish", "can_subscribe", "exp"])
def test_every_claim_is_required(missing: str) -> None:
    with pytest.raises(InvalidToken, match=f"missing claim '{missing}'"):
        decode_token(sign(HS256, claims(**{missing: ...})), SECRET, NOW)


@pytest.mark.parametrize(
    "bad",
    [
        {"room": "bad room"},
        {"room": ""},
        {"room": "x" * 65},
        {"room": 7},
        {"sub": None},
        {"sub": "alice/../bob"},
        {"can_publish": "true"},
        {"can_subscribe": 1},
        {"exp": "1800000060"},
        {"exp": True},
        {"exp": None},
        {"nbf": "soon"},
    ],
)
def test_claim_types(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidToken):
        decode_token(sign(HS256, claims(**bad)), SECRET, NOW)


def test_non_finite_numbers_are_refused() -> None:
    token = sign(HS256, json.dumps(claims()).replace(str(NOW + 60), "Infinity"))
    with pytest.raises(InvalidToken, match="constant"):
        decode_token(token, SECRET, NOW)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "eyJ!.e30.AAAA",
        "eyJhbGciOiJIUzI1NiJ9=.e30.AAAA",
        "a.b.c",
        "e30.e30.A",
    ],
)
def test_malformed(token: str) -> None:
    with pytest.raises(InvalidToken):
        decode_token(token, SECRET, NOW)


def test_payload_must_be_one_json_object() -> None:
    for payload in ('["room"]', '"alice"', "{not json", '{"room": "r1", "room": "r2"}'):
        with pytest.raises(InvalidToken):
            decode_token(sign(HS256, payload), SECRET, NOW)
    with pytest.raises(InvalidToken):
        decode_token(sign(HS256, claims()).replace(".", ".\xff", 1), SECRET, NOW)


def test_each_token_has_one_spelling() -> None:
    token = sign(HS256, claims())
    header, payload, signature = token.split(".")
    # The last base64url character of a 32-byte MAC carries 2 spare bits.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    index = alphabet.index(signature[-1])
    twin = signature[:-1] + alphabet[index ^ 1]
    assert base64.urlsafe_b64decode(twin + "=") == base64.urlsafe_b64decode(signature + "=")
    with pytest.raises(InvalidToken, match="malformed"):
        decode_token(f"{header}.{payload}.{twin}", SECRET, NOW)


def test_overlong_tokens_are_refused_before_decoding() -> None:
    with pytest.raises(InvalidToken, match="too long"):
        decode_token("a." + "b" * MAX_TOKEN_LENGTH + ".c", SECRET, NOW)


def test_no_secret_no_tokens() -> None:
    with pytest.raises(InvalidToken, match="not enabled"):
        decode_token(sign(HS256, claims()), "", NOW)
    with pytest.raises(ValueError):
        encode_token("r1", "alice", secret="", expires_at=NOW)
    with pytest.raises(ValueError):
        TokenAuthenticator("")
    with pytest.raises(ValueError):
        encode_token("bad room", "alice", secret=SECRET, expires_at=NOW)


def test_authenticator_leaves_other_credentials_to_the_chain() -> None:
    authenticator = TokenAuthenticator(SECRET, clock=lambda: NOW)
    assert authenticator.authenticate("devkey") is None
    principal = authenticator.authenticate(sign(HS256, claims(can_subscribe=False)))
    assert principal is not None
    assert (principal.room_id, principal.participant_id) == ("r1", "alice")
    assert principal.can_publish and not principal.can_subscribe and not principal.can_read_room
    assert not principal.is_admin
    assert "ey" not in principal.subject  # never the credential itself
    with pytest.raises(Unauthorized, match="expired"):
        authenticator.authenticate(sign(HS256, claims(exp=NOW - 1)))


# --------------------------------------------------------------------------------------------
# What a participant token may call


def token_settings(**demo: Any) -> Settings:
    settings = Settings()
    return dataclasses.replace(
        settings,
        auth=AuthSettings(token_secret=SECRET),
        demo=dataclasses.replace(settings.demo, **demo),
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def token_for(participant: str = "alice", room: str = "r1", **flags: Any) -> dict[str, str]:
    return bearer(
        encode_token(room, participant, secret=SECRET, expires_at=time.time() + 60, **flags)
    )


async def make_room(client: httpx.AsyncClient, *participants: str, room: str = "r1") -> None:
    assert (await client.post("/v1/rooms", json={"room_id": room}, headers=AUTH)).status_code == 201
    for pid in participants:
        r = await client.post(
            f"/v1/rooms/{room}/participants", json={"participant_id": pid}, headers=AUTH
        )
        assert r.status_code == 201, r.text


async def test_a_token_drives_its_own_participant() -> None:
    world = World(token_settings(enabled=False))
    alice = token_for("alice")
    base = "/v1/rooms/r1/participants/alice"
    async with world.client() as client:
        await make_room(client, "alice", "bob")
        r = await client.post(
            f"{base}/publisher",
            json={"type": "offer", "sdp": fixture_sdp("chrome_offer.sdp")},
            headers=alice,
        )
        assert r.status_code == 200, r.text
        assert "a=ice-lite" in r.json()["sdp"]
        bob = token_for("bob")
        r = await client.post("/v1/rooms/r1/participants/bob/subscriber", headers=bob)
        assert r.status_code == 200, r.text
        offer = r.json()
        r = await client.put(
            "/v1/rooms/r1/participants/bob/subscriber",
            json={
                "type": "answer",
                "sdp": await aiortc_answer(offer["sdp"]),
                "revision": offer["revision"],
            },
            headers=bob,
        )
        assert r.status_code == 204, r.text
        assert (await client.get(f"{base}/stats", headers=alice)).status_code == 200
        assert (await client.get(base, headers=alice)).json()["participant_id"] == "alice"
        r = await client.delete(base, params={"reason": "left"}, headers=alice)
        assert r.status_code == 204
        left = [e for e in world.events if isinstance(e, ParticipantLeft)]
        assert left[-1].participant_id == "alice" and left[-1].reason == "left"


async def test_a_token_reads_its_rooms_events() -> None:
    world = World(token_settings(enabled=False))
    async with world.client() as client:
        await make_room(client, "alice")
        await make_room(client, room="r2")
        alice = token_for("alice")
        # This transport returns a response only once the stream ends: end it with close().
        stream = asyncio.create_task(
            client.get("/v1/events", params={"room_id": "r1"}, headers=alice)
        )
        while world.bus.subscriber_count == 0:
            await asyncio.sleep(0.01)
        r = await client.delete(
            "/v1/rooms/r1/participants/alice", params={"reason": "left"}, headers=alice
        )
        assert r.status_code == 204
        world.bus.close()
        response = await asyncio.wait_for(stream, 5)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "event: participant.left" in response.text
        for params in ({}, {"room_id": "r2"}):
            r = await client.get("/v1/events", params=params, headers=alice)
            assert_error(r, 403)
        # Never in the URL: a token in the query string is not a credential.
        r = await client.get(
            "/v1/events", params={"room_id": "r1", "token": alice["Authorization"][7:]}
        )
        assert_error(r, 401)


async def test_everything_else_is_forbidden() -> None:
    world = World(token_settings(enabled=False))
    alice = token_for("alice")
    async with world.client() as client:
        await make_room(client, "alice", "bob")
        await make_room(client, "alice", room="r2")
        forbidden = [
            ("GET", "/v1/rooms", None),
            ("POST", "/v1/rooms", {"room_id": "x"}),
            ("GET", "/v1/rooms/r1", None),
            ("DELETE", "/v1/rooms/r1", None),
            ("POST", "/v1/rooms/r1/participants", {"participant_id": "mallory"}),
            ("GET", "/v1/rooms/r1/participants/bob", None),
            ("DELETE", "/v1/rooms/r1/participants/bob", None),
            ("GET", "/v1/rooms/r1/participants/bob/stats", None),
            ("POST", "/v1/rooms/r1/participants/bob/subscriber", None),
            ("POST", "/v1/rooms/r1/participants/bob/publisher", {"type": "offer", "sdp": "v=0"}),
            ("PUT", "/v1/rooms/r1/participants/bob/subscriber", None),
            ("DELETE", "/v1/rooms/r1/participants/alice", None),  # kicking is for API keys
            # the same participant id in another room is another participant
            ("GET", "/v1/rooms/r2/participants/alice", None),
            ("POST", "/v1/rooms/r2/participants/alice/subscriber", None),
        ]
        for method, path, body in forbidden:
            r = await client.request(method, path, json=body, headers=alice)
            assert_error(r, 403)
        for room in ("r1", "r2"):
            assert (await client.get(f"/v1/rooms/{room}", headers=AUTH)).status_code == 200


async def test_flags_limit_publishing_and_subscribing() -> None:
    world = World(token_settings(enabled=False))
    base = "/v1/rooms/r1/participants/alice"
    async with world.client() as client:
        await make_room(client, "alice")
        listener = token_for("alice", can_publish=False)
        offer = {"type": "offer", "sdp": fixture_sdp("chrome_offer.sdp")}
        r = await client.post(f"{base}/publisher", json=offer, headers=listener)
        assert "can_publish" in assert_error(r, 403)["message"]
        assert (await client.post(f"{base}/subscriber", headers=listener)).status_code == 200
        talker = token_for("alice", can_subscribe=False)
        assert (
            await client.post(f"{base}/publisher", json=offer, headers=talker)
        ).status_code == 200
        for method in ("POST", "PUT"):
            body = {"type": "answer", "sdp": "v=0", "revision": 0} if method == "PUT" else None
            r = await client.request(method, f"{base}/subscriber", json=body, headers=talker)
            assert "can_subscribe" in assert_error(r, 403)["message"]


async def test_expired_and_forged_tokens_are_401() -> None:
    world = World(token_settings(enabled=False))
    base = "/v1/rooms/r1/participants/alice"
    expired = bearer(encode_token("r1", "alice", secret=SECRET, expires_at=time.time() - 1))
    forged = bearer(sign(HS256, claims(exp=time.time() + 60), secret="x" * 40))
    none_header = b64(b'{"alg":"none"}')
    unsigned = bearer(f"{none_header}.{b64(json.dumps(claims(exp=time.time() + 60)).encode())}.")
    async with world.client() as client:
        await make_room(client, "alice")
        for headers, fragment in ((expired, "expired"), (forged, "signature"), (unsigned, "alg")):
            for method, path in (
                ("GET", base),
                ("POST", f"{base}/subscriber"),
                ("GET", f"{base}/stats"),
                ("GET", "/v1/events?room_id=r1"),
                ("GET", "/v1/rooms"),
            ):
                r = await client.request(method, path, headers=headers)
                error = assert_error(r, 401, "unauthorized")
                assert fragment in error["message"]
                assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        # Schema errors are not revealed to a caller with a bad token.
        r = await client.post(f"{base}/publisher", content=b"{nope", headers=expired)
        assert_error(r, 401)


async def test_tokens_are_refused_when_no_secret_is_configured() -> None:
    settings = dataclasses.replace(Settings(), demo=DemoSettings(enabled=False))
    world = World(settings)
    async with world.client() as client:
        await make_room(client, "alice")
        r = await client.get("/v1/rooms/r1/participants/alice", headers=token_for("alice"))
        error = assert_error(r, 401, "unauthorized")
        assert error["message"] == "invalid credentials"


async def test_openapi_documents_participant_tokens() -> None:
    world = World(token_settings())
    async with world.client() as client:
        document = (await client.get("/openapi.json")).json()
    assert "Participant token" in document["info"]["description"]
    scheme = document["components"]["securitySchemes"]["HTTPBearer"]
    assert "participant token" in scheme["description"] and "HS256" in scheme["description"]
    stream = document["paths"]["/v1/events"]["get"]
    assert "403" in stream["responses"]
    assert "/demo/token" in document["paths"]  # the API is on loopback and the demo is on
    assert "/demo" not in document["paths"]


# --------------------------------------------------------------------------------------------
# The demo page and the development token endpoint


def local_client(world: World, client: tuple[str, int] = ("127.0.0.1", 50000)) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=world.app, client=client)
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080")


async def test_demo_page_is_served_with_a_strict_policy() -> None:
    world = World(Settings())
    async with local_client(world) as client:
        r = await client.get("/demo")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert "script-src 'self'" in CONTENT_SECURITY_POLICY
        assert r.headers["x-content-type-options"] == "nosniff"
        assert '<script src="/demo/demo.js"' in r.text
        for name, kind in (
            ("demo.js", "text/javascript"),
            ("demo-e2ee.js", "text/javascript"),
            ("demo.css", "text/css"),
        ):
            asset = await client.get(f"/demo/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
            assert asset.content == (STATIC / name).read_bytes()
        assert_error(await client.get("/demo/relay.toml"), 404)
        assert_error(await client.get("/demo/../config.py"), 404)


def test_demo_files_load_nothing_from_elsewhere() -> None:
    names = sorted(p.name for p in STATIC.iterdir())
    assert names == ["demo-e2ee.js", "demo.css", "demo.html", "demo.js", "whip.html", "whip.js"]
    for path in STATIC.iterdir():
        text = path.read_text(encoding="utf-8")
        for url in re.findall(r"""(?:https?:)?//[A-Za-z0-9.\[\]:-]+""", text):
            assert re.match(r"^http://(127\.0\.0\.1|localhost|\[::1\])", url) or url in ("//",), (
                f"{path.name} refers to {url}"
            )
        assert "import(" not in text and "<iframe" not in text
    for page in ("demo.html", "whip.html"):
        html = (STATIC / page).read_text()
        assert "<script>" not in html and "style=" not in html  # nothing inline: CSP allows 'self'


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.parametrize("name", ["demo.js", "demo-e2ee.js", "whip.js"])
def test_demo_script_parses(name: str) -> None:
    result = subprocess.run(
        ["node", "--check", str(STATIC / name)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


async def test_development_token_joins_a_room() -> None:
    world = World(Settings())
    async with local_client(world) as client:
        r = await client.post("/demo/token", json={"room_id": "standup"})
        assert r.status_code == 201, r.text
        first = r.json()
        assert first["room_id"] == "standup" and first["participant_id"].startswith("PA_")
        assert first["expires_at"] > time.time() + 3600
        r = await client.post(
            "/demo/token",
            json={"room_id": "standup", "participant_id": "bob", "can_publish": False},
        )
        assert r.status_code == 201
        bob = r.json()
        room = world.sfu.get_room("standup")
        assert sorted(room.participants) == sorted([first["participant_id"], "bob"])
        assert room.participants["bob"].can_publish is False
        # The token works for that participant's own endpoints, and only those.
        base = "/v1/rooms/standup/participants/bob"
        r = await client.post(f"{base}/subscriber", headers=bearer(bob["token"]))
        assert r.status_code == 200
        r = await client.post(
            f"{base}/publisher",
            json={"type": "offer", "sdp": fixture_sdp("chrome_offer.sdp")},
            headers=bearer(bob["token"]),
        )
        assert_error(r, 403)
        r = await client.get("/v1/rooms/standup", headers=bearer(bob["token"]))
        assert_error(r, 403)
        r = await client.post("/demo/token", json={"room_id": "standup", "participant_id": "bob"})
        assert_error(r, 409)
        for body in ({}, {"room_id": "bad room"}, {"room_id": "r", "admin": True}):
            assert_error(await client.post("/demo/token", json=body), 422)


async def test_development_token_for_an_end_to_end_encrypted_call() -> None:
    """With ``e2ee`` (a page with a passphrase) the room it creates requires end-to-end
    encryption and the participant and its token are e2ee; a page without it is told the room
    requires it; an e2ee page cannot join a room that exists without end-to-end encryption."""
    world = World(token_settings())
    async with local_client(world) as client:
        r = await client.post("/demo/token", json={"room_id": "secret", "e2ee": True})
        assert r.status_code == 201, r.text
        joined = r.json()
        assert joined["e2ee_required"] is True
        assert decode_token(joined["token"], SECRET, time.time()).e2ee is True
        room = world.sfu.get_room("secret")
        assert room.e2ee_required is True
        assert room.participants[joined["participant_id"]].e2ee is True
        r = await client.post("/demo/token", json={"room_id": "secret", "participant_id": "p"})
        assert r.status_code == 201, r.text
        plain = r.json()
        assert plain["e2ee_required"] is True
        assert decode_token(plain["token"], SECRET, time.time()).e2ee is False
        assert room.participants["p"].e2ee is False
        r = await client.post("/demo/token", json={"room_id": "open"})
        assert r.json()["e2ee_required"] is False
        r = await client.post("/demo/token", json={"room_id": "open", "e2ee": True})
        assert_error(r, 409)
        assert r.json()["error"]["code"] == "room_not_e2ee"
        assert len(world.sfu.get_room("open").participants) == 1


async def test_development_tokens_use_the_configured_secret() -> None:
    world = World(token_settings())
    async with local_client(world) as client:
        token = (await client.post("/demo/token", json={"room_id": "r1"})).json()["token"]
    assert decode_token(token, SECRET, time.time()).room_id == "r1"


async def test_without_a_configured_secret_a_per_process_one_signs_development_tokens() -> None:
    world = World(Settings())
    async with local_client(world) as client:
        joined = (await client.post("/demo/token", json={"room_id": "r1"})).json()
        token, participant = joined["token"], joined["participant_id"]
        with pytest.raises(InvalidToken):
            decode_token(token, SECRET, time.time())
        base = f"/v1/rooms/r1/participants/{participant}"
        assert (await client.post(f"{base}/subscriber", headers=bearer(token))).status_code == 200
    other = World(Settings())
    async with local_client(other) as client:
        await make_room(client, participant)
        assert_error(await client.get(base, headers=bearer(token)), 401)  # another secret


@pytest.mark.parametrize(
    ("client", "headers"),
    [
        (("192.0.2.7", 50000), {}),
        (("127.0.0.1", 50000), {"Host": "relay.example.com"}),
        (("127.0.0.1", 50000), {"Host": "evil.example:8080"}),
        (("127.0.0.1", 50000), {"X-Forwarded-For": "198.51.100.4"}),
        (("127.0.0.1", 50000), {"Forwarded": "for=198.51.100.4"}),
        (("127.0.0.1", 50000), {"X-Real-IP": "198.51.100.4"}),
        (("127.0.0.1", 50000), {"Sec-Fetch-Site": "cross-site"}),
        (("127.0.0.1", 50000), {"Sec-Fetch-Site": "same-site"}),
    ],
)
async def test_development_tokens_only_for_this_machine(
    client: tuple[str, int], headers: dict[str, str]
) -> None:
    world = World(Settings())
    async with local_client(world, client) as http:
        r = await http.post("/demo/token", json={"room_id": "r1"}, headers=headers)
        assert_error(r, 403)
    assert world.sfu.list_rooms() == []


async def test_development_tokens_for_the_relays_own_page() -> None:
    world = World(Settings())
    async with local_client(world) as http:
        for headers in ({"Sec-Fetch-Site": "same-origin"}, {"Host": "localhost:8080"}, {}):
            r = await http.post("/demo/token", json={"room_id": "r1"}, headers=headers)
            assert r.status_code == 201, (headers, r.text)


async def test_no_development_tokens_off_loopback() -> None:
    settings = Settings()
    settings = dataclasses.replace(
        settings, api=dataclasses.replace(settings.api, host="0.0.0.0", keys=("k",))
    )
    world = World(settings)
    async with local_client(world) as client:
        assert (await client.get("/demo")).status_code == 200
        assert_error(await client.post("/demo/token", json={"room_id": "r1"}), 404)
        assert "/demo/token" not in (await client.get("/openapi.json")).json()["paths"]
        # and without a configured secret, no participant tokens at all
        r = await client.get("/v1/rooms/r1", headers=token_for("alice"))
        assert_error(r, 401)


async def test_demo_off() -> None:
    world = World(dataclasses.replace(Settings(), demo=DemoSettings(enabled=False)))
    async with local_client(world) as client:
        for path in ("/demo", "/demo/demo.js", "/demo/demo.css"):
            assert_error(await client.get(path), 404)
        assert_error(await client.post("/demo/token", json={"room_id": "r1"}), 404)


@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("127.0.0.1:8080", "127.0.0.1"),
        ("localhost", "localhost"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("relay.example.com:443", "relay.example.com"),
        ("::1", "::1"),
    ],
)
def test_host_of(header: str, host: str) -> None:
    assert host_of(header) == host


# --------------------------------------------------------------------------------------------
# Configuration


def test_auth_and_demo_settings() -> None:
    settings = load_settings(None, {"RELAY_AUTH__TOKEN_SECRET": SECRET, "RELAY_DEMO__ENABLED": "0"})
    assert settings.auth.token_secret == SECRET
    assert settings.demo.enabled is False
    assert settings_as_dict(settings)["auth"]["token_secret"] == f"<redacted {len(SECRET)} chars>"
    assert SECRET not in repr(settings_as_dict(settings))


def test_production_config_has_no_demo_and_reads_the_secret_from_the_environment() -> None:
    environ = {"RELAY_API__KEYS": "k1"}
    settings = load_settings(CONFIGS / "production.toml", environ)
    assert settings.demo.enabled is False
    assert settings.auth.token_secret == ""
    environ["RELAY_AUTH__TOKEN_SECRET"] = SECRET
    assert load_settings(CONFIGS / "production.toml", environ).auth.token_secret == SECRET
    default = load_settings(CONFIGS / "default.toml", {})
    assert default.demo.enabled is True and default.auth.token_secret == ""
