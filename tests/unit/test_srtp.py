"""Unit tests for SrtpSession, keyed by real DTLS-SRTP handshakes."""

from __future__ import annotations

import array
import gc
import os
import struct
from typing import Any

import pylibsrtp
import pytest
from pylibsrtp._binding import ffi, lib

from relay.rtc import srtp as srtp_module
from relay.rtc.dtls import Certificate, DtlsEndpoint, DtlsState, SrtpKeys
from relay.rtc.srtp import (
    MAX_RTCP,
    MAX_RTP,
    MAX_SRTP,
    REPLAY_WINDOW,
    SrtpError,
    SrtpSession,
)

GCM = "AEAD_AES_128_GCM"
CM = "AES_CM_128_HMAC_SHA1_80"
TAG_LEN = {GCM: 16, CM: 10}


def handshake_keys(profile: str) -> tuple[SrtpKeys, SrtpKeys]:
    """Run a DTLS handshake in memory offering only `profile`; return (client, server) keys."""
    c_cert, s_cert = Certificate.generate("ecdsa"), Certificate.generate("ecdsa")
    client = DtlsEndpoint(c_cert, False, s_cert.fingerprints(), srtp_profiles=[profile])
    server = DtlsEndpoint(s_cert, True, c_cert.fingerprints(), srtp_profiles=[profile])
    server.start(0.0)
    to_server = client.start(0.0)
    while to_server:
        to_client = [o for d in to_server for o in server.receive(d, 0.0)]
        to_server = [o for d in to_client for o in client.receive(d, 0.0)]
    assert client.state is DtlsState.CONNECTED and server.state is DtlsState.CONNECTED
    assert client.srtp_keys is not None and server.srtp_keys is not None
    return client.srtp_keys, server.srtp_keys


@pytest.fixture(scope="module", params=[GCM, CM])
def keys(request: pytest.FixtureRequest) -> tuple[SrtpKeys, SrtpKeys]:
    return handshake_keys(request.param)


@pytest.fixture
def pair(keys: tuple[SrtpKeys, SrtpKeys]) -> tuple[SrtpSession, SrtpSession]:
    return SrtpSession(keys[0]), SrtpSession(keys[1])


def rtp(seq: int, ssrc: int = 0x11223344, payload: bytes = b"\x90" * 160) -> bytes:
    return struct.pack("!BBHII", 0x80, 111, seq & 0xFFFF, seq * 960, ssrc) + payload


def rtcp_rr(ssrc: int = 0x55667788) -> bytes:
    # Receiver report with one report block.
    block = struct.pack("!IIIIII", 0x11223344, 0x01000005, 1234, 20, 0, 0)
    return struct.pack("!BBHI", 0x81, 201, 7, ssrc) + block


def test_profile(pair: tuple[SrtpSession, SrtpSession], keys: tuple[SrtpKeys, SrtpKeys]) -> None:
    assert pair[0].profile == pair[1].profile == keys[0].profile


def test_rtp_round_trip_both_directions(
    pair: tuple[SrtpSession, SrtpSession], keys: tuple[SrtpKeys, SrtpKeys]
) -> None:
    client, server = pair
    tag = TAG_LEN[keys[0].profile]
    for seq in range(1, 50):
        for ssrc in (1, 0xDEADBEEF):
            packet = rtp(seq, ssrc)
            protected = client.protect(packet)
            assert len(protected) == len(packet) + tag
            assert protected[:12] == packet[:12]  # header stays in the clear
            assert protected[12:] != packet[12:]
            assert server.unprotect(protected) == packet
            reply = rtp(seq, ssrc + 1, payload=bytes(range(100)))
            assert client.unprotect(server.protect(reply)) == reply


def test_rtcp_round_trip_both_directions(pair: tuple[SrtpSession, SrtpSession]) -> None:
    client, server = pair
    for i in range(20):
        packet = rtcp_rr(0x1000 + i)
        protected = client.protect_rtcp(packet)
        assert len(protected) > len(packet)  # E flag + index + tag
        assert server.unprotect_rtcp(protected) == packet
        assert client.unprotect_rtcp(server.protect_rtcp(packet)) == packet


