"""Transport-wide congestion control feedback (draft-holmer-rmcat-transport-wide-cc-extensions-01)."""

from __future__ import annotations

import random
import struct

import pytest

from relay.rtc import rtcp
from relay.rtc.rtcp import RtcpError
from relay.rtc.rtp import RtpError, build_extension_block, parse_extensions, parse_rtp
from relay.rtc.twcc import (
    TwccFeedback,
    TwccPacket,
    TwccRecorder,
    TwccSendHistory,
    decode_status_chunks,
    encode_status_chunks,
    parse_feedback,
    transport_seq,
    write_transport_seq,
)

TICK = 0.00025


def chunk(bits: str) -> bytes:
    """A 16-bit chunk from the draft's bit diagrams ("0|0 0|0 0 0 ...")."""
    digits = bits.replace("|", "").replace(" ", "")
    assert len(digits) == 16
    return int(digits, 2).to_bytes(2, "big")


def feedbacks_of(packets: list[bytes]) -> list[TwccFeedback]:
    out = []
    for data in packets:
        (packet,) = rtcp.parse_rtcp(data)
        assert isinstance(packet, rtcp.TransportFeedback)
        out.append(parse_feedback(packet.fci))
    return out


# --- the draft's chunk examples (§3.1.3, §3.1.4) -----------------------------------------------


def test_run_length_chunk_example_1() -> None:
    data = chunk("0|0 0|0 0 0 0 0 1 1 0 1 1 1 0 1")  # 221 x "packet not received"
    assert data == b"\x00\xdd"
    assert decode_status_chunks(data, 0, 221) == ([0] * 221, 2)
    assert encode_status_chunks([0] * 221 + [1])[:2] == data


def test_run_length_chunk_example_2() -> None:
    data = chunk("0|1 1|0 0 0 0 0 0 0 0 1 1 0 0 0")  # 24 x symbol 11
    assert decode_status_chunks(data, 0, 24) == ([3] * 24, 2)


def test_status_vector_chunk_example_1_one_bit() -> None:
    data = chunk("1|0|0 1 1 1 1 1 0 0 0 1 1 1 0 0")
    symbols = [0] + [1] * 5 + [0] * 3 + [1] * 3 + [0] * 2
    assert decode_status_chunks(data, 0, 14) == (symbols, 2)
    assert encode_status_chunks(symbols) == data


def test_status_vector_chunk_example_2_two_bit() -> None:
    data = chunk("1|1|0 0 1 1 0 1 0 1 0 1 0 0 0 0")
    # 1x not received, 1x "received, w/o timestamp" (11), 3x received, 2x not received
    assert decode_status_chunks(data, 0, 7) == ([0, 3, 1, 1, 1, 0, 0], 2)
    # the encoder never writes 11; the same pattern with a large delta instead:
    assert encode_status_chunks([0, 2, 1, 1, 1, 0, 0]) == chunk("1|1|0 0 1 0 0 1 0 1 0 1 0 0 0 0")


def test_chunk_choice() -> None:
    assert encode_status_chunks([1] * 500) == chunk("0|0 1|0 0 0 0 1 1 1 1 1 0 1 0 0")
    assert encode_status_chunks([2] * 3) == chunk("0|1 0|0 0 0 0 0 0 0 0 0 0 0 1 1")
    # 14 mixed one-bit symbols fit one chunk; a large delta forces 2-bit vectors of 7
    assert len(encode_status_chunks([1, 0] * 7)) == 2
    assert len(encode_status_chunks([1, 0, 1, 0, 1, 0, 2] * 2)) == 4
    # a final partial vector: the decoder stops at the status count
    data = encode_status_chunks([1, 0, 1])
    assert data == chunk("1|1|0 1 0 0 0 1 0 0 0 0 0 0 0 0")
    assert decode_status_chunks(data, 0, 3) == ([1, 0, 1], 2)
    with pytest.raises(ValueError):
        encode_status_chunks([3])


