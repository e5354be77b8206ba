"""The pipe between two workers, each a real Sfu with real client handshakes (the unit
harness), their pipe endpoints wired to each other through an in-memory datagram queue: a
publisher on worker A, a subscriber on worker B in the same room id. What crosses the pipe
(copies with the pipe SSRC, sender reports, PLI and NACK back), what B does on its own (its
history answers its subscribers), simulcast over the pipe, the end of an export or import, and
what the remote publisher is not on B (listed, counted, an event source, timed out)."""

from __future__ import annotations

import json
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from relay.rtc import rtcp
from relay.rtc.rtp import is_rtcp, parse_rtp
from relay.rtc.sdp import parse_sdp
from relay.server import Deferred
from relay.sfu.errors import BadRequest, NotFound
from relay.sfu.participant import Participant
from relay.sfu.subscription import Subscription
from relay.sfu.track import Track
from relay.workers.pipe import (
    LAYERS_REFRESH,
    LAYERS_REPEAT,
    PipeEndpoint,
    layers_message,
    open_pipe,
    parse_layers_message,
)
from tests.unit.harness import Harness
from tests.unit.test_sfu import (
    AIORTC_AUDIO_SSRC,
    AIORTC_VIDEO_SSRC,
    FIXTURES,
    VP8_KEYFRAME,
    aiortc_offer,
    rtp,
)
from tests.unit.test_simulcast import LAYERS, MID_ID, RID_ID, VP8_PT, vp8

Address = tuple[str, int]
#: the two workers' pipe sockets
PIPE_A = ("127.0.0.1", 7001)
PIPE_B = ("127.0.0.1", 7002)
ALICE = ("10.0.0.1", 4000)
BOB = ("10.0.0.2", 5000)
CAROL = ("10.0.0.3", 6000)
#: aiortc's ids for mid and ssrc-audio-level in the offer fixture
AIORTC_AUDIO_LEVEL_ID = 2


class Workers:
    """Worker A (``a``) and worker B (``b``), each a harness with its own Sfu and clock, and
    their pipe endpoints; what one endpoint sends waits in :attr:`queue` until
    :meth:`deliver` hands it to the other (``lose`` may drop some on the way)."""

    def __init__(self) -> None:
        self.a = Harness()
        self.b = Harness()
        self.queue: list[tuple[bytes, Address, Address]] = []
        #: what crossed the pipe, in order: (datagram, from, to)
        self.carried: list[tuple[bytes, Address, Address]] = []
        self.lost: list[tuple[bytes, Address, Address]] = []
        self.lose: Callable[[bytes, Address, Address], bool] = lambda data, src, dst: False
        self.pipe_a = PipeEndpoint(self.a.sfu, lambda batch: self._send(PIPE_A, batch))
        self.pipe_b = PipeEndpoint(self.b.sfu, lambda batch: self._send(PIPE_B, batch))
        self.endpoints = {PIPE_A: self.pipe_a, PIPE_B: self.pipe_b}

    def _send(self, src: Address, batch: list[tuple[bytes | bytearray, Address]]) -> None:
        for data, dst in batch:
            self.queue.append((bytes(data), src, dst))

    def deliver(self) -> None:
        while self.queue:
            item = self.queue.pop(0)
            if self.lose(*item):
                self.lost.append(item)
                continue
            self.carried.append(item)
            data, src, dst = item
            self.endpoints[dst].datagram_received(data, src)

    def advance(self, seconds: float) -> None:
        """Both clocks move on; both workers' timers run, then the pipe delivers."""
        self.a.now += seconds
        self.b.now += seconds
        self.a.sfu.timers.run(self.a.now)
        self.b.sfu.timers.run(self.b.now)
        self.deliver()

    def publish(self, packet: bytes) -> None:
        """Alice's publisher sends ``packet`` to worker A; the pipe delivers."""
        self.a.receive(packet, ALICE)
        self.deliver()

    def export(self, track: Track) -> dict[str, Any]:
        """A exports ``track`` to B, B imports it: the description as the RPC carries it."""
        description = self.pipe_a.export_track("r", track.track_id, list(PIPE_B))
        description = json.loads(json.dumps(description))
        self.pipe_b.import_track("r", list(PIPE_A), description)
        return description

    def pipe_rtcp(self, src: Address) -> list[rtcp.RtcpPacket]:
        return [
            p for d, s, _dst in self.carried if s == src and is_rtcp(d) for p in rtcp.parse_rtcp(d)
        ]

    def pipe_rtp(self, src: Address) -> list[bytes]:
        return [d for d, s, _dst in self.carried if s == src and not is_rtcp(d)]


def to(h: Harness, addr: Address, ssrc: int | None = None) -> list[bytes]:
    """RTP ``h``'s relay sent to ``addr`` (on ``ssrc``), decrypted."""
    return [
        d
        for d, a in h.sent
        if a == addr
        and 127 < d[0] < 192
        and not is_rtcp(d)
        and (ssrc is None or parse_rtp(d)[3] == ssrc)
    ]


def rtcp_to(h: Harness, addr: Address) -> list[rtcp.RtcpPacket]:
    return [
        p
        for d, a in h.sent
        if a == addr and 127 < d[0] < 192 and is_rtcp(d)
        for p in rtcp.parse_rtcp(d)
    ]


def call(bob_joins_first: bool = True) -> tuple[Workers, Participant, Participant, dict[str, Any]]:
    """Alice publishes audio and video on A (connected); both tracks are piped to B, where bob
    subscribes (joining before or after the import) and connects. The descriptions by kind."""
    w = Workers()
    w.a.sfu.add_participant("r", "alice")
    w.a.publish("alice", aiortc_offer())
    alice = w.a.sfu.get_participant("r", "alice")
    w.a.connect(alice.publisher_leg, ALICE)
    if bob_joins_first:
        w.b.sfu.add_participant("r", "bob")
    descriptions = {t.kind: w.export(t) for t in alice.tracks.values()}
    if not bob_joins_first:
        w.b.sfu.add_participant("r", "bob")
    bob = w.b.sfu.get_participant("r", "bob")
    w.b.answer("bob")
    w.b.connect(bob.subscriber_leg, BOB)
    w.deliver()
    return w, alice, bob, descriptions


def sub_of(p: Participant, kind: str) -> Subscription:
    return next(s for s in p.subscriptions.values() if s.track.kind == kind)


def video_packets(w: Workers, first: int, count: int) -> dict[int, bytes]:
    """Alice sends ``count`` video packets from ``first`` (a keyframe first); their payloads."""
    payloads = {}
    for n in range(count):
        seq = (first + n) & 0xFFFF
        payload = VP8_KEYFRAME if n == 0 else b"\x90\x10video-%d" % seq
        payloads[seq] = payload
        w.publish(rtp(AIORTC_VIDEO_SSRC, 97, seq, 9000 + 3000 * n, [], payload))
    return payloads


