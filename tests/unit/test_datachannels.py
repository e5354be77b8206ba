"""The data channel relay (relay/sfu/datachannels.py), sans-I/O: participants' clients are
SCTP associations (relay/rtc/sctp.py) wired to the relay's endpoints through fake legs whose
"DTLS" passes SCTP packets through; what each client receives is read back as bytes."""

from __future__ import annotations

import dataclasses
from typing import Any

from relay.config import DataChannelSettings
from relay.metrics import Metrics
from relay.rtc import dcep, sdp
from relay.rtc.dcep import ChannelOpen
from relay.rtc.sctp import MessageReceived, SctpAssociation, StreamsReset
from relay.sfu.datachannels import DataChannelRelay
from relay.sfu.participant import Participant
from relay.sfu.room import Room
from relay.sfu.timers import Timers


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeDtls:
    """The relay is the DTLS server (odd stream ids); records pass unchanged."""

    is_server = True

    def send_application_data(self, data: bytes) -> list[bytes]:
        return [data]


@dataclasses.dataclass
class FakeTransport:
    dtls: FakeDtls
    ready: bool = True
    data_channels: bool = False


class FakeLeg:
    """Just what a DataEndpoint uses of a leg; its peer is a client SCTP association."""

    def __init__(self, world: World, participant: Participant, role: str) -> None:
        self.ctx = world
        self.participant = participant
        self.role = role
        self.transport = FakeTransport(FakeDtls())
        self.data: Any = None
        self.client = SctpAssociation()
        self.inbox: list[MessageReceived] = []
        #: stream -> ChannelOpen the relay opened to this client
        self.opened: dict[int, ChannelOpen] = {}
        self.resets: list[int] = []
        self.world = world

    def send_datagrams(self, datagrams: list[bytes]) -> None:
        for d in datagrams:
            self.client.receive(d, self.world.clock())
        self.world.pending.add(self)

    def pump_client(self) -> bool:
        packets = self.client.take_packets()
        for event in self.client.take_events():
            if isinstance(event, MessageReceived):
                if event.ppid == dcep.PPID_DCEP and event.data[:1] == b"\x03":
                    self.opened[event.stream_id] = ChannelOpen.parse(event.data)
                    self.client.send(
                        event.stream_id, dcep.PPID_DCEP, dcep.encode_ack(), self.world.clock()
                    )
                    packets += self.client.take_packets()
                elif event.ppid != dcep.PPID_DCEP:
                    self.inbox.append(event)
            elif isinstance(event, StreamsReset):
                self.resets += event.stream_ids
        if packets and self.data is not None:
            self.data.receive_records(packets)
        return bool(packets)


class World:
    def __init__(self, **settings: Any) -> None:
        self.clock = Clock()
        self.timers = Timers()
        self.metrics = Metrics()
        self.relay = DataChannelRelay(DataChannelSettings(**settings), self.metrics)
        self.room = Room("r", 0.0, 10, False, 300.0, 0.0)
        self.legs: list[FakeLeg] = []
        self.pending: set[FakeLeg] = set()

    def join(self, pid: str) -> tuple[FakeLeg, FakeLeg]:
        p = Participant(pid, self.room, {}, 0.0, True, True, True)
        self.room.participants[pid] = p
        pub, sub = FakeLeg(self, p, "publisher"), FakeLeg(self, p, "subscriber")
        p.publisher_leg, p.subscriber_leg = pub, sub  # type: ignore[assignment]
        for leg in (pub, sub):
            self.relay.attach(leg, 5000, 65536)  # type: ignore[arg-type]
            leg.client.connect(self.clock())
            self.legs.append(leg)
        self.pump()
        return pub, sub

    def pump(self) -> None:
        for _ in range(50):
            moved = False
            for leg in self.legs:
                moved |= leg.pump_client()
            if not moved:
                return

    def open(self, leg: FakeLeg, stream: int, channel: ChannelOpen) -> None:
        leg.client.send(stream, dcep.PPID_DCEP, channel.encode(), self.clock())
        self.pump()

    def say(self, leg: FakeLeg, stream: int, text: str, ordered: bool = True) -> None:
        leg.client.send(stream, dcep.PPID_STRING, text.encode(), self.clock(), ordered=ordered)
        self.pump()


