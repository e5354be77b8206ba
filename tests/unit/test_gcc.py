"""Send-side bandwidth estimation (relay/rtc/gcc.py): the parts with hand-computed numbers, and
the whole estimator on synthetic traces from a small bottleneck simulator."""

from __future__ import annotations

import math
import random
import statistics
from collections import deque
from collections.abc import Callable

import numpy as np
import pytest

from relay.rtc import rtcp
from relay.rtc.gcc import (
    AckedBitrate,
    BandwidthUsage,
    GccEstimator,
    InterArrival,
    LossBasedControl,
    OveruseDetector,
    PacketResult,
    TrendlineFilter,
    feedback_report,
    linear_fit_slope,
    probe_bitrate,
)
from relay.rtc.twcc import TwccRecorder, TwccSendHistory, parse_feedback

SIZE = 1200  # bytes per simulated packet
MBPS = 1_000_000


# --- a bottleneck link simulator --------------------------------------------------------------


class Sim:
    """One sender paced at the estimator's rate, through a FIFO bottleneck of ``capacity(t)``
    bits/s with a queue of ``queue_limit`` bytes (tail drop) and a constant ``base_delay``
    each way; optional random loss (before the queue). The receiver reports every
    ``fb_interval`` seconds of its time what arrived (and what is missing) since the last
    report; the report reaches the sender ``base_delay`` later.

    ``via_twcc``: the reports go through the real thing instead (TwccSendHistory stamps,
    TwccRecorder builds RTCP, parse_feedback + feedback_report decode). ``probe_target``:
    the sender probes whenever the estimator wants it, the way gcc.py's docstring says a
    subscriber leg should."""

    def __init__(
        self,
        capacity: Callable[[float], float],
        *,
        start_bitrate: int = 1 * MBPS,
        base_delay: float = 0.025,
        queue_limit: int = 60_000,
        random_loss: float = 0.0,
        fb_interval: float = 0.05,
        seed: int = 1,
        via_twcc: bool = False,
        probe_target: float | None = None,
    ) -> None:
        self.capacity = capacity
        self.est = GccEstimator(start_bitrate, min_bitrate=50_000, max_bitrate=20 * MBPS)
        self.base_delay = base_delay
        self.queue_limit = queue_limit
        self.random_loss = random_loss
        self.fb_interval = fb_interval
        self.rng = random.Random(seed)
        self.via_twcc = via_twcc
        self.history = TwccSendHistory()
        self.recorder = TwccRecorder(1)
        self.probe_target = probe_target
        self.next_send = 0.0
        self.next_report = fb_interval  # receiver time of the next report
        self.last_arrival = -math.inf
        #: (seq, send time, arrival or None if lost) in send order, not reported yet
        self.in_flight: deque[tuple[int, float, float | None]] = deque()
        self.seq = 0
        self.trace: list[tuple[float, int]] = []  # (sender time, estimate) after each report
        self.probes: list[tuple[float, float | None]] = []  # (time, result)
        self._probe_left = 0
        self._probe_count = 0
        self._probe_rate = 0.0
        # the probe being measured: [first send, last send], packets sent, results, lost count
        self._probe: tuple[float, float, int] | None = None
        self._probe_started = 0.0
        self._probe_results: list[PacketResult] = []
        self._probe_lost = 0
        self._probe_first = 0.0

    def run(self, until: float) -> None:
        while True:
            deliver = self.next_report + self.base_delay
            if min(self.next_send, deliver) >= until:
                return
            if self.next_send <= deliver:
                self._send(self.next_send)
            else:
                self._report(self.next_report, deliver)
                self.next_report += self.fb_interval

    def _send(self, t: float) -> None:
        if self._probe_left:
            rate = self._probe_rate
            if self._probe_left == self._probe_count:
                self._probe_first = t
            self._probe_left -= 1
            if self._probe_left == 0:
                self._probe = (self._probe_first, t, self._probe_count)
        else:
            rate = self.est.estimate
        seq = self.history.next_seq(SIZE, t) if self.via_twcc else self.seq
        self.seq += 1
        earliest = t + self.base_delay
        arrival: float | None
        if self.random_loss and self.rng.random() < self.random_loss:
            arrival = None
        else:
            capacity = self.capacity(t)
            backlog = max(0.0, self.last_arrival - earliest) * capacity / 8.0
            if backlog + SIZE > self.queue_limit:
                arrival = None
            else:
                arrival = max(earliest, self.last_arrival + SIZE * 8.0 / capacity)
                self.last_arrival = arrival
        self.in_flight.append((seq, t, arrival))
        self.next_send = t + SIZE * 8.0 / rate

    def _report(self, t: float, now: float) -> None:
        """The receiver's report at its time ``t``, processed by the sender at ``now``."""
        acked: list[PacketResult] = []
        lost: list[tuple[float, int]] = []
        in_flight = self.in_flight
        while in_flight:
            seq, send, arrival = in_flight[0]
            if (arrival if arrival is not None else send + self.base_delay) > t:
                break
            in_flight.popleft()
            if arrival is None:
                lost.append((send, SIZE))
            else:
                acked.append(PacketResult(send, arrival, SIZE))
                if self.via_twcc:
                    self.recorder.on_packet(seq, arrival)
        if self.via_twcc:
            acked, lost = [], []
            for data in self.recorder.build_feedback(t):
                (packet,) = rtcp.parse_rtcp(data)
                assert isinstance(packet, rtcp.TransportFeedback)
                report = feedback_report(self.history, parse_feedback(packet.fci), now)
                acked += report.acked
                lost += [(p.send_time, p.size) for p in report.lost]
        if acked or lost:
            self.est.on_feedback(acked, lost, now)
        self._collect_probe(acked, lost, now)
        if (
            self.probe_target is not None
            and self._probe is None
            and not self._probe_left
            and self.est.wants_probe(now, self.probe_target)
        ):
            self._probe_rate = self.est.probe_rate(self.probe_target)
            self._probe_count = max(5, math.ceil(0.015 * self._probe_rate / (SIZE * 8)))
            self._probe_left = self._probe_count
            self._probe_started = now
            self._probe_results = []
            self._probe_lost = 0
        self.trace.append((now, self.est.estimate))

    def _collect_probe(
        self, acked: list[PacketResult], lost: list[tuple[float, int]], now: float
    ) -> None:
        """What the caller must do with a probe: the results of the packets sent in its window."""
        if self._probe is None:
            return
        first, last, count = self._probe
        self._probe_results += [p for p in acked if first <= p.send_time <= last]
        self._probe_lost += sum(1 for send, _ in lost if first <= send <= last)
        if len(self._probe_results) + self._probe_lost >= count or now - self._probe_started > 1.0:
            result = probe_bitrate(self._probe_results, count)
            if result is not None:
                self.est.on_probe_result(result, now)
            self.probes.append((now, result))
            self._probe = None

    # --- trace helpers ---

    def values(self, start: float, end: float) -> list[int]:
        return [v for t, v in self.trace if start <= t < end]

    def first_time(self, start: float, predicate: Callable[[int], bool]) -> float | None:
        for t, v in self.trace:
            if t >= start and predicate(v):
                return t
        return None


