"""The SFU core, sans-I/O: rooms, participants, negotiation, timers.

Every method is synchronous. Time comes from the injected `clock` (monotonic, for protocol
timers) and `wallclock` (for timestamps shown to callers); datagrams leave through `send`;
events leave through `emit`. The asyncio layer (relay/server.py) owns the socket, the timers and
the HTTP server and calls in here.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from relay.config import Settings
from relay.metrics import Metrics
from relay.rtc import sdp as sdpmod
from relay.rtc.dtls import Certificate
from relay.rtc.extensions import (
    ABS_SEND_TIME_URI,
    AUDIO_LEVEL_URI,
    DEPENDENCY_DESCRIPTOR_URI,
    MID_URI,
    PLAYOUT_DELAY_URI,
    REPAIRED_RTP_STREAM_ID_URI,
    RTP_STREAM_ID_URI,
    TOFFSET_URI,
    TRANSPORT_CC_URI,
    VIDEO_ORIENTATION_URI,
)
from relay.rtc.gcc import BandwidthUsage
from relay.rtc.ice import IceCredentials
from relay.rtc.rtp import ExtensionRewriter
from relay.rtc.sdp import Codec, Extmap, LocalTransport, OfferedMedia, SdpError
from relay.rtc.transport import TransportState, WebRtcTransport
from relay.sfu import events
from relay.sfu.admission import OverloadDetector
from relay.sfu.allocation import (
    PROBATION,
    UP_MARGIN,
    Demand,
    allocate,
    hold_after,
    layer_cost,
    probe_target,
    wanted_rate,
)
from relay.sfu.datachannels import DataChannelRelay
from relay.sfu.errors import (
    BadRequest,
    Conflict,
    Draining,
    Forbidden,
    LimitReached,
    NotFound,
    TooLarge,
    participant_exists,
    participant_not_found,
    room_full,
    room_not_found,
)
from relay.sfu.feedback import NackResponder, publisher_feedback
from relay.sfu.leg import DatagramSender, Leg, MediaContext
from relay.sfu.participant import OfferState, Participant, Slot
from relay.sfu.port import MediaPort
from relay.sfu.publisher_leg import PublisherLeg
from relay.sfu.recording import TrackRecorders
from relay.sfu.room import Room
from relay.sfu.subscriber_leg import SubscriberLeg
from relay.sfu.subscription import PREFERENCES, Subscription
from relay.sfu.svc import LayerStats, choose_layers
from relay.sfu.timers import Timers
from relay.sfu.track import Track

log = logging.getLogger(__name__)

#: Room, participant and track ids: 1-64 characters of [A-Za-z0-9._-], no leading or trailing
#: ``.`` (so never ``.`` or ``..``, which HTTP clients collapse as path segments).
IDENTIFIER = re.compile(r"[A-Za-z0-9_-](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9_-])?\Z")


#: Header extensions the relay forwards to subscribers, with the ids it offers them. The same
#: URI has the same id on every m-line, as BUNDLE requires. Extensions that describe the sender's
#: own transport (abs-send-time, transport-wide-cc) are not forwarded: they would lie about ours.
SUBSCRIBER_EXTENSIONS: dict[str, int] = {
    AUDIO_LEVEL_URI: 1,
    DEPENDENCY_DESCRIPTOR_URI: 5,
    TRANSPORT_CC_URI: 3,
    MID_URI: 4,
    TOFFSET_URI: 14,
    VIDEO_ORIENTATION_URI: 13,
    PLAYOUT_DELAY_URI: 12,
}

#: Payload types handed out on subscriber connections, per kind, in order.
_PT_POOL = {
    "audio": [111, 110, 109, 108, 107, 106, 105, 104, 63, 62, 61, 60],
    "video": [96, 98, 100, 102, 104, 106, 45, 47, 49, 51, 53, 55, 57, 59, 112, 114, 116, 118],
}
#: The codec an inactive (placeholder) m-line carries.
_PLACEHOLDER = {
    "audio": Codec(
        payload_type=111,
        name="opus",
        clock_rate=48000,
        channels=2,
        fmtp={"minptime": "10", "useinbandfec": "1"},
        kind="audio",
    ),
    "video": Codec(payload_type=96, name="VP8", clock_rate=90000, kind="video"),
}
#: Characters of an ICE ufrag or password (RFC 8839 section 5.4).
_ICE_CHARS = re.compile(r"[A-Za-z0-9+/]+")
_SUBSCRIBER_RTCP_FB = {
    "audio": ["transport-cc"],
    "video": ["transport-cc", "goog-remb", "nack pli", "ccm fir"],
}

#: Shortest time between two layer allocations for one subscriber when its estimate drops.
REALLOCATE_INTERVAL = 0.2
#: An estimate below what a subscriber's layers take moves them down at once when under this
#: fraction of it, else after it stayed below for this many seconds.
DOWN_FAST = 0.75
DOWN_DELAY = 1.0
#: Seconds without packets after which a track is reported muted.
MUTE_AFTER = 3.0
#: Audio level (dBov below 0, as the extension carries it) quieter than this is silence.
SPEAKER_THRESHOLD = 60
#: Housekeeping period (consent, statistics, speaker, empty rooms), seconds.
HOUSEKEEPING_INTERVAL = 1.0


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(6)


def new_room(
    settings: Settings,
    rooms: dict[str, Room],
    room_id: str | None,
    max_participants: int | None,
    e2ee_required: bool,
    empty_timeout: float | None,
    codec_preference: Sequence[str] | None,
    created_at: float,
    now: float,
) -> Room:
    """A room checked against the settings' limits and the ``rooms`` that exist (not added to
    them); values left out come from the settings."""
    if room_id is None:
        room_id = _new_id("RM_")
    check_id(room_id, "room_id")
    if room_id in rooms:
        raise Conflict(f"room {room_id} already exists", code="room_exists")
    limits = settings.limits
    if len(rooms) >= limits.max_rooms:
        raise LimitReached(
            f"the relay already holds {limits.max_rooms} rooms", code="too_many_rooms"
        )
    if max_participants is None:
        max_participants = settings.rooms.default_max_participants
    if not 1 <= max_participants <= limits.max_participants_per_room:
        raise BadRequest(
            f"max_participants must be 1-{limits.max_participants_per_room}",
            code="invalid_field",
        )
    if empty_timeout is None:
        empty_timeout = settings.rooms.empty_timeout
    if not empty_timeout > 0:
        raise BadRequest("empty_timeout must be positive", code="invalid_field")
    preference = _codec_preference(
        settings.media.codec_preference if codec_preference is None else codec_preference
    )
    return Room(
        room_id,
        created_at,
        max_participants,
        bool(e2ee_required),
        float(empty_timeout),
        now,
        preference,
    )


def check_id(value: str, field: str) -> None:
    """An identifier of the API: 1-64 characters of [A-Za-z0-9._-], no leading or trailing
    dot."""
    if not isinstance(value, str) or not IDENTIFIER.match(value):
        raise BadRequest(
            f"{field} must be 1-64 characters of [A-Za-z0-9._-], not starting or ending with '.'",
            code="invalid_identifier",
        )


class Sfu:
    """Rooms, participants and their connections, driven by the control API and the socket."""

    def __init__(
        self,
        settings: Settings,
        *,
        certificate: Certificate,
        candidates: list[tuple[str, int]],
        sender: DatagramSender,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
        emit: Callable[[events.Event], None] = lambda event: None,
        metrics: Metrics | None = None,
        timers: Timers | None = None,
        tcp_candidates: Sequence[tuple[str, int]] = (),
    ) -> None:
        self.settings = settings
        self.certificate = certificate
        self.candidates = list(candidates)
        #: ICE-TCP: passive TCP host candidates, announced after the UDP ones (relay/tcp.py)
        self.tcp_candidates = list(tcp_candidates)
        self.clock = clock
        self.wallclock = wallclock
        self._emit = emit
        self.metrics = metrics or Metrics()
        self.rooms: dict[str, Room] = {}
        self.draining = False
        #: Load shedding: fed by the asyncio layer, consulted before every new session.
        self.overload = OverloadDetector(settings.overload)
        #: every deadline of the media plane (the asyncio layer fires them)
        self.timers = timers if timers is not None else Timers()
        self.media = MediaContext(settings, self.metrics, clock, self.timers, sender)
        self.port = MediaPort(self.media, self.on_leg_connected, self.on_leg_failed)
        #: the recording files this process writes (relay/sfu/recording.py)
        self.recording = TrackRecorders(settings.recording)
        #: data channels relayed between participants (relay/sfu/datachannels.py)
        self.datachannels = DataChannelRelay(settings.datachannels, self.metrics)
        self._session_id = secrets.randbits(62)
        self._last_housekeeping = clock()
        self._housekeeping = self.timers.timer(self.tick)
        self._housekeeping.arm(self._last_housekeeping + HOUSEKEEPING_INTERVAL)
        overload = self.overload
        self.metrics.gauge(
            "overload_shedding",
            "1 while new sessions are refused because the relay is overloaded, else 0.",
            lambda: float(overload.shedding),
        )
        self.metrics.gauge(
            "event_loop_lag_smoothed_seconds",
            "Event-loop lag, moving average (the load-shedding signal).",
            lambda: overload.loop_lag,
        )
        self.metrics.gauge(
            "forwarded_packet_rate",
            "RTP packets forwarded per second, moving average (the load-shedding signal).",
            lambda: overload.packet_rate,
        )
        self.metrics.counter(
            "overload_refused_sessions_total",
            "New sessions refused with 503 overloaded.",
            lambda: overload.refused,
        )
        self.metrics.counter(
            "overload_episodes_total",
            "Times load shedding started.",
            lambda: overload.episodes,
        )
        self.metrics.gauge("rooms", "Rooms open.", lambda: len(self.rooms))
        self.metrics.gauge(
            "participants",
            "Participants in all rooms.",
            lambda: sum(len(r.participants) for r in self.rooms.values()),
        )
        self.metrics.gauge(
            "tracks",
            "Published tracks.",
            lambda: sum(
                len(p.tracks) for r in self.rooms.values() for p in r.participants.values()
            ),
        )
        self.metrics.gauge(
            "subscriptions_active",
            "Subscriptions being forwarded.",
            lambda: sum(
                len(t.outputs)
                for r in self.rooms.values()
                for p in [*r.participants.values(), *r.remote.values()]
                for t in p.tracks.values()
            ),
        )

    # -- events ---------------------------------------------------------------------------
    def emit(self, event_type: type[events.Event], room: Room, **fields: Any) -> None:
        self._emit(event_type(room_id=room.room_id, at=self.wallclock(), **fields))

    # -- rooms ----------------------------------------------------------------------------
    def _check_id(self, value: str, field: str) -> None:
        check_id(value, field)

    def create_room(
        self,
        room_id: str | None = None,
        max_participants: int | None = None,
        e2ee_required: bool = False,
        empty_timeout: float | None = None,
        codec_preference: Sequence[str] | None = None,
    ) -> Room:
        """A new room; values left out come from the settings."""
        if self.draining:
            raise Draining("the relay is draining and accepts no new rooms")
        room = new_room(
            self.settings,
            self.rooms,
            room_id,
            max_participants,
            e2ee_required,
            empty_timeout,
            codec_preference,
            self.wallclock(),
            self.clock(),
        )
        self.rooms[room.room_id] = room
        log.info("room %s created", room.room_id)
        return room

    def list_rooms(self) -> list[Room]:
        return list(self.rooms.values())

    def get_room(self, room_id: str) -> Room:
        room = self.rooms.get(room_id)
        if room is None:
            raise room_not_found(room_id)
        return room

    def delete_room(self, room_id: str) -> None:
        room = self.get_room(room_id)
        for pid in list(room.participants):
            self._remove(room.participants[pid], "room_closed")
        self._end_remote(room)
        del self.rooms[room_id]
        self.datachannels.room_closed(room_id)
        self.emit(events.RoomClosed, room)
        log.info("room %s closed", room_id)

    # -- participants ---------------------------------------------------------------------
    def add_participant(
        self,
        room_id: str,
        participant_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        can_publish: bool = True,
        can_subscribe: bool = True,
        auto_subscribe: bool = True,
        e2ee: bool = False,
    ) -> Participant:
        if self.draining:
            raise Draining("the relay is draining and accepts no new participants")
        room = self.get_room(room_id)
        self.overload.check()
        if participant_id is None:
            participant_id = _new_id("PA_")
        self._check_id(participant_id, "participant_id")
        if participant_id in room.participants:
            raise participant_exists(room_id, participant_id)
        if len(room.participants) >= room.max_participants:
            raise room_full(room_id, room.max_participants)
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise BadRequest("metadata must be a JSON object", code="invalid_field")
        p = Participant(
            participant_id,
            room,
            metadata,
            self.wallclock(),
            bool(can_publish),
            bool(can_subscribe),
            bool(auto_subscribe),
            bool(e2ee),
        )
        p.joined_clock = self.clock()
        room.participants[participant_id] = p
        room.empty_since = None
        self.emit(
            events.ParticipantJoined,
            room,
            participant_id=participant_id,
            e2ee=p.e2ee,
            e2ee_required=room.e2ee_required,
        )
        if p.can_subscribe and p.auto_subscribe:
            for other in [*room.participants.values(), *room.remote.values()]:
                if other is not p:
                    for track in other.tracks.values():
                        self._subscribe(p, track)
        return p

    def get_participant(self, room_id: str, participant_id: str) -> Participant:
        room = self.get_room(room_id)
        p = room.participants.get(participant_id)
        if p is None:
            raise participant_not_found(room_id, participant_id)
        return p

    def remove_participant(self, room_id: str, participant_id: str, reason: str = "kicked") -> None:
        if reason not in ("left", "kicked"):
            raise BadRequest("reason must be left or kicked", code="invalid_field")
        self._remove(self.get_participant(room_id, participant_id), reason)

    def _remove(self, p: Participant, reason: str) -> None:
        room = p.room
        if room.participants.get(p.participant_id) is not p:
            return
        for track in list(p.tracks.values()):
            self._unpublish(track)
        for sub in list(p.subscriptions.values()):
            self._drop_subscription(sub)
        self.datachannels.participant_left(p)
        for leg in p.legs:
            self.port.remove(leg)
        p.publisher_leg = p.subscriber_leg = None
        p.state = "disconnected"
        del room.participants[p.participant_id]
        if not room.participants:
            room.empty_since = self.clock()
        self.emit(events.ParticipantLeft, room, participant_id=p.participant_id, reason=reason)
        log.info("participant %s left room %s (%s)", p.participant_id, room.room_id, reason)

    # -- publisher connection -------------------------------------------------------------
    def _local_transport(self, transport: WebRtcTransport, setup: str) -> LocalTransport:
        self._session_id += 1
        return LocalTransport(
            ice_ufrag=transport.local.ufrag,
            ice_pwd=transport.local.pwd,
            fingerprint=(self.certificate.algorithm, self.certificate.fingerprint),
            candidates=self.candidates,
            setup=setup,
            session_id=self._session_id,
            session_version=1,
            tcp_candidates=self.tcp_candidates,
        )

    def _check_sdp(self, sdp: str) -> None:
        if not isinstance(sdp, str) or not sdp.strip():
            raise BadRequest("sdp must be a non-empty string", code="bad_sdp")
        if len(sdp.encode()) > self.settings.limits.max_sdp_bytes:
            raise TooLarge(
                f"sdp larger than {self.settings.limits.max_sdp_bytes} bytes", code="too_large"
            )

    def publisher_offer(
        self, room_id: str, participant_id: str, sdp: str, e2ee: bool = False
    ) -> str:
        """Answer the client's offer for what it publishes; tracks are (un)published to match.
        ``e2ee``: the caller's credentials say the participant encrypts its media end to end
        (a token's ``e2ee`` claim); in a room that requires it, nobody else may publish."""
        p = self.get_participant(room_id, participant_id)
        if e2ee:
            p.e2ee = True
        if p.room.e2ee_required and not p.e2ee:
            raise Forbidden(
                f"room {room_id} requires end-to-end encrypted media: create the participant "
                "with e2ee true (or give it a token with the e2ee claim)",
                code="e2ee_required",
            )
        if p.publisher_leg is None:
            self.overload.check()  # a new connection; renegotiations are always answered
        self._check_sdp(sdp)
        try:
            offer = sdpmod.parse_sdp(sdp)
        except SdpError as exc:
            raise BadRequest(f"bad offer: {exc}", code="bad_sdp") from None
        leg = p.publisher_leg
        fresh = leg is None
        if leg is None:
            leg = PublisherLeg(self.media, p, self._new_transport("publisher"))
        transport = leg.transport
        try:
            answer_sdp, answered = sdpmod.build_answer(
                offer,
                self._local_transport(transport, "passive"),
                self.settings.rtp.congestion_control,
                codec_preference=p.room.codec_preference,
                data_channels=self._data_channel_size(),
            )
        except SdpError as exc:
            raise BadRequest(f"bad offer: {exc}", code="bad_sdp") from None
        accepted = [m for m in answered if not m.rejected]
        if not accepted:
            # each m-line's reason, e.g. that data channels are not supported
            reasons = "; ".join(f"m-line {m.offer.index} ({m.kind}): {m.reason}" for m in answered)
            raise BadRequest(
                f"bad offer: no m-line the relay can take: {reasons or 'the offer has none'}",
                code="bad_sdp",
            )
        first = accepted[0].offer
        if not first.ice_ufrag or not first.ice_pwd or not first.fingerprints:
            raise BadRequest(
                "bad offer: ICE credentials and DTLS fingerprint required", code="bad_sdp"
            )
        publishing = [m for m in accepted if m.direction == "recvonly" and m.codecs]
        if publishing and not p.can_publish:
            raise Forbidden("this participant may not publish", code="cannot_publish")
        kept = {m.mid for m in publishing}
        new_count = sum(1 for m in publishing if m.mid not in p.tracks_by_mid)
        remaining = sum(1 for t in p.tracks.values() if t.mid in kept)
        if remaining + new_count > self.settings.limits.max_tracks_per_participant:
            raise LimitReached(
                f"at most {self.settings.limits.max_tracks_per_participant} tracks per participant",
                code="too_many_tracks",
            )
        # Everything checked: commit.
        if fresh:
            p.publisher_leg = leg
            self.port.add(leg)
        transport.set_remote(
            first.ice_ufrag,
            first.ice_pwd,
            first.fingerprints,
            dtls_server=(first.setup or "actpass") != "passive",
        )
        leg.mid_ext_id = leg.repaired_rid_ext_id = leg.rid_ext_id = None
        for m in accepted:
            for ext in m.extmaps:
                if ext.uri == MID_URI:
                    leg.mid_ext_id = ext.id
                elif ext.uri == REPAIRED_RTP_STREAM_ID_URI:
                    leg.repaired_rid_ext_id = ext.id
                elif ext.uri == RTP_STREAM_ID_URI:
                    leg.rid_ext_id = ext.id
        self._configure_feedback(leg, accepted)
        for track in list(p.tracks.values()):
            if track.mid not in kept:
                self._unpublish(track)
        for m in publishing:
            self._publish_mline(p, leg, m)
        leg.route_payload_types()
        application = next((m for m in accepted if m.kind == "application"), None)
        if application is not None:
            self.datachannels.attach(
                leg,
                application.offer.sctp_port or sdpmod.SCTP_PORT,
                application.offer.max_message_size or 0,
            )
            if p.subscriber_leg is not None and not any(s.kind == "application" for s in p.slots):
                self._renegotiate(p)  # its subscriber connection gets data channels too
        self.port.send_handshake(leg, transport.maybe_start(self.clock()))
        return answer_sdp

    def _data_channel_size(self) -> int:
        """The ``a=max-message-size`` data channels are accepted with, 0 when they are off."""
        settings = self.settings.datachannels
        return settings.max_message_bytes if settings.enabled else 0

    def _configure_feedback(self, leg: PublisherLeg, accepted: list[sdpmod.AnsweredMedia]) -> None:
        """Bind the congestion-control feedback the answer accepted for a publisher."""
        uris = {e.uri: e.id for m in accepted for e in m.extmaps}
        feedback = {fb for m in accepted for c in m.codecs for fb in c.rtcp_fb}
        twcc_id = uris.get(TRANSPORT_CC_URI, 0) if "transport-cc" in feedback else 0
        chosen = publisher_feedback(
            leg, twcc_id, uris.get(ABS_SEND_TIME_URI, 0), "goog-remb" in feedback
        )
        if leg.feedback is not None and leg.feedback is not chosen:
            leg.feedback.close()
        leg.feedback = chosen

    def _publish_mline(self, p: Participant, leg: PublisherLeg, m: sdpmod.AnsweredMedia) -> None:
        codec = m.codecs[0]
        ext_uris = {e.id: e.uri for e in m.extmaps}
        track = p.tracks_by_mid.get(m.mid or "")
        new = track is None
        if track is None or track.codec.name.lower() != codec.name.lower() or track.kind != m.kind:
            if track is not None:
                self._unpublish(track)
            track = Track(self.media, _new_id("TR_"), p, m.kind, m.mid or "", codec, ext_uris)
            new = True
        else:
            track.codec = codec
            track.payload_type = codec.payload_type
            track.ext_uris = ext_uris
        track.audio_level_id = next((e.id for e in m.extmaps if e.uri == AUDIO_LEVEL_URI), 0)
        track.rtx_payload_type = codec.rtx_payload_type
        rtp = self.settings.rtp
        nack = rtp.nack and m.kind == "video" and "nack" in codec.rtcp_fb
        history_size = rtp.history_size if rtp.nack else 0
        self._configure_layers(leg, track, m, nack, history_size)
        if track.layers:
            track.enable_retransmission(False, 0)  # the layers receive, not the track
            media_ssrc = rtx_ssrc = None
        else:
            track.enable_retransmission(nack, history_size)
            media_ssrc, rtx_ssrc = _media_ssrcs(m.offer)
        track.ssrc_signalled = media_ssrc is not None or any(
            layer.ssrc_signalled for layer in track.layers
        )
        if media_ssrc is not None:
            # signalled SSRCs replace whatever was bound; unsignalled ones keep what the media
            # router learned from packets (by mid or payload type), which may be all there is
            leg.unroute(track)
            leg.ssrc_map[media_ssrc] = track
            track.set_ssrc(media_ssrc, self.clock())
            track.rtx_ssrc = rtx_ssrc
            if rtx_ssrc is not None and track.rtx_payload_type is not None:
                leg.rtx_map[rtx_ssrc] = track
        elif track.rtx_payload_type is None and track.rtx_ssrc is not None:
            leg.unroute(track)  # RTX no longer negotiated: its learned SSRC is unknown now
            track.rtx_ssrc = None
        if new:
            p.tracks[track.track_id] = track
            p.tracks_by_mid[track.mid] = track
            self.emit(
                events.TrackPublished,
                p.room,
                participant_id=p.participant_id,
                track=track.to_dict(),
            )
            for other in p.room.participants.values():
                if other is not p and other.can_subscribe and other.auto_subscribe:
                    self._subscribe(other, track)
            self._follow(track)
        else:
            for sub in track.subscriptions.values():
                self._configure_extensions(sub)

    def _configure_layers(
        self,
        leg: PublisherLeg,
        track: Track,
        m: sdpmod.AnsweredMedia,
        nack: bool,
        history_size: int,
    ) -> None:
        """Simulcast: one layer per stream the answer receives (RID layers, or the SSRCs of an
        ``a=ssrc-group:SIM``), each a Track of its own that the publisher leg routes to by rid
        or SSRC. Layers that stay the same keep their state; a changed list replaces them."""
        wanted = [(layer.rid, layer.ssrc, layer.rtx_ssrc) for layer in m.layers]
        if len(wanted) < 2:
            wanted = []
        current = [(layer.rid, layer.ssrc, layer.rtx_ssrc) for layer in track.layers]
        now = self.clock()
        if wanted != current:
            leg.unroute(track)
            for old in track.layers:
                old.ended = True
                old.close()
            # the layers piped to other workers stay piped, by position
            piped = [old.pipes for old in track.layers]
            track.layers = []
            for index, (rid, ssrc, rtx_ssrc) in enumerate(wanted):
                layer = Track(
                    self.media,
                    f"{track.track_id}.{rid if rid is not None else index}",
                    track.participant,
                    track.kind,
                    track.mid,
                    track.codec,
                    track.ext_uris,
                )
                layer.parent = track
                layer.rid = rid
                if index < len(piped) and piped[index]:
                    layer.pipes = piped[index]
                    layer.restart_pipes()
                if ssrc is not None:  # SSRC simulcast: the SDP names each layer's SSRCs
                    layer.ssrc_signalled = True
                    leg.ssrc_map[ssrc] = layer
                    layer.set_ssrc(ssrc, now)
                    layer.rtx_ssrc = rtx_ssrc
                track.layers.append(layer)
            for sub in track.subscriptions.values():
                sub.stream.track = track  # placed anew on a layer
                sub.stream.target = sub.stream.wanted = None
        for layer in track.layers:
            layer.codec = track.codec
            layer.payload_type = track.payload_type
            layer.ext_uris = track.ext_uris
            layer.rtx_payload_type = track.rtx_payload_type
            if layer.rtx_ssrc is not None and layer.rtx_payload_type is not None:
                leg.rtx_map[layer.rtx_ssrc] = layer
            layer.enable_retransmission(nack, history_size)
        for sub in track.subscriptions.values():
            sub.stream.rewrite_vp8(track.renumbers_vp8, self.settings.rtp.history_size)
        if track.layers:
            self._allocate(track, now)
            track.rebuild_outputs()

    def _allocate(self, track: Track, now: float) -> None:
        """Allocate anew for every subscriber of a simulcast track (its layers changed)."""
        if not track.layers:
            return
        for sub in list(track.subscriptions.values()):
            if sub.active:
                self._allocate_subscriber(sub.participant, now)

    def _allocate_subscriber(self, p: Participant, now: float) -> None:
        """Choose the layer of each simulcast track one subscriber receives (each stream's
        ``wanted`` layer), within its bandwidth estimate (relay/sfu/allocation.py): the best
        layers within its size limits that its estimate carries, explicit priority first, then
        the room's speaker, the rest round-robin; a subscriber without an estimate gets the
        best within its limits. Layers are ranked by the picture size their keyframes
        announced, else in the offer's order; a layer's cost is its peak bit rate of the
        last seconds (a path must carry its keyframe bursts too), or a nominal one for its
        size while the publisher does not send it. A move up needs the
        estimate to be confirmed (the detector not overusing; a probe is sent when more would
        be wanted than the estimate allows) and margin to spare.

        The stream's target is its wanted layer while that one sends, else the best sending
        layer at or below it (a layer the publisher stopped, for bandwidth or because nobody
        wanted it, is announced as wanted again and taken when it sends). A stream moving to
        another layer asks that layer for a keyframe (it switches there); the tracks whose
        targets moved get their fan-out rebuilt."""
        leg = p.subscriber_leg
        layered: list[tuple[Subscription, list[Track], list[Track]]] = []
        demands: list[Demand] = []
        svc_subs: list[tuple[Subscription, list[tuple[int, int]], Demand]] = []
        other = 0.0
        speaker = p.room.speaker
        for sub in p.subscriptions.values():
            if not sub.active:
                continue
            track = sub.track
            priority = 2 * sub.priority + (track.participant_id == speaker)
            if not track.layers:
                svc = track.svc
                options = _svc_choices(svc, sub) if svc is not None else []
                if svc is None or len(options) < 2:
                    if svc is not None and options:  # one choice: the wishes alone decide
                        sub.stream.set_layers(*_svc_limits(svc, options[-1]))
                    other += sub.bitrate
                    continue
                svc_subs.append((sub, options, _svc_demand(svc, sub, options, priority, now)))
                continue
            ranked = _ranked_layers(track)
            live = [t for t in ranked if t.packets and now - t.last_packet < 2.0]
            rates = [
                layer_cost(t.peak_bitrate if t in live else 0.0, t.height, i)
                for i, t in enumerate(ranked)
            ]
            on = sub.stream.target or sub.stream.track
            current = ranked.index(on) if on in ranked else None
            cap = ranked.index(_best_layer(ranked, sub))
            if current is not None and now < sub.hold_until:
                cap = min(cap, current)  # a move up failed lately: not yet again
            layered.append((sub, ranked, live))
            demands.append(Demand(rates, cap, current, priority))
        demands.extend(demand for _sub, _choices, demand in svc_subs)
        if not demands:
            if leg is not None:
                leg.allocated = 0.0
            return
        estimate: float | None = leg.estimate if leg is not None else None
        if leg is not None and estimate is not None:
            estimate = _budget(leg, estimate, now)
        confirmed = True
        if leg is not None and leg.twcc is not None:
            confirmed = leg.twcc.estimator.state is not BandwidthUsage.OVERUSING
        if estimate is not None and not confirmed:
            for demand in demands:  # no move up on an estimate the path is contradicting
                if demand.current is not None:
                    demand.cap = min(demand.cap, demand.current)
        choices = allocate(estimate, demands)
        for (sub, options, demand), choice in zip(svc_subs, choices[len(layered) :], strict=True):
            if choice != demand.current and demand.current is not None and estimate is not None:
                self._count_move(sub, choice > demand.current, now)
            sub.stream.set_layers(*_svc_limits(sub.track.svc, options[choice]))  # type: ignore[arg-type]
        changed: list[Track] = []
        rewished: list[Track] = []  # only a wanted layer moved (of interest to a pipe)
        for (sub, ranked, live), choice in zip(layered, choices, strict=False):
            wanted = ranked[choice]
            if live and wanted not in live:
                below = [t for t in live if ranked.index(t) <= choice]
                target = below[-1] if below else live[0]
            else:
                target = wanted
            stream = sub.stream
            if stream.wanted is not None and stream.wanted is not wanted and estimate is not None:
                before = ranked.index(stream.wanted) if stream.wanted in ranked else -1
                self._count_move(sub, choice > before, now)
            if stream.wanted is not wanted and sub.track.upstream is not None:
                rewished.append(sub.track)
            stream.wanted = wanted
            if target.svc is not None:  # a frame rate wish: the layer's temporal layers
                stream.set_layers(None, choose_layers(target.svc, None, None, sub.max_fps)[1])
            if stream.target is not target:
                stream.target = target
                changed.append(sub.track)
                if stream.track is not target and stream.track in ranked:
                    target.keyframes.request(now, force=True)
            elif stream.track is not target and stream.track in ranked:
                # still waiting for the target's keyframe: the request (or its answer) may
                # have been lost; ask again, within the requester's interval
                target.keyframes.request(now)
        if leg is not None:
            leg.allocated_at = now
            leg.allocated = (
                0.0
                if estimate is None
                else other + sum(d.rates[c] for d, c in zip(demands, choices, strict=True))
            )
            self._probe(leg, demands, choices, other, now)
        for track in dict.fromkeys(changed):
            track.rebuild_outputs()
        for track in dict.fromkeys(rewished):
            if track not in changed and track.upstream is not None:
                track.upstream.layers_changed(track)

    def _count_move(self, sub: Subscription, up: bool, now: float) -> None:
        """A layer move the estimate made; a move down soon after a move up holds the next."""
        self.metrics.layer_switches["up" if up else "down"] += 1
        if up:
            if now - sub.raised_at >= PROBATION:
                sub.failed_raises = 0  # the last move up held
            sub.raised_at = now
        elif now - sub.raised_at < PROBATION:
            sub.failed_raises += 1
            sub.hold_until = now + hold_after(sub.failed_raises)
            sub.raised_at = float("-inf")

    def _probe(
        self,
        leg: SubscriberLeg,
        demands: list[Demand],
        choices: list[int],
        other: float,
        now: float,
    ) -> None:
        """Probe the subscriber's path when its wishes ask for more than its estimate gives,
        or when they get all they ask for without :data:`UP_MARGIN` to spare: a publisher's
        encoder raises its rate as its own estimate grows, faster than the subscriber's
        estimate grows by itself (its delay-based increase stays within 1.5 x what is being
        acknowledged), and a stream that outgrows the estimate would lose layers on a path
        that carries it."""
        twcc, prober = leg.twcc, leg.prober
        if twcc is None or prober is None or prober.busy:
            return
        estimator = twcc.estimator
        if all(c >= d.cap for d, c in zip(demands, choices, strict=True)):
            if estimator.estimate >= UP_MARGIN * wanted_rate(demands, other):
                return
        target = probe_target(demands, other)
        if estimator.wants_probe(now, target):
            prober.start(estimator.probe_rate(target), now)

    def _on_estimate_drop(self, leg: SubscriberLeg, now: float) -> None:
        """The subscriber's estimate fell below what its allocation sends: allocate again
        now (at most every :data:`REALLOCATE_INTERVAL`) rather than at the next tick when it
        fell far below, or has been below for :data:`DOWN_DELAY`."""
        if now - leg.allocated_at < REALLOCATE_INTERVAL:
            return
        estimate = leg.estimate
        if estimate is not None and _budget(leg, estimate, now) < leg.allocated:
            self._allocate_subscriber(leg.participant, now)

    def announce_layers(self, track: Track) -> None:
        """``publisher.layers`` when the set of layers some subscriber receives, moves to or
        would rather get changed (nobody subscribed: none are wanted). A layer piped to
        another worker counts while that worker wants it (its subscribers choose there: the
        pipe tells, relay/workers/pipe.py). Once a second, and when a pipe's wishes change."""
        used = {id(t) for t in track.used_layers()}
        used.update(id(t) for t in track.layers if t.piped)
        wanted = [str(t.rid) for t in track.layers if id(t) in used]
        if wanted == track.wanted_layers:
            return
        track.wanted_layers = wanted
        self.emit(
            events.PublisherLayers,
            track.participant.room,
            participant_id=track.participant_id,
            track_id=track.track_id,
            wanted=wanted,
            unused=[str(t.rid) for t in track.layers if id(t) not in used],
        )

    def _unpublish(self, track: Track) -> None:
        p = track.participant
        track.ended = True
        track.close()
        p.tracks.pop(track.track_id, None)
        if p.tracks_by_mid.get(track.mid) is track:
            del p.tracks_by_mid[track.mid]
        leg = p.publisher_leg
        if leg is not None:
            leg.unroute(track)
            leg.route_payload_types()
        for sub in list(track.subscriptions.values()):
            self._drop_subscription(sub)
        track.outputs = []
        self.emit(
            events.TrackUnpublished,
            p.room,
            participant_id=p.participant_id,
            track_id=track.track_id,
        )

    # -- tracks of other workers (relay/workers/pipe.py) ----------------------------------
    def remote_participant(self, room_id: str, participant_id: str) -> Participant:
        """The stand-in, in this worker's shard of a room, for a participant connected to
        another worker whose tracks are imported here (made on first use). It is not one of
        the room's participants: not listed, not counted, no events, no timeouts."""
        room = self.get_room(room_id)
        self._check_id(participant_id, "participant_id")
        p = room.remote.get(participant_id)
        if p is not None:
            return p
        if participant_id in room.participants:
            raise Conflict(
                f"participant {participant_id} is in room {room_id} on this worker",
                code="participant_exists",
            )
        p = Participant(
            participant_id,
            room,
            {},
            self.wallclock(),
            can_publish=True,
            can_subscribe=False,
            auto_subscribe=False,
        )
        p.remote = True
        p.state = "connected"
        p.joined_clock = self.clock()
        room.remote[participant_id] = p
        return p

    def publish_remote(self, track: Track) -> None:
        """Publish a track imported from another worker (its participant is
        :meth:`remote_participant`'s): the room's participants subscribe to it as to a local
        track (auto-subscribe, renegotiation); no event of its own."""
        p = track.participant
        room = p.room
        if self.rooms.get(room.room_id) is not room or room.remote.get(p.participant_id) is not p:
            raise room_not_found(room.room_id)
        if any(
            track.track_id in q.tracks for q in [*room.participants.values(), *room.remote.values()]
        ):
            raise Conflict(
                f"track {track.track_id} already in room {room.room_id}", code="track_exists"
            )
        p.tracks[track.track_id] = track
        p.tracks_by_mid[track.mid] = track
        for other in room.participants.values():
            if other.can_subscribe and other.auto_subscribe:
                self._subscribe(other, track)
        self._follow(track)

    def unpublish_remote(self, track: Track) -> None:
        """End a track imported from another worker: its subscriptions end (the subscribers
        renegotiate); no event of its own. A remote participant left without tracks goes."""
        p = track.participant
        track.ended = True
        track.close()
        if p.tracks.get(track.track_id) is track:
            del p.tracks[track.track_id]
        if p.tracks_by_mid.get(track.mid) is track:
            del p.tracks_by_mid[track.mid]
        for sub in list(track.subscriptions.values()):
            self._drop_subscription(sub)
        track.outputs = []
        for layer in track.layers:
            layer.outputs = layer.pending = []
        room = p.room
        if not p.tracks and room.remote.get(p.participant_id) is p:
            del room.remote[p.participant_id]

    def _end_remote(self, room: Room) -> None:
        """The room closes: end the tracks it imported."""
        for p in list(room.remote.values()):
            for track in list(p.tracks.values()):
                self.unpublish_remote(track)

    # -- subscriptions --------------------------------------------------------------------
    def _payload_type(self, p: Participant, codec: Codec) -> int:
        key = (
            codec.kind,
            codec.name.lower(),
            codec.clock_rate,
            codec.channels,
            tuple(sorted((k.lower(), v) for k, v in codec.fmtp.items())),
        )
        pt = p.payload_types.get(key)
        if pt is None:
            used = set(p.payload_types.values())
            pt = next(x for x in _PT_POOL[codec.kind] if x not in used)
            p.payload_types[key] = pt
        return pt

    def _subscribe(self, p: Participant, track: Track) -> None:
        if track.track_id in p.subscriptions:
            return
        retransmit = self.settings.rtp.nack and track.kind == "video"
        used = {pt for key, pt in p.payload_types.items() if key[0] == track.kind}
        if len(used) + (2 if retransmit else 1) > len(_PT_POOL[track.kind]):
            log.warning(
                "participant %s: no payload type left for %s", p.participant_id, track.track_id
            )
            return
        slot = next((s for s in p.slots if s.subscription is None and s.kind == track.kind), None)
        if slot is None:
            slot = Slot(mid=str(len(p.slots)), kind=track.kind)
            p.slots.append(slot)
        sub = Subscription(track, p, slot.mid, self._payload_type(p, track.codec), self.metrics)
        if retransmit:
            sub.rtx_payload_type = self._payload_type(
                p,
                Codec(
                    payload_type=0,
                    name="rtx",
                    clock_rate=track.clock_rate,
                    fmtp={"apt": str(sub.payload_type)},
                    kind=track.kind,
                ),
            )
        self._bind(slot, sub)
        self._renegotiate(p)

    def _bind(self, slot: Slot, sub: Subscription) -> None:
        """``sub`` on the m-line ``slot``: known to its participant and its track (the undoing
        is :meth:`_drop_subscription`)."""
        sub.stream.rewrite_vp8(sub.track.renumbers_vp8, self.settings.rtp.history_size)
        slot.subscription = sub
        sub.participant.subscriptions[sub.track.track_id] = sub
        sub.track.subscriptions[sub.participant.participant_id] = sub

    def _drop_subscription(self, sub: Subscription) -> None:
        p = sub.participant
        sub.active = False
        sub.stream.detach()
        sub.track.subscriptions.pop(p.participant_id, None)
        sub.track.rebuild_outputs()
        p.subscriptions.pop(sub.track.track_id, None)
        for slot in p.slots:
            if slot.subscription is sub:
                slot.subscription = None
                if p.viewer is not None:
                    slot.retired = sub.retire()
        if p.room.participants.get(p.participant_id) is p:
            self._renegotiate(p)

    def _follow(self, track: Track) -> None:
        """A track was published: WHEP viewers whose scope takes it (all of the room, or its
        publisher) and that have an m-line of its kind whose track ended, answered in its
        format, take it there. They cannot renegotiate, so it goes on with that m-line's
        SSRC, payload type and numbering (:meth:`Subscription.resume`), from its next
        keyframe; a viewer of one track never moves."""
        for p in track.participant.room.participants.values():
            scope = p.viewer
            if (
                scope is None
                or p is track.participant
                or scope[1] is not None
                or scope[0] not in (None, track.participant_id)
                or p.subscriber_leg is None
                or track.track_id in p.subscriptions
            ):
                continue
            for slot in p.slots:
                kept, offered, answered = slot.retired, slot.offer, slot.codec
                if (
                    slot.subscription is not None
                    or slot.kind != track.kind
                    or kept is None
                    or offered is None
                    or answered is None
                ):
                    continue
                codec = _viewer_format(offered, track)
                if codec is None or codec.payload_type != answered.payload_type:
                    continue
                sub = Subscription(track, p, slot.mid, kept.payload_type, self.metrics)
                sub.resume(kept)
                slot.retired = None
                self._bind(slot, sub)
                self._configure_retransmission(sub, answered)
                self._configure_extensions(sub)
                log.info(
                    "viewer %s: m-line %s goes on with track %s of %s",
                    p.participant_id,
                    slot.mid,
                    track.track_id,
                    track.participant_id,
                )
                self.refresh_outputs(p)
                break

    def _renegotiate(self, p: Participant) -> None:
        p.revision += 1
        self.emit(
            events.SubscriberRenegotiate,
            p.room,
            participant_id=p.participant_id,
            revision=p.revision,
        )

    def _offered_media(self, p: Participant, slot: Slot) -> OfferedMedia:
        if slot.kind == "application":
            return OfferedMedia(
                mid=slot.mid,
                kind="application",
                direction="sendrecv",
                codecs=[],
                extmaps=[],
                ssrc=None,
                max_message_size=self.settings.datachannels.max_message_bytes,
            )
        sub = slot.subscription
        if sub is None:
            codec = _PLACEHOLDER[slot.kind]
            return OfferedMedia(
                mid=slot.mid,
                kind=slot.kind,
                direction="inactive",
                codecs=[codec],
                extmaps=[],
                ssrc=None,
                cname=p.cname,
            )
        track = sub.track
        rtcp_fb = list(_SUBSCRIBER_RTCP_FB[track.kind])
        if sub.rtx_payload_type is not None:
            rtcp_fb.append("nack")
        codec = Codec(
            payload_type=sub.payload_type,
            name=track.codec.name,
            clock_rate=track.codec.clock_rate,
            channels=track.codec.channels,
            fmtp=dict(track.codec.fmtp),
            rtcp_fb=rtcp_fb,
            rtx_payload_type=sub.rtx_payload_type,
            kind=track.kind,
        )
        uris = set(track.ext_uris.values()) | {MID_URI, TRANSPORT_CC_URI}
        extmaps = [Extmap(id=i, uri=u) for u, i in SUBSCRIBER_EXTENSIONS.items() if u in uris]
        return OfferedMedia(
            mid=slot.mid,
            kind=slot.kind,
            direction="sendonly",
            codecs=[codec],
            extmaps=extmaps,
            ssrc=sub.ssrc,
            rtx_ssrc=sub.rtx_ssrc if sub.rtx_payload_type is not None else None,
            cname=p.cname,
            msid=(track.participant_id, track.track_id),
        )

    def subscriber_offer(self, room_id: str, participant_id: str) -> tuple[str, int]:
        """An offer for everything the participant is subscribed to now."""
        p = self.get_participant(room_id, participant_id)
        if not p.can_subscribe:
            raise Forbidden("this participant may not subscribe", code="cannot_subscribe")
        leg = p.subscriber_leg
        if leg is None:
            self.overload.check()  # a new connection; new offers on a live one are not refused
            leg = self._add_subscriber_leg(p)
        if not p.slots:
            p.slots.append(Slot(mid="0", kind="audio"))
        publisher = p.publisher_leg
        if (
            publisher is not None
            and publisher.data is not None
            and self._data_channel_size()
            and not any(s.kind == "application" for s in p.slots)
        ):
            # a participant that has data channels receives the others' on this connection
            p.slots.append(Slot(mid="dc", kind="application"))
        media = [self._offered_media(p, slot) for slot in p.slots]
        p.offered = OfferState(p.revision, media)
        offer = sdpmod.build_offer(self._local_transport(leg.transport, "actpass"), media)
        return offer, p.revision

    def subscriber_answer(self, room_id: str, participant_id: str, sdp: str, revision: int) -> None:
        p = self.get_participant(room_id, participant_id)
        self._check_sdp(sdp)
        offered = p.offered
        leg = p.subscriber_leg
        if offered is None or leg is None:
            raise Conflict(
                "no subscriber offer was made; POST .../subscriber first", code="no_offer"
            )
        if revision != offered.revision or revision != p.revision:
            raise Conflict(
                f"answer for revision {revision}, current revision is {p.revision}",
                code="stale_revision",
            )
        try:
            answer = sdpmod.parse_sdp(sdp)
        except SdpError as exc:
            raise BadRequest(f"bad answer: {exc}", code="bad_sdp") from None
        if [m.mid for m in answer.media] != [m.mid for m in offered.media]:
            raise BadRequest("bad answer: m-lines do not match the offer", code="bad_sdp")
        live = [m for m in answer.media if m.port != 0]
        if not live:
            raise BadRequest("bad answer: every m-line rejected", code="bad_sdp")
        first = live[0]
        if not first.ice_ufrag or not first.ice_pwd or not first.fingerprints:
            raise BadRequest(
                "bad answer: ICE credentials and DTLS fingerprint required", code="bad_sdp"
            )
        if first.setup not in ("active", "passive"):
            raise BadRequest("bad answer: a=setup must be active or passive", code="bad_sdp")
        transport = leg.transport
        transport.set_remote(
            first.ice_ufrag, first.ice_pwd, first.fingerprints, dtls_server=first.setup == "active"
        )
        for slot, answered in zip(p.slots, answer.media, strict=False):
            if slot.kind == "application" and answered.port != 0:
                self.datachannels.attach(
                    leg,
                    answered.sctp_port or sdpmod.SCTP_PORT,
                    answered.max_message_size or 0,
                )
        p.offered = None
        p.applied_revision = revision
        twcc_id = 0
        for slot, answered in zip(p.slots, answer.media, strict=False):
            sub = slot.subscription
            if sub is None:
                continue
            codec = next((c for c in answered.codecs if c.payload_type == sub.payload_type), None)
            if answered.port == 0 or codec is None:
                sub.negotiated = False
                self._declined(
                    sub,
                    "rejected by the subscriber"
                    if answered.port == 0
                    else f"codec {sub.track.codec.name} not accepted",
                )
                continue
            sub.negotiated = True
            sub.declined = None
            sub.answer_extmaps = {e.uri: e.id for e in answered.extmaps}
            self._configure_retransmission(sub, codec)
            if "transport-cc" in codec.rtcp_fb:
                twcc_id = twcc_id or sub.answer_extmaps.get(TRANSPORT_CC_URI, 0)
        leg.set_twcc(twcc_id)
        for sub in p.subscriptions.values():
            if sub.negotiated:
                self._configure_extensions(sub)
            if sub.active:
                sub.stream.attach(transport, leg.twcc)
        self.port.send_handshake(leg, transport.maybe_start(self.clock()))
        self.refresh_outputs(p)

    def _configure_retransmission(self, sub: Subscription, codec: Codec) -> None:
        """Answer the subscriber's NACKs when its answer kept NACK (on RTX when it kept RTX)
        and the track keeps a history (video with NACK enabled)."""
        stream = sub.stream
        track = sub.track
        kept = any(t.history is not None for t in track.receive_streams())
        if sub.rtx_payload_type is None or "nack" not in codec.rtcp_fb or not kept:
            stream.nack = None
            return
        use_rtx = codec.rtx_payload_type == sub.rtx_payload_type
        current = stream.nack
        if current is not None and current.use_rtx == use_rtx:
            return
        capacity = next(t.history.capacity for t in track.receive_streams() if t.history)
        rtx = (sub.rtx_ssrc, sub.rtx_payload_type, secrets.randbits(15)) if use_rtx else None
        stream.nack = NackResponder(stream, capacity, self.settings.rtp.retransmission_budget, rtx)

    def _declined(self, sub: Subscription, reason: str) -> None:
        """Record that a subscriber's answer did not take a track: an event when that is news."""
        if sub.declined == reason:
            return
        sub.declined = reason
        p, track = sub.participant, sub.track
        log.info(
            "participant %s cannot take track %s of %s (%s): %s",
            p.participant_id,
            track.track_id,
            track.participant_id,
            track.codec.mime_type,
            reason,
        )
        self.emit(
            events.TrackUnsupported,
            p.room,
            participant_id=p.participant_id,
            track_id=track.track_id,
            publisher_id=track.participant_id,
            codec=track.codec.mime_type,
            reason=reason,
        )

    def _configure_extensions(self, sub: Subscription) -> None:
        negotiated = sub.answer_extmaps
        id_map = {
            pub_id: negotiated[uri]
            for pub_id, uri in sub.track.ext_uris.items()
            if uri in negotiated and uri not in (MID_URI, TRANSPORT_CC_URI)
        }
        mid_id = negotiated.get(MID_URI)
        leg = sub.participant.subscriber_leg
        stamp_id = leg.twcc.ext_id if leg is not None and leg.twcc is not None else 0
        sub.stream.ext = ExtensionRewriter(
            id_map, mid_id, sub.mid if mid_id else None, stamp_id=stamp_id
        )

    def refresh_outputs(self, p: Participant) -> None:
        """Activate the negotiated subscriptions of a connected subscriber (and only those)."""
        leg = p.subscriber_leg
        ready = leg is not None and leg.transport.ready
        now = self.clock()
        changed: list[Subscription] = []
        for sub in p.subscriptions.values():
            track = sub.track
            active = (
                ready
                and sub.negotiated
                and not track.ended
                and not sub.paused
                and not track.moderated
            )
            if active != sub.active:
                sub.active = active
                if active:
                    assert leg is not None
                    sub.stream.attach(leg.transport, leg.twcc)
                    # forwarding (re)starts on the track's next keyframe, asked for now
                    sub.stream.restart(now)
                else:
                    sub.stream.detach()
                changed.append(sub)
        if not changed:
            return
        self._allocate_subscriber(p, now)  # the layers of the simulcast tracks among them
        for sub in changed:
            sub.track.rebuild_outputs()
            if sub.active and sub.track.kind == "video":
                # the stream's track: with simulcast, the layer it was placed on
                sub.stream.track.keyframes.request(now, force=True)

    def set_subscription_preferences(
        self,
        room_id: str,
        participant_id: str,
        track_id: str,
        changes: dict[str, Any],
    ) -> Subscription:
        """Apply a subscriber's wishes for one track: ``paused`` (bool), ``max_width``,
        ``max_height`` (pixels) and ``max_fps``; a key given as None clears that limit, a key
        left out keeps it. Unpausing starts forwarding again on the track's next keyframe,
        asked for at once."""
        p = self.get_participant(room_id, participant_id)
        sub = p.subscriptions.get(track_id)
        if sub is None or sub.track.ended:
            raise NotFound(
                f"participant {participant_id} has no subscription to track {track_id}",
                code="subscription_not_found",
            )
        unknown = set(changes) - set(PREFERENCES)
        if unknown:
            raise BadRequest(f"unknown preference {sorted(unknown)[0]}", code="invalid_field")
        if "paused" in changes:
            paused = changes["paused"]
            if not isinstance(paused, bool):
                raise BadRequest("paused must be true or false", code="invalid_field")
            sub.paused = paused
        if "priority" in changes:
            priority = 0 if changes["priority"] is None else changes["priority"]
            if (
                isinstance(priority, bool)
                or not isinstance(priority, int)
                or not 0 <= priority <= 10
            ):
                raise BadRequest("priority must be an integer in [0, 10]", code="invalid_field")
            sub.priority = priority
        for key, kinds, limit in (
            ("max_width", int, 16384),
            ("max_height", int, 16384),
            ("max_fps", int | float, 240),
        ):
            if key not in changes:
                continue
            value = changes[key]
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value <= limit
            ):
                raise BadRequest(f"{key} must be a number in (0, {limit}]", code="invalid_field")
            setattr(sub, key, value)
        self.refresh_outputs(p)
        self._allocate_subscriber(p, self.clock())
        return sub

    def moderate_track(
        self, room_id: str, participant_id: str, track_id: str, muted: bool
    ) -> Track:
        """Mute (``muted``) or unmute a published track at the relay, as a moderator: while
        muted nothing of it is forwarded, piped to other workers or recorded, and subscribers
        are told (``track.muted`` / ``track.unmuted`` with ``by: "moderator"``). Unmuting
        forwards it again from its next keyframe, asked for at once. Idempotent.

        With worker processes the front also calls this on every worker that imports the
        track, for its publisher there (a remote participant): its subscribers stop and
        restart the same way, and only the publisher's own worker tells."""
        room = self.get_room(room_id)
        p = room.participants.get(participant_id) or room.remote.get(participant_id)
        if p is None:
            raise participant_not_found(room_id, participant_id)
        track = p.tracks.get(track_id)
        if track is None or track.ended:
            raise NotFound(
                f"participant {participant_id} publishes no track {track_id}",
                code="track_not_found",
            )
        if track.moderated == muted:
            return track
        for stream in (track, *track.layers):
            stream.moderated = muted
        subscribers = {
            sub.participant.participant_id: sub.participant for sub in track.subscriptions.values()
        }
        for subscriber in subscribers.values():
            self.refresh_outputs(subscriber)
        if not muted and track.kind == "video":
            now = self.clock()
            for stream in track.receive_streams():
                # a recording resumes at a keyframe too (its file skipped the muted frames)
                if stream.outputs or stream.pending or stream.piped or stream.recorders:
                    stream.keyframes.request(now, force=True)
        if p.remote:
            return track
        self.emit(
            events.TrackMuted if muted else events.TrackUnmuted,
            p.room,
            participant_id=participant_id,
            track_id=track_id,
            by="moderator",
        )
        log.info(
            "track %s of participant %s %s by the moderator",
            track_id,
            participant_id,
            "muted" if muted else "unmuted",
        )
        return track

    # -- recording (relay/sfu/recording.py) -----------------------------------------------
    def record_track(
        self, room_id: str, track_id: str, recording_id: str, path_base: str
    ) -> dict[str, Any]:
        """Write a track published here to the file ``path_base`` + extension, for
        ``recording_id`` (the recording service decides which tracks, and where)."""
        room = self.get_room(room_id)
        for p in room.participants.values():
            track = p.tracks.get(track_id)
            if track is not None and not track.ended:
                return self.recording.start(track, recording_id, path_base, self.clock())
        raise NotFound(f"no track {track_id} published in room {room_id}", code="track_not_found")

    def stop_track_recording(
        self, room_id: str, track_id: str, recording_id: str
    ) -> dict[str, Any] | None:
        """Stop writing a track for ``recording_id`` (None if it was not written here)."""
        return self.recording.stop(recording_id, track_id)

    # -- leg callbacks (from the media port) ----------------------------------------------
    def on_leg_connected(self, leg: Leg) -> None:
        p = leg.participant
        transport = leg.transport
        now = self.clock()
        transport.connected_at = transport.last_activity = now
        if p.state != "connected":
            p.state = "connected"
            p.connected_once = True
            self.emit(events.ParticipantConnected, p.room, participant_id=p.participant_id)
        if leg.data is not None:
            leg.data.start()
        if leg is p.subscriber_leg:
            self.refresh_outputs(p)
        elif leg is p.publisher_leg:
            p.publisher_leg.on_connected(now)
            for track in p.tracks.values():
                for receiving in track.receive_streams():
                    if track.kind == "video" and (
                        receiving.outputs or receiving.pending or receiving.piped
                    ):
                        receiving.keyframes.request(now, force=True)

    def on_leg_failed(self, leg: Leg) -> None:
        p = leg.participant
        transport = leg.transport
        log.info(
            "participant %s: %s connection failed: %s",
            p.participant_id,
            transport.role,
            transport.failure_reason,
        )
        if p.room.participants.get(p.participant_id) is p:
            # a close_notify is the client hanging up; anything else is a failed connection
            self._remove(p, "left" if transport.state is TransportState.CLOSED else "timeout")

    # -- timers ---------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Housekeeping, once a second on its timer: consent and connect timeouts, bit rates,
        mute detection, the active speaker, empty rooms."""
        self._housekeeping.arm(now + HOUSEKEEPING_INTERVAL)
        interval = now - self._last_housekeeping
        self._last_housekeeping = now
        session = self.settings.session
        for room in list(self.rooms.values()):
            if not room.participants:
                if room.empty_since is not None and now - room.empty_since >= room.empty_timeout:
                    self._end_remote(room)
                    del self.rooms[room.room_id]
                    self.emit(events.RoomClosed, room)
                    log.info("room %s closed after %.0f s empty", room.room_id, room.empty_timeout)
                continue
            for p in list(room.participants.values()):
                if self._timed_out(p, now, session.consent_timeout, session.connect_timeout):
                    self._remove(p, "timeout")
                    continue
                for track in p.tracks.values():
                    self._track_tick(track, now, interval)
                for sub in p.subscriptions.values():
                    sub.tick(interval)
            for remote in room.remote.values():
                for track in remote.tracks.values():
                    self._track_tick(track, now, interval)
            self._detect_speaker(room)
            # with every rate of this second known: each subscriber's layers, then which
            # layers are wanted at all
            for p in list(room.participants.values()):
                self._allocate_subscriber(p, now)
            for p in list(room.participants.values()):
                for track in p.tracks.values():
                    if track.layers:
                        self.announce_layers(track)

    def _timed_out(self, p: Participant, now: float, consent: float, connect: float) -> bool:
        legs = p.legs
        if not legs:
            # never opened a connection (a client that crashed after its signaling, say)
            return now - p.joined_clock > connect
        for t in (leg.transport for leg in legs):
            if t.rx_seen:
                t.rx_seen = False
                t.last_activity = now
            if t.state in (TransportState.FAILED, TransportState.CLOSED):
                return True
            if t.state is TransportState.CONNECTED:
                if now - t.last_activity > consent:
                    return True
            elif now - t.created_at > connect:
                return True
        return False

    def _track_tick(self, track: Track, now: float, interval: float) -> None:
        if track.layers:
            for layer in track.layers:
                layer.tick(interval)
            track.packets = sum(layer.packets for layer in track.layers)
            track.bytes = sum(layer.bytes for layer in track.layers)
        before = track.bytes - track._bytes_at_tick
        track.tick(interval)
        if before > 0:
            track.last_media = now
        muted = before == 0 and track.packets > 0 and now - track.last_media > MUTE_AFTER
        if muted != track.muted:
            track.muted = muted
            if track.participant.remote or track.moderated:
                return  # its own worker tells; a moderator's mute is what subscribers know
            self.emit(
                events.TrackMuted if muted else events.TrackUnmuted,
                track.participant.room,
                participant_id=track.participant_id,
                track_id=track.track_id,
            )

    def _detect_speaker(self, room: Room) -> None:
        """The loudest participant over the last interval, from ssrc-audio-level (RFC 6464)."""
        ids: list[str] = []
        sums: list[float] = []
        counts: list[int] = []
        for p in [*room.participants.values(), *room.remote.values()]:
            for track in p.tracks.values():
                if track.kind == "audio" and track.level_count:
                    ids.append(p.participant_id)
                    sums.append(track.level_sum)
                    counts.append(track.level_count)
                track.level_sum = 0
                track.level_count = 0
        speaker: str | None = None
        if ids:
            loudness = 127.0 - np.asarray(sums, dtype=np.float64) / np.asarray(counts)
            best = int(np.argmax(loudness))
            if 127.0 - loudness[best] < SPEAKER_THRESHOLD:
                speaker = ids[best]
        if speaker != room.speaker:
            room.speaker = speaker
            self.emit(events.SpeakerChanged, room, participant_id=speaker)

    def drain(self) -> None:
        """Stop accepting sessions and close every room (DTLS close_notify to each client)."""
        self.draining = True
        for room_id in list(self.rooms):
            self.delete_room(room_id)

    # -- WHIP / WHEP (relay/api/whip.py) ---------------------------------------------------
    def viewer_offer(
        self,
        room_id: str,
        participant_id: str,
        sdp: str,
        publisher_id: str | None = None,
        track_id: str | None = None,
    ) -> str:
        """Answer a viewer's own offer (WHEP) on its subscriber connection.

        Each m-line the viewer can receive on (:func:`sdpmod.viewer_mlines`), in the offer's
        order, takes the first track of its kind not yet taken, among the tracks of
        ``publisher_id`` (or only ``track_id``; else every track of the room) in the order
        their publishers joined and published them, that the viewer offered a format for. The
        viewer's mids, payload types and extension ids are used as they are; m-lines left
        over are answered inactive, other m-lines rejected; ``404 no_tracks`` when no m-line
        gets a track (nothing is made: the viewer may try again later). The m-lines are fixed
        by this answer (the participant should not auto-subscribe); one whose track ends
        takes the next one its scope publishes in its format (:meth:`_follow`). Once per
        participant (``409 already_connected`` after).
        """
        p = self.get_participant(room_id, participant_id)
        if not p.can_subscribe:
            raise Forbidden("this participant may not subscribe", code="cannot_subscribe")
        if p.subscriber_leg is not None or p.subscriptions:
            raise Conflict(
                f"participant {participant_id} already has a subscriber connection",
                code="already_connected",
            )
        self._check_sdp(sdp)
        try:
            offer = sdpmod.parse_sdp(sdp)
            remote = sdpmod.check_viewer_offer(offer)
        except SdpError as exc:
            raise BadRequest(f"bad offer: {exc}", code="bad_sdp") from None
        room = p.room
        publishers = [*room.participants.values(), *room.remote.values()]
        if publisher_id is not None and not any(
            q.participant_id == publisher_id for q in publishers
        ):
            raise participant_not_found(room_id, publisher_id)
        chosen = [
            t
            for q in publishers
            if q is not p and publisher_id in (None, q.participant_id)
            for t in q.tracks.values()
            if not t.ended and track_id in (None, t.track_id)
        ]
        if track_id is not None and not chosen:
            raise NotFound(f"no track {track_id} in room {room_id}", code="track_not_found")
        # which track each m-line takes, decided before anything is made
        plan: list[tuple[sdpmod.MediaDescription, Track, Codec]] = []
        for m in sdpmod.viewer_mlines(offer):
            for track in chosen:
                if track.kind != m.kind or any(t is track for _, t, _ in plan):
                    continue
                codec = _viewer_format(m, track)
                if codec is not None:
                    plan.append((m, track, codec))
                    break
        if not plan:
            raise NotFound(
                f"nothing to watch in room {room_id} yet: no track of the kinds and formats "
                "offered" + (f" of participant {publisher_id}" if publisher_id else ""),
                code="no_tracks",
            )
        self.overload.check()
        leg = self._add_subscriber_leg(p)
        transport = leg.transport
        transport.set_remote(
            remote.ice_ufrag,
            remote.ice_pwd,
            remote.fingerprints,
            dtls_server=(remote.setup or "actpass") != "passive",
        )
        answered: dict[str, OfferedMedia] = {}
        codecs: dict[str, Codec] = {}
        p.viewer = (publisher_id, track_id)
        for m, track, codec in plan:
            assert m.mid is not None
            p.slots.append(Slot(mid=m.mid, kind=m.kind, offer=m, codec=codec))
            self._subscribe(p, track)
            sub = p.subscriptions.get(track.track_id)
            if sub is None:  # no payload type left: the m-line stays inactive
                p.slots.pop()
                continue
            sub.payload_type = sub.stream.payload_type = codec.payload_type
            if sub.rtx_payload_type is None or "nack" not in codec.rtcp_fb:
                sub.rtx_payload_type = codec.rtx_payload_type = None
                codec.rtcp_fb = [fb for fb in codec.rtcp_fb if fb != "nack"]
            else:
                sub.rtx_payload_type = codec.rtx_payload_type
            uris = set(track.ext_uris.values()) | {MID_URI, TRANSPORT_CC_URI}
            uris &= set(SUBSCRIBER_EXTENSIONS)
            answered[m.mid] = OfferedMedia(
                mid=m.mid,
                kind=m.kind,
                direction="sendonly",
                codecs=[codec],
                extmaps=sdpmod.viewer_extmaps(offer, m, uris),
                ssrc=sub.ssrc,
                rtx_ssrc=sub.rtx_ssrc if sub.rtx_payload_type is not None else None,
                cname=p.cname,
                msid=(track.participant_id, track.track_id),
            )
            codecs[m.mid] = codec
        media: list[OfferedMedia | None] = []
        for m in offer.media:
            a = answered.get(m.mid or "")
            if a is None and m in sdpmod.viewer_mlines(offer) and m.codecs:
                a = OfferedMedia(
                    mid=m.mid or "",
                    kind=m.kind,
                    direction="inactive",
                    codecs=[sdpmod.viewer_codec(m, m.codecs[0]) or m.codecs[0]],
                    extmaps=[],
                    ssrc=None,
                )
            media.append(a)
        answer = sdpmod.build_viewer_answer(
            offer,
            self._local_transport(transport, sdpmod.answer_setup(remote.setup)),
            media,
        )
        # the answer is applied at once, as a subscriber's answer to a relay offer would be
        p.offered = None
        p.applied_revision = p.revision
        twcc_id = 0
        for sub in p.subscriptions.values():
            codec = codecs[sub.mid]
            sub.negotiated = True
            sub.declined = None
            sub.answer_extmaps = {e.uri: e.id for e in answered[sub.mid].extmaps}
            self._configure_retransmission(sub, codec)
            if "transport-cc" in codec.rtcp_fb:
                twcc_id = twcc_id or sub.answer_extmaps.get(TRANSPORT_CC_URI, 0)
        leg.set_twcc(twcc_id)
        for sub in p.subscriptions.values():
            self._configure_extensions(sub)
        self.port.send_handshake(leg, transport.maybe_start(self.clock()))
        self.refresh_outputs(p)
        return answer

    def ice_restart(
        self, room_id: str, participant_id: str, connection: str, ufrag: str, pwd: str
    ) -> dict[str, Any]:
        """Restart ICE on a participant's ``publisher`` or ``subscriber`` connection (a WHIP or
        WHEP PATCH): the client's new credentials, new ones of the relay's, the same DTLS
        association; the next nominating check latches whatever address it comes from.
        Returns the relay's ``ice_ufrag``, ``ice_pwd``, ``candidates`` and
        ``tcp_candidates`` ([ip, port] each: the UDP ones, and the passive ICE-TCP ones)."""
        p = self.get_participant(room_id, participant_id)
        leg = p.publisher_leg if connection == "publisher" else p.subscriber_leg
        if connection not in ("publisher", "subscriber") or leg is None:
            raise Conflict(f"no {connection} connection to restart", code="no_connection")
        if not _ICE_CHARS.fullmatch(ufrag) or len(ufrag) < 4 or len(ufrag) > 256:
            raise BadRequest("ice-ufrag must be 4-256 ice-chars", code="bad_sdp")
        if not _ICE_CHARS.fullmatch(pwd) or len(pwd) < 22 or len(pwd) > 256:
            raise BadRequest("ice-pwd must be 22-256 ice-chars", code="bad_sdp")
        transport = leg.transport
        if self.port.by_ufrag.get(transport.local.ufrag) is leg:
            del self.port.by_ufrag[transport.local.ufrag]
        transport.local = IceCredentials.generate()
        self.port.by_ufrag[transport.local.ufrag] = leg
        transport.remote_ufrag, transport.remote_pwd = ufrag, pwd
        transport.nominated = False
        log.info("participant %s: ICE restart on its %s connection", participant_id, connection)
        return {
            "ice_ufrag": transport.local.ufrag,
            "ice_pwd": transport.local.pwd,
            "candidates": [[ip, port] for ip, port in self.candidates],
            "tcp_candidates": [[ip, port] for ip, port in self.tcp_candidates],
        }

    # -- connections ----------------------------------------------------------------------
    def _new_transport(self, role: str) -> WebRtcTransport:
        transport = WebRtcTransport(
            self.certificate, list(self.settings.media.srtp_profiles), role=role
        )
        transport.created_at = self.clock()
        return transport

    def _add_subscriber_leg(self, p: Participant) -> SubscriberLeg:
        """A new subscriber connection for ``p``, on the media port."""
        leg = SubscriberLeg(self.media, p, self._new_transport("subscriber"))
        leg.on_estimate_drop = self._on_estimate_drop
        p.subscriber_leg = leg
        self.port.add(leg)
        return leg

    # -- stats ----------------------------------------------------------------------------
    def participant_stats(self, room_id: str, participant_id: str) -> dict[str, Any]:
        p = self.get_participant(room_id, participant_id)
        return {
            "participant_id": p.participant_id,
            "room_id": p.room.room_id,
            "state": p.state,
            "inbound": [t.stats_dict() for t in p.tracks.values()],
            "outbound": [s.stats_dict() for s in p.subscriptions.values() if not s.track.ended],
            "subscriber_delivery": _delivery(p.subscriber_leg),
        }


def _viewer_format(m: sdpmod.MediaDescription, track: Track) -> Codec | None:
    """The format of a viewer's (WHEP) offered m-line that carries ``track`` as it is, with
    the viewer's payload type; None when the viewer offered none."""
    fb = set(_SUBSCRIBER_RTCP_FB[track.kind]) | {"nack"}
    return sdpmod.viewer_codec(m, track.codec, fb)