# -- media across the pipe --------------------------------------------------------------------
def test_the_subscriber_on_b_gets_as_packets_renumbered_by_b() -> None:
    w, _alice, bob, descriptions = call()
    video, audio = sub_of(bob, "video"), sub_of(bob, "audio")
    assert video.active and audio.active
    w.b.sent.clear()
    payloads = video_packets(w, 65534, 4)  # the publisher's numbering wraps
    out = to(w.b, BOB, video.ssrc)
    assert len(out) == 4
    parsed = [parse_rtp(d) for d in out]
    assert [p[1] for p in parsed] == [(parsed[0][1] + i) & 0xFFFF for i in range(4)]
    assert [(p[2] - parsed[0][2]) & 0xFFFFFFFF for p in parsed] == [0, 3000, 6000, 9000]
    assert all(p[0] == video.payload_type for p in parsed)
    assert [d[p[5] :] for d, p in zip(out, parsed, strict=True)] == list(payloads.values())
    # on the pipe: the publisher's numbering, the pipe SSRC, nothing else changed
    piped = [parse_rtp(d) for d in w.pipe_rtp(PIPE_A)]
    assert [p[1] for p in piped] == list(payloads)
    assert {p[3] for p in piped} == {descriptions["video"]["ssrc"]}
    # audio too, with its level extension mapped to bob's id
    w.b.sent.clear()
    w.publish(rtp(AIORTC_AUDIO_SSRC, 96, 7, 960, [(AIORTC_AUDIO_LEVEL_ID, b"\x85")]))
    [packet] = to(w.b, BOB, audio.ssrc)
    assert packet.endswith(b"\x90\x10payload-bytes")
    stats = w.b.sfu.participant_stats("r", "bob")["outbound"]
    assert {s["track_id"] for s in stats} == {audio.track.track_id, video.track.track_id}
    assert next(s for s in stats if s["kind"] == "video")["packets"] == 4


def test_a_subscriber_joining_after_the_import_is_subscribed_too() -> None:
    w, alice, bob, _d = call(bob_joins_first=False)
    assert set(bob.subscriptions) == set(alice.tracks)
    w.b.sent.clear()
    video_packets(w, 10, 2)
    assert len(to(w.b, BOB, sub_of(bob, "video").ssrc)) == 2


def test_packets_read_together_cross_the_pipe_in_one_send_before_their_local_fan_out() -> None:
    """With the asyncio layer's ``defer`` and ``send_soon`` (relay.server.Deferred on a loop
    stand-in), worker A sends the pipe copies of every packet it read in one turn of the
    event loop together, in one send, before any local copy: B wakes once for the frame and
    its subscribers do not wait for A's fan-out. A's own subscriber then gets every packet,
    in order, and once nothing is piped, packets go straight out again."""
    w, alice, bob, _d = call()
    w.a.sfu.add_participant("r", "carol")
    carol = w.a.sfu.get_participant("r", "carol")
    w.a.answer("carol")
    w.a.connect(carol.subscriber_leg, CAROL)
    video_packets(w, 10, 2)  # a keyframe first: carol and bob receive from here on
    carol_video, bob_video = sub_of(carol, "video"), sub_of(bob, "video")
    assert len(to(w.a, CAROL, carol_video.ssrc)) == 2
    turns: list[Callable[[], None]] = []
    deferred = Deferred(SimpleNamespace(call_soon=turns.append))  # type: ignore[arg-type]
    w.a.sfu.media.defer, w.a.sfu.media.send_soon = deferred.defer, deferred.send_soon
    #: the size of each batch A sends over the pipe, and what carol had got by then
    sends: list[int] = []
    carol_had: list[int] = []
    pipe_send = w._send

    def counted(src: Address, batch: list[tuple[bytes | bytearray, Address]]) -> None:
        sends.append(len(batch))
        carol_had.append(len(to(w.a, CAROL, carol_video.ssrc)))
        pipe_send(src, batch)

    w._send = counted  # type: ignore[method-assign]
    w.a.sent.clear()
    sent = [b"\x90\x10later-%d" % n for n in range(3)]
    for n, payload in enumerate(sent):
        w.a.receive(rtp(AIORTC_VIDEO_SSRC, 97, 12 + n, 15000 + 3000 * n, [], payload), ALICE)
    # the turn is not over: nothing has gone to B or to carol yet
    assert w.queue == [] and to(w.a, CAROL, carol_video.ssrc) == []
    assert len(turns) == 1
    (next_turn,) = turns
    next_turn()
    # one send of three copies to B, then carol's three packets
    assert sends == [3] and carol_had == [0], (sends, carol_had)
    assert [parse_rtp(d)[1] for d, _src, _dst in w.queue if not is_rtcp(d)] == [12, 13, 14]
    assert payloads(to(w.a, CAROL, carol_video.ssrc)) == sent
    w.deliver()
    assert payloads(to(w.b, BOB, bob_video.ssrc))[-3:] == sent
    # B stops wanting the track: nothing is piped or deferred, the packet goes straight out
    track = next(t for t in alice.tracks.values() if t.kind == "video")
    w.pipe_a.unexport_track("r", track.track_id, list(PIPE_B))
    turns.clear()
    w.a.receive(rtp(AIORTC_VIDEO_SSRC, 97, 15, 24000, [], b"\x90\x10now"), ALICE)
    assert turns == []
    assert payloads(to(w.a, CAROL, carol_video.ssrc))[-1] == b"\x90\x10now"


def test_a_keyframe_request_from_b_reaches_the_publisher_on_a() -> None:
    w, alice, bob, descriptions = call()
    # bob's video becoming active asked for a keyframe: across the pipe, then to alice
    plis = [p for p in w.pipe_rtcp(PIPE_B) if isinstance(p, rtcp.Pli)]
    assert [p.media_ssrc for p in plis] == [descriptions["video"]["ssrc"]]
    assert [p.media_ssrc for p in rtcp_to(w.a, ALICE) if isinstance(p, rtcp.Pli)] == [
        AIORTC_VIDEO_SSRC
    ]
    video_packets(w, 100, 3)
    w.advance(1.0)
    w.a.sent.clear()
    w.carried.clear()
    w.b.receive(rtcp.pli(1234, sub_of(bob, "video").ssrc), BOB)
    w.deliver()
    assert [p.media_ssrc for p in w.pipe_rtcp(PIPE_B) if isinstance(p, rtcp.Pli)] == [
        descriptions["video"]["ssrc"]
    ]
    assert [p.media_ssrc for p in rtcp_to(w.a, ALICE) if isinstance(p, rtcp.Pli)] == [
        AIORTC_VIDEO_SSRC
    ]
    assert w.pipe_a.keyframe_requests_received == 2
    # within the publisher's keyframe interval B's own requester holds the next one back
    w.carried.clear()
    w.b.receive(rtcp.pli(1234, sub_of(bob, "video").ssrc), BOB)
    w.deliver()
    assert not [p for p in w.pipe_rtcp(PIPE_B) if isinstance(p, rtcp.Pli)]
    assert alice.publisher_leg is not None


