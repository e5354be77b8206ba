"""Layer allocation within each subscriber's bandwidth estimate.

First the rules with numbers (relay/sfu/allocation.py), then a whole call with bytes: Chromium's
three simulcast layers go to a subscriber whose path is simulated (a bottleneck link of a given
rate with its queue); the subscriber's transport-cc feedback is built from the simulated
arrival times, as a browser would report them. The relay must start the subscriber low, probe
its path, climb to the top layer when the path is wide, stay on the lowest when it is thin,
and climb again when a thin path widens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from relay.rtc import rtcp
from relay.rtc.rtp import extension_profile, parse_extensions, parse_rtp
from relay.rtc.twcc import TwccRecorder, transport_seq
from relay.sfu.allocation import (
    PROBE_HEADROOM,
    UP_MARGIN,
    Demand,
    allocate,
    nominal_bitrate,
    probe_target,
)
from tests.unit.harness import Harness
from tests.unit.test_sfu import FIXTURES, rtp
from tests.unit.test_simulcast import ALICE, BOB, Call
from tests.unit.test_svc import VP8_TIDS, vp8_payload

RATES = [150_000.0, 500_000.0, 1_500_000.0]


# -- the rules ------------------------------------------------------------------------------
def test_without_an_estimate_every_track_gets_what_its_wishes_allow() -> None:
    demands = [Demand(RATES, 2), Demand(RATES, 1)]
    assert allocate(None, demands) == [2, 1]


def test_the_lowest_layer_is_the_floor_and_the_budget_buys_steps_up() -> None:
    assert allocate(100_000, [Demand(RATES, 2)]) == [0]
    assert allocate(600_000, [Demand(RATES, 2)]) == [1]
    assert allocate(2_000_000, [Demand(RATES, 2)]) == [2]
    assert allocate(2_000_000, [Demand(RATES, 1)]) == [1]  # never above the wishes


def test_equal_priorities_share_round_robin_and_priority_goes_first() -> None:
    # 1.2 Mbit/s: two tracks can both have the middle layer, not one of them the top
    assert allocate(1_200_000, [Demand(RATES, 2), Demand(RATES, 2)]) == [1, 1]
    # the same budget with one track ranked higher: it takes the top, the other the bottom
    assert allocate(1_700_000, [Demand(RATES, 2), Demand(RATES, 2, priority=1)]) == [0, 2]


def test_moving_up_needs_a_margin_staying_does_not() -> None:
    total = RATES[2]
    # on the middle layer: the top needs its rate with the margin
    assert allocate(total, [Demand(RATES, 2, current=1)]) == [1]
    assert allocate(total * UP_MARGIN, [Demand(RATES, 2, current=1)]) == [2]
    # already on the top: its rate alone keeps it there
    assert allocate(total, [Demand(RATES, 2, current=2)]) == [2]
    assert allocate(total - 1, [Demand(RATES, 2, current=2)]) == [1]


def test_probe_target_and_nominal_rates() -> None:
    assert probe_target([Demand(RATES, 2), Demand(RATES, 0)], 50_000) == (
        (50_000 + RATES[2] + RATES[0]) * PROBE_HEADROOM
    )
    assert nominal_bitrate(180, 0) < nominal_bitrate(360, 1) < nominal_bitrate(720, 2)
    assert nominal_bitrate(0, 2) == nominal_bitrate(720, 2)


# -- a call over a simulated path ----------------------------------------------------------
#: per layer: packets per 30 ms frame, payload padding -> about 150, 500 and 1500 kbit/s
FRAME = 0.03
PACKETS = [(1, 560), (2, 940), (5, 1120)]
STEP = 0.001
FEEDBACK_INTERVAL = 0.05
KEYFRAME_INTERVAL = 1.0


@dataclass
class Path:
    """Relay -> subscriber: a link of ``rate`` bits/s (None: unlimited, 5 ms) behind a
    drop-tail queue of ``queue`` seconds, and the subscriber's transport-cc recorder."""

    rate: float | None
    queue: float = 0.3
    free_at: float = 0.0
    recorder: TwccRecorder = field(default_factory=lambda: TwccRecorder(1, 0))
    dropped: int = 0

    def carry(self, size: int, sent: float) -> float | None:
        if self.rate is None:
            return sent + 0.005
        start = max(sent, self.free_at)
        if start - sent > self.queue:
            self.dropped += 1
            return None
        self.free_at = start + size * 8 / self.rate
        return self.free_at + 0.005


