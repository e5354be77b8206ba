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
from typing import Any

import httpx
import pytest
import uvicorn

from relay.api import events as events_module
from relay.api.app import create_app
from relay.api.events import EventBus, format_sse, sign, sse_stream
from relay.config import Settings
from relay.metrics import Metrics

AUTH = {"Authorization": "Bearer devkey"}


def settings_with(queue_size: int = 100, **events: Any) -> Settings:
    settings = Settings()
    return dataclasses.replace(
        settings,
        limits=dataclasses.replace(settings.limits, event_queue_size=queue_size),
        events=dataclasses.replace(settings.events, **events),
    )


def event(kind: str, room_id: str = "r1", **fields: Any) -> dict[str, Any]:
    return {"type": kind, "room_id": room_id, "at": 1700000000.5, **fields}


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
    bus.publish(event("room.closed", "r1"))
    bus.publish(event("participant.joined", "r2", participant_id="a"))
    bus.publish(event("room.closed", "r3"))

    assert [(await everything.get())["room_id"] for _ in range(3)] == ["r1", "r2", "r3"]
    assert (await room1.get())["room_id"] == "r1"
    assert room1.queue.empty()
    got = await room2.get()
    assert got == event("participant.joined", "r2", participant_id="a")
    assert room2.queue.empty()
    assert bus.published == 3


async def test_overflow_drops_only_the_slow_subscriber() -> None:
    drops: list[int] = []
    metrics = Metrics()
    bus = EventBus(settings_with(queue_size=3), metrics=metrics, on_drop=lambda: drops.append(1))
    slow = bus.subscribe()
    fast = bus.subscribe()
    received = []
    for i in range(10):
        bus.publish(event("speaker.changed", participant_id=f"p{i}"))
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
    bus.publish(event("room.closed"))
    bus.close()
    assert await subscription.get() == event("room.closed")  # delivered before the end
    assert await subscription.get() is None
    late = bus.subscribe()
    assert await late.get() is None
    bus.publish(event("room.closed"))  # ignored after close
    assert bus.published == 1


async def test_close_with_full_queue_still_ends_the_stream() -> None:
    bus = EventBus(settings_with(queue_size=2))
    subscription = bus.subscribe()
    bus.publish(event("track.muted"))
    bus.publish(event("track.unmuted"))
    bus.close()
    assert [e async for e in subscription] == [event("track.unmuted")]


async def test_unsubscribe_is_idempotent() -> None:
    bus = EventBus(settings_with())
    subscription = bus.subscribe()
    subscription.close()
    subscription.close()
    assert bus.subscriber_count == 0
    bus.publish(event("room.closed"))
    assert await subscription.get() is None


# --------------------------------------------------------------------------------------------
# SSE


def test_format_sse() -> None:
    message = format_sse(event("participant.left", participant_id="a", reason="left"))
    text = message.decode()
    assert text.startswith("event: participant.left\ndata: {")
    assert text.endswith("}\n\n") and text.count("\n") == 3
    assert parse_sse(text) == [
        ("participant.left", event("participant.left", participant_id="a", reason="left"))
    ]
    # A newline inside a value stays escaped in the single data line.
    text = format_sse(event("x\ny", note="a\nb\r\n")).decode()
    assert text.count("\n") == 3
    assert parse_sse(text)[0][1]["note"] == "a\nb\r\n"


async def test_sse_generator_framing_keepalive_and_end() -> None:
    bus = EventBus(settings_with())
    subscription = bus.subscribe()
    stream = sse_stream(subscription, keepalive=0.05, retry_ms=1234)
    assert await anext(stream) == b"retry: 1234\n\n"
    assert await anext(stream) == b": keepalive\n\n"
    bus.publish(event("room.closed"))
    assert parse_sse((await anext(stream)).decode()) == [("room.closed", event("room.closed"))]
    bus.close()
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_sse_generator_reports_overflow_and_unsubscribes_on_close() -> None:
    bus = EventBus(settings_with(queue_size=1))
    subscription = bus.subscribe()
    stream = sse_stream(subscription)
    await anext(stream)
    bus.publish(event("a"))
    bus.publish(event("b"))  # overflow: dropped
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
    from relay.sfu.sfu import Sfu

    metrics = Metrics()
    sfu = Sfu(
        settings,
        certificate=Certificate.generate(),
        candidates=[("127.0.0.1", 40000)],
        send=lambda data, addr: None,
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
    assert messages[1][1]["reason"] == "room_closed"
    assert messages[0][1]["participant_id"] == "alice"


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
        sent = [
            event("participant.joined", participant_id="alice"),
            event("track.published", participant_id="alice", track={"track_id": "t1"}),
            event("room.closed", "r2"),
        ]
        for item in sent:
            bus.publish(item)
        await receiver.wait_count(3)
        await bus.aclose()
    assert bus.webhook_delivered == 3
    for (headers, body), item in zip(receiver.requests, sent, strict=True):
        assert json.loads(body) == item
        assert headers["content-type"] == "application/json"
        assert headers["x-relay-event"] == item["type"]
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
        bus.publish(event("participant.joined", participant_id="a", metadata={"name": "SECRET"}))
        await receiver.wait_count(3)  # two failures, then delivered
        bus.publish(event("participant.left", participant_id="a", metadata={"name": "SECRET"}))
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
        bus.publish(event("room.closed"))
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
    bus.publish(event("room.closed"))
    await wait_for(lambda: bus.webhook_failed == 1)
    await bus.aclose()

    # A receiver that never answers: each attempt times out.
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    bus = EventBus(settings_with(webhook_url=f"http://127.0.0.1:{port}/", webhook_timeout=0.1))
    bus.start()
    bus.publish(event("room.closed"))
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
        bus.publish(event("speaker.changed", participant_id=str(i)))
    assert bus.webhook_dropped == 3 and len(drops) == 3
    await bus.aclose()


async def test_no_webhook_without_url() -> None:
    bus = EventBus(settings_with())
    bus.start()
    bus.publish(event("room.closed"))
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
    assert json.loads(body)["room_id"] == "w"