def _svc_choices(svc: LayerStats, sub: Subscription) -> list[tuple[int, int]]:
    """What the bandwidth may choose from for a stream with layers of its own, lowest first:
    the spatial layers up to the subscriber's size wishes, each with the temporal layers its
    frame-rate wish allows; a stream with a single spatial layer chooses temporal layers (the
    frame rate) instead."""
    spatial, temporal = choose_layers(svc, sub.max_width, sub.max_height, sub.max_fps)
    top_s = svc.spatial_layers - 1 if spatial is None else spatial
    top_t = svc.temporal_layers - 1 if temporal is None else temporal
    if svc.spatial_layers > 1:
        return [(s, top_t) for s in range(top_s + 1)]
    return [(0, t) for t in range(top_t + 1)]


def _svc_limits(svc: LayerStats, choice: tuple[int, int]) -> tuple[int | None, int | None]:
    """A (spatial, temporal) choice as stream limits (None for a top layer: all of them)."""
    spatial, temporal = choice
    return (
        None if spatial >= svc.spatial_layers - 1 else spatial,
        None if temporal >= svc.temporal_layers - 1 else temporal,
    )


def _svc_demand(
    svc: LayerStats,
    sub: Subscription,
    choices: list[tuple[int, int]],
    priority: int,
    now: float,
) -> Demand:
    """The allocation's view of a stream with layers of its own: the rate of each choice
    (what it carried over the last second, or a nominal rate for its picture size before
    that is measured), the one it is on now."""
    resolutions = svc.resolutions
    rates = []
    for s, t in choices:
        height = resolutions[s][1] if s < len(resolutions) else 0
        share = (t + 1) / max(svc.temporal_layers, 1)  # of the layer's frames
        measured = svc.bitrate(s, t)
        if svc.spatial_layers > 1 or measured <= 0:
            # a picture size: costed like a simulcast layer of that size
            rates.append(layer_cost(measured / share, height, s) * share)
        else:
            rates.append(measured)  # frame rates of one picture size: what they carry
    for i in range(1, len(rates)):  # a choice takes at least what the one below it takes
        rates[i] = max(rates[i], rates[i - 1])
    stream = sub.stream
    on = (
        svc.spatial_layers - 1 if stream.max_spatial is None else stream.max_spatial,
        svc.temporal_layers - 1 if stream.max_temporal is None else stream.max_temporal,
    )
    current = next((i for i, (s, t) in enumerate(choices) if (s, t) == on), None)
    cap = len(choices) - 1
    if current is not None and now < sub.hold_until:
        cap = min(cap, current)
    return Demand(rates, cap, current, priority)


