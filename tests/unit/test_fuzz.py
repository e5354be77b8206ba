"""Property-based fuzzing of every parser on the relay's input paths, and of the media port.

Each parser either returns or raises only its documented error type; builders and parsers
round-trip; parsed element counts stay bounded by the input length. Inputs are structured
(valid-looking headers with mutated fields, packets written by the modules' own builders, bit
flips of the captured offers in ``tests/fixtures/sdp``), not only random bytes.

Runs are deterministic (``derandomize=True``, no example database) and bounded so that the
module stays well under a minute on two cores. ``RELAY_FUZZ_SCALE=20`` multiplies every
example count for a longer run by hand.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import pytest
from aioice import stun
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from relay.rtc import codecs, rtcp
from relay.rtc.dtls import Certificate, DtlsEndpoint, DtlsState
from relay.rtc.ice import StunError, binding_error, binding_success, parse_binding_request
from relay.rtc.nack import rtx_unwrap, rtx_wrap
from relay.rtc.rtcp import RtcpError
from relay.rtc.rtp import (
    ONE_BYTE_PROFILE,
    TWO_BYTE_PROFILE,
    ExtensionRewriter,
    RtpError,
    build_extension_block,
    extension_profile,
    is_rtcp,
    padding_length,
    parse_extensions,
    parse_rtp,
    rewrite_packet,
)
from relay.rtc.sdp import LocalTransport, SdpError, build_answer, parse_sdp, remote_transport
from relay.rtc.srtp import SrtpError
from relay.rtc.twcc import (
    TICK,
    decode_status_chunks,
    encode_status_chunks,
    parse_feedback,
    transport_seq,
    write_transport_seq,
)
from relay.sfu.errors import SfuError
from tests.unit.harness import Harness
from tests.unit.test_sfu import (
    AIORTC_AUDIO_SSRC,
    AIORTC_VIDEO_SSRC,
    VP8_KEYFRAME,
    _video_call,
)
from tests.unit.test_twcc import check_round_trip, record_and_decode

FIXTURES = Path(__file__).parent.parent / "fixtures" / "sdp"
OFFERS = {p.stem: p.read_text() for p in sorted(FIXTURES.glob("*.sdp"))}

_SCALE = max(1, int(os.environ.get("RELAY_FUZZ_SCALE", "1")))


def fuzz(max_examples: int) -> settings:
    """Settings of one fuzz property: fixed seed, no database, no per-example deadline."""
    return settings(
        max_examples=max_examples * _SCALE,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


U8 = st.integers(0, 0xFF)
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)


# --- mutations ---------------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes], max_ops: int = 4) -> bytes:
    """A datagram from ``base``, then up to ``max_ops`` bit flips, byte writes, truncations,
    insertions and deletions (zero operations keeps the well-formed input)."""
    buf = bytearray(draw(base))
    for _ in range(draw(st.integers(0, max_ops))):
        op = draw(st.sampled_from(("flip", "set", "truncate", "insert", "delete", "append")))
        if op == "append" or not buf:
            buf += draw(st.binary(min_size=1, max_size=8))
            continue
        i = draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            buf[i] = draw(U8)
        elif op == "truncate":
            del buf[i:]
        elif op == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del buf[i : i + draw(st.integers(1, 8))]
    return bytes(buf)


# --- RTP ---------------------------------------------------------------------------------------

ONE_BYTE_ELEMENTS = st.lists(
    st.tuples(st.integers(1, 14), st.binary(min_size=1, max_size=16)), max_size=6
)
TWO_BYTE_ELEMENTS = st.lists(
    st.tuples(st.integers(1, 255), st.binary(min_size=0, max_size=40)), max_size=6
)
ELEMENTS = st.one_of(ONE_BYTE_ELEMENTS, TWO_BYTE_ELEMENTS)


@st.composite
def rtp_fields(draw: st.DrawFn) -> dict:
    """Valid RTP header fields, a CSRC list, extension elements, a payload and padding."""
    return {
        "pt": draw(st.integers(0, 127)),
        "seq": draw(U16),
        "ts": draw(U32),
        "ssrc": draw(U32),
        "marker": draw(st.booleans()),
        "csrcs": draw(st.lists(U32, max_size=15)),
        "elements": draw(ELEMENTS),
        "payload": draw(st.binary(max_size=64)),
        "padding": draw(st.sampled_from((0, 0, 0, 1, 4, 7))),
    }


def build_rtp(f: dict) -> bytes:
    """An RTP packet written field by field from the RFC 3550 layout."""
    block = build_extension_block(f["elements"])
    b0 = 0x80 | len(f["csrcs"]) | (0x10 if block else 0) | (0x20 if f["padding"] else 0)
    out = struct.pack(
        "!BBHII", b0, (0x80 if f["marker"] else 0) | f["pt"], f["seq"], f["ts"], f["ssrc"]
    )
    out += b"".join(struct.pack("!I", c) for c in f["csrcs"])
    out += block + f["payload"]
    if f["padding"]:
        out += b"\x00" * (f["padding"] - 1) + bytes([f["padding"]])
    return out


@st.composite
def raw_rtp_headers(draw: st.DrawFn) -> bytes:
    """A fixed header with any V/P/X/CC bits, then an extension header whose profile and
    length word are drawn independently of what follows, then random bytes."""
    b0 = draw(st.sampled_from((0x80, 0x90, 0xA0, 0xB0))) | draw(st.integers(0, 15))
    if draw(st.booleans()):
        b0 = draw(U8)
    head = struct.pack("!BBHII", b0, draw(U8), draw(U16), draw(U32), draw(U32))
    ext = struct.pack(
        "!HH",
        draw(st.sampled_from((ONE_BYTE_PROFILE, 0x1000, 0x100F, 0x1234, 0))),
        draw(st.sampled_from((0, 1, 2, 3, 0xFFFF))),
    )
    return head + draw(st.binary(max_size=16)) + ext + draw(st.binary(max_size=48))


RTP_INPUTS = st.one_of(
    mutated(rtp_fields().map(build_rtp)),
    raw_rtp_headers(),
    st.binary(max_size=80),
)


def check_parsed_rtp(data: bytes) -> tuple | None:
    """Parse ``data`` the way the router does and check the invariants of what comes back;
    None when it is (correctly) rejected."""
    try:
        parsed = parse_rtp(data)
    except RtpError:
        return None
    pt, seq, ts, ssrc, marker, payload_offset, ext_offset, ext_length = parsed
    n = len(data)
    assert 0 <= pt < 128 and 0 <= seq <= 0xFFFF and 0 <= ts <= 0xFFFFFFFF
    assert 12 <= payload_offset <= n
    assert payload_offset + padding_length(data) <= n
    if ext_length or ext_offset:
        assert ext_offset + ext_length == payload_offset
    profile = extension_profile(data)
    assert profile in (0, ONE_BYTE_PROFILE, TWO_BYTE_PROFILE)
    try:
        elements = parse_extensions(data, ext_offset, ext_length, profile)
    except RtpError:
        return parsed
    # every element costs at least one header byte: never more elements than block bytes
    assert len(elements) <= ext_length
    assert sum(len(v) + 1 for _, v in elements) <= ext_length
    for ident, value in elements:
        assert (1 <= ident <= 14) if profile == ONE_BYTE_PROFILE else (1 <= ident <= 255)
        assert isinstance(value, bytes)
    return parsed


@fuzz(300)
@given(RTP_INPUTS, st.integers(1, 255), U16)
def test_rtp_parsers_raise_only_rtp_error(data: bytes, ext_id: int, seq: int) -> None:
    """parse_rtp and parse_extensions return consistent offsets or raise RtpError, on any
    bytes; the elements found are bounded by the block length. write_transport_seq rewrites
    a 2-byte element in place (same length, same elements but that value) or raises
    RtpError."""
    parsed = check_parsed_rtp(data)
    check_parsed_rtp(bytearray(data))
    try:
        out = write_transport_seq(data, ext_id, seq)
    except RtpError:
        return
    assert parsed is not None and len(out) == len(data)
    try:
        before = parse_extensions(data, parsed[6], parsed[7], extension_profile(data))
    except RtpError:
        return  # an element after the one rewritten overruns the block
    after = parse_extensions(out, parsed[6], parsed[7], extension_profile(out))
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert len(changed) <= 1
    first = next(v for i, v in after if i == ext_id)
    assert transport_seq(first) == seq


@fuzz(200)
@given(rtp_fields())
def test_rtp_build_parse_round_trip(f: dict) -> None:
    """A packet written from fields parses back to the same fields and elements."""
    data = build_rtp(f)
    pt, seq, ts, ssrc, marker, offset, ext_offset, ext_length = parse_rtp(data)
    assert (pt, seq, ts, ssrc, marker) == (f["pt"], f["seq"], f["ts"], f["ssrc"], f["marker"])
    assert padding_length(data) == f["padding"]
    assert data[offset : len(data) - f["padding"]] == f["payload"]
    elements = parse_extensions(data, ext_offset, ext_length, extension_profile(data))
    assert elements == f["elements"]


@fuzz(200)
@given(st.lists(st.tuples(st.integers(-2, 300), st.binary(max_size=300)), max_size=6))
def test_extension_block_builder(elements: list[tuple[int, bytes]]) -> None:
    """build_extension_block writes a parseable block with the same elements, or raises
    RtpError for an element no form can carry; the one-byte form whenever it fits."""
    try:
        block = build_extension_block(elements)
    except RtpError:
        assert any(not 0 < i < 256 or len(v) > 255 for i, v in elements)
        return
    if not elements:
        assert block == b""
        return
    assert len(block) % 4 == 0 and int.from_bytes(block[2:4], "big") * 4 == len(block) - 4
    profile = int.from_bytes(block[:2], "big")
    one_byte = all(0 < i < 15 and 0 < len(v) <= 16 for i, v in elements)
    assert profile == (ONE_BYTE_PROFILE if one_byte else TWO_BYTE_PROFILE)
    assert parse_extensions(block, 4, len(block) - 4, profile) == elements


@st.composite
def rewriter_cases(draw: st.DrawFn) -> tuple:
    ids = st.integers(1, 255)
    small = st.integers(1, 14)
    id_map = draw(st.dictionaries(ids, st.one_of(small, ids), max_size=6))
    mid_id = draw(st.none() | st.one_of(small, ids))
    mid = draw(st.none() | st.text("0123456789abcdefxyz", max_size=20))
    publisher_mid_id = draw(st.none() | ids)
    known = sorted(id_map) or [1]
    elements = draw(
        st.lists(
            st.tuples(
                st.one_of(st.sampled_from(known), ids),
                st.one_of(st.binary(min_size=1, max_size=16), st.binary(max_size=255)),
            ),
            max_size=6,
        )
    )
    extra = draw(
        st.none() | st.lists(st.tuples(st.one_of(small, ids), st.binary(max_size=4)), max_size=2)
    )
    return id_map, mid_id, mid, publisher_mid_id, elements, extra


@fuzz(150)
@given(rewriter_cases())
def test_extension_rewriter_matches_the_generic_mapping(case: tuple) -> None:
    """ExtensionRewriter.block (fast one-byte path or not) gives exactly the mapped elements
    in order, then the subscriber's mid, then the extra elements, in a valid block."""
    id_map, mid_id, mid, publisher_mid_id, elements, extra = case
    rewriter = ExtensionRewriter(id_map, mid_id, mid, publisher_mid_id)
    kept = {
        src: dst
        for src, dst in id_map.items()
        if src != publisher_mid_id and (mid_id is None or dst != mid_id)
    }
    expected = [(kept[i], v) for i, v in elements if i in kept]
    if mid_id is not None and mid is not None:
        expected.append((mid_id, mid.encode()))
    expected += extra or []
    block = rewriter.block(elements, extra)
    if not expected:
        assert block == b""
        return
    profile = int.from_bytes(block[:2], "big")
    assert int.from_bytes(block[2:4], "big") * 4 == len(block) - 4
    assert parse_extensions(block, 4, len(block) - 4, profile) == expected


