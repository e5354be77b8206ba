"""Simulcast: what choosing and switching layers costs a server, per forwarded packet and per
switch, on the relay and on Janus in one run.

One publisher sends three RID simulcast layers of VP8 (``a=rid:q/h/f send`` and
``a=simulcast:send q;h;f``; each layer its own SSRC, every packet with the ``mid`` and
``rtp-stream-id`` header extensions), about 150 kbit/s, 500 kbit/s and 1.5 Mbit/s, to N
subscribers; a third of them asks for each layer (the relay: ``max_height`` through the
subscription preferences API; Janus: the videoroom's ``substream``). Every payload is a valid
VP8 payload: a descriptor with a 15-bit PictureID, TL0PICIDX and TID 0 (the servers renumber
them across layer switches), the VP8 frame tag, and on keyframes the start code and the
layer's picture size; the stamp of :mod:`bench.loadgen` (stream, index, send time) is the last
18 bytes, so a receiver knows which layer each packet came from.

Windows, each on the same connections:

- ``simulcast``: the layers held; server CPU per forwarded and per received packet.
- ``no_feedback`` (fresh connections whose answers drop transport-cc): the same window
  without estimation. The ``simulcast`` window's CPU less what its forwarded packets cost
  here, over the feedback packets it got, is the server's CPU per feedback packet (stamping
  transport-wide sequence numbers, the feedback itself, the estimate, probes, allocation).
- ``switching`` (on the ``no_feedback`` connections): every ``switch_period`` seconds each
  subscriber asks for a layer (relay: ``PUT .../subscriptions/{track}`` with ``max_height``;
  Janus: ``configure`` with ``substream``): the next one for the subscribers in whole triples
  (q, h, f rotate, so the mix of layers and the packets forwarded stay those of the steady
  window), the same one for the others. Without an estimate every move is taken at the
  target's next keyframe on both servers.
- ``requests`` (the same connections, back on their first layers): the same requests, each
  for the layer the subscriber is on already: the signalling alone. Its CPU above the
  ``no_feedback`` window's, per request, is the CPU per request; the ``switching`` window's
  CPU above this one's, per layer change the receivers saw, is the CPU per switch beyond its
  request (the keyframe request, the switch, the renumbering).
- ``single_layer`` (fresh connections): the same publisher sending one non-simulcast VP8
  stream at the three layers' total rate, every subscriber receiving it: the cost without
  simulcast.

Receivers send transport-cc feedback every 100 ms when the server's offer has the extension
(as browsers do), and answer with RTX when offered, so the relay estimates each subscriber's
bandwidth (and probes it) and chooses layers within that estimate and the size wishes; the
settling waits (up to ``max_settle``) until every subscriber is on the layer it asks for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.load import CONNECT_TIMEOUT, Progress, Run, _no_progress
from bench.loadgen import MAGIC, Conn, MediaSpec, SendStream, with_candidate
from bench.servers import Server
from bench.systems import JanusSystem, RelaySystem, SignallingError
from relay.client.peer import MID_EXT_ID, VIDEO_PT, RemoteDescription, build_rtp
from relay.rtc.extensions import (
    MID_URI,
    REPAIRED_RTP_STREAM_ID_URI,
    RTP_STREAM_ID_URI,
    TRANSPORT_CC_URI,
)
from relay.rtc.rtp import build_extension_block
from relay.rtc.srtp import SrtpError
from relay.rtc.twcc import TwccRecorder

RID_EXT_ID = 10
RRID_EXT_ID = 11
RTX_PT = 97
_STAMP = struct.Struct("!IIq")  # as in bench.loadgen: stream id, packet index, send time (ns)
STAMP_SIZE = len(MAGIC) + _STAMP.size
DESCRIPTOR_SIZE = 6
FEEDBACK_INTERVAL = 0.1  # seconds between two transport-cc feedbacks of a receiver


@dataclass(frozen=True)
class Layer:
    """One simulcast layer: its rid, picture size and what it sends."""

    rid: str
    width: int
    height: int
    spec: MediaSpec

    def describe(self) -> dict[str, Any]:
        return {
            "rid": self.rid,
            "width": self.width,
            "height": self.height,
            "packet_bytes": self.spec.size,
            "packets_per_second": round(self.spec.packets_per_second, 1),
            "bitrate_bps": round(self.spec.bitrate),
        }


#: Browser-like layers of a 1280x720 camera at 30 fps (q, h, f).
LAYERS: tuple[Layer, ...] = (
    Layer("q", 320, 180, MediaSpec("video", 625, 30.0, 1.0)),
    Layer("h", 640, 360, MediaSpec("video", 1042, 30.0, 2.0)),
    Layer("f", 1280, 720, MediaSpec.video(bitrate=1.5e6, size=1200, fps=30.0)),
)


def single_layer(layers: Sequence[Layer] = LAYERS) -> Layer:
    """One non-simulcast stream at the layers' total bit rate (1200-byte packets)."""
    total = sum(layer.spec.bitrate for layer in layers)
    top = layers[-1]
    return Layer("", top.width, top.height, MediaSpec.video(bitrate=total, size=1200, fps=30.0))


