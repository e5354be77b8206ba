"""A naive relay built the obvious way on aiortc: a baseline for the bench, not a product.

Each publisher's tracks arrive on an ``RTCPeerConnection``; ``MediaRelay`` hands every
subscriber's ``RTCPeerConnection`` a proxy of each track. aiortc decodes every received frame
and encodes it again for each subscriber, which is what the relay is built to avoid.

It serves the relay's REST shape (no auth, only what the bench calls):
``POST /v1/rooms``, ``POST /v1/rooms/{room}/participants``,
``POST .../participants/{who}/publisher`` (offer -> answer),
``POST .../participants/{who}/subscriber`` (-> offer) and ``PUT`` (answer).
Everything binds to 127.0.0.1: aioice's host-address discovery is replaced by that one
address (it skips loopback otherwise).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import aioice.ice
import uvicorn
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamTrack
from fastapi import FastAPI, HTTPException

aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]  # loopback only


@dataclass
class Room:
    tracks: dict[str, list[MediaStreamTrack]] = field(default_factory=dict)
    connections: dict[str, RTCPeerConnection] = field(default_factory=dict)


def create_app() -> FastAPI:
    app = FastAPI(title="naive aiortc relay (bench baseline)")
    rooms: dict[str, Room] = {}
    relay = MediaRelay()

    def new_pc() -> RTCPeerConnection:
        return RTCPeerConnection(RTCConfiguration(iceServers=[]))

    def room_of(room_id: str) -> Room:
        room = rooms.get(room_id)
        if room is None:
            raise HTTPException(404, "room not found")
        return room

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/rooms", status_code=201)
    async def create_room(body: dict[str, Any]) -> dict[str, Any]:
        rooms.setdefault(body["room_id"], Room())
        return {"room_id": body["room_id"]}

    @app.post("/v1/rooms/{room_id}/participants", status_code=201)
    async def join(room_id: str, body: dict[str, Any]) -> dict[str, Any]:
        room_of(room_id)
        return {"participant_id": body["participant_id"], "room_id": room_id}

    @app.post("/v1/rooms/{room_id}/participants/{who}/publisher")
    async def publish(room_id: str, who: str, body: dict[str, Any]) -> dict[str, Any]:
        room = room_of(room_id)
        pc = new_pc()
        room.connections[f"{who}/pub"] = pc
        tracks = room.tracks.setdefault(who, [])

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            tracks.append(track)

        await pc.setRemoteDescription(RTCSessionDescription(body["sdp"], "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return {"type": "answer", "sdp": pc.localDescription.sdp}

    @app.post("/v1/rooms/{room_id}/participants/{who}/subscriber")
    async def subscriber_offer(room_id: str, who: str) -> dict[str, Any]:
        room = room_of(room_id)
        pc = new_pc()
        room.connections[f"{who}/sub"] = pc
        for publisher, tracks in room.tracks.items():
            if publisher != who:
                for track in tracks:
                    pc.addTrack(relay.subscribe(track))
        await pc.setLocalDescription(await pc.createOffer())
        return {"type": "offer", "sdp": pc.localDescription.sdp, "revision": 1}

    @app.put("/v1/rooms/{room_id}/participants/{who}/subscriber", status_code=204)
    async def subscriber_answer(room_id: str, who: str, body: dict[str, Any]) -> None:
        room = room_of(room_id)
        pc = room.connections.get(f"{who}/sub")
        if pc is None:
            raise HTTPException(409, "no offer")
        await pc.setRemoteDescription(RTCSessionDescription(body["sdp"], "answer"))

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import uvloop

    config = uvicorn.Config(
        create_app(), host="127.0.0.1", port=args.port, log_level="warning", loop="none"
    )
    uvloop.run(uvicorn.Server(config).serve())


if __name__ == "__main__":
    main()
