"""What-if measurements for the relay's forwarding path: the current relay against variants
of it, on the same in-memory relay as ``python -m bench hotpath``, without editing the relay.

``python -m bench.whatif [--fanouts 1,10,50] [--samples 400] [--rounds 3]`` prints, per
fan-out, the CPU time of one forwarded video packet (ns per input packet, p50, the median over
the rounds) and its ratio to ``baseline``. Each round is one fresh relay on which the variants
take turns, one batch of packets each, sample after sample (so a change in the machine's load
hits them alike); a sample is timed with the thread's CPU clock as in the hot-path bench.

- ``baseline``: the relay as ``relay serve`` runs it: ``MediaPort.datagram_received`` with
  ``relay.udp.BatchSender`` (every copy of a packet in one ``sendmmsg``) on the socket of a
  uvloop datagram endpoint, ``transport.sendto`` as its fallback;
- ``uvloop_sendto``: the same with uvloop's ``transport.sendto`` per copy (what the relay did
  before ``BatchSender``);
- ``socket_sendto``: the same with the socket's own ``sendto`` per copy (one system call
  per copy, without uvloop's checks);
- ``no_history``: the baseline with the track's packet history switched off (no NACK is
  answered then): what the one store per packet into the track's history costs.

Direct SRTP through libsrtp, ``sendmmsg`` and one history per track, the candidates this
script used to measure, are now the relay itself. Every variant forwards fresh packets of the
same publisher to the same sink sockets; every copy must arrive.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
from typing import Any

import numpy as np

from bench.hotpath import CLOCK, Bench, _clock_overhead, _summary, open_endpoint
from relay.sfu.leg import CallbackSender, DatagramSender

VARIANTS = ("baseline", "uvloop_sendto", "socket_sendto", "no_history")
SIZE = 1200


def measure(fanout: int, samples: int) -> dict[str, Any]:
    """Every variant at one fan-out on one in-memory relay, the variants taking turns sample
    by sample (so a change in the machine's load hits them alike): ns of CPU per input packet
    for each, and the baseline's sender."""
    import uvloop

    async def run() -> dict[str, Any]:
        endpoint = await open_endpoint()
        bench = Bench("video", fanout)
        try:
            senders: dict[str, DatagramSender] = {
                "baseline": endpoint.sender,
                "uvloop_sendto": CallbackSender(endpoint.transport.sendto),
                "socket_sendto": CallbackSender(endpoint.sock.sendto),
                "no_history": endpoint.sender,
            }
            track = bench.track
            history = track.history
            media = bench.relay.sfu.media
            relay_sender = media.sender
            batch = max(1, 32 // fanout)
            packets = iter(bench.packets(samples * batch * len(VARIANTS), SIZE))
            addr = bench.pub_addr
            receive = bench.relay.port.datagram_received
            clock = CLOCK
            overhead = _clock_overhead()
            ns = {v: np.empty(samples, dtype=np.float64) for v in VARIANTS}
            bench.drain()
            arrived = 0
            gc.disable()
            try:
                for sample in range(samples):
                    for k in range(len(VARIANTS)):
                        variant = VARIANTS[(sample + k) % len(VARIANTS)]
                        media.sender = senders[variant]
                        track.history = None if variant == "no_history" else history
                        todo = [next(packets) for _ in range(batch)]
                        t0 = clock()
                        for packet in todo:
                            receive(packet, addr)
                        ns[variant][sample] = max(0.0, clock() - t0 - overhead) / batch
                    if sample % 2 == 1:
                        arrived += bench.drain()
            finally:
                gc.enable()
                media.sender = relay_sender
                track.history = history
            await asyncio.sleep(0)  # anything uvloop queued goes out
            arrived += bench.drain()
            expected = samples * batch * fanout * len(VARIANTS)
            if arrived != expected:
                raise RuntimeError(f"{arrived} of {expected} copies arrived")
            return {
                "fanout": fanout,
                "sender": endpoint.description,
                "ns": {v: _summary(values) for v, values in ns.items()},
            }
        finally:
            endpoint.transport.close()
            bench.close()

    return uvloop.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fanouts", default="1,10,50")
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3, help="fresh relays per fan-out")
    args = parser.parse_args()
    fanouts = [int(x) for x in args.fanouts.split(",")]
    print(f"ns of CPU per input packet (p50), video {SIZE} B; lower is better")
    for n in fanouts:
        medians: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            result = measure(n, args.samples)
            for v in VARIANTS:
                medians[v].append(result["ns"][v]["p50"])
        if n == fanouts[0]:
            print(f"baseline sender: {result['sender']}")
            print(f"{'fan-out':>8} " + " ".join(f"{v:>14}" for v in VARIANTS))
        best = {v: float(np.median(m)) for v, m in medians.items()}
        base = best["baseline"]
        print(f"{n:>8} " + " ".join(f"{best[v]:>9,.0f} {best[v] / base:>4.2f}" for v in VARIANTS))


if __name__ == "__main__":
    main()