# ---------------------------------------------------------------------------------------------
# Publisher: the offer and the VP8 packets


def publisher_offer(conn: Conn, layers: Sequence[Layer], ssrc: int) -> str:
    """A browser-like offer of one video m-line: VP8 with RTX, mid and (for several layers)
    rid extensions, ``a=rid``/``a=simulcast`` for several layers, ``a=ssrc`` for one."""
    assert conn.peer is not None
    stream_id, track_id = secrets.token_hex(8), secrets.token_hex(8)
    lines = [
        "v=0",
        f"o=- {secrets.randbits(62)} 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0",
        "a=extmap-allow-mixed",
        f"a=msid-semantic: WMS {stream_id}",
        f"m=video 9 UDP/TLS/RTP/SAVPF {VIDEO_PT} {RTX_PT}",
        "c=IN IP4 0.0.0.0",
        "a=rtcp:9 IN IP4 0.0.0.0",
        "a=ice-ufrag:placeholder",
        "a=ice-pwd:placeholder",
        "a=ice-options:trickle",
        "a=fingerprint:sha-256 placeholder",
        "a=setup:actpass",
        "a=mid:0",
        f"a=extmap:{MID_EXT_ID} {MID_URI}",
    ]
    simulcast = len(layers) > 1
    if simulcast:
        lines += [
            f"a=extmap:{RID_EXT_ID} {RTP_STREAM_ID_URI}",
            f"a=extmap:{RRID_EXT_ID} {REPAIRED_RTP_STREAM_ID_URI}",
        ]
    lines += [
        "a=sendonly",
        f"a=msid:{stream_id} {track_id}",
        "a=rtcp-mux",
        "a=rtcp-rsize",
        f"a=rtpmap:{VIDEO_PT} VP8/90000",
        f"a=rtcp-fb:{VIDEO_PT} ccm fir",
        f"a=rtcp-fb:{VIDEO_PT} nack",
        f"a=rtcp-fb:{VIDEO_PT} nack pli",
        f"a=rtpmap:{RTX_PT} rtx/90000",
        f"a=fmtp:{RTX_PT} apt={VIDEO_PT}",
    ]
    if simulcast:
        lines += [f"a=rid:{layer.rid} send" for layer in layers]
        lines.append("a=simulcast:send " + ";".join(layer.rid for layer in layers))
    else:
        cname = secrets.token_hex(8)
        lines += [
            f"a=ssrc:{ssrc} cname:{cname}",
            f"a=ssrc:{ssrc} msid:{stream_id} {track_id}",
        ]
    offer = conn.peer.adopt_offer("\r\n".join(lines) + "\r\n")
    return with_candidate(offer, conn.host, conn.port)


def vp8_payload(
    picture_id: int, tl0picidx: int, start: bool, keyframe: bool, size: tuple[int, int]
) -> bytes:
    """A VP8 descriptor (X, S; I with a 15-bit PictureID, L, T with TID 0 and Y) and, in a
    frame's first packet, the frame tag (and a keyframe's start code and picture size)."""
    descriptor = bytes(
        [
            0x90 if start else 0x80,
            0xE0,  # I, L, T
            0x80 | (picture_id >> 8 & 0x7F),
            picture_id & 0xFF,
            tl0picidx & 0xFF,
            0x20,  # TID 0, Y
        ]
    )
    if not start:
        return descriptor
    if not keyframe:
        return descriptor + b"\x11\x00\x00"  # P=1 (interframe), show_frame
    width, height = size
    return descriptor + b"\x10\x02\x00\x9d\x01\x2a" + struct.pack("<HH", width, height)


class LayerStream(SendStream):
    """One layer (or the single stream) of the publisher: VP8 packets protected ahead."""

    def __init__(
        self, sid: int, conn: Conn, layer: Layer, ssrc: int, keyframe_every: int, rid: bool
    ) -> None:
        super().__init__(sid, conn, layer.spec, ssrc, mid="0")
        self.layer = layer
        self.keyframe_every = keyframe_every
        elements = [(MID_EXT_ID, b"0")]
        if rid:
            elements.append((RID_EXT_ID, layer.rid.encode()))
        self.mid_block = build_extension_block(elements)
        self.picture0 = (sid * 5000) & 0x7FFF
        self.keyframes = 0

    def protect_ahead(self, seconds: float) -> None:
        want = self.frame + int(seconds / self.interval) + 1
        peer = self.conn.peer
        protect = peer.srtp.protect if peer is not None and peer.srtp is not None else None
        block = self.mid_block
        overhead = 12 + len(block) + (16 if protect is not None else 0)
        size = (self.layer.width, self.layer.height)
        while self._protected_frames < want:
            f = self._protected_frames
            n = self._frame_packets(f)
            ts = (f * self.clock_step) & 0xFFFFFFFF
            keyframe = f % self.keyframe_every == 0
            self.keyframes += keyframe
            picture_id = (self.picture0 + f) & 0x7FFF
            for i in range(n):
                k = len(self.packets)
                head = vp8_payload(picture_id, f, i == 0, keyframe, size)
                sched = self.epoch_ns + int(f * self.interval * 1e9)
                stamp = MAGIC + _STAMP.pack(self.sid, k, sched)
                filler = max(0, self.spec.size - overhead - len(head) - len(stamp))
                payload = head + bytes(filler) + stamp
                packet = build_rtp(
                    self.ssrc, self.pt, self.seq0 + k, ts, payload, i == n - 1, block
                )
                self.packets.append(protect(packet) if protect is not None else packet)
            self.frame_sizes.append(n)
            self._protected_frames += 1