class SvcCall:
    """Alice publishes one VP8 stream of three temporal layers (libwebrtc's L1T3 pattern:
    pictures of temporal layers 0, 2, 1, 2); bob subscribes with transport-cc."""

    SSRC = 1840449578  # the video SSRC of the captured offer

    def __init__(self) -> None:
        self.h = h = Harness()
        h.sfu.add_participant("r", "alice")
        h.sfu.add_participant("r", "bob")
        h.publish("alice", (FIXTURES / "chrome_offer.sdp").read_text())
        h.answer("bob", twcc=True)
        alice, self.bob = (h.sfu.get_participant("r", p) for p in ("alice", "bob"))
        h.connect(alice.publisher_leg, ALICE)
        h.connect(self.bob.subscriber_leg, BOB)
        self.video = next(s for s in self.bob.subscriptions.values() if s.track.kind == "video")
        self.picture = self.seq = 0
        self.tl0 = 20

    def send_picture(self, packets: int, padding: int, keyframe: bool) -> None:
        n = self.picture
        self.picture += 1
        tid = 0 if keyframe else VP8_TIDS[n % 4]
        if tid == 0 and n:
            self.tl0 += 1
        sync = n % 4 in (1, 2) and not keyframe
        for k in range(packets):
            self.seq += 1
            payload = vp8_payload(
                n & 0x7FFF, self.tl0 & 0xFF, tid, sync, keyframe, k == 0, bytes(padding)
            )
            packet = rtp(self.SSRC, 96, self.seq & 0xFFFF, 3000 * n, [], payload)
            if k == packets - 1:
                packet = packet[:1] + bytes((packet[1] | 0x80,)) + packet[2:]  # marker
            self.h.receive(packet, ALICE)


class Simulation:
    def __init__(
        self,
        rate: float | None,
        feedback_interval: float = FEEDBACK_INTERVAL,
        svc: bool = False,
    ) -> None:
        """Bob on a path of ``rate`` bits/s; alice sends Chromium's three simulcast layers,
        or with ``svc`` one stream of three temporal layers (its packets per picture and
        padding are :attr:`packets` ``[2]``, as a single layer's)."""
        self.feedback_interval = feedback_interval
        self.svc = svc
        call: Any = SvcCall() if svc else Call(twcc=True)
        self.call = call
        self.h = call.h
        self.path = Path(rate)
        leg = call.bob.subscriber_leg
        assert leg is not None and leg.twcc is not None
        self.leg = leg
        self.ext_id = leg.twcc.ext_id
        self.in_flight: list[tuple[float, int]] = []  # (arrival, transport seq)
        self.seen = 0
        #: (packets per frame, padding) of each layer, changed by a test as the call goes
        self.packets = list(PACKETS)
        self.next_frame = self.next_feedback = self.next_keyframe = self.h.now
        #: (time, index of the layer bob is on) at every change
        self.timeline: list[tuple[float, int]] = []
        if not svc:
            call.start_all()

    def layer(self) -> int:
        """The simulcast layer bob is on; with ``svc``, his highest temporal layer."""
        stream = self.call.video.stream
        if self.svc:
            return 2 if stream.max_temporal is None else stream.max_temporal
        return self.call.track.layers.index(stream.track)

    def run(self, seconds: float) -> None:
        h = self.h
        end = h.now + seconds
        while h.now < end:
            h.now = round(h.now + STEP, 6)
            if h.now >= self.next_frame:
                self.next_frame += FRAME
                keyframe = h.now >= self.next_keyframe
                if keyframe:
                    self.next_keyframe += KEYFRAME_INTERVAL
                if self.svc:
                    self.call.send_picture(*self.packets[2], keyframe)
                for layer, (count, padding) in enumerate([] if self.svc else self.packets):
                    for i in range(count):
                        self.call.send(layer, keyframe=keyframe and i == 0, padding=padding)
            h.sfu.timers.run(h.now)
            self._carry_new()
            self._deliver()
            if h.now >= self.next_feedback:
                self.next_feedback += self.feedback_interval
                for packet in self.path.recorder.build_feedback(h.now):
                    h.receive(packet, BOB)
            on = self.svc or self.call.video.stream.track in self.call.track.layers
            layer = self.layer() if on else -1
            if not self.timeline or self.timeline[-1][1] != layer:
                self.timeline.append((round(h.now - 100.0, 3), layer))

    def _carry_new(self) -> None:
        sent = self.h.sent
        for data, addr in sent[self.seen :]:
            if addr != BOB or not 127 < data[0] < 192 or 192 <= data[1] <= 223:
                continue
            _pt, _seq, _ts, _ssrc, _m, _off, ext_offset, ext_length = parse_rtp(data)
            if not ext_length:
                continue
            elements = parse_extensions(data, ext_offset, ext_length, extension_profile(data))
            value = next((v for i, v in elements if i == self.ext_id), None)
            if value is None:
                continue
            arrival = self.path.carry(len(data) + 10, self.h.now)  # + SRTP tag
            if arrival is not None:
                self.in_flight.append((arrival, transport_seq(value)))
        self.seen = len(sent)

    def _deliver(self) -> None:
        now = self.h.now
        due = [p for p in self.in_flight if p[0] <= now]
        if due:
            self.in_flight = [p for p in self.in_flight if p[0] > now]
            for arrival, seq in due:
                self.path.recorder.on_packet(seq, arrival)

    def estimate(self) -> int:
        assert self.leg.twcc is not None
        return self.leg.twcc.estimator.estimate

    def layers_between(self, start: float, end: float) -> set[int]:
        """The layers bob was on at some time in [start, end] (seconds into the call)."""
        before = [layer for t, layer in self.timeline if t <= start]
        within = {layer for t, layer in self.timeline if start < t <= end}
        return within | set(before[-1:])

    def first(self, layer: int, after: float = 0.0) -> float | None:
        return next((t for t, on in self.timeline if on == layer and t >= after), None)


