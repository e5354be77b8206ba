"""Send-side bandwidth estimation for ONE subscriber transport, from its transport-cc feedback:
Google Congestion Control (draft-ietf-rmcat-gcc-02) as libwebrtc's ``goog_cc`` runs it.

Where the numbers come from. The relay stamps every packet towards a subscriber with a
transport-wide sequence number (:class:`~relay.rtc.twcc.TwccSendHistory`), the subscriber
reports when each one arrived (draft-holmer-rmcat-transport-wide-cc-extensions-01), and
:func:`feedback_report` turns one such report into what the estimator eats: the newly
acknowledged packets as ``(send_time, arrival_time, size)`` (send times on our clock, arrival
times on the subscriber's: only differences of each are used, so the clock offset does not
matter) and the ones reported lost as ``(send_time, size)``.

Three estimates, the smallest wins (clamped to ``[min_bitrate, max_bitrate]``):

* **Delay-based** (draft §5, goog_cc's ``DelayBasedBwe``). Packets are grouped into bursts
  sent within 5 ms of the group's first packet (a video frame's packets leave together;
  comparing single packets would measure the pacer, not the path). Packets that arrive
  within 5 ms of the previous one with a shrinking delay are merged into the group too (a
  burst released by a queue upstream), for at most 100 ms. For each pair of consecutive
  groups the *delay variation* is the arrival-time delta minus the send-time delta: positive
  when a queue is growing. :class:`TrendlineFilter` accumulates it (the queueing delay
  relative to the start, ms), smooths it exponentially (coefficient 0.9) and fits a least
  squares line over the last 20 (arrival time, smoothed delay) samples: the slope estimates
  ``(send rate - capacity) / capacity``. :class:`OveruseDetector` compares ``slope x
  min(deltas seen, 60) x 4`` with an adaptive threshold gamma (start 12.5, clamped to
  [6, 600]): above it for more than 10 ms (and two samples, and not falling) is *overusing*,
  below minus gamma is *underusing* (the queue drains), otherwise *normal*. Gamma follows
  the signal, ``gamma += k x (|m| - gamma) x dt_ms`` with ``k_up`` = 0.0087 when |m| is above
  it and ``k_down`` = 0.039 below (dt at most 100 ms; spikes more than 15 above gamma do not
  move it), so that a competing TCP flow's standing queue does not starve us (draft §5.4).
  :class:`AimdRateControl` turns the state into a rate: *increase* when normal, 8 %/s
  multiplicatively while the link capacity is unknown, and additively (about one packet
  per response time, RTT + 100 ms) once it is near the rate where the last congestion
  happened (within 3 standard deviations of the averaged acknowledged bitrate at overuse);
  never above 1.5 x the acknowledged bitrate + 10 kbit/s (the estimate must not run away
  from what the sender actually sends). *Decrease* on overuse to 0.85 x the acknowledged
  bitrate, at most once per RTT (clamped to 10-200 ms) unless the acknowledged bitrate fell
  below half the estimate. *Hold* while underusing: the queue is draining, and the
  acknowledged bitrate of that moment overstates the capacity.
* **Acknowledged bitrate** (:class:`AckedBitrate`): bytes acknowledged with an arrival time
  in the last 0.5 s (by arrival time: this is what the path delivered, not what we sent).
* **Loss-based** (draft §6, libwebrtc's classic ``SendSideBandwidthEstimation``): the loss
  fraction over windows of at least 1 s and 20 packets; below 2 % the estimate may grow to
  1.08 x its minimum of the last second + 1 kbit/s (~8 %/s), between 2 % and 10 % it holds,
  above 10 % it is multiplied by ``1 - 0.5 x loss`` (once per window, and not within
  300 ms + RTT of the previous decrease). It never exceeds the delay-based estimate (as in
  libwebrtc: it only ever takes away), and until the first window is complete it follows the
  delay-based estimate (nothing is known about loss yet).

Probing. The delay-based estimate climbs ~8 %/s at best, so going from 0.5 to 2.5 Mbit/s
takes ~15-20 s by itself. A probe is faster: the caller sends a short burst at a higher rate,
the feedback says what arrived and how fast, and :meth:`GccEstimator.on_probe_result` lifts
the estimate to the measured rate. What the caller does (sending is not this module's job):

1. Ask :meth:`GccEstimator.wants_probe` with the rate it would like to send (the sum of the
   layers it would forward). True means "probe now": the estimator has noted it and will not
   ask again for a while: 1 s, doubling with every probe up to 5 s, back to 1 s (and the
   next probe due 1 s later) after a probe that lifted the estimate by more than 10 %, and allowed at once when the
   acknowledged bitrate rises out of the link capacity band and 10 % above what the last
   failed probe found (the path changed).
2. Send for ``max(15 ms, 5 packets)`` at :meth:`GccEstimator.probe_rate` — media plus padding
   (RTX of recently sent packets, or padding-only packets), every packet stamped with
   :meth:`TwccSendHistory.next_seq` as usual. Remember the send time window and the number
   of packets sent in it.
3. From the following :class:`FeedbackReport` s, collect the :class:`PacketResult` s whose
   ``send_time`` lies in that window until all of them are reported or ~1 s passed; then
   :func:`probe_bitrate` computes the result (None when too few arrived) and
   :meth:`GccEstimator.on_probe_result` applies it.

Where this differs from goog_cc (on purpose, for a smaller model): the acknowledged bitrate is
a plain window, not its Bayesian estimator; the loss windows come from transport-cc rather
than RTCP receiver reports; the additive increase counts at most 1 s since the last change
(goog_cc does not cap it, so a long hold ends in a jump); the 5 kbit/s extra margin on
decrease, application-limited (ALR) logic, the network-state predictor and the newer
loss-based v2 are left out; a probe does not lift the loss-based estimate while the last loss
window was above 10 %; the probe scheduling (interval, backoff, retry on a path change) is
this module's own.

Sans-I/O: packets and times (seconds, any monotonic clock) in, a bitrate out; no clock reads.
Per packet the work is a few comparisons (grouping, the acknowledged-bitrate window) and a few
additions (the trendline's sums: its fit is O(1) per sample). Every buffer is bounded (see
each class).
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from relay.rtc.twcc import DeliveryStats, TwccFeedback, TwccSendHistory

__all__ = [
    "BandwidthUsage",
    "PacketResult",
    "LostPacket",
    "FeedbackReport",
    "feedback_report",
    "InterArrival",
    "linear_fit_slope",
    "OveruseDetector",
    "TrendlineFilter",
    "AckedBitrate",
    "AimdRateControl",
    "LossBasedControl",
    "probe_bitrate",
    "GccEstimator",
]


class BandwidthUsage(enum.StrEnum):
    """The overuse detector's hypothesis about the path (draft §5.4)."""

    NORMAL = "normal"
    OVERUSING = "overusing"
    UNDERUSING = "underusing"