def constant(bits: float) -> Callable[[float], float]:
    return lambda t: bits


def step(before: float, after: float, at: float) -> Callable[[float], float]:
    return lambda t: before if t < at else after


# --- trendline slope, threshold, detector: hand-computed ------------------------------------


def test_linear_fit_slope_by_hand() -> None:
    assert linear_fit_slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2.0)
    # mean x 1, mean y 2/3: ((-1)(-2/3) + 0 + (1)(1/3)) / (1 + 0 + 1) = 0.5
    assert linear_fit_slope([0, 1, 2], [0, 1, 1]) == pytest.approx(0.5)
    assert linear_fit_slope([5, 5, 5], [1, 2, 3]) is None
    assert linear_fit_slope([1], [1]) is None


def _trends(samples: list[tuple[float, float, float]], per_feedback: int) -> list[float]:
    """The trend after every sample, fed ``per_feedback`` samples per update, no smoothing."""
    f = TrendlineFilter(window=20, smoothing=0.0)
    out = []
    for i in range(0, len(samples), per_feedback):
        for sample in samples[i : i + per_feedback]:
            f.update([sample])
            out.append(f.trend)
    return out


@pytest.mark.parametrize("start_ms", [0.0, 3.6e7 * 5])  # a call's start, and five hours in
def test_trendline_fit_matches_the_least_squares_slope_over_the_window(start_ms: float) -> None:
    # Without smoothing the filter's points are (arrival - first arrival, accumulated delay).
    rng = np.random.default_rng(7)
    n = 2000
    send = rng.uniform(1, 20, n)
    arrival = send + rng.normal(0, 3, n)
    samples = []
    t = start_ms
    for s, a in zip(send, arrival, strict=True):
        t += max(a, 0.1)
        samples.append((float(s), float(max(a, 0.1)), t))
    xs = [t - samples[0][2] for _, _, t in samples]
    ys = list(np.cumsum([a - s for s, a, _ in samples]))
    for per_feedback in (1, 13):
        f = TrendlineFilter(window=20, smoothing=0.0)
        for i in range(0, n, per_feedback):
            f.update(samples[i : i + per_feedback])
            last = min(i + per_feedback, n)
            if last >= 20:
                expected = linear_fit_slope(xs[last - 20 : last], ys[last - 20 : last])
                assert f.trend == pytest.approx(expected, rel=1e-9, abs=1e-12), (per_feedback, i)
            else:
                assert f.trend == 0.0  # window not full yet
    assert _trends(samples[:60], 1) == pytest.approx(_trends(samples[:60], 13))


