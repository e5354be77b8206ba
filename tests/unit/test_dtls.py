"""Unit tests for the sans-I/O DTLS endpoint: datagrams are shuttled in memory."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from cryptography.hazmat.primitives import hashes

from relay.rtc.dtls import (
    Certificate,
    DtlsEndpoint,
    DtlsError,
    DtlsState,
    SrtpKeys,
)

GCM = "AEAD_AES_128_GCM"
CM = "AES_CM_128_HMAC_SHA1_80"


@pytest.fixture(scope="module")
def certs() -> dict[str, list[Certificate]]:
    """Two certificates of each kind (RSA generation is slow, so share them)."""
    return {
        kind: [Certificate.generate(kind), Certificate.generate(kind)] for kind in ("ecdsa", "rsa")
    }


def make_pair(
    client_cert: Certificate,
    server_cert: Certificate,
    client_profiles: list[str] | None = None,
    server_profiles: list[str] | None = None,
    mtu: int = 1200,
) -> tuple[DtlsEndpoint, DtlsEndpoint]:
    kwargs_c = {"srtp_profiles": client_profiles} if client_profiles else {}
    kwargs_s = {"srtp_profiles": server_profiles} if server_profiles else {}
    client = DtlsEndpoint(client_cert, False, server_cert.fingerprints(), mtu=mtu, **kwargs_c)
    server = DtlsEndpoint(server_cert, True, client_cert.fingerprints(), mtu=mtu, **kwargs_s)
    return client, server


def deliver(datagrams: list[bytes], endpoint: DtlsEndpoint, now: float) -> list[bytes]:
    out: list[bytes] = []
    for datagram in datagrams:
        out.extend(endpoint.receive(datagram, now))
    return out


def run_handshake(client: DtlsEndpoint, server: DtlsEndpoint, now: float = 100.0) -> list[bytes]:
    """Run a lossless handshake; return every datagram sent (both directions)."""
    assert server.start(now) == []
    to_server = client.start(now)
    sent = list(to_server)
    for _ in range(10):
        to_client = deliver(to_server, server, now)
        to_server = deliver(to_client, client, now)
        sent += to_client + to_server
        if not to_client and not to_server:
            break
    return sent


def split_records(datagram: bytes) -> list[bytes]:
    records, pos = [], 0
    while pos < len(datagram):
        length = int.from_bytes(datagram[pos + 11 : pos + 13], "big")
        records.append(datagram[pos : pos + 13 + length])
        pos += 13 + length
    assert pos == len(datagram), "datagram ends in the middle of a record"
    return records


def assert_keys_match(a: DtlsEndpoint, b: DtlsEndpoint, profile: str) -> None:
    assert a.state is DtlsState.CONNECTED and b.state is DtlsState.CONNECTED
    assert isinstance(a.srtp_keys, SrtpKeys) and isinstance(b.srtp_keys, SrtpKeys)
    assert a.srtp_keys.profile == b.srtp_keys.profile == profile
    assert a.srtp_keys.local_key == b.srtp_keys.remote_key
    assert a.srtp_keys.remote_key == b.srtp_keys.local_key
    assert a.srtp_keys.local_key != a.srtp_keys.remote_key
    length = 16 + (12 if profile == GCM else 14)
    assert len(a.srtp_keys.local_key) == len(a.srtp_keys.remote_key) == length
    assert a.failure_reason is None and b.failure_reason is None
    assert a.next_timeout() is None and b.next_timeout() is None


def wait_and_handle_timeout(endpoint: DtlsEndpoint, now: float) -> tuple[list[bytes], float]:
    """Advance `now` to the endpoint's timer and call handle_timeout until it retransmits.

    OpenSSL only retransmits once its own (real) clock agrees that the timer expired, so
    this sleeps in small steps, at most a couple of seconds.
    """
    limit = time.monotonic() + 5.0
    while True:
        deadline = endpoint.next_timeout()
        assert deadline is not None
        now = max(now, deadline)
        out = endpoint.handle_timeout(now)
        if out or endpoint.state is not DtlsState.CONNECTING:
            return out, now
        assert time.monotonic() < limit, "OpenSSL never retransmitted"
        time.sleep(0.02)


# --------------------------------------------------------------------------- certificates


@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
def test_certificate_generate(kind: str) -> None:
    cert = Certificate.generate(kind)
    assert cert.algorithm == "sha-256"
    parts = cert.fingerprint.split(":")
    assert len(parts) == 32 and all(len(p) == 2 for p in parts)
    assert cert.fingerprint == cert.fingerprint.upper()
    expected = cert.certificate.fingerprint(hashes.SHA256()).hex(":").upper()
    assert cert.fingerprint == expected
    assert cert.fingerprints() == [("sha-256", cert.fingerprint)]
    assert Certificate.generate(kind).fingerprint != cert.fingerprint


def test_certificate_unknown_kind() -> None:
    with pytest.raises(DtlsError):
        Certificate.generate("dsa")


def test_bad_configuration(certs: dict[str, list[Certificate]]) -> None:
    cert = certs["ecdsa"][0]
    with pytest.raises(DtlsError):
        DtlsEndpoint(cert, True, [], srtp_profiles=["AES_CM_128_HMAC_SHA1_32"])
    with pytest.raises(DtlsError):
        DtlsEndpoint(cert, True, [], srtp_profiles=[])
    with pytest.raises(DtlsError):
        DtlsEndpoint(cert, True, [], mtu=100)


# --------------------------------------------------------------------------- handshake


@pytest.mark.parametrize("a_is_server", [False, True], ids=["a-client", "a-server"])
@pytest.mark.parametrize("kind_a", ["ecdsa", "rsa"])
@pytest.mark.parametrize("kind_b", ["ecdsa", "rsa"])
def test_handshake(
    certs: dict[str, list[Certificate]], a_is_server: bool, kind_a: str, kind_b: str
) -> None:
    cert_a, cert_b = certs[kind_a][0], certs[kind_b][1]
    a = DtlsEndpoint(cert_a, a_is_server, cert_b.fingerprints())
    b = DtlsEndpoint(cert_b, not a_is_server, cert_a.fingerprints())
    assert a.state is DtlsState.NEW and a.srtp_keys is None
    client, server = (b, a) if a_is_server else (a, b)

    sent = run_handshake(client, server)

    assert_keys_match(a, b, GCM)
    for datagram in sent:
        assert 0 < len(datagram) <= 1200
        assert 20 <= datagram[0] <= 63
        split_records(datagram)


def test_client_start_sends_client_hello_and_server_start_sends_nothing(
    certs: dict[str, list[Certificate]],
) -> None:
    client, server = make_pair(certs["ecdsa"][0], certs["ecdsa"][1])
    assert server.start(5.0) == []
    assert server.state is DtlsState.CONNECTING
    assert server.next_timeout() is None  # no timer until the peer shows up
    hello = client.start(5.0)
    assert client.state is DtlsState.CONNECTING
    assert len(hello) == 1 and hello[0][0] == 22  # handshake record
    deadline = client.next_timeout()
    assert deadline is not None and 5.0 < deadline <= 6.0  # OpenSSL's first timer: 1 s
    assert client.start(6.0) == []  # second start is a no-op


def test_server_receive_without_start(certs: dict[str, list[Certificate]]) -> None:
    client, server = make_pair(certs["ecdsa"][0], certs["ecdsa"][1])
    to_client = deliver(client.start(0.0), server, 0.0)  # server.start() never called
    assert to_client and server.state is DtlsState.CONNECTING
    to_server = deliver(to_client, client, 0.0)
    deliver(deliver(to_server, server, 0.0), client, 0.0)
    assert_keys_match(client, server, GCM)


@pytest.mark.parametrize(
    ("client_profiles", "server_profiles", "expected"),
    [
        ([CM], None, CM),
        (None, [CM], CM),
        ([CM, GCM], [GCM, CM], GCM),  # the server's preference decides
        ([GCM, CM], [CM, GCM], CM),
        ([GCM], [GCM], GCM),
    ],
)
def test_srtp_profile_negotiation(
    certs: dict[str, list[Certificate]],
    client_profiles: list[str] | None,
    server_profiles: list[str] | None,
    expected: str,
) -> None:
    client, server = make_pair(certs["ecdsa"][0], certs["rsa"][0], client_profiles, server_profiles)
    run_handshake(client, server)
    assert_keys_match(client, server, expected)


def test_no_common_srtp_profile(certs: dict[str, list[Certificate]]) -> None:
    client, server = make_pair(certs["ecdsa"][0], certs["ecdsa"][1], [GCM], [CM])
    run_handshake(client, server)
    for endpoint in (client, server):
        assert endpoint.state is DtlsState.FAILED
        assert endpoint.srtp_keys is None
        assert endpoint.failure_reason is not None and "SRTP" in endpoint.failure_reason


@pytest.mark.parametrize("wrong_side", ["client", "server"])
def test_fingerprint_mismatch(certs: dict[str, list[Certificate]], wrong_side: str) -> None:
    c_cert, s_cert, other = certs["ecdsa"][0], certs["rsa"][0], certs["ecdsa"][1]
    client = DtlsEndpoint(
        c_cert, False, (other if wrong_side == "client" else s_cert).fingerprints()
    )
    server = DtlsEndpoint(
        s_cert, True, (other if wrong_side == "server" else c_cert).fingerprints()
    )
    run_handshake(client, server)

    checker = client if wrong_side == "client" else server
    peer = server if wrong_side == "client" else client
    assert checker.state is DtlsState.FAILED
    assert checker.failure_reason is not None and "fingerprint" in checker.failure_reason
    assert checker.srtp_keys is None
    # The rejecting side sends a fatal alert, so the peer fails too, without keys.
    assert peer.state is DtlsState.FAILED
    assert peer.srtp_keys is None
    assert checker.next_timeout() is None and peer.next_timeout() is None


def test_fingerprint_other_algorithms_and_case(certs: dict[str, list[Certificate]]) -> None:
    c_cert, s_cert = certs["ecdsa"][0], certs["ecdsa"][1]
    sha1 = s_cert.certificate.fingerprint(hashes.SHA1()).hex(":").lower()
    sha512 = c_cert.certificate.fingerprint(hashes.SHA512()).hex(":").upper()
    client = DtlsEndpoint(c_cert, False, [("SHA-1", sha1)])
    server = DtlsEndpoint(s_cert, True, [("sha-512", sha512), ("md5", "00:11")])
    run_handshake(client, server)
    assert_keys_match(client, server, GCM)


def test_fingerprint_strongest_algorithm_must_match(certs: dict[str, list[Certificate]]) -> None:
    c_cert, s_cert = certs["ecdsa"][0], certs["ecdsa"][1]
    wrong_sha512 = certs["rsa"][0].certificate.fingerprint(hashes.SHA512()).hex(":")
    client = DtlsEndpoint(c_cert, False, s_cert.fingerprints() + [("sha-512", wrong_sha512)])
    server = DtlsEndpoint(s_cert, True, c_cert.fingerprints())
    run_handshake(client, server)
    assert client.state is DtlsState.FAILED and "fingerprint" in (client.failure_reason or "")


def test_no_usable_fingerprint(certs: dict[str, list[Certificate]]) -> None:
    c_cert, s_cert = certs["ecdsa"][0], certs["ecdsa"][1]
    client = DtlsEndpoint(c_cert, False, [("md5", "00:11:22")])
    server = DtlsEndpoint(s_cert, True, c_cert.fingerprints())
    run_handshake(client, server)
    assert client.state is DtlsState.FAILED and client.srtp_keys is None
    assert "fingerprint" in (client.failure_reason or "")


@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
def test_small_mtu(certs: dict[str, list[Certificate]], kind: str) -> None:
    client, server = make_pair(certs[kind][0], certs[kind][1], mtu=300)
    sent = run_handshake(client, server)
    assert_keys_match(client, server, GCM)
    assert max(len(d) for d in sent) <= 300
    for datagram in sent:
        split_records(datagram)


def test_records_are_coalesced_up_to_the_mtu(certs: dict[str, list[Certificate]]) -> None:
    client, server = make_pair(certs["ecdsa"][0], certs["ecdsa"][1])
    flight = deliver(client.start(0.0), server, 0.0)
    # ServerHello, Certificate, ServerKeyExchange, CertificateRequest, ServerHelloDone
    assert len(flight) == 1
    assert len(split_records(flight[0])) == 5


# --------------------------------------------------------------------------- timers


def test_retransmission_after_lost_server_flight(certs: dict[str, list[Certificate]]) -> None:
    client, server = make_pair(certs["ecdsa"][0], certs["rsa"][0])
    now = 1000.0
    server.start(now)
    hello = client.start(now)
    lost = deliver(hello, server, now)  # the server's first flight is dropped
    assert lost
    assert client.handle_timeout(now) == []  # timer not due yet
    first_deadline = client.next_timeout()
    assert first_deadline is not None and now < first_deadline <= now + 1.0

    resent, now = wait_and_handle_timeout(client, now)
    assert resent and all(d[0] == 22 for d in resent)  # ClientHello again
    second_deadline = client.next_timeout()
    assert second_deadline is not None and second_deadline - now > 1.5  # backoff doubled

    # The server's own timer resends its flight; OpenSSL also checks that timer whenever
    # it reads, so the resend may already come out of receive().
    flight = deliver(resent, server, now)
    if not flight:
        flight, now = wait_and_handle_timeout(server, now)
    assert [len(d) for d in flight] == [len(d) for d in lost]

    to_server = deliver(flight, client, now)
    to_client = deliver(to_server, server, now)
    deliver(to_client, client, now)
    assert_keys_match(client, server, GCM)


def test_retransmission_of_final_flight(certs: dict[str, list[Certificate]]) -> None:
    """The server's last flight is lost: the client resends, the connected server answers."""
    client, server = make_pair(certs["ecdsa"][0], certs["ecdsa"][1])
    now = 50.0
    server.start(now)
    to_client = deliver(client.start(now), server, now)
    to_server = deliver(to_client, client, now)
    lost = deliver(to_server, server, now)
    assert lost and server.state is DtlsState.CONNECTED
    assert client.state is DtlsState.CONNECTING

    resent, now = wait_and_handle_timeout(client, now)
    answer = deliver(resent, server, now)
    assert answer and server.state is DtlsState.CONNECTED
    deliver(answer, client, now)
    assert_keys_match(client, server, GCM)


