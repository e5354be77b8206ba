"""The HTTP control API (docs/api.md) against the real SFU core, in process."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.api.app import create_app
from relay.api.auth import ApiKeyAuthenticator, Principal
from relay.api.events import EventBus
from relay.config import Settings
from relay.metrics import Metrics
from relay.rtc.dtls import Certificate
from relay.sfu.errors import BadRequest
from relay.sfu.events import (
    EVENT_TYPES,
    Event,
    ParticipantLeft,
    RoomClosed,
    SubscriberRenegotiate,
)
from relay.sfu.leg import CallbackSender
from relay.sfu.sfu import Sfu

KEY = "devkey"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROOT = Path(__file__).resolve().parents[2]
SDP_DIR = ROOT / "tests" / "fixtures" / "sdp"
P = "/v1/rooms/r1/participants/alice"

# Every route of the control API (docs/api.md): (method, path template).
ROUTES = [
    ("POST", "/v1/rooms"),
    ("GET", "/v1/rooms"),
    ("GET", "/v1/rooms/{room_id}"),
    ("DELETE", "/v1/rooms/{room_id}"),
    ("POST", "/v1/rooms/{room_id}/participants"),
    ("GET", "/v1/rooms/{room_id}/participants/{participant_id}"),
    ("DELETE", "/v1/rooms/{room_id}/participants/{participant_id}"),
    ("POST", "/v1/rooms/{room_id}/participants/{participant_id}/publisher"),
    ("POST", "/v1/rooms/{room_id}/participants/{participant_id}/subscriber"),
    ("PUT", "/v1/rooms/{room_id}/participants/{participant_id}/subscriber"),
    ("PUT", "/v1/rooms/{room_id}/participants/{participant_id}/subscriptions/{track_id}"),
    ("GET", "/v1/rooms/{room_id}/participants/{participant_id}/stats"),
    ("POST", "/v1/rooms/{room_id}/participants/{participant_id}/tracks/{track_id}/mute"),
    ("POST", "/v1/rooms/{room_id}/participants/{participant_id}/tracks/{track_id}/unmute"),
    ("POST", "/v1/rooms/{room_id}/recordings"),
    ("PUT", "/v1/rooms/{room_id}/participants/{participant_id}/consent"),
    ("GET", "/v1/recordings"),
    ("GET", "/v1/recordings/{recording_id}"),
    ("POST", "/v1/recordings/{recording_id}/stop"),
    ("DELETE", "/v1/recordings/{recording_id}"),
    ("GET", "/v1/events"),
    ("GET", "/v1/workers"),
]
BODIES: dict[tuple[str, str], Any] = {
    ("PUT", "/v1/rooms/{room_id}/participants/{participant_id}/subscriptions/{track_id}"): {
        "paused": True
    },
    ("POST", "/v1/rooms"): {"room_id": "r9"},
    ("POST", "/v1/rooms/{room_id}/participants"): {"participant_id": "p9"},
    ("POST", "/v1/rooms/{room_id}/participants/{participant_id}/publisher"): {
        "type": "offer",
        "sdp": "v=0\r\n",
    },
    ("PUT", "/v1/rooms/{room_id}/participants/{participant_id}/subscriber"): {
        "type": "answer",
        "sdp": "v=0\r\n",
        "revision": 1,
    },
}


def fixture_sdp(name: str) -> str:
    return (SDP_DIR / name).read_text()


def make_settings(**api: Any) -> Settings:
    settings = Settings()
    return dataclasses.replace(settings, api=dataclasses.replace(settings.api, **api))


class World:
    """A real SFU core, its event bus and the app around them."""

    def __init__(self, settings: Settings, **app_options: Any) -> None:
        self.settings = settings
        self.bus = EventBus(settings)
        #: every event the core emitted, in order
        self.events: list[Event] = []
        self.metrics = Metrics()
        self.sfu = Sfu(
            settings,
            certificate=CERTIFICATE,
            candidates=[("127.0.0.1", 40000)],
            sender=CallbackSender(lambda data, addr: None),
            clock=time.monotonic,
            emit=self.emit,
            metrics=self.metrics,
        )
        self.app = create_app(self.sfu, settings, self.bus, self.metrics, **app_options)

    def emit(self, event: Event) -> None:
        """The core's event callback: records the event and publishes it."""
        self.events.append(event)
        self.bus.publish(event)

    def client(self, **options: Any) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app, **options)
        return httpx.AsyncClient(transport=transport, base_url="http://relay")


CERTIFICATE = Certificate.generate()


@pytest.fixture
def world() -> World:
    return World(make_settings(max_body_bytes=16384))


@pytest.fixture
async def client(world: World) -> AsyncIterator[httpx.AsyncClient]:
    async with world.client() as c:
        yield c


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


async def setup_room(client: httpx.AsyncClient, *participants: str, room: str = "r1") -> None:
    r = await client.post("/v1/rooms", json={"room_id": room}, headers=AUTH)
    assert r.status_code == 201, r.text
    for pid in participants:
        r = await client.post(
            f"/v1/rooms/{room}/participants", json={"participant_id": pid}, headers=AUTH
        )
        assert r.status_code == 201, r.text