def test_a_second_subscriber_on_b_gets_its_keyframe_request_through_to_the_publisher() -> None:
    w, alice, bob, descriptions = call()
    video_packets(w, 100, 3)  # the keyframe bob's request asked for, then more
    assert sub_of(bob, "video").stream.packets_sent == 3
    w.b.now += 0.2  # within the keyframe interval of bob's request
    w.a.now += 0.2
    w.a.sent.clear()
    w.carried.clear()
    w.b.sfu.add_participant("r", "carol")
    w.b.answer("carol")
    carol = w.b.sfu.get_participant("r", "carol")
    w.b.connect(carol.subscriber_leg, CAROL)
    w.deliver()
    # A saw the keyframe it had asked for go through the pipe: a new request goes out
    assert [p.media_ssrc for p in w.pipe_rtcp(PIPE_B) if isinstance(p, rtcp.Pli)] == [
        descriptions["video"]["ssrc"]
    ]
    assert [p.media_ssrc for p in rtcp_to(w.a, ALICE) if isinstance(p, rtcp.Pli)] == [
        AIORTC_VIDEO_SSRC
    ]
    assert alice.publisher_leg is not None


def test_a_nack_from_the_subscriber_is_answered_by_b_from_its_own_history() -> None:
    w, _alice, bob, _d = call()
    video = sub_of(bob, "video")
    w.b.sent.clear()
    payloads = video_packets(w, 300, 5)
    out = to(w.b, BOB, video.ssrc)
    lost = parse_rtp(out[2])[1]
    w.b.sent.clear()
    w.carried.clear()
    w.b.receive(rtcp.nack(1234, video.ssrc, [lost]), BOB)
    w.deliver()
    [resent] = to(w.b, BOB, video.rtx_ssrc)
    offset = parse_rtp(resent)[5]
    assert int.from_bytes(resent[offset : offset + 2], "big") == lost
    assert resent[offset + 2 :] == payloads[302]
    assert w.carried == [] and w.pipe_a.nacks_received == 0  # nothing asked across the pipe


def test_a_packet_lost_on_the_pipe_is_nacked_across_it_and_repaired() -> None:
    w, alice, bob, descriptions = call()
    video = sub_of(bob, "video")
    w.lose = lambda data, src, dst: (
        src == PIPE_A and not is_rtcp(data) and parse_rtp(data)[1] == 202
    )
    w.b.sent.clear()
    payloads = video_packets(w, 200, 4)  # 202 does not reach B
    assert len(w.lost) == 1
    w.lose = lambda data, src, dst: False
    assert len(to(w.b, BOB, video.ssrc)) == 3
    w.carried.clear()
    w.a.sent.clear()
    w.advance(0.05)
    nacks = [p for p in w.pipe_rtcp(PIPE_B) if isinstance(p, rtcp.Nack)]
    assert [(n.media_ssrc, n.lost) for n in nacks] == [(descriptions["video"]["ssrc"], [202])]
    # A answered from its history over the pipe; the publisher was asked for nothing
    [repair] = w.pipe_rtp(PIPE_A)
    assert parse_rtp(repair)[1] == 202 and parse_rtp(repair)[3] == descriptions["video"]["ssrc"]
    assert not [p for p in rtcp_to(w.a, ALICE) if isinstance(p, rtcp.Nack)]
    forwarded = to(w.b, BOB, video.ssrc)
    assert forwarded[-1][parse_rtp(forwarded[-1])[5] :] == payloads[202]
    track = video.track
    assert track.nack is not None and track.nack.generator.missing == 0
    assert w.pipe_a.retransmissions == 1
    # the same packet once more (a late original): not forwarded twice
    w.b.sent.clear()
    w.pipe_b.datagram_received(repair, PIPE_A)
    assert to(w.b, BOB, video.ssrc) == []
    assert w.b.sfu.metrics.drops["rtx_duplicate"] == 1
    assert alice.tracks


def test_the_publishers_sender_report_reaches_the_subscriber_translated() -> None:
    w, _alice, bob, descriptions = call()
    video = sub_of(bob, "video")
    w.b.sent.clear()
    video_packets(w, 500, 2)
    first = to(w.b, BOB, video.ssrc)[0]
    offset = (parse_rtp(first)[2] - 9000) & 0xFFFFFFFF  # bob's timestamp minus alice's
    w.b.sent.clear()
    ntp = rtcp.ntp_from_unix(1.7e9)
    w.a.receive(rtcp.sender_report(AIORTC_VIDEO_SSRC, ntp, 12000, 2, 100), ALICE)
    w.deliver()
    [piped] = [p for p in w.pipe_rtcp(PIPE_A) if isinstance(p, rtcp.SenderReport)]
    assert (piped.ssrc, piped.ntp_timestamp, piped.rtp_timestamp) == (
        descriptions["video"]["ssrc"],
        ntp,
        12000,
    )
    [sr] = [p for p in rtcp_to(w.b, BOB) if isinstance(p, rtcp.SenderReport)]
    assert sr.ssrc == video.ssrc and sr.ntp_timestamp == ntp
    assert sr.rtp_timestamp == (12000 + offset) & 0xFFFFFFFF
    assert sr.packet_count == 2
    assert video.track.last_sr is not None