def test_handshake_deadline(certs: dict[str, list[Certificate]]) -> None:
    client, server = make_pair(certs["ecdsa"][0], certs["ecdsa"][1])
    client.start(10.0)
    deadline = client.next_timeout()
    assert deadline is not None and deadline <= 40.0
    client.handle_timeout(39.9)
    assert client.state is DtlsState.CONNECTING
    assert client.handle_timeout(40.0) == []
    assert client.state is DtlsState.FAILED
    assert "timed out" in (client.failure_reason or "")
    assert client.next_timeout() is None
    assert client.handle_timeout(100.0) == []


def test_server_deadline_starts_with_first_datagram(certs: dict[str, list[Certificate]]) -> None:
    client, server = make_pair(certs["ecdsa"][0], certs["ecdsa"][1])
    server.start(0.0)
    assert server.next_timeout() is None
    deliver(client.start(500.0), server, 500.0)
    deadline = server.next_timeout()
    assert deadline is not None and 500.0 < deadline <= 530.0
    server.handle_timeout(530.0)
    assert server.state is DtlsState.FAILED


def test_custom_handshake_timeout(certs: dict[str, list[Certificate]]) -> None:
    cert = certs["ecdsa"][0]
    client = DtlsEndpoint(cert, False, cert.fingerprints(), handshake_timeout=0.5)
    client.start(0.0)
    assert client.next_timeout() == 0.5
    client.handle_timeout(0.5)
    assert client.state is DtlsState.FAILED


