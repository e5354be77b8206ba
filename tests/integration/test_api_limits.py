"""The control API under connection pressure, against a real `relay serve`: idle sockets, the
connection cap, the header timeout, event-stream limits, dot identifiers, oversized headers
and SIGTERM with streams and a half-sent body in flight."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from relay.api.tokens import encode_token
from tests.integration.conftest import RunningRelay, auth_headers, start_relay, stop_relay

pytestmark = pytest.mark.integration

KEY = "testkey"
AUTH = auth_headers(KEY)
SECRET = "s" * 40
#: The soft open-file limit most systems give a service by default.
DEFAULT_SOFT_NOFILE = 1024


def _lower_soft_nofile() -> None:
    """In the child: the soft RLIMIT_NOFILE a service usually starts with."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(DEFAULT_SOFT_NOFILE, hard), hard))


def _start(tmp: Path, api: str = "", limits: str = "", extra: str = "") -> RunningRelay:
    """``relay serve`` with the given [api] and [limits] lines, soft RLIMIT_NOFILE 1024."""
    return start_relay(
        tmp, extra=f"[limits]\n{limits}\n{extra}", api=api, preexec_fn=_lower_soft_nofile
    )


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator:
    """Starts relays for one test and stops them at its end."""
    started: list[RunningRelay] = []

    def start(**options: str) -> RunningRelay:
        relay = _start(tmp_path, **options)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        stop_relay(relay)