@fuzz(200)
@given(rtp_fields(), U32, st.integers(0, 127), U16, U32, ELEMENTS)
def test_rewrite_packet_keeps_payload(
    f: dict, ssrc: int, pt: int, seq: int, ts: int, elements: list
) -> None:
    """The rewritten packet parses with the new header fields, the publisher's marker, the new
    extension block and the publisher's payload and padding byte for byte."""
    data = build_rtp(f)
    offset = parse_rtp(data)[5]
    block = build_extension_block(elements)
    out = rewrite_packet(data, offset, ssrc, pt, seq, ts, block)
    p = parse_rtp(out)
    assert p[:5] == (pt, seq, ts, ssrc, f["marker"])
    assert out[p[5] :] == data[offset:]
    assert parse_extensions(out, p[6], p[7], extension_profile(out)) == elements


# --- RTX, keyframe detection ----------------------------------------------------------------


@fuzz(200)
@given(rtp_fields(), U32, st.integers(0, 127), U16)
def test_rtx_wrap_unwrap_round_trip(f: dict, rtx_ssrc: int, rtx_pt: int, rtx_seq: int) -> None:
    """Unwrapping a wrapped packet gives the original back, less its padding."""
    data = build_rtp(f)
    wrapped = rtx_wrap(data, rtx_ssrc, rtx_pt, rtx_seq)
    assert parse_rtp(wrapped)[:4] == (rtx_pt, rtx_seq, f["ts"], rtx_ssrc)
    osn, original = rtx_unwrap(wrapped, f["ssrc"], f["pt"])
    assert osn == f["seq"]
    unpadded = dict(f, padding=0)
    assert original == build_rtp(unpadded)


@fuzz(200)
@given(RTP_INPUTS, U32, st.integers(0, 127))
def test_rtx_unwrap_raises_only_rtp_error(data: bytes, ssrc: int, pt: int) -> None:
    """rtx_unwrap returns a parseable packet no longer than its input, or raises RtpError."""
    try:
        osn, original = rtx_unwrap(data, ssrc, pt)
    except RtpError:
        return
    assert 0 <= osn <= 0xFFFF and len(original) <= len(data) - 2
    parsed = parse_rtp(original)
    assert parsed[1] == osn and parsed[3] == ssrc and parsed[0] == pt


