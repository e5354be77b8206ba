"""Data channels relayed between the participants of a room.

A participant's connection that negotiated ``m=application`` gets a :class:`DataEndpoint`: an
SCTP association (relay/rtc/sctp.py) carried in the connection's DTLS, and the data channels
on it (relay/rtc/dcep.py). What the participant sends on a channel it opened is relayed by
:class:`DataChannelRelay` to the other participants, each over its subscriber connection, on a
channel the relay opens there with the same label, ordering and reliability.

Addressing is decided once per channel, from its DCEP ``protocol`` field, never from the
messages, whose bodies the relay does not read:

- a channel whose protocol is ``to:<participant_id>`` reaches that participant only;
- any other channel reaches every other participant of the room.

The channel the relay opens towards a recipient has the sender's label and the protocol
``from:<sender_id>`` (room-wide) or ``from:<sender_id>;to:<recipient_id>`` (one-to-one), so
the recipient knows who sent what without any envelope in the message.

Across worker processes (``[workers] count`` above 1, where a room's participants may be on
several workers): every channel opened, message relayed and channel closed here is also
handed to :attr:`DataChannelRelay.on_remote`, which the worker sends to the front process; the
front hands it to the room's other workers (in order, over each one's channel), whose relay
delivers it to their own participants (:meth:`DataChannelRelay.remote`). Limits are applied
once, on the sender's worker.

Limits, per sending participant over all its channels: the message size, messages per second
and bytes per second (token buckets ``burst_seconds`` deep), the number of channels it opens.
A message over a limit is dropped and counted (``relay_datachannel_dropped_total{reason}``);
a recipient whose SCTP send buffer is full loses the message (counted), never grows memory.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from relay.rtc import dcep
from relay.rtc.dcep import ChannelOpen, DcepError
from relay.rtc.sctp import Aborted, Connected, MessageReceived, SctpAssociation, StreamsReset

if TYPE_CHECKING:
    from relay.config import DataChannelSettings
    from relay.metrics import Metrics
    from relay.sfu.leg import Leg
    from relay.sfu.participant import Participant

log = logging.getLogger(__name__)

#: the protocol prefix that addresses a channel to one participant
TO_PREFIX = "to:"
FROM_PREFIX = "from:"
#: bytes queued in one recipient's association before its messages are dropped
SEND_BUFFER = 1024 * 1024


class TokenBucket:
    """``rate`` per second, at most ``rate * depth`` saved up."""

    __slots__ = ("rate", "capacity", "tokens", "at")

    def __init__(self, rate: float, depth: float, now: float) -> None:
        self.rate = rate
        self.capacity = max(rate * depth, 1.0)
        self.tokens = self.capacity
        self.at = now

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now


@dataclass
class Channel:
    """A channel a participant opened (DATA_CHANNEL_OPEN received)."""

    stream_id: int
    open: ChannelOpen
    #: None: the whole room; else the participant id it is addressed to
    to: str | None


class DataEndpoint:
    """The data channels of one connection: SCTP over the leg's DTLS, the channels the
    participant opened on it, and the channels the relay opened to it."""

    def __init__(
        self, relay: DataChannelRelay, leg: Leg, remote_port: int, max_message_size: int
    ) -> None:
        self.relay = relay
        self.leg = leg
        self.clock = leg.ctx.clock
        self.sctp = SctpAssociation(
            remote_port=remote_port,
            receive_window=max(4 * relay.settings.max_message_bytes, 128 * 1024),
            send_buffer=SEND_BUFFER,
        )
        #: the peer's ``a=max-message-size`` (0: not said; RFC 8841 §6.1 then means 64 KiB)
        self.remote_max_message_size = max_message_size or 65536
        self.timer = leg.ctx.timers.timer(self._on_timer)
        #: channels the participant opened, by stream id
        self.channels: dict[int, Channel] = {}
        #: channels the relay opened to the participant: (sender id, sender key) -> stream
        self.relayed: dict[tuple[str, str, int], int] = {}
        self.relayed_keys: dict[int, tuple[str, str, int]] = {}
        #: the relay's channels whose DATA_CHANNEL_ACK came (messages may go unordered)
        self.acked: set[int] = set()
        #: streams the relay is closing (the peer's reset in reply frees them)
        self.closing: set[int] = set()
        #: channels the participant closed: not opened again
        self.refused: set[tuple[str, str, int]] = set()
        self._free: list[int] = []
        self._next_stream: int | None = None
        self.started = False

    @property
    def participant(self) -> Participant:
        return self.leg.participant

    @property
    def ready(self) -> bool:
        return self.sctp.established

    # -- transport ------------------------------------------------------------------------
    def start(self) -> None:
        """The DTLS handshake is done: the DTLS client sends INIT (a DTLS server waits for
        the peer's; browsers send one whatever their role)."""
        if self.started:
            return
        self.started = True
        dtls = self.leg.transport.dtls
        if dtls is not None and not dtls.is_server:
            self.sctp.connect(self.clock())
        self.flush()

    def receive_records(self, records: list[bytes]) -> None:
        now = self.clock()
        for record in records:
            try:
                self.sctp.receive(record, now)
            except Exception:  # a bug must cost this association, not the packet path
                log.exception("participant %s: SCTP failed", self.participant.participant_id)
                self.sctp.abort("internal error")
                break
        self.flush()

    def flush(self) -> None:
        """Send what SCTP has to send, handle its events, arm its timer."""
        sctp = self.sctp
        for _ in range(8):
            events = sctp.take_events()
            for event in events:
                try:
                    self._handle(event)
                except Exception:  # one bad event must not take the packet path down
                    log.exception("data channel event %s failed", type(event).__name__)
            packets = sctp.take_packets()
            if packets:
                dtls = self.leg.transport.dtls
                if dtls is not None:
                    out: list[bytes] = []
                    for packet in packets:
                        out += dtls.send_application_data(packet)
                    self.leg.send_datagrams(out)
            if not events and not packets:
                break
        deadline = sctp.next_timeout()
        if deadline is None:
            self.timer.cancel()
        elif self.timer.when != deadline:
            self.timer.arm(deadline)

    def _handle(self, event: object) -> None:
        if isinstance(event, MessageReceived):
            self.relay.on_message(self, event)
        elif isinstance(event, StreamsReset):
            self.relay.on_reset(self, event.stream_ids)
        elif isinstance(event, Connected):
            self.relay.on_connected(self)
        elif isinstance(event, Aborted):
            self.relay.on_closed(self, event.reason)

    def _on_timer(self, now: float) -> None:
        self.sctp.handle_timeout(now)
        self.flush()

    def close(self) -> None:
        self.timer.cancel()
        self.relay.forget(self)

    # -- channels the relay opens ---------------------------------------------------------
    def _allocate_stream(self) -> int | None:
        if self._free:
            return self._free.pop()
        if self._next_stream is None:
            dtls = self.leg.transport.dtls
            # RFC 8832 §6: the DTLS client uses even stream ids, the server odd ones
            self._next_stream = 1 if dtls is None or dtls.is_server else 0
        stream = self._next_stream
        if stream >= self.sctp.outbound_streams:
            return None
        self._next_stream += 2
        return stream

    def open_relayed(self, key: tuple[str, str, int], channel: ChannelOpen) -> int | None:
        """The stream of the relay's channel for ``key``, opened now if needed."""
        stream = self.relayed.get(key)
        if stream is not None or key in self.refused or not self.ready:
            return stream
        stream = self._allocate_stream()
        if stream is None:
            return None
        self.relayed[key] = stream
        self.relayed_keys[stream] = key
        self.sctp.send(stream, dcep.PPID_DCEP, channel.encode(), self.clock())
        return stream

    def close_relayed(self, key: tuple[str, str, int]) -> None:
        stream = self.relayed.pop(key, None)
        if stream is None:
            return
        self.relayed_keys.pop(stream, None)
        self.acked.discard(stream)
        self.closing.add(stream)
        self.sctp.reset_streams([stream], self.clock())


class DataChannelRelay:
    """Relays the data channel messages of every room of this process (see the module)."""

    def __init__(self, settings: DataChannelSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.endpoints: set[DataEndpoint] = set()
        self._buckets: dict[tuple[str, str], tuple[TokenBucket, TokenBucket]] = {}
        #: a worker process: what the room's participants on other workers must get (channel
        #: opened, message, channel closed) as a JSON-able dict; None in a single process
        self.on_remote: Callable[[dict[str, Any]], object] | None = None
        #: channels of participants on other workers: room id -> key -> (sender, open, to)
        self.remote_channels: dict[str, dict[tuple[str, str, int], tuple[str, Channel]]] = {}

    def attach(self, leg: Leg, remote_port: int, max_message_size: int) -> DataEndpoint:
        """Data channels negotiated on ``leg``: its endpoint (one per leg)."""
        if leg.data is None:
            leg.data = DataEndpoint(self, leg, remote_port, max_message_size)
            self.endpoints.add(leg.data)
            transport = leg.transport
            transport.data_channels = True
            if transport.dtls is not None:
                transport.dtls.accept_application_data = True
            if transport.ready:
                leg.data.start()
        return leg.data

    def forget(self, endpoint: DataEndpoint) -> None:
        self.endpoints.discard(endpoint)

    # -- events of an endpoint --------------------------------------------------------------
    def on_connected(self, endpoint: DataEndpoint) -> None:
        """A participant's association is up: open the room's channels meant for it."""
        p = endpoint.participant
        if endpoint.leg is not p.subscriber_leg:
            return
        for other in p.room.participants.values():
            if other is p:
                continue
            for source in (other.publisher_leg, other.subscriber_leg):
                if source is None or source.data is None:
                    continue
                for channel in source.data.channels.values():
                    if channel.to is None or channel.to == p.participant_id:
                        endpoint.open_relayed(
                            self._key(source.data, channel),
                            self._relayed_open(other, channel, p),
                        )
        for key, (sender_id, channel) in self.remote_channels.get(p.room.room_id, {}).items():
            if channel.to is None or channel.to == p.participant_id:
                endpoint.open_relayed(key, self._relayed_open_for(sender_id, channel, p))
        endpoint.flush()

    def on_closed(self, endpoint: DataEndpoint, reason: str) -> None:
        log.info(
            "participant %s: data channels of the %s connection closed: %s",
            endpoint.participant.participant_id,
            endpoint.leg.role,
            reason,
        )
        self._close_channels(endpoint, list(endpoint.channels.values()))

    def on_message(self, endpoint: DataEndpoint, message: MessageReceived) -> None:
        stream = message.stream_id
        if message.ppid == dcep.PPID_DCEP:
            self._on_dcep(endpoint, stream, message.data)
            return
        metrics = self.metrics
        metrics.datachannel_messages += 1
        channel = endpoint.channels.get(stream)
        if channel is None:
            if stream in endpoint.relayed_keys:
                return  # the recipient wrote on a relay channel: nobody to relay it to
            metrics.datachannel_drops["unknown_channel"] += 1
            return
        if message.ppid not in dcep.USER_PPIDS:
            metrics.datachannel_drops["unknown_channel"] += 1
            return
        settings = self.settings
        size = len(dcep.payload_of(message.ppid, message.data))
        if size > settings.max_message_bytes:
            metrics.datachannel_drops["too_large"] += 1
            return
        sender = endpoint.participant
        if not self._admit(sender, size, endpoint.clock()):
            metrics.datachannel_drops["rate_limited"] += 1
            return
        key = self._key(endpoint, channel)
        recipients = self._recipients(sender, channel)
        if self.on_remote is not None and (channel.to is None or not recipients):
            self.on_remote(
                {
                    "type": "message",
                    **self._describe(sender.room.room_id, key, channel),
                    "ppid": message.ppid,
                    "data": base64.b64encode(message.data).decode(),
                }
            )
        elif not recipients and channel.to is not None:
            metrics.datachannel_drops["no_recipient"] += 1
        self._deliver(sender.participant_id, key, channel, recipients, message.ppid, message.data)

    def _deliver(
        self,
        sender_id: str,
        key: tuple[str, str, int],
        channel: Channel,
        recipients: list[Participant],
        ppid: int,
        data: bytes,
    ) -> None:
        """One message to each of ``recipients``, on the relay's channel for ``key``."""
        metrics = self.metrics
        size = len(dcep.payload_of(ppid, data))
        for recipient in recipients:
            leg = recipient.subscriber_leg
            target = leg.data if leg is not None else None
            if target is None or not target.ready:
                if channel.to is not None:
                    metrics.datachannel_drops["no_recipient"] += 1
                continue
            if size > target.remote_max_message_size:
                metrics.datachannel_drops["too_large"] += 1
                continue
            relayed = target.open_relayed(
                key, self._relayed_open_for(sender_id, channel, recipient)
            )
            if relayed is None:
                if key not in target.refused:
                    metrics.datachannel_drops["no_recipient"] += 1
                continue
            opened = channel.open
            ordered = opened.ordered or relayed not in target.acked
            lifetime = None if opened.lifetime_ms is None else opened.lifetime_ms / 1000
            if not target.sctp.send(
                relayed,
                ppid,
                data,
                target.clock(),
                ordered=ordered,
                max_retransmits=opened.max_retransmits,
                lifetime=lifetime,
            ):
                metrics.datachannel_drops["send_buffer_full"] += 1
                continue
            target.flush()

    def on_reset(self, endpoint: DataEndpoint, streams: tuple[int, ...]) -> None:
        """The participant reset its outgoing streams: its channels there are closed."""
        ours: list[int] = []
        closed: list[Channel] = []
        for stream in streams:
            if stream in endpoint.closing:
                endpoint.closing.discard(stream)  # the reply to the relay's own close
                endpoint._free.append(stream)
                continue
            channel = endpoint.channels.pop(stream, None)
            if channel is not None:
                closed.append(channel)
                ours.append(stream)
                continue
            key = endpoint.relayed_keys.pop(stream, None)
            if key is not None:
                # the recipient closed a relay channel: not opened to it again
                endpoint.relayed.pop(key, None)
                endpoint.acked.discard(stream)
                endpoint.refused.add(key)
                ours.append(stream)
        if ours:
            endpoint.sctp.reset_streams(ours, endpoint.clock())
        self._close_channels(endpoint, closed)
        endpoint.flush()

    def participant_left(self, p: Participant) -> None:
        """Close the participant's channels at every recipient."""
        for leg in p.legs:
            if leg.data is not None:
                self._close_channels(leg.data, list(leg.data.channels.values()))
                leg.data.channels.clear()
        self._buckets.pop((p.room.room_id, p.participant_id), None)

    # -- internals --------------------------------------------------------------------------
    def _on_dcep(self, endpoint: DataEndpoint, stream: int, data: bytes) -> None:
        kind = dcep.message_type(data)
        if kind == dcep.ACK:
            endpoint.acked.add(stream)
            return
        if kind != dcep.OPEN:
            return
        try:
            opened = ChannelOpen.parse(data)
        except DcepError:
            self.metrics.datachannel_drops["unknown_channel"] += 1
            return
        now = endpoint.clock()
        if stream in endpoint.channels or stream in endpoint.relayed_keys:
            return  # a stream in use: ignored
        own = sum(
            len(leg.data.channels) for leg in endpoint.participant.legs if leg.data is not None
        )
        if own >= self.settings.max_channels_per_participant:
            self.metrics.datachannel_drops["too_many_channels"] += 1
            endpoint.sctp.send(stream, dcep.PPID_DCEP, dcep.encode_ack(), now)
            endpoint.sctp.reset_streams([stream], now)
            endpoint.flush()
            return
        to: str | None = None
        if opened.protocol.startswith(TO_PREFIX):
            to = opened.protocol[len(TO_PREFIX) :] or None
        channel = Channel(stream, opened, to)
        endpoint.channels[stream] = channel
        endpoint.sctp.send(stream, dcep.PPID_DCEP, dcep.encode_ack(), now)
        endpoint.flush()
        sender = endpoint.participant
        key = self._key(endpoint, channel)
        if self.on_remote is not None:
            self.on_remote({"type": "open", **self._describe(sender.room.room_id, key, channel)})
        for recipient in self._recipients(sender, channel):
            leg = recipient.subscriber_leg
            if leg is not None and leg.data is not None and leg.data.ready:
                leg.data.open_relayed(key, self._relayed_open(sender, channel, recipient))
                leg.data.flush()

    def _close_channels(self, endpoint: DataEndpoint, channels: list[Channel]) -> None:
        sender = endpoint.participant
        for channel in channels:
            key = self._key(endpoint, channel)
            if self.on_remote is not None:
                self.on_remote(
                    {"type": "close", **self._describe(sender.room.room_id, key, channel)}
                )
            for recipient in sender.room.participants.values():
                leg = recipient.subscriber_leg
                if leg is not None and leg.data is not None:
                    leg.data.close_relayed(key)
                    leg.data.refused.discard(key)
                    leg.data.flush()

    @staticmethod
    def _key(endpoint: DataEndpoint, channel: Channel) -> tuple[str, str, int]:
        return (endpoint.participant.participant_id, endpoint.leg.role, channel.stream_id)

    @staticmethod
    def _relayed_open(sender: Participant, channel: Channel, recipient: Participant) -> ChannelOpen:
        return DataChannelRelay._relayed_open_for(sender.participant_id, channel, recipient)

    @staticmethod
    def _relayed_open_for(sender_id: str, channel: Channel, recipient: Participant) -> ChannelOpen:
        protocol = FROM_PREFIX + sender_id
        if channel.to is not None:
            protocol += ";" + TO_PREFIX + recipient.participant_id
        o = channel.open
        return ChannelOpen(
            label=o.label,
            protocol=protocol,
            ordered=o.ordered,
            max_retransmits=o.max_retransmits,
            lifetime_ms=o.lifetime_ms,
            priority=o.priority,
        )

    @staticmethod
    def _recipients(sender: Participant, channel: Channel) -> list[Participant]:
        participants = sender.room.participants
        if channel.to is not None:
            target = participants.get(channel.to)
            return [target] if target is not None and target is not sender else []
        return [p for p in participants.values() if p is not sender]

    def _admit(self, sender: Participant, size: int, now: float) -> bool:
        """Take one message of ``size`` bytes from the sender's two token buckets."""
        key = (sender.room.room_id, sender.participant_id)
        buckets = self._buckets.get(key)
        settings = self.settings
        if buckets is None:
            buckets = self._buckets[key] = (
                TokenBucket(settings.messages_per_second, settings.burst_seconds, now),
                TokenBucket(settings.bytes_per_second, settings.burst_seconds, now),
            )
        messages, volume = buckets
        messages.refill(now)
        volume.refill(now)
        if messages.tokens < 1 or volume.tokens < size:
            return False
        messages.tokens -= 1
        volume.tokens -= size
        return True

    # -- across workers -------------------------------------------------------------------
    @staticmethod
    def _describe(room_id: str, key: tuple[str, str, int], channel: Channel) -> dict[str, Any]:
        o = channel.open
        return {
            "room_id": room_id,
            "key": list(key),
            "to": channel.to,
            "label": o.label,
            "ordered": o.ordered,
            "max_retransmits": o.max_retransmits,
            "lifetime_ms": o.lifetime_ms,
            "priority": o.priority,
        }

    def remote(self, params: dict[str, Any], rooms: dict[str, Any]) -> None:
        """What the same room's participants on another worker did (see :attr:`on_remote`):
        deliver it to the participants here. ``rooms``: this worker's rooms by id."""
        try:
            room_id = str(params["room_id"])
            sender_id, role, stream = params["key"]
            key = (str(sender_id), str(role), int(stream))
            to = params.get("to")
            opened = ChannelOpen(
                label=str(params["label"]),
                ordered=bool(params["ordered"]),
                max_retransmits=params.get("max_retransmits"),
                lifetime_ms=params.get("lifetime_ms"),
                priority=int(params.get("priority", 256)),
            )
            kind = params["type"]
        except (KeyError, TypeError, ValueError):
            log.warning("malformed data channel notification from another worker")
            return
        channel = Channel(stream, opened, None if to is None else str(to))
        room = rooms.get(room_id)
        if room is None:
            self.remote_channels.pop(room_id, None)
            return
        known = self.remote_channels.setdefault(room_id, {})
        if kind == "close":
            known.pop(key, None)
            if not known:
                self.remote_channels.pop(room_id, None)
        else:
            known[key] = (key[0], channel)
        recipients = [
            p
            for p in room.participants.values()
            if p.participant_id != key[0] and (channel.to is None or channel.to == p.participant_id)
        ]
        if kind == "message":
            data = base64.b64decode(params.get("data", ""))
            self._deliver(key[0], key, channel, recipients, int(params.get("ppid", 51)), data)
            return
        for recipient in recipients:
            leg = recipient.subscriber_leg
            target = leg.data if leg is not None else None
            if target is None:
                continue
            if kind == "open" and target.ready:
                target.open_relayed(key, self._relayed_open_for(key[0], channel, recipient))
            elif kind == "close":
                target.close_relayed(key)
                target.refused.discard(key)
            target.flush()

    def room_closed(self, room_id: str) -> None:
        self.remote_channels.pop(room_id, None)