# the members as plain names: the detector sets one per delay sample (a class attribute
# lookup each time otherwise)
_NORMAL = BandwidthUsage.NORMAL
_OVERUSING = BandwidthUsage.OVERUSING
_UNDERUSING = BandwidthUsage.UNDERUSING


class PacketResult(NamedTuple):
    """One acknowledged packet: when we sent it (our clock), when it arrived (the receiver's
    clock, only differences are meaningful) and its size in bytes (as given to next_seq)."""

    send_time: float
    arrival_time: float
    size: int


class LostPacket(NamedTuple):
    """One packet the receiver reported as not received."""

    send_time: float
    size: int


# --- the adapter from TwccSendHistory ----------------------------------------------------


@dataclass(slots=True)
class FeedbackReport:
    """What one transport-cc feedback says about packets not reported received before."""

    #: newly acknowledged packets with an arrival time, in feedback (sequence) order
    acked: list[PacketResult] = field(default_factory=list)
    #: packets reported lost for the first time
    lost: list[LostPacket] = field(default_factory=list)
    #: newly acknowledged without an arrival time (reserved symbol 11): count for loss only
    received_without_time: int = 0
    #: what :meth:`TwccSendHistory.on_feedback` returned for the same feedback
    stats: DeliveryStats | None = None


def feedback_report(history: TwccSendHistory, fb: TwccFeedback, now: float) -> FeedbackReport:
    """Match ``fb`` against ``history`` (this calls ``history.on_feedback(fb, now)``: call
    this instead of it, never both) and return the per-packet results for
    :meth:`GccEstimator.on_report`: the packets the report newly acknowledges, with send and
    arrival times, and those it newly reports lost, as :class:`DeliveryStats` lists them."""
    stats = history.on_feedback(fb, now)
    return FeedbackReport(
        acked=[PacketResult(send, arrival, size) for send, arrival, size in stats.received],
        lost=[LostPacket(send, size) for send, size in stats.lost_packets],
        received_without_time=stats.received_without_time,
        stats=stats,
    )


# --- delay-based: grouping (draft §5.2) ----------------------------------------------------

GROUP_LENGTH = 0.005  # send-time burst length (draft §5.2 burst_time; goog_cc 5 ms)
BURST_DELTA = 0.005  # arrival spacing below which a shrinking-delay packet joins the group
MAX_BURST = 0.1  # longest arrival span of a merged burst (goog_cc kMaxBurstDuration)
ARRIVAL_JUMP = 3.0  # arrival delta beyond the feedback-time delta + this: clock jump, reset
REORDER_RESET = 3  # consecutive groups arriving out of order before a reset


class InterArrival:
    """Groups acknowledged packets (in arrival order) into send bursts and yields, per pair of
    consecutive complete groups, ``(send_delta_ms, arrival_delta_ms, arrival_ms)``.

    A group spans packets sent within :data:`GROUP_LENGTH` of its first packet; its send time
    is the latest send time in it and its arrival time the arrival of its last packet. A
    packet sent before the current group's first packet (reordered) is ignored. Two groups
    whose arrival delta is negative (the network reordered whole groups) yield nothing, and
    three in a row reset the grouping, as does an arrival delta more than
    :data:`ARRIVAL_JUMP` larger than the delta of our own clock between the feedbacks that
    reported them (the receiver's clock jumped). State: two groups, O(1).
    """

    __slots__ = (
        "_first_send",
        "_send",
        "_first_arrival",
        "_arrival",
        "_system",
        "_size",
        "_prev_send",
        "_prev_arrival",
        "_prev_system",
        "_prev_size",
        "_reordered",
        "resets",
    )

    def __init__(self) -> None:
        self.resets = 0
        self._reset()

    def _reset(self) -> None:
        self._first_send: float | None = None  # None: no current group
        self._send = 0.0
        self._first_arrival = 0.0
        self._arrival = 0.0
        self._system = 0.0
        self._size = 0
        self._prev_send: float | None = None  # None: no complete previous group
        self._prev_arrival = 0.0
        self._prev_system = 0.0
        self._prev_size = 0
        self._reordered = 0

    def add(
        self, send: float, arrival: float, size: int, now: float
    ) -> tuple[float, float, float] | None:
        """Feed one packet (``now``: when its feedback was processed, our clock). Returns the
        deltas between the previous two groups when this packet starts a new group."""
        first = self._first_send
        out: tuple[float, float, float] | None = None
        if first is None:
            self._first_send = self._send = send
            self._first_arrival = arrival
        elif send < first:
            return None  # reordered: sent before the group it arrived in
        elif self._new_group(send, arrival, first):
            if self._prev_send is not None:
                send_delta = self._send - self._prev_send
                arrival_delta = self._arrival - self._prev_arrival
                if arrival_delta - (self._system - self._prev_system) >= ARRIVAL_JUMP:
                    self.resets += 1
                    self._reset()
                    return None
                if arrival_delta < 0.0:
                    self._reordered += 1
                    if self._reordered >= REORDER_RESET:
                        self.resets += 1
                        self._reset()
                    return None
                self._reordered = 0
                out = (send_delta * 1000.0, arrival_delta * 1000.0, arrival * 1000.0)
            self._prev_send = self._send
            self._prev_arrival = self._arrival
            self._prev_system = self._system
            self._prev_size = self._size
            self._first_send = self._send = send
            self._first_arrival = arrival
            self._size = 0
        elif send > self._send:
            self._send = send
        self._size += size
        self._arrival = arrival
        self._system = now
        return out

    def _new_group(self, send: float, arrival: float, first: float) -> bool:
        arrival_delta = arrival - self._arrival
        send_delta = send - self._send
        if send_delta == 0.0:
            return False
        if (
            arrival_delta - send_delta < 0.0
            and arrival_delta <= BURST_DELTA
            and arrival - self._first_arrival < MAX_BURST
        ):
            return False  # arrived in a burst, with less delay: a queue released them together
        return send - first > GROUP_LENGTH