# -- simulcast --------------------------------------------------------------------------------
def test_simulcast_layers_are_piped_and_b_switches_between_them() -> None:
    w = Workers()
    w.a.sfu.add_participant("r", "alice")
    w.a.publish("alice", (FIXTURES / "chrome_simulcast_offer.sdp").read_text())
    alice = w.a.sfu.get_participant("r", "alice")
    w.a.connect(alice.publisher_leg, ALICE)
    w.b.sfu.add_participant("r", "bob")
    track = next(t for t in alice.tracks.values() if t.kind == "video")
    description = w.export(track)
    assert [x["rid"] for x in description["layers"]] == ["q", "h", "f"]
    assert description["ssrc"] is None
    pipe_ssrcs = [x["ssrc"] for x in description["layers"]]
    assert len(set(pipe_ssrcs)) == 3
    bob = w.b.sfu.get_participant("r", "bob")
    w.b.answer("bob", twcc=False)
    w.b.connect(bob.subscriber_leg, BOB)
    w.deliver()
    video = sub_of(bob, "video")
    imported = video.track
    assert [layer.rid for layer in imported.layers] == ["q", "h", "f"]
    seqs = {ssrc: 1000 * i for i, (_r, ssrc, _s) in enumerate(LAYERS)}

    def send(layer: int, keyframe: bool = False, first: bool = False) -> None:
        rid, ssrc, size = LAYERS[layer]
        seqs[ssrc] += 1
        seq = seqs[ssrc]
        elements = [(MID_ID, b"1"), (RID_ID, rid.encode())] if first else []
        w.publish(rtp(ssrc, VP8_PT, seq, seq * 3000, elements, vp8(keyframe, size, seq)))

    for layer in range(3):
        send(layer, keyframe=True, first=True)
    # B learned each layer's picture size from its keyframes; bob gets the best layer
    assert [(t.width, t.height) for t in imported.layers] == [s for _r, _x, s in LAYERS]
    assert video.stream.track is imported.layers[2]
    w.b.sent.clear()
    for layer in range(3):
        send(layer)
    assert len(to(w.b, BOB, video.ssrc)) == 1
    # a size limit on B: the q layer's keyframe is asked for across the pipe, from alice
    w.advance(1.0)
    w.a.sent.clear()
    w.carried.clear()
    w.b.sfu.set_subscription_preferences("r", "bob", imported.track_id, {"max_height": 180})
    w.deliver()
    assert video.stream.target is imported.layers[0]
    assert [p.media_ssrc for p in w.pipe_rtcp(PIPE_B) if isinstance(p, rtcp.Pli)] == [pipe_ssrcs[0]]
    assert [p.media_ssrc for p in rtcp_to(w.a, ALICE) if isinstance(p, rtcp.Pli)] == [LAYERS[0][1]]
    w.b.sent.clear()
    send(0, keyframe=True)
    send(2)
    assert video.stream.track is imported.layers[0]
    assert len(to(w.b, BOB, video.ssrc)) == 1
    # on A, the layers wanted are those B's subscribers choose (A has none of its own)
    w.a.sfu.tick(w.a.now)
    assert w.a.events_of("publisher.layers")[-1]["wanted"] == ["q"]
    stats = w.b.sfu.participant_stats("r", "bob")["outbound"]
    assert next(s for s in stats if s["kind"] == "video")["layer"] == "q"
    # an import made now starts with the picture sizes A has seen
    later = w.pipe_a.export_track("r", track.track_id, ["127.0.0.1", 7003])
    assert [(x["width"], x["height"]) for x in later["layers"]] == [s for _r, _x, s in LAYERS]
    w.b.sfu.create_room("r3")
    w.pipe_b.import_track("r3", ["127.0.0.1", 7003], later)
    copy = next(iter(w.b.sfu.get_room("r3").remote["alice"].tracks.values()))
    assert [(t.width, t.height) for t in copy.layers] == [s for _r, _x, s in LAYERS]


def test_layers_replaced_by_a_renegotiation_stay_piped_and_restart_on_b() -> None:
    w = Workers()
    w.a.sfu.add_participant("r", "alice")
    offer = (FIXTURES / "chrome_simulcast_offer.sdp").read_text()
    w.a.publish("alice", offer)
    alice = w.a.sfu.get_participant("r", "alice")
    w.a.connect(alice.publisher_leg, ALICE)
    track = next(t for t in alice.tracks.values() if t.kind == "video")
    description = w.export(track)
    old_layers = list(track.layers)
    w.carried.clear()
    # the publisher renames its top layer: new layer objects on A, piped in the same places
    renamed = offer.replace("a=rid:f send", "a=rid:x send").replace("q;h;f", "q;h;x")
    w.a.sfu.publisher_offer("r", "alice", w.a.as_peer("alice", "publisher", renamed))
    assert [t.rid for t in track.layers] == ["q", "h", "x"] and track.layers[0] is not old_layers[0]
    w.deliver()
    byes = [p.ssrcs[0] for p in w.pipe_rtcp(PIPE_A) if isinstance(p, rtcp.Bye)]
    assert byes == [x["ssrc"] for x in description["layers"]]
    w.carried.clear()
    rid, ssrc, size = LAYERS[0]
    w.publish(rtp(ssrc, VP8_PT, 5, 5, [(MID_ID, b"1"), (RID_ID, rid.encode())], vp8(True, size, 5)))
    [piped] = w.pipe_rtp(PIPE_A)
    assert parse_rtp(piped)[3] == description["layers"][0]["ssrc"]
    imported = next(iter(w.b.sfu.get_room("r").remote["alice"].tracks.values()))
    assert imported.layers[0].packets == 1 and imported.layers[0].width == size[0]


# -- layer choices across the pipe ------------------------------------------------------------
def is_layr(data: bytes, src: Address, dst: Address) -> bool:
    """A layer-choices message (RTCP APP) from B."""
    return src == PIPE_B and is_rtcp(data) and data[1] == rtcp.PT_APP


def no_loss(data: bytes, src: Address, dst: Address) -> bool:
    return False


def layer_messages(w: Workers) -> list[list[tuple[int, bool]]]:
    """The items of every LAYR message B sent that crossed the pipe, in order."""
    return [
        items
        for p in w.pipe_rtcp(PIPE_B)
        if isinstance(p, rtcp.UnknownRtcp)
        for items in [parse_layers_message(p.raw)]
        if items is not None
    ]


def piped_ssrcs(w: Workers) -> list[int]:
    """The pipe SSRC of each RTP packet A sent across the pipe (since ``carried`` was
    cleared)."""
    return [parse_rtp(d)[3] for d in w.pipe_rtp(PIPE_A)]


def payloads(packets: list[bytes]) -> list[bytes]:
    return [d[parse_rtp(d)[5] :] for d in packets]