def test_trendline_keeps_its_trend_when_every_arrival_is_the_same() -> None:
    f = TrendlineFilter(window=3, smoothing=0.0)
    f.update([(10.0, 12.0, 100.0), (10.0, 13.0, 112.0), (10.0, 14.0, 124.0)])
    f.update([(0.0, 0.0, 130.0), (0.0, 1.0, 130.0)])
    trend = f.trend
    assert trend > 0
    # the window's three points now share one arrival time: a vertical line, no slope
    f.update([(0.0, 2.0, 130.0)])
    assert f.trend == trend


def test_threshold_adaptation_by_hand() -> None:
    d = OveruseDetector()
    assert d.threshold == 12.5
    d.update_threshold(20.0, 0.0)  # first update: no elapsed time
    assert d.threshold == 12.5
    # |m| = 20 above gamma, below gamma + 15: k_up. 12.5 + 0.0087 * (20 - 12.5) * 50
    d.update_threshold(20.0, 50.0)
    assert d.threshold == pytest.approx(15.7625)
    # a spike (40 > 15.7625 + 15) does not move it, but restarts the clock
    d.update_threshold(-40.0, 100.0)
    assert d.threshold == pytest.approx(15.7625)
    # below gamma: k_down; 300 ms elapsed counts as 100. 15.7625 + 0.039 * (5 - 15.7625) * 100
    # = -26.21 -> clamped to 6
    d.update_threshold(5.0, 400.0)
    assert d.threshold == 6.0
    # 6 + 0.039 * (4 - 6) * 10 = 5.22 -> still clamped
    d.update_threshold(-4.0, 410.0)
    assert d.threshold == 6.0
    # 6 + 0.0087 * (18 - 6) * 20 = 8.088
    d.update_threshold(18.0, 430.0)
    assert d.threshold == pytest.approx(8.088)
    # the upper clamp: 595 + 0.0087 * (609 - 595) * 100 = 607.18 -> 600
    d.threshold = 595.0
    d.update_threshold(609.0, 530.0)
    assert d.threshold == 600.0


