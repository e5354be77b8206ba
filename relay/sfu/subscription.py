"""Subscription: one track forwarded to one participant, with its precomputed rewrite state."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from relay.rtc.nack import PacketHistory, RetransmissionBudget
from relay.rtc.rtcp import ntp_middle32
from relay.rtc.rtp import ExtensionRewriter, SequenceRewriter

if TYPE_CHECKING:
    from relay.sfu.participant import Participant
    from relay.sfu.track import Track

#: how many of our recent sender reports are remembered to compute RTT from receiver reports
_SR_MEMORY = 8
#: seconds a starting video subscription waits for the first packet of a keyframe before it
#: starts on the newest packet anyway (the subscriber's own keyframe request does the rest)
KEYFRAME_WAIT = 1.0


class Subscription:
    """Per-subscriber state of a forwarded track: SSRC, payload type, seq/ts and extension maps."""

    def __init__(self, track: Track, subscriber: Participant, mid: str, payload_type: int) -> None:
        self.track = track
        self.subscriber = subscriber
        self.mid = mid
        self.ssrc = secrets.randbits(32) or 1
        self.payload_type = payload_type
        self.rewriter = SequenceRewriter(track.clock_rate)
        #: while the rewriter is starting: the time after which any newest packet may start it
        self.start_by = 0.0
        self.ext = ExtensionRewriter({}, None, None)
        #: header extensions the subscriber's answer accepted: URI -> id
        self.answer_extmaps: dict[str, int] = {}
        #: packets sent, for NACKs (video with NACK negotiated), and the RTX stream to resend on
        self.history: PacketHistory | None = None
        self.rtx_ssrc = secrets.randbits(32) or 1
        self.rtx_payload_type: int | None = None
        self.use_rtx = False
        self.rtx_seq = secrets.randbits(15)
        self.nacks_received = 0
        #: what this subscriber's NACKs may make the relay resend; made by the media router on
        #: the first NACK, from ``[rtp] retransmission_budget``
        self.retransmission_budget: RetransmissionBudget | None = None
        #: bytes resent to answer NACKs (SRTP size)
        self.retransmission_bytes = 0
        #: the subscriber's answer covering this subscription was applied
        self.negotiated = False
        #: forwarded right now (negotiated, transport connected, not ended)
        self.active = False
        #: why the subscriber's latest answer did not take this track, None if it did
        self.declined: str | None = None
        self.packets_sent = 0
        self.bytes_sent = 0
        self.bitrate = 0.0
        self._bytes_at_tick = 0
        self.fraction_lost = 0.0
        self.packets_lost = 0
        self.jitter = 0.0
        self.round_trip_time: float | None = None
        #: middle 32 bits of the NTP time of our sender reports -> when we sent them
        self.sr_sent: dict[int, float] = {}

    def restart(self, now: float) -> None:
        """Start over on the track's next keyframe (first activation or a new source), with
        seq and timestamp continuing from what the subscriber already got."""
        self.rewriter.switch_source()
        self.start_by = now + KEYFRAME_WAIT

    def configure(self, ext_id_map: dict[int, int], mid_id: int | None) -> None:
        """Apply the negotiated header-extension ids (publisher id -> subscriber id)."""
        self.ext = ExtensionRewriter(ext_id_map, mid_id, self.mid if mid_id else None)

    def remember_sr(self, ntp: int, now: float) -> None:
        self.sr_sent[ntp_middle32(ntp)] = now
        while len(self.sr_sent) > _SR_MEMORY:
            del self.sr_sent[next(iter(self.sr_sent))]

    def on_report_block(
        self, fraction_lost: int, packets_lost: int, jitter: int, lsr: int, dlsr: int, now: float
    ) -> None:
        """A receiver report block from the subscriber about our stream."""
        self.fraction_lost = fraction_lost / 256.0
        self.packets_lost = max(0, packets_lost)
        self.jitter = jitter / self.track.clock_rate
        sent = self.sr_sent.get(lsr)
        if lsr and sent is not None:
            rtt = now - sent - dlsr / 65536.0
            if rtt >= 0:
                self.round_trip_time = rtt

    def tick(self, interval: float) -> None:
        self.bitrate = (
            (self.bytes_sent - self._bytes_at_tick) * 8 / interval if interval > 0 else 0.0
        )
        self._bytes_at_tick = self.bytes_sent

    def stats_dict(self) -> dict[str, Any]:
        return {
            "track_id": self.track.track_id,
            "kind": self.track.kind,
            "direction": "outbound",
            "ssrc": self.ssrc,
            "packets": self.packets_sent,
            "bytes": self.bytes_sent,
            "packets_lost": self.packets_lost,
            "fraction_lost": self.fraction_lost,
            "jitter": self.jitter,
            "round_trip_time": self.round_trip_time,
            "bitrate": self.bitrate,
            "nacks_received": self.nacks_received,
            "retransmissions": self.history.retransmissions if self.history else 0,
            "retransmission_bytes": self.retransmission_bytes,
            "retransmissions_repeat_suppressed": (
                self.history.repeats_suppressed if self.history else 0
            ),
            "retransmissions_budget_suppressed": (
                self.history.budget_suppressed if self.history else 0
            ),
            "forwarded": self.active,
            "reason": self.declined,
        }