# --------------------------------------------------------------------------------------------
# Health, metrics, documentation


async def test_healthz_readyz_metrics(world: World, client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = await client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    await setup_room(client, "alice")
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert re.search(r"^relay_rooms 1$", r.text, re.M)
    assert re.search(r"^relay_participants 1$", r.text, re.M)


async def test_openapi_documents_every_route(client: httpx.AsyncClient) -> None:
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    document = r.json()
    assert document["info"]["title"] == "relay control API"
    paths = document["paths"]
    for method, path in ROUTES:
        assert method.lower() in paths.get(path, {}), (method, path)
        operation = paths[path][method.lower()]
        assert operation["responses"]["401"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }
    for path in ("/healthz", "/readyz", "/metrics"):
        assert "get" in paths[path]
    schemas = document["components"]["schemas"]
    assert {"RoomInfo", "ParticipantInfo", "TrackInfo", "ErrorResponse", "CreateRoom"} <= set(
        schemas
    )
    assert "docs/api.md" in document["info"]["description"]
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    room_post = paths["/v1/rooms"]["post"]
    assert "201" in room_post["responses"] and "409" in room_post["responses"]
    put = paths["/v1/rooms/{room_id}/participants/{participant_id}/subscriber"]["put"]
    assert "204" in put["responses"] and "409" in put["responses"]
    r = await client.get("/docs")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]


# --------------------------------------------------------------------------------------------
# Authentication


BAD_CREDENTIALS = [
    {},
    {"Authorization": "Bearer wrongkey"},
    {"Authorization": "Bearer devke"},
    {"Authorization": "Bearer devkeyy"},
    {"Authorization": "Bearer "},
    {"Authorization": "Basic devkey"},
    {"Authorization": "devkey"},
    {"Authorization": "Bearer d\xe9vkey".encode("latin-1")},
]


@pytest.mark.parametrize(("method", "template"), ROUTES)
async def test_every_v1_route_requires_a_key(
    world: World, client: httpx.AsyncClient, method: str, template: str
) -> None:
    await setup_room(client, "alice")
    path = template.format(
        room_id="r1", participant_id="alice", track_id="TR_1", recording_id="rec_1"
    )
    body = BODIES.get((method, template))
    for headers in BAD_CREDENTIALS:
        r = await client.request(method, path, json=body, headers=headers)
        error = assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
        assert KEY not in error["message"]
        # Even a malformed body or parameter is answered with 401 first.
        r = await client.request(
            method,
            path.replace("r1", "bad%20id"),
            content=b"{nope",
            headers={**headers, "content-type": "application/json"},
        )
        assert_error(r, 401, "unauthorized")
    assert [room.room_id for room in world.sfu.list_rooms()] == ["r1"]
    assert world.sfu.get_participant("r1", "alice") is not None


