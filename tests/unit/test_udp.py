"""Unit tests for BatchSender (relay/udp.py) with real sockets on the loopback interface."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from relay import udp
from relay.udp import MAX_BATCH, BatchSender

requires_sendmmsg = pytest.mark.skipif(
    udp.sendmmsg_unavailable is not None, reason=f"{udp.sendmmsg_unavailable}"
)


def _bind(family: int, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((host, 0))
    sock.settimeout(2.0)
    return sock


def _has_ipv6() -> bool:
    try:
        _bind(socket.AF_INET6, "::1").close()
    except OSError:
        return False
    return True


requires_ipv6 = pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback")


@pytest.fixture
def sender_sock() -> Iterator[socket.socket]:
    sock = _bind(socket.AF_INET, "127.0.0.1")
    sock.setblocking(False)
    yield sock
    sock.close()


@pytest.fixture
def receivers() -> Iterator[list[socket.socket]]:
    socks = [_bind(socket.AF_INET, "127.0.0.1") for _ in range(3)]
    yield socks
    for sock in socks:
        sock.close()


def make_batch(receivers: list[socket.socket], n: int) -> list[tuple[bytes, Any]]:
    """``n`` distinct datagrams, round robin over the receivers."""
    batch = []
    for i in range(n):
        data = i.to_bytes(4, "big") + os.urandom(20 + i % 300)
        batch.append((data, receivers[i % len(receivers)].getsockname()))
    return batch


def expect(receivers: list[socket.socket], batch: list[tuple[bytes, Any]]) -> None:
    """Every receiver gets exactly its datagrams of ``batch``, byte-identical and in order."""
    for sock in receivers:
        wanted = [data for data, addr in batch if addr[:2] == sock.getsockname()[:2]]
        got = [sock.recv(65536) for _ in wanted]
        assert got == wanted
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(2048)  # nothing more (no duplicates)
        sock.settimeout(2.0)


class Recorder:
    """A fallback that records and really sends (like uvloop's transport.sendto would)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls: list[tuple[bytes, Any]] = []

    def __call__(self, data: bytes, addr: Any) -> None:
        self.calls.append((data, addr))
        self.sock.sendto(data, addr)


@requires_sendmmsg
def test_batch_arrives_in_order_at_every_receiver(
    sender_sock: socket.socket, receivers: list[socket.socket]
) -> None:
    fallback = Recorder(sender_sock)
    sender = BatchSender(sender_sock, fallback)
    assert sender.batched
    batch = make_batch(receivers, 30)
    sender.send(batch)
    expect(receivers, batch)
    assert (sender.sent_batched, sender.sendmmsg_calls, sender.sent_fallback) == (30, 1, 0)
    assert fallback.calls == []


@requires_sendmmsg
@pytest.mark.parametrize("n", [MAX_BATCH, MAX_BATCH + 1, 3 * MAX_BATCH + 7])
def test_batches_larger_than_one_call(
    sender_sock: socket.socket, receivers: list[socket.socket], n: int
) -> None:
    sender = BatchSender(sender_sock, Recorder(sender_sock))
    batch = make_batch(receivers, n)
    sender.send(batch)
    expect(receivers, batch)
    assert sender.sent_batched == n
    assert sender.sendmmsg_calls == -(-n // MAX_BATCH)


@requires_sendmmsg
def test_batch_of_one_and_empty_batch(
    sender_sock: socket.socket, receivers: list[socket.socket]
) -> None:
    sender = BatchSender(sender_sock, Recorder(sender_sock))
    sender.send([])
    assert sender.sendmmsg_calls == 0
    batch = make_batch(receivers[:1], 1)
    sender.send(batch)
    expect(receivers[:1], batch)
    # Below SENDMMSG_MIN datagrams, sendto is cheaper.
    assert udp.SENDMMSG_MIN > 1
    assert (sender.sent_direct, sender.sent_batched, sender.sendmmsg_calls) == (1, 0, 0)
    batch = make_batch(receivers, udp.SENDMMSG_MIN)
    sender.send(batch)
    expect(receivers, batch)
    assert (sender.sent_batched, sender.sendmmsg_calls) == (udp.SENDMMSG_MIN, 1)


@requires_sendmmsg
def test_bytes_like_datagrams(sender_sock: socket.socket, receivers: list[socket.socket]) -> None:
    sender = BatchSender(sender_sock, Recorder(sender_sock))
    addr = receivers[0].getsockname()
    wide = b"<" + b"payload" * 10 + b">"
    batch: list[tuple[Any, Any]] = [
        (bytearray(b"a bytearray"), addr),
        (memoryview(wide)[1:-1], addr),
        (b"bytes", addr),
    ]
    sender.send(batch)
    assert [receivers[0].recv(2048) for _ in batch] == [bytes(d) for d, _ in batch]
    assert sender.sent_batched == 3
    assert slots_restored(sender)


def slots_restored(sender: BatchSender) -> bool:
    """Every message points at its own slot of the sender's buffer again."""
    return all(sender._iov_words[2 * i] == sender._slot_bases[i] for i in range(MAX_BATCH))


@requires_sendmmsg
def test_long_datagrams_are_sent_in_place(
    sender_sock: socket.socket, receivers: list[socket.socket]
) -> None:
    sender = BatchSender(sender_sock, Recorder(sender_sock))
    batch = make_batch(receivers, 12)
    for i in (0, 5, 11):  # longer than a slot: pointed at, not copied
        batch[i] = (os.urandom(udp.SLOT_SIZE + 1 + i * 100), batch[i][1])
    batch[6] = (os.urandom(udp.SLOT_SIZE), batch[6][1])  # exactly a slot: copied
    sender.send(batch)
    expect(receivers, batch)
    assert slots_restored(sender)
    # The same slots carry short datagrams again.
    again = make_batch(receivers, 12)
    sender.send(again)
    expect(receivers, again)
    assert sender.sent_batched == 24


@requires_sendmmsg
def test_a_raising_fallback_leaves_the_sender_usable(
    sender_sock: socket.socket, receivers: list[socket.socket]
) -> None:
    def fallback(data: Any, addr: Any) -> None:
        raise ValueError(f"{addr!r}: a DNS lookup is required")

    sender = BatchSender(sender_sock, fallback)
    addr = receivers[0].getsockname()
    with pytest.raises(ValueError):
        sender.send([(bytearray(b"in place"), addr), (b"x", ("localhost", 1)), (b"lost", addr)])
    assert receivers[0].recv(2048) == b"in place"  # sent before the bad one
    assert slots_restored(sender)
    batch = make_batch(receivers, 5)
    sender.send(batch)
    expect(receivers, batch)


@requires_sendmmsg
def test_forced_eagain_goes_through_the_fallback(
    sender_sock: socket.socket, receivers: list[socket.socket]
) -> None:
    fallback = Recorder(sender_sock)
    sender = BatchSender(sender_sock, fallback)
    calls = []

    def eagain(fd: int, msgs: Any, vlen: int, flags: int) -> int:
        calls.append(vlen)
        udp._ffi.errno = errno.EAGAIN
        return -1

    sender._sendmmsg = eagain
    batch = make_batch(receivers, 40)
    sender.send(batch)
    expect(receivers, batch)
    assert calls == [40]
    assert fallback.calls == batch
    assert (sender.sent_batched, sender.sent_fallback) == (0, 40)
    assert sender.last_errno == errno.EAGAIN


@requires_sendmmsg
def test_eagain_in_a_later_call_sends_the_rest_through_the_fallback(
    sender_sock: socket.socket, receivers: list[socket.socket]
) -> None:
    fallback = Recorder(sender_sock)
    sender = BatchSender(sender_sock, fallback)
    real = sender._sendmmsg
    calls = []

    def second_fails(fd: int, msgs: Any, vlen: int, flags: int) -> int:
        calls.append(vlen)
        if len(calls) == 2:
            udp._ffi.errno = errno.ENOBUFS
            return -1
        return int(real(fd, msgs, vlen, flags))

    sender._sendmmsg = second_fails
    batch = make_batch(receivers, 3 * MAX_BATCH)
    sender.send(batch)
    expect(receivers, batch)
    assert calls == [MAX_BATCH, MAX_BATCH]  # the third chunk was not tried
    assert fallback.calls == batch[MAX_BATCH:]
    assert (sender.sent_batched, sender.sent_fallback) == (MAX_BATCH, 2 * MAX_BATCH)
    assert sender.last_errno == errno.ENOBUFS


@requires_sendmmsg
def test_partial_batch_sends_the_rest_through_the_fallback(
    sender_sock: socket.socket, receivers: list[socket.socket]
) -> None:
    fallback = Recorder(sender_sock)
    sender = BatchSender(sender_sock, fallback)
    real = sender._sendmmsg

    def five_only(fd: int, msgs: Any, vlen: int, flags: int) -> int:
        return int(real(fd, msgs, min(vlen, 5), flags))

    sender._sendmmsg = five_only
    batch = make_batch(receivers, 20)
    sender.send(batch)
    expect(receivers, batch)
    assert fallback.calls == batch[5:]
    assert (sender.sent_batched, sender.sent_fallback) == (5, 15)


@requires_sendmmsg
def test_after_a_fallback_order_is_kept_until_the_transport_drains(
    sender_sock: socket.socket, receivers: list[socket.socket]
) -> None:
    fallback = Recorder(sender_sock)
    queued = [0]
    sender = BatchSender(sender_sock, fallback, pending=lambda: queued[0])
    real = sender._sendmmsg

    def eagain(fd: int, msgs: Any, vlen: int, flags: int) -> int:
        udp._ffi.errno = errno.EAGAIN
        return -1

    sender._sendmmsg = eagain
    first = make_batch(receivers, 4)
    sender.send(first)
    sender._sendmmsg = real
    queued[0] = 2  # the transport still holds queued datagrams: stay behind them
    second = make_batch(receivers, 4)
    sender.send(second)
    sender.sendto(b"single", receivers[0].getsockname())
    assert fallback.calls == first + second + [(b"single", receivers[0].getsockname())]
    assert sender.sendmmsg_calls == 1
    queued[0] = 0  # drained: back to sendmmsg
    third = make_batch(receivers, 4)
    sender.send(third)
    assert sender.sendmmsg_calls == 2 and sender.sent_batched == 4
    expect(receivers, first + second + [(b"single", receivers[0].getsockname())] + third)


@requires_sendmmsg
def test_unusable_address_in_a_batch(
    sender_sock: socket.socket, receivers: list[socket.socket]
) -> None:
    """What sendmmsg cannot address goes to the fallback in its place; the rest is batched."""
    seen: list[tuple[bytes, Any]] = []
    sender = BatchSender(sender_sock, lambda data, addr: seen.append((data, addr)))
    batch = make_batch(receivers, 6)
    bad = (b"to a name", ("localhost", 9))
    sender.send(batch[:3] + [bad] + batch[3:])
    expect(receivers, batch)
    assert seen == [bad]
    assert (sender.sent_batched, sender.sendmmsg_calls, sender.sent_fallback) == (6, 2, 1)


@requires_sendmmsg
def test_address_cache_is_bounded(
    sender_sock: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(udp, "ADDRESS_CACHE_SIZE", 2)
    sender = BatchSender(sender_sock, Recorder(sender_sock))
    distinct = [_bind(socket.AF_INET, "127.0.0.1") for _ in range(5)]
    try:
        for _ in range(3):
            # More new addresses in one batch than the cache holds: the entries the
            # prepared messages point at must stay alive until sendmmsg returns.
            batch = make_batch(distinct, 15)
            sender.send(batch)
            expect(distinct, batch)
            assert len(sender._addresses) <= 2 + len(distinct)
        assert sender.sent_batched == 45
    finally:
        for sock in distinct:
            sock.close()


@requires_sendmmsg
def test_closed_socket_goes_to_the_fallback(receivers: list[socket.socket]) -> None:
    sock = _bind(socket.AF_INET, "127.0.0.1")
    seen: list[tuple[bytes, Any]] = []
    sender = BatchSender(sock, lambda data, addr: seen.append((data, addr)))
    sock.close()  # uvloop detaches it on close: fileno() is -1 either way
    batch = make_batch(receivers, 3)
    sender.send(batch)
    sender.sendto(b"x", receivers[0].getsockname())
    assert seen == batch + [(b"x", receivers[0].getsockname())]
    assert sender.sendmmsg_calls == 0 and sender.last_errno == errno.EBADF


@requires_ipv6
@requires_sendmmsg
def test_ipv6(receivers: list[socket.socket]) -> None:
    sock = _bind(socket.AF_INET6, "::1")
    v6 = [_bind(socket.AF_INET6, "::1") for _ in range(2)]
    try:
        sender = BatchSender(sock, Recorder(sock))
        batch = make_batch(v6, 10)
        batch += [(b"four-tuple", v6[0].getsockname())]  # ("::1", port, flowinfo, scope)
        batch += [(b"two-tuple", v6[1].getsockname()[:2])]
        sender.send(batch)
        expect(v6, batch)
        assert sender.sent_batched == 12
    finally:
        for s in [sock, *v6]:
            s.close()


@requires_ipv6
@requires_sendmmsg
def test_ipv4_addresses_on_a_dual_stack_socket_are_v4_mapped(
    receivers: list[socket.socket],
) -> None:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            sock.bind(("::", 0))
        except OSError as exc:
            pytest.skip(f"no dual-stack socket: {exc}")
        sender = BatchSender(sock, Recorder(sock))
        batch = make_batch(receivers, 9)  # plain ("127.0.0.1", port) addresses
        batch.append((b"mapped", ("::ffff:127.0.0.1", receivers[0].getsockname()[1])))
        sender.send(batch)
        expect(receivers, batch[:-1] + [(b"mapped", receivers[0].getsockname())])
        assert sender.sent_batched == 10 and sender.sent_fallback == 0
    finally:
        sock.close()


def test_sendto_uses_the_socket_and_falls_back_when_it_would_block(
    sender_sock: socket.socket, receivers: list[socket.socket]
) -> None:
    fallback = Recorder(sender_sock)
    sender = BatchSender(sender_sock, fallback)
    addr = receivers[0].getsockname()
    sender.sendto(b"one", addr)
    assert receivers[0].recv(2048) == b"one"
    assert (sender.sent_direct, sender.sent_fallback) == (1, 0)

    def would_block(*args: Any) -> int:
        raise BlockingIOError(errno.EAGAIN, "would block")

    sender._sock_sendto = would_block
    sender.sendto(b"two", addr)
    assert receivers[0].recv(2048) == b"two"
    assert fallback.calls == [(b"two", addr)]
    assert (sender.sent_direct, sender.sent_fallback) == (1, 1)


def test_without_sendmmsg_a_loop_of_sendto(
    sender_sock: socket.socket, receivers: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(udp, "_sendmmsg", None)
    sender = BatchSender(sender_sock, Recorder(sender_sock))
    assert not sender.batched
    batch = make_batch(receivers, MAX_BATCH + 5)
    sender.send(batch)
    expect(receivers, batch)
    assert (sender.sent_direct, sender.sent_batched, sender.sendmmsg_calls) == (MAX_BATCH + 5, 0, 0)


def test_not_a_udp_socket() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, pytest.raises(ValueError):
        BatchSender(tcp, lambda data, addr: None)


@requires_sendmmsg
def test_with_a_uvloop_transport(receivers: list[socket.socket]) -> None:
    """The relay's setup: uvloop owns the socket, the sender writes on its descriptor."""
    uvloop = pytest.importorskip("uvloop")
    batch = make_batch(receivers, 70)

    async def main() -> BatchSender:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=sock)
        sender = BatchSender(sock, transport.sendto, transport.get_write_buffer_size)
        sender.send(batch)
        sender.sendto(b"last", receivers[0].getsockname())
        transport.close()
        await asyncio.sleep(0)
        assert sock.fileno() == -1
        sender.send(batch[:1])  # after close: the transport's sendto handles (drops) it
        return sender

    sender = uvloop.run(main())
    expect(receivers, batch + [(b"last", receivers[0].getsockname())])
    assert (sender.sent_batched, sender.sent_direct, sender.sent_fallback) == (70, 1, 1)