# ---------------------------------------------------------------------------------------------
# Subscribers: receivers that read the stamp at the payload's end and send transport-cc


def _extension(data: bytes, ext_id: int) -> bytes | None:
    """The value of one-byte-header extension element ``ext_id`` of a plain RTP packet."""
    if not data[0] & 0x10:
        return None
    off = 12 + ((data[0] & 0x0F) << 2)
    if data[off] != 0xBE or data[off + 1] != 0xDE:
        return None
    end = off + 4 + (((data[off + 2] << 8) | data[off + 3]) << 2)
    i = off + 4
    while i < end:
        b = data[i]
        if b == 0:
            i += 1
            continue
        ident, length = b >> 4, (b & 0x0F) + 1
        if ident == 15:
            return None
        if ident == ext_id:
            return data[i + 1 : i + 1 + length]
        i += 1 + length
    return None


class SimulcastConn(Conn):
    """A receiving connection: the stamp is the payload's last 18 bytes (the VP8 descriptor
    before it may be rewritten); retransmissions and probes (RTX) are counted apart; every
    packet with the transport-cc extension is recorded for feedback."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.twcc: TwccRecorder | None = None
        self.twcc_id = 0
        self.feedbacks = 0
        self.rtx = 0
        self._last_feedback = 0.0
        self.layer = 0  # index of the layer this subscriber asks for
        self.first_layer = 0  # the one it asked for first
        self.handle = 0  # Janus: the subscriber's handle
        self.sub_mid = "0"  # Janus: the subscriber's mid of the video
        self.video_pt = VIDEO_PT  # the payload type of the video in the server's offer

    def take_offer(self, remote: RemoteDescription) -> None:
        video = [m for m in remote.media if m.kind == "video" and m.payload_type is not None]
        if video:
            self.video_pt = video[0].payload_type or VIDEO_PT
            self.sub_mid = video[0].mid

    def enable_feedback(self, remote: RemoteDescription) -> None:
        ids = [m.extmaps[TRANSPORT_CC_URI] for m in remote.media if TRANSPORT_CC_URI in m.extmaps]
        media = [m.ssrc for m in remote.media if m.ssrc is not None]
        if ids:
            self.twcc_id = ids[0]
            self.twcc = TwccRecorder(
                sender_ssrc=secrets.randbits(32), media_ssrc=media[0] if media else 0
            )

    def _media(self, data: bytes, ts: int) -> None:
        rec = self.rec
        rec.packets += 1
        rec.bytes += len(data)
        try:
            data = self._unprotect(data)  # type: ignore[misc]
        except SrtpError:
            rec.errors += 1
            return
        if self.twcc is not None:
            value = _extension(data, self.twcc_id)
            if value is not None and len(value) >= 2:
                self.twcc.on_packet((value[0] << 8) | value[1], ts * 1e-9)
        if data[1] & 0x7F != self.video_pt:
            self.rtx += 1
            return
        end = len(data) - (data[-1] if data[0] & 0x20 else 0)
        if data[end - STAMP_SIZE : end - STAMP_SIZE + 2] != MAGIC:
            rec.unstamped += 1
            return
        sid, k, _sched = _STAMP.unpack_from(data, end - _STAMP.size)
        rec.stream.append(sid)
        rec.index.append(k)
        rec.time.append(ts)

    def tick(self) -> None:
        super().tick()
        twcc = self.twcc
        peer = self.peer
        if twcc is None or peer is None or peer.srtp is None or self.closed:
            return
        now = self.loop.time()
        if now - self._last_feedback < FEEDBACK_INTERVAL or not twcc.pending:
            return
        self._last_feedback = now
        for packet in twcc.build_feedback(now):
            self.sendto(peer.protect_rtcp(packet))
            self.feedbacks += 1


def with_rtx(answer: str, remote: RemoteDescription) -> str:
    """Our answer with the offer's RTX payload type kept on every video m-line that has one."""
    out: list[str] = []
    media = iter(remote.media)
    current = None
    for line in answer.split("\r\n"):
        if line.startswith("m="):
            current = next(media, None)
            codec = current.codec if current is not None else None
            rtx = getattr(codec, "rtx_payload_type", None)
            if line.startswith("m=video") and codec is not None and rtx is not None:
                line = f"{line} {rtx}"
        out.append(line)
        codec = current.codec if current is not None else None
        rtx = getattr(codec, "rtx_payload_type", None)
        if (
            codec is not None
            and rtx is not None
            and line.startswith(f"a=rtpmap:{codec.payload_type} ")
        ):
            out += [
                f"a=rtpmap:{rtx} rtx/{codec.clock_rate}",
                f"a=fmtp:{rtx} apt={codec.payload_type}",
            ]
    return "\r\n".join(out)