def test_overuse_needs_time_and_a_rising_trend() -> None:
    d = OveruseDetector()
    # 60 deltas: m = 60 * 4 * trend = 24 for trend 0.1
    assert d.detect(0.1, 5.0, 0.0, 60) is BandwidthUsage.NORMAL  # over for 2.5 ms, 1 sample
    assert d.modified_trend == pytest.approx(24.0)
    assert d.detect(0.1, 5.0, 5.0, 60) is BandwidthUsage.NORMAL  # 7.5 ms
    # gamma meanwhile: 12.5 + 0.0087 * (24 - 12.5) * 5 = 13.00025, still below 24
    assert d.threshold == pytest.approx(13.00025)
    assert d.detect(0.1, 5.0, 10.0, 60) is BandwidthUsage.OVERUSING  # 12.5 ms > 10 ms
    assert d.detect(0.0, 5.0, 15.0, 60) is BandwidthUsage.NORMAL
    assert d.detect(-0.1, 5.0, 20.0, 60) is BandwidthUsage.UNDERUSING
    # a falling trend above the threshold does not signal overuse
    d = OveruseDetector()
    d.detect(0.2, 5.0, 0.0, 60)
    d.detect(0.15, 5.0, 5.0, 60)
    assert d.detect(0.12, 5.0, 10.0, 60) is BandwidthUsage.NORMAL
    # few deltas scale the trend down: 5 * 4 * 0.1 = 2
    d = OveruseDetector()
    d.detect(0.1, 5.0, 0.0, 5)
    assert d.modified_trend == pytest.approx(2.0)
    assert d.detect(0.1, 5.0, 0.0, 1) is BandwidthUsage.NORMAL


def test_trendline_filter_by_hand() -> None:
    # No smoothing, window 3: the accumulated delay 2, 4, 6 ms at 0, 12, 24 ms -> slope 1/6.
    f = TrendlineFilter(window=3, smoothing=0.0)
    f.update([(10.0, 12.0, 100.0), (10.0, 12.0, 112.0)])
    assert f.trend == 0.0  # window not full yet
    assert f.detector.threshold == 12.5  # the first threshold update has no elapsed time
    state = f.update([(10.0, 12.0, 124.0)])
    assert f.trend == pytest.approx(1 / 6)
    # m = 3 deltas * 4 * 1/6 = 2 < gamma: normal; gamma = 12.5 + 0.039 * (2 - 12.5) * 12
    assert f.detector.modified_trend == pytest.approx(2.0)
    assert state is BandwidthUsage.NORMAL
    assert f.detector.threshold == pytest.approx(7.586)
    # With smoothing 0.9 the smoothed delay of a step of 10 ms is 1, 1.9, 2.71, ...
    g = TrendlineFilter(window=3)
    g.update([(10.0, 20.0, 0.0), (10.0, 10.0, 10.0), (10.0, 10.0, 20.0)])
    assert g.smoothed == pytest.approx(2.71)
    assert g.trend == pytest.approx((2.71 - 1.0) / 20.0)


def test_trendline_samples_are_bounded_and_batching_does_not_matter() -> None:
    rng = random.Random(3)
    samples = [(10.0, 10.0 + rng.uniform(-2, 2.2), 10.0 * i) for i in range(500)]
    one = TrendlineFilter()
    for s in samples:
        one.update([s])
    batched = TrendlineFilter()
    for i in range(0, 500, 37):
        batched.update(samples[i : i + 37])
    assert batched.trend == pytest.approx(one.trend)
    assert batched.detector.threshold == pytest.approx(one.detector.threshold)
    assert batched.state is one.state
    assert len(batched._points) == len(one._points) == 20


# --- grouping, acknowledged bitrate, loss, probes ----------------------------------------------


def test_inter_arrival_groups_by_send_time() -> None:
    ia = InterArrival()
    ms = 0.001
    # group A: sent at 0, 1, 2 ms; group B: 10, 11 ms; group C starts at 20 ms
    packets = [
        (0 * ms, 50 * ms),
        (1 * ms, 51 * ms),
        (2 * ms, 52 * ms),
        (10 * ms, 61 * ms),
        (11 * ms, 63 * ms),
        (20 * ms, 75 * ms),
    ]
    out = [ia.add(s, a, 100, 1.0) for s, a in packets]
    assert out[:4] == [None, None, None, None]  # B started: A is complete, but alone
    assert out[4] is None
    # C started: B - A. Send 11 - 2 = 9 ms; arrival 63 - 52 = 11 ms; at C's first arrival.
    c = out[5]
    assert c is not None
    assert c[0] == pytest.approx(9.0) and c[1] == pytest.approx(11.0) and c[2] == pytest.approx(75)
    # a packet sent before the current group is ignored
    assert ia.add(15 * ms, 76 * ms, 100, 1.0) is None