# --------------------------------------------------------------------------- robustness

GARBAGE = [
    b"",
    b"\x00",
    b"\x16",
    b"\x16\xfe\xfd",
    b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12),  # STUN-looking
    b"\x80\x60" + bytes(30),  # RTP-looking
    b"\x17\xfe\xfd" + bytes(10),  # DTLS header, truncated
    b"\x16\xfe\xfd\x00\x00" + bytes(6) + b"\x00\x40" + bytes(10),  # length beyond the end
    b"\x15\xfe\xfd\x00\x00" + bytes(6) + b"\x00\x02\x02\x28",  # unsolicited fatal alert
]


def _random_garbage(count: int) -> list[bytes]:
    return [os.urandom(n) for n in (1, 5, 13, 64, 300, 1500)][:count]


def test_non_dtls_garbage_is_ignored_during_handshake(
    certs: dict[str, list[Certificate]],
) -> None:
    client, server = make_pair(certs["ecdsa"][0], certs["ecdsa"][1])
    junk = [b"", b"\x00", b"\x80" * 40, b"\xff" * 1500, b"\x40" * 13]
    for datagram in junk:
        assert server.receive(datagram, 0.0) == []  # NEW server
    assert server.state is DtlsState.NEW
    server.start(0.0)
    hello = client.start(0.0)
    for datagram in junk:
        assert client.receive(datagram, 0.0) == []
        assert server.receive(datagram, 0.0) == []
    to_client = deliver(hello, server, 0.0)
    for datagram in junk:
        assert client.receive(datagram, 0.0) == []
    to_server = deliver(to_client, client, 0.0)
    deliver(deliver(to_server, server, 0.0), client, 0.0)
    assert_keys_match(client, server, GCM)


