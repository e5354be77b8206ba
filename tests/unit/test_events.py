"""EventBus fan-out and overflow, the SSE stream (generator, through the app, over real HTTP)
and webhook delivery with signatures and retries."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx
import pytest
import uvicorn

from relay.api import events as events_module
from relay.api.app import create_app
from relay.api.events import Delivery, EventBus, format_sse, sign, sse_stream
from relay.config import Settings
from relay.metrics import Metrics
from relay.sfu.events import (
    EVENT_TYPES,
    Event,
    ParticipantConnected,
    ParticipantJoined,
    ParticipantLeft,
    PublisherLayers,
    RecordingParticipantExcluded,
    RecordingRequested,
    RecordingStarted,
    RecordingStopped,
    RoomClosed,
    SpeakerChanged,
    SubscriberRenegotiate,
    TrackMuted,
    TrackPublished,
    TrackUnmuted,
    TrackUnpublished,
    TrackUnsupported,
)

AUTH = {"Authorization": "Bearer devkey"}


def settings_with(queue_size: int = 100, **events: Any) -> Settings:
    settings = Settings()
    return dataclasses.replace(
        settings,
        limits=dataclasses.replace(settings.limits, event_queue_size=queue_size),
        events=dataclasses.replace(settings.events, **events),
    )


AT = 1700000000.5


def closed(room_id: str = "r1") -> RoomClosed:
    return RoomClosed(room_id, AT)


#: One event of every type and the exact JSON object (and bytes) consumers and webhooks get.
TRACK = {
    "track_id": "TR_1",
    "participant_id": "a",
    "kind": "video",
    "codec": "video/VP8",
    "mid": "1",
    "muted": False,
    "simulcast_layers": [],
}
WIRE: list[tuple[Event, bytes]] = [
    (RoomClosed("r1", AT), b'{"type":"room.closed","room_id":"r1","at":1700000000.5}'),
    (
        ParticipantJoined("r1", AT, "a", True, True),
        b'{"type":"participant.joined","room_id":"r1","at":1700000000.5,"participant_id":"a",'
        b'"e2ee":true,"e2ee_required":true}',
    ),
    (
        ParticipantConnected("r1", AT, "a"),
        b'{"type":"participant.connected","room_id":"r1","at":1700000000.5,"participant_id":"a"}',
    ),
    (
        ParticipantLeft("r1", AT, "a", "kicked"),
        b'{"type":"participant.left","room_id":"r1","at":1700000000.5,"participant_id":"a",'
        b'"reason":"kicked"}',
    ),
    (
        TrackPublished("r1", AT, "a", TRACK),
        b'{"type":"track.published","room_id":"r1","at":1700000000.5,"participant_id":"a",'
        b'"track":{"track_id":"TR_1","participant_id":"a","kind":"video","codec":"video/VP8",'
        b'"mid":"1","muted":false,"simulcast_layers":[]}}',
    ),
    (
        TrackUnpublished("r1", AT, "a", "TR_1"),
        b'{"type":"track.unpublished","room_id":"r1","at":1700000000.5,"participant_id":"a",'
        b'"track_id":"TR_1"}',
    ),
    (
        TrackMuted("r1", AT, "a", "TR_1", "moderator"),
        b'{"type":"track.muted","room_id":"r1","at":1700000000.5,"participant_id":"a",'
        b'"track_id":"TR_1","by":"moderator"}',
    ),
    (
        TrackUnmuted("r1", AT, "a", "TR_1"),
        b'{"type":"track.unmuted","room_id":"r1","at":1700000000.5,"participant_id":"a",'
        b'"track_id":"TR_1","by":"inactivity"}',
    ),
    (
        TrackUnsupported("r1", AT, "b", "TR_1", "a", "video/AV1", "codec AV1 not accepted"),
        b'{"type":"track.unsupported","room_id":"r1","at":1700000000.5,"participant_id":"b",'
        b'"track_id":"TR_1","publisher_id":"a","codec":"video/AV1",'
        b'"reason":"codec AV1 not accepted"}',
    ),
    (
        SubscriberRenegotiate("r1", AT, "b", 3),
        b'{"type":"subscriber.renegotiate","room_id":"r1","at":1700000000.5,'
        b'"participant_id":"b","revision":3}',
    ),
    (
        PublisherLayers("r1", AT, "a", "TR_1", ["f"], ["q", "h"]),
        b'{"type":"publisher.layers","room_id":"r1","at":1700000000.5,"participant_id":"a",'
        b'"track_id":"TR_1","wanted":["f"],"unused":["q","h"]}',
    ),
    (
        SpeakerChanged("r1", AT, "a"),
        b'{"type":"speaker.changed","room_id":"r1","at":1700000000.5,"participant_id":"a"}',
    ),
    (
        SpeakerChanged("r1", AT, None),
        b'{"type":"speaker.changed","room_id":"r1","at":1700000000.5,"participant_id":null}',
    ),
    (
        RecordingRequested("r1", AT, "rec_1", ["a", "b"]),
        b'{"type":"recording.requested","room_id":"r1","at":1700000000.5,'
        b'"recording_id":"rec_1","participant_ids":["a","b"]}',
    ),
    (
        RecordingStarted("r1", AT, "rec_1"),
        b'{"type":"recording.started","room_id":"r1","at":1700000000.5,"recording_id":"rec_1"}',
    ),
    (
        RecordingParticipantExcluded("r1", AT, "rec_1", "a", "withdrawn"),
        b'{"type":"recording.participant_excluded","room_id":"r1","at":1700000000.5,'
        b'"recording_id":"rec_1","participant_id":"a","reason":"withdrawn"}',
    ),
    (
        RecordingStopped("r1", AT, "rec_1", "disk_full"),
        b'{"type":"recording.stopped","room_id":"r1","at":1700000000.5,'
        b'"recording_id":"rec_1","reason":"disk_full"}',
    ),
]


def test_observers_see_every_event_synchronously() -> None:
    """An observer (the recording service) gets each event as it is published, also with no
    stream open and after close; one that raises does not stop the others or the delivery."""
    bus = EventBus(Settings())
    seen: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("observer bug")

    bus.add_observer(broken)
    bus.add_observer(seen.append)
    bus.publish(RoomClosed("r1", AT))
    assert seen == [RoomClosed("r1", AT)]
    bus.close()
    bus.publish(RoomClosed("r2", AT))
    assert [e.room_id for e in seen] == ["r1", "r2"]
    bus.remove_observer(seen.append)
    bus.publish(RoomClosed("r3", AT))
    assert len(seen) == 2


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event type, data) of every message in an SSE body; comments and hints skipped."""
    messages = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        if "data" in fields:
            messages.append((fields.get("event", "message"), json.loads(fields["data"])))
    return messages


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------------------------
# EventBus


