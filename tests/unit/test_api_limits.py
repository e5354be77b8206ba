"""Identifiers, header and body limits, event-stream limits and the cost of one event, in
process (the real SFU core behind the app; the event bus on its own)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

import relay.api.events as events_module
from relay.api.app import BodyLimitMiddleware
from relay.api.events import EventBus, Subscription, TooManyStreams, sse_stream
from relay.api.http import raw_error_response
from relay.config import ConfigError, Settings, load_settings
from relay.sfu.errors import BadRequest
from relay.sfu.events import Event, ParticipantJoined, RoomClosed, TrackMuted
from tests.unit.test_api import AUTH, World, assert_error, make_settings, setup_room

BAD_IDS = [".", "..", "a.", ".a", "...", "x" * 65, "é", "ü" * 3, "a b", "a/b", ""]
GOOD_IDS = ["a", "a.b", "a..b", "A-Z_0.9", "x" * 64, "-", "_"]


@pytest.fixture
def world() -> World:
    return World(make_settings(max_body_bytes=16384))


# --------------------------------------------------------------------------------------------
# Identifiers


@pytest.mark.parametrize("bad", BAD_IDS)
async def test_bad_ids_in_bodies_are_422(world: World, bad: str) -> None:
    async with world.client() as client:
        await setup_room(client)
        r = await client.post("/v1/rooms", json={"room_id": bad}, headers=AUTH)
        error = assert_error(r, 422, "invalid_request")
        assert error["details"][0]["loc"] == ["body", "room_id"]
        r = await client.post(
            "/v1/rooms/r1/participants", json={"participant_id": bad}, headers=AUTH
        )
        error = assert_error(r, 422, "invalid_request")
        assert error["details"][0]["loc"] == ["body", "participant_id"]
    assert list(world.sfu.rooms) == ["r1"]


@pytest.mark.parametrize("good", GOOD_IDS)
async def test_good_ids_are_taken(world: World, good: str) -> None:
    async with world.client() as client:
        r = await client.post("/v1/rooms", json={"room_id": good}, headers=AUTH)
        assert r.status_code == 201, r.text
        r = await client.post(
            f"/v1/rooms/{good}/participants", json={"participant_id": good}, headers=AUTH
        )
        assert r.status_code == 201, r.text
        r = await client.get(f"/v1/rooms/{good}/participants/{good}", headers=AUTH)
        assert r.status_code == 200 and r.json()["participant_id"] == good


@pytest.mark.parametrize(
    "raw", ["%2e%2e", "%2E%2E", "%2e", ".%2e", "a%2e", "%2ea", "%C3%A9", "x" * 65]
)
async def test_bad_ids_in_paths_are_422_and_touch_nothing(world: World, raw: str) -> None:
    """Percent-encoded dot segments reach the app as ids (clients collapse only literal ones)."""
    async with world.client() as client:
        await setup_room(client, "alice")
        for method, path in [
            ("DELETE", f"/v1/rooms/r1/participants/{raw}"),
            ("GET", f"/v1/rooms/r1/participants/{raw}"),
            ("DELETE", f"/v1/rooms/{raw}"),
            ("GET", f"/v1/rooms/{raw}/participants/alice/stats"),
            ("POST", f"/v1/rooms/r1/participants/{raw}/subscriber"),
        ]:
            # httpx keeps percent-encoded octets as they are
            r = await client.request(method, f"http://relay{path}", headers=AUTH)
            assert_error(r, 422, "invalid_request")
        r = await client.get("/v1/events", params={"room_id": ".."}, headers=AUTH)
        assert_error(r, 422, "invalid_request")
    assert list(world.sfu.get_room("r1").participants) == ["alice"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_the_core_refuses_bad_ids_too(world: World, bad: str) -> None:
    with pytest.raises(BadRequest) as caught:
        world.sfu.create_room(bad)
    assert caught.value.code == "invalid_identifier"
    world.sfu.create_room("r1")
    with pytest.raises(BadRequest):
        world.sfu.add_participant("r1", bad)


async def test_openapi_documents_the_id_pattern(world: World) -> None:
    async with world.client() as client:
        document = (await client.get("/openapi.json")).json()
    parameters = document["paths"]["/v1/rooms/{room_id}"]["get"]["parameters"]
    pattern = next(p for p in parameters if p["name"] == "room_id")["schema"]["pattern"]
    assert pattern.startswith("^[A-Za-z0-9_-]")


# --------------------------------------------------------------------------------------------
# Headers and bodies


async def test_headers_over_the_limit_get_431_with_the_json_error(world: World) -> None:
    async with world.client() as client:
        r = await client.get("/v1/rooms", headers={**AUTH, "X-Big": "a" * 20000})
        assert_error(r, 431, "headers_too_large")
        assert r.headers["connection"] == "close"
        assert (await client.get("/v1/rooms", headers={**AUTH, "X-Ok": "a" * 8000})).is_success


async def test_a_body_that_never_finishes_gets_408() -> None:
    reached: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope)

    middleware = BodyLimitMiddleware(app, max_body_bytes=1000, body_timeout=0.2)
    sent: list[dict[str, Any]] = []
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b'{"room', "more_body": True}
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/rooms", "headers": []}
    await asyncio.wait_for(middleware(scope, receive, send), 2)
    assert not reached
    assert sent[0]["status"] == 408
    assert b'"request_timeout"' in sent[1]["body"]


async def test_a_client_gone_mid_body_runs_no_handler() -> None:
    reached: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope)

    messages = [
        {"type": "http.request", "body": b"{", "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError("nothing to answer")

    scope = {"type": "http", "method": "POST", "path": "/v1/rooms", "headers": []}
    middleware = BodyLimitMiddleware(app, max_body_bytes=1000)
    await asyncio.wait_for(middleware(scope, receive, send), 2)
    assert not reached


def test_raw_error_response_is_a_complete_json_response() -> None:
    data = raw_error_response(503, "unavailable", "busy", {"retry-after": "1"})
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 503 Service Unavailable"
    assert b"content-type: application/json" in lines and b"connection: close" in lines
    assert b"retry-after: 1" in lines and f"content-length: {len(body)}".encode() in lines
    assert body == b'{"error":{"code":"unavailable","message":"busy"}}'


# --------------------------------------------------------------------------------------------
# Event streams: limits and cost


def bus_settings(per_key: int = 100, per_token: int = 4) -> Settings:
    settings = Settings()
    limits = dataclasses.replace(
        settings.limits, event_streams_per_key=per_key, event_streams_per_token=per_token
    )
    return dataclasses.replace(settings, limits=limits)


async def test_streams_are_limited_per_owner_and_slots_come_back() -> None:
    bus = EventBus(bus_settings())
    first = bus.subscribe("r1", owner="api_key:0", limit=2)
    second = bus.subscribe(None, owner="api_key:0", limit=2)
    with pytest.raises(TooManyStreams) as caught:
        bus.subscribe("r2", owner="api_key:0", limit=2)
    assert caught.value.status == 429 and caught.value.code == "too_many_streams"
    assert caught.value.headers["Retry-After"] == "2"
    bus.subscribe("r1", owner="api_key:1", limit=2)  # another owner has its own budget
    first.close()
    first.close()  # idempotent: the slot is given back once
    assert bus.streams_of("api_key:0") == 1
    bus.subscribe("r1", owner="api_key:0", limit=2)
    second.close()
    assert bus.streams_of("api_key:0") == 1 and bus.subscriber_count == 2


async def test_an_overflowing_stream_gives_its_slot_back() -> None:
    settings = bus_settings()
    settings = dataclasses.replace(
        settings, limits=dataclasses.replace(settings.limits, event_queue_size=1)
    )
    bus = EventBus(settings)
    bus.subscribe("r1", owner="t", limit=1)
    bus.publish(RoomClosed("r1", 1.0))
    bus.publish(RoomClosed("r1", 2.0))  # overflow: the stream ends
    assert bus.streams_of("t") == 0 and bus.subscriber_count == 0
    bus.subscribe("r1", owner="t", limit=1)


async def test_stream_limits_through_the_app() -> None:
    settings = dataclasses.replace(make_settings(), limits=bus_settings(per_key=1).limits)
    world = World(settings)
    world.bus.subscribe(None, owner="api_key:0", limit=1)  # the key's one stream
    async with world.client() as client:
        r = await client.get("/v1/events", headers=AUTH)
        assert_error(r, 429, "too_many_streams")
        assert r.headers["retry-after"] == "2"


async def test_one_event_touches_only_the_streams_of_its_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """500 streams, one per room: publishing an event offers it to one stream (plus the
    unfiltered ones) and never asks the others; the cost does not grow with the streams."""
    offered: list[Subscription] = []
    original = Subscription._offer

    def counting(self: Subscription, delivery: Any) -> bool:
        offered.append(self)
        return original(self, delivery)

    monkeypatch.setattr(Subscription, "_offer", counting)
    monkeypatch.setattr(Subscription, "matches", lambda self, event: pytest.fail("scanned"))
    bus = EventBus(bus_settings())
    streams = {f"r{i}": bus.subscribe(f"r{i}") for i in range(500)}
    everything = bus.subscribe(None)
    for i in range(100):
        bus.publish(TrackMuted(f"r{i % 7}", 1.0, participant_id="a", track_id="t"))
    assert len(offered) == 200  # one room stream + the unfiltered one, per event
    assert set(offered) == {everything, *(streams[f"r{i}"] for i in range(7))}
    offered.clear()
    bus.publish(TrackMuted("nobody", 1.0, participant_id="a", track_id="t"))
    assert offered == [everything]


async def test_one_event_is_serialised_once_for_every_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One ``to_dict`` and one JSON encoding per published event, however many streams take
    it, and none while nobody listens; every stream gets the very same frame."""
    serialised: list[Event] = []
    encoded: list[dict[str, Any]] = []
    to_dict, encode = Event.to_dict, events_module.encode_event

    def counting_to_dict(self: Event) -> dict[str, Any]:
        serialised.append(self)
        return to_dict(self)

    def counting_encode(data: dict[str, Any]) -> bytes:
        encoded.append(data)
        return encode(data)

    monkeypatch.setattr(Event, "to_dict", counting_to_dict)
    monkeypatch.setattr(events_module, "encode_event", counting_encode)
    bus = EventBus(bus_settings())
    bus.publish(RoomClosed("r1", 1.0))  # nobody listens (no stream, no webhook)
    assert bus.published == 1 and not serialised and not encoded
    streams = [sse_stream(bus.subscribe("r1" if i % 2 else None)) for i in range(50)]
    for stream in streams:
        assert (await anext(stream)).startswith(b"retry: ")
    for i in range(5):
        bus.publish(ParticipantJoined("r1", 1700000000.5, participant_id=f"p{i}"))
    frames = [[await anext(stream) for _ in range(5)] for stream in streams]
    assert len(serialised) == 5 and len(encoded) == 5
    assert all(f == frames[0] for f in frames)
    assert frames[0][0] is frames[1][0]  # the very same bytes object
    assert frames[0][0] == (
        b"event: participant.joined\ndata: "
        b'{"type":"participant.joined","room_id":"r1","at":1700000000.5,"participant_id":"p0",'
        b'"e2ee":false,"e2ee_required":false}'
        b"\n\n"
    )
    bus.publish(RoomClosed("elsewhere", 1.0))  # only the unfiltered streams take it
    assert len(serialised) == 6 and len(encoded) == 6
    assert (await anext(streams[0])).startswith(b"event: room.closed")
    assert len(encoded) == 6
    bus.close()
    for stream in streams:
        await stream.aclose()


# --------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[api]\nmax_connections = 0", "api.max_connections"),
        ("[api]\nheader_timeout = 0", "api.header_timeout"),
        ('[api]\nbody_timeout = "30"', "api.body_timeout"),
        ("[api]\nkeep_alive_timeout = -1", "api.keep_alive_timeout"),
        ("[limits]\nevent_streams_per_key = 0", "limits.event_streams_per_key"),
        ("[limits]\nevent_streams_per_token = 1.5", "limits.event_streams_per_token"),
    ],
)
def test_bad_limit_values_name_the_key(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert str(caught.value).startswith(f"{key}: ")


def test_limit_values_load() -> None:
    settings = load_settings(
        None,
        environ={
            "RELAY_API__MAX_CONNECTIONS": "64",
            "RELAY_API__HEADER_TIMEOUT": "2.5",
            "RELAY_LIMITS__EVENT_STREAMS_PER_TOKEN": "2",
        },
    )
    assert settings.api.max_connections == 64 and settings.api.header_timeout == 2.5
    assert settings.limits.event_streams_per_token == 2