# ---------------------------------------------------------------------------------------------
# Signalling per system


class SimulcastRun(Run):
    """A :class:`bench.load.Run` with a simulcast publisher and layer-choosing subscribers."""

    def __init__(
        self,
        server: Server,
        progress: Progress = _no_progress,
        retries: int = 0,
        *,
        feedback: bool = True,
        profile_dir: Path | None = None,
    ) -> None:
        super().__init__(server, progress, profile_dir, retries)
        self.feedback = feedback
        self.track_id = ""
        self.layers: tuple[Layer, ...] = LAYERS
        self.feed = 0
        self.room = ""
        self.subscribers: list[SimulcastConn] = []

    async def __aenter__(self) -> SimulcastRun:
        await super().__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop, close the connections, and remove the room from the server (the next
        windows on the same server start without this one's participants)."""
        if self.sender is not None:
            await self.sender.stop()
            self.sender = None
        for conn in self.conns:
            conn.close()
        with contextlib.suppress(Exception):
            await self._drop_room()
        await super().__aexit__(*exc)

    async def _drop_room(self) -> None:
        system = self.system
        if not self.room:
            return
        if isinstance(system, RelaySystem):
            await system.http.delete(f"/v1/rooms/{self.room}")
        elif isinstance(system, JanusSystem) and self.room in system.rooms:
            await system._message(
                system._admin, {"request": "destroy", "room": system.rooms[self.room]}
            )

    def _conn(self, name: str, stamped: bool) -> Conn:
        conn = SimulcastConn(
            name, self.certificate, plain=False, stamped=True, host=self.system.bind_host
        )
        self.conns.append(conn)
        return conn

    async def publish(
        self, room: str, layers: Sequence[Layer], keyframe_every: int
    ) -> list[LayerStream]:
        self.layers = tuple(layers)
        conn = self._conn("pub", stamped=True)
        ssrcs = [self._next_ssrc + 1 + i for i in range(len(layers))]
        self._next_ssrc += len(layers)
        offer = publisher_offer(conn, layers, ssrcs[0])
        system = self.system
        if isinstance(system, RelaySystem):
            response = await system.http.post(
                f"/v1/rooms/{room}/participants/pub/publisher", json={"type": "offer", "sdp": offer}
            )
            if response.status_code >= 400:
                raise SignallingError(f"publisher offer: {response.status_code} {response.text}")
            remote = RemoteDescription.parse(response.json()["sdp"])
        elif isinstance(system, JanusSystem):
            handle = await system._attach()
            joined = await system._message(
                handle,
                {
                    "request": "join",
                    "ptype": "publisher",
                    "room": system.rooms[room],
                    "display": "pub",
                },
            )
            self.feed = int(joined["plugindata"]["data"]["id"])
            jsep: dict[str, Any] = {"type": "offer", "sdp": offer}
            if len(layers) > 1:
                # Janus reads the rids as listed high to low unless told otherwise
                jsep["rid_order"] = "lmh"
            event = await system._message(handle, {"request": "publish"}, jsep)
            answer = event.get("jsep")
            if not answer:
                raise SignallingError(f"janus gave no answer: {event}")
            remote = RemoteDescription.parse(answer["sdp"])
        else:
            raise SignallingError(f"no simulcast signalling for {system.name}")
        if len(layers) > 1 and "a=simulcast:recv" not in remote.sdp:
            raise SignallingError(f"{system.name} did not accept the simulcast offer")
        conn.set_remote(remote)
        conn.start()
        await conn.connected(CONNECT_TIMEOUT)
        streams = []
        for i, (layer, ssrc) in enumerate(zip(layers, ssrcs, strict=True)):
            stream = LayerStream(
                len(self.streams), conn, layer, ssrc, keyframe_every, rid=len(layers) > 1
            )
            stream.room, stream.who = room, "pub"  # type: ignore[attr-defined]
            stream.index = i  # type: ignore[attr-defined]
            self.streams.append(stream)
            streams.append(stream)
        if isinstance(system, RelaySystem):
            body = (await system.http.get(f"/v1/rooms/{room}/participants/pub")).json()
            self.track_id = body["tracks"][0]["track_id"]
        return streams

    async def subscribe(self, room: str, who: str, layer: int) -> SimulcastConn:
        conn = self._conn(who, stamped=True)
        assert isinstance(conn, SimulcastConn)
        conn.layer = conn.first_layer = layer
        system = self.system
        async with self._semaphore:
            if isinstance(system, RelaySystem):
                await self._relay_subscribe(system, room, who, conn)
            elif isinstance(system, JanusSystem):
                await self._janus_subscribe(system, room, conn)
            else:
                raise SignallingError(f"no simulcast signalling for {system.name}")
            conn.start()
            await conn.connected(CONNECT_TIMEOUT)
        if isinstance(system, RelaySystem) and len(self.layers) > 1:
            await self.choose(conn, layer)
        self.receivers.append(conn)
        self.subscribers.append(conn)
        return conn

    def _answer(self, conn: SimulcastConn, remote: RemoteDescription) -> str:
        conn.take_offer(remote)
        answer = with_rtx(conn.answer(remote), remote)
        if self.feedback:
            conn.enable_feedback(remote)
        else:  # no transport-cc: the server has no estimate for this subscriber
            answer = "\r\n".join(
                line
                for line in answer.split("\r\n")
                if TRANSPORT_CC_URI not in line and "transport-cc" not in line
            )
        return answer

    async def _relay_subscribe(
        self, system: RelaySystem, room: str, who: str, conn: SimulcastConn
    ) -> None:
        base = f"/v1/rooms/{room}/participants/{who}/subscriber"
        for _ in range(5):
            response = await system.http.post(base)
            if response.status_code >= 400:
                raise SignallingError(f"subscriber offer: {response.status_code} {response.text}")
            body = response.json()
            remote = RemoteDescription.parse(body["sdp"], revision=body["revision"])
            answer = self._answer(conn, remote)
            response = await system.http.put(
                base, json={"type": "answer", "sdp": answer, "revision": body["revision"]}
            )
            if response.status_code == 409:
                continue
            if response.status_code >= 400:
                raise SignallingError(f"subscriber answer: {response.status_code} {response.text}")
            conn.set_remote(remote)
            return
        raise SignallingError("subscriber answer kept conflicting")

    async def _janus_subscribe(self, system: JanusSystem, room: str, conn: SimulcastConn) -> None:
        handle = await system._attach()
        stream: dict[str, Any] = {"feed": self.feed}
        if len(self.layers) > 1:
            stream["substream"] = conn.layer
        event = await system._message(
            handle,
            {
                "request": "join",
                "ptype": "subscriber",
                "room": system.rooms[room],
                "streams": [stream],
            },
        )
        jsep = event.get("jsep")
        if not jsep:
            raise SignallingError(f"janus gave no offer: {event}")
        remote = RemoteDescription.parse(jsep["sdp"])
        conn.handle = handle
        answer = self._answer(conn, remote)
        conn.set_remote(remote)
        await system._message(handle, {"request": "start"}, {"type": "answer", "sdp": answer})

    async def choose(self, conn: SimulcastConn, layer: int) -> None:
        """Ask the server for one layer for this subscriber."""
        conn.layer = layer
        system = self.system
        if isinstance(system, RelaySystem):
            who = conn.name
            path = f"/v1/rooms/{self.room}/participants/{who}/subscriptions/{self.track_id}"
            response = await system.http.put(path, json={"max_height": self.layers[layer].height})
            if response.status_code >= 400:
                raise SignallingError(f"PUT {path}: {response.status_code} {response.text}")
        elif isinstance(system, JanusSystem):
            await system._message(
                conn.handle,
                {"request": "configure", "streams": [{"mid": conn.sub_mid, "substream": layer}]},
            )

    def assign_receivers(self) -> None:
        """Each layer's stream lists the subscribers asking for it (expected packets)."""
        for stream in self.streams:
            index = getattr(stream, "index", 0)
            stream.receivers = [
                c for c in self.subscribers if len(self.layers) == 1 or c.layer == index
            ]


# ---------------------------------------------------------------------------------------------
# One system, one fan-out


def _layer_split(run: SimulcastRun) -> dict[str, Any]:
    """What each subscriber received in the last window: its main layer, and packets of
    another layer than the one it asked for."""
    by_sid = {s.sid: getattr(s, "index", 0) for s in run.streams}
    got = [0] * len(run.layers)
    wrong = 0
    silent = 0
    for conn in run.subscribers:
        sids = np.frombuffer(conn.rec.stream, dtype=np.int32)
        if sids.size == 0:
            silent += 1
            continue
        layers = np.array([by_sid.get(int(s), -1) for s in np.unique(sids)])
        counts = np.array([np.count_nonzero(sids == s) for s in np.unique(sids)])
        main = int(layers[int(np.argmax(counts))])
        if main >= 0:
            got[main] += 1
        wrong += int(
            np.count_nonzero(np.array([by_sid.get(int(s), -1) for s in sids]) != conn.layer)
        )
    return {
        "asked": {
            layer.rid or "single": sum(c.layer == i for c in run.subscribers)
            for i, layer in enumerate(run.layers)
        },
        "received_mostly": {layer.rid or "single": got[i] for i, layer in enumerate(run.layers)},
        "packets_of_another_layer": wrong,
        "subscribers_without_packets": silent,
    }


def _switches_seen(run: SimulcastRun) -> int:
    """Changes of layer in the packets each subscriber received in the last window."""
    by_sid = {s.sid: getattr(s, "index", 0) for s in run.streams}
    total = 0
    for conn in run.subscribers:
        sids = np.frombuffer(conn.rec.stream, dtype=np.int32)
        if sids.size > 1:
            layers = np.array([by_sid.get(int(s), -1) for s in sids])
            total += int(np.count_nonzero(layers[1:] != layers[:-1]))
    return total


def _feedback_state(run: SimulcastRun) -> dict[str, Any]:
    return {
        "feedback_packets": sum(c.feedbacks for c in run.subscribers),
        "rtx_packets_received": sum(c.rtx for c in run.subscribers),
        "transport_cc": any(c.twcc is not None for c in run.subscribers),
    }


def _per_packet(result: dict[str, Any]) -> None:
    cpu = result["server_cpu_s"]
    sent = result["sent_packets"]
    result["cpu_per_received_packet_us"] = cpu / sent * 1e6 if sent else None


async def _relay_estimates(run: SimulcastRun) -> dict[str, Any]:
    """The relay's view of every subscriber: estimate source, estimate, allocation."""
    system = run.system
    if not isinstance(system, RelaySystem):
        return {}
    values: list[float] = []
    sources: dict[str, int] = {}
    for conn in run.subscribers:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            body = (
                await system.http.get(f"/v1/rooms/{run.room}/participants/{conn.name}/stats")
            ).json()
            delivery = body.get("subscriber_delivery") or {}
            source = str(delivery.get("estimate_source"))
            sources[source] = sources.get(source, 0) + 1
            if delivery.get("estimated_bitrate") is not None:
                values.append(float(delivery["estimated_bitrate"]))
    return {
        "estimate_sources": sources,
        "estimated_bitrate_bps": {
            "min": min(values) if values else None,
            "median": float(np.median(values)) if values else None,
            "max": max(values) if values else None,
        },
    }


@dataclass
class Plan:
    """Sizes and switches of one fan-out's windows."""

    settle: float = 3.0
    max_settle: float = 20.0
    duration: float = 8.0
    switch_period: float = 1.0
    keyframe_every: int = 15
    #: subscribers send transport-cc feedback in the main simulcast window and the
    #: single-layer one; the switching window is on connections without (see the module doc)
    feedback: bool = True
    switching: bool = True
    single: bool = True
    retries: int = 0
    profile_dir: Path | None = None  # py-spy profiles of the relay's windows (``--profile``)


async def _room(run: SimulcastRun, prefix: str, subscribers: int) -> None:
    run.room = f"{prefix}{subscribers}-{secrets.token_hex(3)}"
    await run.system.create_room(run.room, subscribers + 2)
    await run.system.join(run.room, "pub", True, False)
    for i in range(subscribers):
        await run.system.join(run.room, f"s{i}", False, True)


async def _simulcast_windows(
    server: Server,
    subscribers: int,
    plan: Plan,
    feedback: bool,
    switching: bool,
    progress: Progress,
) -> dict[str, Any]:
    """Fresh connections: the steady simulcast window (and the switching window)."""
    out: dict[str, Any] = {}
    name = server.name
    async with SimulcastRun(
        server, progress, plan.retries, feedback=feedback, profile_dir=plan.profile_dir
    ) as run:
        await _room(run, "simulcast" if feedback else "nofeedback", subscribers)
        progress(f"{name}: simulcast publisher", None)
        await run.publish(run.room, LAYERS, plan.keyframe_every)
        run.start_sending()
        await asyncio.sleep(0.5)  # layers known (picture sizes) before the first subscriber

        async def one(i: int) -> None:
            await run.subscribe(run.room, f"s{i}", i % len(LAYERS))
            progress(f"{name}: {len(run.subscribers)}/{subscribers} subscribers", None)

        started = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(subscribers)))
        run.setup_seconds = time.monotonic() - started
        run.assign_receivers()
        progress(f"{name}: settling", None)
        out["settled"] = await _settle(run, plan.settle, plan.max_settle)
        fb0 = _feedback_state(run)
        steady = await run.measure_quietly(plan.duration)
        fb1 = _feedback_state(run)
        steady["layers"] = _layer_split(run)
        steady["layer_switches_seen"] = _switches_seen(run)
        steady["feedback_packets"] = fb1["feedback_packets"] - fb0["feedback_packets"]
        steady["rtx_packets_received"] = fb1["rtx_packets_received"] - fb0["rtx_packets_received"]
        steady["transport_cc_feedback"] = fb1["transport_cc"]
        steady["relay_estimates"] = await _relay_estimates(run)
        _per_packet(steady)
        out["simulcast"] = steady
        if switching:
            out["switching"] = await _switching(run, plan.duration, plan.switch_period, progress)
            # back to the layers of the steady window, moved at their keyframes, before the
            # requests window
            await asyncio.gather(*(run.choose(c, c.first_layer) for c in run.subscribers))
            run.assign_receivers()
            await _settle(run, 1.0, 5.0)
            out["requests"] = await _switching(
                run, plan.duration, plan.switch_period, progress, move=False
            )
            _switch_costs(steady, out["switching"], out["requests"])
    return out