def test_inter_arrival_merges_a_burst_released_by_a_queue() -> None:
    ia = InterArrival()
    ms = 0.001
    ia.add(0.0, 100 * ms, 100, 1.0)
    # sent 8 ms later, arrived 1 ms later: delay shrank, arrival delta <= 5 ms -> same group
    assert ia.add(8 * ms, 101 * ms, 100, 1.0) is None
    ia.add(20 * ms, 120 * ms, 100, 1.0)  # new group
    out = ia.add(40 * ms, 140 * ms, 100, 1.0)
    assert out is not None
    assert out[0] == pytest.approx(12.0)  # 20 - 8: the merged group's send time is its last
    assert out[1] == pytest.approx(19.0)  # 120 - 101


def test_inter_arrival_resets_on_a_receiver_clock_jump() -> None:
    ia = InterArrival()
    ia.add(0.0, 1.0, 100, 10.0)
    ia.add(0.01, 1.01, 100, 10.0)
    assert ia.add(0.02, 1.02, 100, 10.0) is not None
    # arrivals jump by 10 s while our clock moves 50 ms: seen when that group is complete
    assert ia.add(0.03, 11.03, 100, 10.05) is not None
    assert ia.add(0.04, 11.04, 100, 10.1) is None
    assert ia.resets == 1
    ia.add(0.05, 11.05, 100, 10.1)
    ia.add(0.06, 11.06, 100, 10.1)
    assert ia.add(0.07, 11.07, 100, 10.1) is not None  # fine again after the reset


def test_acked_bitrate_window() -> None:
    acked = AckedBitrate()
    t = 0.0
    while t < 0.45:
        acked.add(t, SIZE)
        t += 0.01
    assert acked.bitrate is None  # less than a window of arrivals
    while t < 2.0:
        acked.add(t, SIZE)
        t += 0.01
    assert acked.bitrate == pytest.approx(SIZE * 8 * 100, rel=0.03)  # 960 kbit/s
    small = AckedBitrate(max_packets=16)
    for i in range(800):
        small.add(i * 0.001, SIZE)
    assert small.bitrate == pytest.approx(SIZE * 8 * 1000, rel=0.01)  # span-based when full
    assert len(small._packets) == 16


def test_loss_based_bands() -> None:
    loss = LossBasedControl(1_000_000)
    assert loss.update(0.0, 2e6, 0.1) == 2e6  # no loss window yet: follows the delay-based
    loss.bitrate = 1e6
    loss.on_packets(90, 5, 0.0)  # the window starts with the first report
    loss.on_packets(90, 5, 0.5)
    assert loss.fraction is None  # only half a second
    loss.on_packets(0, 0, 1.0)  # window complete: 10 / 190 = 5.3 %
    assert loss.fraction == pytest.approx(10 / 190)
    assert loss.update(1.0, 5e6, 0.1) == 1e6  # holds
    loss.on_packets(80, 20, 2.0)  # 20 %
    assert loss.update(2.0, 5e6, 0.1) == pytest.approx(0.9e6)  # x (1 - 0.5 * 0.2)
    assert loss.update(2.05, 5e6, 0.1) == pytest.approx(0.9e6)  # once per window
    loss.on_packets(100, 0, 3.0)
    # minimum of the last second is 0.9e6: 0.9e6 * 1.08 + 1000
    assert loss.update(3.0, 5e6, 0.1) == pytest.approx(0.9e6 * 1.08 + 1000)
    assert loss.update(3.1, 0.5e6, 0.1) == 0.5e6  # never above the delay-based estimate
    loss.on_packets(10, 0, 4.5)  # 1.5 s but only 10 packets: no new window yet
    assert loss._received == 10


def test_probe_bitrate() -> None:
    # 10 packets of 1200 bytes sent 4 ms apart (2.4 Mbit/s), arriving 4 ms apart
    sent = [PacketResult(i * 0.004, 1.0 + i * 0.004, SIZE) for i in range(10)]
    assert probe_bitrate(sent, 10) == pytest.approx(9 * SIZE * 8 / 0.036)
    # arriving 8 ms apart: saturated (1.2 < 0.9 * 2.4) -> 0.95 x receive rate
    slow = [PacketResult(i * 0.004, 1.0 + i * 0.008, SIZE) for i in range(10)]
    assert probe_bitrate(slow, 10) == pytest.approx(0.95 * 9 * SIZE * 8 / 0.072)
    assert probe_bitrate(sent[:7], 10) is None  # fewer than 80 % acknowledged
    squeezed = [PacketResult(i * 0.004, 1.0 + i * 0.001, SIZE) for i in range(10)]
    assert probe_bitrate(squeezed, 10) is None  # receive rate > 2 x send rate


