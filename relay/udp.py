"""Batched UDP sending for the media socket: every copy of one packet in one ``sendmmsg(2)``.

uvloop owns the media socket (its transport reads from it and queues what cannot be sent
yet); :class:`BatchSender` writes directly on the same file descriptor and hands anything
it could not send to a fallback, the transport's own ``sendto``, which queues it (the kernel
buffer is full) or reports the error to the protocol. ``sendmmsg`` is called through cffi in
ABI mode (``ffi.dlopen(None)``: libc, no compiler at install time). Where it is missing
(not Linux, no cffi, an unknown struct layout) the sender is a loop of ``sendto`` calls and
says so in :attr:`BatchSender.batched`.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["MAX_BATCH", "SENDMMSG_MIN", "BatchSender", "sendmmsg_unavailable"]

#: Datagrams per ``sendmmsg`` call; larger batches are split (the kernel caps at UIO_MAXIOV).
MAX_BATCH = 64
#: Shorter batches are sent with ``sendto`` per datagram: a ``sendmmsg`` call through cffi
#: (ABI mode, libffi) and its preparation cost more than one or two plain ``sendto`` calls.
SENDMMSG_MIN = 3
#: Bytes per message slot of the sender's own buffer: datagrams up to this size are copied
#: there; longer ones (and buffers that are not ``bytes``) are pointed at in place.
SLOT_SIZE = 2048
#: Cached socket addresses: the cache is emptied when a batch starts with this many (so it
#: holds at most this many plus one batch).
ADDRESS_CACHE_SIZE = 4096

Address = tuple[Any, ...]
Data = bytes | bytearray | memoryview
Batch = Sequence[tuple[Data, Address]]

# Linux x86_64/aarch64 (and every 64-bit little-endian Linux ABI): glibc's layouts. musl
# pads msg_iovlen and msg_controllen to 8 bytes, which is the same memory on little-endian.
_CDEF = """
struct iovec { void *iov_base; size_t iov_len; };
struct msghdr {
    void *msg_name; unsigned int msg_namelen;
    struct iovec *msg_iov; size_t msg_iovlen;
    void *msg_control; size_t msg_controllen;
    int msg_flags;
};
struct mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; };
struct sockaddr_in {
    unsigned short sin_family; unsigned char sin_port[2];
    unsigned char sin_addr[4]; unsigned char sin_zero[8];
};
struct sockaddr_in6 {
    unsigned short sin6_family; unsigned char sin6_port[2];
    unsigned char sin6_flowinfo[4]; unsigned char sin6_addr[16]; uint32_t sin6_scope_id;
};
int sendmmsg(int sockfd, struct mmsghdr *msgvec, unsigned int vlen, int flags);
"""
_SIZES = {
    "struct iovec": 16,
    "struct msghdr": 56,
    "struct mmsghdr": 64,
    "struct sockaddr_in": 16,
    "struct sockaddr_in6": 28,
}
_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)

_ffi: Any = None
_sendmmsg: Any = None
#: Why ``sendmmsg`` is not used, or None when it is.
sendmmsg_unavailable: str | None = None


def _load() -> None:
    global _ffi, _sendmmsg, sendmmsg_unavailable
    if not sys.platform.startswith("linux"):
        sendmmsg_unavailable = f"no sendmmsg on {sys.platform}"
        return
    if sys.byteorder != "little":
        sendmmsg_unavailable = "struct layouts only known for little-endian Linux"
        return
    try:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(_CDEF)
        sizes = {name: ffi.sizeof(name) for name in _SIZES}
        if ffi.sizeof("void *") != 8 or sizes != _SIZES:
            sendmmsg_unavailable = f"unexpected struct sizes {sizes}"
            return
        libc = ffi.dlopen(None)
        function = libc.sendmmsg
    except Exception as exc:  # no cffi, no libc handle, no sendmmsg symbol
        sendmmsg_unavailable = f"cannot load sendmmsg: {exc!r}"
        return
    _ffi, _sendmmsg = ffi, function


_load()


class BatchSender:
    """Sends datagrams on a non-blocking UDP socket, several per system call.

    ``fallback(data, addr)`` (the uvloop transport's ``sendto``) gets every datagram the
    socket did not take: on EAGAIN/EWOULDBLOCK, ENOBUFS or any other error, from the
    datagram that failed to the end of the batch, in order. ``pending()`` (the transport's
    ``get_write_buffer_size``), when given, keeps datagrams in order behind the ones the
    transport has queued: after a fallback, everything goes through the fallback until the
    transport's queue is empty again.

    Counters: :attr:`sent_batched` datagrams the kernel took through ``sendmmsg`` (in
    :attr:`sendmmsg_calls` calls), :attr:`sent_direct` through the socket's ``sendto``,
    :attr:`sent_fallback` handed to the fallback; :attr:`last_errno` of the last failure.

    Datagrams of up to ``SLOT_SIZE`` bytes are copied into the sender's own buffer; longer
    ones and other buffer types are sent in place, held until the call returns. Batches of
    fewer than ``SENDMMSG_MIN`` go through ``sendto``. One event loop thread only.
    """

    def __init__(
        self,
        sock: socket.socket,
        fallback: Callable[[Data, Address], object],
        pending: Callable[[], int] | None = None,
    ) -> None:
        if sock.type != socket.SOCK_DGRAM:
            raise ValueError(f"a UDP socket is needed, not {sock!r}")
        self.sock = sock
        self.fallback = fallback
        self.pending = pending
        self.family = sock.family
        self.batched = _sendmmsg is not None and self.family in (socket.AF_INET, socket.AF_INET6)
        self.sent_batched = 0
        self.sent_direct = 0
        self.sent_fallback = 0
        self.sendmmsg_calls = 0
        self.last_errno = 0
        self._congested = False
        self._sock_sendto = sock.sendto
        self._fileno = sock.fileno
        self._sendmmsg = _sendmmsg
        self._addresses: dict[Address, tuple[Any, int, int]] = {}
        if self.batched:
            ffi = _ffi
            # cffi owns the memory sendmmsg reads: the message headers, one iovec per
            # message (each header points at its own) and a slab with one slot per message.
            # Per datagram Python writes only the copy, its length and, when it changes, the
            # address, through memoryviews of that memory (cheaper than cffi field access):
            # 64-bit words, so iovec i is words 2i (base) and 2i + 1 (length), mmsghdr i is
            # words 8i (msg_name) and 8i + 1 (msg_namelen with its padding, little-endian).
            self._msgs: Any = ffi.new("struct mmsghdr[]", MAX_BATCH)
            self._iov_array: Any = ffi.new("struct iovec[]", MAX_BATCH)
            self._slab: Any = ffi.new("char[]", MAX_BATCH * SLOT_SIZE)
            for i in range(MAX_BATCH):
                hdr = self._msgs[i].msg_hdr
                hdr.msg_iov = self._iov_array + i
                hdr.msg_iovlen = 1
                self._iov_array[i].iov_base = self._slab + i * SLOT_SIZE
            self._msg_words = memoryview(ffi.buffer(self._msgs)).cast("Q")
            self._iov_words = memoryview(ffi.buffer(self._iov_array)).cast("Q")
            self._slab_view = memoryview(ffi.buffer(self._slab))
            self._slot_bases = [self._iov_words[2 * i] for i in range(MAX_BATCH)]
            # The address entry each message header points at now (which keeps it alive).
            self._names: list[Any] = [None] * MAX_BATCH

    # --- single datagrams -----------------------------------------------------------------

    def sendto(self, data: Data, addr: Address) -> None:
        """One datagram with the socket's own ``sendto``; the fallback if it cannot."""
        if self._congested and self._still_congested():
            self._fall_back(data, addr)
            return
        try:
            self._sock_sendto(data, _MSG_DONTWAIT, addr)
        except OSError as exc:  # BlockingIOError, ENOBUFS, an unusable address, closed
            self.last_errno = exc.errno or 0
            self._congested = True
            self._fall_back(data, addr)
            return
        self.sent_direct += 1

    # --- batches --------------------------------------------------------------------------

    def send(self, batch: Batch) -> None:
        """Every ``(data, address)`` of ``batch``, in order, ``MAX_BATCH`` per system call."""
        if not self.batched or len(batch) < SENDMMSG_MIN:
            sendto = self.sendto
            for data, addr in batch:
                sendto(data, addr)
            return
        if self._congested and self._still_congested():
            self._fall_back_all(batch)
            return
        addresses = self._addresses
        if len(addresses) >= ADDRESS_CACHE_SIZE:
            # Only here, between calls: the entries the headers point at stay alive anyway
            # (in self._names), but this keeps the cache from being refilled mid-batch.
            addresses.clear()
        in_place: list[tuple[int, Any]] = []  # (slot, buffer) pointed at, not copied
        try:
            self._send_batched(batch, in_place)
        finally:
            if in_place:  # an exception left a message pointing outside the slab
                self._restore(in_place)

    def _send_batched(self, batch: Batch, in_place: list[tuple[int, Any]]) -> None:
        addresses = self._addresses
        slab = self._slab_view
        iov_words = self._iov_words
        msg_words = self._msg_words
        names = self._names
        count = 0
        for index, (data, addr) in enumerate(batch):
            try:
                entry = addresses.get(addr)
                if entry is None:
                    entry = self._sockaddr(addr)
                if data.__class__ is bytes and (n := len(data)) <= SLOT_SIZE:
                    offset = count * SLOT_SIZE
                    slab[offset : offset + n] = data
                    iov_words[2 * count + 1] = n
                else:
                    self._point_at(count, data, in_place)
            except Exception:
                # Not something sendmmsg can send (a host name, a bad port, not bytes):
                # send what is ready, then the fallback raises or reports this one.
                if count and not self._flush(batch, index - count, count, in_place):
                    return
                count = 0
                self._fall_back(data, addr)
                continue
            if names[count] is not entry:
                msg_words[8 * count] = entry[2]
                msg_words[8 * count + 1] = entry[1]
                names[count] = entry
            count += 1
            if count == MAX_BATCH:
                if not self._flush(batch, index + 1 - count, count, in_place):
                    return
                count = 0
        if count:
            self._flush(batch, len(batch) - count, count, in_place)

    def _point_at(self, slot: int, data: Any, in_place: list[tuple[int, Any]]) -> None:
        """Point message ``slot`` at ``data`` itself (too long to copy, or not ``bytes``);
        ``in_place`` keeps the buffer (and so ``data``) alive and unmoved until the call."""
        buf = _ffi.from_buffer(data)
        in_place.append((slot, buf))
        self._iov_words[2 * slot] = int(_ffi.cast("uintptr_t", buf))
        self._iov_words[2 * slot + 1] = len(buf)

    def _restore(self, in_place: list[tuple[int, Any]]) -> None:
        """Point the messages that pointed at buffers back at their slots; let the buffers go."""
        for slot, _buf in in_place:
            self._iov_words[2 * slot] = self._slot_bases[slot]
        in_place.clear()

    def _flush(
        self,
        batch: Batch,
        first: int,
        count: int,
        in_place: list[tuple[int, Any]],
    ) -> bool:
        """sendmmsg the ``count`` prepared messages (``batch[first:first + count]``); on a
        short count or an error the rest of the batch goes to the fallback (False)."""
        fd = self._fileno()  # -1 once uvloop has closed the socket (and detached it)
        if fd >= 0:
            sent = self._sendmmsg(fd, self._msgs, count, _MSG_DONTWAIT)
            self.sendmmsg_calls += 1
        else:
            sent = -1
        if in_place:
            self._restore(in_place)
        if sent == count:
            self.sent_batched += count
            return True
        if sent < 0:
            self.last_errno = _ffi.errno if fd >= 0 else errno.EBADF
            sent = 0
        else:
            self.last_errno = errno.EAGAIN  # a partial batch: the socket buffer filled up
            self.sent_batched += sent
        self._congested = True
        self._fall_back_all(batch, first + sent)
        return False

    # --- fallback -------------------------------------------------------------------------

    def _fall_back(self, data: Data, addr: Address) -> None:
        self.sent_fallback += 1
        self.fallback(data, addr)

    def _fall_back_all(self, batch: Batch, first: int = 0) -> None:
        fallback = self.fallback
        for i in range(first, len(batch)):
            self.sent_fallback += 1
            fallback(*batch[i])

    def _still_congested(self) -> bool:
        """After a fallback: is the transport still holding queued datagrams?"""
        if self.pending is not None and self.pending() > 0:
            return True
        self._congested = False
        return False

    # --- addresses ------------------------------------------------------------------------

    def _sockaddr(self, addr: Address) -> tuple[Any, int, int]:
        """The ``sockaddr_in``/``sockaddr_in6`` for ``addr`` (cached): the struct (which
        owns the memory), its length and its address."""
        if self.family == socket.AF_INET:
            host, port = addr
            raw = struct.pack(
                "=H2s4s8x",
                socket.AF_INET,
                port.to_bytes(2, "big"),
                socket.inet_pton(socket.AF_INET, host),
            )
            sa = _ffi.new("struct sockaddr_in *")
        else:
            host, port = addr[0], addr[1]
            flowinfo = addr[2] if len(addr) > 2 else 0
            scope_id = addr[3] if len(addr) > 3 else 0
            raw = struct.pack(
                "=H2s4s16sI",
                socket.AF_INET6,
                port.to_bytes(2, "big"),
                flowinfo.to_bytes(4, "big"),
                *_ipv6(host, scope_id),
            )
            sa = _ffi.new("struct sockaddr_in6 *")
        _ffi.memmove(sa, raw, len(raw))
        entry = (sa, len(raw), int(_ffi.cast("uintptr_t", sa)))
        self._addresses[addr] = entry
        return entry


def _ipv6(host: str, scope_id: int) -> tuple[bytes, int]:
    """16 address bytes (IPv4 as v4-mapped) and the scope id for an AF_INET6 socket."""
    if "%" in host:
        host, _, scope = host.partition("%")
        if not scope_id:
            scope_id = int(scope) if scope.isdigit() else socket.if_nametoindex(scope)
    try:
        return socket.inet_pton(socket.AF_INET6, host), scope_id
    except OSError:
        return b"\x00" * 10 + b"\xff\xff" + socket.inet_pton(socket.AF_INET, host), 0
