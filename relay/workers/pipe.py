"""The pipe: one room's media between two worker processes, each with its own
:class:`~relay.sfu.sfu.Sfu`.

Each worker has one pipe socket (UDP on 127.0.0.1) and one :class:`PipeEndpoint` over it. A
participant's track is *exported* from the worker its publisher is connected to (the front
calls :meth:`PipeEndpoint.export_track` there, naming the importing worker's pipe address) and
*imported* by a worker that has subscribers for it (:meth:`PipeEndpoint.import_track`, with the
description the export returned).

What travels, plain RTP and RTCP (no SRTP: loopback between processes of one host):

- every packet the exported track (each simulcast layer) receives, retransmissions unwrapped
  from RTX included, unchanged but for its SSRC, replaced by a *pipe SSRC* the exporter
  allocates per (track or layer, peer); the sequence numbers and timestamps are the
  publisher's (:meth:`relay.sfu.track.Track.receive` makes the copies: :class:`PipeTap`);
- the publisher's sender reports, as a plain SR on the pipe SSRC;
- back from the importer, a PLI on a pipe SSRC when its subscribers want a keyframe (the
  exporter makes it its own keyframe request to the publisher, within its usual interval) and
  a NACK for packets lost on the pipe itself (answered from the exporter's packet history);
- a BYE on a pipe SSRC when the publisher's stream restarted under another SSRC (the
  importer's track starts over, its subscribers at the next keyframe);
- back from the importer, its *layer choices*: for each imported track, which of its streams
  (simulcast layers, or the track itself, audio included) its subscribers receive, move to or
  would rather get (while some subscriber receives a simulcast track, also its layers whose
  picture size is still unknown there, until their first keyframe tells it: layers are
  ranked by size), in an RTCP APP packet named ``LAYR`` (format below), sent when that set
  changes (before the keyframe request of a stream that becomes wanted), once more
  :data:`LAYERS_REPEAT` later, and every :data:`LAYERS_REFRESH` seconds for every imported
  track. The exporter copies (packets, sender reports, BYE, repairs) only the streams last
  said to be wanted, and counts only those as wanted by the pipe in its own
  ``publisher.layers`` announcement; a track nobody receives on the importer (every
  subscriber unsubscribed, paused or gone) is therefore not piped at all, its export kept to
  resume at once. A stream is copied until a message says otherwise: a lost message changes
  nothing until the next one repeats it, and until the first one arrives after an export
  everything is copied (a call starts without waiting). A stream wanted again starts over
  on the importer (its numbering, loss detection and history: the copies resume after a
  gap) and the exporter asks the publisher for a keyframe of it (within its usual
  interval), which the importer's subscribers start on.

The ``LAYR`` message (RFC 3550 §6.7 APP, subtype 0, no padding; big-endian)::

    |V=2|P=0| subtype 0 |  PT=204 APP  |  length (words - 1)  |
    |          SSRC: the importing endpoint's RTCP SSRC         |
    |                    name: ASCII "LAYR"                     |
    |  pipe SSRC of one stream of the track                     |  one 8-byte item per
    |  0x00000001 wanted, 0x00000000 not wanted                 |  stream of the track

Each item names a pipe SSRC the exporter allocated for that peer; items for an SSRC it does
not export there are ignored (``drops["unknown_ssrc"]``); a LAYR packet of another length,
subtype or flag value is dropped whole and counted (``drops["pipe_malformed"]``).

On the importing worker the publisher is a *remote participant*
(:meth:`relay.sfu.sfu.Sfu.remote_participant`): its tracks are ordinary
:class:`~relay.sfu.track.Track` objects that the pipe feeds instead of a publisher leg, with
their own packet history (they answer their subscribers' NACKs), keyframe detection and
simulcast layer switching; the room's participants subscribe to them as to local tracks.

:class:`PipeEndpoint` is sans-I/O: datagrams come in through
:meth:`PipeEndpoint.datagram_received` and leave through the ``send`` callable it is given
(a batch of ``(datagram, address)``). :func:`open_pipe` binds the socket for it in asyncio.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct
from collections.abc import Callable, Mapping
from typing import Any, cast

from relay.metrics import Metrics
from relay.rtc import rtcp
from relay.rtc.extensions import AUDIO_LEVEL_URI
from relay.rtc.rtp import RtpError, extension_profile, is_rtcp, parse_extensions, parse_rtp
from relay.rtc.sdp import Codec
from relay.sfu.errors import BadRequest, NotFound
from relay.sfu.feedback import MAX_NACK_ITEMS, NACK_CHUNK
from relay.sfu.publisher_leg import translate_sender_report
from relay.sfu.sfu import Sfu
from relay.sfu.track import PipeTap, Track
from relay.udp import BatchSender

__all__ = [
    "LAYERS_NAME",
    "LAYERS_REFRESH",
    "LAYERS_REPEAT",
    "Address",
    "PipeEndpoint",
    "PipeSocket",
    "Send",
    "layers_message",
    "open_pipe",
    "parse_layers_message",
    "peer_address",
]

#: a pipe socket's address: (host, port)
Address = tuple[str, int]
#: the pipe socket's batch send: every ``(datagram, address)`` of the list, in order
Send = Callable[[list[tuple[bytes | bytearray, Address]]], object]

_NO_EXTENSIONS: list[tuple[int, bytes]] = []

#: the name of the RTCP APP packet that carries an importer's layer choices
LAYERS_NAME = b"LAYR"
#: seconds between two sendings of every imported track's layer choices
LAYERS_REFRESH = 1.0
#: after a change, every track's choices go again this much later (a lost message heals
#: before a subscriber waiting for a keyframe gives up waiting)
LAYERS_REPEAT = 0.2
_APP_HEADER = struct.Struct("!BBHI4s")
_LAYER_ITEM = struct.Struct("!II")


def layers_message(sender_ssrc: int, items: list[tuple[int, bool]]) -> bytes:
    """A ``LAYR`` packet (see the module docstring): ``items`` are (pipe SSRC, wanted)."""
    body = b"".join(_LAYER_ITEM.pack(ssrc, int(wanted)) for ssrc, wanted in items)
    words = (8 + len(body)) // 4
    return _APP_HEADER.pack(0x80, rtcp.PT_APP, words, sender_ssrc, LAYERS_NAME) + body


def parse_layers_message(raw: bytes) -> list[tuple[int, bool]] | None:
    """The (pipe SSRC, wanted) items of an RTCP APP packet (the whole packet, as
    :class:`relay.rtc.rtcp.UnknownRtcp` keeps it) named ``LAYR``; None for an APP packet of
    another name; ValueError when it is a malformed ``LAYR``."""
    if len(raw) < 12 or raw[8:12] != LAYERS_NAME:
        return None
    first = raw[0]
    if first & 0x3F or (len(raw) - 12) % 8 or len(raw) == 12:  # padding, subtype, size
        raise ValueError("malformed LAYR packet")
    items = []
    for offset in range(12, len(raw), 8):
        ssrc, flags = _LAYER_ITEM.unpack_from(raw, offset)
        if flags > 1 or not ssrc:
            raise ValueError("malformed LAYR item")
        items.append((ssrc, flags == 1))
    return items


def peer_address(peer: Any) -> Address:
    """A peer's pipe address as the RPC carries it (``[host, port]``) as a tuple; BadRequest
    when it is not one."""
    if (
        isinstance(peer, (list, tuple))
        and len(peer) == 2
        and isinstance(peer[0], str)
        and isinstance(peer[1], int)
        and not isinstance(peer[1], bool)
        and 0 < peer[1] < 65536
    ):
        return (peer[0], peer[1])
    raise BadRequest("peer must be [host, port]", code="invalid_field")


class _Export:
    """One track exported to one peer: a tap on each stream that receives its packets (the
    track, or each simulcast layer, in order) and the description the importer was given."""

    __slots__ = ("room_id", "track", "peer", "taps", "description")

    def __init__(self, room_id: str, track: Track, peer: Address) -> None:
        self.room_id = room_id
        self.track = track
        self.peer = peer
        self.taps: list[PipeTap] = []
        self.description: dict[str, Any] = {}

    def stream(self, index: int) -> Track | None:
        """The stream the ``index``-th tap copies now (layers may be replaced when the
        publisher renegotiates; their taps move with their position)."""
        tap = self.taps[index]
        for stream in self.track.receive_streams():
            if tap in stream.pipes:
                return stream
        return None


class _Import:
    """One track imported from a peer: the remote participant's track, the pipe SSRCs that
    feed it and the streams they feed (its own, or its layers', in the description's order),
    and which of those streams the peer was last told are wanted (None: nothing told yet,
    the peer copies every one)."""

    __slots__ = ("room_id", "peer", "track", "ssrcs", "streams", "description", "wanted")

    def __init__(
        self, room_id: str, peer: Address, track: Track, description: dict[str, Any]
    ) -> None:
        self.room_id = room_id
        self.peer = peer
        self.track = track
        self.ssrcs: list[int] = []
        self.streams: list[Track] = []
        self.description = description
        self.wanted: list[bool] | None = None


class _PipeUpstream:
    """The feedback of an imported track, back over the pipe to the exporting worker
    (:class:`relay.sfu.track.Upstream`)."""

    __slots__ = ("endpoint", "peer", "imported")

    def __init__(self, endpoint: PipeEndpoint, imported: _Import) -> None:
        self.endpoint = endpoint
        self.peer = imported.peer
        self.imported = imported

    def send_keyframe_request(self, track: Track) -> None:
        if track.ssrc is not None:
            endpoint = self.endpoint
            # a stream wanted now is said to be before its keyframe is asked for
            endpoint.update_layers(self.imported)
            endpoint.keyframe_requests_sent += 1
            endpoint.send([(rtcp.pli(endpoint.rtcp_ssrc, track.ssrc), self.peer)])

    def layers_changed(self, track: Track) -> None:
        self.endpoint.update_layers(self.imported)

    def send_nack(self, track: Track, lost: list[int]) -> None:
        ssrc = track.ssrc
        if ssrc is None:
            return
        endpoint = self.endpoint
        endpoint.nacks_sent += len(lost)
        sender = endpoint.rtcp_ssrc
        endpoint.send(
            [
                (rtcp.nack(sender, ssrc, lost[i : i + NACK_CHUNK]), self.peer)
                for i in range(0, len(lost), NACK_CHUNK)
            ]
        )


class PipeEndpoint:
    """A worker's end of the pipes to the other workers: the tracks it exports (copies of
    their packets to each peer) and the tracks it imports (remote participants' tracks in its
    rooms, fed by the peers' copies). ``send`` is the pipe socket's batch send."""

    def __init__(self, sfu: Sfu, send: Send) -> None:
        self.sfu = sfu
        self.send = send
        self.metrics = sfu.metrics
        #: the sender SSRC of the RTCP this endpoint sends (PLI, NACK)
        self.rtcp_ssrc = secrets.randbits(32) or 1
        #: peers exported to or imported from (until :meth:`drop_peer`); anything else that
        #: reaches the socket is dropped
        self.peers: set[Address] = set()
        #: (room id, track id, peer) -> what is exported to that peer
        self._exports: dict[tuple[str, str, Address], _Export] = {}
        #: peer -> pipe SSRC -> (its export, the index of its tap)
        self._export_ssrcs: dict[Address, dict[int, tuple[_Export, int]]] = {}
        #: (room id, track id) -> what is imported
        self._imports: dict[tuple[str, str], _Import] = {}
        #: peer -> pipe SSRC -> the imported track (or layer) it feeds
        self._import_ssrcs: dict[Address, dict[int, Track]] = {}
        #: every pipe SSRC this endpoint allocated and still uses
        self._ssrcs_used: set[int] = set()
        self.packets_received = 0
        #: packets copied to exports that are gone (the counter must never go down)
        self.packets_sent_unexported = 0
        self.retransmissions = 0
        self.keyframe_requests_received = 0
        self.keyframe_requests_sent = 0
        self.nacks_sent = 0
        self.nacks_received = 0
        #: LAYR packets sent (changes and refreshes) and received
        self.layer_messages_sent = 0
        self.layer_messages_received = 0
        #: sends every imported track's layer choices again (armed while there are imports)
        self._layers_timer = sfu.timers.timer(self._refresh_layers)
        metrics = self.metrics
        metrics.counter(
            "pipe_packets_sent_total",
            "RTP packets copied to other workers' pipes (retransmissions not included).",
            lambda: (
                self.packets_sent_unexported
                + sum(t.packets for e in self._exports.values() for t in e.taps)
            ),
        )
        metrics.counter(
            "pipe_packets_received_total",
            "RTP packets received from other workers' pipes.",
            lambda: self.packets_received,
        )
        metrics.counter(
            "pipe_retransmissions_total",
            "Packets resent on a pipe for another worker's NACK.",
            lambda: self.retransmissions,
        )
        metrics.counter(
            "pipe_keyframe_requests_received_total",
            "Keyframe requests (PLI) received from other workers' pipes.",
            lambda: self.keyframe_requests_received,
        )
        metrics.counter(
            "pipe_layer_messages_received_total",
            "Layer choices (LAYR) received from other workers' pipes.",
            lambda: self.layer_messages_received,
        )
        metrics.gauge("pipe_exports", "Tracks exported, per peer.", lambda: len(self._exports))
        metrics.gauge("pipe_imports", "Tracks imported.", lambda: len(self._imports))

    # -- exporting ------------------------------------------------------------------------
    def export_track(self, room_id: str, track_id: str, peer: Any) -> dict[str, Any]:
        """Start copying a local participant's track (every simulcast layer) to ``peer``'s
        pipe; the description :meth:`import_track` takes there (JSON-serialisable). Exporting
        again to the same peer returns the same description and copies every stream again
        until the peer's next layer choices."""
        addr = peer_address(peer)
        self._sweep()
        key = (room_id, track_id, addr)
        existing = self._exports.get(key)
        if existing is not None:
            for index, tap in enumerate(existing.taps):
                if not tap.wanted:
                    self._set_wanted(existing, index, True, self.sfu.clock())
            self._announce(existing)
            return existing.description
        room = self.sfu.get_room(room_id)
        track = next(
            (
                p.tracks[track_id]
                for p in room.participants.values()
                if track_id in p.tracks and not p.tracks[track_id].ended
            ),
            None,
        )
        if track is None:
            raise NotFound(f"track {track_id} not found in room {room_id}", code="track_not_found")
        export = _Export(room_id, track, addr)
        peer_ssrcs = self._export_ssrcs.setdefault(addr, {})
        for index, stream in enumerate(track.receive_streams()):
            tap = PipeTap(self._new_ssrc(), addr, self.send)
            export.taps.append(tap)
            peer_ssrcs[tap.ssrc] = (export, index)
            stream.pipes = [*stream.pipes, tap]
        export.description = self._describe(track, export.taps)
        self._exports[key] = export
        self.peers.add(addr)
        return export.description

    def _sweep(self) -> None:
        """Forget the exports and imports of tracks that ended here (unpublished, their
        publisher gone, their room closed) without being unexported or removed."""
        for export in [e for e in self._exports.values() if e.track.ended]:
            self._unexport(export)
        for imported in [i for i in self._imports.values() if i.track.ended]:
            self._remove(imported)

    def _describe(self, track: Track, taps: list[PipeTap]) -> dict[str, Any]:
        codec = track.codec
        streams = track.receive_streams()
        return {
            "participant_id": track.participant_id,
            "track_id": track.track_id,
            "track": track.to_dict(),
            "kind": track.kind,
            "mid": track.mid,
            "codec": {
                "payload_type": codec.payload_type,
                "name": codec.name,
                "clock_rate": codec.clock_rate,
                "channels": codec.channels,
                "fmtp": dict(codec.fmtp),
                "rtcp_fb": list(codec.rtcp_fb),
            },
            # the publisher's header-extension ids, which the copies carry (JSON keys: text)
            "extensions": {str(ext_id): uri for ext_id, uri in track.ext_uris.items()},
            # a history on this side answers NACKs for packets lost on the pipe
            "nack": any(s.history is not None for s in streams),
            # muted by a moderator: the importing worker forwards nothing of it either
            "moderated": track.moderated,
            "ssrc": None if track.layers else taps[0].ssrc,
            "layers": [
                {
                    "rid": layer.rid,
                    "ssrc": tap.ssrc,
                    "width": layer.width or None,
                    "height": layer.height or None,
                }
                for layer, tap in zip(track.layers, taps, strict=False)
            ],
        }

    def _new_ssrc(self) -> int:
        used = self._ssrcs_used
        while True:
            ssrc = secrets.randbits(32)
            if ssrc and ssrc not in used:
                used.add(ssrc)
                return ssrc

    def unexport_track(self, room_id: str, track_id: str, peer: Any) -> None:
        """Stop copying a track to ``peer`` (nothing happens when it is not exported)."""
        export = self._exports.get((room_id, track_id, peer_address(peer)))
        if export is not None:
            self._unexport(export)

    def _unexport(self, export: _Export) -> None:
        self._exports.pop((export.room_id, export.track.track_id, export.peer), None)
        peer_ssrcs = self._export_ssrcs.get(export.peer, {})
        taps = export.taps
        for tap in taps:
            self.packets_sent_unexported += tap.packets
            peer_ssrcs.pop(tap.ssrc, None)
            self._ssrcs_used.discard(tap.ssrc)
        for stream in (export.track, *export.track.layers):
            if any(tap in stream.pipes for tap in taps):
                stream.pipes = [t for t in stream.pipes if t not in taps]

    # -- importing ------------------------------------------------------------------------
    def import_track(self, room_id: str, peer: Any, description: Mapping[str, Any]) -> None:
        """Add the track another worker exported (``description`` from its
        :meth:`export_track`) to the room: its publisher becomes a remote participant here
        and the room's participants subscribe to it as to a local track. Importing the same
        description again changes nothing; a new one for the same track replaces it."""
        addr = peer_address(peer)
        try:
            spec = _parse_description(description)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"bad track description: {exc}", code="invalid_field") from None
        track_id = spec["track_id"]
        self._sweep()
        current = self._imports.get((room_id, track_id))
        if current is not None:
            if current.peer == addr and current.description == spec:
                return
            self._remove(current)
        sfu = self.sfu
        participant = sfu.remote_participant(room_id, spec["participant_id"])
        codec: Codec = spec["codec"]
        ext_uris: dict[int, str] = spec["extensions"]
        track = Track(sfu.media, track_id, participant, spec["kind"], spec["mid"], codec, ext_uris)
        track.audio_level_id = next((i for i, u in ext_uris.items() if u == AUDIO_LEVEL_URI), 0)
        imported = _Import(room_id, addr, track, spec)
        upstream = _PipeUpstream(self, imported)
        track.upstream = upstream  # its subscribers' layer choices go over the pipe
        rtp = sfu.settings.rtp
        nack = rtp.nack and spec["nack"] and track.kind == "video"
        history_size = rtp.history_size if rtp.nack else 0
        now = sfu.clock()
        feeds: list[tuple[int, Track]] = []
        layers = spec["layers"]
        if len(layers) >= 2:
            track.enable_retransmission(False, 0)  # the layers receive, not the track
            for index, (rid, ssrc, width, height) in enumerate(layers):
                layer = Track(
                    sfu.media,
                    f"{track_id}.{rid if rid is not None else index}",
                    participant,
                    track.kind,
                    track.mid,
                    codec,
                    ext_uris,
                )
                layer.parent = track
                layer.rid = rid
                layer.width, layer.height = width, height
                track.layers.append(layer)
                feeds.append((ssrc, layer))
        else:
            ssrc = spec["ssrc"] if spec["ssrc"] is not None else layers[0][1]
            feeds.append((ssrc, track))
        for ssrc, stream in feeds:
            stream.upstream = upstream
            stream.ssrc_signalled = True
            stream.set_ssrc(ssrc, now)
            stream.enable_retransmission(nack, history_size)
        track.ssrc_signalled = True
        if spec["moderated"]:
            for stream in (track, *track.layers):
                stream.moderated = True
        try:
            sfu.publish_remote(track)
        except Exception:
            track.ended = True
            track.close()
            if not participant.tracks:
                participant.room.remote.pop(participant.participant_id, None)
            raise
        imported.ssrcs = [ssrc for ssrc, _s in feeds]
        imported.streams = [stream for _ssrc, stream in feeds]
        self._imports[(room_id, track_id)] = imported
        peer_ssrcs = self._import_ssrcs.setdefault(addr, {})
        for ssrc, stream in feeds:
            peer_ssrcs[ssrc] = stream
        self.peers.add(addr)
        self._layers_timer.arm_by(now + LAYERS_REFRESH)

    def remove_import(self, room_id: str, track_id: str) -> None:
        """The imported track is gone: its subscriptions end and the subscribers
        renegotiate (nothing happens when it is not imported)."""
        imported = self._imports.get((room_id, track_id))
        if imported is not None:
            self._remove(imported)

    def _remove(self, imported: _Import) -> None:
        self._imports.pop((imported.room_id, imported.track.track_id), None)
        peer_ssrcs = self._import_ssrcs.get(imported.peer, {})
        for ssrc in imported.ssrcs:
            if peer_ssrcs.get(ssrc) in (imported.track, *imported.track.layers):
                del peer_ssrcs[ssrc]
        if not imported.track.ended:
            self.sfu.unpublish_remote(imported.track)

    # -- layer choices --------------------------------------------------------------------
    def update_layers(self, imported: _Import) -> None:
        """Tell the exporting worker which streams of an imported track the subscribers here
        receive, move to or would rather get, when that changed since it was last told."""
        track = imported.track
        if track.ended or self._imports.get((imported.room_id, track.track_id)) is not imported:
            return
        wanted = _choices(imported)
        if wanted != imported.wanted:
            self._send_layers([imported], [wanted], self.sfu.clock())

    def _send_layers(
        self, imports: list[_Import], choices: list[list[bool]], now: float, change: bool = True
    ) -> None:
        """One LAYR packet per imported track, as one batch. A stream wanted again starts
        over here: the copies resume after a gap (its own numbering goes on there)."""
        batch: list[tuple[bytes | bytearray, Address]] = []
        for imported, wanted in zip(imports, choices, strict=True):
            before = imported.wanted
            for index, stream in enumerate(imported.streams):
                if wanted[index] and before is not None and not before[index]:
                    stream.restart_source(now)
            imported.wanted = wanted
            items = list(zip(imported.ssrcs, wanted, strict=True))
            batch.append((layers_message(self.rtcp_ssrc, items), imported.peer))
        if not batch:
            return
        self.layer_messages_sent += len(batch)
        self.send(batch)
        if change:  # once more soon, in case this one is lost
            self._layers_timer.arm_by(now + LAYERS_REPEAT)

    def _refresh_layers(self, now: float) -> None:
        """Every imported track's layer choices again (changed or not: the last ones may have
        been lost on the way)."""
        self._sweep()
        imports = list(self._imports.values())
        if not imports:
            return
        self._layers_timer.arm(now + LAYERS_REFRESH)
        self._send_layers(imports, [_choices(i) for i in imports], now, change=False)

    def _receive_layers(
        self, items: list[tuple[int, bool]], exports: dict[int, tuple[_Export, int]], now: float
    ) -> None:
        """The importer's layer choices: copy what it wants, stop what it does not."""
        self.layer_messages_received += 1
        changed: dict[int, _Export] = {}
        for ssrc, wanted in items:
            tapped = exports.get(ssrc)
            if tapped is None:
                self.metrics.drops["unknown_ssrc"] += 1
                continue
            export, index = tapped
            if export.taps[index].wanted != wanted:
                self._set_wanted(export, index, wanted, now)
                changed[id(export)] = export
        for export in changed.values():
            self._announce(export)

    def _set_wanted(self, export: _Export, index: int, wanted: bool, now: float) -> None:
        """Copy (or stop copying) one stream of an export. Wanted again, a video stream asks
        the publisher for a keyframe (within its interval; the importer's request, right
        behind, is then already answered): the importer's subscribers start on it."""
        export.taps[index].wanted = wanted
        if wanted:
            stream = export.stream(index)
            if stream is not None and not stream.ended and stream.kind == "video":
                stream.keyframes.request(now, force=True)

    def _announce(self, export: _Export) -> None:
        """``publisher.layers`` of an exported simulcast track, if the layers wanted changed."""
        track = export.track
        if track.layers and not track.ended:
            self.sfu.announce_layers(track)

    def drop_peer(self, peer: Any) -> None:
        """A worker is gone: stop exporting to it, remove every track imported from it."""
        addr = peer_address(peer)
        for export in [e for e in self._exports.values() if e.peer == addr]:
            self._unexport(export)
        for imported in [i for i in self._imports.values() if i.peer == addr]:
            self._remove(imported)
        self._export_ssrcs.pop(addr, None)
        self._import_ssrcs.pop(addr, None)
        self.peers.discard(addr)

    # -- the socket -----------------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: Any) -> None:
        """One datagram on the pipe socket: RTP of an imported track, or RTCP (sender
        reports and BYE for imported tracks; PLI, NACK and LAYR for exported ones)."""
        if addr not in self.peers:
            self.metrics.drops["pipe_unknown_peer"] += 1
            return
        if len(data) < 8 or data[0] >> 6 != 2:
            self.metrics.drops["pipe_malformed"] += 1
            return
        if is_rtcp(data):
            self._receive_rtcp(data, addr)
            return
        try:
            _pt, seq, ts, ssrc, _marker, offset, ext_offset, ext_length = parse_rtp(data)
            if ext_length:
                elements = parse_extensions(data, ext_offset, ext_length, extension_profile(data))
            else:
                elements = _NO_EXTENSIONS
        except RtpError:
            self.metrics.drops["pipe_malformed"] += 1
            return
        feeds = self._import_ssrcs.get(addr)
        track = feeds.get(ssrc) if feeds is not None else None
        if track is None or track.ended:
            self.metrics.drops["unknown_ssrc"] += 1
            return
        self.packets_received += 1
        highest = track.highest_seq
        if highest >= 0 and not 0 < ((seq - highest) & 0xFFFF) < 0x8000:
            # an older packet (a repair, or late): not twice to the subscribers
            history = track.history
            if history is not None and history.get(seq) is not None:
                self.metrics.drops["rtx_duplicate"] += 1
                return
        track.receive(data, seq, ts, offset, elements, len(data), self.sfu.clock())

    def _receive_rtcp(self, data: bytes, addr: Address) -> None:
        metrics = self.metrics
        try:
            packets = rtcp.parse_rtcp(data)
        except rtcp.RtcpError:
            metrics.drops["pipe_malformed"] += 1
            return
        metrics.rtcp_in += 1
        now = self.sfu.clock()
        imports = self._import_ssrcs.get(addr, {})
        exports = self._export_ssrcs.get(addr, {})
        for packet in packets:
            if isinstance(packet, rtcp.SenderReport):
                track = imports.get(packet.ssrc)
                if track is not None and not track.ended and track.stats is not None:
                    track.stats.on_sender_report(rtcp.ntp_middle32(packet.ntp_timestamp), now)
                    track.last_sr = (packet.ntp_timestamp, packet.rtp_timestamp, now)
                    translate_sender_report(track, packet, now)
            elif isinstance(packet, rtcp.Pli):
                self._keyframe_request(exports.get(packet.media_ssrc), now)
            elif isinstance(packet, rtcp.Fir):
                for ssrc, _seq in packet.entries:
                    self._keyframe_request(exports.get(ssrc), now)
            elif isinstance(packet, rtcp.Nack):
                self._resend(exports.get(packet.media_ssrc), packet.lost, addr, now)
            elif isinstance(packet, rtcp.Bye):
                for ssrc in packet.ssrcs:
                    track = imports.get(ssrc)
                    if track is not None and not track.ended:
                        track.restart_source(now)
            elif isinstance(packet, rtcp.UnknownRtcp) and packet.packet_type == rtcp.PT_APP:
                try:
                    items = parse_layers_message(packet.raw)
                except ValueError:
                    metrics.drops["pipe_malformed"] += 1
                    continue
                if items is not None:
                    self._receive_layers(items, exports, now)

    def _keyframe_request(self, tapped: tuple[_Export, int] | None, now: float) -> None:
        """A PLI from the importer: the exported stream's own (throttled) keyframe request."""
        if tapped is None:
            return
        export, index = tapped
        stream = export.stream(index)
        if stream is None or stream.ended or stream.kind != "video":
            return
        self.keyframe_requests_received += 1
        stream.keyframes.request(now, force=True)

    def _resend(
        self, tapped: tuple[_Export, int] | None, lost: list[int], addr: Address, now: float
    ) -> None:
        """A NACK from the importer: the packets from the exported stream's history, with the
        pipe SSRC."""
        if tapped is None:
            return
        export, index = tapped
        stream = export.stream(index)
        self.nacks_received += len(lost)
        history = stream.history if stream is not None else None
        if history is None or not export.taps[index].wanted:
            return
        ssrc = export.taps[index].ssrc.to_bytes(4, "big")
        batch: list[tuple[bytes | bytearray, Address]] = []
        for seq in lost[:MAX_NACK_ITEMS]:
            stored = history.get(seq, now)
            if stored is not None:
                copy = bytearray(stored)
                copy[8:12] = ssrc
                batch.append((copy, addr))
        if batch:
            self.retransmissions += len(batch)
            self.send(batch)