class Simulcast:
    """Alice publishes Chromium's three layers on A, piped to B, where bob subscribes
    (without transport-cc: his size wishes alone choose his layer); each layer then sends a
    keyframe (both workers know the picture sizes)."""

    def __init__(self) -> None:
        self.w = w = Workers()
        w.a.sfu.add_participant("r", "alice")
        w.a.publish("alice", (FIXTURES / "chrome_simulcast_offer.sdp").read_text())
        self.alice = w.a.sfu.get_participant("r", "alice")
        w.a.connect(self.alice.publisher_leg, ALICE)
        w.b.sfu.add_participant("r", "bob")
        self.track = next(t for t in self.alice.tracks.values() if t.kind == "video")
        self.description = w.export(self.track)
        #: the pipe SSRCs of the layers q, h, f
        self.pipe_ssrcs = [x["ssrc"] for x in self.description["layers"]]
        self.bob = w.b.sfu.get_participant("r", "bob")
        w.b.answer("bob", twcc=False)
        w.b.connect(self.bob.subscriber_leg, BOB)
        w.deliver()
        self.video = sub_of(self.bob, "video")
        self.imported = self.video.track
        self.seqs = {ssrc: 1000 * i for i, (_r, ssrc, _s) in enumerate(LAYERS)}
        for layer in range(3):
            self.send(layer, keyframe=True, first=True)

    def send(self, layer: int, keyframe: bool = False, first: bool = False) -> None:
        """Alice sends one packet of a layer (to A; the pipe delivers)."""
        rid, ssrc, size = LAYERS[layer]
        self.seqs[ssrc] += 1
        seq = self.seqs[ssrc]
        elements = [(MID_ID, b"1"), (RID_ID, rid.encode())] if first else []
        self.w.publish(rtp(ssrc, VP8_PT, seq, seq * 3000, elements, vp8(keyframe, size, seq)))

    def piped(self, rounds: int = 5) -> list[int]:
        """Alice sends ``rounds`` delta packets of each layer: how many crossed the pipe, per
        layer."""
        self.w.carried.clear()
        for _ in range(rounds):
            for layer in range(3):
                self.send(layer)
        ssrcs = piped_ssrcs(self.w)
        return [ssrcs.count(ssrc) for ssrc in self.pipe_ssrcs]

    def set_max_height(self, height: int | None) -> None:
        self.w.b.sfu.set_subscription_preferences(
            "r", "bob", self.imported.track_id, {"max_height": height}
        )
        self.w.deliver()


def test_a_subscriber_on_b_limited_to_the_low_layer_stops_the_other_layers_on_a() -> None:
    s = Simulcast()
    w = s.w
    # carol, on A, wants the middle layer
    w.a.sfu.add_participant("r", "carol")
    w.a.answer("carol", twcc=False)
    carol = w.a.sfu.get_participant("r", "carol")
    w.a.connect(carol.subscriber_leg, CAROL)
    w.a.sfu.set_subscription_preferences("r", "carol", s.track.track_id, {"max_height": 360})
    s.send(1, keyframe=True)
    assert carol.subscriptions[s.track.track_id].stream.track is s.track.layers[1]
    assert s.piped() == [5, 5, 5]
    # bob, on B, wants the low one: B asks for it (bob is on f until q's keyframe)...
    w.carried.clear()
    s.set_max_height(180)
    assert layer_messages(w) == [list(zip(s.pipe_ssrcs, [True, False, True], strict=True))]
    assert s.piped() == [5, 0, 5]
    s.send(0, keyframe=True)
    assert s.video.stream.track is s.imported.layers[0]
    # ... and once he switched, only q crosses the pipe
    assert s.piped() == [5, 0, 0]
    w.advance(LAYERS_REFRESH)  # the refreshes say the same
    assert s.piped() == [5, 0, 0]
    w.a.sfu.tick(w.a.now)
    announced = w.a.events_of("publisher.layers")[-1]
    assert (announced["wanted"], announced["unused"]) == (["q", "h"], ["f"])
    # the limit lifted after f went quiet on B (q still sending): f is asked for again, A
    # asks alice for its keyframe at once, and pipes it; bob stays on q while f is not live
    for _ in range(3):
        w.advance(1.0)
        s.send(0)
    w.a.sent.clear()
    w.carried.clear()
    s.set_max_height(None)
    assert layer_messages(w) == [list(zip(s.pipe_ssrcs, [True, False, True], strict=True))]
    assert [p.media_ssrc for p in rtcp_to(w.a, ALICE) if isinstance(p, rtcp.Pli)] == [LAYERS[2][1]]
    assert s.video.stream.target is s.imported.layers[0]
    assert s.piped() == [5, 0, 5]
    s.send(2, keyframe=True)  # f sends on B again: bob's next allocation moves him there
    w.a.sent.clear()
    w.carried.clear()
    w.advance(1.0)
    assert s.video.stream.target is s.imported.layers[2]
    assert [p.media_ssrc for p in w.pipe_rtcp(PIPE_B) if isinstance(p, rtcp.Pli)] == [
        s.pipe_ssrcs[2]
    ]
    assert [p.media_ssrc for p in rtcp_to(w.a, ALICE) if isinstance(p, rtcp.Pli)] == [LAYERS[2][1]]
    # bob switches at f's keyframe, not before
    w.b.sent.clear()
    s.send(2)
    s.send(0)
    assert s.video.stream.track is s.imported.layers[0]
    s.send(2, keyframe=True)
    assert s.video.stream.track is s.imported.layers[2]
    out = payloads(to(w.b, BOB, s.video.ssrc))
    assert len(out) == 2 and b"key" not in out[0] and out[1].endswith(b"key")
    # q is no longer wanted on B: A pipes f alone and announces h (carol) and f (bob)
    assert s.piped() == [0, 0, 5]
    w.a.sfu.tick(w.a.now)
    announced = w.a.events_of("publisher.layers")[-1]
    assert (announced["wanted"], announced["unused"]) == (["h", "f"], ["q"])


def pause(w: Workers, p: Participant, paused: bool) -> None:
    for sub in list(p.subscriptions.values()):
        w.b.sfu.set_subscription_preferences(
            "r", p.participant_id, sub.track.track_id, {"paused": paused}
        )
    w.deliver()


def alice_sends(w: Workers, video_seq: int, keyframe: bool = False) -> None:
    """Alice sends a video packet (a delta one unless told), an audio packet and a sender
    report of each."""
    payload = VP8_KEYFRAME if keyframe else b"\x90\x10video-%d" % video_seq
    w.publish(rtp(AIORTC_VIDEO_SSRC, 97, video_seq & 0xFFFF, 3000 * video_seq, [], payload))
    w.publish(rtp(AIORTC_AUDIO_SSRC, 96, video_seq & 0xFFFF, 960 * video_seq, []))
    for ssrc in (AIORTC_VIDEO_SSRC, AIORTC_AUDIO_SSRC):
        w.a.receive(rtcp.sender_report(ssrc, rtcp.ntp_from_unix(1.7e9), 1000, 1, 100), ALICE)
    w.deliver()