async def test_fan_out_with_room_filter() -> None:
    bus = EventBus(settings_with())
    everything = bus.subscribe()
    room1 = bus.subscribe("r1")
    room2 = bus.subscribe("r2")
    bus.publish(closed("r1"))
    bus.publish(ParticipantJoined("r2", AT, participant_id="a"))
    bus.publish(closed("r3"))

    assert [(await everything.get()).room_id for _ in range(3)] == ["r1", "r2", "r3"]
    assert await room1.get() == closed("r1")
    assert room1.queue.empty()
    delivery = await room2.next_delivery()
    assert delivery is not None
    assert delivery.event == ParticipantJoined("r2", AT, participant_id="a")
    assert delivery.data == {
        "type": "participant.joined",
        "room_id": "r2",
        "at": AT,
        "participant_id": "a",
        "e2ee": False,
        "e2ee_required": False,
    }
    assert room2.queue.empty()
    assert bus.published == 3


@pytest.mark.parametrize(("item", "wire"), WIRE, ids=lambda v: getattr(v, "type", None))
def test_every_event_type_keeps_its_json(item: Event, wire: bytes) -> None:
    """What a stream and a webhook receive: the same object, keys in the same order."""
    delivery = Delivery(item)
    assert delivery.body == wire
    assert delivery.data == item.to_dict() == json.loads(wire)
    assert list(delivery.data) == list(json.loads(wire))
    assert delivery.frame == b"event: " + item.type.encode() + b"\ndata: " + wire + b"\n\n"
    assert format_sse(item) == delivery.frame
    assert delivery.kind == item.type


def test_every_event_type_is_covered() -> None:
    assert {type(item) for item, _ in WIRE} == set(EVENT_TYPES.values())


async def test_overflow_drops_only_the_slow_subscriber() -> None:
    drops: list[int] = []
    metrics = Metrics()
    bus = EventBus(settings_with(queue_size=3), metrics=metrics, on_drop=lambda: drops.append(1))
    slow = bus.subscribe()
    fast = bus.subscribe()
    received = []
    for i in range(10):
        bus.publish(SpeakerChanged("r1", AT, participant_id=f"p{i}"))
        received.append(await fast.get())
    assert len(received) == 10
    assert slow.overflowed and slow.closed
    assert await slow.get() is None  # the stream ends, queued events discarded
    assert await slow.get() is None
    assert bus.subscribers_dropped == 1 and drops == [1] and metrics.events_dropped == 1
    assert bus.subscriber_count == 1
    assert not fast.closed