def test_a_wide_path_starts_low_is_probed_and_climbs_to_the_top_layer() -> None:
    sim = Simulation(rate=8_000_000)
    sim.run(1.5)
    assert sim.layer() == 0, sim.timeline  # the start estimate (300 kbit/s) buys the lowest
    sim.run(8.5)
    metrics = sim.h.sfu.metrics
    assert metrics.probe_packets > 0
    assert sim.layer() == 2, (sim.timeline, sim.estimate())
    print("wide path, bob's layers (s, layer):", sim.timeline)
    top = sim.first(2)
    assert top is not None and top < 8.0, sim.timeline
    assert metrics.layer_switches["up"] >= 1
    # the probes were RTX copies on bob's RTX SSRC, not new media
    rtx = [
        d
        for d, a in sim.h.sent
        if a == BOB and 127 < d[0] < 192 and not 192 <= d[1] <= 223
        if parse_rtp(d)[3] == sim.call.video.rtx_ssrc
    ]
    assert len(rtx) >= metrics.probe_packets


@pytest.mark.parametrize("svc", [False, True], ids=["simulcast", "temporal-layers"])
def test_a_growing_stream_on_a_wide_path_keeps_the_subscriber_on_its_top_layer(svc: bool) -> None:
    # the publisher's encoder starts its top layer (or its one stream) low and raises it
    # six-fold over nine seconds, as a browser does while its own estimate grows: bob's path
    # carries all of it, so once on the top layer he must stay there; his estimate has to
    # grow ahead of the stream (probes for headroom), not trail it at the estimator's pace
    sim = Simulation(rate=None, svc=svc)
    sim.packets[2] = (1, 600)
    sim.run(6.0)
    assert sim.layer() == 2, (sim.timeline, sim.estimate())
    settled = sim.h.now - 100.0
    for step in ((2, 500), (2, 900), (3, 900), (4, 900), (5, 900), (5, 1100)):
        sim.packets[2] = step
        sim.run(1.5)
    sim.run(3.0)
    print("growing top layer, bob's layers (s, layer):", sim.timeline, sim.estimate())
    assert sim.layers_between(settled, sim.h.now - 100.0) == {2}, (sim.timeline, sim.estimate())
    assert sim.estimate() > UP_MARGIN * sim.leg.allocated, (sim.estimate(), sim.leg.allocated)


def test_a_thin_path_keeps_the_lowest_layer_and_a_widened_one_climbs_within_15_s() -> None:
    sim = Simulation(rate=400_000)
    sim.run(12.0)
    assert sim.layers_between(0.0, 12.0) == {0}, sim.timeline
    assert 200_000 < sim.estimate() < 600_000, sim.estimate()
    assert sim.h.sfu.metrics.probe_packets > 0  # it kept looking
    widened = sim.h.now - 100.0
    sim.path.rate = None
    sim.run(15.0)
    top = sim.first(2, after=widened)
    print("thin path widened at", widened, "s; bob's layers (s, layer):", sim.timeline)
    assert top is not None and top - widened <= 15.0, (sim.timeline, sim.estimate())