@pytest.fixture
def many_files() -> Iterator[None]:
    """Raise this process's soft RLIMIT_NOFILE so that it can open thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4500:
        pytest.skip(f"hard RLIMIT_NOFILE {hard} is too low for 2,000 sockets on both ends")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _open_idle(port: int, count: int) -> list[socket.socket]:
    """``count`` TCP connections to the API that never send anything."""
    sockets = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        sockets.append(s)
    return sockets


def _closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """True if the peer closes ``s`` (EOF or reset) within ``timeout`` seconds."""
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def _timed_get(url: str, timeout: float = 5.0) -> tuple[float, int | None]:
    """Seconds to answer GET ``url`` and its status (None if it failed or timed out)."""
    started = time.monotonic()
    try:
        status: int | None = httpx.get(url, headers=AUTH, timeout=timeout).status_code
    except httpx.HTTPError:
        status = None
    return time.monotonic() - started, status


def _assert_json_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error


# --------------------------------------------------------------------------------------------
# Connections


def test_two_thousand_idle_sockets_leave_the_api_answering(spawn, many_files) -> None:
    """2,000 connections that never send a byte (a header timeout far away): a normal request
    is still answered within 1 s, and the relay says it raised its open-file limit."""
    relay = spawn(api="header_timeout = 60.0")
    idle = _open_idle(relay.api_port, 2000)
    try:
        time.sleep(1.0)  # let the relay accept what it can
        elapsed, status = _timed_get(f"{relay.api}/v1/rooms")
        print(f"GET /v1/rooms with 2000 idle sockets open: {status} in {elapsed * 1000:.0f} ms")
        assert status == 200 and elapsed < 1.0, (status, elapsed)
        assert relay.process.poll() is None
    finally:
        for s in idle:
            s.close()
    log = relay.log()
    assert "RLIMIT_NOFILE" in log, log
    assert "Traceback" not in log, log[-3000:]


def test_connection_cap_answers_503_with_the_json_error(spawn) -> None:
    """Every connection busy (event streams) at the cap: a new one gets 503, the JSON error and
    Retry-After at once; with a stream closed, requests are served again."""
    relay = spawn(api="max_connections = 4", limits="event_streams_per_key = 10")

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=relay.api, headers=AUTH, timeout=5) as http:
            streams = []
            for _ in range(4):
                request = http.build_request("GET", "/v1/events")
                response = await http.send(request, stream=True)
                assert response.status_code == 200
                streams.append(response)
            started = time.monotonic()
            async with httpx.AsyncClient(base_url=relay.api, headers=AUTH, timeout=5) as other:
                refused = await other.get("/v1/rooms")
                elapsed = time.monotonic() - started
                _assert_json_error(refused, 503, "unavailable")
                assert int(refused.headers["retry-after"]) >= 1
                assert elapsed < 1.0, elapsed
                print(f"over the connection cap: 503 in {elapsed * 1000:.0f} ms")
                await streams.pop().aclose()
                for _ in range(50):
                    answered = await other.get("/v1/rooms")
                    if answered.status_code == 200:
                        break
                    await asyncio.sleep(0.05)
                assert answered.status_code == 200, answered.text
            for response in streams:
                await response.aclose()

    asyncio.run(scenario())
    assert "Traceback" not in relay.log(), relay.log()[-3000:]


def test_idle_sockets_are_evicted_for_new_requests_at_the_cap(spawn) -> None:
    """At the cap with idle sockets only, a real request takes the place of the oldest one."""
    relay = spawn(api="max_connections = 16\nheader_timeout = 60.0")
    idle = _open_idle(relay.api_port, 40)
    try:
        time.sleep(0.5)
        elapsed, status = _timed_get(f"{relay.api}/v1/rooms")
        assert status == 200 and elapsed < 1.0, (status, elapsed)
        assert _closed_by_peer(idle[0], 2.0)  # the oldest idle one made room
    finally:
        for s in idle:
            s.close()


def test_idle_and_slow_connections_are_closed_after_the_header_timeout(spawn) -> None:
    relay = spawn(api="header_timeout = 1.0")
    silent = socket.create_connection(("127.0.0.1", relay.api_port))
    partial = socket.create_connection(("127.0.0.1", relay.api_port))
    partial.sendall(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n")  # never finishes its headers
    kept = socket.create_connection(("127.0.0.1", relay.api_port))
    kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
    try:
        started = time.monotonic()
        assert _closed_by_peer(silent, 4.0)
        assert _closed_by_peer(partial, 4.0)
        elapsed = time.monotonic() - started
        assert 0.5 < elapsed < 4.0, elapsed
        # a connection that sent its request got its answer first
        kept.settimeout(2)
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for s in (silent, partial, kept):
            s.close()


def test_oversized_headers_get_the_json_error(spawn) -> None:
    relay = spawn()
    with socket.create_connection(("127.0.0.1", relay.api_port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: relay\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), data[:200]
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["code"] == "headers_too_large"


# --------------------------------------------------------------------------------------------
# Event streams


def test_event_streams_are_limited_per_key_and_per_token(spawn) -> None:
    relay = spawn(
        limits="event_streams_per_key = 2\nevent_streams_per_token = 1",
        extra=f'[auth]\ntoken_secret = "{SECRET}"\n',
    )
    token = encode_token("r1", "alice", secret=SECRET, expires_at=time.time() + 600)
    token_auth = {"Authorization": f"Bearer {token}"}

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=relay.api, headers=AUTH, timeout=5) as http:
            assert (await http.post("/v1/rooms", json={"room_id": "r1"})).status_code == 201
            r = await http.post("/v1/rooms/r1/participants", json={"participant_id": "alice"})
            assert r.status_code == 201
            open_streams = []
            for _ in range(2):
                response = await http.send(http.build_request("GET", "/v1/events"), stream=True)
                assert response.status_code == 200
                open_streams.append(response)
            over = await http.get("/v1/events")
            _assert_json_error(over, 429, "too_many_streams")
            assert int(over.headers["retry-after"]) >= 1
            request = http.build_request("GET", "/v1/events?room_id=r1", headers=token_auth)
            mine = await http.send(request, stream=True)
            assert mine.status_code == 200  # the token has its own budget
            over = await http.get("/v1/events?room_id=r1", headers=token_auth)
            _assert_json_error(over, 429, "too_many_streams")
            await mine.aclose()
            await open_streams.pop().aclose()
            for _ in range(50):  # the slot is given back when the stream ends
                request = http.build_request("GET", "/v1/events?room_id=r1", headers=token_auth)
                retry = await http.send(request, stream=True)
                status = retry.status_code
                await retry.aclose()
                if status == 200:
                    break
                await asyncio.sleep(0.05)
            assert status == 200
            for response in open_streams:
                await response.aclose()

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------
# Identifiers


def test_delete_of_dotdot_participant_does_not_close_the_room(spawn) -> None:
    """No participant can be named ``.`` or ``..``, so kicking one that exists never makes an
    HTTP client collapse the path into ``DELETE /v1/rooms/{room}``; percent-encoded dot
    segments reach the relay as ids and are refused with 422, and the room stays open."""
    relay = spawn()
    with httpx.Client(base_url=relay.api, headers=AUTH, timeout=5) as http:
        assert http.post("/v1/rooms", json={"room_id": "r1"}).status_code == 201
        r = http.post("/v1/rooms/r1/participants", json={"participant_id": "alice"})
        assert r.status_code == 201
        for pid in ("..", ".", "a.", ".a"):
            r = http.post("/v1/rooms/r1/participants", json={"participant_id": pid})
            _assert_json_error(r, 422, "invalid_request")
        for raw in ("%2e%2e", "%2E%2E", ".%2e", "%2e", "a%2e"):
            r = http.delete(f"{relay.api}/v1/rooms/r1/participants/{raw}")
            _assert_json_error(r, 422, "invalid_request")
        room = http.get("/v1/rooms/r1")
        assert room.status_code == 200
        assert [p["participant_id"] for p in room.json()["participants"]] == ["alice"]
        for bad in ("..", ".a", "a."):
            r = http.post("/v1/rooms", json={"room_id": bad})
            _assert_json_error(r, 422, "invalid_request")
        # The client itself turns a literal ".." segment into the room's own path, which the
        # relay cannot tell from a real close: callers must check ids before building URLs.
        assert httpx.URL(f"{relay.api}/v1/rooms/r1/participants/..").path == "/v1/rooms/r1"


# --------------------------------------------------------------------------------------------
# Shutdown


def test_sigterm_with_event_streams_and_a_half_sent_body(spawn) -> None:
    """SIGTERM while event streams are open and a POST body is half sent: exit 0 within a few
    seconds, no traceback and no ERROR in the log."""
    relay = spawn()
    streams = []
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", relay.api_port), timeout=5)
        s.sendall(
            b"GET /v1/events HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\n\r\n"
        )
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        streams.append(s)
    half = socket.create_connection(("127.0.0.1", relay.api_port), timeout=5)
    half.sendall(
        b"POST /v1/rooms HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer "
        + KEY.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        + b'{"room_id": "r'
    )
    try:
        time.sleep(0.3)
        started = time.monotonic()
        relay.process.send_signal(signal.SIGTERM)
        code = relay.process.wait(timeout=10)
        elapsed = time.monotonic() - started
        log = relay.log()
        print(f"exit {code} {elapsed:.2f} s after SIGTERM")
        assert code == 0, log[-3000:]
        assert elapsed < 4.0, (elapsed, log[-3000:])
        assert "Traceback" not in log, log[-3000:]
        assert " ERROR " not in log and "ERROR:" not in log, log[-3000:]
    finally:
        for s in (*streams, half):
            s.close()
