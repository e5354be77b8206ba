"""The front <-> worker channel: the frame codec (relay/workers/protocol.py) with bytes, and the
asyncio Channel (relay/workers/channel.py) over a real socket pair."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from relay.sfu.errors import BadRequest, Conflict, NotFound, Overloaded, SfuError
from relay.workers.channel import Channel, ChannelClosed, ChannelTimeout
from relay.workers.protocol import (
    KIND_NOTIFICATION,
    KIND_REQUEST,
    KIND_RESPONSE,
    MAX_FRAME,
    EmptyFrame,
    ErrorResponse,
    FatalProtocolError,
    FrameDecoder,
    FrameTooLarge,
    Message,
    Notification,
    ProtocolError,
    RemoteError,
    Request,
    Response,
    encode_error,
    encode_message,
    encode_notification,
    encode_request,
    encode_response,
    error_fields,
    raise_remote,
    remote_exception,
)


def raw_frame(kind: int, body: bytes) -> bytes:
    return struct.pack(">IB", len(body) + 1, kind) + body


def decode_one(data: bytes) -> Message | ProtocolError:
    decoder = FrameDecoder()
    items = decoder.feed(data)
    assert len(items) == 1
    assert decoder.eof() is None
    return items[0]


MESSAGES: list[Message] = [
    Request(1, "create_room", {"room_id": "r1", "max_participants": 8}),
    Request(2**40, "ping", {}),
    Response(1, {"room_id": "r1", "participants": []}),
    Response(7, None),
    Response(8, ["v=0\r\n", 3]),
    ErrorResponse(9, {"type": "NotFound", "code": "not_found", "message": "no", "status": 404}),
    Notification("load", {"cpu": 0.25, "packet_rate": 1200, "participants": 3}),
    Notification("hello", {"index": 0, "pid": 42, "media_port": 7882, "pipe_port": 40001}),
    Notification("event", {"event": {"type": "room.closed", "room_id": "ré", "at": 1.5}}),
]


# -- codec ------------------------------------------------------------------------------------


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_of_every_kind(message: Message) -> None:
    assert decode_one(encode_message(message)) == message


def test_wire_bytes_are_length_kind_compact_json() -> None:
    frame = encode_request(5, "ping", {"a": 1})
    body = b'{"id":5,"method":"ping","params":{"a":1}}'
    assert frame == struct.pack(">I", len(body) + 1) + bytes([KIND_REQUEST]) + body
    assert encode_response(5, True) == raw_frame(KIND_RESPONSE, b'{"id":5,"result":true}')
    assert encode_notification("load") == raw_frame(
        KIND_NOTIFICATION, b'{"method":"load","params":{}}'
    )
    # UTF-8, not \u escapes
    assert "é".encode() in encode_notification("event", {"room": "é"})


def test_frames_split_at_every_byte_boundary() -> None:
    stream = b"".join(encode_message(m) for m in MESSAGES)
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        items = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert items == MESSAGES, cut
        assert decoder.eof() is None


def test_byte_by_byte_and_several_frames_in_one_feed() -> None:
    stream = b"".join(encode_message(m) for m in MESSAGES)
    decoder = FrameDecoder()
    items: list[Message | ProtocolError] = []
    for i in range(len(stream)):
        items += decoder.feed(stream[i : i + 1])
    assert items == MESSAGES
    assert FrameDecoder().feed(stream) == MESSAGES
    assert decoder.buffered == 0


def test_truncated_frame_at_eof_says_how_many_bytes_arrived() -> None:
    frame = encode_request(3, "ping", {})
    decoder = FrameDecoder()
    assert decoder.feed(frame[:-2]) == []
    error = decoder.eof()
    assert isinstance(error, ProtocolError)
    assert f"{len(frame) - 2} of {len(frame)} bytes" in str(error)
    assert "request" in str(error)
    assert decoder.eof() is None  # reported once

    decoder = FrameDecoder()
    decoder.feed(frame[:2])
    error = decoder.eof()
    assert error is not None and "2 of 4 bytes" in str(error) and "header" in str(error)


def test_unknown_kind_is_an_error_and_the_next_frame_still_decodes() -> None:
    items = FrameDecoder().feed(raw_frame(9, b"{}") + encode_notification("load"))
    assert isinstance(items[0], ProtocolError)
    assert "unknown frame kind 9" in str(items[0])
    assert items[1] == Notification("load", {})


@pytest.mark.parametrize(
    ("kind", "body", "expected"),
    [
        (KIND_REQUEST, b'{"id": 1, "method": ', "not UTF-8 JSON"),
        (KIND_REQUEST, b"\xff\xfe", "not UTF-8 JSON"),
        (KIND_REQUEST, b"[1, 2]", "must be a JSON object, not list"),
        (KIND_REQUEST, b"", "not UTF-8 JSON"),
        (KIND_REQUEST, b'{"id": 4, "params": {}}', 'lacks the string field "method"'),
        (KIND_REQUEST, b'{"id": 4, "method": 5}', '"method" must be a string'),
        (KIND_REQUEST, b'{"method": "ping"}', 'lacks the integer field "id"'),
        (KIND_REQUEST, b'{"id": "4", "method": "ping"}', '"id" must be an integer'),
        (KIND_REQUEST, b'{"id": true, "method": "ping"}', '"id" must be an integer'),
        (KIND_REQUEST, b'{"id": 4, "method": "ping", "params": []}', '"params" must be an object'),
        (KIND_RESPONSE, b'{"id": 4}', 'exactly one of "result" and "error"'),
        (KIND_RESPONSE, b'{"id": 4, "result": 1, "error": {}}', 'exactly one of "result"'),
        (KIND_RESPONSE, b'{"id": 4, "error": "boom"}', '"error" must be an object'),
        (KIND_RESPONSE, b'{"id": 4, "error": {"type": "X"}}', 'lacks the string field "code"'),
        (KIND_NOTIFICATION, b'{"params": {}}', 'lacks the string field "method"'),
    ],
)
def test_malformed_body_is_an_error_and_the_next_frame_still_decodes(
    kind: int, body: bytes, expected: str
) -> None:
    items = FrameDecoder().feed(raw_frame(kind, body) + encode_response(2, "ok"))
    assert len(items) == 2
    error = items[0]
    assert isinstance(error, ProtocolError) and not isinstance(error, FatalProtocolError)
    assert expected in str(error)
    assert error.kind == kind
    assert items[1] == Response(2, "ok")


def test_protocol_error_keeps_the_id_when_it_could_be_read() -> None:
    (error,) = FrameDecoder().feed(raw_frame(KIND_REQUEST, b'{"id": 12}'))
    assert isinstance(error, ProtocolError)
    assert (error.kind, error.id) == (KIND_REQUEST, 12)
    assert "id 12" in str(error)


def test_params_may_be_left_out() -> None:
    assert decode_one(raw_frame(KIND_REQUEST, b'{"id":1,"method":"ping"}')) == Request(1, "ping")


@pytest.mark.parametrize(
    ("length", "error"),
    [(MAX_FRAME + 1, FrameTooLarge), (2**32 - 1, FrameTooLarge), (0, EmptyFrame)],
)
def test_bad_length_is_fatal(length: int, error: type[FatalProtocolError]) -> None:
    decoder = FrameDecoder()
    good = encode_notification("load")
    with pytest.raises(error) as info:
        decoder.feed(good + struct.pack(">I", length) + b"\x01{}")
    assert info.value.decoded == [Notification("load", {})]
    assert str(length) in str(info.value)
    with pytest.raises(error):  # stays broken
        decoder.feed(good)
    assert decoder.eof() is None


def test_largest_frame_passes_the_length_check() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(struct.pack(">IB", MAX_FRAME, KIND_REQUEST)) == []
    assert decoder.eof() is not None


def test_encoding_a_frame_above_max_frame_fails() -> None:
    with pytest.raises(FrameTooLarge):
        encode_response(1, "x" * MAX_FRAME)


# -- errors -----------------------------------------------------------------------------------


def round_trip_error(exc: BaseException) -> SfuError:
    """``exc`` answered by a worker and raised on the front."""
    message = decode_one(encode_error(1, exc))
    assert isinstance(message, ErrorResponse)
    return message.exception()


def test_overloaded_round_trip_keeps_class_code_status_retry_after() -> None:
    back = round_trip_error(Overloaded("shedding load, retry in 7 s", retry_after=7))
    assert type(back) is Overloaded
    assert (back.code, back.status, back.message) == (
        "overloaded",
        503,
        "shedding load, retry in 7 s",
    )
    assert back.retry_after == 7
    assert back.headers == {"Retry-After": "7"}


def test_not_found_round_trip_keeps_class_code_status() -> None:
    back = round_trip_error(NotFound("room r9 not found", code="room_not_found"))
    assert type(back) is NotFound
    assert (back.code, back.status, str(back)) == ("room_not_found", 404, "room r9 not found")
    with pytest.raises(NotFound, match="room r9"):
        raise_remote(error_fields(NotFound("room r9 not found")))


def test_changed_status_survives() -> None:
    exc = Conflict("busy")
    exc.status = 423
    back = round_trip_error(exc)
    assert type(back) is Conflict and back.status == 423 and Conflict.status == 409


def test_non_sfu_error_becomes_a_generic_internal_error() -> None:
    fields = error_fields(KeyError("secret internals /srv/x.py line 3"))
    assert fields == {
        "type": "internal",
        "code": "internal",
        "message": "internal error",
        "status": 500,
    }
    back = round_trip_error(ZeroDivisionError("division by zero"))
    assert isinstance(back, RemoteError) and isinstance(back, SfuError)
    assert (back.code, back.status, back.message) == ("internal", 500, "internal error")


def test_unknown_error_type_keeps_status_code_and_type() -> None:
    fields = {
        "type": "Teapot",
        "code": "teapot",
        "message": "short",
        "status": 418,
        "retry_after": 2,
    }
    back = remote_exception(fields)
    assert isinstance(back, RemoteError)
    assert (back.status, back.code, back.message, back.retry_after) == (418, "teapot", "short", 2)
    assert back.headers == {"Retry-After": "2"}
    assert error_fields(back) == fields  # forwarded unchanged


# -- Channel ----------------------------------------------------------------------------------


@dataclass
class Peer:
    """One end of a connected socket pair, as a running Channel."""

    channel: Channel
    task: asyncio.Task[None]
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    notifications: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


async def make_peer(
    sock: socket.socket, handler: Callable[[str, dict[str, Any]], Any] | None = None
) -> Peer:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    peer: Peer

    async def handle(method: str, params: dict[str, Any]) -> Any:
        peer.requests.append((method, params))
        if handler is None:
            raise NotFound(f"unknown method {method}")
        result = handler(method, params)
        if asyncio.iscoroutine(result):
            result = await result
        return result

    channel = Channel(
        reader,
        writer,
        handler=handle,
        on_notification=lambda method, params: peer.notifications.append((method, params)),
        call_timeout=1.0,
        name="test",
    )
    peer = Peer(channel, asyncio.create_task(channel.run()))
    return peer


async def raw_end(sock: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(sock=sock)


async def read_message(reader: asyncio.StreamReader) -> Message | ProtocolError:
    head = await asyncio.wait_for(reader.readexactly(4), 1.0)
    (length,) = struct.unpack(">I", head)
    body = await reader.readexactly(length)
    (item,) = FrameDecoder().feed(head + body)
    return item


async def handle_echo(method: str, params: dict[str, Any]) -> Any:
    if method == "echo":
        return params
    if method == "sleep":
        await asyncio.sleep(params["s"])
        return "slept"
    if method == "overloaded":
        raise Overloaded("too busy", retry_after=3)
    if method == "bug":
        raise RuntimeError("traceback details")
    if method == "not_json":
        return {"x": object()}
    raise NotFound(f"unknown method {method}")


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Peer, Peer]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    front = await make_peer(a)
    worker = await make_peer(b, handle_echo)
    yield front, worker
    for peer in (front, worker):
        await peer.channel.aclose()
        await asyncio.wait_for(peer.task, 1.0)


async def test_call_and_response(pair: tuple[Peer, Peer]) -> None:
    front, worker = pair
    assert await front.channel.call("echo", {"a": [1, "é"]}) == {"a": [1, "é"]}
    results = await asyncio.gather(*(front.channel.call("echo", {"i": i}) for i in range(20)))
    assert results == [{"i": i} for i in range(20)]
    assert [params for _, params in worker.requests[1:]] == [{"i": i} for i in range(20)]
    assert front.channel.pending == 0


async def test_remote_errors_raise_their_own_class(pair: tuple[Peer, Peer]) -> None:
    front, _ = pair
    with pytest.raises(Overloaded) as overloaded:
        await front.channel.call("overloaded")
    assert (overloaded.value.retry_after, overloaded.value.status) == (3, 503)
    with pytest.raises(NotFound, match="unknown method nope"):
        await front.channel.call("nope")
    with pytest.raises(RemoteError) as internal:
        await front.channel.call("bug")
    assert internal.value.status == 500 and "traceback" not in internal.value.message
    with pytest.raises(RemoteError, match="internal error"):
        await front.channel.call("not_json")
    assert await front.channel.call("echo", {"still": "usable"}) == {"still": "usable"}


async def test_notifications_both_ways(pair: tuple[Peer, Peer]) -> None:
    front, worker = pair
    assert worker.channel.notify("load", {"cpu": 0.5})
    assert front.channel.notify("hello")
    await front.channel.call("echo")  # the notifications were written before the answer
    assert front.notifications == [("load", {"cpu": 0.5})]
    assert worker.notifications == [("hello", {})]


async def test_timeout_and_a_late_response_is_ignored(pair: tuple[Peer, Peer]) -> None:
    front, worker = pair
    with pytest.raises(ChannelTimeout, match="'sleep' within 0.05 s"):
        await front.channel.call("sleep", {"s": 0.15}, timeout=0.05)
    assert front.channel.pending == 0
    # the late answer comes while the next call waits; it answers nothing
    assert await front.channel.call("echo", {"n": 2}) == {"n": 2}
    assert not front.channel.closed and not worker.channel.closed


async def test_slow_request_does_not_block_reading_answers(pair: tuple[Peer, Peer]) -> None:
    front, worker = pair
    slow = asyncio.create_task(front.channel.call("sleep", {"s": 0.1}))
    await asyncio.sleep(0.01)
    # the worker's read loop still takes the front's answer while its handler sleeps
    with pytest.raises(NotFound):
        await worker.channel.call("anything", timeout=0.5)
    assert await slow == "slept"


async def test_requests_are_handled_one_at_a_time_in_order(pair: tuple[Peer, Peer]) -> None:
    front, worker = pair
    done: list[str] = []

    async def call(method: str, params: dict[str, Any]) -> None:
        await front.channel.call(method, params)
        done.append(method)

    await asyncio.gather(call("sleep", {"s": 0.05}), call("echo", {}))
    assert [method for method, _ in worker.requests] == ["sleep", "echo"]
    assert done == ["sleep", "echo"]


async def test_peer_closing_fails_pending_calls() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    front = await make_peer(a)
    reader, writer = await raw_end(b)
    calls = [asyncio.create_task(front.channel.call("ping", timeout=5.0)) for _ in range(3)]
    for _ in range(3):
        assert isinstance(await read_message(reader), Request)
    writer.close()
    await writer.wait_closed()
    for call in calls:
        with pytest.raises(ChannelClosed, match="closed by the peer"):
            await asyncio.wait_for(call, 1.0)
    await asyncio.wait_for(front.task, 1.0)
    assert front.channel.closed
    with pytest.raises(ChannelClosed):
        await front.channel.call("ping")
    assert not front.channel.notify("load")


async def test_close_fails_pending_calls(pair: tuple[Peer, Peer]) -> None:
    front, worker = pair
    call = asyncio.create_task(front.channel.call("sleep", {"s": 0.5}))
    await asyncio.sleep(0.01)
    front.channel.close()
    with pytest.raises(ChannelClosed):
        await call
    await asyncio.wait_for(worker.task, 1.0)  # the worker sees the end too
    assert worker.channel.closed


async def test_garbage_frame_in_the_middle_keeps_the_channel_usable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    worker = await make_peer(a, handle_echo)
    reader, writer = await raw_end(b)
    with caplog.at_level(logging.WARNING, logger="relay.workers.channel"):
        writer.write(raw_frame(KIND_REQUEST, b"{not json"))
        writer.write(raw_frame(7, b"{}"))
        writer.write(raw_frame(KIND_REQUEST, b'{"id": 5, "params": {}}'))  # no method
        writer.write(encode_request(6, "echo", {"ok": 1}))
        answer = await read_message(reader)
        assert isinstance(answer, ErrorResponse) and answer.id == 5
        bad = answer.exception()
        assert isinstance(bad, BadRequest) and bad.code == "protocol_error"
        assert "method" in bad.message
        assert await read_message(reader) == Response(6, {"ok": 1})
    assert "not UTF-8 JSON" in caplog.text and "unknown frame kind 7" in caplog.text
    assert not worker.channel.closed

    writer.close()
    await worker.channel.aclose()
    await asyncio.wait_for(worker.task, 1.0)


async def test_malformed_answer_fails_its_call_and_keeps_the_channel() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    front = await make_peer(a)
    reader, writer = await raw_end(b)
    first = asyncio.create_task(front.channel.call("ping"))
    second = asyncio.create_task(front.channel.call("ping"))
    one, two = await read_message(reader), await read_message(reader)
    assert isinstance(one, Request) and isinstance(two, Request)
    writer.write(raw_frame(KIND_RESPONSE, json.dumps({"id": one.id}).encode()))
    writer.write(encode_response(two.id, "pong"))
    with pytest.raises(ProtocolError, match='exactly one of "result" and "error"'):
        await first
    assert await second == "pong"
    assert not front.channel.closed
    writer.close()
    await asyncio.wait_for(front.task, 1.0)


async def test_too_large_frame_closes_the_channel() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    front = await make_peer(a)
    reader, writer = await raw_end(b)
    call = asyncio.create_task(front.channel.call("ping"))
    request = await read_message(reader)
    assert isinstance(request, Request)
    writer.write(encode_notification("load") + struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(ChannelClosed, match="protocol error"):
        await call
    await asyncio.wait_for(front.task, 1.0)
    assert front.notifications == [("load", {})]  # decoded before the bad length
    assert await reader.read() == b""  # the front closed its end
    writer.close()