# --- delay-based: trendline filter and overuse detector (draft §5.3-5.4, goog_cc) -----------

TRENDLINE_WINDOW = 20  # samples in the regression (goog_cc kDefaultTrendlineWindowSize)
TRENDLINE_SMOOTHING = 0.9  # exponential smoothing of the accumulated delay
TRENDLINE_GAIN = 4.0  # slope x deltas x gain is compared with the threshold (ms units)
MIN_NUM_DELTAS = 60  # the gain ramps up over the first 60 samples
MAX_NUM_DELTAS = 1000
THRESHOLD_START = 12.5  # gamma, initial (draft §5.4 del_var_th; goog_cc)
THRESHOLD_MIN = 6.0
THRESHOLD_MAX = 600.0
K_UP = 0.0087  # goog_cc's trendline values (draft §5.4 lists k_u 0.01, k_d 0.00018 for its
K_DOWN = 0.039  # Kalman offset; the trendline's modified slope is a different signal)
MAX_ADAPT_OFFSET = 15.0  # |m| beyond gamma + this: a spike, gamma is not adapted to it
MAX_THRESHOLD_DT = 100.0  # ms
OVERUSE_TIME = 10.0  # ms above gamma before overuse is signalled (draft overuse_time_th)


def linear_fit_slope(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Least-squares slope of y over x, ``sum((x-mx)(y-my)) / sum((x-mx)^2)``; None when all
    x are equal."""
    n = len(x)
    if n < 2:
        return None
    mx = sum(x) / n
    my = sum(y) / n
    num = den = 0.0
    for xi, yi in zip(x, y, strict=True):
        dx = xi - mx
        num += dx * (yi - my)
        den += dx * dx
    if den == 0.0:
        return None
    return num / den


class OveruseDetector:
    """The overuse hypothesis from the modified trend ``m`` against the adaptive threshold
    gamma (ms units). State: a few numbers."""

    __slots__ = (
        "threshold",
        "k_up",
        "k_down",
        "overuse_time",
        "state",
        "modified_trend",
        "_time_over",
        "_over_count",
        "_prev_trend",
        "_last_update",
    )

    def __init__(
        self,
        *,
        threshold: float = THRESHOLD_START,
        k_up: float = K_UP,
        k_down: float = K_DOWN,
        overuse_time: float = OVERUSE_TIME,
    ) -> None:
        self.threshold = threshold
        self.k_up = k_up
        self.k_down = k_down
        self.overuse_time = overuse_time
        self.state = _NORMAL
        self.modified_trend = 0.0
        self._time_over: float | None = None  # ms above gamma, None when below
        self._over_count = 0
        self._prev_trend = 0.0
        self._last_update: float | None = None

    def detect(
        self, trend: float, send_delta_ms: float, now_ms: float, num_deltas: int
    ) -> BandwidthUsage:
        """One sample: ``trend`` is the fitted slope, ``send_delta_ms`` the send-time delta of
        the groups it came from (how long we have been over), ``now_ms`` the arrival time
        (the threshold adapts in arrival time), ``num_deltas`` the samples so far."""
        if num_deltas < 2:
            self.state = _NORMAL
            return _NORMAL
        m = (num_deltas if num_deltas < MIN_NUM_DELTAS else MIN_NUM_DELTAS) * trend * TRENDLINE_GAIN
        self.modified_trend = m
        threshold = self.threshold
        if m > threshold:
            time_over = self._time_over
            # over for half the gap already, probably, when it starts
            time_over = send_delta_ms / 2.0 if time_over is None else time_over + send_delta_ms
            self._over_count += 1
            if (
                time_over > self.overuse_time
                and self._over_count > 1
                and trend >= self._prev_trend  # still rising: not a queue already draining
            ):
                time_over = 0.0
                self._over_count = 0
                self.state = _OVERUSING
            self._time_over = time_over
        else:
            self._time_over = None
            self._over_count = 0
            self.state = _UNDERUSING if m < -threshold else _NORMAL
        self._prev_trend = trend
        self.update_threshold(m, now_ms)
        return self.state

    def update_threshold(self, modified_trend: float, now_ms: float) -> None:
        """``gamma += k (|m| - gamma) dt`` with dt the ms since the last update (at most 100),
        k = ``k_down`` below gamma and ``k_up`` above; not adapted to a spike more than
        :data:`MAX_ADAPT_OFFSET` above gamma (a sudden capacity drop must not raise the bar
        for detecting it); clamped to [6, 600]."""
        last = self._last_update
        self._last_update = now_ms
        if last is None:
            last = now_ms
        magnitude = modified_trend if modified_trend >= 0.0 else -modified_trend
        threshold = self.threshold
        if magnitude > threshold + MAX_ADAPT_OFFSET:
            return
        k = self.k_down if magnitude < threshold else self.k_up
        dt = now_ms - last
        if dt > MAX_THRESHOLD_DT:
            dt = MAX_THRESHOLD_DT
        gamma = threshold + k * (magnitude - threshold) * dt
        self.threshold = (
            THRESHOLD_MIN
            if gamma < THRESHOLD_MIN
            else THRESHOLD_MAX
            if gamma > THRESHOLD_MAX
            else gamma
        )


class TrendlineFilter:
    """Delay variation samples -> accumulated, smoothed delay -> slope over the last
    :data:`TRENDLINE_WINDOW` samples -> :class:`OveruseDetector`. Until the window is full the
    trend stays 0 (goog_cc does the same: a line through few points is noise). State: the
    last ``window`` points and a few numbers.

    The slope is a least-squares fit, ``(w Sxy - Sx Sy) / (w Sxx - Sx^2)``, from sums over
    the window kept up to date as points come and go (O(1) per sample, plain Python: a
    feedback brings some ten samples, too few for numpy's per-call cost). The sums are taken
    about an origin, the window's first point, and recomputed from the points about a new
    origin every ``window`` samples, so that they stay small (arrival times in ms grow
    through a call) and what adding and removing rounds off cannot pile up."""

    __slots__ = (
        "window",
        "smoothing",
        "detector",
        "trend",
        "num_deltas",
        "accumulated",
        "smoothed",
        "_first_arrival",
        "_points",
        "_origin",
        "_sums",
        "_since_rebase",
    )

    def __init__(
        self,
        *,
        window: int = TRENDLINE_WINDOW,
        smoothing: float = TRENDLINE_SMOOTHING,
        detector: OveruseDetector | None = None,
    ) -> None:
        if window < 2:
            raise ValueError("trendline window needs at least 2 samples")
        self.window = window
        self.smoothing = smoothing
        self.detector = detector if detector is not None else OveruseDetector()
        self.trend = 0.0
        self.num_deltas = 0
        self.accumulated = 0.0  # ms
        self.smoothed = 0.0  # ms
        self._first_arrival: float | None = None
        #: the window's points: (arrival ms since the first sample, smoothed delay ms)
        self._points: deque[tuple[float, float]] = deque()
        self._origin = (0.0, 0.0)
        #: Sx, Sy, Sxx, Sxy of the points about the origin
        self._sums = (0.0, 0.0, 0.0, 0.0)
        self._since_rebase = 0

    @property
    def state(self) -> BandwidthUsage:
        return self.detector.state

    def update(self, samples: Iterable[tuple[float, float, float]]) -> BandwidthUsage:
        """Feed ``(send_delta_ms, arrival_delta_ms, arrival_ms)`` samples (from
        :class:`InterArrival`); returns the detector state after the last."""
        coef = self.smoothing
        accumulated = self.accumulated
        smoothed = self.smoothed
        n = self.num_deltas
        window = self.window
        points = self._points
        ox, oy = self._origin
        sx, sy, sxx, sxy = self._sums
        detect = self.detector.detect
        trend = self.trend
        for send_delta, arrival_delta, arrival in samples:
            if self._first_arrival is None:
                self._first_arrival = arrival
            n = min(n + 1, MAX_NUM_DELTAS)
            accumulated += arrival_delta - send_delta
            smoothed = coef * smoothed + (1.0 - coef) * accumulated
            x = arrival - self._first_arrival
            points.append((x, smoothed))
            if len(points) > window:
                gone_x, gone_y = points.popleft()
                gone_x -= ox
                gone_y -= oy
                sx -= gone_x
                sy -= gone_y
                sxx -= gone_x * gone_x
                sxy -= gone_x * gone_y
            self._since_rebase += 1
            if self._since_rebase >= window:
                self._since_rebase = 0
                ox, oy = points[0]
                sx = sy = sxx = sxy = 0.0
                for px, py in points:
                    px -= ox
                    py -= oy
                    sx += px
                    sy += py
                    sxx += px * px
                    sxy += px * py
            else:
                dx = x - ox
                dy = smoothed - oy
                sx += dx
                sy += dy
                sxx += dx * dx
                sxy += dx * dy
            if len(points) == window:
                den = window * sxx - sx * sx
                if den > 1e-12 * window * sxx:  # else every x is the same: no slope
                    trend = (window * sxy - sx * sy) / den
            detect(trend, send_delta, arrival, n)
        self.accumulated = accumulated
        self.smoothed = smoothed
        self.num_deltas = n
        self.trend = trend
        self._origin = (ox, oy)
        self._sums = (sx, sy, sxx, sxy)
        return self.detector.state


# --- acknowledged bitrate -------------------------------------------------------------------

ACKED_WINDOW = 0.5  # seconds of arrival time (goog_cc's initial throughput window)
ACKED_MAX_PACKETS = 8192  # ~160 Mbit/s of 1200-byte packets in the window


class AckedBitrate:
    """Bits/s the receiver got, over the last :data:`ACKED_WINDOW` seconds of arrival time.

    None until arrivals span a whole window (a shorter span says more about burstiness than
    about the path). After a pause in sending it reads low until a window has passed: it is
    a throughput, and the estimator only uses it as a ceiling for increases and the level of
    decreases. Bounded to :data:`ACKED_MAX_PACKETS` packets; when that many arrived within a
    window the rate is taken over the span they cover."""

    __slots__ = ("window", "_packets", "_bytes", "_first", "_newest")

    def __init__(self, window: float = ACKED_WINDOW, max_packets: int = ACKED_MAX_PACKETS) -> None:
        self.window = window
        self._packets: deque[tuple[float, int]] = deque(maxlen=max_packets)
        self._bytes = 0
        self._first: float | None = None
        self._newest = -math.inf

    def add(self, arrival: float, size: int) -> None:
        packets = self._packets
        if len(packets) == packets.maxlen:
            self._bytes -= packets[0][1]  # about to fall out
        packets.append((arrival, size))
        self._bytes += size
        if self._first is None:
            self._first = arrival
        if arrival > self._newest:
            self._newest = arrival
        horizon = self._newest - self.window
        while packets and packets[0][0] <= horizon:
            self._bytes -= packets.popleft()[1]

    @property
    def bitrate(self) -> float | None:
        first = self._first
        if first is None or self._newest - first < self.window:
            return None
        packets = self._packets
        if len(packets) == packets.maxlen:
            span = self._newest - packets[0][0]
            if span > 0.0:
                return (self._bytes - packets[0][1]) * 8.0 / span
        return self._bytes * 8.0 / self.window


# --- delay-based: AIMD rate control (draft §5.5, goog_cc AimdRateControl) ----------------------

BETA = 0.85  # decrease to this x the acknowledged bitrate (draft §5.5: 0.85 recommended)
INCREASE_PER_SECOND = 1.08  # multiplicative increase far from convergence (draft eta)
MIN_MULTIPLICATIVE_STEP = 1000.0  # bits/s, so that very low rates still move
MIN_ADDITIVE_RATE = 4000.0  # bits/s per second near convergence, at least
ADDITIVE_FRAME_RATE = 30.0  # the additive step is sized for packets of a 30 fps video frame
ADDITIVE_PACKET_BITS = 1200 * 8
RESPONSE_EXTRA = 0.1  # response time = RTT + 100 ms (draft §5.5)
DEFAULT_RTT = 0.2
THROUGHPUT_HEADROOM = 1.5  # never increase above 1.5 x acked + 10 kbit/s (draft §5.5)
THROUGHPUT_SLACK = 10_000.0
CAPACITY_ALPHA = 0.05  # averaging of the acknowledged bitrate at overuse
CAPACITY_DEVIATION_MIN = 0.4  # normalised variance bounds (kbit/s units, goog_cc)
CAPACITY_DEVIATION_MAX = 2.5


class AimdRateControl:
    """The delay-based estimate (bits/s) from the detector state and the acknowledged bitrate.

    The *link capacity* is an average of the acknowledged bitrate at the moments of overuse
    with a normalised variance (kbit/s units, as goog_cc keeps it): while the acknowledged
    bitrate stays within its 3-sigma band the increase is additive (we are near where the
    queue built up last time); outside, the estimate is reset and growth is multiplicative
    again (the path changed)."""

    __slots__ = (
        "bitrate",
        "min_bitrate",
        "max_bitrate",
        "rtt",
        "state",
        "capacity",
        "deviation",
        "_throughput",
        "_last_change",
        "_last_decrease",
    )

    def __init__(self, start_bitrate: float, min_bitrate: float, max_bitrate: float) -> None:
        self.min_bitrate = float(min_bitrate)
        self.max_bitrate = float(max_bitrate)
        self.bitrate = self._clamp(start_bitrate)
        self.rtt = DEFAULT_RTT
        self.state = "hold"  # "hold" | "increase" | "decrease"
        self.capacity: float | None = None  # bits/s
        self.deviation = CAPACITY_DEVIATION_MIN
        self._throughput = self.bitrate  # the last acknowledged bitrate seen
        self._last_change: float | None = None
        self._last_decrease: float | None = None

    def _clamp(self, bitrate: float) -> float:
        return min(max(bitrate, self.min_bitrate), self.max_bitrate)

    def _capacity_band(self) -> tuple[float, float]:
        assert self.capacity is not None
        kbps = self.capacity / 1000.0
        sigma = math.sqrt(self.deviation * kbps) * 1000.0
        return self.capacity - 3.0 * sigma, self.capacity + 3.0 * sigma

    def _on_overuse_throughput(self, throughput: float) -> None:
        if self.capacity is None:
            self.capacity = throughput
        else:
            self.capacity += CAPACITY_ALPHA * (throughput - self.capacity)
        kbps = max(self.capacity / 1000.0, 1.0)
        error = (self.capacity - throughput) / 1000.0
        deviation = (1 - CAPACITY_ALPHA) * self.deviation + CAPACITY_ALPHA * error * error / kbps
        self.deviation = min(max(deviation, CAPACITY_DEVIATION_MIN), CAPACITY_DEVIATION_MAX)

    def time_to_reduce_further(self, now: float, throughput: float) -> bool:
        """Another decrease while still overusing: once per RTT (10-200 ms), or at once when
        the acknowledged bitrate fell below half the estimate."""
        if self._last_change is None:
            return True
        if now - self._last_change >= min(max(self.rtt, 0.01), 0.2):
            return True
        return throughput < 0.5 * self.bitrate

    def set_estimate(self, bitrate: float, now: float) -> float:
        """Set the estimate directly (a probe result, an initial backoff)."""
        previous = self.bitrate
        self.bitrate = self._clamp(bitrate)
        self._last_change = now
        if self.bitrate < previous:
            self._last_decrease = now
        return self.bitrate

    def update(self, usage: BandwidthUsage, throughput: float | None, now: float) -> float:
        """Apply the detector state; returns the new estimate."""
        if throughput is not None:
            self._throughput = throughput
        else:
            throughput = self._throughput
        if usage is _OVERUSING:
            self.state = "decrease"
        elif usage is _UNDERUSING:
            self.state = "hold"
        elif self.state == "hold":
            self.state = "increase"

        if self.state == "increase":
            if self.capacity is not None and throughput > self._capacity_band()[1]:
                self.capacity = None  # far above the last congestion point: the path changed
            limit = THROUGHPUT_HEADROOM * throughput + THROUGHPUT_SLACK
            if self.bitrate < limit:
                elapsed = 1.0 if self._last_change is None else min(now - self._last_change, 1.0)
                elapsed = max(elapsed, 0.0)
                if self.capacity is not None:
                    step = self._additive_rate() * elapsed
                else:
                    step = max(
                        self.bitrate * (INCREASE_PER_SECOND**elapsed - 1.0),
                        MIN_MULTIPLICATIVE_STEP,
                    )
                self.bitrate = self._clamp(min(self.bitrate + step, limit))
            self._last_change = now
        elif self.state == "decrease":
            target = BETA * throughput
            if target > self.bitrate and self.capacity is not None:
                target = BETA * self.capacity
            if target < self.bitrate:
                self.bitrate = self._clamp(target)
            if self.capacity is not None and throughput < self._capacity_band()[0]:
                self.capacity = None  # far below the last congestion point: start over
            self._on_overuse_throughput(throughput)
            self.state = "hold"  # until the queue has drained
            self._last_change = now
            self._last_decrease = now
        return self.bitrate

    def _additive_rate(self) -> float:
        """Bits/s per second near convergence: about one average packet of a 30 fps frame at
        the current rate per response time (RTT + 100 ms), at least 4 kbit/s per second."""
        frame_bits = self.bitrate / ADDITIVE_FRAME_RATE
        packets = max(1.0, math.ceil(frame_bits / ADDITIVE_PACKET_BITS))
        response = self.rtt + RESPONSE_EXTRA
        return max(MIN_ADDITIVE_RATE, frame_bits / packets / response)


# --- loss-based (draft §6, classic goog_cc SendSideBandwidthEstimation) --------------------

LOSS_WINDOW = 1.0  # seconds per loss fraction sample (about an RTCP report interval)
LOSS_MIN_PACKETS = 20  # fewer packets make the fraction too coarse
LOW_LOSS = 0.02
HIGH_LOSS = 0.10
LOSS_INCREASE = 1.08  # x the minimum of the last second (+1 kbit/s) under low loss
LOSS_INCREASE_HISTORY = 1.0
LOSS_DECREASE_INTERVAL = 0.3  # + RTT between decreases
_HISTORY_MAX = 256


class LossBasedControl:
    """The loss-based estimate (bits/s). Fed with counts per feedback; a loss fraction is
    taken over non-overlapping windows of at least :data:`LOSS_WINDOW` seconds and
    :data:`LOSS_MIN_PACKETS` packets, and acted upon by :meth:`update` on every feedback:
    growing (< 2 %), holding (2-10 %) or cutting once per window (> 10 %). State: the
    running counts and a bounded monotonic history of the last second's minimum."""

    __slots__ = (
        "bitrate",
        "fraction",
        "window",
        "min_packets",
        "_received",
        "_lost",
        "_window_start",
        "_fresh",
        "_last_decrease",
        "_history",
    )

    def __init__(
        self,
        start_bitrate: float,
        *,
        window: float = LOSS_WINDOW,
        min_packets: int = LOSS_MIN_PACKETS,
    ) -> None:
        self.bitrate = float(start_bitrate)
        #: loss fraction of the last complete window, None before the first
        self.fraction: float | None = None
        self.window = window
        self.min_packets = min_packets
        self._received = 0
        self._lost = 0
        self._window_start: float | None = None
        self._fresh = False  # a window completed and has not caused a decrease yet
        self._last_decrease = -math.inf
        self._history: deque[tuple[float, float]] = deque(maxlen=_HISTORY_MAX)

    def on_packets(self, received: int, lost: int, now: float) -> None:
        if self._window_start is None:
            self._window_start = now
        self._received += received
        self._lost += lost
        total = self._received + self._lost
        if now - self._window_start >= self.window and total >= self.min_packets:
            self.fraction = self._lost / total
            self._received = self._lost = 0
            self._window_start = now
            self._fresh = True

    def lift(self, bitrate: float) -> None:
        """Take a higher estimate as is (a confirmed probe); forgets the last second."""
        if bitrate > self.bitrate:
            self.bitrate = bitrate
            self._history.clear()

    def update(self, now: float, ceiling: float, rtt: float) -> float:
        """Act on the last loss fraction; ``ceiling`` is the delay-based estimate."""
        fraction = self.fraction
        if fraction is None:
            self.bitrate = ceiling  # no loss information yet
        else:
            history = self._history
            while history and history[-1][1] >= self.bitrate:
                history.pop()
            history.append((now, self.bitrate))
            while history[0][0] < now - LOSS_INCREASE_HISTORY:
                history.popleft()
            if fraction <= LOW_LOSS:
                grown = history[0][1] * LOSS_INCREASE + 1000.0
                if grown > self.bitrate:
                    self.bitrate = grown
            elif fraction > HIGH_LOSS:
                if self._fresh and now - self._last_decrease >= LOSS_DECREASE_INTERVAL + rtt:
                    self.bitrate *= 1.0 - 0.5 * fraction
                    self._last_decrease = now
                    self._fresh = False
            if self.bitrate > ceiling:
                self.bitrate = ceiling
        return self.bitrate


# --- probing ----------------------------------------------------------------------------------

PROBE_MIN_PACKETS = 5  # a probe cluster: at least 5 packets (goog_cc) ...
PROBE_MIN_DURATION = 0.015  # ... over at least 15 ms
PROBE_MIN_RECEIVED = 0.8  # fraction of the cluster's packets that must be acknowledged
PROBE_MAX_RATIO = 2.0  # receive rate above 2 x send rate: measurement artefact, ignore
PROBE_SATURATED = 0.9  # receive rate below 0.9 x send rate: the probe hit the capacity ...
PROBE_UTILIZATION = 0.95  # ... which is then taken as 0.95 x the receive rate
PROBE_INTERVAL = 1.0  # seconds between probes, doubling up to PROBE_MAX_INTERVAL ...
PROBE_MAX_INTERVAL = 5.0  # ... while probes fail to lift the estimate (a path that
# widens is found within that long: goog_cc's periodic probes are 5 s apart as well)
PROBE_QUIET = 2.0  # no probing within this long after an overuse or a loss cut
PROBE_GAIN = 2.0  # probe at 2 x the estimate (goog_cc's further probes), at most the target
PROBE_RETRY_GAIN = 1.1  # a probe lifting the estimate less than 10 % counts as failed; and
# throughput 10 % above the last failed probe restarts the backoff


def probe_bitrate(packets: Sequence[PacketResult], packets_sent: int) -> float | None:
    """The bitrate a probe cluster shows (bits/s), from the acknowledged packets of the cluster
    (``packets_sent`` were sent): the smaller of the send rate (bytes but the last over the
    send span) and the receive rate (bytes but the first over the arrival span); when the
    receive rate is below 0.9 x the send rate the probe saturated the path and 0.95 x the
    receive rate is the answer. None when fewer than 80 % of the packets (or fewer than 5)
    were acknowledged, a span is not positive or above 1 s, or the receive rate is more than
    twice the send rate (compressed arrivals: no information)."""
    n = len(packets)
    if n < max(2, min(PROBE_MIN_PACKETS, packets_sent)) or n < PROBE_MIN_RECEIVED * packets_sent:
        return None
    by_send = sorted(packets, key=lambda p: p.send_time)
    by_arrival = sorted(packets, key=lambda p: p.arrival_time)
    send_span = by_send[-1].send_time - by_send[0].send_time
    arrival_span = by_arrival[-1].arrival_time - by_arrival[0].arrival_time
    if not (0.0 < send_span <= 1.0 and 0.0 < arrival_span <= 1.0):
        return None
    total = sum(p.size for p in packets)
    send_rate = (total - by_send[-1].size) * 8.0 / send_span
    receive_rate = (total - by_arrival[0].size) * 8.0 / arrival_span
    if receive_rate > PROBE_MAX_RATIO * send_rate:
        return None
    if receive_rate < PROBE_SATURATED * send_rate:
        return PROBE_UTILIZATION * receive_rate
    return min(send_rate, receive_rate)


# --- the estimator ----------------------------------------------------------------------------

RTT_SAMPLES = 32  # feedback RTT samples averaged (goog_cc keeps 32)


class GccEstimator:
    """Bandwidth estimate for ONE subscriber transport (bits/s). See the module docstring.

    :meth:`on_report` (or :meth:`on_feedback`) for every transport-cc feedback; read
    :attr:`estimate` after it. Optionally :meth:`wants_probe` / :meth:`on_probe_result`.
    All times are seconds on the caller's monotonic clock (``now``) except arrival times,
    which are on the receiver's clock. Bounded: every part keeps O(1) or a capped window.
    """

    __slots__ = (
        "min_bitrate",
        "max_bitrate",
        "rtt",
        "acked",
        "inter_arrival",
        "trendline",
        "aimd",
        "loss",
        "last_overuse",
        "feedbacks",
        "_rtt_fixed",
        "_rtt_samples",
        "_next_probe",
        "_probe_interval",
        "_failed_probe",
    )

    def __init__(
        self,
        start_bitrate: int = 300_000,
        *,
        min_bitrate: int = 30_000,
        max_bitrate: int = 10_000_000,
    ) -> None:
        if not 0 < min_bitrate <= max_bitrate:
            raise ValueError("need 0 < min_bitrate <= max_bitrate")
        self.min_bitrate = min_bitrate
        self.max_bitrate = max_bitrate
        start = min(max(start_bitrate, min_bitrate), max_bitrate)
        #: round-trip time in use, seconds (from feedback, unless given to on_feedback)
        self.rtt = DEFAULT_RTT
        self.acked = AckedBitrate()
        self.inter_arrival = InterArrival()
        self.trendline = TrendlineFilter()
        self.aimd = AimdRateControl(start, min_bitrate, max_bitrate)
        self.loss = LossBasedControl(start)
        #: our time of the last overuse (or loss-based cut), -inf before any
        self.last_overuse = -math.inf
        self.feedbacks = 0
        self._rtt_fixed = False
        self._rtt_samples: deque[float] = deque(maxlen=RTT_SAMPLES)
        self._next_probe = -math.inf
        self._probe_interval = PROBE_INTERVAL
        self._failed_probe = 0.0  # result of the last probe that did not lift the estimate

    # --- outputs ---

    @property
    def estimate(self) -> int:
        """The bitrate to send at, bits/s: min(delay-based, loss-based) within [min, max]."""
        value = min(self.aimd.bitrate, self.loss.bitrate)
        return int(min(max(value, self.min_bitrate), self.max_bitrate))

    @property
    def state(self) -> BandwidthUsage:
        """The delay-based detector's state."""
        return self.trendline.state

    @property
    def delay_based(self) -> int:
        return int(self.aimd.bitrate)

    @property
    def loss_based(self) -> int:
        return int(self.loss.bitrate)

    @property
    def acked_bitrate(self) -> float | None:
        return self.acked.bitrate

    # --- inputs ---

    def on_report(self, report: FeedbackReport, now: float, *, rtt: float | None = None) -> int:
        """:meth:`on_feedback` with what :func:`feedback_report` returned."""
        return self.on_feedback(
            report.acked,
            report.lost,
            now,
            rtt=rtt,
            received_without_time=report.received_without_time,
        )

    def on_feedback(
        self,
        acked: Sequence[tuple[float, float, int]],
        lost: Sequence[tuple[float, int]],
        now: float,
        *,
        rtt: float | None = None,
        received_without_time: int = 0,
    ) -> int:
        """One feedback: ``acked`` ``(send_time, arrival_time, size)`` of the packets newly
        reported received, ``lost`` ``(send_time, size)`` of those newly reported lost, ``now``
        when the feedback arrived. ``rtt`` (seconds), when the caller knows it better (RTCP
        RR), replaces from then on the estimate taken from feedback (now minus the latest send
        time acknowledged, averaged over 32 feedbacks). Returns :attr:`estimate`."""
        self.feedbacks += 1
        if rtt is not None:
            self._rtt_fixed = True
            self.rtt = rtt
        packets = sorted(acked, key=lambda p: p[1])  # arrival order (timsort: O(n) if sorted)
        if packets and not self._rtt_fixed:
            self._rtt_samples.append(now - max(p[0] for p in packets))
            self.rtt = sum(self._rtt_samples) / len(self._rtt_samples)
        self.aimd.rtt = self.rtt

        acked_rate = self.acked
        inter_arrival = self.inter_arrival
        samples: list[tuple[float, float, float]] = []
        for send, arrival, size in packets:
            acked_rate.add(arrival, size)
            sample = inter_arrival.add(send, arrival, size, now)
            if sample is not None:
                samples.append(sample)
        usage = self.trendline.update(samples) if samples else self.trendline.state
        throughput = acked_rate.bitrate

        aimd = self.aimd
        if not packets:
            pass  # nothing arrived (all lost, or no arrival times): no delay information
        elif usage is _OVERUSING:
            self.last_overuse = now
            if throughput is not None:
                if aimd.time_to_reduce_further(now, throughput):
                    aimd.update(usage, throughput, now)
            elif aimd.time_to_reduce_further(now, math.inf):
                # Overuse before there is any throughput measurement: halve (goog_cc).
                aimd.set_estimate(aimd.bitrate / 2.0, now)
        else:
            had_capacity = aimd.capacity is not None
            aimd.update(usage, throughput, now)
            if (
                had_capacity
                and aimd.capacity is None
                and throughput is not None
                and throughput > PROBE_RETRY_GAIN * self._failed_probe
            ):
                # The throughput rose out of the band of the last congestion point, and above
                # what the last failed probe found: the path changed, a probe may pay off
                # again whatever the backoff said.
                self._probe_interval = PROBE_INTERVAL
                self._next_probe = now

        loss = self.loss
        loss.on_packets(len(packets) + received_without_time, len(lost), now)
        before = loss.bitrate
        loss.update(now, aimd.bitrate, self.rtt)
        if loss.fraction is not None and loss.fraction > HIGH_LOSS and loss.bitrate < before:
            self.last_overuse = now
        return self.estimate

    # --- probing ---

    def wants_probe(self, now: float, target: float) -> bool:
        """True when a probe towards ``target`` bits/s (what the caller would like to send)
        would be useful now: the estimate is below the target (and the maximum), the path
        is quiet (detector normal, no overuse or loss cut for :data:`PROBE_QUIET` seconds,
        the last loss window at most 2 %), and the probe interval has passed. A True answer
        records the probe as started: send it now (see the module docstring); the next one
        is allowed after the probe interval (1 s, doubling with every probe up to 5 s; see
        :meth:`on_probe_result` and the module docstring for what brings it back to 1 s)."""
        estimate = self.estimate
        if estimate >= min(target, self.max_bitrate):
            return False
        if now < self._next_probe or now - self.last_overuse < PROBE_QUIET:
            return False
        if self.state is not _NORMAL:
            return False
        if self.loss.fraction is not None and self.loss.fraction > LOW_LOSS:
            return False
        self._next_probe = now + self._probe_interval
        self._probe_interval = min(self._probe_interval * 2.0, PROBE_MAX_INTERVAL)
        return True

    def probe_rate(self, target: float) -> int:
        """The rate to probe at: 2 x the estimate, at most ``target`` and the maximum."""
        rate = min(PROBE_GAIN * self.estimate, target, self.max_bitrate)
        return int(max(rate, self.estimate))

    def on_probe_result(self, bitrate: float, now: float) -> int:
        """A probe showed the path carries ``bitrate`` bits/s (:func:`probe_bitrate`). When
        that is above :attr:`estimate` and the detector is not overusing, lifts the
        delay-based estimate to it (if lower), and the loss-based one too unless the last loss
        window was above 10 %. A probe that lifts
        the estimate by more than 10 % allows the next one 1 s later. Returns :attr:`estimate`."""
        before = self.estimate
        if self.state is _OVERUSING or bitrate <= before:
            self._failed_probe = bitrate
            return before
        if bitrate > self.aimd.bitrate:
            self.aimd.set_estimate(bitrate, now)
        if self.loss.fraction is None or self.loss.fraction <= HIGH_LOSS:
            self.loss.lift(min(bitrate, self.aimd.bitrate))
        if self.estimate > PROBE_RETRY_GAIN * before:
            # Confirmed: there may be more, look again soon.
            self._probe_interval = PROBE_INTERVAL
            self._next_probe = min(self._next_probe, now + PROBE_INTERVAL)
            self._failed_probe = 0.0
        else:
            self._failed_probe = bitrate
        return self.estimate