def test_probe_requests_and_results() -> None:
    est = GccEstimator(500_000, max_bitrate=3_000_000)
    assert not est.wants_probe(0.0, 500_000)  # already at the target
    assert est.wants_probe(0.0, 2_000_000)
    assert est.probe_rate(2_000_000) == 1_000_000  # 2 x the estimate ...
    assert est.probe_rate(700_000) == 700_000  # ... at most the target
    assert not est.wants_probe(0.5, 2_000_000)  # 1 s between probes
    assert est.wants_probe(1.0, 2_000_000)  # then 2 s
    assert not est.wants_probe(2.9, 2_000_000)
    assert est.wants_probe(3.0, 2_000_000)  # then 4 s
    assert est.on_probe_result(450_000, 3.2) == 500_000  # below the estimate: nothing
    # a confirmed probe lifts both estimates, and the next probe is due 1 s later
    assert est.on_probe_result(1_000_000, 3.3) == 1_000_000
    assert est.delay_based == est.loss_based == 1_000_000
    assert not est.wants_probe(4.0, 2_000_000)
    assert est.wants_probe(4.3, 2_000_000)
    assert est.probe_rate(2_000_000) == 2_000_000
    # not while overusing
    est.trendline.detector.state = BandwidthUsage.OVERUSING
    assert not est.wants_probe(20.0, 2_000_000)
    assert est.on_probe_result(2_000_000, 20.0) == 1_000_000


# --- the adapter, against the real transport-cc path ------------------------------------------


def feedbacks(recorder: TwccRecorder, t: float) -> list:
    out = []
    for data in recorder.build_feedback(t):
        (packet,) = rtcp.parse_rtcp(data)
        assert isinstance(packet, rtcp.TransportFeedback)
        out.append(parse_feedback(packet.fci))
    return out


def test_feedback_report_from_send_history() -> None:
    history = TwccSendHistory(initial_seq=65530)  # wraps during the test
    recorder = TwccRecorder(1)
    sent = []
    for i in range(12):
        t = 100.0 + i * 0.01
        seq = history.next_seq(1000 + i, t)
        sent.append((seq, t, 1000 + i))
    lost = {3, 4, 9}
    for i, (seq, t, _) in enumerate(sent[:10]):
        if i not in lost:
            recorder.on_packet(seq, 5000.0 + t + 0.03 + 0.001 * i)  # receiver clock
    (fb,) = feedbacks(recorder, 5200.0)
    report = feedback_report(history, fb, 100.2)
    assert report.stats is not None and report.stats.acked == 7
    assert [p.size for p in report.acked] == [1000, 1001, 1002, 1005, 1006, 1007, 1008]
    for p in report.acked:
        i = p.size - 1000
        assert p.send_time == sent[i][1]
        assert p.arrival_time == pytest.approx(5000.0 + sent[i][1] + 0.03 + 0.001 * i, abs=3e-4)
    # 9 was not received either, but nothing after it arrived: the report ends at 8
    assert [(round(p.send_time, 3), p.size) for p in report.lost] == [
        (100.03, 1003),
        (100.04, 1004),
    ]
    # a later report: 4 arrived after all, 9 still missing, 10 and 11 arrive
    recorder.on_packet(sent[4][0], 5100.2)
    for i in (10, 11):
        recorder.on_packet(sent[i][0], 5000.0 + sent[i][1] + 0.03)
    acked, lost_now = [], []
    for fb in feedbacks(recorder, 5201.0):
        r = feedback_report(history, fb, 100.5)
        acked += r.acked
        lost_now += r.lost
    assert sorted(p.size for p in acked) == [1004, 1010, 1011]  # nothing counted twice
    assert [p.size for p in lost_now] == [1009]  # 3 was reported lost before


# --- the estimator on simulated links ---------------------------------------------------------