async def run_fanout(
    server: Server, subscribers: int, plan: Plan, progress: Progress = _no_progress
) -> dict[str, Any]:
    """The simulcast, switching, no-feedback and single-layer windows of one system at one
    fan-out."""
    out: dict[str, Any] = {"subscribers": subscribers}
    name = server.name
    if plan.feedback:
        first = await _simulcast_windows(server, subscribers, plan, True, False, progress)
        out["settled"] = first["settled"]
        out["simulcast"] = first["simulcast"]
        progress(f"{name}: without feedback", None)
        bare = await _simulcast_windows(server, subscribers, plan, False, plan.switching, progress)
        out["no_feedback"] = bare["simulcast"]
        out["no_feedback"]["settled"] = bare["settled"]
        for window in ("switching", "requests"):
            if window in bare:
                out[window] = bare[window]
        out["estimation"] = _estimation(out["simulcast"], out["no_feedback"])
    else:
        out.update(
            await _simulcast_windows(server, subscribers, plan, False, plan.switching, progress)
        )
    if plan.single:
        progress(f"{name}: single layer", None)
        async with SimulcastRun(
            server, progress, plan.retries, feedback=plan.feedback, profile_dir=plan.profile_dir
        ) as run:
            await _room(run, "single", subscribers)
            await run.publish(run.room, (single_layer(),), plan.keyframe_every)
            run.start_sending()
            await asyncio.gather(*(run.subscribe(run.room, f"s{i}", 0) for i in range(subscribers)))
            run.assign_receivers()
            await asyncio.sleep(plan.settle)
            fb0 = _feedback_state(run)["feedback_packets"]
            result = await run.measure_quietly(plan.duration)
            result["feedback_packets"] = _feedback_state(run)["feedback_packets"] - fb0
            _per_packet(result)
            out["single_layer"] = result
    return out


