"""Counters and gauges of the relay, rendered in the Prometheus text format.

The media plane increments plain attributes and dict entries (no per-packet objects); gauges
that describe the room model are read from callbacks when /metrics is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable

#: Upper bounds (seconds) of the forwarding-latency histogram: receive to last sendto.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05)

#: Reasons a datagram is dropped. Every drop is counted under one of them.
DROP_REASONS = (
    "unknown_address",  # DTLS/SRTP from an address that never passed a STUN check
    "stun_malformed",  # not a parseable Binding request
    "stun_unknown_ufrag",  # USERNAME names no session
    "stun_unauthorized",  # MESSAGE-INTEGRITY does not match
    "stun_replayed",  # a recent transaction id again: answered, but moves nothing
    "dtls_failed",  # DTLS record on a failed or closed transport
    "dtls_unlatched",  # DTLS after the handshake from an address media is not sent to
    "srtp_not_ready",  # SRTP before the DTLS handshake finished
    "srtp_unprotect",  # authentication / replay failure
    "rtp_malformed",
    "rtcp_malformed",
    "unknown_ssrc",
    "unknown_payload_type",  # a payload type the answer did not accept
    "unknown_first_byte",  # not STUN, DTLS or RTP per RFC 7983
    "not_publishing",  # media on a subscriber-only connection
    "rtx_padding",  # padding-only packets on a publisher's RTX stream (bandwidth probes)
    "stale_packet",  # older than a source switch
    "rtx_before_media",  # a retransmission for a track whose media SSRC is not known yet
    "rtx_duplicate",  # a retransmission of a packet already received (a sender's RTX probe)
    "pipe_unknown_peer",  # on a worker's pipe socket, from an address that is no peer worker
    "pipe_malformed",  # on a worker's pipe socket, neither RTP nor RTCP
)


class Histogram:
    """A fixed-bucket histogram; observe() is one bisect and two additions."""

    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1


#: Reasons a data channel message is not relayed (``relay_datachannel_dropped_total``).
DATACHANNEL_DROP_REASONS = (
    "too_large",  # over [datachannels] max_message_bytes
    "rate_limited",  # over the sender's messages/s or bytes/s (after its burst)
    "unknown_channel",  # on a stream no DATA_CHANNEL_OPEN opened
    "too_many_channels",  # a channel over max_channels_per_participant (closed at once)
    "no_recipient",  # addressed to a participant that is not in the room or has no channel
    "send_buffer_full",  # a recipient's association could not take it (a slow reader)
)


class Metrics:
    """Everything /metrics shows."""

    def __init__(self) -> None:
        self.packets_in = 0
        self.bytes_in = 0
        self.packets_out = 0
        self.bytes_out = 0
        self.rtcp_in = 0
        self.rtcp_out = 0
        self.stun_requests = 0
        self.drops: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.keyframe_requests = 0
        self.nacks_sent = 0
        self.nacks_received = 0
        self.retransmissions = 0
        self.retransmission_misses = 0
        #: packets held back from subscriptions waiting to start on a keyframe (per copy)
        self.keyframe_waits = 0
        self.retransmission_bytes = 0
        #: bandwidth probes sent to subscribers (RTX copies of recent packets), and layer
        #: switches the bandwidth allocation made (up: a better layer; down: a lesser one)
        self.probe_packets = 0
        self.probe_bytes = 0
        self.layer_switches: dict[str, int] = {"up": 0, "down": 0}
        #: NACKed packets not resent: "repeat" (resent too recently or too often), "budget"
        #: (the subscriber's retransmission budget was spent)
        self.retransmissions_suppressed: dict[str, int] = {"repeat": 0, "budget": 0}
        self.twcc_feedback_sent = 0
        self.remb_sent = 0
        self.send_errors = 0
        self.forward_latency = Histogram(LATENCY_BUCKETS)
        self.loop_lag = 0.0
        self.loop_lag_max = 0.0
        self.events_dropped = 0
        #: data channel messages received from participants, and those not relayed (one
        #: count per message, or per recipient for "no_recipient"/"send_buffer_full")
        self.datachannel_messages = 0
        self.datachannel_drops: dict[str, int] = dict.fromkeys(DATACHANNEL_DROP_REASONS, 0)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.counters: dict[str, tuple[str, Callable[[], float]]] = {}

    def drop(self, reason: str) -> None:
        self.drops[reason] += 1

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Register a gauge read at scrape time."""
        self.gauges[name] = (help_text, read)

    def counter(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Register a counter kept elsewhere and read at scrape time."""
        self.counters[name] = (help_text, read)

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP relay_{name} {help_text}")
            out.append(f"# TYPE relay_{name} {kind}")
            for labels, value in samples:
                out.append(f"relay_{name}{labels} {_number(value)}")

        for name, (help_text, read) in sorted(self.gauges.items()):
            metric(name, "gauge", help_text, [("", read())])
        for name, (help_text, read) in sorted(self.counters.items()):
            metric(name, "counter", help_text, [("", read())])
        metric(
            "packets_in_total",
            "counter",
            "RTP packets received from publishers.",
            [("", self.packets_in)],
        )
        metric(
            "bytes_in_total",
            "counter",
            "RTP bytes received from publishers (SRTP size).",
            [("", self.bytes_in)],
        )
        metric(
            "packets_out_total",
            "counter",
            "RTP packets forwarded to subscribers.",
            [("", self.packets_out)],
        )
        metric(
            "bytes_out_total",
            "counter",
            "RTP bytes forwarded to subscribers (SRTP size).",
            [("", self.bytes_out)],
        )
        metric("rtcp_packets_in_total", "counter", "SRTCP packets received.", [("", self.rtcp_in)])
        metric("rtcp_packets_out_total", "counter", "SRTCP packets sent.", [("", self.rtcp_out)])
        metric(
            "stun_requests_total",
            "counter",
            "Authenticated STUN Binding requests answered.",
            [("", self.stun_requests)],
        )
        metric(
            "keyframe_requests_total",
            "counter",
            "PLI/FIR sent to publishers.",
            [("", self.keyframe_requests)],
        )
        metric(
            "nacks_received_total",
            "counter",
            "Sequence numbers subscribers asked for in NACKs.",
            [("", self.nacks_received)],
        )
        metric(
            "nacks_sent_total",
            "counter",
            "Sequence numbers asked of publishers in NACKs.",
            [("", self.nacks_sent)],
        )
        metric(
            "retransmissions_total",
            "counter",
            "Packets resent to subscribers in answer to NACKs.",
            [("", self.retransmissions)],
        )
        metric(
            "retransmission_bytes_total",
            "counter",
            "Bytes resent to subscribers in answer to NACKs (SRTP size).",
            [("", self.retransmission_bytes)],
        )
        metric(
            "probe_packets_total",
            "counter",
            "Bandwidth probe packets sent to subscribers (RTX copies of recent packets).",
            [("", self.probe_packets)],
        )
        metric(
            "probe_bytes_total",
            "counter",
            "Bytes of bandwidth probes sent to subscribers (SRTP size).",
            [("", self.probe_bytes)],
        )
        metric(
            "layer_switches_total",
            "counter",
            "Layer changes the bandwidth allocation made for subscribers, by direction.",
            [(f'{{direction="{d}"}}', n) for d, n in self.layer_switches.items()],
        )
        metric(
            "retransmissions_suppressed_total",
            "counter",
            "NACKed packets not resent, by reason (repeat: resent too recently or too often; "
            "budget: the subscriber's retransmission budget was spent).",
            [(f'{{reason="{r}"}}', n) for r, n in self.retransmissions_suppressed.items()],
        )
        metric(
            "retransmission_misses_total",
            "counter",
            "NACKs naming packets no longer in the history (answered with a keyframe request).",
            [("", self.retransmission_misses)],
        )
        metric(
            "keyframe_wait_packets_total",
            "counter",
            "Packets not forwarded to a subscription because it waits to start on a keyframe "
            "(one per subscription and packet).",
            [("", self.keyframe_waits)],
        )
        metric(
            "twcc_feedback_sent_total",
            "counter",
            "Transport-wide congestion control feedback packets sent to publishers.",
            [("", self.twcc_feedback_sent)],
        )
        metric(
            "send_errors_total",
            "counter",
            "Datagrams the socket refused to send.",
            [("", self.send_errors)],
        )
        metric(
            "events_dropped_total",
            "counter",
            "Events not delivered to a slow consumer.",
            [("", self.events_dropped)],
        )
        metric(
            "packets_dropped_total",
            "counter",
            "Datagrams dropped, by reason.",
            [(f'{{reason="{r}"}}', n) for r, n in self.drops.items()],
        )
        metric(
            "datachannel_messages_total",
            "counter",
            "Data channel messages received from participants.",
            [("", self.datachannel_messages)],
        )
        metric(
            "datachannel_dropped_total",
            "counter",
            "Data channel messages not relayed, by reason.",
            [(f'{{reason="{r}"}}', n) for r, n in self.datachannel_drops.items()],
        )
        hist = self.forward_latency
        out.append(
            "# HELP relay_forward_latency_seconds Time from receiving an RTP packet to "
            "its last sendto."
        )
        out.append("# TYPE relay_forward_latency_seconds histogram")
        cumulative = 0
        for bound, count in zip(hist.bounds, hist.counts, strict=False):
            cumulative += count
            out.append(f'relay_forward_latency_seconds_bucket{{le="{bound}"}} {cumulative}')
        out.append(f'relay_forward_latency_seconds_bucket{{le="+Inf"}} {hist.count}')
        out.append(f"relay_forward_latency_seconds_sum {_number(hist.total)}")
        out.append(f"relay_forward_latency_seconds_count {hist.count}")
        metric(
            "event_loop_lag_seconds",
            "gauge",
            "Latest event-loop scheduling lag.",
            [("", self.loop_lag)],
        )
        metric(
            "event_loop_lag_max_seconds",
            "gauge",
            "Largest event-loop lag since start.",
            [("", self.loop_lag_max)],
        )
        return "\n".join(out) + "\n"


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))
