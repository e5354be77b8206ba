"""Signalling for each system under test: how a generator connection publishes or subscribes.

- relay: the control API (``/v1``) through :func:`relay.client.peer.negotiate_publisher` and
  :func:`relay.client.peer.negotiate_subscriber`;
- janus: the videoroom plugin over Janus's HTTP API (session, handles, long poll);
- naive_aiortc: the same REST shape as the relay, served by :mod:`bench.naive_aiortc`;
- ceiling: two registration datagrams, no WebRTC at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Sequence
from typing import Any

import httpx

from bench import netns
from bench.loadgen import Conn
from bench.servers import Server
from relay.client.peer import (
    RemoteDescription,
    TrackSpec,
    negotiate_publisher,
    negotiate_subscriber,
)


class SignallingError(RuntimeError):
    """The system under test refused or failed a signalling step."""


class System:
    """How connections join one system under test."""

    name = "system"
    plain = False  # no WebRTC (the ceiling)
    bind_host = "127.0.0.1"  # where the generator's sockets for this system bind

    def __init__(self, server: Server) -> None:
        self.server = server

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def create_room(self, room: str, capacity: int) -> None:
        return None

    async def join(self, room: str, who: str, publish: bool, subscribe: bool) -> None:
        return None

    async def publish(self, room: str, who: str, conn: Conn, tracks: Sequence[TrackSpec]) -> None:
        raise NotImplementedError

    async def subscribe(self, room: str, who: str, conn: Conn, publishers: Sequence[str]) -> None:
        raise NotImplementedError


class RelaySystem(System):
    name = "relay"

    async def open(self) -> None:
        self.http = httpx.AsyncClient(
            base_url=self.server.api_url,
            headers={"Authorization": f"Bearer {getattr(self.server, 'key', 'benchkey')}"},
            timeout=30.0,
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def _post(self, path: str, body: dict[str, Any]) -> None:
        response = await self.http.post(path, json=body)
        if response.status_code >= 400:
            raise SignallingError(f"POST {path}: {response.status_code} {response.text[:200]}")

    async def create_room(self, room: str, capacity: int) -> None:
        await self._post("/v1/rooms", {"room_id": room, "max_participants": capacity})

    async def join(self, room: str, who: str, publish: bool, subscribe: bool) -> None:
        await self._post(
            f"/v1/rooms/{room}/participants",
            {
                "participant_id": who,
                "can_publish": publish,
                "can_subscribe": subscribe,
                "auto_subscribe": True,
            },
        )

    async def publish(self, room: str, who: str, conn: Conn, tracks: Sequence[TrackSpec]) -> None:
        assert conn.peer is not None
        remote = await negotiate_publisher(self.http, room, who, conn.peer, tracks)
        conn.set_remote(remote, apply=False)
        conn.start()

    async def subscribe(self, room: str, who: str, conn: Conn, publishers: Sequence[str]) -> None:
        assert conn.peer is not None
        remote = await negotiate_subscriber(self.http, room, who, conn.peer)
        conn.set_remote(remote, apply=False)
        conn.start()

    async def metrics(self) -> dict[str, float]:
        """The relay's /metrics as ``{name{labels}: value}``."""
        values: dict[str, float] = {}
        with contextlib.suppress(httpx.HTTPError):
            text = (await self.http.get("/metrics")).text
            for line in text.splitlines():
                if line and not line.startswith("#"):
                    name, _, value = line.rpartition(" ")
                    with contextlib.suppress(ValueError):
                        values[name] = float(value)
        return values


class NaiveAiortcSystem(System):
    """The relay's REST shape, but the server is a full ICE agent: our SDP has a candidate."""

    name = "naive_aiortc"

    async def open(self) -> None:
        self.http = httpx.AsyncClient(base_url=self.server.api_url, timeout=60.0)

    async def close(self) -> None:
        await self.http.aclose()

    async def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        response = await self.http.request(method, path, json=body)
        if response.status_code >= 400:
            raise SignallingError(f"{method} {path}: {response.status_code} {response.text[:200]}")
        return response.json() if response.content else None

    async def create_room(self, room: str, capacity: int) -> None:
        await self._call("POST", "/v1/rooms", {"room_id": room})

    async def join(self, room: str, who: str, publish: bool, subscribe: bool) -> None:
        await self._call("POST", f"/v1/rooms/{room}/participants", {"participant_id": who})

    async def publish(self, room: str, who: str, conn: Conn, tracks: Sequence[TrackSpec]) -> None:
        offer = conn.offer(tracks)
        body = await self._call(
            "POST",
            f"/v1/rooms/{room}/participants/{who}/publisher",
            {"type": "offer", "sdp": offer},
        )
        conn.set_remote(RemoteDescription.parse(body["sdp"]))
        conn.start()

    async def subscribe(self, room: str, who: str, conn: Conn, publishers: Sequence[str]) -> None:
        base = f"/v1/rooms/{room}/participants/{who}/subscriber"
        body = await self._call("POST", base, None)
        remote = RemoteDescription.parse(body["sdp"], revision=body["revision"])
        answer = conn.answer(remote)
        conn.set_remote(remote)
        await self._call(
            "PUT", base, {"type": "answer", "sdp": answer, "revision": body["revision"]}
        )
        conn.start()