def _estimation(with_fb: dict[str, Any], without: dict[str, Any]) -> dict[str, Any]:
    """CPU per transport-cc feedback packet in the running server: the steady simulcast
    window with feedback less what its forwarded packets cost without feedback, over the
    feedback packets of the window (so it includes everything feedback brings: stamping the
    transport-wide sequence numbers, the send history, the feedback's SRTCP and parsing, the
    estimate, probes and the allocation)."""
    base = without.get("cpu_per_packet_us")
    feedbacks = with_fb.get("feedback_packets") or 0
    if not base or not feedbacks:
        return {"extra_cpu_s": None, "cpu_per_feedback_us": None, "feedback_packets": feedbacks}
    extra = with_fb["server_cpu_s"] - base * 1e-6 * with_fb["forwarded_packets"]
    return {
        "extra_cpu_s": extra,
        "feedback_packets": feedbacks,
        "feedbacks_per_second": feedbacks / with_fb["window_s"],
        "cpu_per_feedback_us": extra / feedbacks * 1e6,
        "disturbed": bool(with_fb.get("disturbed") or without.get("disturbed")),
    }


def _switch_costs(
    steady: dict[str, Any], switching: dict[str, Any], requests: dict[str, Any]
) -> None:
    """CPU per request (the ``requests`` window above the steady one) and per switch beyond
    its request (the ``switching`` window above the ``requests`` one), all on the same
    connections with the same mix of layers; also per switch with its request."""

    def rate(w: dict[str, Any]) -> float:
        return w["server_cpu_s"] / w["window_s"] if w["window_s"] else 0.0

    base = rate(steady)
    asked = requests["requests"]
    extra = (rate(requests) - base) * requests["window_s"]
    requests["extra_cpu_s"] = extra
    requests["cpu_per_request_us"] = extra / asked * 1e6 if asked else None
    seen = switching["layer_switches_seen"]
    beyond = (rate(switching) - rate(requests)) * switching["window_s"]
    total = (rate(switching) - base) * switching["window_s"]
    switching["extra_cpu_s"] = total
    switching["cpu_per_switch_us"] = beyond / seen * 1e6 if seen else None
    switching["cpu_per_switch_with_request_us"] = total / seen * 1e6 if seen else None
    asked = switching["requests"]
    switching["cpu_per_request_us"] = total / asked * 1e6 if asked else None


