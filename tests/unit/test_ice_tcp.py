"""ICE-TCP, sans sockets: the RFC 4571 codec with bytes, connection addresses, routing of the
packet path's sends, the bounded write buffer, the connection limits, and the candidates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relay.config import MediaSettings
from relay.metrics import Metrics
from relay.rtc.sdp import LocalTransport, _candidate_lines, parse_sdp, tcp_candidate_lines
from relay.tcp import (
    MAX_FRAME,
    FrameDecoder,
    FrameError,
    IceTcpServer,
    MediaSender,
    TcpConnection,
    frame,
)
from tests.unit.harness import Harness

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sdp"


# -- framing ---------------------------------------------------------------------------------


def test_frame_prefixes_the_length() -> None:
    assert frame(b"abc") == b"\x00\x03abc"
    assert frame(bytes(300))[:2] == b"\x01\x2c"
    with pytest.raises(FrameError):
        frame(b"")
    with pytest.raises(FrameError):
        frame(bytes(65536))


def test_several_frames_in_one_read() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(frame(b"one") + frame(b"two") + frame(b"three")) == [
        b"one",
        b"two",
        b"three",
    ]
    assert decoder.pending == 0


def test_frames_split_across_reads_at_every_boundary() -> None:
    packets = [bytes([i]) * (i * 97 + 1) for i in range(1, 6)]
    stream = b"".join(frame(p) for p in packets)
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        got = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert got == packets, cut
        assert decoder.pending == 0


def test_byte_by_byte() -> None:
    decoder = FrameDecoder()
    got: list[bytes] = []
    for byte in frame(b"hello") + frame(b"x"):
        got += decoder.feed(bytes([byte]))
    assert got == [b"hello", b"x"]


def test_a_partial_frame_waits_and_is_bounded() -> None:
    decoder = FrameDecoder()
    data = frame(bytes(MAX_FRAME))
    assert decoder.feed(data[:-1]) == []
    assert decoder.pending == MAX_FRAME + 1
    assert decoder.feed(data[-1:]) == [bytes(MAX_FRAME)]


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00",
        (MAX_FRAME + 1).to_bytes(2, "big"),
        b"\xff\xff" + bytes(10),
        frame(b"ok") + b"\x00\x00",
    ],
)
def test_zero_or_oversized_length_is_an_error(data: bytes) -> None:
    with pytest.raises(FrameError):
        FrameDecoder().feed(data)


def test_the_limit_is_the_decoders() -> None:
    assert FrameDecoder(max_frame=4).feed(frame(b"abcd")) == [b"abcd"]
    with pytest.raises(FrameError):
        FrameDecoder(max_frame=4).feed(frame(b"abcde"))


# -- addresses and routing ---------------------------------------------------------------------


class FakeTransport:
    """A TCP transport whose peer never reads: everything written stays buffered."""

    def __init__(self, peer: tuple[str, int] = ("192.0.2.7", 50000)) -> None:
        self.peer = peer
        self.written: list[bytes] = []
        self.buffered = 0
        self.aborted = False
        self.closed = False

    def get_extra_info(self, name: str) -> Any:
        return self.peer if name == "peername" else None

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self.buffered += len(data)

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True


class FakePort:
    def __init__(self) -> None:
        self.by_addr: dict[Any, Any] = {}
        self.alt_addrs: dict[Any, Any] = {}
        self.received: list[tuple[bytes, Any]] = []
        self.closed: list[Any] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append((data, addr))

    def address_closed(self, addr: Any) -> None:
        self.closed.append(addr)


class Clock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def server(**media: Any) -> tuple[IceTcpServer, FakePort, Clock, Metrics]:
    clock = Clock()
    metrics = Metrics()
    tcp = IceTcpServer(MediaSettings(**media), metrics, clock, idle_timeout=30.0)
    port = FakePort()
    tcp.port = port  # type: ignore[assignment]
    return tcp, port, clock, metrics


def connect(
    tcp: IceTcpServer, peer: tuple[str, int] = ("192.0.2.7", 50000)
) -> tuple[TcpConnection, FakeTransport]:
    conn = tcp.protocol()
    transport = FakeTransport(peer)
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def test_a_connection_address_equals_only_itself() -> None:
    tcp, *_ = server()
    a, _ = connect(tcp)
    b, _ = connect(tcp)
    assert a.addr is not None and b.addr is not None
    host, port = a.addr
    assert (host, port) == ("192.0.2.7", 50000)
    assert a.addr == a.addr
    assert a.addr != b.addr  # a reconnection from the same port is a new latch
    assert a.addr != ("192.0.2.7", 50000)  # never the UDP 5-tuple of the same numbers
    assert ("192.0.2.7", 50000) != a.addr
    table = {("192.0.2.7", 50000): "udp", a.addr: "tcp a", b.addr: "tcp b"}
    assert table[("192.0.2.7", 50000)] == "udp"
    assert table[a.addr] == "tcp a" and table[b.addr] == "tcp b"
    assert repr(a.addr) == "TcpAddress('192.0.2.7', 50000)"


class RecordingUdp:
    def __init__(self) -> None:
        self.batches: list[list[tuple[bytes, Any]]] = []
        self.single: list[tuple[bytes, Any]] = []

    def send(self, batch: list[tuple[bytes, Any]]) -> None:
        self.batches.append(batch)

    def sendto(self, data: bytes, addr: Any) -> None:
        self.single.append((data, addr))


def test_sends_to_a_connection_are_framed_on_it_and_the_rest_go_over_udp() -> None:
    tcp, *_ = server()
    udp = RecordingUdp()
    sender = MediaSender(udp)  # type: ignore[arg-type]
    tcp.sender = sender
    batch = [(b"u1", ("198.51.100.1", 1000)), (b"u2", ("198.51.100.2", 1000))]
    # no TCP connection yet: the UDP sender's own methods, nothing in between
    assert sender.send == udp.send and sender.sendto == udp.sendto
    sender.send(batch)
    assert udp.batches == [batch]
    conn, transport = connect(tcp)
    assert sender.tcp
    sender.send(batch)
    assert udp.batches[-1] is batch  # no TCP address in it: still as it is
    sender.send([batch[0], (b"t1", conn.addr), batch[1]])
    assert udp.batches[-1] == batch
    assert transport.written == [b"\x00\x02t1"]
    sender.sendto(b"t2", conn.addr)
    sender.sendto(b"u3", ("198.51.100.3", 1))
    assert transport.written[-1] == b"\x00\x02t2"
    assert udp.single == [(b"u3", ("198.51.100.3", 1))]
    # a batch of TCP addresses only sends nothing over UDP
    count = len(udp.batches)
    sender.send([(b"t3", conn.addr)])
    assert len(udp.batches) == count


# -- the bounded write buffer ------------------------------------------------------------------


def test_a_reader_that_does_not_read_loses_packets_not_memory() -> None:
    tcp, _, _, metrics = server(tcp_write_buffer_bytes=8192)
    conn, transport = connect(tcp)
    packet = bytes(1000)
    for _ in range(100):
        conn.send(packet)
    assert transport.buffered <= 8192
    assert len(transport.written) == 8  # 8 framed packets of 1002 bytes fit, then none
    assert tcp.dropped == 92 and tcp.dropped_bytes == 92_000
    # once the client reads again, packets go out again
    transport.buffered = 0
    conn.send(packet)
    assert len(transport.written) == 9
    text = metrics.render()
    assert "relay_tcp_dropped_total 92" in text
    assert "relay_tcp_dropped_bytes_total 92000" in text
    assert "relay_tcp_write_buffer_bytes 1002" in text
    assert "relay_tcp_packets_sent_total 9" in text


def test_packets_to_a_closed_connection_are_counted() -> None:
    tcp, port, *_ = server()
    conn, transport = connect(tcp)
    conn.connection_lost(None)
    conn.send(b"late")
    assert transport.written == []
    assert tcp.dropped_closed == 1
    assert port.closed == [conn.addr]
    assert tcp.connections == {}


# -- limits ----------------------------------------------------------------------------------


def test_frames_go_to_the_port_from_the_connections_address() -> None:
    tcp, port, *_ = server()
    conn, _ = connect(tcp)
    conn.data_received(frame(b"\x00\x01stun") + frame(b"\x80rtp")[:3])
    conn.data_received(frame(b"\x80rtp")[3:])
    assert port.received == [(b"\x00\x01stun", conn.addr), (b"\x80rtp", conn.addr)]


def test_a_bad_frame_closes_the_connection() -> None:
    tcp, port, _, metrics = server()
    conn, transport = connect(tcp)
    conn.data_received(b"\x00\x00")
    assert transport.aborted and conn.closed
    assert tcp.closes["bad_frame"] == 1
    assert port.closed == [conn.addr]
    conn.data_received(frame(b"more"))  # nothing after the close
    assert port.received == []
    assert "relay_tcp_closed_bad_frame_total 1" in metrics.render()


def test_connections_beyond_the_limit_are_refused() -> None:
    tcp, *_ = server(tcp_max_connections=2)
    a, _ = connect(tcp)
    b, _ = connect(tcp)
    c, transport = connect(tcp)
    assert transport.aborted and c.closed
    assert tcp.closes["refused"] == 1
    assert list(tcp.connections) == [a, b]
    a.connection_lost(None)
    d, transport = connect(tcp)
    assert not transport.aborted and d in tcp.connections


def test_one_address_cannot_hold_every_slot_with_connections_that_never_check() -> None:
    tcp, port, _clock, metrics = server(tcp_max_connections=10, tcp_max_pending_per_address=3)
    flood = [connect(tcp, ("198.51.100.9", 40000 + i)) for i in range(5)]
    assert [t.aborted for _, t in flood] == [False, False, False, True, True]
    assert tcp.closes["address_limit"] == 2
    assert "relay_tcp_closed_address_limit_total 2" in metrics.render()
    # other clients still get in
    other, other_t = connect(tcp, ("192.0.2.50", 50000))
    assert not other_t.aborted and other in tcp.connections
    # a connection that passed its STUN check frees its address's slot at once
    port.by_addr[flood[0][0].addr] = "leg"
    again, again_t = connect(tcp, ("198.51.100.9", 41000))
    assert not again_t.aborted and flood[0][0].authenticated
    # so does one that closed
    flood[1][0].connection_lost(None)
    last, last_t = connect(tcp, ("198.51.100.9", 41001))
    assert not last_t.aborted
    assert connect(tcp, ("198.51.100.9", 41002))[1].aborted


def test_ipv6_clients_are_limited_by_their_64_bit_prefix() -> None:
    tcp, *_ = server(tcp_max_pending_per_address=2)
    peers = [(f"2001:db8:1:2::{i:x}", 40000) for i in range(1, 4)]
    assert [connect(tcp, p)[1].aborted for p in peers] == [False, False, True]
    assert not connect(tcp, ("2001:db8:1:3::1", 40000))[1].aborted
    # an IPv4 client on the dual-stack socket is one address
    v4 = [("::ffff:198.51.100.9", 40000 + i) for i in range(3)]
    assert [connect(tcp, p)[1].aborted for p in v4] == [False, False, True]
    assert not connect(tcp, ("::ffff:198.51.100.10", 40000))[1].aborted


def test_unauthenticated_connections_time_out_authenticated_ones_stay() -> None:
    tcp, port, clock, _ = server(tcp_handshake_timeout=5.0)
    silent, silent_t = connect(tcp)
    checked, checked_t = connect(tcp)
    clock.now += 1
    port.by_addr[checked.addr] = "leg"  # an authenticated STUN check latched it
    tcp.sweep(clock.now)
    assert checked.authenticated and not silent.authenticated
    clock.now += 4
    checked.data_received(frame(b"\x80media"))
    tcp.sweep(clock.now)
    assert silent_t.aborted and tcp.closes["unauthenticated"] == 1
    assert not checked_t.aborted
    # silence after authenticating: closed after the idle timeout (consent_timeout)
    clock.now += 29.5
    tcp.sweep(clock.now)
    assert not checked_t.aborted
    clock.now += 1
    tcp.sweep(clock.now)
    assert checked_t.aborted and tcp.closes["idle"] == 1
    assert tcp.connections == {}


# -- the latch is the connection ---------------------------------------------------------------


def test_a_leg_latches_to_a_connection_and_forgets_it_when_it_closes() -> None:
    h = Harness()
    h.sfu.tcp_candidates = [("127.0.0.1", 40000)]
    h.sfu.add_participant("r", "alice")
    answer = h.publish("alice", (FIXTURES / "chrome_offer.sdp").read_text())
    tcp, *_ = server()
    tcp.port = h.sfu.port
    conn, _ = connect(tcp, ("127.0.0.1", 40000))  # the same numbers as the UDP candidate
    addr = conn.addr
    assert addr is not None
    leg = h.sfu.get_participant("r", "alice").publisher_leg
    assert leg is not None
    h.connect(leg, addr)
    assert leg.transport.addr is addr
    assert h.sfu.port.by_addr[addr] is leg
    assert ("127.0.0.1", 40000) not in h.sfu.port.by_addr
    conn.connection_lost(None)
    assert addr not in h.sfu.port.by_addr
    assert "tcptype passive" in answer


# -- candidates ------------------------------------------------------------------------------


def test_tcp_candidates_come_after_udp_with_lower_priorities() -> None:
    local = LocalTransport(
        "ufrag",
        "pwd",
        ("sha-256", "AA"),
        [("10.0.0.1", 40000), ("192.168.1.2", 40000)],
        "passive",
        1,
        1,
        tcp_candidates=[("10.0.0.1", 40000), ("192.168.1.2", 40000)],
    )
    lines = _candidate_lines(local)
    assert lines[-1] == "a=end-of-candidates"
    fields = [line[len("a=candidate:") :].split() for line in lines[:-1]]
    assert [f[2] for f in fields] == ["udp", "udp", "tcp", "tcp"]
    assert [f[0] for f in fields] == ["1", "2", "3", "4"]  # distinct foundations
    assert fields[2][4:] == ["10.0.0.1", "40000", "typ", "host", "tcptype", "passive"]
    priorities = [int(f[3]) for f in fields]
    assert priorities == sorted(priorities, reverse=True)
    assert len(set(priorities)) == 4
    tcp = priorities[2]
    assert tcp >> 24 == 90  # type preference below UDP host (126)
    assert (tcp >> 8) & 0xFFFF == (4 << 13) + 8191  # direction-pref 4 (passive), other 8191
    assert tcp & 0xFF == 255  # component 1


def test_tcp_only_answer_has_only_tcp_candidates() -> None:
    h = Harness()
    h.sfu.candidates = []
    h.sfu.tcp_candidates = [("10.200.0.1", 40000)]
    h.sfu.add_participant("r", "alice")
    answer = h.publish("alice", (FIXTURES / "chrome_offer.sdp").read_text())
    desc = parse_sdp(answer)
    candidates = [c for m in desc.media for c in m.candidates]
    assert candidates and all(" tcp " in c and "tcptype passive" in c for c in candidates)
    assert tcp_candidate_lines([("10.200.0.1", 40000)])[0] in {
        f"a=candidate:{c}" for c in candidates
    }


def test_an_ice_restart_fragment_carries_the_tcp_candidates_after_the_udp_ones() -> None:
    """A WHIP/WHEP ICE restart answers with every candidate of the relay: on a TCP-only relay
    the TCP ones are all a client can reach."""
    from relay.rtc.sdp import ice_candidate_lines

    lines = ice_candidate_lines([("192.0.2.1", 40000)], [("192.0.2.1", 40000)])
    assert [line.split()[2] for line in lines[:-1]] == ["udp", "tcp"]
    assert lines[1].endswith("typ host tcptype passive") and lines[-1] == "a=end-of-candidates"
    assert ice_candidate_lines([], [("192.0.2.1", 40000)])[0].split()[2] == "tcp"
