"""ICE-lite STUN handling, with bytes: parsing, integrity, fingerprint, responses, latching."""

from __future__ import annotations

import struct

import pytest
from aioice import stun

from relay.rtc.dtls import Certificate
from relay.rtc.ice import (
    IceCredentials,
    StunError,
    binding_error,
    binding_success,
    parse_binding_request,
)
from relay.rtc.transport import TransportState, WebRtcTransport

RELAY = IceCredentials("relayufrag", "relaypassword0123456789")


def request(
    username: str = "relayufrag:clientufrag",
    pwd: str = RELAY.pwd,
    use_candidate: bool = False,
    integrity: bool = True,
) -> bytes:
    msg = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    msg.attributes["USERNAME"] = username
    msg.attributes["PRIORITY"] = 1853824767
    msg.attributes["ICE-CONTROLLING"] = 0x1234
    if use_candidate:
        msg.attributes["USE-CANDIDATE"] = None
    if integrity:
        msg.add_message_integrity(pwd.encode())
    else:
        msg.add_fingerprint()
    return bytes(msg)


def test_parse_valid_request() -> None:
    req = parse_binding_request(request(use_candidate=True))
    assert req.local_ufrag == "relayufrag" and req.remote_ufrag == "clientufrag"
    assert req.use_candidate and req.controlling and req.priority == 1853824767
    assert req.authenticate(RELAY.pwd)
    assert not req.authenticate("another password entirely")


def test_success_response_bytes() -> None:
    data = request()
    req = parse_binding_request(data)
    out = binding_success(req, ("192.0.2.7", 50000), RELAY.pwd)
    # header: Binding success response, magic cookie, same transaction id
    msg_type, length, cookie = struct.unpack("!HHI", out[:8])
    assert msg_type == 0x0101 and cookie == 0x2112A442 and length == len(out) - 20
    assert out[8:20] == data[8:20]
    parsed = stun.parse_message(out)  # verifies FINGERPRINT
    assert parsed.attributes["XOR-MAPPED-ADDRESS"] == ("192.0.2.7", 50000)
    assert parsed.check_message_integrity(RELAY.pwd.encode())
    # FINGERPRINT is the last attribute, MESSAGE-INTEGRITY right before it
    assert out[-8:-6] == b"\x80\x28" and out[-32:-30] == b"\x00\x08"


def test_error_response() -> None:
    req = parse_binding_request(request())
    parsed = stun.parse_message(binding_error(req, 401, "Unauthorized"))
    assert parsed.message_class == stun.Class.ERROR
    assert parsed.attributes["ERROR-CODE"] == (401, "Unauthorized")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x01",
        request()[:-3],  # truncated
        request()[:-1] + bytes([request()[-1] ^ 1]),  # bad fingerprint
        request(username="nocolon"),
        request(username=":x"),
        request(integrity=False),
        bytes(stun.Message(stun.Method.BINDING, stun.Class.RESPONSE)),
        bytes(stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST)),
    ],
)
def test_malformed_requests_raise_stun_error(data: bytes) -> None:
    with pytest.raises(StunError):
        parse_binding_request(data)


def test_random_bytes_only_raise_stun_error() -> None:
    import random

    rnd = random.Random(7)
    valid = request(use_candidate=True)
    for _ in range(3000):
        data = bytearray(valid)
        for _ in range(rnd.randint(1, 6)):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        try:
            parse_binding_request(bytes(data))
        except StunError:
            pass


def _transport() -> WebRtcTransport:
    t = WebRtcTransport(Certificate.generate(), ["AEAD_AES_128_GCM"])
    t.local = RELAY
    return t


def test_transport_latches_and_follows_nominated_address() -> None:
    t = _transport()
    t.set_remote("clientufrag", "clientpassword", [("sha-256", "00")], dtls_server=True)
    resp, ok, changed, out = t.handle_binding(
        parse_binding_request(request()), ("10.0.0.1", 1), 1.0
    )
    assert ok and changed and t.addr == ("10.0.0.1", 1)
    assert t.state is TransportState.CONNECTING and out == []  # DTLS server waits for a hello
    # a check from another address without USE-CANDIDATE does not move the latch
    _, ok, changed, _ = t.handle_binding(parse_binding_request(request()), ("10.0.0.1", 2), 2.0)
    assert ok and not changed and t.addr == ("10.0.0.1", 1)
    # a nominating check from a new address (NAT rebinding) does
    req = parse_binding_request(request(use_candidate=True))
    _, ok, changed, _ = t.handle_binding(req, ("10.0.0.9", 3), 3.0)
    assert ok and changed and t.addr == ("10.0.0.9", 3) and t.nominated


def test_transport_rejects_wrong_password_and_wrong_remote_ufrag() -> None:
    t = _transport()
    t.set_remote("clientufrag", "clientpassword", [("sha-256", "00")], dtls_server=True)
    resp, ok, changed, _ = t.handle_binding(
        parse_binding_request(request(pwd="wrong-password-000000")), ("10.0.0.1", 1), 1.0
    )
    assert not ok and not changed and t.addr is None
    assert stun.parse_message(resp).attributes["ERROR-CODE"][0] == 401
    _, ok, _, _ = t.handle_binding(
        parse_binding_request(request(username="relayufrag:intruder")), ("10.0.0.1", 1), 1.0
    )
    assert not ok and t.addr is None


def test_transport_as_dtls_client_sends_hello_after_first_check() -> None:
    t = _transport()
    t.set_remote("clientufrag", "clientpassword", [("sha-256", "00")], dtls_server=False)
    _, ok, _, out = t.handle_binding(parse_binding_request(request()), ("10.0.0.1", 1), 1.0)
    assert ok and len(out) >= 1 and out[0][0] == 22  # a DTLS handshake record (ClientHello)


def _nominate(t: WebRtcTransport, addr: tuple[str, int], priority: int, now: float) -> bool:
    msg = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    msg.attributes["USERNAME"] = "relayufrag:clientufrag"
    msg.attributes["PRIORITY"] = priority
    msg.attributes["ICE-CONTROLLING"] = 1
    msg.attributes["USE-CANDIDATE"] = None
    msg.add_message_integrity(RELAY.pwd.encode())
    _, ok, changed, _ = t.handle_binding(parse_binding_request(bytes(msg)), addr, now)
    assert ok
    return changed


def test_burst_of_nominations_keeps_the_highest_priority_pair() -> None:
    t = _transport()
    t.set_remote("clientufrag", "clientpassword", [("sha-256", "00")], dtls_server=True)
    assert _nominate(t, ("10.0.0.1", 1), 2000, 1.0)
    # a lower-priority pair nominated right after does not take the latch ...
    assert not _nominate(t, ("10.0.0.2", 2), 1000, 1.01)
    assert t.addr == ("10.0.0.1", 1)
    # ... a higher-priority one does, and the displaced address is kept for the router
    assert _nominate(t, ("10.0.0.3", 3), 3000, 1.02)
    assert t.addr == ("10.0.0.3", 3) and t.displaced == ("10.0.0.1", 1)