@pytest.mark.parametrize("datagram", GARBAGE + _random_garbage(6))
def test_garbage_never_raises(certs: dict[str, list[Certificate]], datagram: bytes) -> None:
    client, server = make_pair(certs["ecdsa"][0], certs["ecdsa"][1])
    # In every state: NEW, CONNECTING, CONNECTED, CLOSED.
    assert isinstance(client.receive(datagram, 0.0), list)
    fresh_server = DtlsEndpoint(certs["ecdsa"][1], True, certs["ecdsa"][0].fingerprints())
    assert isinstance(fresh_server.receive(datagram, 0.0), list)
    client.start(0.0)
    assert isinstance(client.receive(datagram, 0.0), list)
    assert isinstance(fresh_server.handle_timeout(1000.0), list)

    client, server = make_pair(certs["ecdsa"][0], certs["ecdsa"][1])
    run_handshake(client, server)
    assert isinstance(client.receive(datagram, 1.0), list)
    assert isinstance(server.receive(datagram, 1.0), list)
    # After the handshake, unauthenticated records are dropped by the record layer.
    assert client.state is DtlsState.CONNECTED and server.state is DtlsState.CONNECTED
    client.close()
    assert client.receive(datagram, 2.0) == []


def test_tampered_records_after_handshake_are_dropped(
    certs: dict[str, list[Certificate]],
) -> None:
    client, server = make_pair(certs["ecdsa"][0], certs["ecdsa"][1])
    sent = run_handshake(client, server)
    for datagram in sent:
        for record in split_records(datagram):
            corrupted = bytearray(record)
            corrupted[-1] ^= 0xFF
            assert isinstance(server.receive(bytes(corrupted), 5.0), list)
            assert isinstance(client.receive(bytes(corrupted), 5.0), list)
            assert isinstance(client.receive(record, 5.0), list)  # plain replay
    assert client.state is DtlsState.CONNECTED and server.state is DtlsState.CONNECTED