async def test_any_configured_key_works() -> None:
    world = World(make_settings(keys=("first", "second")))
    async with world.client() as client:
        for key in ("first", "second"):
            r = await client.get("/v1/rooms", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200
        r = await client.get("/v1/rooms", headers=AUTH)
        assert_error(r, 401, "unauthorized")


async def test_health_and_metrics_need_no_key(client: httpx.AsyncClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert (await client.get(path)).status_code == 200


class RoomToken:
    """A test authenticator: the token ``alice-token`` stands for alice in room r1."""

    def authenticate(self, token: str) -> Principal | None:
        if token == "alice-token":
            return Principal("participant", "alice", room_id="r1", participant_id="alice")
        return None


async def test_participant_principals_are_limited_to_their_own_endpoints() -> None:
    settings = make_settings()
    world = World(settings, authenticators=[ApiKeyAuthenticator(settings.api.keys), RoomToken()])
    token = {"Authorization": "Bearer alice-token"}
    async with world.client() as client:
        await setup_room(client, "alice", "bob")
        assert (await client.get(P, headers=token)).status_code == 200
        assert (await client.get(f"{P}/stats", headers=token)).status_code == 200
        assert (await client.post(f"{P}/subscriber", headers=token)).status_code == 200
        assert (await client.get("/v1/rooms/r1", headers=token)).status_code == 200
        forbidden = [
            ("GET", "/v1/rooms/r1/participants/bob", None),
            ("POST", "/v1/rooms/r1/participants/bob/subscriber", None),
            ("GET", "/v1/rooms", None),
            ("POST", "/v1/rooms", {"room_id": "x"}),
            ("DELETE", "/v1/rooms/r1", None),
            ("POST", "/v1/rooms/r1/participants", {}),
            ("DELETE", P, None),  # kicking is for the API key only
            ("GET", "/v1/events", None),
        ]
        for method, path, body in forbidden:
            r = await client.request(method, path, json=body, headers=token)
            assert_error(r, 403)
        r = await client.delete(P, params={"reason": "left"}, headers=token)
        assert r.status_code == 204
        assert (await client.get("/v1/rooms", headers=AUTH)).status_code == 200


# --------------------------------------------------------------------------------------------
# Rooms


async def test_room_lifecycle(world: World, client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/rooms",
        json={"room_id": "r1", "max_participants": 4, "e2ee_required": True, "empty_timeout": 30},
        headers=AUTH,
    )
    assert r.status_code == 201
    room = r.json()
    assert room["room_id"] == "r1" and room["participants"] == []
    assert room["max_participants"] == 4 and room["e2ee_required"] is True
    assert abs(room["created_at"] - time.time()) < 60

    r = await client.post("/v1/rooms", json={"room_id": "r1"}, headers=AUTH)
    assert_error(r, 409, "room_exists")

    r = await client.post("/v1/rooms", headers=AUTH)  # no body at all
    assert r.status_code == 201
    generated = r.json()["room_id"]
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", generated)
    r = await client.post("/v1/rooms", json={}, headers=AUTH)
    assert r.status_code == 201
    assert r.json()["max_participants"] == world.settings.rooms.default_max_participants

    r = await client.get("/v1/rooms/r1", headers=AUTH)
    assert r.status_code == 200 and r.json() == room
    r = await client.get("/v1/rooms", headers=AUTH)
    assert r.status_code == 200
    listed = {x["room_id"] for x in r.json()["rooms"]}
    assert len(listed) == 3 and {"r1", generated} <= listed

    r = await client.delete("/v1/rooms/r1", headers=AUTH)
    assert r.status_code == 204 and r.content == b""
    assert_error(await client.get("/v1/rooms/r1", headers=AUTH), 404, "room_not_found")
    assert_error(await client.delete("/v1/rooms/r1", headers=AUTH), 404, "room_not_found")
    assert world.events[-1] == RoomClosed("r1", world.events[-1].at)


async def test_room_field_checks(client: httpx.AsyncClient) -> None:
    bad_bodies = [
        {"room_id": ""},
        {"room_id": "x" * 65},
        {"room_id": "a b"},
        {"room_id": "a/b"},
        {"room_id": "héllo"},
        {"room_id": 5},
        {"max_participants": 0},
        {"max_participants": "4"},
        {"max_participants": 2.5},
        {"e2ee_required": "yes"},
        {"empty_timeout": 0},
        {"empty_timeout": -1},
        {"unknown_field": 1},
        [],
        "r1",
        None,
    ]
    for body in bad_bodies:
        r = await client.post("/v1/rooms", json=body, headers=AUTH)
        if body is None:  # "null" is an absent body
            assert r.status_code == 201
            continue
        error = assert_error(r, 422, "invalid_request")
        assert error["details"] and ": " in error["message"]
    r = await client.post("/v1/rooms", json={"max_participants": 100000}, headers=AUTH)
    assert_error(r, 400, "invalid_field")
    error = assert_error(await client.post("/v1/rooms", json={"room_id": "a b"}, headers=AUTH), 422)
    assert error["message"].startswith("body.room_id: ")
    assert error["details"][0]["loc"] == ["body", "room_id"]


async def test_invalid_ids_in_paths(client: httpx.AsyncClient) -> None:
    await setup_room(client, "alice")
    for bad in ("bad%20id", "x" * 65, "%C3%A9", "a%2Fb", "%00"):
        for path in (
            f"/v1/rooms/{bad}",
            f"/v1/rooms/r1/participants/{bad}",
            f"/v1/rooms/{bad}/participants/alice/stats",
        ):
            r = await client.get(path, headers=AUTH)
            assert r.status_code in (404, 422), (path, r.status_code)
            assert_error(r, r.status_code)
    error = assert_error(await client.get("/v1/rooms/bad%20id", headers=AUTH), 422)
    assert error["message"].startswith("path.room_id: ")
    r = await client.get("/v1/rooms/bad%20id/participants/alice/stats", headers=AUTH)
    error = assert_error(r, 422, "invalid_request")
    assert [d["loc"] for d in error["details"]] == [["path", "room_id"]]
    r = await client.get("/v1/events", params={"room_id": "x" * 65}, headers=AUTH)
    assert_error(r, 422, "invalid_request")


# --------------------------------------------------------------------------------------------
# Participants


async def test_participant_lifecycle(world: World, client: httpx.AsyncClient) -> None:
    await setup_room(client)
    r = await client.post(
        "/v1/rooms/r1/participants",
        json={
            "participant_id": "alice",
            "metadata": {"team": "blue", "n": [1, 2.5, None]},
            "can_publish": True,
            "can_subscribe": False,
            "auto_subscribe": False,
        },
        headers=AUTH,
    )
    assert r.status_code == 201
    alice = r.json()
    assert alice["participant_id"] == "alice" and alice["room_id"] == "r1"
    assert alice["metadata"] == {"team": "blue", "n": [1, 2.5, None]}
    assert alice["state"] == "new" and alice["tracks"] == [] and alice["subscriptions"] == []

    assert_error(
        await client.post(
            "/v1/rooms/r1/participants", json={"participant_id": "alice"}, headers=AUTH
        ),
        409,
        "participant_exists",
    )
    r = await client.post("/v1/rooms/r1/participants", headers=AUTH)
    assert r.status_code == 201
    generated = r.json()["participant_id"]
    assert r.json()["metadata"] == {}

    r = await client.get(P, headers=AUTH)
    assert r.status_code == 200 and r.json() == alice
    room = (await client.get("/v1/rooms/r1", headers=AUTH)).json()
    assert {p["participant_id"] for p in room["participants"]} == {"alice", generated}

    assert_error(
        await client.get("/v1/rooms/r1/participants/nobody", headers=AUTH),
        404,
        "participant_not_found",
    )
    assert_error(
        await client.get("/v1/rooms/nope/participants/alice", headers=AUTH), 404, "room_not_found"
    )
    assert_error(
        await client.post("/v1/rooms/nope/participants", json={}, headers=AUTH),
        404,
        "room_not_found",
    )

    r = await client.delete(P, params={"reason": "left"}, headers=AUTH)
    assert r.status_code == 204
    left = [e for e in world.events if isinstance(e, ParticipantLeft)]
    assert left[-1].participant_id == "alice" and left[-1].reason == "left"
    assert_error(await client.get(P, headers=AUTH), 404, "participant_not_found")
    assert_error(await client.delete(P, headers=AUTH), 404, "participant_not_found")

    r = await client.delete(f"/v1/rooms/r1/participants/{generated}", headers=AUTH)
    assert r.status_code == 204
    last = world.events[-1]
    assert isinstance(last, ParticipantLeft) and last.reason == "kicked"
    r = await client.delete(
        f"/v1/rooms/r1/participants/{generated}", params={"reason": "timeout"}, headers=AUTH
    )
    assert_error(r, 422, "invalid_request")


async def test_room_full_is_429(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/rooms", json={"room_id": "r1", "max_participants": 1}, headers=AUTH)
    assert r.status_code == 201
    assert (await client.post("/v1/rooms/r1/participants", headers=AUTH)).status_code == 201
    assert_error(await client.post("/v1/rooms/r1/participants", headers=AUTH), 429, "room_full")


async def test_metadata_limits(world: World, client: httpx.AsyncClient) -> None:
    await setup_room(client)
    limit = world.settings.limits.max_metadata_bytes
    filler = limit - len('{"k":""}')
    body = {"participant_id": "fits", "metadata": {"k": "x" * filler}}
    assert (
        await client.post("/v1/rooms/r1/participants", json=body, headers=AUTH)
    ).status_code == 201
    body = {"participant_id": "big", "metadata": {"k": "x" * (filler + 1)}}
    r = await client.post("/v1/rooms/r1/participants", json=body, headers=AUTH)
    assert_error(r, 413, "too_large")
    # Size counts UTF-8 bytes, not characters.
    body = {"participant_id": "wide", "metadata": {"k": "é" * (filler // 2 + 1)}}
    r = await client.post("/v1/rooms/r1/participants", json=body, headers=AUTH)
    assert_error(r, 413, "too_large")

    for bad in ([1, 2], "text", 3, {"k": float("nan")}, {"k": float("inf")}):
        content = json.dumps({"metadata": bad}).encode()  # json.dumps writes NaN/Infinity
        r = await client.post(
            "/v1/rooms/r1/participants",
            content=content,
            headers={**AUTH, "content-type": "application/json"},
        )
        assert_error(r, 422, "invalid_request")
    deep: Any = "leaf"
    for _ in range(40):
        deep = {"d": deep}
    r = await client.post("/v1/rooms/r1/participants", json={"metadata": deep}, headers=AUTH)
    assert_error(r, 422, "invalid_request")
    r = await client.post(
        "/v1/rooms/r1/participants",
        content=b'{"metadata": {"k": "\\ud800"}}',
        headers={**AUTH, "content-type": "application/json"},
    )
    assert_error(r, 422, "invalid_request")
    assert {p.participant_id for p in world.sfu.get_room("r1").participants.values()} == {"fits"}


async def test_metadata_is_never_logged(
    world: World, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await setup_room(client)
    marker = "PERSONAL-DATA-MARKER"
    r = await client.post(
        "/v1/rooms/r1/participants",
        json={"participant_id": "alice", "metadata": {"name": marker}},
        headers=AUTH,
    )
    assert r.status_code == 201
    assert (await client.get(P, headers=AUTH)).json()["metadata"] == {"name": marker}
    assert (await client.delete("/v1/rooms/r1", headers=AUTH)).status_code == 204
    assert marker not in caplog.text


# --------------------------------------------------------------------------------------------
# Body limits, malformed requests


async def test_body_over_limit(world: World, client: httpx.AsyncClient) -> None:
    limit = world.settings.api.max_body_bytes
    await setup_room(client)
    big = json.dumps({"metadata": {"k": "x" * limit}}).encode()
    r = await client.post(
        "/v1/rooms/r1/participants",
        content=big,
        headers={**AUTH, "content-type": "application/json"},
    )
    assert_error(r, 413, "too_large")

    async def chunks(total: int) -> AsyncIterator[bytes]:
        yield b'{"participant_id": "streamed", "metadata": {"k": "'
        sent = 0
        while sent < total:
            yield b"x" * 1000
            sent += 1000
        yield b'"}}'

    # No Content-Length (chunked): the streamed size is counted.
    r = await client.post(
        "/v1/rooms/r1/participants",
        content=chunks(limit + 1000),
        headers={**AUTH, "content-type": "application/json"},
    )
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "too_large")
    r = await client.post(
        "/v1/rooms/r1/participants",
        content=chunks(3000),
        headers={**AUTH, "content-type": "application/json"},
    )
    assert r.status_code == 201 and r.json()["participant_id"] == "streamed"
    # The limit applies before authentication.
    r = await client.post("/v1/rooms", content=big, headers={"content-type": "application/json"})
    assert_error(r, 413, "too_large")


async def run_asgi(
    app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]], chunks: list[bytes]
) -> tuple[int, bytes]:
    """Drive the ASGI app directly with a hand-made request (bypassing client framing)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("relay", 80),
    }
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), 5)
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return status, body


async def test_declared_length_is_not_trusted(world: World) -> None:
    headers = [
        (b"authorization", AUTH["Authorization"].encode()),
        (b"content-type", b"application/json"),
        (b"content-length", b"10"),
    ]
    limit = world.settings.api.max_body_bytes
    status, body = await run_asgi(
        world.app, "POST", "/v1/rooms", headers, [b"{" + b" " * 4096] * (limit // 4096 + 2)
    )
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large"
    headers[-1] = (b"content-length", b"junk")
    status, body = await run_asgi(world.app, "POST", "/v1/rooms", headers, [b"{}"])
    assert status == 400
    headers[-1] = (b"content-length", b"2")
    status, body = await run_asgi(world.app, "POST", "/v1/rooms", headers, [b"{", b"}"])
    assert status == 201


async def test_malformed_json(client: httpx.AsyncClient) -> None:
    await setup_room(client, "alice")
    headers = {**AUTH, "content-type": "application/json"}
    for content in (
        b"{bad",
        b'{"room_id": "x",}',
        b"\xff\xfe",
        b"[" * 5000 + b"]" * 5000,
        b'{"room_id": "' + b"9" * 10 + b'"',
        b"1" * 5000,
        b"nul",
    ):
        for path in ("/v1/rooms", "/v1/rooms/r1/participants", f"{P}/publisher"):
            r = await client.post(path, content=content, headers=headers)
            error = assert_error(r, 422, "invalid_request")
            assert error["message"].startswith("body")
    error = assert_error(await client.post("/v1/rooms", content=b"{bad", headers=headers), 422)
    assert "invalid JSON" in error["message"]


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/nope", headers=AUTH), 404, "not_found")
    assert_error(await client.get("/v2/rooms", headers=AUTH), 404, "not_found")
    r = await client.patch("/v1/rooms", headers=AUTH)
    assert_error(r, 405, "method_not_allowed")
    assert "GET" in r.headers["allow"] and "POST" in r.headers["allow"]
    assert_error(await client.post("/healthz"), 405, "method_not_allowed")


async def test_genuine_bug_is_a_bare_500(world: World, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> list[Any]:
        raise RuntimeError("boom in the core")

    world.sfu.list_rooms = broken  # type: ignore[method-assign]
    async with world.client(raise_app_exceptions=False) as client:
        r = await client.get("/v1/rooms", headers=AUTH)
    assert_error(r, 500, "internal")
    assert "boom" not in r.text and "Traceback" not in r.text
    assert "boom in the core" in caplog.text


# --------------------------------------------------------------------------------------------
# Draining


async def test_draining(world: World, client: httpx.AsyncClient) -> None:
    await setup_room(client, "alice")
    world.sfu.draining = True
    r = await client.get("/readyz")
    assert r.status_code == 503 and r.json() == {"status": "draining"}
    assert_error(
        await client.post("/v1/rooms", json={"room_id": "r2"}, headers=AUTH), 503, "draining"
    )
    assert_error(
        await client.post("/v1/rooms/r1/participants", json={}, headers=AUTH), 503, "draining"
    )
    # Existing sessions keep working.
    assert (await client.get("/v1/rooms/r1", headers=AUTH)).status_code == 200
    assert (await client.post(f"{P}/subscriber", headers=AUTH)).status_code == 200
    assert (await client.get("/healthz")).status_code == 200
    world.sfu.draining = False
    assert (await client.get("/readyz")).status_code == 200


# --------------------------------------------------------------------------------------------
# Negotiation


async def aiortc_answer(offer_sdp: str) -> str:
    """A real client's answer to a subscriber offer."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return pc.localDescription.sdp
    finally:
        await pc.close()


async def test_publish_subscribe_flow(world: World, client: httpx.AsyncClient) -> None:
    await setup_room(client, "alice", "bob")
    r = await client.post(
        "/v1/rooms/r1/participants/bob/subscriber", headers=AUTH
    )  # bob opens his subscriber connection before anything is published
    assert r.status_code == 200
    early = r.json()
    assert early["type"] == "offer" and early["sdp"].startswith("v=0")

    r = await client.post(
        f"{P}/publisher",
        json={"type": "offer", "sdp": fixture_sdp("chrome_offer.sdp")},
        headers=AUTH,
    )
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["type"] == "answer" and answer["sdp"].startswith("v=0")
    assert "a=ice-lite" in answer["sdp"]

    alice = (await client.get(P, headers=AUTH)).json()
    assert {t["kind"] for t in alice["tracks"]} == {"audio", "video"}
    for track in alice["tracks"]:
        assert track["participant_id"] == "alice" and track["muted"] in (True, False)
    renegotiate = [
        e
        for e in world.events
        if isinstance(e, SubscriberRenegotiate) and e.participant_id == "bob"
    ]
    assert renegotiate and renegotiate[-1].revision > early["revision"]

    # An answer to the offer made before alice published is stale.
    stale = await aiortc_answer(early["sdp"])
    r = await client.put(
        "/v1/rooms/r1/participants/bob/subscriber",
        json={"type": "answer", "sdp": stale, "revision": early["revision"]},
        headers=AUTH,
    )
    assert_error(r, 409, "stale_revision")

    r = await client.post("/v1/rooms/r1/participants/bob/subscriber", headers=AUTH)
    offer = r.json()
    assert offer["revision"] == renegotiate[-1].revision
    sdp = await aiortc_answer(offer["sdp"])
    r = await client.put(
        "/v1/rooms/r1/participants/bob/subscriber",
        json={"type": "answer", "sdp": sdp, "revision": offer["revision"]},
        headers=AUTH,
    )
    assert r.status_code == 204 and r.content == b""
    bob = (await client.get("/v1/rooms/r1/participants/bob", headers=AUTH)).json()
    assert set(bob["subscriptions"]) == {t["track_id"] for t in alice["tracks"]}

    r = await client.get(f"{P}/stats", headers=AUTH)
    assert r.status_code == 200
    stats = r.json()
    assert isinstance(stats, dict) and len(stats.get("inbound", [])) == 2
    r = await client.get("/v1/rooms/r1/participants/bob/stats", headers=AUTH)
    assert r.status_code == 200 and len(r.json().get("outbound", [])) == 2


async def test_bad_sdp(world: World, client: httpx.AsyncClient) -> None:
    await setup_room(client, "alice")
    for sdp in ("", "garbage", "v=0\r\n", "v=0\r\nm=audio\r\n"):
        r = await client.post(f"{P}/publisher", json={"type": "offer", "sdp": sdp}, headers=AUTH)
        assert_error(r, 400, "bad_sdp")
    r = await client.post(f"{P}/publisher", json={"type": "answer", "sdp": "v=0"}, headers=AUTH)
    assert_error(r, 422, "invalid_request")
    r = await client.post(f"{P}/publisher", json={"sdp": "v=0"}, headers=AUTH)
    assert_error(r, 422, "invalid_request")
    r = await client.post(f"{P}/publisher", headers=AUTH)
    assert_error(r, 422, "invalid_request")
    r = await client.post(
        "/v1/rooms/r1/participants/ghost/publisher",
        json={"type": "offer", "sdp": fixture_sdp("aiortc_offer.sdp")},
        headers=AUTH,
    )
    assert_error(r, 404, "participant_not_found")

    # Answers: none requested yet, then a wrong shape.
    body = {"type": "answer", "sdp": "v=0\r\n", "revision": 0}
    r = await client.put(f"{P}/subscriber", json=body, headers=AUTH)
    assert_error(r, 409, "no_offer")
    offer = (await client.post(f"{P}/subscriber", headers=AUTH)).json()
    body["revision"] = offer["revision"]
    r = await client.put(f"{P}/subscriber", json=body, headers=AUTH)
    assert_error(r, 400, "bad_sdp")
    for bad in (
        {**body, "revision": -1},
        {**body, "revision": "1"},
        {**body, "type": "offer"},
        {"type": "answer", "sdp": "v=0"},
    ):
        assert_error(
            await client.put(f"{P}/subscriber", json=bad, headers=AUTH), 422, "invalid_request"
        )


async def test_sdp_over_limit(world: World) -> None:
    settings = dataclasses.replace(
        make_settings(max_body_bytes=200000),
        limits=dataclasses.replace(Settings().limits, max_sdp_bytes=4000),
    )
    world = World(settings)
    async with world.client() as client:
        await setup_room(client, "alice")
        sdp = fixture_sdp("chrome_offer.sdp")
        assert len(sdp) > 4000
        r = await client.post(f"{P}/publisher", json={"type": "offer", "sdp": sdp}, headers=AUTH)
        assert_error(r, 413, "too_large")
        offer = (await client.post(f"{P}/subscriber", headers=AUTH)).json()
        r = await client.put(
            f"{P}/subscriber",
            json={"type": "answer", "sdp": sdp, "revision": offer["revision"]},
            headers=AUTH,
        )
        assert_error(r, 413, "too_large")
        r = await client.post(
            f"{P}/publisher",
            json={"type": "offer", "sdp": fixture_sdp("aiortc_offer.sdp")},
            headers=AUTH,
        )
        assert r.status_code == 200


# --------------------------------------------------------------------------------------------
# Fuzz


def random_json(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(10 if depth < 3 else 7)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 1, 2**31, 2**64, -(2**70), rng.randrange(-1000, 1000)])
    if choice == 3:
        return rng.choice([0.0, -0.5, 1e308, 3.25, rng.uniform(-1e6, 1e6)])
    if choice in (4, 5, 6):
        alphabet = "abcXYZ09._- /\\\"'\n\r\t\x00é€😀{}[]:=\u2028"
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))
    if choice == 7:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    keys = [
        "room_id",
        "participant_id",
        "metadata",
        "max_participants",
        "e2ee_required",
        "empty_timeout",
        "can_publish",
        "can_subscribe",
        "auto_subscribe",
        "type",
        "sdp",
        "revision",
        "x",
    ]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(0, 6))}