def _budget(leg: SubscriberLeg, estimate: float, now: float) -> float:
    """What a subscriber's allocation may spend: its estimate, except that an estimate a
    little below what the allocation sends (above :data:`DOWN_FAST` of it) is given
    :data:`DOWN_DELAY` to recover before layers move down: one noisy delay signal must not
    cost a subscriber its layer and the keyframe of the move."""
    allocated = leg.allocated
    if not allocated or estimate >= allocated:
        leg.below_since = None
        return estimate
    if leg.below_since is None:
        leg.below_since = now
    if estimate >= DOWN_FAST * allocated and now - leg.below_since < DOWN_DELAY:
        return allocated
    return estimate


def _ranked_layers(track: Track) -> list[Track]:
    """A simulcast track's layers, lowest first: by the picture size their keyframes
    announced when every layer has shown one, else in the offer's order."""
    layers = track.layers
    if all(t.height for t in layers):
        return sorted(layers, key=lambda t: (t.height, t.width))
    return list(layers)


def _best_layer(ranked: list[Track], sub: Subscription) -> Track:
    """The best of ``ranked`` (lowest first) within the subscriber's size limits, the lowest
    when none fits (or when the sizes are unknown), the best without limits."""
    if sub.max_width is None and sub.max_height is None:
        return ranked[-1]
    fitting = [
        t
        for t in ranked
        if t.height
        and (sub.max_height is None or t.height <= sub.max_height)
        and (sub.max_width is None or t.width <= sub.max_width)
    ]
    return fitting[-1] if fitting else ranked[0]


