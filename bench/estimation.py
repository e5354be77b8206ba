"""What a subscriber's bandwidth estimate costs the relay: CPU per transport-cc feedback.

``python -m bench.estimation [--packets 13,50] [--feedbacks 2000]`` feeds one subscriber leg's
``TransportCcSender`` (the relay's own: the send history, ``feedback_report`` and the GCC
estimator) feedback built by ``TwccRecorder`` for packets it stamped, ``--packets`` per
feedback (a 1 Mbit/s video stream gives about 10 per 100 ms feedback), and prints the CPU
time per feedback (thread CPU clock, p50 and p90) with the estimate reached. Each
feedback is timed alone, so the clock's own cost (under a microsecond here) is included.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from relay.rtc.rtcp import TransportFeedback, parse_rtcp
from relay.rtc.twcc import TwccRecorder, parse_feedback
from relay.sfu.feedback import TransportCcSender


def measure(packets: int, feedbacks: int) -> dict[str, float]:
    """ns of CPU per feedback of ``packets`` packets (p50, p90) and the final estimate."""
    sender = TransportCcSender(ext_id=3)
    recorder = TwccRecorder(sender_ssrc=1, media_ssrc=2)
    now = 0.0
    arrival = 0.0
    spacing = 0.1 / packets  # one feedback per 100 ms
    clock = time.thread_time_ns
    samples = []
    for _ in range(feedbacks):
        for _ in range(packets):
            now += spacing
            seq = sender.stamp(1200, now)
            arrival = now + 0.02
            recorder.on_packet(seq, arrival)
        parsed = [
            parse_feedback(p.fci)
            for packet in recorder.build_feedback(arrival)
            for p in parse_rtcp(packet)
            if isinstance(p, TransportFeedback)
        ]
        t0 = clock()  # only the relay's handling of the feedback is timed
        for fb in parsed:
            sender.on_feedback(fb, now + 0.04)
        samples.append(clock() - t0)
    ns = np.asarray(samples)
    return {
        "packets_per_feedback": packets,
        "p50_ns": float(np.percentile(ns, 50)),
        "p90_ns": float(np.percentile(ns, 90)),
        "estimate_bps": float(sender.estimator.estimate),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", default="13,50")
    parser.add_argument("--feedbacks", type=int, default=2000)
    args = parser.parse_args()
    print("CPU per transport-cc feedback of one subscriber (GCC estimate included)")
    for packets in (int(x) for x in args.packets.split(",")):
        r = measure(packets, args.feedbacks)
        print(
            f"{packets:4d} packets/feedback: p50 {r['p50_ns'] / 1000:7.1f} us, "
            f"p90 {r['p90_ns'] / 1000:7.1f} us  (estimate {r['estimate_bps'] / 1e6:.2f} Mbit/s)"
        )


if __name__ == "__main__":
    main()