def texts(leg: FakeLeg) -> list[tuple[str, str, str]]:
    """(label, protocol, text) of what the client received on relay channels."""
    return [
        (leg.opened[m.stream_id].label, leg.opened[m.stream_id].protocol, m.data.decode())
        for m in leg.inbox
    ]


def test_room_wide_channel_is_opened_at_everyone_and_relayed() -> None:
    w = World()
    a_pub, _ = w.join("a")
    _, b_sub = w.join("b")
    _, c_sub = w.join("c")
    assert all(leg.data.ready for leg in w.legs)
    w.open(a_pub, 0, ChannelOpen("chat", ordered=False, max_retransmits=2))
    # the relay opened one channel at b and c: same label and reliability, the sender named
    for sub in (b_sub, c_sub):
        ((stream, opened),) = sub.opened.items()
        assert stream % 2 == 1  # the relay is the DTLS server: odd stream ids
        assert opened == ChannelOpen("chat", "from:a", ordered=False, max_retransmits=2)
    w.say(a_pub, 0, "hello")
    assert texts(b_sub) == texts(c_sub) == [("chat", "from:a", "hello")]
    assert w.metrics.datachannel_messages == 1
    assert a_pub.data.channels[0].open.label == "chat"


def test_late_joiner_gets_the_existing_channels() -> None:
    w = World()
    a_pub, _ = w.join("a")
    w.open(a_pub, 0, ChannelOpen("chat"))
    _, b_sub = w.join("b")
    assert [o.label for o in b_sub.opened.values()] == ["chat"]
    w.say(a_pub, 0, "welcome")
    assert texts(b_sub) == [("chat", "from:a", "welcome")]


def test_one_to_one_channel_reaches_its_addressee_only() -> None:
    w = World()
    a_pub, a_sub = w.join("a")
    _, b_sub = w.join("b")
    _, c_sub = w.join("c")
    w.open(a_pub, 2, ChannelOpen("chat", "to:b"))
    w.say(a_pub, 2, "psst")
    assert texts(b_sub) == [("chat", "from:a;to:b", "psst")]
    assert c_sub.opened == {} and c_sub.inbox == [] and a_sub.inbox == []
    # to nobody in the room: counted
    w.open(a_pub, 4, ChannelOpen("chat", "to:zed"))
    w.say(a_pub, 4, "anyone?")
    assert w.metrics.datachannel_drops["no_recipient"] == 1


def test_limits_are_counted_drops() -> None:
    w = World(messages_per_second=5, bytes_per_second=4096, burst_seconds=1.0)
    w.relay.settings = dataclasses.replace(w.relay.settings, max_message_bytes=2048)
    a_pub, _ = w.join("a")
    _, b_sub = w.join("b")
    w.open(a_pub, 0, ChannelOpen("chat"))
    w.say(a_pub, 0, "x" * 3000)  # over max_message_bytes
    assert w.metrics.datachannel_drops["too_large"] == 1
    for i in range(20):
        w.say(a_pub, 0, f"m{i}")
    assert [t for _, _, t in texts(b_sub)] == [f"m{i}" for i in range(5)]  # the burst
    assert w.metrics.datachannel_drops["rate_limited"] == 15
    w.clock.now += 1.0  # a second later: five more
    for i in range(6):
        w.say(a_pub, 0, f"later{i}")
    assert [t for _, _, t in texts(b_sub)][5:] == [f"later{i}" for i in range(5)]
    # bytes per second: 4096 saved up at most
    w.clock.now += 10.0
    w.say(a_pub, 0, "y" * 2000)
    w.say(a_pub, 0, "y" * 2000)
    w.say(a_pub, 0, "y" * 2000)
    assert w.metrics.datachannel_drops["rate_limited"] == 15 + 1 + 1
    # data on a stream nobody opened
    w.say(a_pub, 10, "who?")
    assert w.metrics.datachannel_drops["unknown_channel"] == 1