async def test_close_ends_streams_and_later_subscriptions() -> None:
    bus = EventBus(settings_with())
    subscription = bus.subscribe("r1")
    bus.publish(closed())
    bus.close()
    assert await subscription.get() == closed()  # delivered before the end
    assert await subscription.get() is None
    late = bus.subscribe()
    assert await late.get() is None
    bus.publish(closed())  # ignored after close
    assert bus.published == 1


async def test_close_with_full_queue_still_ends_the_stream() -> None:
    bus = EventBus(settings_with(queue_size=2))
    subscription = bus.subscribe()
    bus.publish(TrackMuted("r1", AT, "a", "t1"))
    bus.publish(TrackUnmuted("r1", AT, "a", "t1"))
    bus.close()
    assert [e async for e in subscription] == [TrackUnmuted("r1", AT, "a", "t1")]


async def test_unsubscribe_is_idempotent() -> None:
    bus = EventBus(settings_with())
    subscription = bus.subscribe()
    subscription.close()
    subscription.close()
    assert bus.subscriber_count == 0
    bus.publish(closed())
    assert await subscription.get() is None


# --------------------------------------------------------------------------------------------
# SSE


@dataclass(frozen=True, slots=True)
class Odd(Event):
    """An event type whose name and field hold line breaks."""

    type: ClassVar[str] = "x\ny"
    note: str


def test_format_sse() -> None:
    left = ParticipantLeft("r1", AT, participant_id="a", reason="left")
    text = format_sse(left).decode()
    assert text.startswith("event: participant.left\ndata: {")
    assert text.endswith("}\n\n") and text.count("\n") == 3
    assert parse_sse(text) == [
        (
            "participant.left",
            {
                "type": "participant.left",
                "room_id": "r1",
                "at": AT,
                "participant_id": "a",
                "reason": "left",
            },
        )
    ]
    # A newline inside a value stays escaped in the single data line.
    text = format_sse(Odd("r1", AT, note="a\nb\r\n")).decode()
    assert text.count("\n") == 3 and text.startswith("event: xy\n")
    assert parse_sse(text)[0][1]["note"] == "a\nb\r\n"


async def test_sse_generator_framing_keepalive_and_end() -> None:
    bus = EventBus(settings_with())
    subscription = bus.subscribe()
    stream = sse_stream(subscription, keepalive=0.05, retry_ms=1234)
    assert await anext(stream) == b"retry: 1234\n\n"
    assert await anext(stream) == b": keepalive\n\n"
    bus.publish(closed())
    assert parse_sse((await anext(stream)).decode()) == [("room.closed", closed().to_dict())]
    bus.close()
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_sse_generator_reports_overflow_and_unsubscribes_on_close() -> None:
    bus = EventBus(settings_with(queue_size=1))
    subscription = bus.subscribe()
    stream = sse_stream(subscription)
    await anext(stream)
    bus.publish(closed("a"))
    bus.publish(closed("b"))  # overflow: dropped
    assert await anext(stream) == (
        b": dropped: events were produced faster than this stream read them\n\n"
    )
    with pytest.raises(StopAsyncIteration):
        await anext(stream)

    other = bus.subscribe()
    stream = sse_stream(other)
    await anext(stream)
    assert bus.subscriber_count == 1
    await stream.aclose()  # what a client disconnect does
    assert bus.subscriber_count == 0


def make_app(bus: EventBus, settings: Settings) -> Any:
    from relay.rtc.dtls import Certificate
    from relay.sfu.leg import CallbackSender
    from relay.sfu.sfu import Sfu

    metrics = Metrics()
    sfu = Sfu(
        settings,
        certificate=Certificate.generate(),
        candidates=[("127.0.0.1", 40000)],
        sender=CallbackSender(lambda data, addr: None),
        clock=time.monotonic,
        emit=bus.publish,
        metrics=metrics,
    )
    return create_app(sfu, settings, bus, metrics)


