"""What-if measurements for the relay's forwarding loop: candidate changes, measured on the
same in-memory relay as ``python -m bench hotpath``, without editing the relay.

``python -m bench.whatif [--fanouts 1,10,50] [--samples 400]`` prints, per fan-out, the CPU
time of one forwarded video packet (ns per input packet, p50) for:

- ``baseline``: ``MediaRouter.handle_datagram`` as it is (uvloop ``transport.sendto``);
- ``socket_sendto``: the same, sending with the socket's own ``sendto`` instead of uvloop's
  transport (the relay would hand ``sock.sendto`` to the router);
- ``direct_srtp``: the same, with ``SrtpSession`` calling libsrtp through pylibsrtp's cffi
  ``lib`` directly (one preallocated buffer and length per session) instead of
  ``pylibsrtp.Session.protect``/``unprotect``;
- ``no_history``: the relay as it is, with the subscriptions' NACK histories switched off:
  the most a history kept once per track (instead of one stored copy per subscriber) could
  save;
- ``fast_ext``: a copy of ``MediaRouter._rtp`` that builds the extension block in the one-byte
  form also when a transport-wide sequence number is appended (the relay's
  ``ExtensionRewriter.block`` falls back to its generic path whenever ``extra`` is given);
- ``lean_loop``: ``fast_ext`` with ``direct_srtp`` and ``socket_sendto``;
- ``lean_sendmmsg``: ``lean_loop`` sending every copy of a packet with one ``sendmmsg`` call
  (libc through cffi).

Every variant forwards the same packets to the same sink sockets; the copies are checked.
"""

from __future__ import annotations

import argparse
import socket
import struct
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.hotpath import Bench, _summary, _time
from relay.rtc.rtp import extension_profile, parse_extensions, parse_rtp, rewrite_packet

_EMPTY: list[tuple[int, bytes]] = []


class DirectSrtp:
    """libsrtp's protect/unprotect through pylibsrtp's own cffi handle, without its wrapper."""

    def __init__(self, session: Any) -> None:
        from pylibsrtp._binding import ffi, lib

        self._ctx = session._srtp[0]
        self._cdata = ffi.new("char[]", 1500)
        self._buf = ffi.buffer(self._cdata)
        self._len = ffi.new("int *")
        self._lib = lib
        self._memmove = ffi.memmove

    def protect(self, data: bytes) -> bytes:
        n = len(data)
        if n > 1356:
            raise ValueError("packet is too long")
        self._memmove(self._cdata, data, n)
        self._len[0] = n
        if self._lib.srtp_protect(self._ctx, self._cdata, self._len):
            raise ValueError("srtp_protect failed")
        return self._buf[0 : self._len[0]]

    def unprotect(self, data: bytes) -> bytes:
        n = len(data)
        if n > 1500:
            raise ValueError("packet is too long")
        self._memmove(self._cdata, data, n)
        self._len[0] = n
        if self._lib.srtp_unprotect(self._ctx, self._cdata, self._len):
            raise ValueError("srtp_unprotect failed")
        return self._buf[0 : self._len[0]]


def use_direct_srtp(bench: Bench) -> None:
    for transport in bench.router.by_addr.values():
        srtp = transport.srtp
        if srtp is not None:
            srtp._protect = DirectSrtp(srtp._tx).protect
            srtp._unprotect = DirectSrtp(srtp._rx).unprotect