def test_too_many_channels_are_refused() -> None:
    w = World(max_channels_per_participant=2)
    a_pub, _ = w.join("a")
    _, b_sub = w.join("b")
    for stream in (0, 2, 4):
        w.open(a_pub, stream, ChannelOpen(f"c{stream}"))
    assert sorted(a_pub.data.channels) == [0, 2]
    assert w.metrics.datachannel_drops["too_many_channels"] == 1
    assert 4 in a_pub.resets  # closed at once
    assert sorted(o.label for o in b_sub.opened.values()) == ["c0", "c2"]


def test_closing_a_channel_and_leaving_close_it_at_the_others() -> None:
    w = World()
    a_pub, _ = w.join("a")
    _, b_sub = w.join("b")
    w.open(a_pub, 0, ChannelOpen("chat"))
    w.open(a_pub, 2, ChannelOpen("other"))
    relayed = {o.label: s for s, o in b_sub.opened.items()}
    a_pub.client.reset_streams([0], w.clock())
    w.pump()
    assert relayed["chat"] in b_sub.resets and relayed["other"] not in b_sub.resets
    assert 0 not in a_pub.data.channels
    w.relay.participant_left(w.room.participants["a"])
    w.pump()
    assert relayed["other"] in b_sub.resets


def test_a_recipient_that_closes_a_relay_channel_does_not_get_it_again() -> None:
    w = World()
    a_pub, _ = w.join("a")
    _, b_sub = w.join("b")
    w.open(a_pub, 0, ChannelOpen("chat"))
    (stream,) = b_sub.opened
    b_sub.client.reset_streams([stream], w.clock())
    w.pump()
    w.say(a_pub, 0, "still there?")
    assert b_sub.inbox == []


# -- the m=application lines (relay/rtc/sdp.py) ---------------------------------------------


def test_answer_accepts_browser_data_channels() -> None:
    from tests.unit.test_sdp import load, local_transport

    for name in ("chrome", "firefox"):
        offer = sdp.parse_sdp(load(name))
        text, answered = sdp.build_answer(offer, local_transport(), data_channels=4096)
        app = answered[2]
        assert app.kind == "application" and not app.rejected
        parsed = sdp.parse_sdp(text)
        m = parsed.media[2]
        assert (m.kind, m.port, m.protocol, m.formats) == (
            "application",
            40000,
            "UDP/DTLS/SCTP",
            ["webrtc-datachannel"],
        )
        assert (m.sctp_port, m.max_message_size, m.mid) == (5000, 4096, offer.media[2].mid)
        assert m.setup == "passive" and m.fingerprints and m.ice_ufrag == "rlyU"
        assert parsed.bundle_mids == offer.bundle_mids
        # a legacy "DTLS/SCTP 5000" line is not taken
        legacy = load(name).replace("UDP/DTLS/SCTP webrtc-datachannel", "DTLS/SCTP 5000")
        _, answered = sdp.build_answer(sdp.parse_sdp(legacy), local_transport(), data_channels=1)
        assert answered[2].rejected


def test_subscriber_offer_with_a_data_channel_line() -> None:
    from tests.unit.test_sdp import local_transport

    audio = sdp.OfferedMedia(
        mid="0",
        kind="audio",
        direction="inactive",
        codecs=[sdp.Codec(111, "opus", 48000, 2, kind="audio")],
        extmaps=[],
        ssrc=None,
    )
    app = sdp.OfferedMedia(
        mid="dc",
        kind="application",
        direction="sendrecv",
        codecs=[],
        extmaps=[],
        ssrc=None,
        max_message_size=65536,
    )
    text = sdp.build_offer(local_transport(), [audio, app])
    offer = sdp.parse_sdp(text)
    assert offer.bundle_mids == ["0", "dc"]
    m = offer.media[1]
    assert (m.kind, m.protocol, m.formats, m.sctp_port, m.max_message_size) == (
        "application",
        "UDP/DTLS/SCTP",
        ["webrtc-datachannel"],
        5000,
        65536,
    )
    # an answer's application line has no a=rtcp-mux: still a valid answer
    answer = text.replace("a=setup:actpass", "a=setup:active")
    assert sdp.check_answer([audio, app], sdp.parse_sdp(answer)) is not None