def test_bytes_like_packets(pair: tuple[SrtpSession, SrtpSession]) -> None:
    client, server = pair
    packet = rtp(7)
    protected = client.protect(bytearray(packet))
    assert server.unprotect(memoryview(protected)) == packet
    protected_rtcp = client.protect_rtcp(bytearray(rtcp_rr()))
    assert server.unprotect_rtcp(bytearray(protected_rtcp)) == rtcp_rr()


def test_tampered_rtp(pair: tuple[SrtpSession, SrtpSession]) -> None:
    client, server = pair
    protected = client.protect(rtp(10))
    for index in (2, 20, len(protected) - 1):  # header, payload, tag
        tampered = bytearray(protected)
        tampered[index] ^= 0x01
        with pytest.raises(SrtpError):
            server.unprotect(bytes(tampered))
    # The untouched packet still authenticates after the failed attempts.
    assert server.unprotect(protected) == rtp(10)


def test_tampered_rtcp(pair: tuple[SrtpSession, SrtpSession]) -> None:
    client, server = pair
    protected = client.protect_rtcp(rtcp_rr())
    for index in (5, 12, len(protected) - 1):
        tampered = bytearray(protected)
        tampered[index] ^= 0x80
        with pytest.raises(SrtpError):
            server.unprotect_rtcp(bytes(tampered))
    assert server.unprotect_rtcp(protected) == rtcp_rr()


def test_replayed_rtp(pair: tuple[SrtpSession, SrtpSession]) -> None:
    client, server = pair
    protected = client.protect(rtp(42))
    server.unprotect(protected)
    with pytest.raises(SrtpError):
        server.unprotect(protected)


def test_replayed_rtcp(pair: tuple[SrtpSession, SrtpSession]) -> None:
    client, server = pair
    protected = client.protect_rtcp(rtcp_rr())
    server.unprotect_rtcp(protected)
    with pytest.raises(SrtpError):
        server.unprotect_rtcp(protected)


def test_retransmission_can_be_protected_again(pair: tuple[SrtpSession, SrtpSession]) -> None:
    """allow_repeat_tx: a NACKed packet is protected a second time with the same seq."""
    client, server = pair
    first = client.protect(rtp(500))
    again = client.protect(rtp(500))
    assert again == first
    assert server.unprotect(again) == rtp(500)


def test_replay_window(pair: tuple[SrtpSession, SrtpSession]) -> None:
    client, server = pair
    late_ok = client.protect(rtp(1000))
    too_late = client.protect(rtp(2000 - REPLAY_WINDOW - 10))
    newest = client.protect(rtp(2000))
    assert server.unprotect(newest) == rtp(2000)
    assert server.unprotect(late_ok) == rtp(1000)  # reordered by 1000 packets: accepted
    with pytest.raises(SrtpError):
        server.unprotect(too_late)


def test_wrong_key(keys: tuple[SrtpKeys, SrtpKeys]) -> None:
    client = SrtpSession(keys[0])
    stranger = SrtpSession(handshake_keys(keys[0].profile)[1])
    with pytest.raises(SrtpError):
        stranger.unprotect(client.protect(rtp(1)))
    with pytest.raises(SrtpError):
        stranger.unprotect_rtcp(client.protect_rtcp(rtcp_rr()))


GARBAGE = [
    b"",
    b"\x80",
    b"\x80\x6f\x00\x01",
    rtp(1)[:12],  # a bare header with no tag
    bytes(64),
    b"\xff" * 3000,  # larger than any datagram
    os.urandom(200),
    os.urandom(1200),
]


@pytest.mark.parametrize("datagram", GARBAGE, ids=[f"g{i}" for i in range(len(GARBAGE))])
def test_garbage_raises_srtp_error(pair: tuple[SrtpSession, SrtpSession], datagram: bytes) -> None:
    _, server = pair
    with pytest.raises(SrtpError):
        server.unprotect(datagram)
    with pytest.raises(SrtpError):
        server.unprotect_rtcp(datagram)