class JanusSystem(System):
    """Janus videoroom over the HTTP API: one session, one handle per connection."""

    name = "janus"
    bind_host = netns.CLIENT_ADDR

    async def open(self) -> None:
        self.http = httpx.AsyncClient(timeout=60.0)
        self.url = self.server.api_url
        self.pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.rooms: dict[str, int] = {}
        self.feeds: dict[tuple[str, str], int] = {}
        body = await self._post(self.url, {"janus": "create"})
        self.session = body["data"]["id"]
        self._poller = asyncio.create_task(self._poll(), name="janus-poll")
        self._admin = await self._attach()

    async def close(self) -> None:
        self._poller.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._poller
        with contextlib.suppress(Exception):
            await self._post(f"{self.url}/{self.session}", {"janus": "destroy"})
        await self.http.aclose()

    async def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        body = dict(body, transaction=body.get("transaction") or secrets.token_hex(8))
        response = await self.http.post(url, json=body)
        data = response.json()
        if data.get("janus") == "error":
            raise SignallingError(f"janus: {data.get('error')}")
        return data

    async def _poll(self) -> None:
        while True:
            try:
                response = await self.http.get(
                    f"{self.url}/{self.session}", params={"maxev": 10}, timeout=40.0
                )
                events = response.json()
            except (httpx.HTTPError, ValueError):
                await asyncio.sleep(0.1)
                continue
            if isinstance(events, dict):
                events = [events]
            for event in events:
                future = self.pending.get(event.get("transaction", ""))
                if future is not None and event.get("janus") == "event" and not future.done():
                    future.set_result(event)

    async def _attach(self) -> int:
        body = await self._post(
            f"{self.url}/{self.session}", {"janus": "attach", "plugin": "janus.plugin.videoroom"}
        )
        return int(body["data"]["id"])

    async def _message(
        self, handle: int, body: dict[str, Any], jsep: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        transaction = secrets.token_hex(8)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[transaction] = future
        try:
            request: dict[str, Any] = {"janus": "message", "body": body, "transaction": transaction}
            if jsep is not None:
                request["jsep"] = jsep
            reply = await self._post(f"{self.url}/{self.session}/{handle}", request)
            if reply.get("janus") == "success":
                event = reply
            else:
                event = await asyncio.wait_for(future, 30.0)
        finally:
            self.pending.pop(transaction, None)
        data = event.get("plugindata", {}).get("data", {})
        if "error" in data:
            raise SignallingError(f"janus videoroom: {data['error']}")
        return event

    async def create_room(self, room: str, capacity: int) -> None:
        number = secrets.randbelow(1 << 40) + 1  # rooms of earlier runs stay on the server
        self.rooms[room] = number
        await self._message(
            self._admin,
            {
                "request": "create",
                "room": number,
                "publishers": max(capacity, 1),
                "bitrate": 0,
                "fir_freq": 0,
                "audiocodec": "opus",
                "videocodec": "vp8",
                "notify_joining": False,
                "audiolevel_event": False,
            },
        )

    async def publish(self, room: str, who: str, conn: Conn, tracks: Sequence[TrackSpec]) -> None:
        handle = await self._attach()
        joined = await self._message(
            handle,
            {"request": "join", "ptype": "publisher", "room": self.rooms[room], "display": who},
        )
        self.feeds[(room, who)] = int(joined["plugindata"]["data"]["id"])
        offer = conn.offer(tracks)
        event = await self._message(
            handle,
            {"request": "publish", "audio": True, "video": True},
            {"type": "offer", "sdp": offer},
        )
        jsep = event.get("jsep")
        if not jsep:
            raise SignallingError(f"janus gave no answer: {event}")
        conn.set_remote(RemoteDescription.parse(jsep["sdp"]))
        conn.start()

    async def subscribe(self, room: str, who: str, conn: Conn, publishers: Sequence[str]) -> None:
        handle = await self._attach()
        streams = [{"feed": self.feeds[(room, p)]} for p in publishers if p != who]
        event = await self._message(
            handle,
            {
                "request": "join",
                "ptype": "subscriber",
                "room": self.rooms[room],
                "streams": streams,
            },
        )
        jsep = event.get("jsep")
        if not jsep:
            raise SignallingError(f"janus gave no offer: {event}")
        remote = RemoteDescription.parse(jsep["sdp"])
        answer = conn.answer(remote)
        conn.set_remote(remote)
        await self._message(handle, {"request": "start"}, {"type": "answer", "sdp": answer})
        conn.start()


class CeilingSystem(System):
    """The bare forwarder: a connection registers its address with one datagram."""

    name = "ceiling"
    plain = True

    async def publish(self, room: str, who: str, conn: Conn, tracks: Sequence[TrackSpec]) -> None:
        conn.plain_register(("127.0.0.1", self.server.media_port), f"PUB {room} {who}".encode())

    async def subscribe(self, room: str, who: str, conn: Conn, publishers: Sequence[str]) -> None:
        conn.plain_register(("127.0.0.1", self.server.media_port), f"SUB {room} {who}".encode())


SYSTEMS: dict[str, type[System]] = {
    "relay": RelaySystem,
    "janus": JanusSystem,
    "naive_aiortc": NaiveAiortcSystem,
    "ceiling": CeilingSystem,
}