class MultiSender:
    """``sendmmsg(2)`` from libc through cffi: every copy of one packet in one system call."""

    def __init__(self, sock: socket.socket, targets: list[tuple[str, int]]) -> None:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(
            """
            struct iovec { void *iov_base; size_t iov_len; };
            struct msghdr { void *msg_name; unsigned int msg_namelen; struct iovec *msg_iov;
                            size_t msg_iovlen; void *msg_control; size_t msg_controllen;
                            int msg_flags; };
            struct mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; };
            int sendmmsg(int sockfd, struct mmsghdr *msgvec, unsigned int vlen, int flags);
            """
        )
        self.ffi = ffi
        self.libc = ffi.dlopen(None)
        self.fd = sock.fileno()
        n = len(targets)
        self.n = n
        self.msgs = ffi.new("struct mmsghdr[]", n)
        self.iovs = ffi.new("struct iovec[]", n)
        self.addrs = []
        for i, (host, port) in enumerate(targets):
            raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port)
            raw += socket.inet_aton(host) + bytes(8)
            addr = ffi.new("char[]", raw)
            self.addrs.append(addr)
            hdr = self.msgs[i].msg_hdr
            hdr.msg_name = addr
            hdr.msg_namelen = 16
            hdr.msg_iov = self.iovs + i
            hdr.msg_iovlen = 1

    def send(self, packets: list[bytes]) -> int:
        from_buffer = self.ffi.from_buffer
        iovs = self.iovs
        keep = []
        for i, packet in enumerate(packets):
            buf = from_buffer(packet)
            keep.append(buf)
            iov = iovs[i]
            iov.iov_base = buf
            iov.iov_len = len(packet)
        return self.libc.sendmmsg(self.fd, self.msgs, len(packets), 0)


_BYTE = [bytes((b,)) for b in range(256)]
_PAD = (b"", b"\x00", b"\x00\x00", b"\x00\x00\x00")


def one_byte_block(
    ext: Any, elements: list[tuple[int, bytes]], extra: bytes, extra_len: int
) -> bytes:
    """``ExtensionRewriter.block`` in the one-byte form with an already encoded extra element
    (the transport-wide sequence number), or the generic path when that form does not fit."""
    one_byte = ext._one_byte
    if one_byte is None:
        return b""
    parts = [b""]
    size = len(ext._tail_bytes) + extra_len
    for ident, value in elements:
        h = one_byte.get(ident)
        if h is not None:
            n = len(value)
            if not 0 < n <= 16:
                return b""
            parts.append(_BYTE[h | (n - 1)])
            parts.append(value)
            size += n + 1
    parts.append(ext._tail_bytes)
    parts.append(extra)
    pad = -size & 3
    parts.append(_PAD[pad])
    parts[0] = struct.pack("!HH", 0xBEDE, (size + pad) >> 2)
    return b"".join(parts)


def lean_forward(
    router: Any, multi: MultiSender | None, send: Callable[[bytes, Any], Any]
) -> Callable[[bytes, Any], None]:
    """A copy of ``MediaRouter._rtp`` (publisher transport already found, no RTX/TWCC receive
    side) with a lean per-copy loop: the same rewrite, transport-wide sequence number, NACK
    history, protect and send, with counters added once per packet and the extension block
    built in the one-byte form directly (also when a transport-wide number is appended)."""
    metrics = router.metrics
    clock = router.clock

    def forward(data: bytes, addr: Any) -> None:
        now = clock()
        transport = router.by_addr[addr]
        plain = transport.srtp.unprotect(data)
        transport.rx_seen = True
        pt, seq, ts, ssrc, _m, off, ext_off, ext_len = parse_rtp(plain)
        elements = (
            parse_extensions(plain, ext_off, ext_len, extension_profile(plain))
            if ext_len
            else _EMPTY
        )
        track = transport.owner.ssrc_map.get(ssrc)
        if track is None or pt != track.payload_type:
            return
        size = len(data)
        metrics.packets_in += 1
        metrics.bytes_in += size
        track.packets += 1
        track.bytes += size
        track.stats.update(seq, ts, now, size)
        if track.nack is not None:
            track.nack.on_packet(seq, now)
        out: list[bytes] = []
        sent_bytes = 0
        for sub in track.outputs:
            rewritten = sub.rewriter.rewrite(seq, ts, now)
            if rewritten is None:
                continue
            out_transport = sub.subscriber.subscriber
            twcc_id = out_transport.twcc_id
            block = b""
            if twcc_id and twcc_id < 15:
                stamp = out_transport.twcc_send.next_seq(size, now)
                extra = _BYTE[(twcc_id << 4) | 1] + stamp.to_bytes(2, "big")
                block = one_byte_block(sub.ext, elements, extra, 3)
                if not block:
                    block = sub.ext.block(elements, [(twcc_id, stamp.to_bytes(2, "big"))])
            elif twcc_id:
                stamp = out_transport.twcc_send.next_seq(size, now)
                block = sub.ext.block(elements, [(twcc_id, stamp.to_bytes(2, "big"))])
            else:
                block = sub.ext.block(elements)
            copy = rewrite_packet(
                plain, off, sub.ssrc, sub.payload_type, rewritten[0], rewritten[1], block
            )
            if sub.history is not None:
                sub.history.store(rewritten[0], copy, now)
            packet = out_transport.srtp.protect(copy)
            if multi is None:
                send(packet, out_transport.addr)
            else:
                out.append(packet)
            sub.packets_sent += 1
            sub.bytes_sent += len(packet)
            sent_bytes += len(packet)
        if multi is not None and out:
            multi.send(out)
        metrics.packets_out += len(track.outputs)
        metrics.bytes_out += sent_bytes

    return forward


