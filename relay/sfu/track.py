"""Track: one stream a participant publishes (one m-line of its publisher connection)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from relay.rtc.codecs import KeyframeStart, keyframe_detector
from relay.rtc.nack import NackGenerator
from relay.rtc.rtp import ReceiveStatistics
from relay.rtc.sdp import Codec

if TYPE_CHECKING:
    from relay.sfu.participant import Participant
    from relay.sfu.subscription import Subscription


class Track:
    """A published audio or video stream and the subscriptions it feeds."""

    def __init__(
        self,
        track_id: str,
        publisher: Participant,
        kind: str,
        mid: str,
        codec: Codec,
        ext_uris: dict[int, str],
    ) -> None:
        self.track_id = track_id
        self.publisher = publisher
        self.kind = kind
        self.mid = mid
        self.codec = codec
        self.clock_rate = codec.clock_rate
        #: publisher's payload type of the forwarded codec; anything else is dropped
        self.payload_type = codec.payload_type
        self.ext_uris = ext_uris
        self.ssrc: int | None = None
        #: the publisher's SDP names the media SSRC (else it is learned from packets)
        self.ssrc_signalled = False
        #: highest sequence number seen on the media SSRC (-1: none yet); a packet that raises
        #: it is the track's newest, the only kind a subscription may start on
        self.highest_seq = -1
        #: whether a packet is the first of a keyframe (None: audio, any newest packet will do)
        self.keyframe_start: KeyframeStart | None = (
            keyframe_detector(codec.name) if kind == "video" else None
        )
        self.rtx_ssrc: int | None = None
        #: the publisher's RTX payload type, when it retransmits on an RTX stream
        self.rtx_payload_type: int | None = None
        #: loss detection on the publisher's leg (video with NACK negotiated)
        self.nack: NackGenerator | None = None
        self.rtx_received = 0
        self.muted = False
        #: active subscriptions, in the order they became active: the hot path iterates this
        self.outputs: list[Subscription] = []
        #: every subscription of this track, by subscriber participant id
        self.subscriptions: dict[str, Subscription] = {}
        self.stats: ReceiveStatistics | None = None
        #: (ntp timestamp, rtp timestamp, arrival) of the publisher's latest sender report
        self.last_sr: tuple[int, int, float] | None = None
        self.last_keyframe_request = float("-inf")
        self.keyframe_pending = False
        self.packets = 0
        self.bytes = 0
        self.bitrate = 0.0
        self._bytes_at_tick = 0
        self.ended = False
        #: publisher's id of ssrc-audio-level (0: none), and the levels seen since the last tick
        self.audio_level_id = 0
        self.level_sum = 0
        self.level_count = 0
        self.last_media = 0.0

    @property
    def participant_id(self) -> str:
        return self.publisher.participant_id

    def set_ssrc(self, ssrc: int, now: float) -> None:
        """Bind the media SSRC (from SDP or learnt from the mid extension or payload type);
        every subscription switches to the new source at its next keyframe."""
        if self.ssrc != ssrc:
            self.ssrc = ssrc
            self.highest_seq = -1
            self.stats = ReceiveStatistics(ssrc, self.clock_rate)
            if self.nack is not None:
                self.nack.reset()
            for sub in self.subscriptions.values():
                sub.restart(now)

    def rebuild_outputs(self) -> None:
        """Recompute the hot-path list after any subscription changed state."""
        self.outputs = [s for s in self.subscriptions.values() if s.active]

    def tick(self, interval: float) -> None:
        self.bitrate = (self.bytes - self._bytes_at_tick) * 8 / interval if interval > 0 else 0.0
        self._bytes_at_tick = self.bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "track_id": self.track_id,
            "participant_id": self.participant_id,
            "kind": self.kind,
            "codec": self.codec.mime_type,
            "mid": self.mid,
            "muted": self.muted,
            "simulcast_layers": [],
        }

    def stats_dict(self) -> dict[str, Any]:
        st = self.stats
        return {
            "track_id": self.track_id,
            "kind": self.kind,
            "direction": "inbound",
            "ssrc": self.ssrc,
            "packets": self.packets,
            "bytes": self.bytes,
            "packets_lost": max(0, st.packets_lost) if st else 0,
            "fraction_lost": (st.fraction_lost / 256.0) if st else 0.0,
            "jitter": (st.jitter / self.clock_rate) if st else 0.0,
            # measured from NACK to retransmission: known once loss has been repaired
            "round_trip_time": self.nack.rtt if self.nack else None,
            "bitrate": self.bitrate,
            "nacks_sent": self.nack.nacks_sent if self.nack else 0,
            "retransmissions_received": self.rtx_received,
            "lost_unrepaired": self.nack.lost_unrepaired if self.nack else 0,
        }