# --------------------------------------------------------------------------- close


@pytest.mark.parametrize("closer", ["client", "server"])
def test_close(certs: dict[str, list[Certificate]], closer: str) -> None:
    client, server = make_pair(certs["ecdsa"][0], certs["rsa"][0])
    run_handshake(client, server)
    a, b = (client, server) if closer == "client" else (server, client)

    notify = a.close()
    assert notify and a.state is DtlsState.CLOSED
    assert a.srtp_keys is not None  # keys stay readable after a clean close
    reply = deliver(notify, b, 3.0)
    assert b.state is DtlsState.CLOSED
    assert reply  # the peer answers with its own close_notify
    assert deliver(reply, a, 3.0) == []
    assert a.state is DtlsState.CLOSED
    assert a.close() == [] and b.close() == []
    assert a.next_timeout() is None and b.next_timeout() is None


def test_close_before_connected(certs: dict[str, list[Certificate]]) -> None:
    client, server = make_pair(certs["ecdsa"][0], certs["ecdsa"][1])
    assert server.close() == []
    assert server.state is DtlsState.CLOSED
    client.start(0.0)
    assert client.close() == []
    assert client.state is DtlsState.CLOSED
    assert client.next_timeout() is None
    assert client.handle_timeout(100.0) == []


def test_close_keeps_failed_state(certs: dict[str, list[Certificate]]) -> None:
    client, _ = make_pair(certs["ecdsa"][0], certs["ecdsa"][1])
    client.start(0.0)
    client.handle_timeout(1000.0)
    assert client.state is DtlsState.FAILED
    assert client.close() == []
    assert client.state is DtlsState.FAILED