def _on_asked_layer(run: SimulcastRun) -> int:
    """Subscribers whose latest packet is of the layer they ask for."""
    by_sid = {s.sid: getattr(s, "index", 0) for s in run.streams}
    return sum(
        1 for c in run.subscribers if len(c.rec.stream) and by_sid.get(c.rec.stream[-1]) == c.layer
    )


async def _settle(run: SimulcastRun, settle: float, max_settle: float) -> dict[str, Any]:
    """Wait ``settle`` seconds, then on (at most ``max_settle`` in all) until every subscriber
    receives the layer it asks for (with transport-cc, the relay moves a subscriber up only
    when its estimate, grown by probes, carries the layer)."""
    started = time.monotonic()
    await asyncio.sleep(settle)
    while time.monotonic() - started < max_settle:
        if _on_asked_layer(run) == len(run.subscribers):
            break
        await asyncio.sleep(0.5)
    return {
        "seconds": round(time.monotonic() - started, 1),
        "on_asked_layer": _on_asked_layer(run),
        "subscribers": len(run.subscribers),
    }


async def _switching(
    run: SimulcastRun, duration: float, period: float, progress: Progress, move: bool = True
) -> dict[str, Any]:
    """Every subscriber asks for a layer every ``period`` seconds during one window: the next
    one (``move``, by whole triples) or again the one it is on (the request alone)."""
    requests = 0
    errors: list[str] = []

    stop = asyncio.Event()

    async def switcher() -> None:
        nonlocal requests
        n = len(run.layers)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period)
            if stop.is_set():
                return
            # whole triples rotate through the three layers, so the mix of layers (and the
            # packets forwarded) stays that of the steady window; the others ask again for
            # their layer (a request without a switch)
            movers = len(run.subscribers) // n * n if move else 0
            asks = [
                run.choose(c, (c.layer + (j < movers)) % n) for j, c in enumerate(run.subscribers)
            ]
            for outcome in await asyncio.gather(*asks, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    errors.append(str(outcome))
                else:
                    requests += 1

    progress(f"{run.system.name}: {'switching' if move else 'requests without a switch'}", None)
    task = asyncio.create_task(switcher(), name="switcher")
    try:
        await asyncio.sleep(period / 2)
        count0 = requests
        result = await run.measure(duration)
        count1 = requests
    finally:
        stop.set()  # the round of requests under way completes: the server has them all
        await task
    seen = _switches_seen(run)
    _per_packet(result)
    if move:
        for key in ("expected", "lost", "loss"):
            result[key] = None  # subscribers move between layers: no expected count per layer
    result["requests"] = count1 - count0
    result["request_errors"] = errors[:5]
    result["layer_switches_seen"] = seen
    result["disturbed"] = result["background_cpu_fraction"] > 0.3
    return result


# ---------------------------------------------------------------------------------------------
# Ratios


def ratios(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Relay ÷ Janus per fan-out (lower is better for the relay), and the relay's simulcast
    CPU per forwarded packet ÷ its single-layer one."""
    relay = {r["subscribers"]: r for r in runs.get("relay", [])}
    janus = {r["subscribers"]: r for r in runs.get("janus", [])}

    def get(r: dict[str, Any] | None, window: str, key: str) -> float | None:
        value = ((r or {}).get(window) or {}).get(key)
        return float(value) if value else None

    def div(a: float | None, b: float | None) -> float | None:
        # a difference of two windows can come out negative on a busy machine: no ratio then
        return a / b if a and b and a > 0 and b > 0 else None

    out: dict[str, Any] = {}
    for n in sorted(set(relay) | set(janus)):
        a, b = relay.get(n), janus.get(n)
        out[str(n)] = {
            "relay_vs_janus_cpu_per_forwarded_packet": div(
                get(a, "simulcast", "cpu_per_packet_us"), get(b, "simulcast", "cpu_per_packet_us")
            ),
            "relay_vs_janus_cpu_per_received_packet": div(
                get(a, "simulcast", "cpu_per_received_packet_us"),
                get(b, "simulcast", "cpu_per_received_packet_us"),
            ),
            "relay_vs_janus_cpu_per_feedback": div(
                get(a, "estimation", "cpu_per_feedback_us"),
                get(b, "estimation", "cpu_per_feedback_us"),
            ),
            "relay_vs_janus_cpu_per_switch": div(
                get(a, "switching", "cpu_per_switch_us"), get(b, "switching", "cpu_per_switch_us")
            ),
            "relay_vs_janus_cpu_per_switch_with_request": div(
                get(a, "switching", "cpu_per_switch_with_request_us"),
                get(b, "switching", "cpu_per_switch_with_request_us"),
            ),
            "relay_vs_janus_cpu_per_request_without_switch": div(
                get(a, "requests", "cpu_per_request_us"), get(b, "requests", "cpu_per_request_us")
            ),
            "relay_vs_janus_single_layer_cpu_per_forwarded_packet": div(
                get(a, "single_layer", "cpu_per_packet_us"),
                get(b, "single_layer", "cpu_per_packet_us"),
            ),
            "relay_simulcast_vs_single_layer_cpu_per_forwarded_packet": div(
                get(a, "simulcast", "cpu_per_packet_us"),
                get(a, "single_layer", "cpu_per_packet_us"),
            ),
            "janus_simulcast_vs_single_layer_cpu_per_forwarded_packet": div(
                get(b, "simulcast", "cpu_per_packet_us"),
                get(b, "single_layer", "cpu_per_packet_us"),
            ),
        }
    return out


def estimation_cost(packets_per_feedback: int, feedbacks: int) -> dict[str, Any]:
    """The relay's CPU per transport-cc feedback, in this process (bench.estimation)."""
    from bench.estimation import measure

    result: dict[str, Any] = dict(measure(max(1, packets_per_feedback), feedbacks))
    result["method"] = (
        "bench.estimation: TransportCcSender.on_feedback (send history, feedback report, GCC) "
        "timed with the thread CPU clock, in the bench process pinned to the server core"
    )
    result["pid"] = os.getpid()
    return result