@pytest.mark.parametrize("value", [None, "text", 12345, [1, 2, 3]])
def test_wrong_types_raise_srtp_error(pair: tuple[SrtpSession, SrtpSession], value: object) -> None:
    client, server = pair
    for method in (client.protect, client.protect_rtcp, server.unprotect, server.unprotect_rtcp):
        with pytest.raises(SrtpError):
            method(value)  # type: ignore[operator]


def test_protect_invalid_packets(pair: tuple[SrtpSession, SrtpSession]) -> None:
    client, _ = pair
    with pytest.raises(SrtpError):
        client.protect(b"\x80")  # shorter than an RTP header
    with pytest.raises(SrtpError):
        client.protect(rtp(1, payload=bytes(1500)))  # does not fit pylibsrtp's buffer
    with pytest.raises(SrtpError):
        client.protect_rtcp(b"\x80\xc9")


def test_unsupported_profile() -> None:
    with pytest.raises(SrtpError):
        SrtpSession(SrtpKeys("AES_CM_128_HMAC_SHA1_32", bytes(30), bytes(30)))


def test_short_key() -> None:
    with pytest.raises(SrtpError):
        SrtpSession(SrtpKeys(GCM, bytes(10), bytes(10)))


# --- plain pylibsrtp on the other side -------------------------------------------------------

PLAIN_PROFILES = {
    GCM: pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
    CM: pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
}


def plain_session(profile: str, key: bytes, outbound: bool) -> pylibsrtp.Session:
    policy = pylibsrtp.Policy(
        key=key,
        ssrc_type=(
            pylibsrtp.Policy.SSRC_ANY_OUTBOUND if outbound else pylibsrtp.Policy.SSRC_ANY_INBOUND
        ),
        srtp_profile=PLAIN_PROFILES[profile],
    )
    return pylibsrtp.Session(policy)


def protect_unbounded(session: pylibsrtp.Session, packet: bytes, rtcp: bool = False) -> bytes:
    """Protect with libsrtp in a 4 KiB buffer: packets longer than any SrtpSession takes."""
    buf = ffi.new("unsigned char[]", 4096)
    ffi.memmove(buf, packet, len(packet))
    length = ffi.new("int *", len(packet))
    func = lib.srtp_protect_rtcp if rtcp else lib.srtp_protect
    assert func(session._srtp[0], buf, length) == 0
    return ffi.buffer(buf)[0 : length[0]]