# --------------------------------------------------------------------------- aiortc


class _FakeIceTransport:
    """The two methods of aiortc's RTCIceTransport that RTCDtlsTransport uses."""

    def __init__(self) -> None:
        self.role = "controlled"
        self.outbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()

    async def _send(self, data: bytes) -> None:
        self.outbox.put_nowait(data)

    async def _recv(self) -> bytes:
        return await self.inbox.get()


@pytest.mark.parametrize("relay_is_server", [True, False], ids=["relay-server", "relay-client"])
@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
async def test_interop_with_aiortc(
    certs: dict[str, list[Certificate]], relay_is_server: bool, kind: str
) -> None:
    aiortc_dtls = pytest.importorskip("aiortc.rtcdtlstransport")
    from relay.rtc.srtp import SrtpSession

    if kind == "rsa" and relay_is_server:
        pytest.skip("aiortc only offers ECDSA cipher suites, so an RSA server cannot serve it")

    ours = certs[kind][0]
    theirs = aiortc_dtls.RTCCertificate.generateCertificate()
    ice = _FakeIceTransport()
    peer = aiortc_dtls.RTCDtlsTransport(ice, [theirs])  # type: ignore[arg-type]
    peer._set_role("client" if relay_is_server else "server")
    fingerprints = [(f.algorithm, f.value) for f in theirs.getFingerprints()]
    relay = DtlsEndpoint(ours, relay_is_server, fingerprints)

    loop = asyncio.get_running_loop()
    params = aiortc_dtls.RTCDtlsParameters(
        fingerprints=[aiortc_dtls.RTCDtlsFingerprint("sha-256", ours.fingerprint)]
    )
    task = asyncio.ensure_future(peer.start(params))
    for datagram in relay.start(loop.time()):
        ice.inbox.put_nowait(datagram)

    async def pump_until(condition: object) -> None:
        end = loop.time() + 10.0
        while not condition():  # type: ignore[operator]
            assert loop.time() < end, "aiortc handshake did not finish"
            try:
                datagram = await asyncio.wait_for(ice.outbox.get(), 0.05)
            except TimeoutError:
                for reply in relay.handle_timeout(loop.time()):
                    ice.inbox.put_nowait(reply)
                continue
            for reply in relay.receive(datagram, loop.time()):
                ice.inbox.put_nowait(reply)

    await pump_until(lambda: task.done() and relay.state is not DtlsState.CONNECTING)
    await task
    assert peer.state == "connected"
    assert relay.state is DtlsState.CONNECTED
    assert relay.srtp_keys is not None and relay.srtp_keys.profile == GCM

    # Media both ways with aiortc's own SRTP sessions.
    session = SrtpSession(relay.srtp_keys)
    rtp = bytes.fromhex("80e0000100000064deadbeef") + b"payload"
    assert session.unprotect(peer._tx_srtp.protect(rtp)) == rtp
    assert peer._rx_srtp.unprotect(session.protect(rtp)) == rtp

    # aiortc's close_notify closes our endpoint.
    await peer.stop()
    await pump_until(lambda: relay.state is not DtlsState.CONNECTED)
    assert relay.state is DtlsState.CLOSED