def plausible_body(rng: random.Random, route: str) -> Any:
    """A body close to valid for ``route``, with random values in valid fields."""
    if route.endswith("/publisher"):
        return {"type": "offer", "sdp": mutate_sdp(rng)}
    if route.endswith("/subscriber"):
        return {"type": "answer", "sdp": mutate_sdp(rng), "revision": rng.randrange(0, 5)}
    fields = (
        ["room_id", "max_participants", "e2ee_required", "empty_timeout"]
        if route == "/v1/rooms"
        else ["participant_id", "metadata", "can_publish", "can_subscribe", "auto_subscribe"]
    )
    return {f: random_json(rng, 1) for f in rng.sample(fields, rng.randrange(0, len(fields)))}


SDP_FIXTURES = sorted(SDP_DIR.glob("*.sdp"))


def mutate_sdp(rng: random.Random) -> str:
    lines = rng.choice(SDP_FIXTURES).read_text().split("\r\n")
    for _ in range(rng.randrange(0, 6)):
        if not lines:
            break
        i = rng.randrange(len(lines))
        action = rng.randrange(5)
        if action == 0:
            del lines[i]
        elif action == 1:
            lines.insert(i, lines[rng.randrange(len(lines))])
        elif action == 2 and lines[i]:
            j = rng.randrange(len(lines[i]))
            lines[i] = lines[i][:j] + rng.choice("x: /0-9\x00é") + lines[i][j + 1 :]
        elif action == 3:
            lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)]
        else:
            lines[i] = lines[i].replace(" ", rng.choice(["  ", "", "\t"]), 1)
    return "\r\n".join(lines)