@st.composite
def codec_payloads(draw: st.DrawFn) -> bytes:
    """Payload descriptors that look like VP8, VP9, H.264 (single NAL, STAP-A, FU-A) or AV1."""
    kind = draw(st.sampled_from(("vp8", "vp9", "stap", "fu", "any")))
    if kind == "vp8":
        head = bytes([draw(st.sampled_from((0x10, 0x90, 0x80, 0x00))), draw(U8), draw(U8)])
    elif kind == "vp9":
        head = bytes([draw(st.sampled_from((0x08, 0x28, 0xA8, 0x88))), draw(U8)])
    elif kind == "stap":
        head = b"\x18" + struct.pack("!H", draw(U16)) + bytes([draw(U8)])
    elif kind == "fu":
        head = b"\x1c" + bytes([draw(st.sampled_from((0x85, 0x87, 0x05, 0x81)))])
    else:
        head = b""
    return head + draw(st.binary(max_size=12))


@fuzz(200)
@given(rtp_fields(), codec_payloads(), st.integers(0, 4))
def test_keyframe_detectors_never_raise(f: dict, payload: bytes, cut: int) -> None:
    """Each keyframe detector returns a bool for any packet parse_rtp accepts, whatever its
    payload descriptor and padding (truncated descriptors give False, never an error)."""
    data = build_rtp(dict(f, payload=payload))
    if cut and len(data) - cut >= 12:
        data = data[: len(data) - cut]
    try:
        offset = parse_rtp(data)[5]
    except RtpError:
        return
    for name in ("vp8", "vp9", "h264", "av1"):
        detector = codecs.keyframe_detector(name)
        assert detector is not None
        assert detector(data, offset) in (True, False)
        assert detector(data, len(data)) is False


# --- RTCP --------------------------------------------------------------------------------------

REPORT_BLOCKS = st.builds(
    rtcp.ReportBlock,
    ssrc=U32,
    fraction_lost=U8,
    packets_lost=st.integers(-0x800000, 0x7FFFFF),
    highest_sequence=U32,
    jitter=U32,
    lsr=U32,
    dlsr=U32,
)
RTCP_PACKETS = st.one_of(
    st.builds(
        rtcp.SenderReport,
        ssrc=U32,
        ntp_timestamp=st.integers(0, 2**64 - 1),
        rtp_timestamp=U32,
        packet_count=U32,
        octet_count=U32,
        reports=st.lists(REPORT_BLOCKS, max_size=3),
    ),
    st.builds(rtcp.ReceiverReport, ssrc=U32, reports=st.lists(REPORT_BLOCKS, max_size=3)),
    st.builds(rtcp.Pli, sender_ssrc=U32, media_ssrc=U32),
    st.builds(rtcp.Fir, sender_ssrc=U32, entries=st.lists(st.tuples(U32, U8), max_size=3)),
    st.builds(rtcp.Nack, sender_ssrc=U32, media_ssrc=U32, lost=st.lists(U16, max_size=20)),
    st.builds(
        rtcp.Remb,
        sender_ssrc=U32,
        bitrate=st.integers(0, 2**40),
        ssrcs=st.lists(U32, max_size=4),
    ),
    st.builds(rtcp.Bye, ssrcs=st.lists(U32, max_size=3), reason=st.binary(max_size=20)),
    st.builds(
        rtcp.Sdes,
        chunks=st.lists(
            st.tuples(
                U32, st.lists(st.tuples(st.integers(1, 255), st.binary(max_size=20)), max_size=3)
            ),
            max_size=3,
        ),
    ),
    st.builds(
        lambda s, m, fci: rtcp.parse_rtcp(rtcp.transport_feedback(s, m, fci))[0],
        U32,
        U32,
        st.binary(max_size=30),
    ),
)


def normalized(packet: rtcp.RtcpPacket) -> rtcp.RtcpPacket:
    """What a packet looks like after a trip through bytes: NACK as a sorted set, REMB
    bitrate rounded down to an 18-bit mantissa."""
    if isinstance(packet, rtcp.Nack):
        return rtcp.Nack(packet.sender_ssrc, packet.media_ssrc, sorted(set(packet.lost)))
    if isinstance(packet, rtcp.Remb):
        bitrate = packet.bitrate
        shift = max(0, bitrate.bit_length() - 18)
        return rtcp.Remb(packet.sender_ssrc, (bitrate >> shift) << shift, packet.ssrcs)
    return packet


@fuzz(300)
@given(st.lists(RTCP_PACKETS, min_size=1, max_size=5))
def test_rtcp_serialize_parse_round_trip(packets: list) -> None:
    """A compound packet written by the builders parses back to the same packets."""
    data = rtcp.serialize(packets)
    assert len(data) % 4 == 0
    parsed = rtcp.parse_rtcp(data)
    assert [normalized(p) for p in parsed] == [normalized(p) for p in packets]


