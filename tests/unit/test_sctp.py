"""The sans-I/O SCTP association (relay/rtc/sctp.py), with bytes: the wire format, the
handshake and its cookie, DATA with fragmentation, ordering, loss and retransmission, partial
reliability (FORWARD-TSN), stream reset, shutdown and abort."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.rtc import sctp
from relay.rtc.sctp import (
    Aborted,
    AssociationState,
    Connected,
    MessageReceived,
    SctpAssociation,
    StreamsReset,
    chunk,
    crc32c,
    parse_packet,
    serialize_packet,
)


def test_crc32c_known_vector() -> None:
    # RFC 3720 B.4 / the usual check value of CRC-32C
    assert crc32c(b"123456789") == 0xE3069283
    assert sctp.crc32c_python(b"123456789") == 0xE3069283
    data = random.Random(1).randbytes(1200)
    assert sctp.crc32c_python(data) == crc32c(data)


def test_packet_round_trip_and_checksum_little_endian() -> None:
    packet = serialize_packet(5000, 5000, 0x01020304, [chunk(sctp.COOKIE_ACK, 0, b"")])
    assert packet[:8] == bytes.fromhex("1388138801020304")
    body = packet[:8] + b"\0\0\0\0" + packet[12:]
    assert packet[8:12] == crc32c(body).to_bytes(4, "little")
    assert parse_packet(packet) == (5000, 5000, 0x01020304, [(sctp.COOKIE_ACK, 0, b"")])
    broken = bytearray(packet)
    broken[-1] ^= 1
    with pytest.raises(sctp.SctpError):
        parse_packet(bytes(broken))


def test_chunks_are_padded_to_four_bytes() -> None:
    c = chunk(sctp.HEARTBEAT, 0, b"\x00\x01\x00\x05x")
    assert len(c) == 12 and c[2:4] == b"\x00\x09"


class Pair:
    """Two associations wired to each other through lists (with optional loss)."""

    def __init__(self, seed: int = 1) -> None:
        rng = random.Random(seed)
        self.a = SctpAssociation(random=rng.getrandbits)
        self.b = SctpAssociation(random=rng.getrandbits)
        self.now = 0.0
        self.drop_a_to_b: set[int] = set()  # indices of packets a->b to drop
        self.sent_a_to_b = 0
        self.events: dict[str, list[object]] = {"a": [], "b": []}

    def pump(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            moved = False
            for packet in self.a.take_packets():
                index = self.sent_a_to_b
                self.sent_a_to_b += 1
                moved = True
                if index not in self.drop_a_to_b:
                    self.b.receive(packet, self.now)
            for packet in self.b.take_packets():
                moved = True
                self.a.receive(packet, self.now)
            self.events["a"] += self.a.take_events()
            self.events["b"] += self.b.take_events()
            if not moved:
                return

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for assoc in (self.a, self.b):
            deadline = assoc.next_timeout()
            if deadline is not None and deadline <= self.now:
                assoc.handle_timeout(self.now)
        self.pump()

    def connect(self) -> None:
        self.a.connect(self.now)
        self.pump()
        assert self.a.established and self.b.established

    def messages(self, side: str) -> list[MessageReceived]:
        return [e for e in self.events[side] if isinstance(e, MessageReceived)]


def test_handshake_four_way_with_cookie() -> None:
    pair = Pair()
    pair.a.connect(0.0)
    (init,) = pair.a.take_packets()
    _, _, tag, chunks = parse_packet(init)
    assert tag == 0 and chunks[0][0] == sctp.INIT
    parsed = sctp.InitChunk.parse(chunks[0][2])
    assert parsed.forward_tsn and parsed.reconfig
    pair.b.receive(init, 0.0)
    assert pair.b.state is AssociationState.CLOSED  # nothing kept before the cookie comes back
    (init_ack,) = pair.b.take_packets()
    _, _, tag, chunks = parse_packet(init_ack)
    assert tag == pair.a.local_tag and chunks[0][0] == sctp.INIT_ACK
    pair.a.receive(init_ack, 0.0)
    (echo,) = pair.a.take_packets()
    assert parse_packet(echo)[3][0][0] == sctp.COOKIE_ECHO
    pair.b.receive(echo, 0.0)
    assert pair.b.established
    pair.a.receive(pair.b.take_packets()[0], 0.0)
    assert pair.a.established
    assert pair.a.take_events() == [Connected()] and pair.b.take_events() == [Connected()]


def test_forged_or_stale_cookie_is_ignored() -> None:
    pair = Pair()
    pair.a.connect(0.0)
    pair.b.receive(pair.a.take_packets()[0], 0.0)
    pair.a.receive(pair.b.take_packets()[0], 0.0)
    (echo,) = pair.a.take_packets()
    src, dst, tag, chunks = parse_packet(echo)
    cookie = bytearray(chunks[0][2])
    cookie[0] ^= 1
    forged = serialize_packet(src, dst, tag, [chunk(sctp.COOKIE_ECHO, 0, bytes(cookie))])
    pair.b.receive(forged, 0.0)
    assert not pair.b.established and pair.b.take_packets() == []
    pair.b.receive(echo, sctp.COOKIE_LIFETIME + 1)  # too old
    assert not pair.b.established
    pair.b.receive(echo, 1.0)
    assert pair.b.established


def test_simultaneous_init_both_sides() -> None:
    pair = Pair()
    pair.a.connect(0.0)
    pair.b.connect(0.0)
    pair.pump()
    assert pair.a.established and pair.b.established
    pair.a.send(1, 51, b"hi", pair.now)
    pair.pump()
    assert [m.data for m in pair.messages("b")] == [b"hi"]


def test_init_is_retransmitted_then_gives_up() -> None:
    assoc = SctpAssociation()
    assoc.connect(0.0)
    assert len(assoc.take_packets()) == 1
    now = 0.0
    for _ in range(sctp.INIT_RETRANSMISSIONS):
        deadline = assoc.next_timeout()
        assert deadline is not None
        now = deadline
        assoc.handle_timeout(now)
        assert len(assoc.take_packets()) == 1
    assoc.handle_timeout(assoc.next_timeout() or now)
    assert isinstance(assoc.take_events()[-1], Aborted)


def test_fragmented_messages_and_ordering() -> None:
    pair = Pair()
    pair.connect()
    big = bytes(range(256)) * 40  # 10240 bytes: 10 fragments
    assert pair.a.send(3, 53, big, pair.now)
    assert pair.a.send(3, 51, b"after", pair.now)
    pair.pump()
    got = pair.messages("b")
    assert [(m.stream_id, m.ppid, m.data, m.ordered) for m in got] == [
        (3, 53, big, True),
        (3, 51, b"after", True),
    ]
    assert pair.a.buffered_amount == 0


def test_a_sack_acknowledges_every_data_packet() -> None:
    pair = Pair()
    pair.connect()
    pair.a.send(1, 51, b"x", 0.0)
    (packet,) = pair.a.take_packets()
    pair.b.receive(packet, 0.0)
    (sack,) = pair.b.take_packets()
    _, _, tag, chunks = parse_packet(sack)
    assert tag == pair.a.local_tag
    ctype, _, value = chunks[0]
    assert ctype == sctp.SACK
    cum, rwnd, gaps, dups = struct.unpack_from("!IIHH", value)
    tsn = struct.unpack_from("!I", parse_packet(packet)[3][0][2])[0]
    assert cum == tsn and gaps == 0 and dups == 0 and rwnd == pair.b.receive_window


def test_loss_is_repaired_and_order_kept() -> None:
    pair = Pair()
    pair.connect()
    pair.drop_a_to_b = {pair.sent_a_to_b}  # the first data packet is lost
    for i in range(5):
        pair.a.send(0, 51, f"m{i}".encode(), pair.now)
    pair.pump()
    # the gap blocks of three SACKs are three miss indications: fast retransmission, no timer
    assert [m.data for m in pair.messages("b")] == [f"m{i}".encode() for i in range(5)]
    assert pair.now == 0.0


def test_loss_repaired_by_the_retransmission_timer() -> None:
    pair = Pair()
    pair.connect()
    pair.drop_a_to_b = {pair.sent_a_to_b}
    pair.a.send(0, 51, b"only", pair.now)
    pair.pump()
    assert pair.messages("b") == []
    pair.advance(1.0)  # RTO.Initial
    assert [m.data for m in pair.messages("b")] == [b"only"]


def test_unordered_messages_are_not_held_back() -> None:
    pair = Pair()
    pair.connect()
    pair.drop_a_to_b = {pair.sent_a_to_b}
    for i in range(3):
        pair.a.send(2, 51, f"u{i}".encode(), pair.now, ordered=False)
    pair.pump()
    assert [m.data for m in pair.messages("b")] == [b"u1", b"u2"]
    assert all(not m.ordered for m in pair.messages("b"))


def test_partial_reliability_abandons_and_forward_tsn_skips() -> None:
    pair = Pair()
    pair.connect()
    assert pair.a.forward_tsn and pair.b.forward_tsn
    start = pair.sent_a_to_b
    pair.drop_a_to_b = {start}  # the message, sent once and never again
    pair.a.send(4, 51, b"lost", pair.now, max_retransmits=0)
    pair.a.send(4, 51, b"kept", pair.now)
    pair.pump()
    for _ in range(3):
        pair.advance(2.0)
    assert [m.data for m in pair.messages("b")] == [b"kept"]
    assert pair.a.buffered_amount == 0


def test_lifetime_expiry() -> None:
    pair = Pair()
    pair.connect()
    start = pair.sent_a_to_b
    pair.drop_a_to_b = set(range(start, start + 2))  # the message, then the FORWARD-TSN
    pair.a.send(4, 51, b"stale", pair.now, lifetime=0.5)
    pair.pump()
    pair.advance(1.5)  # T3: expired, abandoned, FORWARD-TSN (lost)
    pair.advance(3.0)  # T3 again: FORWARD-TSN sent again
    pair.a.send(4, 51, b"fresh", pair.now)
    pair.pump()
    assert [m.data for m in pair.messages("b")] == [b"fresh"]
    assert pair.a.buffered_amount == 0 and pair.a.next_timeout() is None


def test_stream_reset_both_ways() -> None:
    pair = Pair()
    pair.connect()
    pair.a.send(6, 51, b"one", pair.now)
    pair.pump()
    pair.a.reset_streams([6], pair.now)
    pair.pump()
    assert StreamsReset((6,)) in pair.events["b"]
    # after the reset the stream numbers its messages from 0 again
    pair.a.send(6, 51, b"two", pair.now)
    pair.pump()
    assert [m.data for m in pair.messages("b")] == [b"one", b"two"]


def test_receive_window_bounds_memory() -> None:
    rng = random.Random(3)
    a = SctpAssociation(random=rng.getrandbits)
    b = SctpAssociation(random=rng.getrandbits, receive_window=4096)
    a.connect(0.0)
    for _ in range(4):
        for p in a.take_packets():
            b.receive(p, 0.0)
        for p in b.take_packets():
            a.receive(p, 0.0)
    assert a.established and b.established
    a.peer_rwnd = 1 << 20  # a sender that ignores the window
    a.cwnd = 1 << 20
    pair_packets = []
    a.send(0, 53, b"\0" * 3000, 0.0)  # first message: delivered
    a._out_ssn[0] = 5  # leave a hole in the stream sequence: the next ones are held back
    for _ in range(10):
        a.send(0, 53, b"\1" * 1000, 0.0)
    pair_packets = a.take_packets()
    for p in pair_packets:
        b.receive(p, 0.0)
    assert b._buffered <= b.receive_window + sctp.MAX_FRAGMENT


def test_heartbeat_answered_with_the_same_info() -> None:
    pair = Pair()
    pair.connect()
    info = sctp.param(sctp.PARAM_HEARTBEAT_INFO, b"opaque")
    packet = serialize_packet(5000, 5000, pair.b.local_tag, [chunk(sctp.HEARTBEAT, 0, info)])
    pair.b.receive(packet, 0.0)
    (reply,) = pair.b.take_packets()
    assert parse_packet(reply)[3] == [(sctp.HEARTBEAT_ACK, 0, info)]


def test_wrong_verification_tag_is_ignored() -> None:
    pair = Pair()
    pair.connect()
    packet = serialize_packet(5000, 5000, pair.b.local_tag ^ 1, [chunk(sctp.ABORT, 0, b"")])
    pair.b.receive(packet, 0.0)
    assert pair.b.established


def test_abort_and_shutdown() -> None:
    pair = Pair()
    pair.connect()
    pair.a.abort("bye")
    pair.pump()
    assert pair.b.state is AssociationState.CLOSED
    assert Aborted("aborted by the peer") in pair.events["b"]
    pair = Pair(2)
    pair.connect()
    pair.a.shutdown(pair.now)
    pair.pump()
    assert pair.a.state is AssociationState.CLOSED and pair.b.state is AssociationState.CLOSED


def test_dead_peer_gives_up_after_retransmissions() -> None:
    pair = Pair()
    pair.connect()
    pair.drop_a_to_b = set(range(pair.sent_a_to_b, pair.sent_a_to_b + 100))
    pair.a.send(0, 51, b"x", pair.now)
    pair.pump()
    for _ in range(40):
        pair.advance(10.0)
    assert any(isinstance(e, Aborted) for e in pair.events["a"])


def test_garbage_never_raises() -> None:
    assoc = SctpAssociation()
    rng = random.Random(5)
    for n in range(300):
        assoc.receive(rng.randbytes(n % 80), 0.0)
    # valid checksum, garbage chunks
    for n in range(300):
        body = rng.randbytes(4 + n % 60)
        assoc.receive(serialize_packet(5000, 5000, assoc.local_tag, [body]), 0.0)
    assoc.take_packets()


CHUNK_TYPES = [
    sctp.DATA,
    sctp.INIT,
    sctp.INIT_ACK,
    sctp.SACK,
    sctp.HEARTBEAT,
    sctp.ABORT,
    sctp.SHUTDOWN,
    sctp.SHUTDOWN_ACK,
    sctp.COOKIE_ECHO,
    sctp.COOKIE_ACK,
    sctp.SHUTDOWN_COMPLETE,
    sctp.RECONFIG,
    sctp.FORWARD_TSN,
    0x3F,
    0x7F,
    0xBF,
    0xFF,
]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(st.sampled_from(CHUNK_TYPES), st.integers(0, 255), st.binary(max_size=64)),
        min_size=1,
        max_size=4,
    )
)
def test_established_association_survives_any_chunks(chunks: list[tuple[int, int, bytes]]) -> None:
    """Checksummed packets with the right tag and arbitrary chunks: never an exception, and
    the association still carries a message afterwards unless the chunks closed it."""
    pair = Pair(7)
    pair.connect()
    packet = serialize_packet(5000, 5000, pair.b.local_tag, [chunk(t, f, v) for t, f, v in chunks])
    pair.b.receive(packet, pair.now)
    pair.b.take_packets()
    pair.b.take_events()
    if pair.b.established:
        pair.a.send(1, 51, b"still", pair.now)
        pair.pump()
        assert pair.b.established


def test_data_far_ahead_is_dropped_and_sacks_stay_valid() -> None:
    pair = Pair(7)
    pair.connect()
    for ahead in (2, 100_000, 0x7FFFFFFF):
        tsn = (pair.b._cum_tsn + ahead) & 0xFFFFFFFF
        value = struct.pack("!IHHI", tsn, 1, 0, 51) + b"x"
        packet = serialize_packet(5000, 5000, pair.b.local_tag, [chunk(sctp.DATA, 3, value)])
        pair.b.receive(packet, 0.0)
        (sack,) = pair.b.take_packets()
        assert parse_packet(sack)[3][0][0] == sctp.SACK
    assert len(pair.b._above) == 1  # only the one 2 ahead is kept


def test_sack_for_what_was_never_sent_is_ignored() -> None:
    pair = Pair(7)
    pair.connect()
    pair.a.send(1, 51, b"x", 0.0)
    pair.a.take_packets()
    bogus = struct.pack("!IIHH", (pair.a._next_tsn + 1000) & 0xFFFFFFFF, 65536, 1, 0)
    bogus += struct.pack("!HH", 1, 65535)
    pair.a.receive(
        serialize_packet(5000, 5000, pair.a.local_tag, [chunk(sctp.SACK, 0, bogus)]), 0.0
    )
    assert pair.a.buffered_amount == 1  # still in flight
