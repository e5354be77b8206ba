"""What waking another process costs on this machine, with no relay code in the way.

A room spread over worker processes costs, per piped packet, the pipe's own work
(``python -m bench.pipe``: the copy, ``sendto``, the receiving worker's parse and history) and
one wake-up of the receiving worker: packets reach the publisher's worker one at a time and go
down the pipe as they come, so the other worker, asleep in its event loop, is woken for nearly
every one. On bare metal a wake-up costs a few microseconds; in a virtual machine an idle
virtual CPU may have given its core back to the host, and both the wake (an inter-processor
interrupt) and the first system calls after it cost far more. This probe measures that floor.

``python -m bench.wakeup [--rate 104] [--packets 600]`` starts a receiver process (a uvloop
event loop with a UDP socket whose callback only counts: a worker that does nothing with the
packet) pinned to one core, and sends it ``--packets`` datagrams of 1200 B at ``--rate`` per
second from this process, pinned to another core. It reports, in CPU time:

- **warm send**: one ``sendto`` right after another (to a socket nobody reads);
- **first send after idle**: the first ``sendto`` after sleeping until the next packet is due
  (the cost of a cold kernel path, paid by any process woken per packet, pipe or not);
- **send that wakes**: a ``sendto`` to the sleeping receiver right after that first one (so
  warm): what the publisher's worker pays on top of a warm send to wake the other worker;
- **receiver per wake**: the receiver's own CPU per datagram (it sleeps between them: its
  voluntary context switches are counted), event loop and kernel included.

The floor of a piped packet on this machine is then ``(send that wakes - warm send) + receiver
per wake``: what any design that forwards each packet down the pipe as it arrives pays, before
its own work. ``python -m bench load --workers 1,2`` runs this probe and sets the floor beside
the pipe cost it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import time
from typing import Any

import numpy as np

from bench.common import pin_to, pinning_preexec

SIZE = 1200
RATE = 104.0  # one 1 Mbit/s video stream of 1200 B packets, as the worker bench sends


def _usage() -> tuple[float, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_nvcsw


def _cores() -> tuple[int | None, int | None]:
    """(sender's core, receiver's core): the first two this process may use, or no pinning."""
    available = sorted(os.sched_getaffinity(0))
    return (available[0], available[1]) if len(available) >= 2 else (None, None)


def receive(packets: int, skip: int) -> None:
    """The receiver: print the bound port, count ``packets`` datagrams in a uvloop event loop,
    then print its CPU seconds and voluntary context switches between the ``skip``-th and the
    last (as JSON, one line)."""
    import uvloop

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        marks: list[tuple[float, int]] = []

        class Counter(asyncio.DatagramProtocol):
            count = 0

            def datagram_received(self, data: bytes, addr: Any) -> None:
                Counter.count += 1
                if Counter.count in (skip, packets):
                    marks.append(_usage())
                    if Counter.count == packets and not done.done():
                        done.set_result(None)

        transport, _ = await loop.create_datagram_endpoint(Counter, local_addr=("127.0.0.1", 0))
        print(transport.get_extra_info("sockname")[1], flush=True)
        await asyncio.wait_for(done, timeout=packets + 30)  # at 1 datagram/s or more
        transport.close()
        (cpu0, switches0), (cpu1, switches1) = marks
        return {"cpu_s": cpu1 - cpu0, "sleeps": switches1 - switches0, "packets": packets - skip}

    print(json.dumps(uvloop.run(main())), flush=True)


def measure(rate: float = RATE, packets: int = 600) -> dict[str, float]:
    """The probe: µs of CPU per warm send, first send after idle, waking send and receiver
    wake (medians of the sends; the receiver's mean), the receiver's sleeps per datagram, and
    the floor ``wake_send_us - warm_send_us + receiver_us``."""
    skip = min(50, packets // 4)
    send_core, receive_core = _cores()
    command = [
        sys.executable,
        "-m",
        "bench.wakeup",
        "--receiver",
        str(packets),
        "--skip",
        str(skip),
    ]
    pin = None if receive_core is None else pinning_preexec(receive_core)
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, preexec_fn=pin)
    previous = os.sched_getaffinity(0)
    unread = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the wake-up probe's receiver did not start: {line!r}")
        port = int(line)
        if send_core is not None:
            pin_to(send_core)
        unread.bind(("127.0.0.1", 0))
        unread.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        out.setblocking(False)
        nowhere, receiver = unread.getsockname(), ("127.0.0.1", port)
        data = bytes(SIZE)
        clock = time.thread_time_ns
        warm = []
        for _ in range(packets):
            start = clock()
            out.sendto(data, nowhere)
            warm.append(clock() - start)
        cold, waking = [], []
        interval = 1.0 / rate
        due = time.monotonic()
        for _ in range(packets):
            due += interval
            time.sleep(max(0.0, due - time.monotonic()))
            start = clock()
            out.sendto(data, nowhere)
            middle = clock()
            out.sendto(data, receiver)
            cold.append(middle - start)
            waking.append(clock() - middle)
        line = child.stdout.readline()
        if not line.startswith("{"):
            raise RuntimeError("the wake-up probe's receiver did not get every datagram")
        report = json.loads(line)
    finally:
        os.sched_setaffinity(0, previous)
        unread.close()
        out.close()
        if child.poll() is None:
            child.kill()
        child.wait()
    receiver_us = report["cpu_s"] / report["packets"] * 1e6
    warm_us = float(np.median(warm)) / 1000
    wake_us = float(np.median(waking[skip:])) / 1000
    return {
        "rate": rate,
        "packets": packets,
        "pinned": send_core is not None,
        "warm_send_us": warm_us,
        "cold_send_us": float(np.median(cold[skip:])) / 1000,
        "wake_send_us": wake_us,
        "receiver_us": receiver_us,
        "receiver_sleeps_per_packet": report["sleeps"] / report["packets"],
        "floor_us": max(0.0, wake_us - warm_us) + receiver_us,
    }


def describe(result: dict[str, float]) -> list[str]:
    """The probe's figures as lines of text."""
    return [
        f"  warm sendto:                          {result['warm_send_us']:6.1f} us",
        f"  first sendto after idle:              {result['cold_send_us']:6.1f} us",
        f"  sendto that wakes the other process:  {result['wake_send_us']:6.1f} us",
        f"  receiver, CPU per wake-up:            {result['receiver_us']:6.1f} us "
        f"({result['receiver_sleeps_per_packet']:.2f} sleeps per datagram)",
        f"  floor of a piped packet (waking send - warm send + receiver): "
        f"{result['floor_us']:.1f} us",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=RATE, help="datagrams per second")
    parser.add_argument("--packets", type=int, default=600)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--receiver", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--skip", type=int, default=50, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver is not None:
        receive(args.receiver, args.skip)
        return
    result = measure(args.rate, args.packets)
    where = "two cores" if result["pinned"] else "one core, unpinned"
    print(f"CPU of waking another process, {args.packets} datagrams at {args.rate:g}/s ({where})")
    for line in describe(result):
        print(line)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