async def test_fuzz_bodies_never_500(world: World) -> None:
    rng = random.Random(20240601)
    routes = [
        ("POST", "/v1/rooms"),
        ("POST", "/v1/rooms/r1/participants"),
        ("POST", f"{P}/publisher"),
        ("POST", f"{P}/subscriber"),
        ("PUT", f"{P}/subscriber"),
    ]
    async with world.client() as client:
        await setup_room(client, "alice", "bob")
        await client.post(f"{P}/subscriber", headers=AUTH)
        for i in range(150):
            for method, path in routes:
                if i % 3 == 0:
                    request: dict[str, Any] = {"json": random_json(rng)}
                elif i % 3 == 1:
                    request = {"json": plausible_body(rng, path)}
                else:
                    raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
                    request = {
                        "content": raw,
                        "headers": {
                            "content-type": rng.choice(
                                [
                                    "application/json",
                                    "text/plain",
                                    "application/x-www-form-urlencoded",
                                ]
                            )
                        },
                    }
                headers = {**AUTH, **request.pop("headers", {})}
                r = await client.request(method, path, headers=headers, **request)
                assert r.status_code < 500, (method, path, request, r.text)
                if r.status_code >= 400:
                    assert_error(r, r.status_code)
            if not any(p == "alice" for p in world.sfu.get_room("r1").participants):
                await client.post(
                    "/v1/rooms/r1/participants", json={"participant_id": "alice"}, headers=AUTH
                )