def rtcp_of_size(size: int) -> bytes:
    """A receiver report padded with an APP packet to exactly `size` bytes (a multiple of 4)."""
    rr = rtcp_rr()
    rest = size - len(rr)
    assert rest >= 12 and rest % 4 == 0
    app = struct.pack("!BBHI4s", 0x80, 204, rest // 4 - 1, 0x55667788, b"test")
    return rr + app + bytes(rest - 12)


def test_interop_with_plain_pylibsrtp(keys: tuple[SrtpKeys, SrtpKeys]) -> None:
    profile = keys[0].profile
    ours = SrtpSession(keys[0])
    # What we protect, plain pylibsrtp with the peer's keys unprotects ...
    peer_rx = plain_session(profile, keys[1].remote_key, outbound=False)
    for seq in range(1, 20):
        packet = rtp(seq, payload=os.urandom(seq * 37))
        assert peer_rx.unprotect(ours.protect(packet)) == packet
    assert peer_rx.unprotect_rtcp(ours.protect_rtcp(rtcp_rr())) == rtcp_rr()
    # ... and what plain pylibsrtp protects with the peer's keys, we unprotect.
    peer_tx = plain_session(profile, keys[1].local_key, outbound=True)
    for seq in range(1, 20):
        packet = rtp(seq, ssrc=0xCAFE, payload=os.urandom(seq * 41))
        assert ours.unprotect(peer_tx.protect(packet)) == packet
    assert ours.unprotect_rtcp(peer_tx.protect_rtcp(rtcp_rr(7))) == rtcp_rr(7)


def test_same_bytes_as_plain_pylibsrtp(keys: tuple[SrtpKeys, SrtpKeys]) -> None:
    """Same keys and packets: byte-identical output to pylibsrtp's own wrapper."""
    ours = SrtpSession(keys[0])
    plain = plain_session(keys[0].profile, keys[0].local_key, outbound=True)
    for seq in range(1, 10):
        packet = rtp(seq, payload=os.urandom(1000))
        assert ours.protect(packet) == plain.protect(packet)
        assert ours.protect_rtcp(rtcp_rr(seq)) == plain.protect_rtcp(rtcp_rr(seq))


def test_rtp_size_limit_at_the_boundary(
    pair: tuple[SrtpSession, SrtpSession], keys: tuple[SrtpKeys, SrtpKeys]
) -> None:
    client, server = pair
    assert MAX_RTP == 1500 - 144
    longest = rtp(1, payload=os.urandom(MAX_RTP - 12))
    protected = client.protect(longest)
    assert len(protected) == MAX_RTP + TAG_LEN[keys[0].profile]
    assert server.unprotect(protected) == longest
    with pytest.raises(SrtpError, match="too long"):
        client.protect(rtp(2, payload=os.urandom(MAX_RTP - 11)))
    # The refused packet did not disturb the session.
    assert server.unprotect(client.protect(rtp(3))) == rtp(3)


def test_rtcp_size_limit_at_the_boundary(pair: tuple[SrtpSession, SrtpSession]) -> None:
    client, server = pair
    assert MAX_RTCP == 1500 - 148 and MAX_RTCP % 4 == 0
    longest = rtcp_of_size(MAX_RTCP)
    assert server.unprotect_rtcp(client.protect_rtcp(longest)) == longest
    with pytest.raises(SrtpError, match="too long"):
        client.protect_rtcp(longest + b"\x00")
    with pytest.raises(SrtpError, match="too long"):
        client.protect_rtcp(rtcp_of_size(MAX_RTCP + 4))


def test_unprotect_size_limit_at_the_boundary(keys: tuple[SrtpKeys, SrtpKeys]) -> None:
    """Unprotect takes a whole 1500-byte buffer and refuses one byte more."""
    profile = keys[0].profile
    tag = TAG_LEN[profile]
    ours = SrtpSession(keys[0])
    peer_tx = plain_session(profile, keys[1].local_key, outbound=True)
    assert MAX_SRTP == 1500
    packet = rtp(1, payload=os.urandom(MAX_SRTP - tag - 12))
    protected = protect_unbounded(peer_tx, packet)
    assert len(protected) == MAX_SRTP
    assert ours.unprotect(protected) == packet
    too_long = protect_unbounded(peer_tx, rtp(2, payload=os.urandom(MAX_SRTP - tag - 11)))
    with pytest.raises(SrtpError, match="too long"):
        ours.unprotect(too_long)
    # SRTCP: E flag and index (4 bytes) and the tag follow the compound packet.
    report = rtcp_of_size(MAX_SRTP - 4 - tag - (MAX_SRTP - 4 - tag) % 4)
    protected_rtcp = protect_unbounded(peer_tx, report, rtcp=True)
    assert len(protected_rtcp) <= MAX_SRTP
    assert ours.unprotect_rtcp(protected_rtcp) == report
    with pytest.raises(SrtpError, match="too long"):
        ours.unprotect_rtcp(protected_rtcp + bytes(MAX_SRTP + 1 - len(protected_rtcp)))


def test_results_are_independent_bytes(pair: tuple[SrtpSession, SrtpSession]) -> None:
    """Each result is a new ``bytes``, not a view of the reused work buffer."""
    client, server = pair
    first, second = rtp(1, payload=b"\x01" * 300), rtp(2, payload=b"\x02" * 300)
    p1 = client.protect(first)
    p2 = client.protect(second)
    r1 = client.protect_rtcp(rtcp_rr(1))
    assert type(p1) is bytes and type(p2) is bytes and type(r1) is bytes
    u1 = server.unprotect(p1)
    u2 = server.unprotect(p2)
    assert type(u1) is bytes
    assert (u1, u2) == (first, second)
    assert server.unprotect_rtcp(r1) == rtcp_rr(1)


def test_protect_and_unprotect_use_separate_buffers(pair: tuple[SrtpSession, SrtpSession]) -> None:
    client, server = pair
    assert client._tx_cdata != client._rx_cdata
    # Interleaved directions on one session.
    for seq in range(1, 10):
        out = client.protect(rtp(seq))
        back = client.unprotect(server.protect(rtp(seq, ssrc=9)))
        assert server.unprotect(out) == rtp(seq)
        assert back == rtp(seq, ssrc=9)


def test_memoryview_formats(pair: tuple[SrtpSession, SrtpSession]) -> None:
    client, server = pair
    packet = rtp(5, payload=bytes(range(256)) * 2)
    # A view of 4-byte items counts its bytes, not its items.
    words = memoryview(array.array("I", packet))
    assert words.nbytes == len(packet) and len(words) < len(packet)
    protected = client.protect(words)
    assert server.unprotect(memoryview(protected).cast("H")) == packet
    # A non-contiguous view is copied once.
    spread = bytearray(2 * len(rtp(6)))
    spread[::2] = rtp(6)
    strided = memoryview(spread)[: 2 * len(rtp(6))][::2]
    assert not strided.c_contiguous
    assert server.unprotect(client.protect(strided)) == rtp(6)
    # A slice of a larger buffer (contiguous, offset) works without a copy.
    wide = b"\xff" * 7 + rtp(8) + b"\xee" * 9
    assert server.unprotect(client.protect(memoryview(wide)[7:-9])) == rtp(8)
    released = memoryview(rtp(9))
    released.release()
    with pytest.raises(SrtpError):
        client.protect(released)
    with pytest.raises(SrtpError):
        server.unprotect_rtcp(released)


class _CountingLib:
    """Stands in for pylibsrtp's ``lib`` and records every ``srtp_dealloc``."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.freed: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def srtp_dealloc(self, ctx: Any) -> Any:
        self.freed.append(int(ffi.cast("uintptr_t", ctx)))
        return self.real.srtp_dealloc(ctx)


def test_libsrtp_contexts_live_as_long_as_the_session(
    keys: tuple[SrtpKeys, SrtpKeys], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pins how the session borrows pylibsrtp's contexts: ``Session._srtp`` is an ``srtp_t *``
    freed by pylibsrtp (``ffi.gc`` calling ``lib.srtp_dealloc``) when its Session is collected;
    SrtpSession keeps both Sessions, so each context is freed once, when it goes."""
    gc.collect()  # sessions other tests left behind are freed before counting starts
    counting = _CountingLib(lib)
    monkeypatch.setattr(pylibsrtp, "lib", counting)
    session = SrtpSession(keys[0])
    assert isinstance(session._tx, pylibsrtp.Session)
    assert isinstance(session._rx, pylibsrtp.Session)
    assert ffi.typeof(session._tx._srtp) is ffi.typeof("srtp_t *")
    assert session._tx_ctx == session._tx._srtp[0]
    assert session._rx_ctx == session._rx._srtp[0]

    def address(ctx: Any) -> int:
        return int(ffi.cast("uintptr_t", ctx))

    contexts = sorted(address(c) for c in (session._tx_ctx, session._rx_ctx))
    assert contexts[0] != contexts[1]
    gc.collect()
    assert not set(counting.freed) & set(contexts)
    peer = SrtpSession(keys[1])
    peer_contexts = sorted(address(c) for c in (peer._tx_ctx, peer._rx_ctx))
    assert peer.unprotect(session.protect(rtp(1))) == rtp(1)
    del session
    gc.collect()
    assert sorted(f for f in counting.freed if f in contexts) == contexts
    assert not set(counting.freed) & set(peer_contexts)
    del peer
    gc.collect()
    assert sorted(f for f in counting.freed if f in peer_contexts) == peer_contexts
    assert sorted(f for f in counting.freed if f in contexts) == contexts  # still once each


def test_error_text_is_libsrtps() -> None:
    assert srtp_module._error_text(9) == "replay check failed (bad index)"
    assert srtp_module._error_text(999) == "libsrtp error 999"
