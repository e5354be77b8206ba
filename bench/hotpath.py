"""The packet path's stages in isolation, in this process, on the relay's own code.

A :class:`relay.client.loopback.LoopbackRelay` sets up a real :class:`relay.sfu.sfu.Sfu`
without a media socket: one publisher and N subscribers, each a
:class:`relay.client.peer.ClientPeer` that does the whole ICE/DTLS handshake with the media
port in memory (the subscribers accept everything the relay offers, transport-cc and RTX
included, as a browser does). Each subscriber's address is a sink socket on 127.0.0.1. A few
keyframe packets go through the whole path first, so every subscription is forwarding. Then
each stage is timed by calling the relay's own code on that state, never a copy of it:

- ``demux``: ``MediaPort.datagram_received`` (first byte, leg by address, SRTP session,
  RTP/RTCP split) with the publisher leg's ``receive_rtp`` replaced by a no-op on that leg
  instance for this stage only (the no-op call is included);
- ``unprotect``: ``SrtpSession.unprotect`` of the publisher leg's transport;
- ``route``: ``PublisherLeg.receive_rtp(data, plain)`` with ``plain`` given (so no SRTP) and
  the track's ``outputs`` emptied for this stage: ``parse_rtp``, header extensions,
  congestion-control feedback (none: the publisher offers neither transport-cc nor REMB), the
  SSRC -> track lookup and ``Track.receive`` without its fan-out (counters, receive
  statistics, NACK generation, the track's packet history);
- ``rewrite``: ``OutboundStream.forward`` for every output with its ``protect`` set to a no-op
  that returns its argument for this stage (restored afterwards): ``SequenceRewriter.rewrite``,
  the transport-wide sequence number, ``ExtensionRewriter.block``, ``rewrite_packet`` and the
  append to the batch;
- ``protect``: ``SrtpSession.protect`` of every subscriber leg's transport, building the batch
  of ``(copy, address)`` that ``Track.receive`` sends;
- ``sendto``: the sender's ``send(batch)`` of all copies of one packet, to the sink sockets:
  ``relay.udp.BatchSender`` (``sendmmsg``) on the socket of a uvloop datagram endpoint with
  that endpoint's ``transport.sendto`` as fallback, as ``relay serve`` does; without
  ``relay.udp``, uvloop's ``transport.sendto`` per copy. The JSON's ``sender`` says which;
- ``forward``: the whole ``MediaPort.datagram_received`` with that real sender.

The sinks are drained between samples, untimed. One sample is a batch of packets timed with
the thread's CPU clock (``thread_time_ns``, its own overhead subtracted: time spent preempted
by other processes is not counted, and the kernel's work in ``sendto`` is) and divided by the
batch size; the per-subscriber stages are per input packet (all copies), ``*_per_copy``
divides by N.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.common import PERCENTILES
from relay.client.loopback import LoopbackRelay
from relay.client.peer import AUDIO_PT, VIDEO_PT, ClientPeer, TrackSpec
from relay.rtc.rtp import extension_profile, parse_extensions, parse_rtp
from relay.sfu.leg import CallbackSender, DatagramSender
from relay.sfu.publisher_leg import PublisherLeg

FANOUTS = (1, 2, 5, 10, 20, 50)
SIZES = {"audio": 120, "video": 1200}
STAGES = ("demux", "unprotect", "route", "rewrite", "protect", "sendto", "forward")
PER_COPY = ("rewrite", "protect", "sendto")
#: CPU time of this thread: time spent preempted by other processes is not counted, so a
#: busy machine inflates the figures less than a wall clock would (caches still suffer).
CLOCK = time.thread_time_ns
DEMUX_BATCH = 256
#: packets sent through the whole path before measuring (every subscription started)
WARMUP = 4
_EMPTY: list[tuple[int, bytes]] = []

Address = tuple[str, int]

#: what each stage times, for the JSON
STAGE_DEFINITIONS = {
    "demux": "MediaPort.datagram_received, the publisher leg's receive_rtp a no-op",
    "unprotect": "SrtpSession.unprotect of the publisher leg",
    "route": "PublisherLeg.receive_rtp(data, plain) with the track's outputs emptied",
    "rewrite": "OutboundStream.forward of every output, its protect a no-op",
    "protect": "SrtpSession.protect of every subscriber leg",
    "sendto": "the sender's send(batch) of every copy",
    "forward": "MediaPort.datagram_received with the real sender",
}


@dataclass
class Endpoint:
    """The uvloop datagram endpoint the relay would send from, and the sender over it."""

    sock: socket.socket
    transport: asyncio.DatagramTransport
    sender: DatagramSender
    #: how the sender sends, for the JSON
    description: str


def make_sender(sock: socket.socket, transport: asyncio.DatagramTransport) -> tuple[Any, str]:
    """``relay.udp.BatchSender(sock, transport.sendto)`` as ``relay serve`` builds it, or
    uvloop's ``transport.sendto`` per copy where ``relay.udp`` is missing; and what it is."""
    try:
        from relay import udp
    except ImportError as exc:
        return (
            CallbackSender(transport.sendto),
            f"uvloop transport.sendto per copy (relay.udp not importable: {exc})",
        )
    sender = udp.BatchSender(sock, transport.sendto)
    if sender.batched:
        return sender, "relay.udp.BatchSender: one sendmmsg per packet's copies (uvloop socket)"
    return sender, (
        f"relay.udp.BatchSender without sendmmsg ({udp.sendmmsg_unavailable}): "
        "socket sendto per copy"
    )