@st.composite
def raw_rtcp(draw: st.DrawFn) -> bytes:
    """A common header with any count, type (SR..PSFB and others), padding bit and length
    word, then random bytes: lengths that lie, counts that overrun."""
    first = 0x80 | draw(st.integers(0, 31)) | (0x20 if draw(st.booleans()) else 0)
    pt = draw(st.sampled_from((200, 201, 202, 203, 204, 205, 206, 207)))
    body = draw(st.binary(max_size=60))
    words = draw(st.sampled_from((len(body) // 4, len(body) // 4 + 1, 0, 0xFFFF)))
    if pt in (205, 206) and draw(st.booleans()) and len(body) >= 12:
        body = body[:8] + b"REMB" + body[12:]
    return struct.pack("!BBH", first, pt, words) + body


RTCP_INPUTS = st.one_of(
    mutated(st.lists(RTCP_PACKETS, min_size=1, max_size=3).map(rtcp.serialize)),
    raw_rtcp(),
    st.binary(max_size=64),
)


def check_parsed_rtcp(data: bytes) -> list | None:
    """parse_rtcp, with the bounds of what it returns; None when rejected with RtcpError."""
    try:
        packets = rtcp.parse_rtcp(data)
    except RtcpError:
        return None
    n = len(data)
    assert 1 <= len(packets) <= n // 4
    for p in packets:
        if isinstance(p, rtcp.Nack):
            assert len(p.lost) <= 17 * (n // 4)
        elif isinstance(p, (rtcp.SenderReport, rtcp.ReceiverReport)):
            assert len(p.reports) <= min(31, n // 24)
        elif isinstance(p, rtcp.Bye):
            assert len(p.ssrcs) <= 31 and len(p.reason) <= 255
        elif isinstance(p, rtcp.Sdes):
            assert len(p.chunks) <= 31
            assert sum(len(items) for _, items in p.chunks) <= n // 2
        elif isinstance(p, rtcp.Fir):
            assert len(p.entries) <= n // 8
        elif isinstance(p, rtcp.Remb):
            assert len(p.ssrcs) <= min(255, n // 4)
        elif isinstance(p, (rtcp.TransportFeedback, rtcp.UnknownRtcp)):
            assert len(p.raw) <= n
    return packets


@fuzz(300)
@given(RTCP_INPUTS)
def test_rtcp_parser_raises_only_rtcp_error(data: bytes) -> None:
    """parse_rtcp returns packets bounded by the input length or raises RtcpError; whatever
    it accepts can be written back and parses to the same packets."""
    packets = check_parsed_rtcp(data)
    if packets is None:
        return
    again = rtcp.parse_rtcp(rtcp.serialize(packets))
    assert [normalized(p) for p in again] == [normalized(p) for p in packets]
    for p in packets:
        if isinstance(p, rtcp.TransportFeedback):
            assert len(p.fci) <= len(p.raw) - 12


# --- transport-cc feedback ---------------------------------------------------------------------


@fuzz(200)
@given(st.lists(st.integers(0, 2), max_size=300))
def test_status_chunks_round_trip(symbols: list[int]) -> None:
    """encode_status_chunks then decode_status_chunks gives the symbols back, consuming every
    chunk written."""
    data = encode_status_chunks(symbols)
    assert len(data) % 2 == 0 and len(data) <= 2 * max(1, len(symbols))
    assert decode_status_chunks(data, 0, len(symbols)) == (symbols, len(data))


@st.composite
def feedback_fcis(draw: st.DrawFn) -> tuple[bytes, int, int, int, list[int], list[float | None]]:
    """A hand-written FCI: header, chunks from the encoder, receive deltas; and the arrivals
    it stands for."""
    base, reference, fb_count = draw(U16), draw(st.integers(0, 0xFFFFFF)), draw(U8)
    symbols = draw(st.lists(st.integers(0, 2), min_size=1, max_size=80))
    ticks = reference * 256
    deltas = b""
    arrivals: list[float | None] = []
    for sym in symbols:
        if sym == 1:
            d = draw(U8)
            deltas += bytes([d])
        elif sym == 2:
            d = draw(st.integers(-0x8000, 0x7FFF))
            deltas += struct.pack("!h", d)
        else:
            arrivals.append(None)
            continue
        ticks += d
        arrivals.append(ticks * TICK)
    head = struct.pack("!HHI", base, len(symbols), (reference << 8) | fb_count)
    fci = head + encode_status_chunks(symbols) + deltas + b"\x00" * draw(st.integers(0, 3))
    return fci, base, reference, fb_count, symbols, arrivals


@fuzz(200)
@given(feedback_fcis())
def test_feedback_parse_round_trip(case: tuple) -> None:
    """A feedback FCI written by hand parses to its header fields, symbols and arrivals."""
    fci, base, reference, fb_count, symbols, arrivals = case
    fb = parse_feedback(fci)
    assert (fb.base_seq, fb.status_count, fb.reference_time, fb.fb_count) == (
        base,
        len(symbols),
        reference,
        fb_count,
    )
    assert fb.symbols == symbols and fb.arrivals == arrivals


@st.composite
def twcc_arrivals(draw: st.DrawFn) -> list[tuple[int, float]]:
    """(transport-wide sequence number, arrival) of packets as a publisher's transport sees
    them: gaps (losses), large and negative deltas, the 16-bit wrap, some reordering."""
    seq = draw(st.one_of(st.just(65500), U16))
    now = draw(st.floats(10.0, 1e5))
    events = []
    steps = st.tuples(
        st.integers(1, 40),
        st.one_of(st.floats(0.0, 0.06), st.floats(-0.1, 0.0), st.floats(0.06, 8.0)),
    )
    for gap, dt in draw(st.lists(steps, min_size=1, max_size=150)):
        seq += gap
        now += dt
        events.append((seq, now))
    k = draw(st.integers(0, len(events) // 3))
    events[:k] = draw(st.permutations(events[:k]))
    return events


@fuzz(100)
@given(twcc_arrivals())
def test_recorder_feedback_round_trip(events: list[tuple[int, float]]) -> None:
    """Feedback built by TwccRecorder parses (parse_rtcp, then parse_feedback) to every
    recorded packet received with its arrival to 250 µs, the gaps not received, in
    packets that fit the MTU."""
    packets, feedbacks = record_and_decode(events)
    check_round_trip(events, feedbacks)
    assert all(len(p) <= 1200 and len(p) % 4 == 0 for p in packets)


@st.composite
def raw_fcis(draw: st.DrawFn) -> bytes:
    """A header with any status count, then chunk words of all three kinds and random bytes."""
    head = struct.pack("!HHI", draw(U16), draw(st.one_of(st.integers(0, 40), U16)), draw(U32))
    chunks = b"".join(
        struct.pack("!H", w)
        for w in draw(
            st.lists(
                st.one_of(st.integers(0, 0x7FFF), st.integers(0x8000, 0xBFFF), U16), max_size=6
            )
        )
    )
    return head + chunks + draw(st.binary(max_size=40))


@fuzz(250)
@given(st.one_of(raw_fcis(), mutated(feedback_fcis().map(lambda c: c[0])), st.binary(max_size=40)))
def test_feedback_parser_raises_only_rtcp_error(fci: bytes) -> None:
    """parse_feedback gives exactly status_count statuses (at most 65535) or raises RtcpError;
    the statuses the FCI's bytes can describe bound the output: each 2-byte chunk describes
    at most 8191 of them."""
    try:
        fb = parse_feedback(fci)
    except RtcpError:
        return
    assert len(fb.symbols) == len(fb.arrivals) == fb.status_count <= 0xFFFF
    assert fb.status_count <= 8191 * max(0, (len(fci) - 8) // 2)
    assert all(s in (0, 1, 2, 3) for s in fb.symbols)
    assert fb.received == sum(1 for s in fb.symbols if s)


# --- STUN ----------------------------------------------------------------------------------

_PWD = "relaypassword0123456789"
_UFRAG_TEXT = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=12
)


@st.composite
def stun_messages(draw: st.DrawFn) -> bytes:
    """A STUN message written by aioice's codec: Binding or another method, any class, a
    USERNAME that may lack or repeat the colon, ICE attributes, MESSAGE-INTEGRITY (right or
    wrong key) and FINGERPRINT, each optional."""
    method = draw(st.sampled_from(list(stun.Method)))
    if draw(st.booleans()):
        method = stun.Method.BINDING
    msg = stun.Message(
        method,
        draw(st.sampled_from(list(stun.Class))),
        transaction_id=draw(st.binary(min_size=12, max_size=12)),
    )
    if draw(st.integers(0, 9)):  # mostly present
        username = draw(
            st.one_of(
                st.just("relayufrag:clientufrag"),
                st.builds(lambda a, b: f"{a}:{b}", _UFRAG_TEXT, _UFRAG_TEXT),
                _UFRAG_TEXT,
            )
        )
        msg.attributes["USERNAME"] = username
    if draw(st.booleans()):
        msg.attributes["PRIORITY"] = draw(U32)
    if draw(st.booleans()):
        msg.attributes["USE-CANDIDATE"] = None
    role = draw(st.sampled_from((None, "ICE-CONTROLLING", "ICE-CONTROLLED")))
    if role:
        msg.attributes[role] = draw(st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        msg.attributes["XOR-MAPPED-ADDRESS"] = ("192.0.2.1", draw(U16))
    integrity = draw(st.sampled_from(("right", "wrong", "none")))
    if integrity == "right":
        msg.add_message_integrity(_PWD.encode())
    elif integrity == "wrong":
        msg.add_message_integrity(b"not the password")
    elif draw(st.booleans()):
        msg.add_fingerprint()
    return bytes(msg)


@st.composite
def raw_stun(draw: st.DrawFn) -> bytes:
    """A STUN header (right or wrong length) and attribute TLVs with random types, lengths
    and values, including the known types with values of the wrong size."""
    known = (0x0001, 0x0006, 0x0008, 0x0009, 0x0020, 0x0024, 0x0025, 0x8028, 0x802A)
    attrs = b""
    for _ in range(draw(st.integers(0, 5))):
        value = draw(st.binary(max_size=24))
        length = draw(st.sampled_from((len(value), len(value) + 4, 0)))
        attr_type = draw(st.one_of(st.sampled_from(known), U16))
        attrs += struct.pack("!HH", attr_type, length) + value + b"\x00" * (-len(value) % 4)
    msg_type = draw(st.sampled_from((0x0001, 0x0101, 0x0111, 0x0011))) | draw(
        st.sampled_from((0, 0, 0x3EEE))
    )
    length = draw(st.sampled_from((len(attrs), len(attrs) + 4, 0)))
    return (
        struct.pack("!HHI", msg_type, length, 0x2112A442)
        + draw(st.binary(min_size=12, max_size=12))
        + attrs
    )


STUN_INPUTS = st.one_of(mutated(stun_messages(), max_ops=3), raw_stun(), st.binary(max_size=64))


@fuzz(250)
@given(STUN_INPUTS)
def test_stun_parser_raises_only_stun_error(data: bytes) -> None:
    """parse_binding_request (aioice's codec underneath) returns a Binding request with two
    non-empty username fragments, or raises StunError; the responses to an accepted request
    parse back with its transaction id."""
    try:
        req = parse_binding_request(data)
    except StunError:
        return
    assert req.local_ufrag and req.remote_ufrag and ":" not in req.local_ufrag + req.remote_ufrag
    assert req.priority is None or 0 <= req.priority <= 0xFFFFFFFF
    assert req.authenticate(_PWD) in (True, False)
    assert not req.authenticate("another password entirely")
    for response in (
        binding_success(req, ("192.0.2.7", 50000), _PWD),
        binding_error(req, 401, "Unauthorized"),
        binding_error(req, 487, "Role Conflict", _PWD),
    ):
        parsed = stun.parse_message(response)
        assert parsed.transaction_id == req.message.transaction_id


@fuzz(150)
@given(
    st.text(st.sampled_from("abcXYZ019+/"), min_size=1, max_size=16),
    st.text(st.sampled_from("abcXYZ019+/"), min_size=1, max_size=16),
    st.booleans(),
    st.one_of(st.none(), U32),
)
def test_stun_request_round_trip(
    local: str, remote: str, use_candidate: bool, priority: int | None
) -> None:
    """A signed Binding request written by aioice parses to its fields and authenticates with
    the right password only."""
    msg = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    msg.attributes["USERNAME"] = f"{local}:{remote}"
    if priority is not None:
        msg.attributes["PRIORITY"] = priority
    if use_candidate:
        msg.attributes["USE-CANDIDATE"] = None
    msg.add_message_integrity(_PWD.encode())
    req = parse_binding_request(bytes(msg))
    assert (req.local_ufrag, req.remote_ufrag) == (local, remote)
    assert (req.use_candidate, req.priority) == (use_candidate, priority)
    assert req.authenticate(_PWD) and not req.authenticate(_PWD + "x")


# --- DTLS record framing -----------------------------------------------------------------------

_CERTS = (Certificate.generate(), Certificate.generate())


def _dtls_pair() -> tuple[DtlsEndpoint, DtlsEndpoint]:
    client = DtlsEndpoint(_CERTS[0], False, _CERTS[1].fingerprints(), mtu=1200)
    server = DtlsEndpoint(_CERTS[1], True, _CERTS[0].fingerprints(), mtu=1200)
    return client, server


_CLIENT_HELLO = _dtls_pair()[0].start(0.0)[0]


@st.composite
def dtls_records(draw: st.DrawFn) -> bytes:
    """One or more DTLS record headers (content types 20..25 and others, DTLS 1.0/1.2 or
    another version, epoch 0, 1 or 2, lengths that may lie) with random bodies."""
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        body = draw(st.binary(max_size=48))
        out += struct.pack(
            "!BHH6sH",
            draw(st.sampled_from((20, 21, 22, 23, 24, 25, 63))),
            draw(st.sampled_from((0xFEFD, 0xFEFF, 0x0303))),
            draw(st.sampled_from((0, 1, 2))),
            draw(st.binary(min_size=6, max_size=6)),
            draw(st.sampled_from((len(body), len(body) + 1, 0, 0xFFFF))),
        )
        out += body
    return out


DTLS_INPUTS = st.one_of(
    mutated(st.just(_CLIENT_HELLO), max_ops=3),
    dtls_records(),
    st.binary(min_size=1, max_size=40).map(lambda b: bytes([20 + b[0] % 44]) + b[1:]),
)


def _check_datagrams(out: list, mtu: int) -> None:
    """Output of a DTLS endpoint: non-empty bytes, each within the MTU unless it is a single
    record OpenSSL made larger."""
    for datagram in out:
        assert isinstance(datagram, bytes) and datagram
        if len(datagram) > mtu:
            assert 13 + int.from_bytes(datagram[11:13], "big") >= len(datagram)


@fuzz(150)
@given(st.lists(DTLS_INPUTS, min_size=1, max_size=3))
def test_dtls_server_never_raises_on_fuzzed_records(datagrams: list[bytes]) -> None:
    """A fresh server endpoint fed mutated ClientHellos and forged records never raises,
    sends only well-framed datagrams, and ends CONNECTING or FAILED (never CONNECTED)."""
    _client, server = _dtls_pair()
    server.start(0.0)
    for data in datagrams:
        _check_datagrams(server.receive(data, 1.0), server.mtu)
    assert server.state in (DtlsState.CONNECTING, DtlsState.FAILED)
    assert server.srtp_keys is None


def _connected_pair() -> tuple[DtlsEndpoint, DtlsEndpoint]:
    """A client and a server that completed a lossless handshake."""
    client, server = _dtls_pair()
    server.start(0.0)
    to_server = client.start(0.0)
    for _ in range(10):
        to_client = [d for x in to_server for d in server.receive(x, 0.0)]
        to_server = [d for x in to_client for d in client.receive(x, 0.0)]
        if not to_client and not to_server:
            break
    assert client.state is server.state is DtlsState.CONNECTED
    return client, server


@fuzz(150)
@given(st.lists(DTLS_INPUTS, min_size=1, max_size=3))
def test_dtls_association_survives_forged_records(datagrams: list[bytes]) -> None:
    """Unauthenticated records (forged, or a replayed and mutated ClientHello) fed to a
    connected endpoint never raise and never take the association down: nothing moves on
    an unauthenticated packet."""
    _client, server = _connected_pair()
    keys = server.srtp_keys
    for data in datagrams:
        _check_datagrams(server.receive(data, 1.0), server.mtu)
    assert server.state is DtlsState.CONNECTED and server.srtp_keys == keys


class _FakeBio:
    """Stands in for OpenSSL's memory BIO: hands out a fixed byte string once."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def bio_read(self, size: int) -> bytes:
        from OpenSSL import SSL

        if not self.data:
            raise SSL.WantReadError()
        out, self.data = self.data[:size], self.data[size:]
        return out


@st.composite
def record_streams(draw: st.DrawFn) -> bytes:
    """Records as OpenSSL writes them (honest lengths, sizes up to twice the MTU), the last
    one possibly cut short."""
    out = b""
    for _ in range(draw(st.integers(1, 8))):
        size = draw(st.sampled_from((0, 1, 100, 243, 244, 600, 1200)))
        out += b"\x16\xfe\xfd" + b"\x00" * 8 + struct.pack("!H", size) + b"\xaa" * size
    if draw(st.booleans()):
        out = out[: draw(st.integers(1, len(out)))]
    return out


@fuzz(200)
@given(record_streams(), st.sampled_from((256, 300, 576, 1200)))
def test_dtls_output_split_on_record_boundaries(data: bytes, mtu: int) -> None:
    """The endpoint's output framing: datagrams concatenate to what OpenSSL wrote, none is
    empty, each fits the MTU unless it holds one record only, and a split is always made on
    a record boundary."""
    endpoint = DtlsEndpoint(_CERTS[0], True, _CERTS[1].fingerprints(), mtu=mtu)
    endpoint._conn = _FakeBio(data)
    out = endpoint._drain()
    assert b"".join(out) == data
    boundaries = {0}
    pos = 0
    while pos < len(data):
        pos += (
            13 + int.from_bytes(data[pos + 11 : pos + 13], "big")
            if pos + 13 <= len(data)
            else len(data)
        )
        boundaries.add(min(pos, len(data)))
    start = 0
    for datagram in out:
        assert datagram and start in boundaries
        if len(datagram) > mtu:
            # a single record (possibly cut short) larger than the MTU
            assert start + 13 + int.from_bytes(datagram[11:13], "big") >= start + len(datagram)
        start += len(datagram)


# --- SDP ---------------------------------------------------------------------------------------

_ATTRIBUTE_LINES = st.sampled_from(
    (
        "a=rtpmap:{pt} {word}/{num}",
        "a=rtpmap:{pt} VP8/90000",
        "a=fmtp:{pt} apt={num};{word}={num}",
        "a=fmtp:{pt} {word}={word}",
        "a=rtcp-fb:{pt} {word}",
        "a=extmap:{num} {word}",
        "a=extmap:{num}/sendonly urn:ietf:params:rtp-hdrext:sdes:mid",
        "a=ssrc:{num} cname:{word}",
        "a=ssrc-group:FID {num} {num}",
        "a=ssrc-group:{word}",
        "a=rid:{word} send pt={pt}",
        "a=simulcast:send {word};{word}",
        "a=group:BUNDLE {word} {num}",
        "a=mid:{word}",
        "a=msid:{word} {word}",
        "a=fingerprint:{word} {word}",
        "a=setup:{word}",
        "a=ice-ufrag:{word}",
        "a=ice-pwd:{word}",
        "a={word}",
        "a=extmap-allow-mixed",
        "a=rtcp-mux",
        "a=sendonly",
        "m=video {num} UDP/TLS/RTP/SAVPF {pt}",
        "m=application {num} UDP/DTLS/SCTP webrtc-datachannel",
        "m={word} {num} {word} {word}",
        "c=IN IP4 {word}",
        "o=- {num} {num} IN IP4 {word}",
        "v={num}",
    )
)
_WORDS = st.one_of(
    st.sampled_from(("", "0", "1", "opus", "H264", "*", ":", "sha-256", "actpass", "x y")),
    st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=12),
    st.text(st.characters(max_codepoint=0x7F), max_size=6),  # control characters too
)
_NUMS = st.one_of(
    st.integers(0, 300).map(str), st.sampled_from(("-1", "4294967296", "1e3", "", "99999999999"))
)


@st.composite
def attribute_lines(draw: st.DrawFn) -> str:
    template = draw(_ATTRIBUTE_LINES)
    return template.format(
        # the opus and VP8 payload types of the captured offers, and odd ones
        pt=draw(st.one_of(st.sampled_from(("96", "97", "102", "109", "111", "120", "128")), _NUMS)),
        word=draw(_WORDS),
        num=draw(_NUMS),
    )


@st.composite
def mutated_offers(draw: st.DrawFn) -> str:
    """A captured offer (Chrome, Firefox, Safari, aiortc) with lines deleted, duplicated,
    moved or replaced by plausible attribute lines with odd values, and a few characters
    changed."""
    lines = OFFERS[draw(st.sampled_from(sorted(OFFERS)))].splitlines()
    for _ in range(draw(st.integers(0, 5))):
        op = draw(
            st.sampled_from(("delete", "duplicate", "move", "replace", "insert", "chars", "value"))
        )
        i = draw(st.integers(0, len(lines) - 1))
        if op == "value":
            # an attribute value of the capture (fmtp parameters, mid, msid...) made longer
            attrs = [k for k, line in enumerate(lines) if line.startswith("a=") and ":" in line]
            k = draw(st.sampled_from(attrs))
            lines[k] += draw(st.sampled_from((";", " ", ""))) + draw(_WORDS) + "=" + draw(_WORDS)
        elif op == "delete" and len(lines) > 1:
            del lines[i]
        elif op == "duplicate":
            lines.insert(draw(st.integers(0, len(lines))), lines[i])
        elif op == "move":
            line = lines.pop(i)
            lines.insert(draw(st.integers(0, len(lines))), line)
        elif op == "replace":
            lines[i] = draw(attribute_lines())
        elif op == "insert":
            lines.insert(i, draw(attribute_lines()))
        else:
            line = lines[i]
            if line:
                j = draw(st.integers(0, len(line) - 1))
                lines[i] = line[:j] + draw(st.text(max_size=2)) + line[j + 1 :]
    return "\r\n".join(lines) + "\r\n"


SDP_INPUTS = st.one_of(
    mutated_offers(), st.sampled_from(sorted(OFFERS.values())), st.text(max_size=200)
)
#: an SDP line without the characters that end a line or a string (RFC 8866 §9: byte-string)
_SDP_LINE = re.compile(r"[a-z]=[^\r\n\x00]*")
_LOCAL = LocalTransport(
    "relayufrag",
    "relaypassword0123456789",
    ("sha-256", "AA:BB"),
    [("10.0.0.1", 40000)],
    "passive",
    1,
    1,
)


@fuzz(400)
@given(SDP_INPUTS)
def test_sdp_parse_and_answer_raise_only_sdp_error(text: str) -> None:
    """parse_sdp raises only SdpError; an offer it accepts is answered (build_answer) or
    refused with SdpError; an answer parses again and answers every offered m-line, in
    order, with the offered mid."""
    try:
        offer = parse_sdp(text)
    except SdpError:
        return
    assert len(offer.media) <= text.count("\n") + 1
    try:
        remote_transport(offer)
    except SdpError:
        pass
    try:
        answer, answered = build_answer(offer, _LOCAL)
    except SdpError:
        event("offer refused")
        return
    event("offer answered")
    assert len(answered) == len(offer.media)
    parsed = parse_sdp(answer)
    assert [m.mid for m in parsed.media] == [m.mid for m in offer.media]
    assert all((m.port == 0) == a.rejected for m, a in zip(parsed.media, answered, strict=True))


@fuzz(120)
@given(st.lists(mutated_offers(), min_size=1, max_size=3))
def test_publisher_offer_raises_only_sfu_errors(texts: list[str]) -> None:
    """The SFU takes a publisher's offer and its mutated re-offers (with a subscriber in the
    room) or refuses each with an SfuError (an HTTP 4xx for the control API), never another
    exception; what it answers parses."""
    h = Harness()
    h.sfu.add_participant("r", "alice")
    h.sfu.add_participant("r", "bob")
    for text in texts:
        try:
            answer = h.sfu.publisher_offer("r", "alice", text)
        except SfuError as exc:
            event(f"refused: {exc.code}")
            continue
        event("answered")
        parse_sdp(answer)
        h.sfu.subscriber_offer("r", "bob")


_ODD_TEXT = st.text(st.sampled_from("\r\x00\x0b\x85\u2028 ;=:/aZ9"), min_size=1, max_size=6)


@st.composite
def offers_with_odd_values(draw: st.DrawFn) -> str:
    """A captured offer whose attribute values (fmtp parameters, rtpmap, extmap, mid, msid,
    ssrc...) carry extra text with line-ending, NUL and other odd characters inside."""
    lines = OFFERS[draw(st.sampled_from(sorted(OFFERS)))].splitlines()
    attrs = [k for k, line in enumerate(lines) if line.startswith("a=") and ":" in line]
    for k in draw(st.lists(st.sampled_from(attrs), min_size=1, max_size=4)):
        lines[k] += draw(st.sampled_from((";", " ", ""))) + draw(_ODD_TEXT) + "x"
    return "\r\n".join(lines) + "\r\n"


@fuzz(150)
@given(offers_with_odd_values())
def test_publisher_text_reaches_others_only_as_whole_lines(text: str) -> None:
    """Whatever text a publisher puts in its offer, the answer and the offers the relay makes
    for the other participants consist of whole SDP lines: no CR, LF or NUL inside a line
    (RFC 8866 §9 byte-string), so one participant cannot add lines to another's SDP."""
    h = Harness()
    h.sfu.add_participant("r", "alice")
    h.sfu.add_participant("r", "bob")
    try:
        answer = h.sfu.publisher_offer("r", "alice", text)
    except SfuError as exc:
        event(f"refused: {exc.code}")
        return
    event("answered")
    offer, _revision = h.sfu.subscriber_offer("r", "bob")
    for sdp in (answer, offer):
        assert sdp.endswith("\r\n")
        for line in sdp[:-2].split("\r\n"):
            assert _SDP_LINE.fullmatch(line), line


# --- the media port ----------------------------------------------------------------------------

ALICE = ("10.0.0.1", 4000)
BOB = ("10.0.0.2", 5000)
STRANGER = ("10.9.9.9", 1234)

#: drops that are decided per datagram; the others are per subscription of a forwarded packet
_OUTPUT_DROPS = ("stale_packet",)


def _inbound(m) -> int:
    dropped = sum(v for k, v in m.drops.items() if k not in _OUTPUT_DROPS)
    return dropped + m.packets_in + m.rtcp_in + m.stun_requests


def _outbound(m) -> int:
    return m.packets_out + m.send_errors + m.keyframe_waits + sum(m.drops[k] for k in _OUTPUT_DROPS)


@st.composite
def router_datagrams(draw: st.DrawFn, ssrcs: list[int], credentials: list[tuple]) -> bytes:
    """Datagrams of every class the port demultiplexes: RTP of the publisher's SSRCs (media,
    RTX, unknown) with its mid and audio-level extensions, RTCP of every type about the
    relay's SSRCs, STUN checks signed with a transport's password or not, DTLS-looking
    records, random bytes; each possibly mutated."""
    kind = draw(st.sampled_from(("rtp", "rtp", "rtcp", "rtcp", "stun", "dtls", "random")))
    if kind == "rtp":
        f = draw(rtp_fields())
        f["ssrc"] = draw(st.one_of(st.sampled_from(ssrcs), U32))
        f["pt"] = draw(st.one_of(st.sampled_from((96, 97, 98)), st.integers(0, 127)))
        f["csrcs"] = f["csrcs"][:2]
        f["elements"] = draw(
            st.lists(
                st.one_of(
                    st.tuples(st.just(1), st.sampled_from((b"0", b"1", b"9"))),
                    st.tuples(st.just(2), st.binary(min_size=1, max_size=1)),
                    st.tuples(st.integers(1, 14), st.binary(min_size=1, max_size=4)),
                ),
                max_size=3,
            )
        )
        if draw(st.booleans()):
            f["payload"] = draw(st.sampled_from((VP8_KEYFRAME, b"\x00\x01" + VP8_KEYFRAME)))
        data = build_rtp(f)
    elif kind == "rtcp":
        sampled = st.one_of(st.sampled_from(ssrcs), U32)
        packets = draw(
            st.lists(
                st.one_of(
                    RTCP_PACKETS,
                    st.builds(rtcp.Pli, sender_ssrc=U32, media_ssrc=sampled),
                    st.builds(
                        rtcp.Nack,
                        sender_ssrc=U32,
                        media_ssrc=sampled,
                        lost=st.lists(U16, max_size=40),
                    ),
                    st.builds(
                        lambda s, m, fci: rtcp.parse_rtcp(rtcp.transport_feedback(s, m, fci))[0],
                        U32,
                        sampled,
                        st.one_of(feedback_fcis().map(lambda c: c[0]), raw_fcis()),
                    ),
                    st.builds(
                        rtcp.SenderReport,
                        ssrc=sampled,
                        ntp_timestamp=st.integers(0, 2**64 - 1),
                        rtp_timestamp=U32,
                        packet_count=U32,
                        octet_count=U32,
                    ),
                    st.builds(
                        rtcp.ReceiverReport,
                        ssrc=U32,
                        reports=st.lists(
                            st.builds(rtcp.ReportBlock, ssrc=sampled, fraction_lost=U8), max_size=2
                        ),
                    ),
                ),
                min_size=1,
                max_size=3,
            )
        )
        data = rtcp.serialize(packets)
    elif kind == "stun":
        username, pwd = draw(st.sampled_from(credentials))
        msg = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
        msg.attributes["USERNAME"] = username
        msg.attributes["PRIORITY"] = draw(U32)
        if draw(st.booleans()):
            msg.attributes["USE-CANDIDATE"] = None
        msg.add_message_integrity(pwd.encode())
        data = bytes(msg) if draw(st.booleans()) else draw(stun_messages())
    elif kind == "dtls":
        data = draw(DTLS_INPUTS)
    else:
        data = draw(st.binary(max_size=60))
    return draw(mutated(st.just(data), max_ops=2)) if draw(st.booleans()) else data


@fuzz(150)
@given(st.data())
def test_router_accounts_for_every_datagram(data: st.DataObject) -> None:
    """Fuzzed datagrams from the publisher's, the subscriber's and an unknown address, fed
    to ``MediaPort.datagram_received`` of a room with a live call (both legs connected over
    real ICE, DTLS and SRTP): each as drawn, or, when it looks like RTP or RTCP and comes from
    a client's address, protected by that client's SRTP session so that it authenticates:

    - no exception escapes;
    - each datagram is counted exactly once as received (``packets_in``, ``rtcp_in``,
      ``stun_requests``) or as a per-datagram drop, except DTLS records handed to a known
      transport (the DTLS endpoint takes or discards them without a counter) and an RTCP
      compound with malformed transport-cc feedback (counted in ``rtcp_in``, and once per
      malformed feedback as a ``rtcp_malformed`` drop);
    - each accepted RTP packet is, for every subscription of its track, forwarded
      (``packets_out``) or counted as ``keyframe_waits``/``stale_packet``;
    - nothing but STUN responses goes to an address that is not latched, and one datagram
      makes at most a bounded number of datagrams.
    """
    h = Harness()
    alice, bob, video = _video_call(h)
    router, metrics = h.sfu.port, h.sfu.metrics
    ssrcs = [AIORTC_AUDIO_SSRC, AIORTC_VIDEO_SSRC, video.track.rtx_ssrc]
    ssrcs += [s.ssrc for s in bob.subscriptions.values()]
    # what the clients sign their checks with (the relay's ufrag and password)
    credentials = [
        (f"{p.remote.ice_ufrag}:{p.local.ufrag}", p.remote.ice_pwd)
        for p in (h.peer("alice", "publisher"), h.peer("bob", "subscriber"))
    ] + [("nobody:client", "nobodypassword0123456789")]
    h.sent.clear()
    for _ in range(data.draw(st.integers(1, 6), label="count")):
        datagram = data.draw(router_datagrams(ssrcs, credentials), label="datagram")
        forwarded = [
            parse_rtp(d)[1:4:2]
            for d, a in h.sent
            if a == BOB and 127 < d[0] < 192 and not is_rtcp(d)
        ]
        senders = (ALICE, ALICE, BOB, STRANGER)
        if forwarded and data.draw(st.booleans(), label="nack forwarded"):
            # a subscriber asking for packets the relay did send it (mostly from its address)
            event("NACK of forwarded packets")
            lost = data.draw(st.lists(st.sampled_from(forwarded), min_size=1, max_size=4))
            datagram = rtcp.nack(1, lost[0][1], [seq for seq, ssrc in lost if ssrc == lost[0][1]])
            senders = (BOB, BOB, ALICE, STRANGER)
        addr = data.draw(st.sampled_from(senders), label="from")
        if h.can_protect(datagram, addr) and data.draw(
            st.sampled_from((True, True, True, False)), label="protected"
        ):
            # SRTP or SRTCP of the client at that address (mostly; raw bytes from a client's
            # address are forged SRTP): authenticated, so what it carries reaches the leg
            try:
                datagram = h.protect(datagram, addr)
                event("protected by the sender's client")
            except SrtpError:
                event("libsrtp refused to protect it")
        known = router.by_addr.get(addr) or router.alt_addrs.get(addr)
        tracks = list(alice.tracks.values())
        before_in, before_out = _inbound(metrics), _outbound(metrics)
        before_drops, before_rtcp = dict(metrics.drops), metrics.rtcp_in
        before_packets = metrics.packets_in
        before_stun, before_rtx = metrics.stun_requests, metrics.retransmissions
        before_forwarded = metrics.packets_out
        latched = set(router.by_addr)
        sent_before = len(h.wire)
        router.datagram_received(datagram, addr)
        for name, value in metrics.drops.items():
            if value > before_drops[name]:
                event(f"drop: {name}")
        if metrics.packets_in > before_packets:
            event("rtp accepted")
        if metrics.rtcp_in > before_rtcp:
            event("rtcp accepted")
        if metrics.stun_requests > before_stun:
            event("stun accepted")
        if metrics.retransmissions > before_rtx:
            event("retransmission sent")
        if metrics.packets_out > before_forwarded:
            event("forwarded")
        received = _inbound(metrics) - before_in
        if datagram and 19 < datagram[0] < 64 and known is not None:
            assert received in (0, 1)
            if not received:
                event("DTLS datagram taken without a counter")
        elif metrics.rtcp_in > before_rtcp and (
            metrics.drops["rtcp_malformed"] > before_drops["rtcp_malformed"]
        ):
            # a compound counted once as received, and once per malformed feedback inside
            malformed = metrics.drops["rtcp_malformed"] - before_drops["rtcp_malformed"]
            assert metrics.rtcp_in - before_rtcp == 1 and received == 1 + malformed
            event("RTCP counted in rtcp_in and as rtcp_malformed")
        else:
            assert received == 1, (datagram, addr, metrics.drops)
        if metrics.packets_in > before_packets:
            outputs = max(len(t.outputs) for t in tracks)  # one subscription each: bob's
            assert _outbound(metrics) - before_out == outputs
        sent = h.wire[sent_before:]  # as sent, whether or not a client could decrypt it
        assert len(sent) <= 300
        for out, to in sent:
            assert isinstance(out, bytes)
            if to not in latched and to not in router.by_addr:
                assert out[0] < 4 and to == addr  # a STUN response to the request's sender


# --- regressions: inputs the properties above found ---------------------------------------


def test_sdp_line_with_cr_inside_is_refused() -> None:
    """A CR inside a line (``a=mid:1;\\rx``) was taken into the mid and echoed into the
    answer, where it splits the line for a parser that ends lines on CR."""
    text = OFFERS["aiortc_offer"].replace("a=mid:1\n", "a=mid:1;\rx\n")
    assert "a=mid:1;\rx" in text
    with pytest.raises(SdpError, match="CR or NUL"):
        parse_sdp(text)


def test_publisher_fmtp_with_cr_or_nul_does_not_reach_subscriber_offers() -> None:
    """An fmtp parameter of the publisher's codec is copied into every subscriber's offer:
    one with a CR or NUL inside is refused with the offer instead."""
    for odd in ("\r", "\x00"):
        h = Harness()
        h.sfu.add_participant("r", "alice")
        h.sfu.add_participant("r", "bob")
        text = OFFERS["aiortc_offer"].replace(
            "a=rtpmap:97 VP8/90000\n", f"a=rtpmap:97 VP8/90000\na=fmtp:97 x=1{odd}a=y\n"
        )
        with pytest.raises(SfuError) as exc:
            h.sfu.publisher_offer("r", "alice", text)
        assert exc.value.code == "bad_sdp"


def test_router_counts_each_malformed_feedback_of_a_compound() -> None:
    """The compound the router property found: two transport-cc feedbacks whose status count
    overruns the FCI, from a subscriber. It is received once (``rtcp_in``) and each feedback
    is a ``rtcp_malformed`` drop."""
    h = Harness()
    _video_call(h)
    feedback = bytes.fromhex("8fcd0004000000003e2f2cc30000000100000000")
    metrics = h.sfu.metrics
    h.receive(feedback + feedback, BOB)  # protected by bob's client
    assert metrics.rtcp_in == 1 and metrics.drops["rtcp_malformed"] == 2