@pytest.mark.parametrize("how", ["paused", "left"])
def test_nothing_of_a_track_crosses_the_pipe_while_b_has_no_subscriber_for_it(how: str) -> None:
    w, alice, bob, descriptions = call()
    video_packets(w, 100, 2)
    if how == "paused":
        pause(w, bob, True)
    else:
        w.b.sfu.remove_participant("r", "bob", "left")
        w.deliver()
    ssrcs = {descriptions[kind]["ssrc"] for kind in ("audio", "video")}
    assert {ssrc for items in layer_messages(w) for ssrc, wanted in items if not wanted} == ssrcs
    w.carried.clear()
    for n in range(3):
        alice_sends(w, 102 + n)
        w.advance(1.0)  # the refreshes say the same
    # neither packets nor sender reports, audio or video; the exports stay
    assert w.pipe_rtp(PIPE_A) == [] and w.pipe_rtcp(PIPE_A) == []
    assert len(w.pipe_a._exports) == 2 and all(t.pipes for t in alice.tracks.values())
    assert w.pipe_a.metrics.render().count("relay_pipe_packets_sent_total 2") == 1
    # a subscriber again: both flow, video from a keyframe A asked alice for at once (while
    # alice's numbering moved on by more than half the sequence space)
    w.a.sent.clear()
    w.carried.clear()
    if how == "paused":
        pause(w, bob, False)
        subscriber, addr = bob, BOB
    else:
        w.b.sfu.add_participant("r", "carol")
        w.b.answer("carol")
        subscriber, addr = w.b.sfu.get_participant("r", "carol"), CAROL
        w.b.connect(subscriber.subscriber_leg, addr)
        w.deliver()
    assert {ssrc for items in layer_messages(w) for ssrc, wanted in items if wanted} == ssrcs
    assert [p.media_ssrc for p in rtcp_to(w.a, ALICE) if isinstance(p, rtcp.Pli)] == [
        AIORTC_VIDEO_SSRC
    ]
    w.b.sent.clear()
    video, audio = sub_of(subscriber, "video"), sub_of(subscriber, "audio")
    alice_sends(w, 40_000)  # the rest of a picture: not a start
    alice_sends(w, 40_001, keyframe=True)
    alice_sends(w, 40_002)
    assert len(w.pipe_rtp(PIPE_A)) == 6
    assert len([p for p in w.pipe_rtcp(PIPE_A) if isinstance(p, rtcp.SenderReport)]) == 6
    out = payloads(to(w.b, addr, video.ssrc))
    assert out[0] == VP8_KEYFRAME and len(out) == 2
    assert len(to(w.b, addr, audio.ssrc)) >= 2


def test_a_lost_layer_message_heals_on_the_next_refresh() -> None:
    w, alice, bob, descriptions = call()
    video_ssrc = descriptions["video"]["ssrc"]
    video = sub_of(bob, "video")
    video_packets(w, 100, 2)
    # "not wanted" lost, and every refresh for a while: A goes on piping (it never stops on
    # a missed message, only on one that says so)
    w.lose = is_layr
    w.b.sfu.set_subscription_preferences("r", "bob", video.track.track_id, {"paused": True})
    w.deliver()
    assert w.lost
    w.carried.clear()
    for n in range(3):
        alice_sends(w, 102 + n)
        w.advance(1.0)
    assert piped_ssrcs(w).count(video_ssrc) == 3
    w.lose = no_loss
    w.advance(LAYERS_REFRESH)
    w.carried.clear()
    alice_sends(w, 105)
    assert video_ssrc not in piped_ssrcs(w)
    # "wanted again" lost (its keyframe request is not: A asks alice, but that keyframe does
    # not cross the pipe)
    w.lose = is_layr
    w.a.sent.clear()
    w.b.sfu.set_subscription_preferences("r", "bob", video.track.track_id, {"paused": False})
    w.deliver()
    assert [p.media_ssrc for p in rtcp_to(w.a, ALICE) if isinstance(p, rtcp.Pli)] == [
        AIORTC_VIDEO_SSRC
    ]
    w.carried.clear()
    alice_sends(w, 106, keyframe=True)
    assert video_ssrc not in piped_ssrcs(w)
    # the repeat soon after the change comes through: A pipes again and asks for a keyframe
    w.lose = no_loss
    w.a.sent.clear()
    w.b.sent.clear()
    w.advance(LAYERS_REPEAT)
    assert [p.media_ssrc for p in rtcp_to(w.a, ALICE) if isinstance(p, rtcp.Pli)] == [
        AIORTC_VIDEO_SSRC
    ]
    alice_sends(w, 107)
    alice_sends(w, 108, keyframe=True)
    assert piped_ssrcs(w).count(video_ssrc) == 2
    out = payloads(to(w.b, BOB, video.ssrc))
    assert out == [VP8_KEYFRAME]


def test_an_export_pipes_everything_until_the_importer_says_otherwise() -> None:
    w = Workers()
    w.a.sfu.add_participant("r", "alice")
    w.a.publish("alice", aiortc_offer())
    alice = w.a.sfu.get_participant("r", "alice")
    w.a.connect(alice.publisher_leg, ALICE)
    descriptions = {t.kind: w.export(t) for t in alice.tracks.values()}
    assert layer_messages(w) == []  # nobody on B yet: nothing said
    w.carried.clear()
    alice_sends(w, 10)
    assert len(w.pipe_rtp(PIPE_A)) == 2
    w.advance(LAYERS_REFRESH)  # B's refresh: nothing wanted
    w.carried.clear()
    alice_sends(w, 11)
    assert w.pipe_rtp(PIPE_A) == []
    # exported again (the front setting the pipe up anew): everything until B's next word
    for track in alice.tracks.values():
        assert w.pipe_a.export_track("r", track.track_id, list(PIPE_B)) == descriptions[track.kind]
    alice_sends(w, 12)
    assert len(w.pipe_rtp(PIPE_A)) == 2
    w.advance(LAYERS_REFRESH)
    w.carried.clear()
    alice_sends(w, 13)
    assert w.pipe_rtp(PIPE_A) == []