def _codec_preference(names: Sequence[str]) -> tuple[str, ...]:
    """A room's video codec preference in canonical spelling; BadRequest if it is not one."""
    known = {name.lower(): name for name in sdpmod.SUPPORTED_VIDEO}
    if isinstance(names, str) or not names:
        raise BadRequest(
            "codec_preference must be a non-empty list of video codec names", code="invalid_field"
        )
    result: list[str] = []
    for name in names:
        canonical = known.get(name.lower()) if isinstance(name, str) else None
        if canonical is None:
            raise BadRequest(
                f"codec_preference: unknown video codec {name!r}; known: "
                + ", ".join(sdpmod.SUPPORTED_VIDEO),
                code="invalid_field",
            )
        if canonical in result:
            raise BadRequest(f"codec_preference: {canonical} listed twice", code="invalid_field")
        result.append(canonical)
    return tuple(result)


def _delivery(leg: SubscriberLeg | None) -> dict[str, Any] | None:
    """What the subscriber's congestion-control feedback says about the relay's packets to it
    (transport-cc; else its REMB), and what the layer allocation makes of it."""
    if leg is None or (leg.twcc is None and leg.remb is None):
        return None
    prober = leg.prober
    common = {
        "estimated_bitrate": leg.estimate,
        "allocated_bitrate": leg.allocated or None,
        "probe_clusters": prober.clusters if prober is not None else 0,
        "probe_bytes": prober.bytes if prober is not None else 0,
        "last_probe_bitrate": prober.last_result if prober is not None else None,
    }
    if leg.twcc is None:
        return {"estimate_source": "remb", **common}
    history = leg.twcc.history
    estimator = leg.twcc.estimator
    return {
        "estimate_source": "transport-cc",
        **common,
        "estimator_state": estimator.state.value,
        "packets_acked": history.packets_acked,
        "packets_lost": history.packets_lost,
        "loss_fraction": history.loss_fraction,
        # what arrived over the last half second of arrival time (a rate over one report's
        # arrival span alone would leave out the gaps between video frames and read high)
        "delivery_rate": estimator.acked_bitrate,
        "delay_variation": history.delay_variation,
        "queuing_delay": history.queuing_delay,
    }


def _media_ssrcs(offer: sdpmod.MediaDescription) -> tuple[int | None, int | None]:
    """(media SSRC, RTX SSRC) signalled in an m-line, from its FID group or first a=ssrc."""
    for semantics, ssrcs in offer.ssrc_groups:
        if semantics == "FID" and len(ssrcs) == 2:
            return ssrcs[0], ssrcs[1]
    if offer.ssrcs:
        return offer.ssrcs[0], None
    return None, None