def test_steady_link_converges_and_stays() -> None:
    sim = Sim(constant(2.5 * MBPS))
    sim.run(60.0)
    reached = sim.first_time(0.0, lambda v: v > 0.85 * 2.5 * MBPS)
    assert reached is not None and reached < 20.0
    late = sim.values(30.0, 60.0)
    median = statistics.median(late)
    assert 0.88 * 2.5 * MBPS <= median <= 1.02 * 2.5 * MBPS
    assert min(late) >= 0.85 * median and max(late) <= 1.15 * median


def test_steady_link_through_real_transport_cc() -> None:
    sim = Sim(constant(1.5 * MBPS), via_twcc=True)
    sim.run(40.0)
    late = sim.values(20.0, 40.0)
    median = statistics.median(late)
    assert 0.88 * 1.5 * MBPS <= median <= 1.02 * 1.5 * MBPS
    assert min(late) >= 0.85 * median and max(late) <= 1.15 * median


def test_capacity_step_down() -> None:
    sim = Sim(step(2.5 * MBPS, 0.5 * MBPS, 30.0))
    sim.run(40.0)
    assert sim.values(29.0, 30.0)[-1] > 1.8 * MBPS
    fell = sim.first_time(30.0, lambda v: v < 0.6 * MBPS)
    assert fell is not None and fell - 30.0 < 2.0
    late = sim.values(35.0, 40.0)
    assert 0.35 * MBPS < statistics.median(late) < 0.55 * MBPS


def test_capacity_step_up() -> None:
    sim = Sim(step(0.5 * MBPS, 2.5 * MBPS, 20.0))
    sim.run(45.0)
    assert sim.values(19.0, 20.0)[-1] < 0.6 * MBPS
    rose = sim.first_time(20.0, lambda v: v > 1.5 * MBPS)
    assert rose is not None and rose - 20.0 < 16.0


def test_capacity_step_up_with_probing() -> None:
    plain = Sim(step(0.5 * MBPS, 2.5 * MBPS, 20.0))
    plain.run(45.0)
    probed = Sim(step(0.5 * MBPS, 2.5 * MBPS, 20.0), probe_target=2.5 * MBPS)
    probed.run(45.0)
    assert probed.values(19.0, 20.0)[-1] < 0.6 * MBPS  # probing does not break the low phase
    rose = probed.first_time(20.0, lambda v: v > 1.5 * MBPS)
    rose_plain = plain.first_time(20.0, lambda v: v > 1.5 * MBPS)
    assert rose is not None and rose_plain is not None
    assert rose - 20.0 < 6.0 and rose - 20.0 < 0.5 * (rose_plain - 20.0)
    assert any(t > 20.0 and r is not None and r > 0.9 * MBPS for t, r in probed.probes)
    late = probed.values(35.0, 45.0)
    assert max(late) < 1.15 * 2.5 * MBPS


def test_random_loss_5_percent_holds() -> None:
    sim = Sim(constant(20 * MBPS), random_loss=0.05, seed=5)
    sim.run(30.0)
    values = sim.values(0.0, 30.0)
    assert min(values) >= 0.6 * MBPS
    assert 0.7 * MBPS <= statistics.median(sim.values(20.0, 30.0)) <= 1.6 * MBPS


def test_random_loss_20_percent_decreases() -> None:
    sim = Sim(constant(20 * MBPS), random_loss=0.2, seed=6)
    sim.run(12.0)
    assert sim.values(5.0, 6.0)[-1] < 0.8 * MBPS
    assert sim.values(11.0, 12.0)[-1] < 0.5 * MBPS
    assert sim.est.state is BandwidthUsage.NORMAL  # it is the loss, not the delay


def test_estimate_is_clamped() -> None:
    est = GccEstimator(5_000_000, min_bitrate=100_000, max_bitrate=1_000_000)
    assert est.estimate == 1_000_000
    est.on_feedback([], [(0.0, SIZE)] * 50, 1.0)
    est.on_feedback([], [(1.0, SIZE)] * 50, 2.5)
    for i in range(40):
        est.on_feedback([], [(2.0 + i, SIZE)] * 50, 3.0 + i)
    assert est.estimate == 100_000
    assert not est.wants_probe(50.0, 2_000_000)  # heavy loss: no probing
