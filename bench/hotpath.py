"""The packet path's stages in isolation, in this process, on the relay's own objects.

A real :class:`relay.sfu.sfu.Sfu` is set up without sockets: a publisher and N subscribers,
each a :class:`relay.rtc.peer.ClientPeer` that does the whole ICE/DTLS handshake with the
media router in memory. Then each stage is timed on the state that setup produced:

- ``demux``: the dispatch prologue of ``MediaRouter.handle_datagram`` (first byte, transport
  by address, SRTP session, RTP/RTCP split), copied here because it is inline code;
- ``unprotect``: ``SrtpSession.unprotect`` of the publisher's transport;
- ``route``: ``parse_rtp``, header extensions, the SSRC -> track lookup and its outputs;
- ``rewrite``: for every subscriber, ``SequenceRewriter.rewrite``, the transport-wide sequence
  number (when negotiated: ``relay.rtc.peer`` accepts every extension the relay offers, as a
  browser does), ``ExtensionRewriter.block``, ``rewrite_packet`` and, when the subscription
  keeps one, storing the copy in its NACK history;
- ``protect``: for every subscriber, ``SrtpSession.protect`` of its transport;
- ``sendto``: for every subscriber, the uvloop ``DatagramTransport.sendto`` the relay uses, to
  sink sockets on 127.0.0.1 (drained between samples, untimed);
- ``forward``: the whole ``MediaRouter.handle_datagram`` with that real ``sendto``.

One sample is a batch of packets timed with the thread's CPU clock (``thread_time_ns``, its
own overhead subtracted) and divided by the batch size;
the per-subscriber stages are per input packet (all copies), ``*_per_copy`` divides by N.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bench.common import PERCENTILES
from relay.config import Settings
from relay.metrics import Metrics
from relay.rtc.dtls import Certificate
from relay.rtc.peer import ClientPeer, RemoteDescription, TrackSpec
from relay.rtc.rtp import extension_profile, is_rtcp, parse_extensions, parse_rtp, rewrite_packet
from relay.sfu.sfu import Sfu

FANOUTS = (1, 2, 5, 10, 20, 50)
SIZES = {"audio": 120, "video": 1200}
STAGES = ("demux", "unprotect", "route", "rewrite", "protect", "sendto", "forward")
PER_COPY = ("rewrite", "protect", "sendto")
#: CPU time of this thread: time spent preempted by other processes is not counted, so a
#: busy machine inflates the figures less than a wall clock would (caches still suffer).
CLOCK = time.thread_time_ns
DEMUX_BATCH = 256
_EMPTY: list[tuple[int, bytes]] = []

Address = tuple[str, int]


class Bench:
    """An in-memory relay with one publisher and ``fanout`` connected subscribers."""

    def __init__(self, kind: str, fanout: int) -> None:
        base = Settings()
        settings = dataclasses.replace(
            base,
            limits=dataclasses.replace(base.limits, max_participants_per_room=max(fanout + 1, 2)),
        )
        self.kind = kind
        self.fanout = fanout
        self.outbox: list[tuple[bytes, Address]] = []
        self.certificate = Certificate.generate()
        self.sfu = Sfu(
            settings,
            certificate=self.certificate,
            candidates=[("127.0.0.1", 9)],
            send=lambda data, addr: self.outbox.append((data, addr)),
            metrics=Metrics(),
        )
        self.router = self.sfu.router
        self.sinks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(fanout)]
        for sink in self.sinks:
            sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sink.bind(("127.0.0.1", 0))
            sink.setblocking(False)
        self.pub_addr: Address = ("127.0.0.1", 1)  # never sent to: the publisher gets no RTP
        self.ssrc = 0x1234567
        self.pub = ClientPeer(self.certificate, consent_interval=3600)
        room = self.sfu.create_room("bench", max_participants=fanout + 1)
        self.sfu.add_participant(room.room_id, "pub", can_subscribe=False)
        offer = self.pub.create_offer([TrackSpec(kind, self.ssrc, "0")])
        answer = self.sfu.publisher_offer(room.room_id, "pub", offer)
        self.pub.set_remote_description(RemoteDescription.parse(answer))
        self._handshake(self.pub, self.pub_addr)
        self.subs: list[ClientPeer] = []
        for i, sink in enumerate(self.sinks):
            who = f"s{i}"
            self.sfu.add_participant(room.room_id, who, can_publish=False)
            sdp, revision = self.sfu.subscriber_offer(room.room_id, who)
            peer = ClientPeer(self.certificate, consent_interval=3600)
            remote = RemoteDescription.parse(sdp, revision)
            self.sfu.subscriber_answer(room.room_id, who, peer.create_answer(remote), revision)
            peer.set_remote_description(remote)
            self._handshake(peer, sink.getsockname())
            self.subs.append(peer)
        self.publisher = room.participants["pub"]
        self.track = self.publisher.ssrc_map[self.ssrc]
        assert len(self.track.outputs) == fanout, "every subscription must be active"
        self.seq = 0

    def _handshake(self, peer: ClientPeer, addr: Address) -> None:
        now = time.monotonic()
        pending = peer.start(now)
        for _ in range(200):
            for datagram in pending:
                self.router.handle_datagram(datagram, addr)
            pending = []
            for data, to in self.outbox:
                if to == addr:
                    pending += peer.receive(data, time.monotonic())
            self.outbox.clear()
            if peer.connected and not pending:
                transport = self.router.by_addr.get(addr)
                if transport is not None and transport.ready:
                    return
            if not pending:
                pending = peer.handle_timeout(time.monotonic() + 1.0)
        raise RuntimeError("in-memory handshake did not finish")

    def packets(self, count: int, size: int) -> list[bytes]:
        """``count`` SRTP packets of about ``size`` bytes from the publisher, new sequence numbers."""
        pt = 111 if self.kind == "audio" else 96
        # a VP8 payload descriptor that starts a keyframe (S=1, then P=0): a new subscription
        # starts on it, as the load generator's stamped packets do
        payload = b"\x10" + bytes(max(8, size - 36) - 1)
        out = []
        for _ in range(count):
            self.seq += 1
            out.append(self.pub.protect_rtp(self.ssrc, pt, self.seq, self.seq * 960, payload))
        return out

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def drain(self) -> None:
        for sink in self.sinks:
            try:
                while True:
                    sink.recv(2048)
            except BlockingIOError:
                pass


def _time(
    batches: int, batch: int, run: Callable[[int], None], drain: Callable[[], None]
) -> np.ndarray:
    """ns per packet for each batch."""
    clock = time.perf_counter_ns
    out = np.empty(batches, dtype=np.float64)
    gc.disable()
    try:
        for b in range(batches):
            t0 = clock()
            run(b)
            out[b] = (clock() - t0) / batch
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


def measure(kind: str, fanout: int, samples: int, transport: Any) -> dict[str, Any]:
    """Every stage for one packet size and fan-out."""
    size = SIZES[kind]
    bench = Bench(kind, fanout)
    try:
        router = bench.router
        pub_transport = router.by_addr[bench.pub_addr]
        srtp = pub_transport.srtp
        assert srtp is not None
        addr = bench.pub_addr
        outputs = bench.track.outputs
        batch = max(1, 32 // fanout)
        n = samples * batch
        drain = bench.drain
        results: dict[str, np.ndarray] = {}

        # demux
        by_addr = router.by_addr
        probe = bench.packets(1, size)[0]

        def demux(b: int) -> None:
            for _ in range(DEMUX_BATCH):
                data = probe
                first = data[0]
                if 127 < first < 192:
                    t = by_addr.get(addr)
                    if t is not None and t.srtp is not None:
                        is_rtcp(data)

        results["demux"] = _time(samples, DEMUX_BATCH, demux, lambda: None)

        # unprotect (fresh sequence numbers: the replay window forbids repeats)
        protected = bench.packets(n, size)
        plains: list[bytes] = []
        unprotect = srtp.unprotect

        def run_unprotect(b: int) -> None:
            for i in range(b * batch, (b + 1) * batch):
                plains.append(unprotect(protected[i]))

        results["unprotect"] = _time(samples, batch, run_unprotect, lambda: None)

        # route
        ssrc_map = bench.publisher.ssrc_map
        parsed: list[tuple[Any, ...]] = []

        def route(b: int) -> None:
            for i in range(b * batch, (b + 1) * batch):
                plain = plains[i]
                pt, seq, ts, ssrc, _m, off, ext_off, ext_len = parse_rtp(plain)
                elements = (
                    parse_extensions(plain, ext_off, ext_len, extension_profile(plain))
                    if ext_len
                    else _EMPTY
                )
                track = ssrc_map.get(ssrc)
                if track is not None and pt == track.payload_type:
                    parsed.append((plain, seq, ts, off, elements, track.outputs))

        results["route"] = _time(samples, batch, route, lambda: None)

        # rewrite (all subscribers)
        rewritten: list[list[bytes]] = []
        now = time.monotonic()

        def rewrite(b: int) -> None:
            for i in range(b * batch, (b + 1) * batch):
                plain, seq, ts, off, elements, outs = parsed[i]
                copies = []
                size = len(plain)
                for sub in outs:
                    out_seq, out_ts = sub.rewriter.rewrite(seq, ts, now)
                    out_transport = sub.subscriber.subscriber
                    twcc_id = getattr(out_transport, "twcc_id", 0)
                    if twcc_id:  # transport-wide sequence number, when the subscriber has it
                        stamp = out_transport.twcc_send.next_seq(size, now)
                        block = sub.ext.block(elements, [(twcc_id, stamp.to_bytes(2, "big"))])
                    else:
                        block = sub.ext.block(elements)
                    out = rewrite_packet(
                        plain, off, sub.ssrc, sub.payload_type, out_seq, out_ts, block
                    )
                    history = getattr(sub, "history", None)
                    if history is not None:  # NACK history of the subscription, when it has one
                        history.store(out_seq, out, now)
                    copies.append(out)
                rewritten.append(copies)

        results["rewrite"] = _time(samples, batch, rewrite, lambda: None)

        # protect (all subscribers)
        sessions = [sub.subscriber.subscriber.srtp.protect for sub in outputs]
        sealed: list[list[bytes]] = []

        def protect(b: int) -> None:
            for i in range(b * batch, (b + 1) * batch):
                sealed.append([p(c) for p, c in zip(sessions, rewritten[i], strict=True)])

        results["protect"] = _time(samples, batch, protect, lambda: None)

        # sendto (all subscribers), uvloop transport as in the relay
        sendto = transport.sendto
        targets = [sink.getsockname() for sink in bench.sinks]

        def send(b: int) -> None:
            for i in range(b * batch, (b + 1) * batch):
                for packet, target in zip(sealed[i], targets, strict=True):
                    sendto(packet, target)

        results["sendto"] = _time(samples, batch, send, drain)

        # whole forward through the router, with the real sendto
        router.send = sendto
        whole = bench.packets(n, size)
        handle = router.handle_datagram

        def forward(b: int) -> None:
            for i in range(b * batch, (b + 1) * batch):
                handle(whole[i], addr)

        before = bench.sfu.metrics.packets_out
        results["forward"] = _time(samples, batch, forward, drain)
        forwarded = bench.sfu.metrics.packets_out - before
        if forwarded != n * fanout:
            raise RuntimeError(f"forwarded {forwarded} copies, expected {n * fanout}")
    finally:
        bench.close()
    out: dict[str, Any] = {
        "kind": kind,
        "packet_bytes": len(protected[0]),
        "fanout": fanout,
        "batch": batch,
        "stages_ns": {k: _summary(v) for k, v in results.items()},
    }
    out["per_copy_ns"] = {k: _summary(results[k] / fanout) for k in (*PER_COPY, "forward")}
    parts = sum(float(np.median(results[k])) for k in STAGES if k != "forward")
    out["sum_of_stage_medians_ns"] = round(parts, 1)
    out["forward_minus_stages_ns"] = round(float(np.median(results["forward"])) - parts, 1)
    return out


async def _run_all(
    fanouts: Sequence[int], samples: int, progress: Callable[[str, float], None]
) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=sock)
    try:
        results = []
        total = len(fanouts) * len(SIZES)
        for kind in SIZES:
            for fanout in fanouts:
                progress(f"hotpath {kind} x{fanout}", len(results) / total)
                results.append(measure(kind, fanout, samples, transport))
        progress("done", 1.0)
        return results
    finally:
        transport.close()


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
    results = uvloop.run(_run_all(fanouts, samples, progress))
    wall = time.monotonic() - started
    busy1, own1 = machine_busy_seconds(), cpu_seconds(os.getpid())
    return {
        "background_cpu_fraction": round(max(0.0, (busy1 - busy0 - (own1 - own0)) / wall), 3),
        "method": "batches timed with the thread's CPU clock (thread_time_ns, overhead "
        "subtracted), ns per input packet; per-copy figures divide by the fan-out",
        "samples_per_stage": samples,
        "fanouts": list(fanouts),
        "sizes": dict(SIZES),
        "results": results,
        "seconds": round(time.monotonic() - started, 1),
    }