def test_a_malformed_layer_message_is_dropped_and_counted() -> None:
    w, alice, bob, descriptions = call()
    ssrc = descriptions["video"]["ssrc"]
    video = next(t for t in alice.tracks.values() if t.kind == "video")
    [tap] = video.pipes
    good = layers_message(0x1234, [(ssrc, False)])
    assert rtcp.parse_rtcp(good) == [rtcp.UnknownRtcp(rtcp.PT_APP, 0, good)]
    assert parse_layers_message(good) == [(ssrc, False)]
    header = good[:12]
    item = ssrc.to_bytes(4, "big")
    malformed = [
        bytes([0x81]) + good[1:],  # subtype 1
        bytes([0xA0, 204, 0, 4]) + good[4:] + b"\x00\x00\x00\x04",  # padded
        bytes([0x80, 204, 0, 2]) + good[4:12],  # no item
        bytes([0x80, 204, 0, 3]) + good[4:12] + item,  # half an item
        header + item + b"\x00\x00\x00\x02",  # flags other than 0 or 1
        header + bytes(4) + b"\x00\x00\x00\x00",  # SSRC 0
    ]
    drops = w.a.sfu.metrics.drops
    received = w.pipe_a.layer_messages_received
    for data in malformed:
        w.pipe_a.datagram_received(data, PIPE_B)
    assert drops["pipe_malformed"] == len(malformed)
    assert tap.wanted and w.pipe_a.layer_messages_received == received
    # another application's APP packet is not for the pipe: ignored
    w.pipe_a.datagram_received(header[:8] + b"XXXX" + item + bytes(4), PIPE_B)
    assert drops["pipe_malformed"] == len(malformed) and tap.wanted
    # an SSRC not exported to that peer is skipped, the rest applied; in a compound packet
    w.pipe_a.datagram_received(
        rtcp.receiver_report(1, []) + layers_message(1, [(ssrc ^ 1, True), (ssrc, False)]), PIPE_B
    )
    assert drops["unknown_ssrc"] == 1 and not tap.wanted
    assert w.pipe_a.layer_messages_received == received + 1
    text = w.a.sfu.metrics.render()
    assert f"relay_pipe_layer_messages_received_total {received + 1}" in text


# -- the end of an export or an import --------------------------------------------------------
def test_unexport_stops_the_flow() -> None:
    w, alice, bob, _d = call()
    video = sub_of(bob, "video")
    video_packets(w, 10, 2)
    track = next(t for t in alice.tracks.values() if t.kind == "video")
    w.pipe_a.unexport_track("r", track.track_id, list(PIPE_B))
    w.pipe_a.unexport_track("r", track.track_id, list(PIPE_B))  # again: nothing to do
    w.pipe_a.unexport_track("r", "TR_gone", list(PIPE_B))
    assert track.pipes == []
    w.carried.clear()
    w.b.sent.clear()
    w.publish(rtp(AIORTC_VIDEO_SSRC, 97, 12, 9000, [], b"\x90\x10more"))
    assert w.pipe_rtp(PIPE_A) == [] and to(w.b, BOB, video.ssrc) == []
    w.a.receive(rtcp.sender_report(AIORTC_VIDEO_SSRC, 1 << 32, 12000, 2, 100), ALICE)
    w.deliver()
    assert w.carried == []
    # the audio track is still exported until its publisher leaves; the next export
    # forgets what ended
    assert len(w.pipe_a._exports) == 1
    w.a.sfu.remove_participant("r", "alice", "left")
    with pytest.raises(NotFound):
        w.pipe_a.export_track("r", track.track_id, list(PIPE_B))
    assert w.pipe_a._exports == {} and w.pipe_a._export_ssrcs[PIPE_B] == {}


def test_the_pipes_sent_counter_keeps_what_unexported_tracks_sent() -> None:
    """A Prometheus counter never goes down: the packets an export copied stay counted
    after it ends (unexported, or its publisher gone)."""
    w, alice, _bob, _d = call()
    video_packets(w, 10, 3)

    def sent() -> float:
        name = "relay_pipe_packets_sent_total "
        lines = w.pipe_a.metrics.render().splitlines()
        return float(next(line for line in lines if line.startswith(name))[len(name) :])

    before = sent()
    assert before >= 3
    track = next(t for t in alice.tracks.values() if t.kind == "video")
    w.pipe_a.unexport_track("r", track.track_id, list(PIPE_B))
    assert sent() == before
    w.a.sfu.remove_participant("r", "alice", "left")
    w.pipe_a.drop_peer(list(PIPE_B))
    assert w.pipe_a._exports == {}
    assert sent() == before


def test_remove_import_ends_the_subscription_and_renegotiates() -> None:
    w, alice, bob, _d = call()
    track = next(t for t in alice.tracks.values() if t.kind == "video")
    revision = bob.revision
    w.pipe_b.remove_import("r", track.track_id)
    w.pipe_b.remove_import("r", track.track_id)  # again: nothing to do
    assert track.track_id not in bob.subscriptions
    assert bob.revision == revision + 1
    renegotiate = w.b.events_of("subscriber.renegotiate")[-1]
    assert renegotiate["participant_id"] == "bob" and renegotiate["revision"] == bob.revision
    offer = parse_sdp(w.b.sfu.subscriber_offer("r", "bob")[0])
    assert [m.direction for m in offer.media] == ["sendonly", "inactive"]
    assert w.b.events_of("track.unpublished") == []
    room = w.b.sfu.get_room("r")
    assert set(room.remote["alice"].tracks) == {sub_of(bob, "audio").track.track_id}
    # the remote participant goes with its last track
    w.pipe_b.remove_import("r", sub_of(bob, "audio").track.track_id)
    assert room.remote == {} and bob.subscriptions == {}
    w.carried.clear()
    w.b.sent.clear()
    video_packets(w, 10, 2)  # still exported: B drops what it no longer imports
    assert to(w.b, BOB) == [] and w.b.sfu.metrics.drops["unknown_ssrc"] == 2


def test_drop_peer_ends_exports_and_imports_of_that_worker() -> None:
    w, alice, bob, _d = call()
    w.pipe_b.drop_peer(list(PIPE_A))
    assert bob.subscriptions == {} and w.b.sfu.get_room("r").remote == {}
    w.pipe_a.drop_peer(list(PIPE_B))
    assert all(t.pipes == [] for t in alice.tracks.values())
    w.carried.clear()
    video_packets(w, 10, 1)
    assert w.carried == []
    w.pipe_b.datagram_received(rtcp.pli(1, 2), PIPE_A)  # no peer any more
    assert w.b.sfu.metrics.drops["pipe_unknown_peer"] == 1