def test_chunks_random_round_trip() -> None:
    rng = random.Random(15)
    for _ in range(300):
        symbols: list[int] = []
        while len(symbols) < rng.randrange(1, 400):
            symbols += [rng.choice((0, 1, 1, 1, 2))] * rng.choice((1, 1, 2, 5, 20, 9000))
        data = encode_status_chunks(symbols)
        assert decode_status_chunks(data, 0, len(symbols)) == (symbols, len(data))
        # never worse than one 2-bit vector per 7 symbols
        assert len(data) <= 2 * -(-len(symbols) // 7)


def test_decode_chunks_overrun() -> None:
    with pytest.raises(RtcpError):
        decode_status_chunks(b"\x00\x05", 0, 6)


# --- a whole feedback packet, by hand -------------------------------------------------------


def hand_feedback() -> bytes:
    """base 65534, 4 statuses across the 16-bit wrap: received (+4 ms from the reference time),
    not received, received (-2 ms: large/negative), received (+63.75 ms: the largest small
    delta). Reference time 1000 x 64 ms = 64 s, feedback packet count 7."""
    fci = struct.pack("!HHI", 65534, 4, (1000 << 8) | 7)
    fci += chunk("1|1|0 1 0 0 1 0 0 1 0 0 0 0 0 0")
    fci += bytes([16]) + struct.pack("!h", -8) + bytes([255])
    assert len(fci) == 14  # 2 bytes of RTCP padding follow
    return (
        struct.pack("!BBHII", 0x80 | 0x20 | 15, 205, 6, 0xAABBCCDD, 0x11223344) + fci + b"\x00\x02"
    )


def test_parse_hand_built_feedback() -> None:
    (packet,) = rtcp.parse_rtcp(hand_feedback())
    assert isinstance(packet, rtcp.TransportFeedback)
    fb = parse_feedback(packet.fci)
    assert (fb.base_seq, fb.status_count, fb.reference_time, fb.fb_count) == (65534, 4, 1000, 7)
    assert [(p.seq, p.received) for p in fb.packets] == [
        (65534, True),
        (65535, False),
        (0, True),
        (1, True),
    ]
    arrivals = [p.arrival for p in fb.packets]
    assert arrivals[1] is None
    assert arrivals[0] == pytest.approx(64.004)
    assert arrivals[2] == pytest.approx(64.002)
    assert arrivals[3] == pytest.approx(64.06575)
    assert fb.received == 3


def test_recorder_builds_the_hand_built_feedback() -> None:
    recorder = TwccRecorder(0xAABBCCDD, 0x11223344)
    recorder.fb_count = 7
    recorder.on_packet(0, 64.002)  # reordered: arrives before 65534
    recorder.on_packet(65534, 64.004)
    recorder.on_packet(1, 64.06575)
    assert recorder.build_feedback(64.1) == [hand_feedback()]
    assert recorder.fb_count == 8
    assert recorder.build_feedback(64.2) == []


def test_symbol_11_and_trailing_zero_padding() -> None:
    fci = struct.pack("!HHI", 10, 3, 5 << 8) + chunk("1|1|0 1 1 1 0 1 0 0 0 0 0 0 0 0")
    fci += bytes([4, 8]) + b"\x00\x00"  # two deltas, then zero padding inside the FCI
    fb = parse_feedback(fci)
    assert fb.packets == [
        TwccPacket(10, True, pytest.approx(5 * 0.064 + 4 * TICK)),
        TwccPacket(11, True, None),
        TwccPacket(12, True, pytest.approx(5 * 0.064 + 12 * TICK)),
    ]


def test_parse_malformed() -> None:
    with pytest.raises(RtcpError):
        parse_feedback(b"\x00\x01\x00\x01\x00\x00")
    with pytest.raises(RtcpError):  # chunk missing
        parse_feedback(struct.pack("!HHI", 1, 1, 0))
    with pytest.raises(RtcpError):  # delta missing
        parse_feedback(struct.pack("!HHI", 1, 1, 0) + chunk("0|0 1|0 0 0 0 0 0 0 0 0 0 0 0 1"))
    with pytest.raises(RtcpError):  # large delta cut short
        parse_feedback(
            struct.pack("!HHI", 1, 1, 0) + chunk("0|1 0|0 0 0 0 0 0 0 0 0 0 0 0 1") + b"\x01"
        )


# --- round trips through the recorder ------------------------------------------------------


def record_and_decode(
    events: list[tuple[int, float]], **kwargs: int
) -> tuple[list[bytes], list[TwccFeedback]]:
    recorder = TwccRecorder(1, 2, **kwargs)
    for seq, arrival in events:
        recorder.on_packet(seq & 0xFFFF, arrival)
    packets = recorder.build_feedback(0.0)
    return packets, feedbacks_of(packets)


def check_round_trip(events: list[tuple[int, float]], feedbacks: list[TwccFeedback]) -> None:
    """Every recorded packet is reported received exactly once with its arrival to 250 µs;
    everything else in the covered ranges is reported not received; the feedbacks of one
    batch are contiguous (a loss between two of them is reported too)."""
    expected = {seq & 0xFFFF: round(arrival / TICK) * TICK for seq, arrival in events}
    reported: dict[int, float] = {}
    assert feedbacks[0].packets[0].received
    for fb, after in zip(feedbacks, feedbacks[1:], strict=False):
        assert after.base_seq == (fb.base_seq + fb.status_count) & 0xFFFF
    for fb in feedbacks:
        assert fb.status_count == len(fb.packets)
        assert fb.packets[-1].received
        for p in fb.packets:
            if p.received:
                assert p.seq not in reported
                assert p.arrival is not None
                reported[p.seq] = p.arrival
            else:
                assert p.seq not in expected
    assert reported.keys() == expected.keys()
    for seq, arrival in expected.items():
        assert reported[seq] == pytest.approx(arrival, abs=1e-7)


@pytest.mark.parametrize("seed", range(12))
def test_random_round_trip(seed: int) -> None:
    rng = random.Random(seed)
    seq = rng.randrange(0x10000) if seed % 2 else 65500  # even seeds cross the 16-bit wrap
    now = rng.uniform(0, 1e5)
    events: list[tuple[int, float]] = []
    for _ in range(rng.randrange(1, 600)):
        seq += 1
        roll = rng.random()
        if roll < 0.1:
            seq += rng.randrange(1, 40)  # a loss burst
        if roll > 0.97:
            now += rng.uniform(0.064, 8.0)  # a large delta
        elif roll > 0.95:
            now -= rng.uniform(0.0, 0.1)  # arrives before the previous one: negative delta
        else:
            now += rng.expovariate(1 / 0.004)
        events.append((seq, now))
    rng.shuffle(events[: len(events) // 3])  # and some reordering
    packets, feedbacks = record_and_decode(events)
    check_round_trip(events, feedbacks)
    assert all(len(p) <= 1200 and len(p) % 4 == 0 for p in packets)
    assert [fb.fb_count for fb in feedbacks] == list(range(len(feedbacks)))


def test_deltas_beyond_16_bits_start_a_new_feedback() -> None:
    events = [(1, 10.0), (2, 10.001), (3, 20.0), (4, 19.0), (5, 5.0)]
    packets, feedbacks = record_and_decode(events)
    check_round_trip(events, feedbacks)
    assert [fb.base_seq for fb in feedbacks] == [1, 3, 5]


def test_large_batches_are_split_by_size() -> None:
    rng = random.Random(3)
    events = []
    now = 100.0
    for seq in range(3000):
        now += rng.choice((0.07, 0.0001))  # many large deltas: 2 bytes each
        if rng.random() < 0.8:
            events.append((seq, now))
    packets, feedbacks = record_and_decode(events, max_pending=4096, max_packet_size=600)
    assert len(packets) > 5
    assert all(len(p) <= 600 for p in packets)
    check_round_trip(events, feedbacks)


def test_reordered_packet_after_feedback_moves_the_base_back() -> None:
    recorder = TwccRecorder(1)
    for seq in (100, 102, 103):
        recorder.on_packet(seq, 1.0 + seq * 0.001)
    (first,) = feedbacks_of(recorder.build_feedback(1.2))
    assert (first.base_seq, first.status_count) == (100, 4)
    recorder.on_packet(101, 1.3)  # late
    recorder.on_packet(104, 1.31)
    (second,) = feedbacks_of(recorder.build_feedback(1.4))
    assert second.base_seq == 101
    # 102 and 103 were reported already: "not received" this time (draft §3.1.1 note)
    assert [(p.seq, p.received) for p in second.packets] == [
        (101, True),
        (102, False),
        (103, False),
        (104, True),
    ]
    assert second.fb_count == first.fb_count + 1


def test_lossless_batch_is_one_run_length_chunk() -> None:
    recorder = TwccRecorder(0xA, 0xB)
    for k, seq in enumerate((65535, 0, 1)):
        recorder.on_packet(seq, 10 * 0.064 + (k + 1) * 0.001)
    (data,) = recorder.build_feedback(1.0)
    fci = struct.pack("!HHI", 65535, 3, 10 << 8) + chunk("0|0 1|0 0 0 0 0 0 0 0 0 0 0 1 1")
    fci += bytes([4, 4, 4])
    assert data == rtcp.transport_feedback(0xA, 0xB, fci)


def test_lossless_fast_path_matches_the_general_encoder() -> None:
    rng = random.Random(8)
    events = []
    now = 50.0
    for seq in range(1000):
        now += rng.uniform(0.0, 0.06)
        events.append((seq, now))
    fast = TwccRecorder(1)
    for seq, arrival in events:
        fast.on_packet(seq, arrival)
    (data,) = fast.build_feedback(0.0)
    general = TwccRecorder(1)
    seqs = [seq | 0x10000 for seq, _ in events]
    ticks = [round(arrival / TICK) for _, arrival in events]
    deltas = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    assert general._encode(seqs[0], seqs, ticks, deltas, [1] * 999, [0] * 999) == [data]
    check_round_trip(events, feedbacks_of([data]))


def test_loss_right_after_a_feedback_is_reported() -> None:
    recorder = TwccRecorder(1)
    recorder.on_packet(10, 1.0)
    recorder.on_packet(11, 1.001)
    (first,) = feedbacks_of(recorder.build_feedback(1.1))
    recorder.on_packet(14, 1.2)  # 12 and 13 lost
    (second,) = feedbacks_of(recorder.build_feedback(1.3))
    assert (first.base_seq, first.status_count) == (10, 2)
    assert [(p.seq, p.received) for p in second.packets] == [
        (12, False),
        (13, False),
        (14, True),
    ]
    assert second.packets[-1].arrival == pytest.approx(1.2)


def test_recorder_bounds() -> None:
    recorder = TwccRecorder(1, batch=4, max_pending=6, reorder_window=16)
    assert [recorder.on_packet(s, s * 0.01) for s in range(4)] == [False, False, False, True]
    assert recorder.on_packet(3, 0.5) is False  # duplicate
    assert recorder.duplicates == 1
    for s in range(4, 40):
        recorder.on_packet(s, s * 0.01)
    assert recorder.pending == 6 and recorder.overflow == 34
    recorder.on_packet(39 - 40, 1.0)  # more than the reorder window behind
    assert recorder.too_old == 1
    (fb,) = feedbacks_of(recorder.build_feedback(1.0))
    assert (fb.base_seq, fb.status_count) == (0, 6)


# --- the sender side --------------------------------------------------------------------------


def run_path(
    history: TwccSendHistory,
    *,
    duration: float,
    send_rate: float,
    capacity: float,
    size: int = 1200,
    loss: float = 0.0,
    clock_offset: float = 5000.0,
    seed: int = 1,
    start: float = 0.0,
) -> list:
    """Packets of ``size`` bytes sent at ``send_rate`` bits/s through a bottleneck of
    ``capacity`` bits/s (FIFO queue, 20 ms propagation, random loss); feedback every 100 ms
    from a receiver whose clock is ``clock_offset`` seconds ahead of ours. Returns the
    DeliveryStats of every feedback."""
    rng = random.Random(seed)
    recorder = TwccRecorder(9)
    interval = size * 8 / send_rate
    link_free = start
    events = []
    t = start
    while t < start + duration:
        seq = history.next_seq(size, t)
        if rng.random() >= loss or t + interval >= start + duration:  # the last one arrives
            link_free = max(t, link_free) + size * 8 / capacity
            events.append((link_free + 0.02, seq))
        t += interval
    stats = []
    tick = start + 0.1
    k = 0
    while k < len(events) or tick < start + duration:
        while k < len(events) and events[k][0] <= tick:
            arrival, seq = events[k]
            recorder.on_packet(seq, arrival + clock_offset)
            k += 1
        for fb in feedbacks_of(recorder.build_feedback(tick + clock_offset)):
            stats.append(history.on_feedback(fb, tick + 0.02))
        tick += 0.1
        if tick > start + duration + 30:
            break
    return stats


def test_send_history_uncongested() -> None:
    history = TwccSendHistory(initial_seq=65000)  # crosses the 16-bit wrap
    stats = run_path(history, duration=5.0, send_rate=1_000_000, capacity=10_000_000)
    assert history.packets_acked == history.packets_sent > 500
    assert history.packets_lost == 0 and history.loss_fraction == 0
    assert history.delivery_rate == pytest.approx(1_000_000, rel=0.05)
    assert abs(history.delay_variation) < 0.001
    assert history.queuing_delay is not None and history.queuing_delay < 0.002
    assert all(s.unknown == 0 for s in stats)
    last = stats[-1]
    assert last.feedback_delay is not None and 0.02 < last.feedback_delay < 0.2


def test_send_history_congested_and_lossy() -> None:
    history = TwccSendHistory()
    stats = run_path(
        history, duration=4.0, send_rate=2_000_000, capacity=1_000_000, loss=0.05, seed=5
    )
    # the delivery rate is the bottleneck's, the queue grows by ~0.5 s per second
    assert history.delivery_rate == pytest.approx(1_000_000, rel=0.05)
    assert history.delay_variation > 0.0003
    assert history.queuing_delay is not None and history.queuing_delay > 1.0
    assert 0.02 < history.packets_lost / history.packets_sent < 0.08
    assert history.packets_acked + history.packets_lost == history.packets_sent
    assert sum(s.acked for s in stats) == history.packets_acked
    assert 0.0 < history.loss_fraction < 0.2


def test_send_history_reference_time_wrap() -> None:
    history = TwccSendHistory()
    wrap = (1 << 24) * 0.064  # the receiver's clock crosses the 24-bit reference time wrap
    stats = run_path(
        history, duration=3.0, send_rate=500_000, capacity=5_000_000, clock_offset=wrap - 1.5
    )
    assert history.delivery_rate == pytest.approx(500_000, rel=0.05)
    assert max(s.queuing_delay for s in stats if s.queuing_delay is not None) < 0.002


def test_send_history_bookkeeping() -> None:
    history = TwccSendHistory(capacity=8)
    seqs = [history.next_seq(100, 0.001 * i) for i in range(20)]
    assert seqs == list(range(1, 21))
    assert history.bytes_sent == 2000
    fb = TwccFeedback(
        base_seq=12,
        status_count=5,
        reference_time=0,
        fb_count=3,
        # 12: evicted from the 8-packet ring; 13 received; 14 not received; 15 received
        # without a delta (symbol 11); 16 received
        symbols=[1, 1, 0, 3, 1],
        arrivals=[0.0, 0.01, None, None, 0.012],
    )
    assert fb.packets == [
        TwccPacket(12, True, 0.0),
        TwccPacket(13, True, 0.01),
        TwccPacket(14, False, None),
        TwccPacket(15, True, None),
        TwccPacket(16, True, 0.012),
    ]
    assert fb.received == 4
    stats = history.on_feedback(fb, 1.0)
    assert (stats.unknown, stats.acked, stats.lost, stats.bytes_acked) == (1, 3, 1, 300)
    assert stats.loss_fraction == pytest.approx(0.25)
    # 14 arrives after all, and feedback 4 was lost on the way
    again = TwccFeedback(14, 1, 0, 5, [1], [0.02])
    stats = history.on_feedback(again, 1.1)
    assert (stats.acked, stats.lost) == (1, 0)
    assert history.packets_lost == 0 and history.packets_acked == 4
    assert history.feedbacks == 2 and history.feedbacks_lost == 1
    # a repeated report changes nothing
    stats = history.on_feedback(again, 1.2)
    assert (stats.acked, stats.lost) == (0, 0)


# --- the header extension ---------------------------------------------------------------


@pytest.mark.parametrize(
    "elements",
    [
        [(1, b"a"), (3, b"\x12\x34"), (5, b"xyz")],  # one-byte form
        [(1, b"a"), (3, b"\x12\x34"), (20, b"")],  # two-byte form
    ],
)
def test_write_transport_seq(elements: list[tuple[int, bytes]]) -> None:
    block = build_extension_block(elements)
    packet = struct.pack("!BBHII", 0x90, 96, 1, 2, 3) + block + b"payload"
    out = write_transport_seq(packet, 3, 0xBEEF)
    assert len(out) == len(packet)
    _, _, _, _, _, offset, ext_offset, ext_length = parse_rtp(out)
    profile = 0xBEDE if block[:2] == b"\xbe\xde" else 0x1000
    values = dict(parse_extensions(out, ext_offset, ext_length, profile))
    assert transport_seq(values[3]) == 0xBEEF
    assert values[1] == b"a" and out[offset:] == b"payload"
    with pytest.raises(RtpError):
        write_transport_seq(packet, 7, 1)
    with pytest.raises(RtpError):
        write_transport_seq(packet, 1, 1)  # not a 2-byte element
    with pytest.raises(RtpError):
        transport_seq(b"\x01")