def test_a_path_that_narrows_moves_the_subscriber_down() -> None:
    sim = Simulation(rate=None)
    sim.run(10.0)
    assert sim.layer() == 2, (sim.timeline, sim.estimate())
    narrowed = sim.h.now - 100.0
    sim.path.rate = 700_000
    sim.run(6.0)
    assert sim.layer() <= 1, (sim.timeline, sim.estimate())
    down = next(t for t, layer in sim.timeline if t >= narrowed and layer <= 1)
    assert down - narrowed < 3.0, sim.timeline
    assert sim.h.sfu.metrics.layer_switches["down"] >= 1


def test_a_path_just_above_a_layers_rate_does_not_make_the_subscriber_flap() -> None:
    # 650 kbit/s: the middle layer (~520 kbit/s on the wire) would load it above 80 %, where
    # bursty frames build queues; moving up and back every probe is what must not happen
    sim = Simulation(rate=650_000)
    sim.run(40.0)
    moves = [t for t, _layer in sim.timeline[1:]]
    assert len(moves) <= 2, sim.timeline
    assert sim.path.dropped == 0


def test_a_subscriber_without_transport_cc_is_allocated_by_its_remb() -> None:
    call = Call(twcc=False)
    h = call.h
    call.start_all()
    leg = call.bob.subscriber_leg
    assert leg is not None and leg.twcc is None and leg.estimate is None

    def second(remb: int | None) -> None:
        for _ in range(10):
            h.now += 0.1
            for layer, count in enumerate((1, 2, 6)):  # about 50, 100 and 300 kbit/s
                for _ in range(count):
                    call.send(layer, keyframe=True, padding=600)
        if remb is not None:
            h.receive(rtcp.Remb(0x1234, remb, [call.video.ssrc]).to_bytes(), BOB)
        h.sfu.tick(h.now)
        for layer in range(3):
            call.send(layer, keyframe=True)

    second(None)
    assert call.video.stream.track is call.track.layers[2]  # no estimate: the best there is
    second(80_000)
    assert leg.estimate == 80_000
    assert call.video.stream.track is call.track.layers[0]
    second(20_000_000)
    second(20_000_000)
    assert call.video.stream.track is call.track.layers[2]


def test_probe_feedback_that_comes_while_the_cluster_is_still_being_sent_counts() -> None:
    # feedback every 5 ms: the first packets of each probe cluster are reported before its
    # last one leaves; the measurement must still see every packet of the cluster
    sim = Simulation(rate=None, feedback_interval=0.005)
    prober = sim.leg.prober
    assert prober is not None
    results: list[float | None] = []
    for _ in range(60):
        clusters = prober.clusters
        sim.run(0.1)
        if prober.clusters != clusters or (results and prober.last_result != results[-1]):
            results.append(prober.last_result)
    measured = [r for r in results if r is not None]
    assert prober.clusters >= 2 and len(measured) >= prober.clusters - 1, results
    assert sim.layer() == 2, (sim.timeline, results)


def test_a_brief_dip_of_the_estimate_keeps_the_layer_a_lasting_or_deep_one_does_not() -> None:
    sim = Simulation(rate=None)
    sim.run(10.0)
    assert sim.layer() == 2
    leg = sim.leg
    assert leg.twcc is not None
    aimd = leg.twcc.estimator.aimd
    allocated = leg.allocated
    # 10 % below what bob's layer takes, for half a second: he keeps it
    aimd.set_estimate(allocated * 0.9, sim.h.now)
    sim.run(0.5)
    assert sim.call.video.stream.target is sim.call.track.layers[2], sim.timeline
    # far below: down at once
    aimd.set_estimate(allocated * 0.5, sim.h.now)
    sim.run(0.3)
    assert sim.call.video.stream.target is not sim.call.track.layers[2], sim.timeline


def test_the_delivery_rate_in_the_stats_is_what_arrived_per_second() -> None:
    # the top layer's frames are 5 packets that arrive together, 30 ms apart: a rate over
    # one feedback's arrival span would leave the gaps between frames out
    sim = Simulation(rate=None)
    sim.run(10.0)
    assert sim.layer() == 2
    delivery = sim.h.sfu.participant_stats("r", "bob")["subscriber_delivery"]
    sent = sim.call.video.bitrate  # the relay's own count of what it sent bob (SRTP size)
    assert delivery["estimate_source"] == "transport-cc"
    assert delivery["allocated_bitrate"] > 0 and delivery["probe_clusters"] >= 1
    assert sent > 0 and 0.8 * sent < delivery["delivery_rate"] < 1.25 * sent, (delivery, sent)