def _choices(imported: _Import) -> list[bool]:
    """Which streams of an imported track to ask for: those its subscribers here receive,
    move to or would rather get (:meth:`relay.sfu.track.Track.used_layers`), none when no
    subscription is active. While some are, a simulcast layer of unknown picture size that
    has not shown a keyframe here yet is asked for too, until its first keyframe tells its
    size: the layer choice ranks layers by size, which the description carries only when
    the exporter knew it."""
    track = imported.track
    used = track.used_layers()
    if not used:
        return [False] * len(imported.streams)
    ids = {id(t) for t in used}
    return [
        id(stream) in ids or (stream.parent is not None and not stream.height and _unseen(stream))
        for stream in imported.streams
    ]


def _unseen(stream: Track) -> bool:
    """No keyframe of ``stream`` arrived yet."""
    return stream.keyframes.arrived == float("-inf")


def _parse_description(description: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of an export description, checked and typed (KeyError, TypeError or
    ValueError naming what is wrong)."""

    def text(value: Any, name: str) -> str:
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string")
        return value

    def number(value: Any, name: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{name} must be an integer in [{low}, {high}]")
        return value

    kind = text(description["kind"], "kind")
    if kind not in ("audio", "video"):
        raise ValueError("kind must be audio or video")
    c = description["codec"]
    channels = c.get("channels")
    fmtp = c.get("fmtp") or {}
    rtcp_fb = c.get("rtcp_fb") or []
    if not isinstance(fmtp, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in fmtp.items()
    ):
        raise TypeError("codec.fmtp must map strings to strings")
    if not isinstance(rtcp_fb, list) or not all(isinstance(f, str) for f in rtcp_fb):
        raise TypeError("codec.rtcp_fb must be a list of strings")
    codec = Codec(
        payload_type=number(c["payload_type"], "codec.payload_type", 0, 127),
        name=text(c["name"], "codec.name"),
        clock_rate=number(c["clock_rate"], "codec.clock_rate", 1, 10_000_000),
        channels=None if channels is None else number(channels, "codec.channels", 1, 255),
        fmtp=dict(fmtp),
        rtcp_fb=list(rtcp_fb),
        kind=kind,
    )
    extensions = description.get("extensions") or {}
    if not isinstance(extensions, dict):
        raise TypeError("extensions must be an object")
    ext_uris = {
        number(int(k), "extension id", 1, 255): text(v, "extension uri")
        for k, v in extensions.items()
    }
    ssrc = description.get("ssrc")
    if ssrc is not None:
        ssrc = number(ssrc, "ssrc", 1, 0xFFFFFFFF)
    layers = []
    for layer in description.get("layers") or []:
        rid = layer.get("rid")
        if rid is not None:
            text(rid, "layers.rid")
        width, height = layer.get("width") or 0, layer.get("height") or 0
        layers.append(
            (
                rid,
                number(layer["ssrc"], "layers.ssrc", 1, 0xFFFFFFFF),
                number(width, "layers.width", 0, 65535),
                number(height, "layers.height", 0, 65535),
            )
        )
    if ssrc is None and not layers:
        raise ValueError("a description needs an ssrc or layers")
    return {
        "participant_id": text(description["participant_id"], "participant_id"),
        "track_id": text(description["track_id"], "track_id"),
        "kind": kind,
        "mid": text(description.get("mid", ""), "mid"),
        "codec": codec,
        "extensions": ext_uris,
        "nack": bool(description.get("nack", False)),
        "moderated": description.get("moderated", False) is True,
        "ssrc": ssrc,
        "layers": layers,
    }


class PipeSocket(asyncio.DatagramProtocol):
    """A worker's pipe socket in asyncio (``sock``, bound): datagrams go to
    :attr:`endpoint` (dropped as from an unknown peer until it is set); the endpoint's batches
    leave through :meth:`send`, several per system call (:class:`relay.udp.BatchSender`)."""

    def __init__(self, metrics: Metrics, sock: socket.socket) -> None:
        self.metrics = metrics
        self.sock = sock
        #: the port bound
        self.port: int = sock.getsockname()[1]
        self.endpoint: PipeEndpoint | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.sender: BatchSender | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        # direct sends wait while the transport still queues datagrams (none overtakes another)
        queued = getattr(transport, "get_write_buffer_size", None)
        self.sender = BatchSender(self.sock, self.transport.sendto, queued)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        endpoint = self.endpoint
        if endpoint is None:
            self.metrics.drops["pipe_unknown_peer"] += 1
            return
        endpoint.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.metrics.send_errors += 1  # a peer's socket is gone (ICMP port unreachable)

    def send(self, batch: list[tuple[bytes | bytearray, Address]]) -> None:
        transport, sender = self.transport, self.sender
        if transport is None or sender is None or transport.is_closing():
            return
        sender.send(batch)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        else:
            self.sock.close()


async def open_pipe(sfu: Sfu, host: str = "127.0.0.1", port: int = 0) -> PipeSocket:
    """Bind a worker's pipe socket (an ephemeral port on loopback unless told) with a
    :class:`PipeEndpoint` for ``sfu`` over it (``.endpoint``; the port bound is ``.port``)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    protocol = PipeSocket(sfu.metrics, sock)
    await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
    protocol.endpoint = PipeEndpoint(sfu, protocol.send)
    return protocol