def test_a_new_publisher_ssrc_restarts_the_importers_stream() -> None:
    w, alice, bob, descriptions = call()
    video = sub_of(bob, "video")
    w.b.sent.clear()
    video_packets(w, 100, 3)
    before = [parse_rtp(d) for d in to(w.b, BOB, video.ssrc)]
    assert len(before) == 3
    track = next(t for t in alice.tracks.values() if t.kind == "video")
    w.carried.clear()
    track.set_ssrc(0x5555, w.a.now)
    w.deliver()
    [bye] = [p for p in w.pipe_rtcp(PIPE_A) if isinstance(p, rtcp.Bye)]
    assert bye.ssrcs == [descriptions["video"]["ssrc"]]
    assert video.track.highest_seq == -1  # B's track starts over
    assert video.stream.rewriter.starting  # bob's stream waits for a keyframe of it
    # the new stream comes with numbering and timestamps of its own; bob's stream goes on
    # from where it was: no gap, no jump back
    w.b.sent.clear()
    for n in range(3):
        payload = VP8_KEYFRAME if n == 0 else b"\x90\x10new-%d" % n
        plain = rtp(0x5555, 97, 40000 + n, 7_000_000 + 3000 * n, [], payload)
        _pt, seq, ts, _ssrc, _m, offset, _eo, _el = parse_rtp(plain)
        track.receive(plain, seq, ts, offset, [], len(plain), w.a.now)
        w.deliver()
    after = [parse_rtp(d) for d in to(w.b, BOB, video.ssrc)]
    assert [p[1] for p in after] == [(before[-1][1] + 1 + i) & 0xFFFF for i in range(3)]
    assert 0 < (after[0][2] - before[-1][2]) & 0xFFFFFFFF < 90000  # within a second
    assert [(p[2] - after[0][2]) & 0xFFFFFFFF for p in after] == [0, 3000, 6000]


# -- what reaches the pipe socket -------------------------------------------------------------
def test_unknown_peers_and_malformed_datagrams_are_dropped_and_counted() -> None:
    w, _alice, bob, descriptions = call()
    drops = w.b.sfu.metrics.drops
    w.b.sent.clear()
    packet = rtp(descriptions["video"]["ssrc"], 97, 1, 1, [], VP8_KEYFRAME)
    w.pipe_b.datagram_received(packet, ("127.0.0.1", 9999))  # right SSRC, wrong address
    assert drops["pipe_unknown_peer"] == 1 and to(w.b, BOB) == []
    for junk in (b"\x80", b"\x00" * 20, b"\x90\x60" + bytes(10), b"\x81\xc8\x00\x40" + bytes(8)):
        w.pipe_b.datagram_received(junk, PIPE_A)
    assert drops["pipe_malformed"] == 4
    text = w.b.sfu.metrics.render()
    assert 'relay_packets_dropped_total{reason="pipe_malformed"} 4' in text
    assert 'relay_packets_dropped_total{reason="pipe_unknown_peer"} 1' in text
    assert sub_of(bob, "video").stream.packets_sent == 0


def test_a_bad_description_or_peer_is_a_bad_request() -> None:
    w = Workers()
    for description in ({}, {"kind": "audio"}, {"kind": "data", "codec": {}}):
        with pytest.raises(BadRequest):
            w.pipe_b.import_track("r", list(PIPE_A), description)
    with pytest.raises(BadRequest):
        w.pipe_b.import_track("r", ["127.0.0.1"], {})
    with pytest.raises(NotFound):
        w.pipe_a.export_track("r", "TR_nothing", list(PIPE_B))
    assert w.b.sfu.get_room("r").remote == {}


# -- the remote participant on B --------------------------------------------------------------
def test_the_remote_publisher_is_not_listed_counted_announced_or_timed_out_on_b() -> None:
    w, _alice, bob, descriptions = call()
    room = w.b.sfu.get_room("r")
    assert [p["participant_id"] for p in room.to_dict()["participants"]] == ["bob"]
    assert "alice" in room.remote and "alice" not in room.participants
    assert bob.to_dict()["subscriptions"] == list(bob.subscriptions)
    with pytest.raises(NotFound):
        w.b.sfu.get_participant("r", "alice")
    seen = {(e["type"], e.get("participant_id")) for e in w.b.events}
    assert ("participant.joined", "alice") not in seen
    assert not w.b.events_of("track.published")
    # a full room still has room for a local participant
    w.b.sfu.create_room("small", max_participants=1)
    other = dict(descriptions["audio"], track_id="TR_other", ssrc=12345)
    w.pipe_b.import_track("small", list(PIPE_A), other)
    w.b.sfu.add_participant("small", "carol")
    carol = w.b.sfu.get_participant("small", "carol")
    assert list(carol.subscriptions) == ["TR_other"]
    # never timed out (bob, who keeps sending reports, stays too), and its tracks are not
    # reported muted on B, where they go silent: alice's worker does that
    video_packets(w, 1, 3)
    for _ in range(5):
        w.b.now += 10.0
        w.b.receive(rtcp.receiver_report(1234, []), BOB)
        w.b.sfu.tick(w.b.now)
    assert "alice" in room.remote and "bob" in room.participants
    assert not w.b.events_of("track.muted")
    assert not [
        e
        for e in w.b.events
        if e.get("participant_id") == "alice" and e["type"] != "speaker.changed"
    ]


def test_the_remote_publisher_can_be_the_rooms_speaker_on_b() -> None:
    w, _alice, _bob, _d = call()
    for seq in range(20):
        w.publish(rtp(AIORTC_AUDIO_SSRC, 96, seq, 960 * seq, [(AIORTC_AUDIO_LEVEL_ID, b"\x85")]))
    w.b.now += 1.0
    w.b.sfu.tick(w.b.now)
    assert w.b.events_of("speaker.changed")[-1]["participant_id"] == "alice"
    assert w.b.sfu.get_room("r").speaker == "alice"


# -- the socket -------------------------------------------------------------------------------
async def test_open_pipe_carries_a_call_over_loopback_udp() -> None:
    import asyncio

    a, b = Harness(), Harness()
    pipe_a, pipe_b = await open_pipe(a.sfu), await open_pipe(b.sfu)
    try:
        assert pipe_a.endpoint is not None and pipe_b.endpoint is not None
        a.sfu.add_participant("r", "alice")
        a.publish("alice", aiortc_offer())
        alice = a.sfu.get_participant("r", "alice")
        a.connect(alice.publisher_leg, ALICE)
        b.sfu.add_participant("r", "bob")
        video = next(t for t in alice.tracks.values() if t.kind == "video")
        description = pipe_a.endpoint.export_track("r", video.track_id, ["127.0.0.1", pipe_b.port])
        pipe_b.endpoint.import_track("r", ["127.0.0.1", pipe_a.port], description)
        bob = b.sfu.get_participant("r", "bob")
        b.answer("bob")
        b.connect(bob.subscriber_leg, BOB)
        sub = sub_of(bob, "video")
        b.sent.clear()
        for seq in range(3):  # three packets, one copy each on the pipe
            payload = VP8_KEYFRAME if seq == 0 else b"\x90\x10udp"
            a.receive(rtp(AIORTC_VIDEO_SSRC, 97, seq, 9000, [], payload), ALICE)
        for _ in range(100):
            if len(to(b, BOB, sub.ssrc)) == 3:
                break
            await asyncio.sleep(0.01)
        assert len(to(b, BOB, sub.ssrc)) == 3
        assert pipe_b.endpoint.packets_received == 3
    finally:
        pipe_a.close()
        pipe_b.close()