def sink_socket() -> socket.socket:
    """A non-blocking UDP socket on 127.0.0.1 with a large receive buffer: where the relay's
    copies go in a bench, drained between samples."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sink.bind(("127.0.0.1", 0))
    sink.setblocking(False)
    return sink


class Bench:
    """A :class:`LoopbackRelay` with one publisher and ``fanout`` connected subscribers whose
    addresses are sink sockets, every subscription already forwarding."""

    def __init__(self, kind: str, fanout: int) -> None:
        self.kind = kind
        self.fanout = fanout
        self.sinks = [sink_socket() for _ in range(fanout + 1)]
        # the relay runs on time.monotonic (its timers are not driven here: nothing is due)
        self.relay = LoopbackRelay(clock=time.monotonic)
        self.ssrc = 0x1234567
        self.pt = AUDIO_PT if kind == "audio" else VIDEO_PT
        self.pub_addr: Address = self.sinks[0].getsockname()
        self.pub: ClientPeer = self.relay.add_publisher(
            "pub", [TrackSpec(kind, self.ssrc, "0")], self.pub_addr
        )
        self.subs = [
            self.relay.add_subscriber(f"s{i}", sink.getsockname())
            for i, sink in enumerate(self.sinks[1:])
        ]
        leg = self.relay.leg("pub")
        assert isinstance(leg, PublisherLeg)
        self.leg = leg
        self.track = self.relay.track("pub", self.ssrc)
        assert len(self.track.outputs) == fanout, "every subscription must be active"
        self.seq = 0
        self.relay.outbox.clear()  # keyframe requests on activation
        for datagram in self.packets(WARMUP, SIZES[kind]):
            self.relay.port.datagram_received(datagram, self.pub_addr)
        got = self.relay.deliver()
        if any(len(got[f"s{i}"].rtp) != WARMUP for i in range(fanout)):
            raise RuntimeError("the subscribers did not get the warm-up packets")
        assert all(not s.rewriter.starting for s in self.track.outputs)

    def packets(self, count: int, size: int) -> list[bytes]:
        """``count`` SRTP packets of about ``size`` bytes from the publisher, new sequence
        numbers (protected by the publisher's peer, outside the relay)."""
        # a VP8 payload descriptor that starts a keyframe (S=1, then P=0): a new subscription
        # starts on it, as the load generator's stamped packets do
        payload = b"\x10" + bytes(max(8, size - 36) - 1)
        out = []
        for _ in range(count):
            self.seq += 1
            out.append(self.pub.protect_rtp(self.ssrc, self.pt, self.seq, self.seq * 960, payload))
        return out

    def drain(self) -> int:
        """Empty the sink sockets; how many datagrams the subscribers' sinks held."""
        count = 0
        for i, sink in enumerate(self.sinks):
            try:
                while True:
                    sink.recv(2048)
                    count += i > 0
            except BlockingIOError:
                pass
        return count

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def _clock_overhead() -> float:
    """ns one reading of :data:`CLOCK` adds to an interval (median of many)."""
    clock = CLOCK
    pairs = np.empty(2000, dtype=np.float64)
    for i in range(pairs.size):
        t0 = clock()
        pairs[i] = clock() - t0
    return float(np.median(pairs))


def _time(
    batches: int, batch: int, run: Callable[[int], None], drain: Callable[[], object]
) -> np.ndarray:
    """ns of CPU per packet for each of ``batches`` calls of ``run(b)`` (``batch`` packets each);
    ``drain`` runs untimed every 8 batches."""
    clock = CLOCK
    overhead = _clock_overhead()
    out = np.empty(batches, dtype=np.float64)
    gc.disable()
    try:
        for b in range(batches):
            t0 = clock()
            run(b)
            out[b] = max(0.0, clock() - t0 - overhead) / batch
            if b % 8 == 7:
                drain()
    finally:
        gc.enable()
    return out


def _summary(ns: np.ndarray) -> dict[str, float]:
    qs = np.percentile(ns, PERCENTILES)
    out = {f"p{p:g}": round(float(q), 1) for p, q in zip(PERCENTILES, qs, strict=True)}
    out["mean"] = round(float(ns.mean()), 1)
    out["samples"] = int(ns.size)
    return out


def _noop_rtp(data: bytes, plain: bytes | None = None) -> None:
    return None


def _identity(packet: bytes) -> bytes:
    return packet


def measure(kind: str, fanout: int, samples: int, endpoint: Endpoint) -> dict[str, Any]:
    """Every stage for one packet size and fan-out."""
    size = SIZES[kind]
    bench = Bench(kind, fanout)
    try:
        relay, leg, track = bench.relay, bench.leg, bench.track
        port = relay.port
        addr = bench.pub_addr
        srtp = leg.transport.srtp
        assert srtp is not None
        outputs = list(track.outputs)
        batch = max(1, 32 // fanout)
        n = samples * batch
        drain = bench.drain
        results: dict[str, np.ndarray] = {}

        # demux: the port's own dispatch, the leg's RTP step a no-op on this instance only
        probe = bench.packets(1, size)[0]
        receive = port.datagram_received
        leg.receive_rtp = _noop_rtp  # type: ignore[method-assign]
        try:

            def demux(b: int) -> None:
                for _ in range(DEMUX_BATCH):
                    receive(probe, addr)

            results["demux"] = _time(samples, DEMUX_BATCH, demux, lambda: None)
        finally:
            del leg.receive_rtp
        assert leg.receive_rtp.__func__ is PublisherLeg.receive_rtp  # type: ignore[attr-defined]

        # unprotect (fresh sequence numbers: the replay window forbids repeats)
        protected = bench.packets(n, size)
        plains: list[bytes] = []
        unprotect = srtp.unprotect

        def run_unprotect(b: int) -> None:
            for i in range(b * batch, (b + 1) * batch):
                plains.append(unprotect(protected[i]))

        results["unprotect"] = _time(samples, batch, run_unprotect, lambda: None)

        # route: the leg's RTP step after SRTP, the track's fan-out emptied
        route_rtp = leg.receive_rtp
        packets_in = relay.sfu.metrics.packets_in
        track.outputs = []
        try:

            def route(b: int) -> None:
                for i in range(b * batch, (b + 1) * batch):
                    route_rtp(protected[i], plains[i])

            results["route"] = _time(samples, batch, route, lambda: None)
        finally:
            track.outputs = outputs
        if relay.sfu.metrics.packets_in - packets_in != n:
            raise RuntimeError("route: not every packet reached the track")

        # rewrite: every output's forward, SRTP a no-op (untimed: the parse route did)
        parsed = []
        for data, plain in zip(protected, plains, strict=True):
            _pt, seq, ts, _ssrc, _m, offset, ext_offset, ext_length = parse_rtp(plain)
            elements = (
                parse_extensions(plain, ext_offset, ext_length, extension_profile(plain))
                if ext_length
                else _EMPTY
            )
            parsed.append((plain, offset, seq, ts, elements, len(data)))
        plains.clear()
        batches: list[list[tuple[bytes, Address]]] = []
        now = relay.clock()
        saved = [stream.protect for stream in outputs]
        for stream in outputs:
            stream.protect = _identity
        try:

            def rewrite(b: int) -> None:
                for i in range(b * batch, (b + 1) * batch):
                    plain, offset, seq, ts, elements, length = parsed[i]
                    copies: list[tuple[bytes, Address]] = []
                    for stream in outputs:
                        stream.forward(plain, offset, seq, ts, elements, length, now, copies)
                    batches.append(copies)

            results["rewrite"] = _time(samples, batch, rewrite, lambda: None)
        finally:
            for stream, own_protect in zip(outputs, saved, strict=True):
                stream.protect = own_protect
        parsed.clear()
        if any(len(copies) != fanout for copies in batches):
            raise RuntimeError("rewrite: a stream made no copy")

        # protect: every subscriber leg's SRTP session
        sessions = []
        for stream in outputs:
            assert stream.transport is not None and stream.transport.srtp is not None
            sessions.append(stream.transport.srtp.protect)
        sealed: list[list[tuple[bytes, Address]]] = []

        def protect(b: int) -> None:
            for i in range(b * batch, (b + 1) * batch):
                sealed.append([(p(c), a) for p, (c, a) in zip(sessions, batches[i], strict=True)])

        results["protect"] = _time(samples, batch, protect, lambda: None)
        batches.clear()

        # sendto: the sender's send of every copy of a packet, to the sinks
        sender = endpoint.sender
        send = sender.send
        drain()

        def run_send(b: int) -> None:
            for i in range(b * batch, (b + 1) * batch):
                send(sealed[i])

        results["sendto"] = _time(samples, batch, run_send, drain)
        sealed.clear()

        # the whole path through the port, with the real sender
        whole = bench.packets(n, size)
        drain()
        received = [0]

        def count() -> None:
            received[0] += drain()

        def forward(b: int) -> None:
            for i in range(b * batch, (b + 1) * batch):
                receive(whole[i], addr)

        before = relay.sfu.metrics.packets_out
        with relay.sending_with(sender):
            results["forward"] = _time(samples, batch, forward, count)
        count()
        forwarded = relay.sfu.metrics.packets_out - before
        if forwarded != n * fanout:
            raise RuntimeError(f"forwarded {forwarded} copies, expected {n * fanout}")
        fallback = getattr(sender, "sent_fallback", 0)
        if received[0] + fallback < n * fanout:
            raise RuntimeError(f"the sinks got {received[0]} copies of {n * fanout}")
    finally:
        bench.close()
    out: dict[str, Any] = {
        "kind": kind,
        "packet_bytes": len(protected[0]),
        "fanout": fanout,
        "batch": batch,
        "stages_ns": {k: _summary(v) for k, v in results.items()},
        "copies_received": received[0],
    }
    out["per_copy_ns"] = {k: _summary(results[k] / fanout) for k in (*PER_COPY, "forward")}
    parts = sum(float(np.median(results[k])) for k in STAGES if k != "forward")
    out["sum_of_stage_medians_ns"] = round(parts, 1)
    out["forward_minus_stages_ns"] = round(float(np.median(results["forward"])) - parts, 1)
    return out


async def open_endpoint() -> Endpoint:
    """A uvloop datagram endpoint on 127.0.0.1 with a 4 MiB send buffer, and its sender."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=sock)
    sender, description = make_sender(sock, transport)
    return Endpoint(sock, transport, sender, description)


async def _run_all(
    fanouts: Sequence[int], samples: int, progress: Callable[[str, float], None]
) -> tuple[list[dict[str, Any]], str, dict[str, int]]:
    endpoint = await open_endpoint()
    try:
        results: list[dict[str, Any]] = []
        total = len(fanouts) * len(SIZES)
        for kind in SIZES:
            for fanout in fanouts:
                progress(f"hotpath {kind} x{fanout}", len(results) / total)
                results.append(measure(kind, fanout, samples, endpoint))
        progress("done", 1.0)
        sender = endpoint.sender
        counters = {
            name: getattr(sender, name)
            for name in ("sent_batched", "sendmmsg_calls", "sent_direct", "sent_fallback")
            if hasattr(sender, name)
        }
        return results, endpoint.description, counters
    finally:
        endpoint.transport.close()


def run(
    fanouts: Sequence[int] = FANOUTS,
    samples: int = 2000,
    progress: Callable[[str, float], None] = lambda m, f: None,
) -> dict[str, Any]:
    """Every stage for both packet sizes and every fan-out (uvloop, this process)."""
    import os

    import uvloop

    from bench.common import cpu_seconds, machine_busy_seconds

    started = time.monotonic()
    busy0, own0 = machine_busy_seconds(), cpu_seconds(os.getpid())
    results, sender, counters = uvloop.run(_run_all(fanouts, samples, progress))
    wall = time.monotonic() - started
    busy1, own1 = machine_busy_seconds(), cpu_seconds(os.getpid())
    return {
        "background_cpu_fraction": round(max(0.0, (busy1 - busy0 - (own1 - own0)) / wall), 3),
        "method": "batches timed with the thread's CPU clock (thread_time_ns, overhead "
        "subtracted), ns per input packet; per-copy figures divide by the fan-out; "
        f"stages call the relay's own code (LoopbackRelay); sender: {sender}",
        "sender": sender,
        "sender_counters": counters,
        "stage_definitions": dict(STAGE_DEFINITIONS),
        "samples_per_stage": samples,
        "fanouts": list(fanouts),
        "sizes": dict(SIZES),
        "results": results,
        "seconds": round(time.monotonic() - started, 1),
    }
