"""What the pipe between worker processes costs per packet, against one forwarded copy.

``python -m bench.pipe [--packets 1000] [--rounds 30]`` builds two relays in this process
(:class:`relay.client.loopback.LoopbackRelay`, the relay's own code): worker A with a
publisher of one video track, worker B with one subscriber of that track, imported from A over
a real loopback UDP pipe (a :class:`relay.workers.pipe.PipeEndpoint` on each, real sockets,
``relay.udp.BatchSender`` as the worker's pipe socket uses). It times, in CPU time of this
thread (user and system: the syscalls are in), per packet of 1200 bytes:

- **export**: A's ``Track.receive`` with its pipe tap (the copy, its pipe SSRC, ``sendto``) less
  the same without the tap;
- **import**: on B, ``recv`` of the piped datagram and ``PipeEndpoint.datagram_received``
  (parse, route, statistics, history, keyframe check), B's fan-out emptied;
- **copy**: one forwarded copy on B: ``Track.receive`` with the subscriber's stream (rewrite,
  protect, ``sendto``) less the same with no stream.

and prints them with the pipe's share of the CPU per forwarded packet for one room of N
subscribers spread over W workers: ``(W - 1) * (export + import) / (N * copy + (W - 1) *
(export + import))`` (the publisher's ingress, paid once in either case, left out). Medians over
``--rounds`` rounds of ``--packets`` packets. Process-level figures (the same pipe inside
``relay serve``, with the event loops, the front and the kernel's scheduling) are in
``python -m bench load --workers 1,2``.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.hotpath import sink_socket
from relay.client.loopback import LoopbackRelay
from relay.client.peer import TrackSpec
from relay.rtc.rtp import parse_rtp
from relay.sfu.track import Track
from relay.udp import BatchSender
from relay.workers.pipe import PipeEndpoint

ROOM = "pipe"
SSRC = 0x1234567
VIDEO_PT = 96
SIZE = 1200
#: fan-outs and worker counts the share table shows
TABLE = [(2, 25), (2, 50), (2, 100), (16, 1000), (64, 1000), (64, 5000)]


def _packet(seq: int) -> bytes:
    """A plain VP8 packet that starts a keyframe (a stream may start on any of them)."""
    header = struct.pack("!BBHII", 0x80, 0x80 | VIDEO_PT, seq & 0xFFFF, seq * 3000, SSRC)
    return header + b"\x10" + bytes(SIZE - len(header) - 1)


def _receive(track: Track, packets: list[bytes]) -> None:
    """Hand plain packets to ``track`` as its publisher leg would (the step both the export
    and the forwarded copy are timed on)."""
    receive, now = track.receive, time.monotonic()
    for plain in packets:
        _pt, seq, ts, _ssrc, _m, offset, _eo, _el = parse_rtp(plain)
        receive(plain, seq, ts, offset, [], len(plain), now)


def _drain(sock: socket.socket) -> int:
    count = 0
    try:
        while True:
            sock.recv(4096)
            count += 1
    except BlockingIOError:
        return count


class PipeBench:
    """Worker A (publisher, pipe socket ``a_sock``) and worker B (one subscriber whose sink is
    ``sink``, pipe socket ``b_sock``), the track exported from A and imported by B."""

    def __init__(self) -> None:
        self.a_sock, self.b_sock, self.sink, self.pub_sink = (sink_socket() for _ in range(4))
        self.a = LoopbackRelay(room_id=ROOM, clock=time.monotonic)
        self.b = LoopbackRelay(room_id=ROOM, clock=time.monotonic, certificate=self.a.certificate)
        a_send = BatchSender(self.a_sock, self.a_sock.sendto)
        b_send = BatchSender(self.b_sock, self.b_sock.sendto)
        self.pipe_a = PipeEndpoint(self.a.sfu, a_send.send)
        self.pipe_b = PipeEndpoint(self.b.sfu, b_send.send)
        self.a.add_publisher("pub", [TrackSpec("video", SSRC, "0")], self.pub_sink.getsockname())
        self.track_a: Track = self.a.track("pub", SSRC)
        a_addr, b_addr = self.a_sock.getsockname(), self.b_sock.getsockname()
        description = self.pipe_a.export_track(ROOM, self.track_a.track_id, list(b_addr))
        description = json.loads(json.dumps(description))
        self.pipe_b.import_track(ROOM, list(a_addr), description)
        self.a_addr = a_addr
        self.b.add_subscriber("sub", self.sink.getsockname())
        sub = self.b.participant("sub")
        [subscription] = sub.subscriptions.values()
        self.track_b: Track = subscription.track
        self.b.sfu.media.sender = BatchSender(self.sink, self.sink.sendto)
        self.seq = 0
        # a first keyframe through the whole pipe: B's stream starts and forwards
        _receive(self.track_a, self.next_packets(3))
        self.import_all()
        if _drain(self.sink) < 3 or not self.track_b.outputs:
            raise RuntimeError("the piped packets did not reach B's subscriber")
        if self.track_b.outputs[0].rewriter.starting:
            raise RuntimeError("B's stream did not start")

    def next_packets(self, count: int) -> list[bytes]:
        out = []
        for _ in range(count):
            self.seq += 1
            out.append(_packet(self.seq))
        return out

    def import_all(self) -> int:
        """Every piped datagram waiting on B's pipe socket, read and handed to B's endpoint."""
        recv, received, addr = self.b_sock.recv, self.pipe_b.datagram_received, self.a_addr
        count = 0
        try:
            while True:
                received(recv(4096), addr)
                count += 1
        except BlockingIOError:
            return count

    def close(self) -> None:
        for sock in (self.a_sock, self.b_sock, self.sink, self.pub_sink):
            sock.close()


def _cpu(work: Callable[[], Any]) -> float:
    start = time.thread_time_ns()
    work()
    return float(time.thread_time_ns() - start)


def measure(packets: int, rounds: int) -> dict[str, float]:
    """ns of CPU per packet: export, import and one forwarded copy (medians of ``rounds``)."""
    bench = PipeBench()
    try:
        export, import_, copy = [], [], []
        taps = bench.track_a.pipes
        outputs = bench.track_b.outputs
        for _ in range(rounds):
            # export: with the tap, then without (B's socket emptied after each)
            batch = bench.next_packets(packets)
            with_tap = _cpu(lambda batch=batch: _receive(bench.track_a, batch))
            bench.track_a.pipes = []
            batch = bench.next_packets(packets)
            without = _cpu(lambda batch=batch: _receive(bench.track_a, batch))
            bench.track_a.pipes = taps
            export.append((with_tap - without) / packets)
            # import: the first batch's datagrams, B's fan-out emptied
            bench.track_b.outputs = []
            got: list[int] = []
            spent = _cpu(lambda got=got: got.append(bench.import_all()))
            bench.track_b.outputs = outputs
            if got[0] != packets:
                raise RuntimeError(f"{got[0]} of {packets} piped packets arrived")
            import_.append(spent / packets)
            # one copy on B: with the subscriber's stream, then with none
            batch = bench.next_packets(packets)
            with_stream = _cpu(lambda batch=batch: _receive(bench.track_b, batch))
            bench.track_b.outputs = []
            batch = bench.next_packets(packets)
            alone = _cpu(lambda batch=batch: _receive(bench.track_b, batch))
            bench.track_b.outputs = outputs
            copy.append((with_stream - alone) / packets)
            if _drain(bench.sink) != packets:
                raise RuntimeError("B's subscriber did not get every forwarded copy")
        return {
            "export_ns": float(np.median(export)),
            "import_ns": float(np.median(import_)),
            "copy_ns": float(np.median(copy)),
        }
    finally:
        bench.close()


def share(result: dict[str, float], workers: int, subscribers: int) -> float:
    """The pipe's share of the CPU per forwarded packet, N subscribers spread over W workers."""
    pipe = (workers - 1) * (result["export_ns"] + result["import_ns"])
    return pipe / (subscribers * result["copy_ns"] + pipe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    r = measure(args.packets, args.rounds)
    print(f"CPU per packet of {SIZE} B (medians of {args.rounds} x {args.packets} packets)")
    print(
        f"  pipe, export (copy + sendto on the publisher's worker): {r['export_ns'] / 1000:6.1f} us"
    )
    print(
        f"  pipe, import (recv + route + history on the other):     {r['import_ns'] / 1000:6.1f} us"
    )
    print(
        f"  one forwarded copy (rewrite + protect + sendto):        {r['copy_ns'] / 1000:6.1f} us"
    )
    pipe = r["export_ns"] + r["import_ns"]
    print(f"  one piped packet = {pipe / r['copy_ns']:.2f} forwarded copies")
    print("pipe share of the CPU per forwarded packet, one room spread over W workers:")
    table = {}
    for workers, subscribers in TABLE:
        value = share(r, workers, subscribers)
        table[f"W={workers},N={subscribers}"] = value
        print(f"  W = {workers:2d}, N = {subscribers:5d}: {100 * value:5.1f} %")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(
                {**r, "packets": args.packets, "rounds": args.rounds, "share": table},
                file,
                indent=2,
            )


if __name__ == "__main__":
    main()