def measure(fanout: int, samples: int, variant: str) -> dict[str, Any]:
    import asyncio

    import uvloop

    async def run() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        bench = Bench("video", fanout)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=sock)
        try:
            router = bench.router
            send: Callable[[bytes, Any], Any] = transport.sendto
            if variant != "baseline":
                send = sock.sendto
            if variant in ("fast_ext", "no_history"):
                send = transport.sendto
            if variant == "no_history":
                for sub in bench.track.outputs:
                    sub.history = None
            if variant in ("direct_srtp", "lean_loop", "lean_sendmmsg"):
                use_direct_srtp(bench)
            router.send = send
            handle: Callable[[bytes, Any], None] = router.handle_datagram
            if variant in ("lean_loop", "fast_ext"):
                handle = lean_forward(router, None, send)
            elif variant == "lean_sendmmsg":
                targets = [s.getsockname() for s in bench.sinks]
                # the router's subscriptions are in activation order, as the sinks
                addrs = [sub.subscriber.subscriber.addr for sub in bench.track.outputs]
                assert addrs == targets
                handle = lean_forward(router, MultiSender(sock, targets), send)
            batch = max(1, 32 // fanout)
            packets = bench.packets(samples * batch, 1200)
            addr = bench.pub_addr

            def forward(b: int) -> None:
                for i in range(b * batch, (b + 1) * batch):
                    handle(packets[i], addr)

            _count(bench)
            counted = [0]

            def drain() -> None:
                counted[0] += _count(bench)

            ns = _time(samples, batch, forward, drain)
            drain()
            if counted[0] != samples * batch * fanout:
                raise RuntimeError(f"{variant}: {counted[0]} copies arrived")
            return {"fanout": fanout, "variant": variant, "ns": _summary(ns)}
        finally:
            transport.close()
            bench.close()

    return uvloop.run(run())


def _count(bench: Bench) -> int:
    n = 0
    for sink in bench.sinks:
        try:
            while True:
                sink.recv(2048)
                n += 1
        except BlockingIOError:
            pass
    return n


VARIANTS = (
    "baseline",
    "socket_sendto",
    "direct_srtp",
    "no_history",
    "fast_ext",
    "lean_loop",
    "lean_sendmmsg",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fanouts", default="1,10,50")
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3, help="alternate the variants this often")
    args = parser.parse_args()
    fanouts = [int(x) for x in args.fanouts.split(",")]
    print("ns of CPU per input packet (p50), video 1200 B; lower is better")
    print(f"{'fan-out':>8} " + " ".join(f"{v:>14}" for v in VARIANTS))
    for n in fanouts:
        medians: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for v in VARIANTS:
                medians[v].append(measure(n, args.samples, v)["ns"]["p50"])
        best = {v: float(np.median(m)) for v, m in medians.items()}
        base = best["baseline"]
        print(f"{n:>8} " + " ".join(f"{best[v]:>9,.0f} {best[v] / base:>4.2f}" for v in VARIANTS))


if __name__ == "__main__":
    main()