async def test_sse_through_the_app() -> None:
    settings = settings_with()
    bus = EventBus(settings)
    app = make_app(bus, settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://relay") as client:
        # This transport returns a response only once the stream ends: end it with close().
        stream = asyncio.create_task(
            client.get("/v1/events", params={"room_id": "r1"}, headers=AUTH)
        )
        await wait_for(lambda: bus.subscriber_count == 1)
        for room_id in ("r1", "r2"):
            r = await client.post("/v1/rooms", json={"room_id": room_id}, headers=AUTH)
            assert r.status_code == 201
            r = await client.post(
                f"/v1/rooms/{room_id}/participants", json={"participant_id": "alice"}, headers=AUTH
            )
            assert r.status_code == 201
        r = await client.delete("/v1/rooms/r1", headers=AUTH)
        assert r.status_code == 204
        bus.close()
        response = await asyncio.wait_for(stream, 5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.text.startswith("retry: ")
    messages = parse_sse(response.text)
    assert [kind for kind, _ in messages] == [
        "participant.joined",
        "participant.left",
        "room.closed",
    ]
    for kind, data in messages:
        assert data["type"] == kind and data["room_id"] == "r1"
        assert isinstance(data["at"], float)
    at = [data["at"] for _, data in messages]
    assert [data for _, data in messages] == [
        {
            "type": "participant.joined",
            "room_id": "r1",
            "at": at[0],
            "participant_id": "alice",
            "e2ee": False,
            "e2ee_required": False,
        },
        {
            "type": "participant.left",
            "room_id": "r1",
            "at": at[1],
            "participant_id": "alice",
            "reason": "room_closed",
        },
        {"type": "room.closed", "room_id": "r1", "at": at[2]},
    ]


async def test_sse_requires_auth_and_a_valid_room_filter() -> None:
    settings = settings_with()
    bus = EventBus(settings)
    app = make_app(bus, settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://relay") as client:
        r = await client.get("/v1/events")
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized"
        r = await client.get("/v1/events", params={"room_id": "bad room"}, headers=AUTH)
        assert r.status_code == 422
    assert bus.subscriber_count == 0


# --------------------------------------------------------------------------------------------
# Real HTTP server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Run ``app`` on uvicorn at 127.0.0.1:<free port>; yields the base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await wait_for(lambda: server.started)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def read_messages(lines: AsyncIterator[str], count: int) -> list[tuple[str, dict]]:
    """Read ``count`` SSE messages from a line iterator."""
    messages: list[tuple[str, dict]] = []
    block: list[str] = []
    async for line in lines:
        if line:
            block.append(line)
            continue
        messages.extend(parse_sse("\n".join(block) + "\n\n"))
        block = []
        if len(messages) >= count:
            break
    return messages


async def test_sse_over_real_http_streams_and_ends_on_disconnect_and_shutdown() -> None:
    settings = settings_with()
    bus = EventBus(settings)
    app = make_app(bus, settings)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=5) as client:
        async with client.stream("GET", "/v1/events", headers=AUTH) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.aiter_lines()
            assert await anext(lines) == "retry: 2000"
            r = await client.post("/v1/rooms", json={"room_id": "live"}, headers=AUTH)
            assert r.status_code == 201
            r = await client.post(
                "/v1/rooms/live/participants",
                json={"participant_id": "p1", "metadata": {"k": "v"}},
                headers=AUTH,
            )
            assert r.status_code == 201
            messages = await asyncio.wait_for(read_messages(lines, 1), 5)
            assert messages[0][0] == "participant.joined"
            assert messages[0][1]["participant_id"] == "p1"
        # The client went away: the server notices and unsubscribes.
        await wait_for(lambda: bus.subscriber_count == 0)

        async with client.stream(
            "GET", "/v1/events", params={"room_id": "live"}, headers=AUTH
        ) as response:
            await wait_for(lambda: bus.subscriber_count == 1)
            bus.close()  # shutdown: every stream ends cleanly
            body = await asyncio.wait_for(response.aread(), 5)
        assert body == b"retry: 2000\n\n"


# --------------------------------------------------------------------------------------------
# Webhook


class Receiver:
    """A tiny HTTP/1.1 server recording POSTs; answers with the statuses queued in ``replies``."""

    def __init__(self, replies: list[int] | None = None) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.replies = list(replies or [])
        self.arrived = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> Receiver:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append((headers, body))
                self.arrived.set()
                status = self.replies.pop(0) if self.replies else 204
                writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def wait_count(self, count: int) -> None:
        await wait_for(lambda: len(self.requests) >= count)


async def test_webhook_posts_signed_events() -> None:
    async with Receiver() as receiver:
        bus = EventBus(settings_with(webhook_url=receiver.url, webhook_secret="s3cret"))
        bus.start()
        sent = [item for item, _ in WIRE]
        for item in sent:
            bus.publish(item)
        await receiver.wait_count(len(sent))
        await bus.aclose()
    assert bus.webhook_delivered == len(sent)
    for (headers, body), (item, wire) in zip(receiver.requests, WIRE, strict=True):
        assert body == wire  # byte for byte what the stream sends too
        assert json.loads(body) == item.to_dict()
        assert headers["content-type"] == "application/json"
        assert headers["x-relay-event"] == item.type
        expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["x-relay-signature"], expected)
        assert headers["x-relay-signature"] == sign(body, "s3cret")


async def test_webhook_retries_at_most_twice(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(events_module, "WEBHOOK_BACKOFF", 0.01)
    caplog.set_level(logging.WARNING, logger="relay.events")
    async with Receiver(replies=[503, 500, 204, 500, 500, 500, 500]) as receiver:
        bus = EventBus(settings_with(webhook_url=receiver.url, webhook_secret="k"))
        bus.start()
        bus.publish(TrackPublished("r1", AT, participant_id="SECRET", track={"name": "SECRET"}))
        await receiver.wait_count(3)  # two failures, then delivered
        bus.publish(ParticipantLeft("r1", AT, participant_id="SECRET", reason="left"))
        await receiver.wait_count(6)  # three failures: given up
        await bus.aclose()
        await asyncio.sleep(0.05)
    assert len(receiver.requests) == 6  # never a fourth attempt
    assert bus.webhook_delivered == 1 and bus.webhook_failed == 1
    assert "participant.left" in caplog.text
    assert "SECRET" not in caplog.text


async def test_webhook_does_not_retry_a_rejection() -> None:
    async with Receiver(replies=[400]) as receiver:
        bus = EventBus(settings_with(webhook_url=receiver.url, webhook_secret="k"))
        bus.start()
        bus.publish(closed())
        await receiver.wait_count(1)
        await asyncio.sleep(0.1)
        await bus.aclose()
    assert len(receiver.requests) == 1 and bus.webhook_failed == 1


async def test_webhook_unreachable_and_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_module, "WEBHOOK_BACKOFF", 0.01)
    bus = EventBus(
        settings_with(webhook_url=f"http://127.0.0.1:{free_port()}/x", webhook_timeout=0.2)
    )
    bus.start()
    bus.publish(closed())
    await wait_for(lambda: bus.webhook_failed == 1)
    await bus.aclose()

    # A receiver that never answers: each attempt times out.
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    bus = EventBus(settings_with(webhook_url=f"http://127.0.0.1:{port}/", webhook_timeout=0.1))
    bus.start()
    bus.publish(closed())
    await wait_for(lambda: bus.webhook_failed == 1, timeout=5)
    await bus.aclose()
    server.close()


async def test_webhook_queue_is_bounded() -> None:
    drops: list[int] = []
    bus = EventBus(
        settings_with(queue_size=5, webhook_url="http://127.0.0.1:9/", webhook_secret="k"),
        on_drop=lambda: drops.append(1),
    )
    for i in range(8):  # the delivery task is not running: the queue fills up
        bus.publish(SpeakerChanged("r1", AT, participant_id=str(i)))
    assert bus.webhook_dropped == 3 and len(drops) == 3
    await bus.aclose()


async def test_no_webhook_without_url() -> None:
    bus = EventBus(settings_with())
    bus.start()
    bus.publish(closed())
    assert bus.webhook_dropped == 0
    await bus.aclose()


async def test_app_lifespan_starts_and_stops_the_webhook() -> None:
    async with Receiver() as receiver:
        settings = settings_with(webhook_url=receiver.url, webhook_secret="k")
        bus = EventBus(settings)
        app = make_app(bus, settings)
        async with serve(app) as base, httpx.AsyncClient(base_url=base) as client:
            r = await client.post("/v1/rooms", json={"room_id": "w"}, headers=AUTH)
            assert r.status_code == 201
            r = await client.post("/v1/rooms/w/participants", json={}, headers=AUTH)
            assert r.status_code == 201
            await receiver.wait_count(1)
        assert bus.closed
    headers, body = receiver.requests[0]
    assert headers["x-relay-event"] == "participant.joined"
    data = json.loads(body)
    assert list(data) == ["type", "room_id", "at", "participant_id", "e2ee", "e2ee_required"]
    assert data["type"] == "participant.joined" and data["room_id"] == "w"
    assert isinstance(data["at"], float) and data["participant_id"].startswith("PA_")
