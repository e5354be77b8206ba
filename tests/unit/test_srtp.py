"""Unit tests for SrtpSession, keyed by real DTLS-SRTP handshakes."""

from __future__ import annotations

import os
import struct

import pytest

from relay.rtc.dtls import Certificate, DtlsEndpoint, DtlsState, SrtpKeys
from relay.rtc.srtp import REPLAY_WINDOW, SrtpError, SrtpSession

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