async def test_data_channel_only_offer_is_answered(
    client: httpx.AsyncClient,
) -> None:
    await setup_room(client, "alice")
    head, *sections = fixture_sdp("chrome_offer.sdp").split("m=")
    sdp = head.replace("a=group:BUNDLE 0 1 2", "a=group:BUNDLE 2") + "m=" + sections[2]
    assert sdp.count("m=") == 1 and "m=application" in sdp
    r = await client.post(f"{P}/publisher", json={"type": "offer", "sdp": sdp}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert "a=sctp-port:5000" in r.json()["sdp"]
    assert "m=application 0 " not in r.json()["sdp"]
    # the same offer with its audio and video: all three answered
    body = {"type": "offer", "sdp": fixture_sdp("chrome_offer.sdp")}
    r = await client.post(f"{P}/publisher", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    assert "UDP/DTLS/SCTP webrtc-datachannel" in r.json()["sdp"]
    assert "m=application 0 " not in r.json()["sdp"]


async def test_metrics_count_transport_cc_feedback(client: httpx.AsyncClient) -> None:
    r = await client.get("/metrics")
    assert re.search(r"^relay_twcc_feedback_sent_total 0$", r.text, re.M)


# --------------------------------------------------------------------------------------------
# Video codec preference


def answered_video(sdp: str) -> tuple[str, str]:
    """(payload type, rtpmap and fmtp lines) of the video m-line of an answer."""
    section = sdp[sdp.index("m=video") :]
    pt = section.split("\r\n", 1)[0].split()[3]
    lines = [
        line
        for line in section.split("\r\n")
        if line.startswith((f"a=rtpmap:{pt} ", f"a=fmtp:{pt} "))
    ]
    return pt, " ".join(lines)


async def test_room_codec_preference_is_set_shown_and_used(
    world: World, client: httpx.AsyncClient
) -> None:
    r = await client.post(
        "/v1/rooms", json={"room_id": "r1", "codec_preference": ["H264", "VP8"]}, headers=AUTH
    )
    assert r.status_code == 201, r.text
    assert r.json()["codec_preference"] == ["H264", "VP8"]
    assert (await client.get("/v1/rooms/r1", headers=AUTH)).json()["codec_preference"] == [
        "H264",
        "VP8",
    ]
    r = await client.post("/v1/rooms", json={"room_id": "r2"}, headers=AUTH)
    assert r.json()["codec_preference"] == ["VP8", "H264", "VP9", "AV1"]  # media.codec_preference

    # Safari lists H.264 High (96) first, then Constrained Baseline (98), ..., VP8 (102).
    for room, expected in (("r1", ("98", "profile-level-id=42e01f")), ("r2", ("102", "VP8/90000"))):
        r = await client.post(
            f"/v1/rooms/{room}/participants", json={"participant_id": "safari"}, headers=AUTH
        )
        assert r.status_code == 201
        r = await client.post(
            f"/v1/rooms/{room}/participants/safari/publisher",
            json={"type": "offer", "sdp": fixture_sdp("safari_offer.sdp")},
            headers=AUTH,
        )
        assert r.status_code == 200, r.text
        pt, lines = answered_video(r.json()["sdp"])
        assert pt == expected[0] and expected[1] in lines, (room, lines)
        tracks = (await client.get(f"/v1/rooms/{room}/participants/safari", headers=AUTH)).json()
        video = next(t for t in tracks["tracks"] if t["kind"] == "video")
        assert video["codec"] == ("video/H264" if room == "r1" else "video/VP8")


@pytest.mark.parametrize(
    "value", [["H265"], [], ["VP8", "VP8"], ["vp8"], "VP8", [1], None, {"VP8": 1}]
)
async def test_room_codec_preference_checks(client: httpx.AsyncClient, value: Any) -> None:
    r = await client.post(
        "/v1/rooms", json={"room_id": "r1", "codec_preference": value}, headers=AUTH
    )
    if value is None:  # null: the configured default
        assert r.status_code == 201 and r.json()["codec_preference"][0] == "VP8"
        return
    error = assert_error(r, 422, "invalid_request")
    assert error["message"].startswith("body.codec_preference")
    assert_error(await client.get("/v1/rooms/r1", headers=AUTH), 404, "room_not_found")


async def test_room_codec_preference_is_documented(client: httpx.AsyncClient) -> None:
    schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
    field = schemas["CreateRoom"]["properties"]["codec_preference"]
    assert "VP8" in json.dumps(field) and "H264" in json.dumps(field)
    assert "codec_preference" in schemas["RoomInfo"]["required"]


def test_sfu_refuses_an_unknown_codec_preference() -> None:
    sfu = World(make_settings()).sfu
    for value in (["H265"], [], ["VP8", "vp8"], "VP8"):
        with pytest.raises(BadRequest) as info:
            sfu.create_room("r1", codec_preference=value)
        assert info.value.code == "invalid_field" and "codec_preference" in str(info.value)
    assert sfu.create_room("r1", codec_preference=["h264"]).codec_preference == ("H264",)


# --------------------------------------------------------------------------------------------
# The reference documentation


def _error_codes() -> set[str]:
    """Every error code the API can answer with: the framework's, the API's and the core's."""
    from relay.api import errors as api_errors
    from relay.api.events import TooManyStreams
    from relay.sfu import errors as sfu_errors

    codes = set(api_errors.HTTP_CODES.values())
    codes |= {"internal", api_errors.Unauthorized.code, TooManyStreams.code}
    codes |= {
        cls.code
        for cls in vars(sfu_errors).values()
        if isinstance(cls, type) and issubclass(cls, sfu_errors.SfuError)
    }
    for package in ("sfu", "api"):
        for source in (ROOT / "relay" / package).glob("*.py"):
            codes |= set(re.findall(r'\bcode="([a-z_]+)"', source.read_text()))
    return codes


def test_the_reference_documents_every_route_event_and_error_code() -> None:
    text = (ROOT / "docs" / "api.md").read_text()
    for method, path in ROUTES:
        assert f"### `{method} {path}`" in text, (method, path)
    for kind in EVENT_TYPES:
        assert f"| `{kind}` |" in text, kind
    missing = sorted(code for code in _error_codes() if f"`{code}`" not in text)
    assert not missing, f"error codes not in docs/api.md: {missing}"
